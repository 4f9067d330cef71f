#!/usr/bin/env bash
# Local Kubernetes control plane for Kiln's end-to-end tests and demo, from prebuilt upstream
# binaries (see build-control-plane.sh), inside a private network namespace.
#
#   dev-cluster.sh up              start everything (idempotent); last stdout line = kubeconfig path
#   dev-cluster.sh down            stop exactly the recorded processes, remove the state directory
#   dev-cluster.sh status          what runs, where the logs are; exit 0 only when all is up
#   dev-cluster.sh exec -- CMD...  run CMD inside the cluster's network + mount namespace
#   dev-cluster.sh spawn ns|host NAME -- CMD...  a background helper that `down` also stops
#   dev-cluster.sh stages          regenerate e2e/cluster/stages/ from the cached kwok stages
#   dev-cluster.sh monitoring      add Prometheus and prometheus-adapter to a running cluster
#                                  (idempotent; `MONITORING=1 dev-cluster.sh up` does it at start)
#
# What runs (all inside one network namespace; docs/dev-cluster.md has the details):
#   netns holder (unshare --net --mount), etcd 127.0.0.1:23790, kube-apiserver 127.0.0.1:16443,
#   kube-controller-manager 127.0.0.1:10357, kube-scheduler 127.0.0.1:10359, kwok (no server),
#   a TCP<->Unix-socket bridge pair (bridge.py) that makes 127.0.0.1:16443 work on the host, and
#   kubelet.py, a small kubelet that runs the pods of cpu-0 as real processes (pod IPs 10.245.1.x).
#   Five nodes: a100-0, a100-1, l4-0 (GPU, tainted), cpu-0 (kwok only heartbeats it and deletes
#   its pods; kubelet.py runs them), cpu-1 (pool cpu-sim, simulated).
#
# Environment:
#   KILN_CACHE                       cache root (default ~/.cache/kiln)
#   KILN_DEV_CLUSTER_DIR             state directory (default $KILN_CACHE/dev-cluster)
#   KILN_APISERVER_PORT              API server port, inside and on the host (default 16443)
#   KILN_HPA_SYNC_PERIOD             controller-manager HPA sync period (default 5s)
#   KILN_HPA_DOWNSCALE_STABILIZATION controller-manager HPA downscale window (default 30s)
#   KILN_APISERVER_ADVERTISE_ADDRESS --advertise-address (default 10.245.0.1; 127.0.0.1 also works)
#   KILN_MODEL_SERVER_BIN            what pods on cpu-0 run for `kiln-model-server` (default
#                                    ${CARGO_TARGET_DIR:-$KILN_CACHE/cargo-target}/debug/kiln-model-server)
#   KILN_DEV_CLUSTER_KEEP_ON_FAILURE=1  leave processes running when `up` fails (for debugging)
#   MONITORING=1                     also start Prometheus (127.0.0.1:19090 inside) and
#                                    prometheus-adapter (custom.metrics.k8s.io) at `up`
#   K8S_VERSION, KWOK_VERSION        as in build-control-plane.sh (defaults read from it)
#
# Needs root (unshare/nsenter/mount), iproute2, openssl, curl, kubectl, python3. No socat.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../.." && pwd)"
BUILD_SCRIPT="${SCRIPT_DIR}/build-control-plane.sh"
BRIDGE="${SCRIPT_DIR}/bridge.py"
KUBELET="${SCRIPT_DIR}/kubelet.py"
REPO_STAGES="${SCRIPT_DIR}/stages"

# Versions: single source of truth is build-control-plane.sh (its `X="${X:-default}"` lines).
build_default() {
  sed -n "s/^$1=\"\\\${$1:-\\([^}]*\\)}\".*/\\1/p" "${BUILD_SCRIPT}" | head -n1
}
K8S_VERSION="${K8S_VERSION:-$(build_default K8S_VERSION)}"
KWOK_VERSION="${KWOK_VERSION:-$(build_default KWOK_VERSION)}"
KILN_CACHE="${KILN_CACHE:-${HOME}/.cache/kiln}"
export K8S_VERSION KWOK_VERSION KILN_CACHE
K8S_BIN="${KILN_CACHE}/k8s-${K8S_VERSION}/bin"
KWOK_BIN="${KILN_CACHE}/kwok-${KWOK_VERSION}/bin"
KWOK_CACHED_STAGES="${KILN_CACHE}/kwok-${KWOK_VERSION}/stages"

STATE="${KILN_DEV_CLUSTER_DIR:-${KILN_CACHE}/dev-cluster}"
STATE="${STATE%/}"
LOGS="${STATE}/logs"
PKI="${STATE}/pki"
PIDS="${STATE}/pids"
CONTAINER_PIDS="${STATE}/kubelet-containers.pids"   # written by kubelet.py: one line per container process
MARKER="${STATE}/.kiln-dev-cluster"
LOCK="${STATE}.lock"
KUBECONFIG_ADMIN="${STATE}/kubeconfig"
API_SOCK="${STATE}/apiserver.sock"

# Address plan (see docs/dev-cluster.md).
API_PORT="${KILN_APISERVER_PORT:-16443}"
API_URL="https://127.0.0.1:${API_PORT}"
ETCD_CLIENT_PORT=23790
ETCD_PEER_PORT=23800
KCM_PORT=10357
SCHED_PORT=10359
KWOK_NET=10.244.0.1/16          # kwok's simulated pod IPs (--cidr starts at .0.2)
REAL_NET=10.245.0.1/16          # real processes (harness pods, metrics adapter, models.ml...)
KWOK_NODE_IP=10.244.0.1
HARNESS_NODE="cpu-0"            # the node a real kubelet harness serves; kwok leaves its pods
HARNESS_NODE_IP=10.245.0.1
HARNESS_POD_IP_PREFIX=10.245.1.  # the harness's pod IPs: 10.245.1.1 .. 10.245.1.254
MODEL_SERVER_BIN="${KILN_MODEL_SERVER_BIN:-${CARGO_TARGET_DIR:-${KILN_CACHE}/cargo-target}/debug/kiln-model-server}"
ADVERTISE_IP="${KILN_APISERVER_ADVERTISE_ADDRESS:-10.245.0.1}"  # no default route inside: must be explicit
SERVICE_CIDR=10.96.0.0/16
MODELS_HOST=models.ml.svc.cluster.local
MODELS_IP=10.245.255.1
HPA_SYNC="${KILN_HPA_SYNC_PERIOD:-5s}"
HPA_DOWNSCALE="${KILN_HPA_DOWNSCALE_STABILIZATION:-30s}"
MONITORING_SCRIPT="${SCRIPT_DIR}/build-monitoring.sh"
PROMETHEUS_ADDR=127.0.0.1:19090
ADAPTER_IP=10.245.0.2           # the aggregator dials the APIService's endpoint: not loopback
ADAPTER_PORT=6443
MONITORING_NS=kiln-monitoring

# Started in this order; stopped in reverse.
COMPONENTS=(netns etcd kube-apiserver kube-controller-manager kube-scheduler kwok bridge-ns bridge-host kubelet)

# kwok stage files used by `up` (flat names in e2e/cluster/stages/) and where they come from.
STAGE_SOURCES=(
  node/fast/node-initialize.yaml
  node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
  pod/general/pod-create.yaml
  pod/general/pod-init-container-running.yaml
  pod/general/pod-init-container-completed.yaml
  pod/general/pod-ready.yaml
  pod/general/pod-complete.yaml
  pod/general/pod-delete.yaml
)
POD_READY_DELAY_MS=2000

log() { printf '[dev-cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[dev-cluster] error: %s\n' "$*" >&2; exit 1; }
since() { awk -v a="$1" -v b="${EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: $PIDS has "name pid starttime" lines. starttime (field 22 of
# /proc/PID/stat) guards against pid reuse; a zombie counts as dead (PID 1 here may reap late).
# ---------------------------------------------------------------------------------------------
proc_start_time() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"   # drop "pid (comm) "; the rest is space-separated from field 3
  local -a f
  read -r -a f <<<"${stat}"
  [[ "${f[0]}" != Z && "${f[0]}" != X ]] || return 1
  echo "${f[19]}"
}
alive() { # pid starttime
  local st
  st="$(proc_start_time "$1")" || return 1
  [[ "${st}" == "$2" ]]
}
record() { # name pid
  local st
  st="$(proc_start_time "$2")" || st=dead
  echo "$1 $2 ${st}" >>"${PIDS}"
}
recorded_pid() { # name -> pid, if recorded
  [[ -f "${PIDS}" ]] || return 1
  awk -v n="$1" '$1 == n { p = $2 } END { if (p == "") exit 1; print p }' "${PIDS}"
}
component_alive() { # name
  [[ -f "${PIDS}" ]] || return 1
  local name pid st
  while read -r name pid st; do
    [[ "${name}" == "$1" ]] && alive "${pid}" "${st}" && return 0
  done <"${PIDS}"
  return 1
}

holder_pid() {
  local pid
  pid="$(recorded_pid netns)" || return 1
  component_alive netns || return 1
  echo "${pid}"
}

# Run a command in the namespace (network + mount: the private /etc/hosts comes with it).
ns_exec() {
  local h="${HOLDER:-}"
  [[ -n "${h}" ]] || h="$(holder_pid)" || die "the dev cluster is not running (no live netns holder in ${PIDS})"
  nsenter --net="/proc/${h}/ns/net" --mount="/proc/${h}/ns/mnt" --wd="${STATE}" -- "$@"
}

# Start a long-lived process in its own session/process group inside the namespace, logging to
# $LOGS/NAME.log. setsid does not fork here (a background job is no group leader) and nsenter
# execs, so $! is the daemon's own pid and also its process group id.
start_in_ns() { # name cmd...
  local name="$1"; shift
  setsid nsenter --net="/proc/${HOLDER}/ns/net" --mount="/proc/${HOLDER}/ns/mnt" --wd="${STATE}" -- \
    "$@" </dev/null >"${LOGS}/${name}.log" 2>&1 9>&- &
  record "${name}" "$!"
}
start_on_host() { # name cmd...
  local name="$1"; shift
  ( cd "${STATE}" && exec setsid "$@" </dev/null >"${LOGS}/${name}.log" 2>&1 9>&- ) &
  record "${name}" "$!"
}

stop_recorded() { # [pids-file, default $PIDS]
  local file="${1:-${PIDS}}"
  [[ -f "${file}" ]] || return 0
  local -a lines
  mapfile -t lines < <(tac "${file}")
  local line name pid st
  local -a live=()
  for line in "${lines[@]}"; do
    read -r name pid st <<<"${line}"
    [[ -n "${pid}" ]] || continue
    if alive "${pid}" "${st}"; then
      log "stopping ${name} (pid ${pid})"
      kill -TERM -- "-${pid}" 2>/dev/null || kill -TERM "${pid}" 2>/dev/null || true
      live+=("${name}:${pid}:${st}")
    fi
  done
  local deadline=$((SECONDS + 20)) killed=0 entry
  local -a remaining
  while :; do
    remaining=()
    for entry in "${live[@]}"; do
      IFS=: read -r name pid st <<<"${entry}"
      alive "${pid}" "${st}" && remaining+=("${entry}")
    done
    live=("${remaining[@]}")
    ((${#live[@]} == 0)) && break
    if ((SECONDS >= deadline)); then
      if ((killed)); then
        log "warning: still alive after SIGKILL: ${live[*]}"
        return 1
      fi
      for entry in "${live[@]}"; do
        IFS=: read -r name pid st <<<"${entry}"
        log "${name} (pid ${pid}) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL -- "-${pid}" 2>/dev/null || kill -KILL "${pid}" 2>/dev/null || true
      done
      killed=1
      deadline=$((SECONDS + 10))
    fi
    sleep 0.1
  done
}

# Processes started with `exec` are not ours to kill, but they keep the namespace (and its
# addresses) alive after `down`: name them.
warn_leftovers() {
  [[ -f "${STATE}/netns.id" ]] || return 0
  local id p st n=0
  id="$(cat "${STATE}/netns.id")"
  for p in /proc/[0-9]*; do
    [[ "$(readlink "${p}/ns/net" 2>/dev/null)" == "${id}" ]] || continue
    st="$(cat "${p}/stat" 2>/dev/null)" || continue
    st="${st##*) }"
    [[ "${st%% *}" == Z ]] && continue
    ((n++ == 0)) && log "warning: processes not started by this script still run in the cluster's namespace (${id}); stop them yourself:"
    log "  pid ${p#/proc/}: $(tr '\0' ' ' <"${p}/cmdline" 2>/dev/null | cut -c1-120)"
  done
  return 0
}

remove_state() {
  [[ -d "${STATE}" ]] || return 0
  [[ "${STATE}" != / && -n "${STATE}" ]] || die "refusing to remove '${STATE}'"
  if [[ -f "${MARKER}" || -z "$(ls -A "${STATE}")" ]]; then
    rm -rf "${STATE}"
  else
    die "${STATE} exists but was not made by this script (no ${MARKER}); not removing it"
  fi
}

take_lock() {
  mkdir -p "$(dirname "${LOCK}")"
  exec 9>"${LOCK}"
  flock -w 120 9 || die "another dev-cluster.sh holds ${LOCK}"
}

# Wait until CMD succeeds; fail early (with its log tail) when component NAME dies.
wait_for() { # description timeout_s component cmd...
  local what="$1" timeout="$2" comp="$3"; shift 3
  local t0="${EPOCHREALTIME}" deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [[ -n "${comp}" ]] && ! component_alive "${comp}"; then
      tail -n 30 "${LOGS}/${comp}.log" >&2 || true
      die "${comp} exited while waiting for ${what}; log: ${LOGS}/${comp}.log"
    fi
    if ((SECONDS >= deadline)); then
      [[ -n "${comp}" ]] && { tail -n 30 "${LOGS}/${comp}.log" >&2 || true; }
      die "timed out after ${timeout} s waiting for ${what}${comp:+; log: ${LOGS}/${comp}.log}"
    fi
    sleep 0.2
  done
  log "${what}: ok ($(since "${t0}") s)"
}

# ---------------------------------------------------------------------------------------------
# kwok stages: e2e/cluster/stages/ holds copies of kwok's upstream Stage files, with pods on
# $HARNESS_NODE excluded from every stage except pod-delete and a fixed pod-ready delay.
# ---------------------------------------------------------------------------------------------
render_stage() { # source-relative-path -> stdout
  local rel="$1" src="${KWOK_CACHED_STAGES}/$1" base
  base="$(basename "${rel}" .yaml)"
  [[ -f "${src}" ]] || die "missing kwok stage ${src} (run build-control-plane.sh)"
  local exclude=0 ready=0
  case "${base}" in
    pod-create | pod-init-container-running | pod-init-container-completed | pod-complete) exclude=1 ;;
    pod-ready) exclude=1 ready=1 ;;
  esac
  echo "# Generated by e2e/cluster/dev-cluster.sh stages; do not edit. Source: kwok ${KWOK_VERSION}"
  echo "# kustomize/stage/${rel}."
  if ((exclude)); then
    echo "# Kiln change: added '.spec.nodeName NotIn [${HARNESS_NODE}]' to the selector, so kwok leaves"
    echo "# pods on ${HARNESS_NODE} to the real kubelet harness (it still heartbeats that node, and"
    echo "# pod-delete, unchanged, still removes its deleted pods)."
  fi
  if ((ready)); then
    echo "# Kiln change: fixed delay ${POD_READY_DELAY_MS} ms (stands for model load time) instead of"
    echo "# 1000 ms + up to 4 s jitter; the per-pod annotations"
    echo "# pod-ready.stage.kwok.x-k8s.io/delay (e.g. \"10s\") and .../jitter-delay still override it."
  fi
  if ((!exclude)); then
    echo "# Unchanged copy."
  fi
  awk -v exclude="${exclude}" -v ready="${ready}" -v node="${HARNESS_NODE}" -v delay="${POD_READY_DELAY_MS}" '
    BEGIN { inserted = 0; delayed = 0; dropped = 0; indelay = 0 }
    {
      print_line = 1
      if (ready) {
        if ($0 == "  delay:") indelay = 1
        else if ($0 !~ /^    /) indelay = 0
        if (indelay && $0 ~ /^    durationMilliseconds: [0-9]+$/) { $0 = "    durationMilliseconds: " delay; delayed++ }
        if (indelay && $0 ~ /^    jitterDurationMilliseconds: [0-9]+$/) { print_line = 0; dropped++ }
      }
      if (print_line) print
      if (exclude && $0 == "    matchExpressions:") {
        print "    - key: '\''.spec.nodeName'\''"
        print "      operator: '\''NotIn'\''"
        print "      values:"
        print "      - '\''" node "'\''"
        inserted++
      }
    }
    END {
      if (exclude && inserted != 1) { print "render: expected one selector.matchExpressions, found " inserted > "/dev/stderr"; exit 1 }
      if (ready && (delayed != 1 || dropped != 1)) { print "render: pod-ready delay block not as expected" > "/dev/stderr"; exit 1 }
    }
  ' "${src}"
}

cmd_stages() {
  mkdir -p "${REPO_STAGES}"
  local rel out
  for rel in "${STAGE_SOURCES[@]}"; do
    out="${REPO_STAGES}/$(basename "${rel}")"
    render_stage "${rel}" >"${out}.tmp" || { rm -f "${out}.tmp"; die "could not render ${rel}"; }
    mv -f "${out}.tmp" "${out}"
    echo "${out}"
  done
}

# Check the repo's stage files against a fresh rendering; warn on drift (never rewrites them).
check_stages() {
  local rel out
  for rel in "${STAGE_SOURCES[@]}"; do
    out="${REPO_STAGES}/$(basename "${rel}")"
    [[ -f "${out}" ]] || die "missing ${out}; run: bash e2e/cluster/dev-cluster.sh stages"
    if ! cmp -s "${out}" <(render_stage "${rel}"); then
      log "warning: ${out} differs from kwok ${KWOK_VERSION}'s ${rel} + Kiln changes (using the repo file; 'dev-cluster.sh stages' regenerates)"
    fi
  done
  return 0
}

# ---------------------------------------------------------------------------------------------
# PKI and kubeconfigs
# ---------------------------------------------------------------------------------------------
write_openssl_cnf() {
  cat >"${PKI}/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,digitalSignature,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[v3_apiserver]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1,IP:${ADVERTISE_IP}
EOF
}
gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }
gen_ca() { # name CN
  gen_key "${PKI}/$1.key"
  openssl req -x509 -new -config "${PKI}/openssl.cnf" -extensions v3_ca -key "${PKI}/$1.key" \
    -subj "/CN=$2" -days 3650 -sha256 -out "${PKI}/$1.crt" 2>/dev/null
}
gen_cert() { # name ca subject extensions
  gen_key "${PKI}/$1.key"
  openssl req -new -config "${PKI}/openssl.cnf" -key "${PKI}/$1.key" -subj "$3" 2>/dev/null |
    openssl x509 -req -CA "${PKI}/$2.crt" -CAkey "${PKI}/$2.key" -set_serial "0x$(openssl rand -hex 16)" \
      -days 365 -sha256 -extfile "${PKI}/openssl.cnf" -extensions "$4" -out "${PKI}/$1.crt" 2>/dev/null
}
b64() { base64 -w0 <"$1"; }
write_kubeconfig() { # file user cert-name
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kiln-dev
  cluster:
    server: ${API_URL}
    certificate-authority-data: $(b64 "${PKI}/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(b64 "${PKI}/$3.crt")
    client-key-data: $(b64 "${PKI}/$3.key")
contexts:
- name: kiln-dev
  context:
    cluster: kiln-dev
    user: $2
current-context: kiln-dev
EOF
  chmod 600 "$1"
}

make_pki() {
  mkdir -p "${PKI}"
  chmod 700 "${PKI}"
  write_openssl_cnf
  gen_ca ca kiln-dev-ca
  gen_ca front-proxy-ca kiln-dev-front-proxy-ca
  gen_cert apiserver ca "/CN=kube-apiserver" v3_apiserver
  gen_cert admin ca "/O=system:masters/CN=kiln-admin" v3_client
  gen_cert controller-manager ca "/CN=system:kube-controller-manager" v3_client
  gen_cert scheduler ca "/CN=system:kube-scheduler" v3_client
  gen_cert kwok ca "/O=system:masters/CN=kiln-kwok" v3_client
  gen_cert front-proxy-client front-proxy-ca "/CN=front-proxy-client" v3_client
  gen_key "${PKI}/sa.key"
  openssl pkey -in "${PKI}/sa.key" -pubout -out "${PKI}/sa.pub" 2>/dev/null
  write_kubeconfig "${KUBECONFIG_ADMIN}" kiln-admin admin
  write_kubeconfig "${STATE}/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
  write_kubeconfig "${STATE}/scheduler.kubeconfig" system:kube-scheduler scheduler
  write_kubeconfig "${STATE}/kwok.kubeconfig" kiln-kwok kwok
}

# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------
node_yaml() { # name pool cpu memory gpus gpu-memory-MiB gpu-product internal-ip
  local name="$1" pool="$2" cpu="$3" mem="$4" gpus="$5" gmem="$6" gprod="$7" ip="$8"
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: ${name}
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    type: kwok
    kiln.dev/pool: ${pool}
    kubernetes.io/hostname: ${name}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
EOF
  if ((gpus > 0)); then
    cat <<EOF
    gpu.kiln.dev/pool: ${pool}
    nvidia.com/gpu.count: "${gpus}"
    nvidia.com/gpu.memory: "${gmem}"
    nvidia.com/gpu.product: ${gprod}
spec:
  taints:
  - key: nvidia.com/gpu
    value: present
    effect: NoSchedule
EOF
  else
    echo "spec: {}"
  fi
  local res="      cpu: \"${cpu}\"
      memory: ${mem}
      pods: \"110\""
  ((gpus > 0)) && res+="
      nvidia.com/gpu: \"${gpus}\""
  cat <<EOF
status:
  capacity:
${res}
  allocatable:
${res}
EOF
  if [[ -n "${ip}" ]]; then
    cat <<EOF
  addresses:
  - type: InternalIP
    address: ${ip}
  - type: Hostname
    address: ${name}
EOF
  fi
}
nodes_yaml() {
  node_yaml a100-0 a100 32 256Gi 4 81920 A100-SXM4-80GB ""
  node_yaml a100-1 a100 32 256Gi 4 81920 A100-SXM4-80GB ""
  node_yaml l4-0 l4 32 256Gi 2 23034 L4 ""
  node_yaml cpu-0 cpu 16 64Gi 0 "" "" "${HARNESS_NODE_IP}"
  # Simulated CPU capacity in a pool of its own, so pods of the `cpu` pool always run for real.
  node_yaml cpu-1 cpu-sim 16 64Gi 0 "" "" ""
}
NODE_COUNT=5

kubectl_ns() { ns_exec kubectl --kubeconfig "${KUBECONFIG_ADMIN}" --cache-dir "${STATE}/kubectl-cache" "$@"; }
nodes_ready() {
  local out
  out="$(kubectl_ns get nodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints[*].key}{"\n"}{end}')" || return 1
  awk -v want="${NODE_COUNT}" '
    { n++; if ($2 != "True" || $0 ~ /node\.kubernetes\.io\/(not-ready|unreachable)/) bad++ }
    END { exit !(n == want && bad == 0) }' <<<"${out}"
}

# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------
api_ready_inside() {
  ns_exec curl -sf --max-time 2 --cacert "${PKI}/ca.crt" "${API_URL}/readyz"
}
all_alive() {
  local c
  for c in "${COMPONENTS[@]}"; do component_alive "${c}" || return 1; done
}
any_alive() {
  local f name pid st
  for f in "${PIDS}" "${CONTAINER_PIDS}"; do
    [[ -f "${f}" ]] || continue
    while read -r name pid st; do alive "${pid}" "${st}" && return 0; done <"${f}"
  done
  return 1
}

# The kubelet harness stops its containers on SIGTERM; these catch what a crashed harness left.
stop_containers() {
  stop_recorded "${CONTAINER_PIDS}"
}

on_up_exit() {
  local rc=$?
  ((rc == 0)) && return 0
  trap - EXIT
  if [[ "${KILN_DEV_CLUSTER_KEEP_ON_FAILURE:-0}" == 1 ]]; then
    log "up failed (exit ${rc}); processes left running (KILN_DEV_CLUSTER_KEEP_ON_FAILURE=1). Logs: ${LOGS}/. Clean up: $0 down"
  else
    log "up failed (exit ${rc}); stopping what was started. Logs kept in ${LOGS}/ ('$0 down' removes them)"
    stop_recorded || true
    stop_containers || true
  fi
  exit "${rc}"
}

cmd_up() {
  local t_start="${EPOCHREALTIME}" t
  take_lock

  if [[ -d "${STATE}" ]]; then
    if [[ -f "${PIDS}" ]] && all_alive && HOLDER="$(holder_pid)" && api_ready_inside >/dev/null 2>&1; then
      echo "kiln dev cluster already running (state ${STATE}; 'status' for details)"
      echo "${KUBECONFIG_ADMIN}"
      return 0
    fi
    if any_alive; then
      die "the dev cluster in ${STATE} is partly running (see '$0 status'); run '$0 down' first"
    fi
    log "removing stale state ${STATE} (no recorded process alive)"
    remove_state
  fi

  local tool
  for tool in unshare nsenter setsid ip mount openssl curl kubectl python3 flock awk base64 tac; do
    command -v "${tool}" >/dev/null 2>&1 || die "'${tool}' not found on PATH"
  done
  ((EUID == 0)) || die "needs root (unshare --net --mount, nsenter, mount --bind)"
  python3 -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "${API_PORT}" 2>/dev/null ||
    die "127.0.0.1:${API_PORT} is in use on the host (the bridge needs it); free it or set KILN_APISERVER_PORT"

  t="${EPOCHREALTIME}"
  bash "${BUILD_SCRIPT}" 9>&-
  local b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    [[ -x "${K8S_BIN}/${b}" ]] || die "missing ${K8S_BIN}/${b}"
  done
  [[ -x "${KWOK_BIN}/kwok" ]] || die "missing ${KWOK_BIN}/kwok"
  check_stages
  log "binaries and stages: ok ($(since "${t}") s)"

  mkdir -p "${STATE}" "${LOGS}"
  chmod 700 "${STATE}"
  : >"${MARKER}"
  : >"${PIDS}"
  trap on_up_exit EXIT

  # 1. Network + mount namespace, held by a sleeping process.
  t="${EPOCHREALTIME}"
  {
    grep -v -E "[[:space:]]${MODELS_HOST//./\\.}([[:space:]]|$)" /etc/hosts 2>/dev/null || true
    echo "# kiln dev cluster (bind-mounted over /etc/hosts inside the namespace only)"
    echo "${MODELS_IP} ${MODELS_HOST}"
  } >"${STATE}/hosts"
  grep -q -E '^127\.0\.0\.1[[:space:]].*\blocalhost\b' "${STATE}/hosts" || echo "127.0.0.1 localhost" >>"${STATE}/hosts"
  # shellcheck disable=SC2016
  ( exec setsid unshare --net --mount --propagation private -- bash -c '
      set -e
      ip link set lo up
      ip addr add "$1" dev lo
      ip addr add "$2" dev lo
      mount --bind "$3" /etc/hosts
      : >"$4"
      exec sleep infinity' netns-holder "${KWOK_NET}" "${REAL_NET}" "${STATE}/hosts" "${STATE}/netns.ready" \
      </dev/null >"${LOGS}/netns.log" 2>&1 9>&- ) &
  record netns "$!"
  wait_for "network namespace" 10 netns test -f "${STATE}/netns.ready"
  HOLDER="$(recorded_pid netns)"
  readlink "/proc/${HOLDER}/ns/net" >"${STATE}/netns.id"
  ns_exec python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.245.3.4", 8080)); s.listen(1)
c = socket.create_connection(("10.245.3.4", 8080), timeout=2); c.close()
assert socket.gethostbyname(sys.argv[1]) == sys.argv[2], "private /etc/hosts not in effect"
' "${MODELS_HOST}" "${MODELS_IP}" || die "the namespace cannot bind 10.245.3.4:8080 or resolve ${MODELS_HOST}"
  log "namespace (holder pid ${HOLDER}): lo has ${KWOK_NET} ${REAL_NET}; bind 10.245.3.4:8080 ok; ${MODELS_HOST} -> ${MODELS_IP} ($(since "${t}") s)"

  # 2. PKI.
  t="${EPOCHREALTIME}"
  make_pki
  log "certificates and kubeconfigs in ${PKI} ($(since "${t}") s)"

  # 3. etcd.
  start_in_ns etcd "${K8S_BIN}/etcd" \
    --name=kiln-dev \
    --data-dir="${STATE}/etcd" \
    --listen-client-urls="http://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --advertise-client-urls="http://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --listen-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster="kiln-dev=http://127.0.0.1:${ETCD_PEER_PORT}" \
    --unsafe-no-fsync=true \
    --quota-backend-bytes=$((2 * 1024 * 1024 * 1024)) \
    --log-level=warn
  wait_for "etcd on 127.0.0.1:${ETCD_CLIENT_PORT}" 30 etcd \
    ns_exec curl -sf --max-time 2 "http://127.0.0.1:${ETCD_CLIENT_PORT}/health"

  # 4. kube-apiserver.
  start_in_ns kube-apiserver "${K8S_BIN}/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --bind-address=127.0.0.1 \
    --secure-port="${API_PORT}" \
    --advertise-address="${ADVERTISE_IP}" \
    --cert-dir="${STATE}/apiserver-certs" \
    --tls-cert-file="${PKI}/apiserver.crt" \
    --tls-private-key-file="${PKI}/apiserver.key" \
    --client-ca-file="${PKI}/ca.crt" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=ServiceAccount \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="${PKI}/sa.pub" \
    --service-account-signing-key-file="${PKI}/sa.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --endpoint-reconciler-type=none \
    --allow-privileged=true \
    --proxy-client-cert-file="${PKI}/front-proxy-client.crt" \
    --proxy-client-key-file="${PKI}/front-proxy-client.key" \
    --requestheader-client-ca-file="${PKI}/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-username-headers=X-Remote-User \
    --enable-aggregator-routing=true
  wait_for "kube-apiserver ${API_URL}/readyz" 120 kube-apiserver api_ready_inside

  # 5./6. Controller manager, scheduler and kwok start together.
  start_in_ns kube-controller-manager "${K8S_BIN}/kube-controller-manager" \
    --kubeconfig="${STATE}/controller-manager.kubeconfig" \
    --authentication-kubeconfig="${STATE}/controller-manager.kubeconfig" \
    --authorization-kubeconfig="${STATE}/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="${KCM_PORT}" \
    --cert-dir="${STATE}/controller-manager-certs" \
    --flex-volume-plugin-dir="${STATE}/flexvolume" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="${PKI}/sa.key" \
    --root-ca-file="${PKI}/ca.crt" \
    --cluster-signing-cert-file="${PKI}/ca.crt" \
    --cluster-signing-key-file="${PKI}/ca.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --horizontal-pod-autoscaler-sync-period="${HPA_SYNC}" \
    --horizontal-pod-autoscaler-downscale-stabilization="${HPA_DOWNSCALE}"
  start_in_ns kube-scheduler "${K8S_BIN}/kube-scheduler" \
    --kubeconfig="${STATE}/scheduler.kubeconfig" \
    --authentication-kubeconfig="${STATE}/scheduler.kubeconfig" \
    --authorization-kubeconfig="${STATE}/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="${SCHED_PORT}" \
    --cert-dir="${STATE}/scheduler-certs" \
    --leader-elect=false
  local -a stage_args=()
  local rel
  for rel in "${STAGE_SOURCES[@]}"; do stage_args+=("--config=${REPO_STAGES}/$(basename "${rel}")"); done
  start_in_ns kwok "${KWOK_BIN}/kwok" \
    --kubeconfig="${STATE}/kwok.kubeconfig" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-ip="${KWOK_NODE_IP}" \
    --cidr="${KWOK_NODE_IP%.1}.2/16" \
    --node-lease-duration-seconds=40 \
    "${stage_args[@]}"

  # 7. Nodes (kwok makes them Ready and keeps their Leases fresh). Created before the bridges
  # start, so kwok and the node lifecycle controller work while the bridges come up.
  t="${EPOCHREALTIME}"
  nodes_yaml | kubectl_ns create -f - >/dev/null
  log "created nodes a100-0 a100-1 l4-0 cpu-0 cpu-1 ($(since "${t}") s)"

  # 9. Bridge: host 127.0.0.1:PORT -> Unix socket -> namespace 127.0.0.1:PORT. The host side
  # only dials the socket per connection, so both start at once.
  start_in_ns bridge-ns python3 "${BRIDGE}" --listen "unix:${API_SOCK}" \
    --connect "tcp:127.0.0.1:${API_PORT}" --ready-file "${STATE}/bridge-ns.ready"
  start_on_host bridge-host python3 "${BRIDGE}" --listen "tcp:127.0.0.1:${API_PORT}" \
    --connect "unix:${API_SOCK}" --ready-file "${STATE}/bridge-host.ready"
  wait_for "bridge (namespace side) on ${API_SOCK}" 15 bridge-ns test -f "${STATE}/bridge-ns.ready"
  wait_for "bridge (host side) on 127.0.0.1:${API_PORT}" 15 bridge-host test -f "${STATE}/bridge-host.ready"

  wait_for "${NODE_COUNT} nodes Ready, untainted by the node lifecycle controller" 90 kwok nodes_ready

  # 10. The kubelet harness for cpu-0 (its pods run as processes in this namespace).
  if [[ -x "${MODEL_SERVER_BIN}" ]]; then
    log "kubelet harness on ${HARNESS_NODE}: kiln-model-server = ${MODEL_SERVER_BIN} (built $(date -r "${MODEL_SERVER_BIN}" '+%Y-%m-%d %H:%M'))"
  else
    log "kubelet harness on ${HARNESS_NODE}: kiln-model-server = ${MODEL_SERVER_BIN} (missing: such containers fail with StartError until it is built; KILN_MODEL_SERVER_BIN overrides)"
  fi
  start_in_ns kubelet python3 "${KUBELET}" \
    --kubeconfig "${KUBECONFIG_ADMIN}" \
    --node "${HARNESS_NODE}" --node-ip "${HARNESS_NODE_IP}" --pod-ip-prefix "${HARNESS_POD_IP_PREFIX}" \
    --state-dir "${STATE}" \
    --model-server-bin "${MODEL_SERVER_BIN}" \
    --pids-file "${CONTAINER_PIDS}" \
    --ready-file "${STATE}/kubelet.ready"
  wait_for "kube-scheduler healthz" 60 kube-scheduler \
    ns_exec curl -skf --max-time 2 "https://127.0.0.1:${SCHED_PORT}/healthz"
  wait_for "kube-controller-manager healthz" 60 kube-controller-manager \
    ns_exec curl -skf --max-time 2 "https://127.0.0.1:${KCM_PORT}/healthz"
  wait_for "service account default/default (controller-manager running)" 60 kube-controller-manager \
    kubectl_ns -n default get serviceaccount default
  wait_for "kubelet harness on ${HARNESS_NODE} (first pod list)" 15 kubelet test -f "${STATE}/kubelet.ready"

  # From the host, through the bridge.
  wait_for "API from the host via the bridge" 15 bridge-host \
    kubectl --kubeconfig "${KUBECONFIG_ADMIN}" --cache-dir "${STATE}/kubectl-cache" get --raw /readyz
  all_alive || die "a component exited during start-up (see '$0 status')"
  if [[ "${MONITORING:-0}" == 1 ]]; then start_monitoring; fi
  trap - EXIT

  local c
  echo "kiln dev cluster up in $(since "${t_start}") s: Kubernetes ${K8S_VERSION}, kwok ${KWOK_VERSION}, API ${API_URL} (host and namespace)"
  echo "state: ${STATE}"
  for c in "${COMPONENTS[@]}"; do
    printf 'log: %-24s %s\n' "${c}" "${LOGS}/${c}.log"
  done
  echo "pods on ${HARNESS_NODE} run for real (kubelet.py; kiln-model-server = ${MODEL_SERVER_BIN}); their logs: ${LOGS}/pods/"
  echo "inside the namespace: bash ${REPO_ROOT}/e2e/cluster/dev-cluster.sh exec -- CMD..."
  echo "kubeconfig (admin):"
  echo "${KUBECONFIG_ADMIN}"
}

# spawn ns|host NAME -- CMD...: a long-lived helper (the demo's operator, a model mirror) that
# `down` stops with the cluster; logs to $LOGS/NAME.log.
# --- monitoring: Prometheus + prometheus-adapter ---------------------------------------------
# Prometheus discovers model-server pods through the API server (pod-discovery.py writes its
# file_sd targets: Debian's build has no kubernetes_sd) and scrapes their real /metrics on
# their pod IPs; the adapter serves custom.metrics.k8s.io from
# it, with the rules the Helm chart ships (rendered from the chart, never copied), registered
# through an APIService whose endpoint is the adapter's namespace-local address.
prometheus_config() {
  cat <<EOF
# Written by dev-cluster.sh. Targets come from pod-discovery.py (the chart's PodMonitor
# selection, read from the API server), since Debian's Prometheus has no kubernetes_sd.
global:
  scrape_interval: 2s
  scrape_timeout: 1s
  evaluation_interval: 2s
scrape_configs:
- job_name: kiln-model-servers
  metrics_path: /metrics
  file_sd_configs:
  - files: ["${STATE}/monitoring/targets.json"]
    refresh_interval: 5s
EOF
}

monitoring_objects() {
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: ${MONITORING_NS}
---
# Selector-less: the adapter is a process in the cluster's namespace, not a pod.
apiVersion: v1
kind: Service
metadata:
  name: prometheus-adapter
  namespace: ${MONITORING_NS}
spec:
  ports:
  - name: https
    port: 443
    targetPort: ${ADAPTER_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: prometheus-adapter
  namespace: ${MONITORING_NS}
  labels:
    kubernetes.io/service-name: prometheus-adapter
addressType: IPv4
ports:
- name: https
  port: ${ADAPTER_PORT}
  protocol: TCP
endpoints:
- addresses: ["${ADAPTER_IP}"]
  conditions:
    ready: true
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1beta1.custom.metrics.k8s.io
spec:
  group: custom.metrics.k8s.io
  version: v1beta1
  service:
    name: prometheus-adapter
    namespace: ${MONITORING_NS}
    port: 443
  # The adapter serves a self-signed certificate from its --cert-dir.
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 100
  versionPriority: 100
EOF
}

start_monitoring() {
  local t="${EPOCHREALTIME}" paths prom adapter helm
  paths="$(bash "${MONITORING_SCRIPT}" 9>&-)" || die "could not build or fetch Prometheus and prometheus-adapter"
  prom="$(sed -n 1p <<<"${paths}")"
  adapter="$(sed -n 2p <<<"${paths}")"
  helm="${KILN_HELM:-}"
  [[ -n "${helm}" ]] || helm="$(bash "${REPO_ROOT}/scripts/helm.sh" 9>&-)" \
    || die "helm is needed to render the chart's adapter rules"
  mkdir -p "${STATE}/monitoring/adapter-certs"

  prometheus_config >"${STATE}/monitoring/prometheus.yml"
  # The adapter rules exactly as the chart ships them (prometheusAdapter.rules.enabled).
  "${helm}" template kiln "${REPO_ROOT}/charts/kiln" --namespace "${MONITORING_NS}" \
    --set prometheusAdapter.rules.enabled=true --show-only templates/monitoring.yaml \
    >"${STATE}/monitoring/chart-monitoring.yaml" || die "helm template of charts/kiln failed"
  python3 - "${STATE}/monitoring/chart-monitoring.yaml" "${STATE}/monitoring/adapter-rules.yaml" <<'PY' ||
import sys
# The chart's ConfigMap holds the adapter config as a literal block under data."config.yaml":
# take that block and drop its indentation (no YAML library needed).
lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.strip() == "config.yaml: |")
indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
block = []
for l in lines[start + 1:]:
    if l.strip() and len(l) - len(l.lstrip()) < indent:
        break
    block.append(l[indent:])
text = "\n".join(block).strip() + "\n"
assert "kiln_queue_depth" in text, "no kiln_queue_depth rule in the chart's adapter config"
open(sys.argv[2], "w").write(text)
PY
    die "could not find the adapter rules in the chart's rendered ConfigMap"

  if ! component_alive pod-discovery; then
    start_in_ns pod-discovery python3 "${SCRIPT_DIR}/pod-discovery.py" \
      --kubeconfig "${KUBECONFIG_ADMIN}" --out "${STATE}/monitoring/targets.json"
  fi
  wait_for "pod discovery (first listing)" 30 pod-discovery test -f "${STATE}/monitoring/targets.json"
  if ! component_alive prometheus; then
    start_in_ns prometheus "${prom}" \
      --config.file="${STATE}/monitoring/prometheus.yml" \
      --storage.tsdb.path="${STATE}/monitoring/prometheus-data" \
      --storage.tsdb.retention.time=2h \
      --web.listen-address="${PROMETHEUS_ADDR}"
  fi
  wait_for "Prometheus on ${PROMETHEUS_ADDR}" 60 prometheus \
    ns_exec curl -sf --max-time 2 "http://${PROMETHEUS_ADDR}/-/ready"

  if ! component_alive prometheus-adapter; then
    start_in_ns prometheus-adapter "${adapter}" \
      --prometheus-url="http://${PROMETHEUS_ADDR}" \
      --config="${STATE}/monitoring/adapter-rules.yaml" \
      --metrics-relist-interval=5s \
      --lister-kubeconfig="${KUBECONFIG_ADMIN}" \
      --authentication-kubeconfig="${KUBECONFIG_ADMIN}" \
      --authorization-kubeconfig="${KUBECONFIG_ADMIN}" \
      --bind-address="${ADAPTER_IP}" \
      --secure-port="${ADAPTER_PORT}" \
      --cert-dir="${STATE}/monitoring/adapter-certs" \
      --v=1
  fi
  wait_for "prometheus-adapter on ${ADAPTER_IP}:${ADAPTER_PORT}" 60 prometheus-adapter \
    ns_exec curl -skf --max-time 2 "https://${ADAPTER_IP}:${ADAPTER_PORT}/healthz"
  monitoring_objects | kubectl_ns apply -f - >/dev/null || die "could not register the adapter's APIService"
  wait_for "APIService v1beta1.custom.metrics.k8s.io Available" 60 prometheus-adapter \
    kubectl_ns wait --for=condition=Available apiservice/v1beta1.custom.metrics.k8s.io --timeout=2s
  log "monitoring up ($(since "${t}") s): Prometheus http://${PROMETHEUS_ADDR} (inside), adapter https://${ADAPTER_IP}:${ADAPTER_PORT}; logs ${LOGS}/prometheus.log ${LOGS}/prometheus-adapter.log"
}

cmd_monitoring() {
  take_lock
  HOLDER="$(holder_pid)" || die "the dev cluster is not running (start it with: $0 up)"
  start_monitoring
  echo "Prometheus: http://${PROMETHEUS_ADDR} (inside the namespace: $0 exec -- curl ...)"
  echo "custom metrics: kubectl get --raw /apis/custom.metrics.k8s.io/v1beta1/namespaces/NS/pods/*/kiln_queue_depth"
}

cmd_spawn() {
  local where="${1:-}" name="${2:-}"
  [[ "${where}" == ns || "${where}" == host ]] && [[ -n "${name}" ]] && [[ "${3:-}" == -- ]] \
    || die "usage: dev-cluster.sh spawn ns|host NAME -- CMD..."
  shift 3
  HOLDER="$(holder_pid)" || die "the dev cluster is not running"
  if [[ "${where}" == ns ]]; then start_in_ns "${name}" "$@"; else start_on_host "${name}" "$@"; fi
  echo "${LOGS}/${name}.log"
}

cmd_down() {
  take_lock
  if [[ ! -d "${STATE}" ]]; then
    echo "kiln dev cluster: not running (no ${STATE})"
    return 0
  fi
  local t="${EPOCHREALTIME}"
  stop_recorded
  stop_containers
  warn_leftovers
  remove_state
  echo "kiln dev cluster: stopped, ${STATE} removed ($(since "${t}") s)"
}

cmd_status() {
  if [[ ! -d "${STATE}" ]]; then
    echo "kiln dev cluster: not running (no ${STATE})"
    return 3
  fi
  local ok=0 c pid
  echo "state: ${STATE}"
  for c in "${COMPONENTS[@]}"; do
    pid="$(recorded_pid "${c}" 2>/dev/null)" || pid=-
    if component_alive "${c}"; then
      printf '  %-24s running  pid %-8s log %s\n' "${c}" "${pid}" "${LOGS}/${c}.log"
    else
      printf '  %-24s DOWN     pid %-8s log %s\n' "${c}" "${pid}" "${LOGS}/${c}.log"
      ok=1
    fi
  done
  if HOLDER="$(holder_pid 2>/dev/null)" && api_ready_inside >/dev/null 2>&1; then
    echo "  API ${API_URL}/readyz: ok (inside)"
  else
    echo "  API ${API_URL}/readyz: not ready (inside)"
    ok=1
  fi
  if kubectl --kubeconfig "${KUBECONFIG_ADMIN}" --cache-dir "${STATE}/kubectl-cache" --request-timeout=3s get --raw /readyz >/dev/null 2>&1; then
    echo "  API ${API_URL}/readyz: ok (host, via bridge)"
  else
    echo "  API ${API_URL}/readyz: not ready (host, via bridge)"
    ok=1
  fi
  echo "kubeconfig: ${KUBECONFIG_ADMIN}"
  return "${ok}"
}

cmd_exec() {
  [[ "${1:-}" == -- ]] && shift
  (($# > 0)) || die "usage: $0 exec -- CMD [ARGS...]"
  HOLDER="$(holder_pid)" || die "the dev cluster is not running (start it with: $0 up)"
  export KILN_DEV_CLUSTER_DIR="${STATE}"
  export KUBECONFIG="${KUBECONFIG:-${KUBECONFIG_ADMIN}}"
  exec nsenter --net="/proc/${HOLDER}/ns/net" --mount="/proc/${HOLDER}/ns/mnt" --wd="${PWD}" -- "$@"
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  exec) shift; cmd_exec "$@" ;;
  spawn) shift; cmd_spawn "$@" ;;
  stages) shift; cmd_stages "$@" ;;
  monitoring) shift; cmd_monitoring "$@" ;;
  -h | --help | help | "") usage ;;
  *) echo "unknown subcommand '$1'" >&2; usage ;;
esac
