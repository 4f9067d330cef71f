#!/usr/bin/env bash
# make bench, cluster part: the operator at scale on the local control plane.
#   - dev cluster start time with the control-plane binaries cached (down, then up);
#   - 1,000 ModelDeployments applied at once: seconds until the operator has reconciled every
#     one (status.observedGeneration) and until every one is Ready (pods scheduled and Ready on
#     simulated nodes, so the controller-manager's and scheduler's own pace is included);
#   - the operator's RSS at steady state (and its peak);
#   - API writes per unchanged reconcile: the operator is restarted, reconciles all 1,000
#     again, and the API server's own request counters say how many writes that caused;
#   - the control-plane floor: the operator's objects created directly (no operator), seconds
#     until all their Deployments are Ready.
# usage: bench/cluster.sh OPERATOR_BINARY OUT_DIR   (env: BENCH_MDS, default 1000)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPERATOR="$1"
OUT="$2"
N="${BENCH_MDS:-1000}"
NS=kiln-bench
cluster="$ROOT/e2e/cluster/dev-cluster.sh"
mkdir -p "$OUT"
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$1" "$2"; }
kc() { bash "$cluster" exec -- kubectl "$@"; }
# The cluster is restarted to time its start, and stopped at the end.
trap 'bash "$cluster" down >/dev/null 2>&1 || true' EXIT

echo "== dev cluster start, control-plane binaries cached"
bash "$cluster" down >/dev/null 2>&1 || true
t0="$(now)"
bash "$cluster" up >/dev/null
up_s="$(secs "$t0" "$(now)")"
echo "up in ${up_s} s"
state="$HOME/.cache/kiln/dev-cluster"

kc apply --server-side -f "$ROOT/crds/modeldeployment.yaml" >/dev/null
kc wait --for=condition=Established crd/modeldeployments.kiln.dev --timeout=60s >/dev/null
kc create namespace "$NS" --dry-run=client -o yaml | kc apply -f - >/dev/null

# Simulated nodes of 128 pods: add_nodes POOL FIRST LAST makes bench-FIRST..bench-LAST-1 in POOL.
add_nodes() {
  python3 - "$1" "$2" "$3" "$OUT/nodes-$1.json" <<'PY'
import json, sys
pool, first, last, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
nodes = []
for i in range(first, last):
    res = {"cpu": "64", "memory": "512Gi", "pods": "128"}
    nodes.append({"apiVersion": "v1", "kind": "Node",
                  "metadata": {"name": f"bench-{i}", "annotations": {"kwok.x-k8s.io/node": "fake"},
                               "labels": {"type": "kwok", "kiln.dev/pool": pool,
                                          "kubernetes.io/hostname": f"bench-{i}"}},
                  "status": {"capacity": res, "allocatable": res}})
json.dump({"apiVersion": "v1", "kind": "List", "items": nodes}, open(out, "w"))
PY
  kc apply -f "$OUT/nodes-$1.json" >/dev/null
  kc wait --for=condition=Ready node -l "kiln.dev/pool=$1" --timeout=90s >/dev/null
}

# Capacity for 1,000 pods: 10 nodes in a pool of their own.
add_nodes bench 0 10

# N small resources, one CPU pool each on the bench nodes.
python3 - "$N" "$NS" "$OUT/mds.json" <<'PY'
import json, sys
n, ns, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
items = [{"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment",
          "metadata": {"name": f"md-{i:04d}", "namespace": ns},
          "spec": {"family": "text-embedding",
                   "models": [{"name": "minilm", "version": "v2", "memory": "100Mi",
                               "source": {"uri": "http://models.ml.svc.cluster.local/minilm/v2/"}}],
                   "pools": [{"name": "cpu", "nodeSelector": {"kiln.dev/pool": "bench"}, "replicas": 1,
                              "serve": ["minilm:v2"],
                              "resources": {"requests": {"cpu": "10m", "memory": "64Mi"},
                                            "limits": {"memory": "1Gi"}}}]}}
         for i in range(n)]
# 40 files applied in parallel: one kubectl is throttled client-side (about 5 requests/s).
parts = min(40, len(items))  # an empty file would make kubectl create fail
for part in range(parts):
    json.dump({"apiVersion": "v1", "kind": "List", "items": items[part::parts]}, open(f"{out}.{part}", "w"))
PY

start_operator() { # name
  bash "$cluster" spawn ns "$1" -- env KUBECONFIG="$state/kubeconfig" "$OPERATOR" --namespace "$NS" --metrics-addr 127.0.0.1:18091 \
    --log-format json --leader-elect false >/dev/null
  for _ in $(seq 100); do
    bash "$cluster" exec -- curl -sf -o /dev/null http://127.0.0.1:18091/readyz && break
    sleep 0.2
  done
}
operator_pid() { awk -v n="$1" '$1 == n { p = $2 } END { print p }' "$state/pids"; }
rss() { awk -v k="$2:" '$1 == k { print int($2 / 1024) }' "/proc/$1/status"; }
stop_operator() { kill -TERM "$(operator_pid "$1")"; sleep 2; }

# Counts every md in the namespace: reconciled (observedGeneration == generation) and Ready.
# A raw GET served from the API server's watch cache (resourceVersion=0) and parsed in Python:
# `kubectl get -o json` of 1,000 resources every second took half a core from what it measures.
api_list() { # PATH: a collection, served from the API server's watch cache
  bash "$cluster" exec -- curl -sf --cacert "$state/pki/ca.crt" --cert "$state/pki/admin.crt" \
    --key "$state/pki/admin.key" "https://127.0.0.1:16443$1?resourceVersion=0"
}
progress() {
  api_list "/apis/kiln.dev/v1alpha1/namespaces/$NS/modeldeployments" | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
obs = sum(1 for i in items if i.get("status", {}).get("observedGeneration") == i["metadata"]["generation"])
ready = sum(1 for i in items for c in i.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True")
print(len(items), obs, ready)'
}

# Writes the API server has served on the kinds the operator writes.
writes() {
  kc get --raw /metrics | python3 -c '
import json, re, sys
counts = {}
kinds = {"deployments", "services", "configmaps", "poddisruptionbudgets", "horizontalpodautoscalers",
         "modeldeployments", "events"}
total = 0
for line in sys.stdin:
    if not line.startswith("apiserver_request_total{"):
        continue
    labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", line))
    if labels.get("verb") in ("APPLY", "PATCH", "POST", "PUT", "DELETE") and labels.get("resource") in kinds:
        key = labels["verb"] + " " + labels["resource"] + ("/" + labels["subresource"] if labels.get("subresource") else "")
        counts[key] = counts.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
print(json.dumps(counts, sort_keys=True))'
}

echo "== $N ModelDeployments"
start_operator kiln-bench-operator
t0="$(now)"
ls "$OUT"/mds.json.* | bash "$cluster" exec -- xargs -P 40 -n 1 kubectl create -f >/dev/null
apply_s="$(secs "$t0" "$(now)")"
echo "applied in ${apply_s} s"
reconciled_s="" ready_s=""
for _ in $(seq 300); do
  read -r total obs ready < <(progress)
  t="$(now)"
  [[ -z "$reconciled_s" && "$total" == "$N" && "$obs" == "$N" ]] && reconciled_s="$(secs "$t0" "$t")" \
    && echo "all reconciled after ${reconciled_s} s"
  if [[ "$total" == "$N" && "$ready" == "$N" ]]; then
    ready_s="$(secs "$t0" "$t")"
    echo "all Ready after ${ready_s} s"
    break
  fi
  sleep 2
done
[[ -n "$ready_s" ]] || echo "not all Ready within 600 s: $total present, $obs reconciled, $ready Ready" >&2
pid="$(operator_pid kiln-bench-operator)"
sleep 5
rss_steady="$(rss "$pid" VmRSS)"
rss_peak="$(rss "$pid" VmHWM)"
echo "operator RSS ${rss_steady} MiB at steady state, peak ${rss_peak} MiB"

echo "== writes per unchanged reconcile (operator restarted, reconciles all $N again)"
reconciles_now() {
  bash "$cluster" exec -- curl -sf http://127.0.0.1:18091/metrics \
    | awk '/^kiln_operator_reconciles_total/ { s += $2 } END { print int(s) }'
}
# First let the operator finish what it has queued: no reconcile for 10 s (at most a minute;
# resyncs of 1,000 resources may never leave it fully idle).
last=-1
for _ in $(seq 6); do
  now_n="$(reconciles_now)"
  [[ "$now_n" == "$last" ]] && break
  last="$now_n"
  sleep 10
done
stop_operator kiln-bench-operator
before="$(writes)"
start_operator kiln-bench-operator-2
# The restarted operator reconciles every resource once at start; wait until it has.
for _ in $(seq 300); do
  done_n="$(reconciles_now)"
  ((done_n >= N)) && break
  sleep 1
done
sleep 3
after="$(writes)"
written="$(python3 -c 'import json, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = {k: a[k] - b.get(k, 0) for k in a if a[k] != b.get(k, 0)}
print(sum(d.values()), json.dumps(d))' "$before" "$after")"
echo "$done_n reconciles, writes: $written"
stop_operator kiln-bench-operator-2

echo "== control-plane floor: the same $N pools' objects created directly, no operator"
# What the cluster itself needs to bring the operator's objects up (ReplicaSets, pods,
# scheduling, kwok, EndpointSlices), so the operator's own share of the time above can be told
# apart. The objects are the operator's, read back from $NS, stripped of what the server added
# and of their owner, and created in another namespace onto 10 more simulated nodes.
FLOOR_NS=kiln-floor
kc create namespace "$FLOOR_NS" --dry-run=client -o yaml | kc apply -f - >/dev/null
add_nodes bench-floor 10 20
kc get deployments,services,configmaps -n "$NS" -l kiln.dev/modeldeployment -o json >"$OUT/operator-objects.json"
python3 - "$OUT/operator-objects.json" "$FLOOR_NS" "$OUT/floor.json" <<'PY'
import json, sys
src, ns, out = sys.argv[1], sys.argv[2], sys.argv[3]
items = []
for o in json.load(open(src))["items"]:
    m = o["metadata"]
    o["metadata"] = {"name": m["name"], "namespace": ns, "labels": m.get("labels", {}),
                     "annotations": {k: v for k, v in m.get("annotations", {}).items()
                                     if not k.startswith("deployment.kubernetes.io/")}}
    o.pop("status", None)
    if o["kind"] == "Service":
        for k in ("clusterIP", "clusterIPs"):
            o["spec"].pop(k, None)
    if o["kind"] == "Deployment":
        o["spec"]["template"]["spec"]["nodeSelector"] = {"kiln.dev/pool": "bench-floor"}
    items.append(o)
# 40 files in parallel, as the resources were.
parts = min(40, len(items))  # an empty file would make kubectl create fail
for part in range(parts):
    json.dump({"apiVersion": "v1", "kind": "List", "items": items[part::parts]}, open(f"{out}.{part}", "w"))
print(len(items))
PY
deploy_progress() {
  api_list "/apis/apps/v1/namespaces/$FLOOR_NS/deployments" | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
print(len(items), sum(1 for d in items if d.get("status", {}).get("readyReplicas", 0) >= d["spec"].get("replicas", 1)))'
}
t0="$(now)"
ls "$OUT"/floor.json.* | bash "$cluster" exec -- xargs -P 40 -n 1 kubectl create -f >/dev/null
floor_ready_s=""
for _ in $(seq 300); do
  read -r total ready < <(deploy_progress)
  if [[ "$total" == "$N" && "$ready" == "$N" ]]; then
    floor_ready_s="$(secs "$t0" "$(now)")"
    echo "control plane alone: all $N Deployments Ready after ${floor_ready_s} s"
    break
  fi
  sleep 2
done
[[ -n "$floor_ready_s" ]] || echo "control plane alone: not all Ready within the limit: $total present, $ready Ready" >&2

python3 - "$OUT/cluster.json" <<PY
import json, sys
json.dump({"mds": $N, "dev_cluster_up_s": $up_s, "apply_s": $apply_s,
           "all_reconciled_s": ${reconciled_s:-None}, "all_ready_s": ${ready_s:-None},
           "operator_rss_mib": ${rss_steady:-None}, "operator_peak_rss_mib": ${rss_peak:-None},
           "unchanged_reconciles": ${done_n:-0}, "writes_during_unchanged_reconciles": ${written%% *},
           "writes_by_kind": ${written#* },
           "control_plane_alone_ready_s": ${floor_ready_s:-None}},
          open(sys.argv[1], "w"), indent=1)
PY
