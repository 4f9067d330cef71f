#!/usr/bin/env python3
"""Lazy loading and unloading: what a request pays when its model is not in memory.

usage: lazy.py BINARY MINILM_DIR SMOLLM2_DIR OUT_JSON [--torch-python PY] [--rounds 5]

Kiln figures, each on a fresh kiln-model-server process (2 threads):
  - first request of a lazy MiniLM (load from local disk, warmup, answer), per copy of three
    lazy copies with no budget pressure, against a request to the same model once warm;
  - swap: with a budget for one MiniLM, alternating requests between two lazy copies, so every
    request unloads one model and loads the other before it is answered;
  - first chat (8 tokens) of a lazy SmolLM2, against the same chat once warm;
  - RSS before a lazy load, loaded, and after its idle unload (the memory really comes back).
Baseline, same run (with --torch-python, the Python baseline's venv): what loading on demand
costs there: SentenceTransformer(MINILM_DIR) and one encode in a process whose imports are done.
Standard library only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

from kiln_http import ready, rss_mib


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json'})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
        status = r.status
    return time.perf_counter() - t0, status


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, binary, port, family, models, extra, log):
        args = [binary, 'serve', '--listen', f'127.0.0.1:{port}', '--threads', '2', '--family', family,
                '--warmup-iterations', '1']
        for name, path in models:
            args += ['--model', f'{name}={path}']
        self.base = f'http://127.0.0.1:{port}'
        self.proc = subprocess.Popen(args + extra, stdout=log, stderr=subprocess.STDOUT)
        while not ready(self.base):
            if self.proc.poll() is not None:
                sys.exit(f'kiln-model-server exited with {self.proc.returncode}')
            time.sleep(0.01)

    def model(self, name):
        return next(m for m in get(self.base, '/status')['models'] if m['model'] == name)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def embed(base, model, text='Kiln loads a lazy model on its first request.'):
    seconds, status = post(base, '/v1/embeddings', {'model': model, 'input': text})
    assert status == 200, status
    return seconds


def chat(base):
    body = {'model': 'smollm2', 'messages': [{'role': 'user', 'content': 'Say hello.'}],
            'max_tokens': 8, 'temperature': 0}
    seconds, status = post(base, '/v1/chat/completions', body)
    assert status == 200, status
    return seconds


def ms(xs):
    return {'p50_ms': round(statistics.median(xs) * 1000, 1), 'max_ms': round(max(xs) * 1000, 1),
            'n': len(xs)}


def torch_baseline(python, model_dir, rounds):
    script = r"""
import json, sys, time
from sentence_transformers import SentenceTransformer
import torch
torch.set_num_threads(2)
out = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    m = SentenceTransformer(sys.argv[1], device='cpu')
    m.encode(['Kiln loads a lazy model on its first request.'])
    out.append(time.perf_counter() - t0)
    del m
print(json.dumps(out))
"""
    res = subprocess.run([python, '-c', script, model_dir, str(rounds)], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('binary')
    ap.add_argument('minilm')
    ap.add_argument('smollm2')
    ap.add_argument('out')
    ap.add_argument('--torch-python')
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--port', type=int, default=8097)
    a = ap.parse_args()
    log = open(a.out + '.server.log', 'w')
    res = {}

    # First requests without budget pressure: fresh servers, three lazy copies each.
    first, warm = [], []
    for _ in range(a.rounds):
        s = Server(a.binary, a.port, 'text-embedding', [(f'{c}:v1', a.minilm) for c in 'abc'],
                   sum([['--lazy', f'{c}:v1'] for c in 'abc'], []), log)
        try:
            for c in 'abc':
                first.append(embed(s.base, c))
                warm.append(embed(s.base, c))
        finally:
            s.stop()
    res['minilm_first_request'] = ms(first)
    res['minilm_warm_request'] = ms(warm)

    # Swaps: a budget for one copy, requests alternating between two.
    s = Server(a.binary, a.port, 'text-embedding', [('a:v1', a.minilm), ('b:v1', a.minilm)],
               ['--lazy', 'a:v1', '--lazy', 'b:v1', '--memory-budget', '100Mi'], log)
    try:
        embed(s.base, 'a')
        swaps = [embed(s.base, 'b' if i % 2 == 0 else 'a') for i in range(2 * a.rounds)]
        assert s.model('a')['unloads'] >= a.rounds, s.model('a')
    finally:
        s.stop()
    res['minilm_swap'] = ms(swaps)

    # RSS across a lazy load and its idle unload, beside a preloaded copy.
    s = Server(a.binary, a.port, 'text-embedding', [('pinned:v1', a.minilm), ('spare:v1', a.minilm)],
               ['--lazy', 'spare:v1', '--idle-unload-seconds', '1'], log)
    try:
        for _ in range(5):
            embed(s.base, 'pinned')
        before = rss_mib(s.proc.pid)
        embed(s.base, 'spare')
        loaded = rss_mib(s.proc.pid)
        deadline = time.time() + 30
        while s.model('spare')['state'] != 'Evicted' and time.time() < deadline:
            time.sleep(0.2)
        after = rss_mib(s.proc.pid)
    finally:
        s.stop()
    res['rss_mib'] = {'before_load': before, 'loaded': loaded, 'after_unload': after,
                      'after_over_before': round(after / before, 3)}

    # A lazy SmolLM2: first chat against the same chat once warm.
    gen_first, gen_warm = [], []
    for _ in range(max(2, a.rounds // 2)):
        s = Server(a.binary, a.port, 'text-generation', [('smollm2:135m', a.smollm2)],
                   ['--lazy', 'smollm2:135m', '--kv-cache-memory', '64Mi'], log)
        try:
            gen_first.append(chat(s.base))
            gen_warm.append(chat(s.base))
        finally:
            s.stop()
    res['smollm2_first_chat'] = ms(gen_first)
    res['smollm2_warm_chat'] = ms(gen_warm)

    if a.torch_python:
        res['torch_load_and_first_encode'] = ms(torch_baseline(a.torch_python, a.minilm, a.rounds))

    json.dump(res, open(a.out, 'w'), indent=2)
    print(json.dumps(res, indent=2))


if __name__ == '__main__':
    main()
