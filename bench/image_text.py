#!/usr/bin/env python3
"""Image-text embeddings: Kiln's server against transformers on torch, full-size SigLIP
checkpoints with random weights (speed does not depend on the values), the same images and
queries, the same threads, in one run.

usage: image_text.py KILN_BINARY VENV_PYTHON OUT_JSON [--threads 2] [--models base,so400m] [--device cpu]

--device cuda:0 runs both engines on that GPU (Kiln's server built with `make build-cuda`, torch
with CUDA): `make bench-gpu`.

The checkpoints (siglip-base-patch16-224's and siglip-so400m-patch14-384's configs, float16)
are written once by VENV_PYTHON with transformers into ~/.cache/kiln/bench/siglip-*-random-1,
with the tiny SigLIP's tokenizer (the vocabulary size does not change the speed). Images: 32
synthetic 640x480 JPEG keyframes. Kiln runs as the real server (`serve --family
image-text-embedding`) and is measured over HTTP (base64 JSON, so its figures include decoding
and preprocessing); torch is measured in process on the same JPEG bytes (PIL decode, the
checkpoint's PIL image processor, get_image_features), so HTTP only counts against Kiln.

Figures per engine and checkpoint: start to ready (Kiln: process start to /readyz 200, which
includes loading and one warmup pass over a synthetic image and the warmup texts, and its load
alone; torch: from_pretrained), images per second at batch 32, batch-1 latency p50/p99
for an image and for a query, peak RSS; and the smallest cosine between the two engines' vectors.
"""
import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

from kiln_http import percentile as p, post_json as post, ready, rss_peak_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get('KILN_CACHE', os.path.expanduser('~/.cache/kiln')), 'bench')
TINY = os.path.join(ROOT, 'model-server', 'tests', 'data', 'tiny', 'siglip')

# transformers' SiglipConfig for each published checkpoint (what its config.json sets).
CHECKPOINTS = {
    'base': {'image_size': 224, 'patch': 16, 'hidden': 768, 'intermediate': 3072, 'layers': 12, 'heads': 12},
    'so400m': {'image_size': 384, 'patch': 14, 'hidden': 1152, 'intermediate': 4304, 'layers': 27, 'heads': 16},
}

WRITE = r'''
import json, os, shutil, sys, torch
from transformers import SiglipConfig, SiglipModel
try:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
except ImportError:  # transformers before the PIL processors' split (a GPU machine's may be older)
    from transformers import SiglipImageProcessor as SiglipImageProcessorPil
out, tiny, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tower = {"hidden_size": spec["hidden"], "intermediate_size": spec["intermediate"],
         "num_hidden_layers": spec["layers"], "num_attention_heads": spec["heads"]}
tok = json.load(open(os.path.join(tiny, "tokenizer_config.json")))
config = SiglipConfig(text_config=dict(tower, vocab_size=32000, max_position_embeddings=64, pad_token_id=0,
                                       eos_token_id=1),
                      vision_config=dict(tower, image_size=spec["image_size"], patch_size=spec["patch"]))
torch.manual_seed(0)
model = SiglipModel(config).half()
os.makedirs(out, exist_ok=True)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tiny, f), os.path.join(out, f))
SiglipImageProcessorPil(size={"height": spec["image_size"], "width": spec["image_size"]}, resample=3,
                        image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
'''

TORCH_SIDE = r'''
import io, json, resource, statistics, sys, time
import torch
from PIL import Image
from transformers import AutoTokenizer, SiglipModel, PreTrainedTokenizerFast
try:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
except ImportError:  # transformers before the PIL processors' split (a GPU machine's may be older)
    from transformers import SiglipImageProcessor as SiglipImageProcessorPil
model_dir, threads, inputs_path, out, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
torch.set_num_threads(threads)
inputs = json.load(open(inputs_path))
images = [__import__("base64").b64decode(b) for b in inputs["images"]]
t0 = time.time()
model = SiglipModel.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)
processor = SiglipImageProcessorPil.from_pretrained(model_dir)
tokenizer = PreTrainedTokenizerFast(tokenizer_file=model_dir + "/tokenizer.json", pad_token="<pad>")
load_s = time.time() - t0

def embed_images(batch):
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch]
    pixels = processor(pil, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        f = model.get_image_features(pixel_values=pixels.to(device))
    f = getattr(f, "pooler_output", f)
    # Back on the host: the time includes the GPU's work and the copy, as Kiln's does.
    return torch.nn.functional.normalize(f, dim=-1).cpu()

def embed_text(texts):
    ids = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        f = model.get_text_features(input_ids=ids["input_ids"].to(device))
    f = getattr(f, "pooler_output", f)
    return torch.nn.functional.normalize(f, dim=-1).cpu()

embed_images(images[:1]); embed_text(inputs["queries"][:1])
t0 = time.time()
vectors = embed_images(images)
batch_s = time.time() - t0
image_ms, text_ms = [], []
for b in images[:inputs["samples"]]:
    t = time.time(); embed_images([b]); image_ms.append((time.time() - t) * 1000)
for q in inputs["queries"][:inputs["samples"]]:
    t = time.time(); embed_text([q]); text_ms.append((time.time() - t) * 1000)
text_vectors = embed_text(inputs["queries"])
json.dump({"load_s": load_s, "images_per_s": len(images) / batch_s, "image_ms": image_ms, "text_ms": text_ms,
           "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "vectors": vectors.tolist(), "text_vectors": text_vectors.tolist()}, open(out, "w"))
'''

QUERIES = [
    'a dog running on the beach', 'two people shaking hands in an office', 'a red car at night',
    'close-up of a face in the rain', 'aerial view of a city', 'children playing football',
    'a cat sleeping on a sofa', 'snow-covered mountains at sunrise', 'a crowded train station',
    'someone cooking pasta', 'fireworks over a river', 'a laptop on a wooden desk',
]


def keyframes(n, venv_python):
    """`n` synthetic 640x480 JPEGs (gradients and shapes, a different one each), base64."""
    code = r'''
import base64, io, json, sys
from PIL import Image, ImageDraw
out = []
for i in range(int(sys.argv[1])):
    img = Image.new("RGB", (640, 480), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    d = ImageDraw.Draw(img)
    for k in range(12):
        x, y = (i * 61 + k * 97) % 600, (i * 43 + k * 71) % 440
        d.ellipse([x, y, x + 40 + k * 5, y + 30 + k * 4], fill=((k * 29) % 256, (i * 17 + k * 40) % 256, 200))
    buf = io.BytesIO(); img.save(buf, "JPEG", quality=90); out.append(base64.b64encode(buf.getvalue()).decode())
print(json.dumps(out))
'''
    return json.loads(subprocess.run([venv_python, '-c', code, str(n)], check=True, capture_output=True,
                                     text=True).stdout)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / max(sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5, 1e-30)


def warm_page_cache(model_dir):
    """Read the weights once, so neither engine's load pays for the disk (the first to run would)."""
    with open(os.path.join(model_dir, 'model.safetensors'), 'rb') as f:
        while f.read(1 << 24):
            pass


def kiln(binary, model_dir, threads, device, images, samples, port, log_path):
    base = f'http://127.0.0.1:{port}'
    log = open(log_path, 'w')
    t0 = time.time()
    srv = subprocess.Popen([binary, 'serve', '--family', 'image-text-embedding', '--listen', f'127.0.0.1:{port}',
                            '--threads', str(threads), '--warmup-iterations', '1', '--device', device,
                            '--model', f'siglip:bench={model_dir}'],
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        while not ready(base):
            if srv.poll() is not None or time.time() - t0 > 900:
                raise SystemExit(f'kiln exited or never became ready; see {log_path}')
            time.sleep(0.05)
        ready_s = time.time() - t0
        with urllib.request.urlopen(base + '/status') as r:
            status = json.load(r)['models'][0]
        post(base, '/embed/vision', {'images_base64': images[:1]})
        t = time.time()
        vectors = post(base, '/embed/vision', {'images_base64': images})['embeddings']
        batch_s = time.time() - t
        image_ms, text_ms = [], []
        for b in images[:samples]:
            t = time.time(); post(base, '/embed/vision', {'image_base64': b}); image_ms.append((time.time() - t) * 1000)
        for q in QUERIES[:samples]:
            t = time.time(); post(base, '/embed/text', {'text': q}); text_ms.append((time.time() - t) * 1000)
        text_vectors = post(base, '/embed/text', {'text': QUERIES})['embeddings']
        return {'ready_s': ready_s, 'load_s': status['loadSeconds'], 'warmup_s': status['warmupSeconds'],
                'images_per_s': len(images) / batch_s, 'image_ms': image_ms,
                'text_ms': text_ms, 'rss_mib': rss_peak_mib(srv.pid), 'vectors': vectors,
                'text_vectors': text_vectors}
    finally:
        srv.terminate()
        srv.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('binary')
    ap.add_argument('venv_python')
    ap.add_argument('out')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--models', default='base,so400m')
    ap.add_argument('--images', type=int, default=32)
    ap.add_argument('--port', type=int, default=8098)
    ap.add_argument('--device', default='cpu', help='cpu, or cuda:N for both engines on that GPU')
    a = ap.parse_args()
    images = keyframes(a.images, a.venv_python)
    result = {'threads': a.threads, 'images': a.images, 'device': a.device, 'checkpoints': {}}
    for name in a.models.split(','):
        spec = CHECKPOINTS[name]
        model_dir = os.path.join(CACHE, f'siglip-{name}-random-1')
        if not os.path.exists(os.path.join(model_dir, 'model.safetensors')):
            print(f'== writing the {name} SigLIP checkpoint (once)', flush=True)
            subprocess.run([a.venv_python, '-c', WRITE, model_dir, TINY, json.dumps(spec)], check=True)
        # A full-size image costs seconds on two cores: fewer latency samples for the large one.
        samples = 10 if name == 'base' or a.device != 'cpu' else 4
        print(f'== {name}: kiln', flush=True)
        warm_page_cache(model_dir)
        k = kiln(a.binary, model_dir, a.threads, a.device, images, samples, a.port, f'{a.out}.{name}.server.log')
        print(f'== {name}: transformers on torch', flush=True)
        inputs_path = f'{a.out}.{name}.inputs.json'
        json.dump({'images': images, 'queries': QUERIES, 'samples': samples}, open(inputs_path, 'w'))
        torch_out = f'{a.out}.{name}.torch.json'
        warm_page_cache(model_dir)
        subprocess.run([a.venv_python, '-c', TORCH_SIDE, model_dir, str(a.threads), inputs_path, torch_out, a.device],
                       check=True)
        t = json.load(open(torch_out))
        row = {'image_size': spec['image_size'], 'samples': samples}
        for engine, r in (('kiln', k), ('torch', t)):
            row[engine] = {
                'ready_s': r.get('ready_s', r['load_s']),
                'load_s': r['load_s'],
                'images_per_s': r['images_per_s'],
                'image_p50_ms': statistics.median(r['image_ms']), 'image_p99_ms': p(r['image_ms'], 0.99),
                'text_p50_ms': statistics.median(r['text_ms']), 'text_p99_ms': p(r['text_ms'], 0.99),
                'rss_mib': r['rss_mib'],
            }
        row['min_image_cosine'] = min(cosine(x, y) for x, y in zip(k['vectors'], t['vectors']))
        row['min_text_cosine'] = min(cosine(x, y) for x, y in zip(k['text_vectors'], t['text_vectors']))
        kk, tt = row['kiln'], row['torch']
        row['ratios'] = {
            'images_per_s': kk['images_per_s'] / tt['images_per_s'],
            'image_p50': kk['image_p50_ms'] / tt['image_p50_ms'],
            'image_p99': kk['image_p99_ms'] / tt['image_p99_ms'],
            'text_p50': kk['text_p50_ms'] / tt['text_p50_ms'],
            'text_p99': kk['text_p99_ms'] / tt['text_p99_ms'],
            'rss': kk['rss_mib'] / tt['rss_mib'],
            'load': kk['load_s'] / tt['load_s'],
        }
        result['checkpoints'][name] = row
        print(json.dumps({name: {k2: v for k2, v in row.items()}}, indent=1), flush=True)
        json.dump(result, open(a.out, 'w'), indent=1)
    json.dump(result, open(a.out, 'w'), indent=1)


if __name__ == '__main__':
    sys.exit(main())
