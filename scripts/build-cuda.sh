#!/usr/bin/env bash
# `make build-cuda`: the model server with the `cuda` feature, in release, from the CUDA
# toolchain scripts/cuda-toolchain.sh installs (no GPU or driver needed). Its own target
# directory, so the CPU binary in target/release is never replaced by the CUDA one. Prints the
# binary's path.
#   --check   the same build, only where the toolchain is already cached (`make test`); where
#             it is not, says so and succeeds (a cold toolchain is an 800 MB download).
#   --example NAME   also build that example (bench_engine for `make bench-gpu`); prints its path.
#   --tests A,B      also build those integration tests of the model server (release, `cuda`
#                    feature: what scripts/gpu-check.sh carries to a GPU); prints their paths.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
cargo="${CARGO:-cargo}"
if [ "${1:-}" = --check ]; then
  if ! cuda="$(bash scripts/cuda-toolchain.sh --check)"; then
    echo "build-cuda: not built: no CUDA toolchain cached in $cache (make build-cuda installs it)"
    exit 0
  fi
else
  # The driver stub is generated from cudarc's sources, which must be in the registry first.
  "$cargo" fetch --locked >/dev/null
  cuda="$(bash scripts/cuda-toolchain.sh)"
fi
export CUDA_HOME="$cuda" PATH="$cuda/bin:$PATH"
# The capability candle's build is told; bin/nvcc adds 8.6, 8.9 and 9.0 (see cuda-toolchain.sh).
export CUDA_COMPUTE_CAP=80
# KILN_CUDA_TARGET_DIR: another target directory (a build for other KILN_CUDA_ARCHS, whose
# kernels cargo cannot tell apart from these).
export CARGO_TARGET_DIR="${KILN_CUDA_TARGET_DIR:-$cache/cargo-target-cuda}"
"$cargo" build --release --locked -p kiln-model-server --features cuda >&2
bin="$CARGO_TARGET_DIR/release/kiln-model-server"
if [ "${1:-}" = --example ]; then
  "$cargo" build --release --locked -p kiln-model-server --features cuda --example "${2:?--example NAME}" >&2
  bin="$CARGO_TARGET_DIR/release/examples/$2"
fi
if [ "${1:-}" = --tests ]; then
  args=()
  for t in ${2//,/ }; do args+=(--test "$t"); done
  # The executables' paths, from cargo's own report of what it built.
  "$cargo" test --release --locked -p kiln-model-server --features cuda "${args[@]}" --no-run \
    --message-format=json-render-diagnostics \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])'
  exit 0
fi
# Linked against the CUDA libraries and the driver's soname, nothing else unexpected.
needed="$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')"
for lib in libcuda.so.1 libcublas.so.13 libcudart.so.13; do
  case " $needed" in *" $lib "*) ;; *) echo "build-cuda: $bin does not link $lib (links: $needed)" >&2; exit 1 ;; esac
done
echo "$bin"
