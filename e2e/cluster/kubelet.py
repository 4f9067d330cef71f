#!/usr/bin/env python3
"""A small kubelet for one node of the dev cluster: runs that node's pods as host processes.

The dev cluster (e2e/cluster/dev-cluster.sh) simulates its nodes with kwok, except the pods of
one node (cpu-0), which kwok leaves alone. This program plays the kubelet for that node, inside
the cluster's network namespace, so that pods there run for real:

  * list + watch /api/v1/pods?fieldSelector=spec.nodeName=NODE (re-list on 410 and errors);
  * one pod IP per live pod from PREFIX.1 .. PREFIX.254 (round robin, so a freed address is not
    handed out again at once); hostIP = the node's IP (hostNetwork pods get the node IP);
  * volumes in $STATE/pods/<ns>_<name>_<uid>/volumes/<volume>: configMap and secret (keys as
    files, `items` honoured), emptyDir, hostPath (the host path itself), projected
    (configMap/secret/downwardAPI sources), downwardAPI; anything else (a PVC) is an empty
    directory and a warning;
  * containers as host processes, each in its own session/process group, stdout+stderr to
    $STATE/logs/pods/<ns>_<pod>_<container>.log. command[0] `kiln-model-server` runs
    --model-server-bin; other commands run as given, through PATH. In command, args, env values
    and workingDir a string that starts with a volumeMount's mountPath (or `--flag=` followed by
    one) gets that prefix replaced by the volume's host directory (+ subPath); in command and args
    `0.0.0.0:` becomes `<podIP>:`. `$(VAR)` references are expanded as Kubernetes does.
    env: the harness's PATH and HOME (and LANG, LC_ALL, TZ when set; nothing else, so e.g. a
    RUST_BACKTRACE of the caller's shell does not reach the pods),
    HOSTNAME=<pod name>, TMPDIR=<host dir> when a volume is mounted at /tmp, then envFrom
    (configMapRef/secretRef, `optional`, `prefix`), then env (value, fieldRef, configMapKeyRef,
    secretKeyRef);
  * init containers one after the other, then the main containers; exits are restarted per
    restartPolicy with back-off 5 s, 10 s, 20 s ... 60 s (CrashLoopBackOff in between; the
    streak resets after a container ran 120 s); a failed container's status message is the tail
    of its log;
  * startup/readiness/liveness probes (httpGet, tcpSocket, exec) against the pod IP, with the
    kubelet's semantics (startup gates the others; liveness and startup failures restart the
    container), except that periodSeconds is capped at --probe-period-cap (default 2 s) so tests
    do not wait for 10 s periods;
  * pods/status merge patches: phase, podIP(s), hostIP(s), startTime, init and main container
    statuses, conditions PodScheduled, PodReadyToStartContainers, Initialized, ContainersReady,
    Ready (lastTransitionTime changes only with the status); unknown condition types are kept;
  * Events like the kubelet's (Started, Killing, Unhealthy, BackOff, FailedMount, Failed);
  * deletion: SIGTERM to every container's process group, SIGKILL after
    min(grace, 30) s, a last status patch, then DELETE with gracePeriodSeconds=0 (404 is fine:
    kwok's pod-delete stage may be first). A pod that vanishes from the API has its processes
    stopped the same way and its directory removed.

Not a kubelet: no cgroups or resource limits, no image pulls (the image is only reported), no
users/fsGroup/securityContext, no preStop/postStart hooks, no restartable (sidecar) init
containers, no grpc probes (reported healthy), no kubectl logs/exec, and ConfigMap/Secret volumes
are written once per pod. Paths inside files (e.g. a manifest) are not rewritten.

Every container's "name pid starttime" goes to --pids-file as it starts, so dev-cluster.sh down
can kill leftover process groups if this program died. On SIGTERM/SIGINT it stops every container
it started (SIGTERM to the groups, SIGKILL after --shutdown-grace s) and exits 0.
"""

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from datetime import datetime, timezone

TICK = 0.25                 # seconds between a pod worker's steps (probe results wake it early)
WATCH_TIMEOUT = 240         # server-side watch timeout
BACKOFF_BASE, BACKOFF_MAX = 5, 60
BACKOFF_RESET_AFTER = 120   # a container that ran this long starts a fresh back-off streak
GRACE_CAP = 30
LOG_TAIL_LINES, LOG_TAIL_BYTES = 10, 2048
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")  # nothing else leaks in (RUST_BACKTRACE, ...)

_log_lock = threading.Lock()


def now_iso():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log(msg):
    t = datetime.now(timezone.utc)
    line = f"{t.strftime('%Y-%m-%dT%H:%M:%S')}.{t.microsecond // 1000:03d}Z {msg}"
    with _log_lock:
        print(line, flush=True)


class ApiError(Exception):
    def __init__(self, code, message):
        super().__init__(f"HTTP {code}: {message}" if code else message)
        self.code = code


class ConfigError(Exception):
    """A container cannot be configured yet (a missing ConfigMap/Secret key, no command)."""


# ---------------------------------------------------------------------------------------------
# API client: the kubeconfig's server, CA and client certificate (data or files) or token.
# ---------------------------------------------------------------------------------------------
KUBECONFIG_KEYS = ("server", "certificate-authority", "certificate-authority-data",
                   "client-certificate", "client-certificate-data", "client-key",
                   "client-key-data", "token", "insecure-skip-tls-verify")


def load_kubeconfig(path):
    """The first cluster and user of a kubeconfig (JSON, or the simple YAML dev-cluster.sh
    writes: one `key: value` per line)."""
    with open(path) as f:
        text = f.read()
    found = {}
    try:
        doc = json.loads(text)
        cluster = doc["clusters"][0]["cluster"]
        user = doc["users"][0]["user"]
        for k in KUBECONFIG_KEYS:
            if k in cluster or k in user:
                found[k] = str(cluster.get(k, user.get(k)))
    except (ValueError, KeyError, IndexError, TypeError):
        for line in text.splitlines():
            m = re.match(r"^\s*(?:-\s+)?([A-Za-z-]+):\s*(.*?)\s*$", line)
            if m and m.group(1) in KUBECONFIG_KEYS and m.group(1) not in found and m.group(2):
                found[m.group(1)] = m.group(2).strip("'\"")
    if "server" not in found:
        raise SystemExit(f"{path}: no server")
    base = os.path.dirname(os.path.abspath(path))
    for k in ("certificate-authority", "client-certificate", "client-key"):
        if k in found and not os.path.isabs(found[k]):
            found[k] = os.path.join(base, found[k])
    return found


class Kube:
    def __init__(self, kubeconfig):
        cfg = load_kubeconfig(kubeconfig)
        url = urllib.parse.urlsplit(cfg["server"])
        if url.scheme != "https":
            raise SystemExit(f"{kubeconfig}: only https servers are supported")
        self.host, self.port = url.hostname, url.port or 443
        ctx = ssl.create_default_context()
        if cfg.get("insecure-skip-tls-verify") == "true":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif "certificate-authority-data" in cfg:
            ctx.load_verify_locations(cadata=base64.b64decode(cfg["certificate-authority-data"]).decode())
        elif "certificate-authority" in cfg:
            ctx.load_verify_locations(cafile=cfg["certificate-authority"])
        cert, key = cfg.get("client-certificate"), cfg.get("client-key")
        tmp = None
        if "client-certificate-data" in cfg or "client-key-data" in cfg:
            # ssl loads client certificates only from files: write them to a private temporary
            # directory, load them and remove it at once.
            tmp = tempfile.mkdtemp(prefix="kiln-kubelet-")
            os.chmod(tmp, 0o700)
            if "client-certificate-data" in cfg:
                cert = os.path.join(tmp, "client.crt")
                with open(cert, "wb") as f:
                    f.write(base64.b64decode(cfg["client-certificate-data"]))
            if "client-key-data" in cfg:
                key = os.path.join(tmp, "client.key")
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(cfg["client-key-data"]))
        try:
            if cert:
                ctx.load_cert_chain(cert, key)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        self.ctx = ctx
        self.headers = {"Accept": "application/json", "User-Agent": "kiln-dev-kubelet/1"}
        if "token" in cfg:
            self.headers["Authorization"] = f"Bearer {cfg['token']}"
        self.local = threading.local()

    def _connection(self, timeout):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)
            self.local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def request(self, method, path, body=None, content_type="application/json", timeout=10):
        """(status, decoded JSON body or {}); raises ApiError(0, ...) when no answer came."""
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in (0, 1):
            conn = self._connection(timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, OSError) as e:
                conn.close()
                self.local.conn = None
                if attempt == 0 and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError,
                                                   ConnectionResetError)):
                    continue  # a keep-alive connection the server had closed
                raise ApiError(0, f"{method} {path}: {e}") from None
            try:
                obj = json.loads(raw) if raw else {}
            except ValueError:
                obj = {"message": raw[:200].decode(errors="replace")}
            return resp.status, obj
        raise AssertionError("unreachable")

    def get(self, path):
        status, obj = self.request("GET", path)
        if status != 200:
            raise ApiError(status, obj.get("message", "") if isinstance(obj, dict) else "")
        return obj

    def watch(self, path):
        """Yield watch events until the server ends the stream."""
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=WATCH_TIMEOUT + 30)
        try:
            conn.request("GET", path, headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                body = resp.read()[:300].decode(errors="replace")
                raise ApiError(resp.status, body)
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


def q(s):
    return urllib.parse.quote(s, safe="")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def proc_start_time(pid):
    """Field 22 of /proc/PID/stat (what dev-cluster.sh compares against pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "dead"


def killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def log_tail(path, offset):
    """The last lines a container wrote to its log since offset."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            start = max(offset, end - 64 * 1024)
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    lines = data.decode(errors="replace").rstrip("\n").splitlines()[-LOG_TAIL_LINES:]
    text = "\n".join(lines)
    if len(text) > LOG_TAIL_BYTES:
        text = text[-LOG_TAIL_BYTES:]
    return text


VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(s, env):
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ is a literal $."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return VAR_REF.sub(sub, s)


def safe_rel(path):
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ConfigError(f"invalid volume item path {path!r}")
    return os.path.join(*parts)


# ---------------------------------------------------------------------------------------------
# Pod IPs
# ---------------------------------------------------------------------------------------------
class IpAllocator:
    def __init__(self, prefix):
        self.prefix = prefix
        self.used = set()
        self.cursor = 0
        self.lock = threading.Lock()

    def allocate(self, wanted=None):
        with self.lock:
            if wanted and wanted.startswith(self.prefix):
                last = wanted[len(self.prefix):]
                if last.isdigit() and 1 <= int(last) <= 254 and int(last) not in self.used:
                    self.used.add(int(last))
                    return wanted
            for i in range(254):
                n = (self.cursor + i) % 254 + 1
                if n not in self.used:
                    self.used.add(n)
                    self.cursor = n
                    return f"{self.prefix}{n}"
        raise RuntimeError(f"no free pod IP in {self.prefix}1-254")

    def release(self, ip):
        with self.lock:
            if ip and ip.startswith(self.prefix):
                self.used.discard(int(ip[len(self.prefix):]))


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------
class Probe:
    def __init__(self, kind, spec, cap):
        self.kind = kind
        self.spec = spec
        period = max(1, int(spec.get("periodSeconds") or 10))
        self.period = min(period, cap)
        self.timeout = max(1, int(spec.get("timeoutSeconds") or 1))
        self.success_threshold = max(1, int(spec.get("successThreshold") or 1))
        self.failure_threshold = max(1, int(spec.get("failureThreshold") or 3))
        if kind == "startup" and self.period < period:
            # A startup probe's failureThreshold x periodSeconds is a time budget (the operator
            # derives it from warmup.timeoutSeconds): keep the budget under the period cap.
            self.failure_threshold = -(-self.failure_threshold * period // self.period)
        self.initial_delay = max(0, int(spec.get("initialDelaySeconds") or 0))
        self.grace = spec.get("terminationGracePeriodSeconds")
        self.reset(time.monotonic())

    def reset(self, now):
        self.next_due = now + self.initial_delay
        self.box = None     # the probe in flight: {"thread", "result"}; a reset orphans it
        self.successes = 0
        self.failures = 0

    def poll(self, now, run, wake):
        """A finished probe's (ok, detail), else None; starts the next probe when due."""
        box = self.box
        if box is not None:
            if box["thread"].is_alive():
                return None
            self.box = None
            return box["result"]
        if now >= self.next_due:
            self.next_due = now + self.period
            box = {"result": (False, "probe did not finish")}

            def target():
                try:
                    box["result"] = run(self.spec, self.timeout)
                except Exception as e:  # noqa: BLE001 - a probe error is a failure
                    box["result"] = (False, f"probe error: {e}")
                wake.set()

            box["thread"] = threading.Thread(target=target, daemon=True, name=f"probe-{self.kind}")
            self.box = box
            box["thread"].start()
        return None


# ---------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------
class Ctr:
    def __init__(self, spec, is_init, cap, prior):
        self.spec = spec
        self.name = spec["name"]
        self.is_init = is_init
        self.image = spec.get("image", "")
        self.proc = None
        self.pid = None
        self.started_at = None
        self.started_mono = None
        self.log_offset = 0
        self.restart_count = int((prior or {}).get("restartCount") or 0)
        self.ever_started = False
        self.completed = False      # init container exited 0
        self.final = False          # main container terminated and not to be restarted
        self.terminated = None      # current state when terminated
        self.last_terminated = None
        self.waiting = ("PodInitializing", None)
        self.backoff_until = 0.0
        self.streak = 0
        self.started = False        # startup probe passed (or none)
        self.ready = False          # readiness probe
        self.kill_deadline = None
        self.kill_sent = False
        self.probes = {}
        if not is_init:
            for kind in ("startup", "readiness", "liveness"):
                p = spec.get(f"{kind}Probe")
                if p:
                    self.probes[kind] = Probe(kind, p, cap)

    @property
    def field_path(self):
        return f"spec.{'initContainers' if self.is_init else 'containers'}{{{self.name}}}"

    def running(self):
        return self.proc is not None

    def is_ready(self):
        if self.is_init:
            return self.completed
        if not self.running() or self.kill_deadline is not None or not self.started:
            return False
        return self.ready if "readiness" in self.probes else True

    def status(self):
        st = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.is_ready(),
            "restartCount": self.restart_count,
            "started": bool(self.running() and self.started) if not self.is_init else self.running(),
        }
        if self.pid is not None:
            st["containerID"] = f"kiln://{self.pid}"
        if self.running():
            st["state"] = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None and (self.completed or self.final):
            st["state"] = {"terminated": self.terminated}
        else:
            reason, message = self.waiting
            w = {"reason": reason}
            if message:
                w["message"] = message
            st["state"] = {"waiting": w}
        st["lastState"] = {"terminated": self.last_terminated} if self.last_terminated else {}
        return st


# ---------------------------------------------------------------------------------------------
# One pod
# ---------------------------------------------------------------------------------------------
class PodWorker(threading.Thread):
    def __init__(self, kubelet, pod):
        meta = pod["metadata"]
        super().__init__(daemon=True, name=f"pod-{meta['namespace']}/{meta['name']}")
        self.k = kubelet
        self.pod = pod
        self.uid = meta["uid"]
        self.ns = meta["namespace"]
        self.pod_name = meta["name"]
        self.key = f"{self.ns}/{self.pod_name}"
        self.dir = os.path.join(kubelet.state, "pods", f"{self.ns}_{self.pod_name}_{self.uid}")
        self.vanished = threading.Event()
        self.wake = threading.Event()
        self.done = False
        spec = pod["spec"]
        status = pod.get("status") or {}
        self.restart_policy = spec.get("restartPolicy", "Always")
        prior = {c["name"]: c for c in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])}
        cap = kubelet.probe_cap
        self.inits = [Ctr(c, True, cap, prior.get(c["name"])) for c in spec.get("initContainers") or []]
        self.mains = [Ctr(c, False, cap, prior.get(c["name"])) for c in spec.get("containers") or []]
        for c in self.inits:
            if c.spec.get("restartPolicy") == "Always":
                self.log(f"warning: init container {c.name} is a restartable (sidecar) init container; run as a plain init container")
        self.host_network = bool(spec.get("hostNetwork"))
        self.ip = None
        self.prior_ip = status.get("podIP")
        self.start_time = status.get("startTime") or now_iso()
        self.cond_times = {}
        for c in status.get("conditions") or []:
            if c.get("type") and c.get("lastTransitionTime"):
                self.cond_times[c["type"]] = (c.get("status"), c["lastTransitionTime"])
        self.volumes = {}
        self.volumes_ready = False
        self.volume_retry_at = 0.0
        self.volume_error = None
        self.initialized = not self.inits
        self.failed = False
        self.terminating = False
        self.term_deadline = 0.0
        self.final_status_sent = False
        self.next_delete_at = 0.0
        self.last_sent = None
        self.patch_retry_at = 0.0
        self.patch_fail_logged_at = 0.0
        self.last_phase = None
        self.last_error = (None, 0.0)

    # -- plumbing ------------------------------------------------------------------------------
    def log(self, msg):
        log(f"pod {self.key}: {msg}")

    def update(self, pod):
        self.pod = pod
        self.wake.set()

    def vanish(self, pod=None):
        if pod is not None:
            self.pod = pod
        self.vanished.set()
        self.wake.set()

    def event(self, ctr, etype, reason, message):
        if self.vanished.is_set():
            return
        self.k.event(self.pod, ctr.field_path if ctr else None, etype, reason, message)

    def run(self):
        self.log(f"admitted (uid {self.uid})")
        try:
            while not self.done and not self.k.closing:
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 - one pod's trouble never stops the harness
                    text = f"{type(e).__name__}: {e}"
                    last, at = self.last_error
                    if text != last or time.monotonic() - at > 30:
                        self.log(f"error (will retry): {text}\n{traceback.format_exc().rstrip()}")
                        self.last_error = (text, time.monotonic())
                    time.sleep(1)
                if not self.done:
                    self.wake.wait(TICK)
                    self.wake.clear()
        finally:
            self.k.worker_finished(self)

    def all_ctrs(self):
        return self.inits + self.mains

    # -- the loop ------------------------------------------------------------------------------
    def step(self):
        now = time.monotonic()
        pod = self.pod
        if not self.terminating:
            if self.vanished.is_set():
                self.begin_termination(now, self.grace(pod), "pod removed from the API")
            elif pod["metadata"].get("deletionTimestamp"):
                self.begin_termination(now, self.grace(pod), "pod deleted")
        if self.terminating:
            self.step_terminating(now)
            return
        for c in self.all_ctrs():
            self.reap(c, now)
        if self.ip is None:
            if self.host_network:
                self.ip = self.k.node_ip
            else:
                self.ip = self.k.ips.allocate(self.prior_ip)
            self.log(f"pod IP {self.ip}, host IP {self.k.node_ip}")
        if not self.volumes_ready and now >= self.volume_retry_at:
            self.setup_volumes(now)
        if self.volumes_ready and not self.failed:
            if not self.initialized:
                self.step_init(now)
            if self.initialized:
                self.step_main(now)
        self.sync_status(now)

    def grace(self, pod):
        g = pod["metadata"].get("deletionGracePeriodSeconds")
        if g is None:
            g = pod["spec"].get("terminationGracePeriodSeconds", 30)
        return max(0, min(int(g), GRACE_CAP))

    # -- volumes -------------------------------------------------------------------------------
    def setup_volumes(self, now):
        try:
            vols = {}
            for v in self.pod["spec"].get("volumes") or []:
                vols[v["name"]] = self.setup_volume(v)
        except (ApiError, ConfigError, OSError) as e:
            msg = f"MountVolume.SetUp failed: {e}"
            if msg != self.volume_error:
                self.log(msg)
                self.event(None, "Warning", "FailedMount", msg)
            self.volume_error = msg
            self.volume_retry_at = now + 5
            for c in self.all_ctrs():
                c.waiting = ("ContainerCreating", None)
            return
        self.volumes = vols
        self.volumes_ready = True
        self.volume_error = None
        self.log(f"volumes ready in {self.dir}/volumes: {', '.join(sorted(vols)) or '(none)'}")

    def fetch(self, kind, name, optional):
        status, obj = self.k.kube.request("GET", f"/api/v1/namespaces/{q(self.ns)}/{kind}/{q(name)}")
        if status == 404 and optional:
            return None
        if status != 200:
            raise ApiError(status, f"{kind} {self.ns}/{name}: {obj.get('message', '') if isinstance(obj, dict) else ''}")
        return obj

    def service_account_token(self, src):
        """A token bound to this pod from the TokenRequest API, as the kubelet projects it."""
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [src["audience"]] if src.get("audience") else [],
            "expirationSeconds": src.get("expirationSeconds", 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid}}}
        status, obj = self.k.kube.request(
            "POST", f"/api/v1/namespaces/{q(self.ns)}/serviceaccounts/{q(sa)}/token", body)
        if status != 201 and status != 200:
            raise ApiError(status, f"token for serviceaccount {self.ns}/{sa}: {obj.get('message', '') if isinstance(obj, dict) else ''}")
        return obj["status"]["token"]

    @staticmethod
    def object_files(obj, kind):
        files = {}
        if obj is None:
            return files
        if kind == "configmaps":
            for k, v in (obj.get("data") or {}).items():
                files[k] = v.encode()
            for k, v in (obj.get("binaryData") or {}).items():
                files[k] = base64.b64decode(v)
        else:
            for k, v in (obj.get("data") or {}).items():
                files[k] = base64.b64decode(v)
        return files

    @staticmethod
    def write_files(root, files, items, optional, what, default_mode):
        if items:
            for item in items:
                if item["key"] not in files:
                    if optional:
                        continue
                    raise ConfigError(f"{what} has no key {item['key']!r}")
                PodWorker.write_file(root, safe_rel(item["path"]), files[item["key"]], item.get("mode", default_mode))
        else:
            for k, data in files.items():
                PodWorker.write_file(root, safe_rel(k), data, default_mode)

    @staticmethod
    def write_file(root, rel, data, mode):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.kiln-tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, int(mode) if mode is not None else 0o644)
        os.replace(tmp, path)

    def downward_files(self, root, items):
        for item in items or []:
            ref = item.get("fieldRef")
            if ref:
                val = self.field_value(ref["fieldPath"])
            else:
                val = ""  # resourceFieldRef: no resources here
                self.log(f"warning: downwardAPI item {item.get('path')}: only fieldRef is supported")
            self.write_file(root, safe_rel(item["path"]), val.encode(), item.get("mode"))

    def setup_volume(self, v):
        name = v["name"]
        if "hostPath" in v:
            path = v["hostPath"]["path"]
            if v["hostPath"].get("type") in ("DirectoryOrCreate",):
                os.makedirs(path, exist_ok=True)
            return path
        root = os.path.join(self.dir, "volumes", name)
        os.makedirs(root, exist_ok=True)
        if "configMap" in v:
            src = v["configMap"]
            obj = self.fetch("configmaps", src["name"], src.get("optional", False))
            self.write_files(root, self.object_files(obj, "configmaps"), src.get("items"),
                             src.get("optional", False), f"configmap {src['name']}", src.get("defaultMode"))
        elif "secret" in v:
            src = v["secret"]
            obj = self.fetch("secrets", src["secretName"], src.get("optional", False))
            self.write_files(root, self.object_files(obj, "secrets"), src.get("items"),
                             src.get("optional", False), f"secret {src['secretName']}", src.get("defaultMode"))
        elif "emptyDir" in v:
            pass
        elif "downwardAPI" in v:
            self.downward_files(root, v["downwardAPI"].get("items"))
        elif "projected" in v:
            for s in v["projected"].get("sources") or []:
                if "configMap" in s:
                    src = s["configMap"]
                    obj = self.fetch("configmaps", src["name"], src.get("optional", False))
                    self.write_files(root, self.object_files(obj, "configmaps"), src.get("items"),
                                     src.get("optional", False), f"configmap {src['name']}", None)
                elif "secret" in s:
                    src = s["secret"]
                    obj = self.fetch("secrets", src["name"], src.get("optional", False))
                    self.write_files(root, self.object_files(obj, "secrets"), src.get("items"),
                                     src.get("optional", False), f"secret {src['name']}", None)
                elif "downwardAPI" in s:
                    self.downward_files(root, s["downwardAPI"].get("items"))
                elif "serviceAccountToken" in s:
                    self.write_file(root, s["serviceAccountToken"]["path"],
                                    self.service_account_token(s["serviceAccountToken"]).encode(), 0o644)
                else:
                    self.log(f"warning: volume {name}: projected source {sorted(s)} not supported (left out)")
        else:
            kinds = sorted(k for k in v if k != "name")
            self.log(f"warning: volume {name} ({', '.join(kinds)}) is not supported: an empty directory stands in for it")
        return root

    # -- container configuration ---------------------------------------------------------------
    def field_value(self, path):
        meta = self.pod["metadata"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.k.node,
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", ""),
            "status.podIP": self.ip or "",
            "status.podIPs": self.ip or "",
            "status.hostIP": self.k.node_ip,
            "status.hostIPs": self.k.node_ip,
        }
        if path in simple:
            return simple[path]
        m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            d = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
        raise ConfigError(f"fieldRef {path} is not supported")

    def mounts(self, ctr):
        out = []
        for m in ctr.spec.get("volumeMounts") or []:
            host = self.volumes.get(m["name"])
            if host is None:
                raise ConfigError(f"volumeMount {m['name']}: no such volume")
            if m.get("subPath"):
                host = os.path.join(host, safe_rel(m["subPath"]))
            mp = m["mountPath"].rstrip("/") or "/"
            out.append((mp, host))
        out.sort(key=lambda t: len(t[0]), reverse=True)
        return out

    @staticmethod
    def rewrite_path(s, mounts):
        for mp, host in mounts:
            if s == mp or s.startswith(mp + "/") or (mp == "/" and s.startswith("/")):
                return host + s[len(mp):] if mp != "/" else os.path.join(host, s[1:])
        if s.startswith("-") and "=" in s:
            flag, value = s.split("=", 1)
            new = PodWorker.rewrite_path(value, mounts)
            if new != value:
                return f"{flag}={new}"
        return s

    def container_env(self, ctr, mounts):
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env["HOSTNAME"] = self.pod_name
        for mp, host in mounts:
            if mp == "/tmp":
                env["TMPDIR"] = host
        for src in ctr.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, ref_key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                ref = src.get(ref_key)
                if not ref:
                    continue
                obj = self.fetch(kind, ref["name"], ref.get("optional", False))
                if obj is None:
                    continue
                for k, v in self.object_files(obj, kind).items():
                    env[prefix + k] = v.decode(errors="replace")
        for e in ctr.spec.get("env") or []:
            name = e["name"]
            if "value" in e:
                env[name] = expand(e["value"] or "", env)
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "fieldRef" in vf:
                    env[name] = self.field_value(vf["fieldRef"]["fieldPath"])
                elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                    kind, ref = ("configmaps", vf["configMapKeyRef"]) if "configMapKeyRef" in vf else ("secrets", vf["secretKeyRef"])
                    try:
                        obj = self.fetch(kind, ref["name"], ref.get("optional", False))
                    except ApiError as err:
                        raise ConfigError(f"env {name}: {err}") from None
                    files = self.object_files(obj, kind)
                    if ref["key"] in files:
                        env[name] = files[ref["key"]].decode(errors="replace")
                    elif not ref.get("optional", False):
                        raise ConfigError(f"env {name}: key {ref['key']!r} not found in {kind[:-1]} {ref['name']}")
                else:
                    self.log(f"warning: container {ctr.name}: env {name}: only fieldRef/configMapKeyRef/secretKeyRef are supported")
            else:
                env[name] = ""
        for k in list(env):
            if k not in PASS_ENV and k != "HOSTNAME":
                env[k] = self.rewrite_path(env[k], mounts)
        return env

    def argv(self, cmd, args, env, mounts):
        out = []
        for s in list(cmd) + list(args):
            s = expand(s, env)
            s = self.rewrite_path(s, mounts)
            out.append(s.replace("0.0.0.0:", f"{self.ip}:"))
        if out and (out[0] == "kiln-model-server" or out[0].endswith("/kiln-model-server")):
            out[0] = self.k.model_server_bin
        elif out and (out[0] == "kiln-operator" or out[0].endswith("/kiln-operator")):
            out[0] = os.path.join(os.path.dirname(self.k.model_server_bin), "kiln-operator")
        return out

    def container_config(self, ctr):
        mounts = self.mounts(ctr)
        try:
            env = self.container_env(ctr, mounts)
        except ApiError as e:
            raise ConfigError(str(e)) from None
        cmd, args = ctr.spec.get("command") or [], ctr.spec.get("args") or []
        if not cmd:
            if "kiln" in ctr.image:
                cmd = ["kiln-model-server"]
            else:
                cmd, args = args, []
        if not cmd:
            raise ConfigError("no command: the harness does not know image entrypoints")
        argv = self.argv(cmd, args, env, mounts)
        # In-cluster clients read the token from a fixed path: give the process a private mount
        # namespace with the pod's token directory bound there, and the API address in its env.
        sa = dict(mounts).get(SA_DIR)
        if sa is not None:
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f'mkdir -p {SA_DIR} 2>/dev/null; mount --bind "$0" {SA_DIR} && exec "$@"', sa] + argv
            env.update(self.k.api_service_env())
            # Not the host's HOME: a kubeconfig there would be chosen over the pod's own identity.
            env["HOME"] = self.dir
        cwd = ctr.spec.get("workingDir")
        cwd = self.rewrite_path(cwd, mounts) if cwd else None
        if not cwd or not os.path.isdir(cwd):
            cwd = self.dir
        return argv, env, cwd, mounts

    # -- running containers --------------------------------------------------------------------
    def log_path(self, ctr):
        return os.path.join(self.k.state, "logs", "pods", f"{self.ns}_{self.pod_name}_{ctr.name}.log")

    def start_ctr(self, ctr, now):
        try:
            argv, env, cwd, _ = self.container_config(ctr)
        except ConfigError as e:
            msg = str(e)
            if ctr.waiting != ("CreateContainerConfigError", msg):
                self.log(f"container {ctr.name}: cannot configure: {msg}")
                self.event(ctr, "Warning", "Failed", f"Error: {msg}")
            ctr.waiting = ("CreateContainerConfigError", msg)
            ctr.backoff_until = now + 5
            return
        if ctr.ever_started:
            ctr.restart_count += 1
        path = self.log_path(ctr)
        try:
            ctr.log_offset = os.path.getsize(path)
        except OSError:
            ctr.log_offset = 0
        started_at = now_iso()
        try:
            proc = self.k.spawn(f"{self.key}/{ctr.name}", argv, env, cwd, path)
        except OSError as e:
            self.log(f"container {ctr.name}: start failed: {e}")
            self.event(ctr, "Warning", "Failed", f"Error: {e}")
            ctr.ever_started = True
            ctr.pid = None
            self.container_exited(ctr, now, {
                "exitCode": 128, "reason": "StartError", "message": str(e),
                "startedAt": started_at, "finishedAt": started_at,
            }, ran=0.0)
            return
        ctr.proc, ctr.pid = proc, proc.pid
        ctr.started_at, ctr.started_mono = started_at, now
        ctr.ever_started = True
        ctr.started = "startup" not in ctr.probes
        ctr.ready = False
        ctr.kill_deadline, ctr.kill_sent = None, False
        ctr.terminated = None
        for p in ctr.probes.values():
            p.reset(now)
        kind = "init container" if ctr.is_init else "container"
        self.log(f"{kind} {ctr.name} started: pid {proc.pid}, ip {self.ip}, restartCount {ctr.restart_count}, "
                 f"argv {' '.join(argv)}, log {path}")
        self.event(ctr, "Normal", "Started", f"Started container {ctr.name}")

    def reap(self, ctr, now):
        """Notice a container's exit; returns True when it has exited."""
        if ctr.proc is None:
            return False
        code = ctr.proc.poll()
        if code is None:
            if ctr.kill_deadline is not None and now >= ctr.kill_deadline and not ctr.kill_sent:
                self.log(f"container {ctr.name} (pid {ctr.pid}) still running after its grace period: SIGKILL")
                killpg(ctr.pid, signal.SIGKILL)
                ctr.kill_sent = True
            return False
        killpg(ctr.pid, signal.SIGKILL)  # the rest of the container's process group dies with it
        exit_code = code if code >= 0 else 128 - code
        finished = now_iso()
        term = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": ctr.started_at,
            "finishedAt": finished,
            "containerID": f"kiln://{ctr.pid}",
        }
        if code < 0:
            term["signal"] = -code
        if exit_code != 0:
            tail = log_tail(self.log_path(ctr), ctr.log_offset)
            if tail:
                term["message"] = tail
        ran = now - (ctr.started_mono or now)
        ctr.proc = None
        ctr.started = ctr.ready = False
        ctr.kill_deadline, ctr.kill_sent = None, False
        for p in ctr.probes.values():
            p.reset(now)
        kind = "init container" if ctr.is_init else "container"
        self.log(f"{kind} {ctr.name} (pid {ctr.pid}) exited with code {exit_code} after {ran:.1f} s")
        if not self.terminating:
            self.container_exited(ctr, now, term, ran)
        else:
            ctr.terminated = term
            ctr.final = True
        return True

    def container_exited(self, ctr, now, term, ran):
        ok = term["exitCode"] == 0
        if ctr.is_init and ok:
            ctr.terminated, ctr.completed = term, True
            return
        restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and not ok)
        if ctr.is_init:
            restart = self.restart_policy != "Never"
        if not restart:
            ctr.terminated, ctr.final = term, True
            if ctr.is_init:
                self.failed = True
                self.log(f"init container {ctr.name} failed and restartPolicy is Never: pod Failed")
            return
        if ran >= BACKOFF_RESET_AFTER:
            ctr.streak = 0
        ctr.streak += 1
        delay = min(BACKOFF_BASE * 2 ** (ctr.streak - 1), BACKOFF_MAX)
        ctr.last_terminated = term
        ctr.terminated = None
        ctr.backoff_until = now + delay
        msg = (f"back-off {delay}s restarting failed container={ctr.name} "
               f"pod={self.pod_name}_{self.ns}({self.uid})")
        ctr.waiting = ("CrashLoopBackOff", msg)
        kind = "init container" if ctr.is_init else "container"
        self.log(f"{kind} {ctr.name}: {term['reason']} (exit {term['exitCode']}); restart in {delay} s")
        self.event(ctr, "Warning", "BackOff", f"Back-off restarting failed container {ctr.name} in pod "
                   f"{self.pod_name}_{self.ns}({self.uid})")

    def kill_ctr(self, ctr, now, grace, why):
        if ctr.proc is None or ctr.kill_deadline is not None:
            return
        self.log(f"container {ctr.name} (pid {ctr.pid}): {why}; SIGTERM, SIGKILL after {grace} s")
        self.event(ctr, "Normal", "Killing", f"Container {ctr.name} {why}, will be restarted")
        ctr.ready = False
        ctr.kill_deadline = now + grace
        killpg(ctr.pid, signal.SIGKILL if grace <= 0 else signal.SIGTERM)
        ctr.kill_sent = grace <= 0

    def step_init(self, now):
        for c in self.inits:
            if c.completed:
                continue
            if c.running() or c.final:
                return
            if now >= c.backoff_until:
                self.start_ctr(c, now)
            return
        self.initialized = True
        self.log("init containers completed")
        for c in self.mains:
            if c.waiting[0] == "PodInitializing":
                c.waiting = ("ContainerCreating", None)

    def step_main(self, now):
        for c in self.mains:
            if c.running():
                self.step_probes(c, now)
            elif not c.final and now >= c.backoff_until:
                self.start_ctr(c, now)

    # -- probes --------------------------------------------------------------------------------
    def run_probe(self, ctr, spec, timeout):
        if "httpGet" in spec:
            h = spec["httpGet"]
            port = self.resolve_port(ctr, h.get("port"))
            host = h.get("host") or self.ip
            path = h.get("path") or "/"
            headers = {x["name"]: x["value"] for x in h.get("httpHeaders") or []}
            headers.setdefault("User-Agent", "kube-probe/1.34")
            if h.get("scheme", "HTTP").upper() == "HTTPS":
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl._create_unverified_context())
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read(10240)
                ok = 200 <= resp.status < 400
                return ok, f"HTTP probe failed with statuscode: {resp.status}" if not ok else f"{resp.status}"
            except (OSError, http.client.HTTPException) as e:
                return False, f"Get \"http://{host}:{port}{path}\": {e}"
            finally:
                conn.close()
        if "tcpSocket" in spec:
            t = spec["tcpSocket"]
            port = self.resolve_port(ctr, t.get("port"))
            host = t.get("host") or self.ip
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                return True, "connected"
            except OSError as e:
                return False, f"dial tcp {host}:{port}: {e}"
        if "exec" in spec:
            _, env, cwd, mounts = self.container_config(ctr)
            argv = self.argv(spec["exec"].get("command") or [], [], env, mounts)
            try:
                r = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, timeout=timeout, start_new_session=True)
            except subprocess.TimeoutExpired:
                return False, f"command timed out after {timeout}s"
            except OSError as e:
                return False, str(e)
            return r.returncode == 0, r.stdout[-500:].decode(errors="replace").strip()
        return True, "unsupported probe type: treated as success"

    @staticmethod
    def resolve_port(ctr, port):
        if isinstance(port, int):
            return port
        if isinstance(port, str) and port.isdigit():
            return int(port)
        for p in ctr.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"port {port!r} not found in container {ctr.name}")

    def step_probes(self, ctr, now):
        if ctr.kill_deadline is not None:
            return

        def poll(kind):
            p = ctr.probes[kind]
            return p, p.poll(now, lambda spec, t: self.run_probe(ctr, spec, t), self.wake)

        if "startup" in ctr.probes and not ctr.started:
            p, res = poll("startup")
            if res is None:
                return
            ok, detail = res
            if ok:
                ctr.started = True
                self.log(f"container {ctr.name}: startup probe succeeded")
                for k in ("readiness", "liveness"):
                    if k in ctr.probes:
                        ctr.probes[k].next_due = now + ctr.probes[k].initial_delay
            else:
                self.restarting_probe_failed(ctr, p, now, "startup", detail)
            return
        if "readiness" in ctr.probes:
            p, res = poll("readiness")
            if res is not None:
                ok, detail = res
                if ok:
                    p.successes += 1
                    p.failures = 0
                    if not ctr.ready and p.successes >= p.success_threshold:
                        ctr.ready = True
                        self.log(f"container {ctr.name}: ready (readiness probe succeeded)")
                else:
                    p.failures += 1
                    p.successes = 0
                    if p.failures == 1:
                        self.event(ctr, "Warning", "Unhealthy", f"Readiness probe failed: {detail}")
                    if ctr.ready and p.failures >= p.failure_threshold:
                        ctr.ready = False
                        self.log(f"container {ctr.name}: not ready ({detail})")
        if "liveness" in ctr.probes:
            p, res = poll("liveness")
            if res is not None:
                ok, detail = res
                if ok:
                    p.failures = 0
                else:
                    self.restarting_probe_failed(ctr, p, now, "liveness", detail)

    def restarting_probe_failed(self, ctr, p, now, kind, detail):
        """A startup or liveness failure: an event on the first and at the threshold, where the
        container is killed (and restarted by its policy)."""
        p.failures += 1
        if p.failures == 1 or p.failures >= p.failure_threshold:
            self.event(ctr, "Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {detail}")
        if p.failures >= p.failure_threshold:
            self.kill_ctr(ctr, now, self.probe_grace(p), f"failed {kind} probe {p.failures} times ({detail})")

    def probe_grace(self, probe):
        g = probe.grace if probe.grace is not None else self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return max(0, min(int(g), GRACE_CAP))

    # -- termination ---------------------------------------------------------------------------
    def begin_termination(self, now, grace, why):
        self.terminating = True
        self.term_deadline = now + grace
        live = [c for c in self.all_ctrs() if c.running()]
        self.log(f"{why}: stopping {len(live)} container(s), grace {grace} s")
        for c in live:
            self.event(c, "Normal", "Killing", f"Stopping container {c.name}")
            killpg(c.pid, signal.SIGKILL if grace <= 0 else signal.SIGTERM)
            c.kill_sent = grace <= 0
            c.kill_deadline = self.term_deadline

    def step_terminating(self, now):
        live = False
        for c in self.all_ctrs():
            if c.proc is None:
                continue
            if not self.reap(c, now):
                live = True
        if live:
            return
        if self.vanished.is_set():
            self.cleanup()
            return
        if not self.final_status_sent:
            self.final_status_sent = True
            try:
                self.patch_status(self.build_status())
            except ApiError as e:
                self.log(f"final status patch failed (ignored): {e}")
        if now >= self.next_delete_at:
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                    "preconditions": {"uid": self.uid}}
            try:
                status, obj = self.k.kube.request(
                    "DELETE", f"/api/v1/namespaces/{q(self.ns)}/pods/{q(self.pod_name)}", body)
            except ApiError as e:
                self.log(f"delete failed (will retry): {e}")
                self.next_delete_at = now + 2
                return
            if status in (200, 202, 404, 409):
                if self.next_delete_at == 0.0:
                    self.log(f"containers stopped; pod deleted (HTTP {status})")
                self.next_delete_at = now + 10  # again later only if the pod lingers
            else:
                self.log(f"delete: HTTP {status}: {obj.get('message', '') if isinstance(obj, dict) else ''} (will retry)")
                self.next_delete_at = now + 2

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.ip and not self.host_network:
            self.k.ips.release(self.ip)
        self.log(f"gone: processes stopped, {self.dir} removed, IP {self.ip} released")
        self.done = True

    # -- status --------------------------------------------------------------------------------
    def phase(self):
        if self.failed:
            return "Failed"
        if self.mains and all(c.final for c in self.mains):
            return "Succeeded" if all(c.terminated and c.terminated["exitCode"] == 0 for c in self.mains) else "Failed"
        if self.initialized and any(c.ever_started for c in self.mains):
            return "Running"
        return "Pending"

    def condition(self, ctype, ok, reason=None, message=None):
        status = "True" if ok else "False"
        prev = self.cond_times.get(ctype)
        if prev is None or prev[0] != status:
            self.cond_times[ctype] = (status, now_iso())
        c = {"type": ctype, "status": status, "lastTransitionTime": self.cond_times[ctype][1]}
        if reason and not ok:
            c["reason"] = reason
        if message and not ok:
            c["message"] = message
        return c

    def build_status(self):
        phase = self.phase()
        terminal = phase in ("Succeeded", "Failed")
        not_init = [c.name for c in self.inits if not c.completed]
        unready = [c.name for c in self.mains if not c.is_ready()]
        conds = [
            self.condition("PodReadyToStartContainers", self.volumes_ready and not self.terminating),
            self.condition("Initialized", not not_init, "ContainersNotInitialized" if not terminal else "PodCompleted",
                           f"containers with incomplete status: [{' '.join(not_init)}]"),
            self.condition("Ready", not unready, "ContainersNotReady" if not terminal else "PodCompleted",
                           f"containers with unready status: [{' '.join(unready)}]"),
            self.condition("ContainersReady", not unready, "ContainersNotReady" if not terminal else "PodCompleted",
                           f"containers with unready status: [{' '.join(unready)}]"),
            self.condition("PodScheduled", True),
        ]
        ours = {c["type"] for c in conds}
        for c in (self.pod.get("status") or {}).get("conditions") or []:
            if c.get("type") not in ours:
                conds.append(c)
        st = {
            "phase": phase,
            "conditions": conds,
            "hostIP": self.k.node_ip,
            "hostIPs": [{"ip": self.k.node_ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.mains],
        }
        if self.ip:
            st["podIP"] = self.ip
            st["podIPs"] = [{"ip": self.ip}]
        if self.inits:
            st["initContainerStatuses"] = [c.status() for c in self.inits]
        return st

    def patch_status(self, st):
        status, obj = self.k.kube.request(
            "PATCH", f"/api/v1/namespaces/{q(self.ns)}/pods/{q(self.pod_name)}/status",
            {"status": st}, content_type="application/merge-patch+json")
        if status != 200:
            raise ApiError(status, obj.get("message", "") if isinstance(obj, dict) else "")

    def sync_status(self, now):
        if self.vanished.is_set():
            return
        st = self.build_status()
        if st == self.last_sent or now < self.patch_retry_at:
            return
        try:
            self.patch_status(st)
        except ApiError as e:
            if now - self.patch_fail_logged_at > 10:
                self.log(f"status patch failed (retrying): {e}")
                self.patch_fail_logged_at = now
            self.patch_retry_at = now + 1
            return
        prev = self.last_sent or {}
        self.last_sent = st
        ready = next(c["status"] for c in st["conditions"] if c["type"] == "Ready")
        prev_ready = next((c["status"] for c in prev.get("conditions", []) if c["type"] == "Ready"), None)
        if st["phase"] != prev.get("phase") or ready != prev_ready:
            self.log(f"status: phase {st['phase']}, Ready {ready}, podIP {st.get('podIP', '-')}")


# ---------------------------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------------------------
class Kubelet:
    def __init__(self, args):
        self.kube = Kube(args.kubeconfig)
        self.node = args.node
        self.node_ip = args.node_ip
        self.state = os.path.abspath(args.state_dir)
        self.model_server_bin = args.model_server_bin
        self.probe_cap = args.probe_period_cap
        self.pids_file = args.pids_file or os.path.join(self.state, "kubelet-containers.pids")
        self.shutdown_grace = args.shutdown_grace
        self.ready_file = args.ready_file
        self.ips = IpAllocator(args.pod_ip_prefix)
        self.workers = {}
        self.lock = threading.Lock()
        self.procs = {}                 # pid -> (name, Popen)
        self.procs_lock = threading.Lock()
        self.closing = False
        os.makedirs(os.path.join(self.state, "pods"), exist_ok=True)
        os.makedirs(os.path.join(self.state, "logs", "pods"), exist_ok=True)

    # -- processes -----------------------------------------------------------------------------
    def api_service_env(self):
        """KUBERNETES_SERVICE_HOST/PORT: the API server address this harness itself uses. The
        dev cluster's API server listens on 127.0.0.1 only and publishes no endpoints for the
        `kubernetes` Service (there is no service proxy here); its certificate names 127.0.0.1."""
        return {"KUBERNETES_SERVICE_HOST": self.kube.host, "KUBERNETES_SERVICE_PORT": str(self.kube.port),
                "KUBERNETES_PORT": f"tcp://{self.kube.host}:{self.kube.port}"}

    def spawn(self, name, argv, env, cwd, log_path):
        with self.procs_lock:
            if self.closing:
                raise OSError("the harness is shutting down")
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            self.procs[proc.pid] = (name, proc)
            with open(self.pids_file, "a") as f:
                f.write(f"container:{name} {proc.pid} {proc_start_time(proc.pid)}\n")
            for pid in [p for p, (_, pr) in self.procs.items() if pr.returncode is not None]:
                del self.procs[pid]
        return proc

    def shutdown(self):
        with self.procs_lock:
            self.closing = True
            procs = list(self.procs.values())
        live = [(n, p) for n, p in procs if p.poll() is None]
        log(f"shutting down: stopping {len(live)} container process group(s)")
        for _, p in live:
            killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace
        while time.monotonic() < deadline and any(p.poll() is None for _, p in live):
            time.sleep(0.1)
        for n, p in live:
            if p.poll() is None:
                log(f"{n} (pid {p.pid}) still running: SIGKILL")
            killpg(p.pid, signal.SIGKILL)  # also whatever is left in the group
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        log("stopped")

    # -- events --------------------------------------------------------------------------------
    def event(self, pod, field_path, etype, reason, message):
        meta = pod["metadata"]
        ts = now_iso()
        involved = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                    "uid": meta["uid"], "resourceVersion": meta.get("resourceVersion", "")}
        if field_path:
            involved["fieldPath"] = field_path
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
            "involvedObject": involved, "reason": reason, "message": message[:1024], "type": etype,
            "source": {"component": "kubelet", "host": self.node},
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
            "reportingComponent": "kubelet", "reportingInstance": self.node,
        }
        try:
            status, obj = self.kube.request("POST", f"/api/v1/namespaces/{q(meta['namespace'])}/events", body, timeout=5)
            if status not in (200, 201):
                log(f"event {reason} for {meta['namespace']}/{meta['name']}: HTTP {status} (dropped)")
        except ApiError as e:
            log(f"event {reason} for {meta['namespace']}/{meta['name']}: {e} (dropped)")

    # -- pods ----------------------------------------------------------------------------------
    def worker_finished(self, w):
        with self.lock:
            if self.workers.get(w.uid) is w:
                del self.workers[w.uid]

    def on_pod(self, pod):
        uid = pod["metadata"]["uid"]
        with self.lock:
            w = self.workers.get(uid)
            if w is not None:
                w.update(pod)
                return
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            w = PodWorker(self, pod)
            self.workers[uid] = w
        w.start()

    def on_deleted(self, pod):
        with self.lock:
            w = self.workers.get(pod["metadata"]["uid"])
        if w is not None:
            w.vanish(pod)

    def list_path(self, **extra):
        params = {"fieldSelector": f"spec.nodeName={self.node}", **extra}
        return "/api/v1/pods?" + urllib.parse.urlencode(params)

    def relist(self):
        lst = self.kube.get(self.list_path())
        seen = set()
        for pod in lst.get("items") or []:
            seen.add(pod["metadata"]["uid"])
            self.on_pod(pod)
        with self.lock:
            gone = [w for uid, w in self.workers.items() if uid not in seen]
        for w in gone:
            w.log("not in the pod list any more")
            w.vanish()
        return lst["metadata"]["resourceVersion"], len(seen)

    def run(self):
        backoff = 1
        rv = None
        first = True
        while True:
            try:
                if rv is None:
                    rv, n = self.relist()
                    log(f"listed {n} pod(s) on {self.node} at resourceVersion {rv}")
                    if first and self.ready_file:
                        with open(self.ready_file, "w"):
                            pass
                    first = False
                rv = self.watch(rv)
                backoff = 1
            except ApiError as e:
                log(f"list/watch: {e}; re-listing in {backoff} s")
                rv = None
                time.sleep(backoff)
                backoff = min(backoff * 2, 10)
            except (OSError, ValueError, http.client.HTTPException) as e:
                log(f"list/watch: {type(e).__name__}: {e}; re-listing in {backoff} s")
                rv = None
                time.sleep(backoff)
                backoff = min(backoff * 2, 10)
            except Exception as e:  # noqa: BLE001 - a bug must not stop the node
                log(f"list/watch: unexpected {type(e).__name__}: {e}; re-listing in {backoff} s\n"
                    f"{traceback.format_exc().rstrip()}")
                rv = None
                time.sleep(backoff)
                backoff = min(backoff * 2, 10)

    def watch(self, rv):
        """Watch from rv; returns the last resourceVersion seen (None: re-list)."""
        path = self.list_path(watch="true", allowWatchBookmarks="true", resourceVersion=rv,
                              timeoutSeconds=str(WATCH_TIMEOUT))
        for ev in self.kube.watch(path):
            kind, obj = ev.get("type"), ev.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    log("watch: resourceVersion too old (410); re-listing")
                    return None
                raise ApiError(obj.get("code", 0), f"watch error: {obj.get('message', obj)}")
            rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
            if kind in ("ADDED", "MODIFIED"):
                self.on_pod(obj)
            elif kind == "DELETED":
                self.on_deleted(obj)
        return rv


def main():
    default_bin = os.environ.get("KILN_MODEL_SERVER_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR") or os.path.join(
            os.environ.get("KILN_CACHE") or os.path.expanduser("~/.cache/kiln"), "cargo-target"),
        "debug", "kiln-model-server")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--node", default="cpu-0")
    ap.add_argument("--node-ip", default="10.245.0.1")
    ap.add_argument("--pod-ip-prefix", default="10.245.1.", help="pod IPs are PREFIX1 .. PREFIX254")
    ap.add_argument("--state-dir", required=True, help="pods/ and logs/pods/ go here")
    ap.add_argument("--model-server-bin", default=default_bin, help="what command kiln-model-server runs")
    ap.add_argument("--probe-period-cap", type=int, default=2, help="longest probe period in seconds")
    ap.add_argument("--pids-file", help="container 'name pid starttime' lines (default STATE/kubelet-containers.pids)")
    ap.add_argument("--shutdown-grace", type=float, default=10.0)
    ap.add_argument("--ready-file", help="written once the first pod list succeeded")
    args = ap.parse_args()
    if not re.fullmatch(r"(\d{1,3}\.){3}", args.pod_ip_prefix):
        ap.error("--pod-ip-prefix must look like 10.245.1.")

    kubelet = Kubelet(args)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"kubelet for node {args.node} ({args.node_ip}): pod IPs {args.pod_ip_prefix}1-254, "
        f"kiln-model-server = {args.model_server_bin}, probe period cap {args.probe_period_cap} s, "
        f"state {kubelet.state}")
    try:
        kubelet.run()
    except SystemExit:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        kubelet.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
