#!/usr/bin/env python3
"""Face detection: Kiln's server against OpenCV's cv2.FaceDetectorYN on the same YuNet ONNX file,
the same JPEG frames and the same threads, in one run.

usage: faces.py KILN_BINARY YUNET_DIR OPENCV_PYTHON OUT_JSON [--threads 2] [--frames 32]

Frames: scikit-image's astronaut pasted at a few places and scales on a textured background,
at 640x640 and 1920x1080, JPEG quality 90. Kiln runs as the real server (`serve --family
face-detection`) and is measured over HTTP with base64 JSON, so its figures include the
request, decoding and EXIF handling; OpenCV is measured in process (cv2.imdecode + detect,
setInputSize per frame size), so HTTP only counts against Kiln.

Figures per size: images per second for all frames (Kiln: one request with the list, batched
by the server; OpenCV: a loop), batch-1 latency p50/p99 (Kiln: one request per frame), peak RSS,
and the agreement: faces found by each, and the largest difference of a box corner between
matched faces.
"""
import argparse
import base64
import json
import os
import statistics
import subprocess
import time

from kiln_http import percentile as p, post_json, ready, rss_peak_mib


def post(base, body):
    return post_json(base, '/face/detect', body)

SIZES = {'640x640': (640, 640), '1920x1080': (1920, 1080)}

FRAMES = r'''
import base64, io, json, sys
import numpy as np
from PIL import Image
from skimage import data
w, h, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
face = Image.fromarray(data.astronaut()[20:250, 120:340])
out = []
for i in range(n):
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([(xx * 3 + i * 17) % 256, (yy * 2 + i * 29) % 256, ((xx + yy) // 4 + i * 7) % 256], -1)
    img = Image.fromarray(bg.astype(np.uint8))
    for k in range(3):
        s = (0.4 + 0.3 * ((i + k) % 3)) * min(w, h) / 640
        f = face.resize((max(8, int(220 * s)), max(8, int(230 * s))))
        img.paste(f, ((i * 97 + k * 211) % max(1, w - f.width), (i * 53 + k * 137) % max(1, h - f.height)))
    buf = io.BytesIO(); img.save(buf, "JPEG", quality=90)
    out.append(base64.b64encode(buf.getvalue()).decode())
print(json.dumps(out))
'''

OPENCV_SIDE = r'''
import base64, json, resource, sys, time
import cv2, numpy as np
model, threads, inputs_path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
cv2.setNumThreads(threads)
inputs = json.load(open(inputs_path))
result = {}
for size, frames in inputs["frames"].items():
    blobs = [base64.b64decode(b) for b in frames]
    w, h = map(int, size.split("x"))
    det = cv2.FaceDetectorYN.create(model, "", (w, h))
    def detect(b):
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        det.setInputSize((img.shape[1], img.shape[0]))
        _, faces = det.detect(img)
        return [] if faces is None else faces.tolist()
    detect(blobs[0])
    t0 = time.time()
    found = [detect(b) for b in blobs]
    batch_s = time.time() - t0
    latency = []
    for b in blobs[:inputs["samples"]]:
        t = time.time(); detect(b); latency.append((time.time() - t) * 1000)
    result[size] = {"images_per_s": len(blobs) / batch_s, "ms": latency,
                    "faces": [[{"box": f[:4], "score": f[14]} for f in fs] for fs in found]}
result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["opencv"] = cv2.__version__
json.dump(result, open(out, "w"))
'''


def kiln(binary, model_dir, threads, frames, samples, port, log_path):
    base = f'http://127.0.0.1:{port}'
    log = open(log_path, 'w')
    t0 = time.time()
    srv = subprocess.Popen([binary, 'serve', '--family', 'face-detection', '--listen', f'127.0.0.1:{port}',
                            '--threads', str(threads), '--warmup-iterations', '1',
                            '--model', f'yunet:bench={model_dir}'], stdout=log, stderr=subprocess.STDOUT)
    try:
        while not ready(base):
            if srv.poll() is not None or time.time() - t0 > 120:
                raise SystemExit(f'kiln exited or never became ready; see {log_path}')
            time.sleep(0.02)
        result = {'ready_s': time.time() - t0}
        for size, blobs in frames.items():
            post(base, {'images_base64': blobs[:2]})
            t = time.time()
            found = post(base, {'images_base64': blobs})['detections']
            batch_s = time.time() - t
            latency = []
            for b in blobs[:samples]:
                t = time.time(); post(base, {'image_base64': b}); latency.append((time.time() - t) * 1000)
            result[size] = {'images_per_s': len(blobs) / batch_s, 'ms': latency,
                            'faces': [d['faces'] for d in found]}
        result['rss_mib'] = rss_peak_mib(srv.pid)
        return result
    finally:
        srv.terminate()
        srv.wait(timeout=60)


def agreement(kiln_faces, cv_faces):
    """Faces found by each over all frames, and the largest corner difference of matched boxes."""
    worst, k_total, c_total = 0.0, 0, 0
    for ks, cs in zip(kiln_faces, cv_faces):
        k_total += len(ks)
        c_total += len(cs)
        for c in cs:
            if ks:
                worst = max(worst, min(max(abs(a - b) for a, b in zip(k['box'], c['box'])) for k in ks))
    return {'kiln_faces': k_total, 'opencv_faces': c_total, 'max_box_difference_px': worst}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('binary')
    ap.add_argument('model_dir')
    ap.add_argument('opencv_python')
    ap.add_argument('out')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--frames', type=int, default=32)
    ap.add_argument('--samples', type=int, default=20)
    ap.add_argument('--port', type=int, default=8099)
    a = ap.parse_args()
    onnx = [f for f in os.listdir(a.model_dir) if f.endswith('.onnx')][0]
    frames = {}
    for size, (w, h) in SIZES.items():
        frames[size] = json.loads(subprocess.run([a.opencv_python, '-c', FRAMES, str(w), str(h), str(a.frames)],
                                                 check=True, capture_output=True, text=True).stdout)
    print('== face detection: kiln', flush=True)
    k = kiln(a.binary, a.model_dir, a.threads, frames, a.samples, a.port, f'{a.out}.server.log')
    print('== face detection: OpenCV FaceDetectorYN', flush=True)
    inputs_path = f'{a.out}.inputs.json'
    json.dump({'frames': frames, 'samples': a.samples}, open(inputs_path, 'w'))
    cv_out = f'{a.out}.opencv.json'
    subprocess.run([a.opencv_python, '-c', OPENCV_SIDE, os.path.join(a.model_dir, onnx), str(a.threads),
                    inputs_path, cv_out], check=True, stderr=subprocess.DEVNULL)
    c = json.load(open(cv_out))
    result = {'threads': a.threads, 'frames': a.frames, 'opencv': c['opencv'], 'kiln_ready_s': k['ready_s'],
              'rss_mib': {'kiln': k['rss_mib'], 'opencv': c['rss_mib']}, 'sizes': {}}
    for size in SIZES:
        row = {}
        for engine, r in (('kiln', k[size]), ('opencv', c[size])):
            row[engine] = {'images_per_s': r['images_per_s'], 'p50_ms': statistics.median(r['ms']),
                           'p99_ms': p(r['ms'], 0.99)}
        row['agreement'] = agreement(k[size]['faces'], c[size]['faces'])
        kk, cc = row['kiln'], row['opencv']
        row['ratios'] = {'images_per_s': kk['images_per_s'] / cc['images_per_s'],
                         'p50': kk['p50_ms'] / cc['p50_ms'], 'p99': kk['p99_ms'] / cc['p99_ms']}
        result['sizes'][size] = row
    print(json.dumps(result, indent=1), flush=True)
    json.dump(result, open(a.out, 'w'), indent=1)


if __name__ == '__main__':
    main()
