#!/usr/bin/env python3
"""Drive a real kiln-model-server with wrk, the same way the Python baseline is driven.

usage: kiln_http.py BINARY MODEL_DIR CORPUS_DIR OUT_JSON [--port 8090] [--duration 20] [--conns 1,8,32]

Starts `kiln-model-server serve --model minilm:v2=MODEL_DIR`, records start-to-ready seconds
(process start to /readyz 200, warmup included) and idle RSS, then for each connection count runs
`wrk -sPOST.lua` against POST /embed/text with the short corpus and records req/s, p50/p99,
non-2xx and RSS after the run. Standard library only.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

BASELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'bench', 'python-baseline')


def rss_mib(pid):
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def percentile(values, q):
    """The value at quantile `q` of `values` (nearest rank)."""
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def rss_peak_mib(pid):
    """A process's peak resident memory (VmHWM), MiB."""
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return None


def post_json(base, path, body):
    """POST `body` as JSON to base + path; the answer's JSON."""
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.load(r)


def ready(base):
    try:
        with urllib.request.urlopen(base + '/readyz', timeout=1) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('binary')
    ap.add_argument('model_dir')
    ap.add_argument('corpus_dir')
    ap.add_argument('out')
    ap.add_argument('--port', type=int, default=8090)
    ap.add_argument('--duration', type=int, default=20)
    ap.add_argument('--conns', default='1,8,32')
    ap.add_argument('--baseline-dir', default=os.environ.get('BASELINE_DIR', BASELINE))
    a = ap.parse_args()
    base = f'http://127.0.0.1:{a.port}'
    log = open(a.out + '.server.log', 'w')
    t0 = time.time()
    srv = subprocess.Popen([a.binary, 'serve', '--listen', f'127.0.0.1:{a.port}',
                            '--model', f'minilm:v2={a.model_dir}'], stdout=log, stderr=subprocess.STDOUT)
    res = {'runs': []}
    try:
        while not ready(base):
            if srv.poll() is not None:
                sys.exit(f'kiln-model-server exited with {srv.returncode}; see {a.out}.server.log')
            time.sleep(0.01)
        res['startup_s'] = round(time.time() - t0, 3)
        res['rss_mib_idle'] = rss_mib(srv.pid)
        print(f'[kiln] ready in {res["startup_s"]} s, RSS {res["rss_mib_idle"]} MiB', flush=True)
        env = dict(os.environ, CORPUS=os.path.join(a.corpus_dir, 'short.json'))
        for n in [int(x) for x in a.conns.split(',')]:
            threads = 1 if n < 2 else 2
            out = subprocess.run(['wrk', f'-t{threads}', f'-c{n}', f'-d{a.duration}s', '--timeout', '30s', '-s',
                                  os.path.join(a.baseline_dir, 'post.lua'), '--latency', base + '/embed/text'],
                                 capture_output=True, text=True, env=env)
            line = next((l for l in out.stdout.splitlines() if l.startswith('RESULT ')), None)
            if line is None:
                sys.exit(f'wrk gave no result: {out.stdout}\n{out.stderr}')
            run = json.loads(line[len('RESULT '):])
            run['connections'] = n
            run['rss_mib_after'] = rss_mib(srv.pid)
            res['runs'].append(run)
            print(f'[kiln] c={n}: {run["rps"]:.1f} req/s, p50 {run["p50_ms"]:.1f} ms, p99 {run["p99_ms"]:.1f} ms, '
                  f'non-2xx {run["non2xx"]}', flush=True)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    with open(a.out, 'w') as f:
        json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
