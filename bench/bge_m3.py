#!/usr/bin/env python3
"""A BGE-M3-shaped XLM-RoBERTa (random weights, full size) through Kiln and through
sentence-transformers on torch, same sentences, same threads: that it loads and serves dense
vectors equal to the reference's, and how fast.

usage: bge_m3.py KILN_BINARY CORPUS_DIR VENV_PYTHON OUT_JSON [--threads 2] [--sentences 64]

The checkpoint (1.1 GB, float16) is written once by scripts/tiny_models.py --bge-m3-shaped into
~/.cache/kiln/bench/bge-m3-random-1. Kiln runs as the real server (`serve --model`); the
vectors are read from its OpenAI endpoint. Standard library only (the torch side runs in
VENV_PYTHON, the Python baseline's venv).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

from kiln_http import ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get('KILN_CACHE', os.path.expanduser('~/.cache/kiln')), 'bench', 'bge-m3-random-1')

TORCH_SIDE = r'''
import json, statistics, sys, time
import torch
from sentence_transformers import SentenceTransformer
model_dir, threads, sentences_path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)
sentences = json.load(open(sentences_path))
t0 = time.time()
st = SentenceTransformer(model_dir, device="cpu")
st.float()
load_s = time.time() - t0
st.encode(sentences[:4], batch_size=4)
t0 = time.time()
vectors = st.encode(sentences, batch_size=32, convert_to_numpy=True)
batch_s = time.time() - t0
lat = []
for s in sentences[:10]:
    t = time.time(); st.encode([s], batch_size=1); lat.append((time.time() - t) * 1000)
json.dump({"load_s": load_s, "sentences_per_s": len(sentences) / batch_s,
           "p50_ms": statistics.median(lat), "vectors": vectors.tolist()}, open(out, "w"))
'''


def post(base, body):
    req = urllib.request.Request(base + '/v1/embeddings', json.dumps(body).encode(),
                                 {'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / max(na * nb, 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('binary')
    ap.add_argument('corpus_dir')
    ap.add_argument('venv_python')
    ap.add_argument('out')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--sentences', type=int, default=64)
    ap.add_argument('--port', type=int, default=8097)
    a = ap.parse_args()
    if not os.path.exists(os.path.join(CACHE, 'model.safetensors')):
        print('== writing the BGE-M3-shaped checkpoint (once)', flush=True)
        subprocess.run([a.venv_python, os.path.join(ROOT, 'scripts', 'tiny_models.py'), '--bge-m3-shaped', CACHE],
                       check=True, stdout=subprocess.DEVNULL)
    sentences = json.load(open(os.path.join(a.corpus_dir, 'short.json')))[:a.sentences]
    sentences_path = a.out + '.sentences.json'
    json.dump(sentences, open(sentences_path, 'w'))

    base = f'http://127.0.0.1:{a.port}'
    log = open(a.out + '.server.log', 'w')
    t0 = time.time()
    srv = subprocess.Popen([a.binary, 'serve', '--listen', f'127.0.0.1:{a.port}', '--threads', str(a.threads),
                            '--warmup-iterations', '1', '--max-batch-size', '32',
                            '--model', f'bge-m3:random={CACHE}'], stdout=log, stderr=subprocess.STDOUT)
    kiln = {}
    try:
        while not ready(base):
            if srv.poll() is not None:
                sys.exit(f'kiln-model-server exited with {srv.returncode}; see {a.out}.server.log')
            time.sleep(0.05)
        kiln['start_to_ready_s'] = time.time() - t0
        post(base, {'input': sentences[:4]})
        t0 = time.time()
        vectors = []
        for i in range(0, len(sentences), 32):
            vectors += [d['embedding'] for d in post(base, {'input': sentences[i:i + 32]})['data']]
        kiln['sentences_per_s'] = len(sentences) / (time.time() - t0)
        lat = []
        for s in sentences[:10]:
            t = time.time()
            post(base, {'input': s})
            lat.append((time.time() - t) * 1000)
        kiln['p50_ms'] = statistics.median(lat)
        with open(f'/proc/{srv.pid}/status') as f:
            kiln['rss_mib'] = next(int(l.split()[1]) / 1024 for l in f if l.startswith('VmRSS:'))
    finally:
        srv.terminate()
        srv.wait(timeout=60)

    torch_out = a.out + '.torch.json'
    subprocess.run([a.venv_python, '-c', TORCH_SIDE, CACHE, str(a.threads), sentences_path, torch_out], check=True,
                   stderr=subprocess.DEVNULL)
    ref = json.load(open(torch_out))
    worst = min(cosine(k, r) for k, r in zip(vectors, ref['vectors']))
    result = {'shape': 'XLM-RoBERTa, hidden 1024, 24 layers, 8194 positions (BGE-M3), random weights',
              'sentences': len(sentences), 'threads': a.threads, 'worst_cosine_vs_sentence_transformers': worst,
              'kiln': kiln, 'torch': {k: v for k, v in ref.items() if k != 'vectors'}}
    json.dump(result, open(a.out, 'w'), indent=1)
    print(json.dumps(result, indent=1))
    if worst < 0.9999:
        sys.exit(f'Kiln and sentence-transformers disagree: worst cosine {worst}')


if __name__ == '__main__':
    main()
