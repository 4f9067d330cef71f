# Sourced by e2e/run.sh and e2e/demo.sh: run from the repository root with the same cargo
# output and the same model-server binary that `make test` builds, so nothing compiles twice.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO="${CARGO:-cargo}"
KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KILN_CACHE/cargo-target}"
export KILN_FIXTURES="${KILN_FIXTURES:-$KILN_CACHE/fixtures}"
# The kubelet harness runs this binary for pods on cpu-0.
export KILN_MODEL_SERVER_BIN="${KILN_MODEL_SERVER_BIN:-$CARGO_TARGET_DIR/debug/kiln-model-server}"
