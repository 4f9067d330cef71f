#!/usr/bin/env bash
# make e2e: build the binaries and the end-to-end tests (outside: cargo may need the registries),
# start the dev cluster if it is not running, run the tests inside its network namespace, and
# stop the cluster again if this script started it (KILN_E2E_KEEP=1 keeps it).
set -euo pipefail
# shellcheck source=e2e/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

bash scripts/fixtures.sh
# The chart test installs with the real helm.
KILN_HELM="$(bash scripts/helm.sh)"
export KILN_HELM
# Builds the bins too (operator and model-server have integration tests), with the same
# features as `make unit`, so nothing compiles twice.
"$CARGO" test --workspace --locked --no-run

cluster=e2e/cluster/dev-cluster.sh
started=0
if ! bash "$cluster" status >/dev/null 2>&1; then
  # Monitoring (Prometheus, prometheus-adapter) for the autoscaling test; that test also adds
  # it to a cluster started without it.
  MONITORING=1 bash "$cluster" up
  started=1
fi
stop() { if [ "$started" = 1 ] && [ "${KILN_E2E_KEEP:-0}" != 1 ]; then bash "$cluster" down; fi; }
trap stop EXIT
kubeconfig="$(bash "$cluster" status | sed -n 's/^kubeconfig: //p')"
t0=$(date +%s)
bash "$cluster" exec -- env KUBECONFIG="$kubeconfig" \
  "$CARGO" test --workspace --locked --offline --test e2e -- --test-threads=3 "$@"
echo "make e2e: passed in $(( $(date +%s) - t0 ))s (tests only)"
