#!/usr/bin/env python3
"""Reference images and the pixel values transformers' image processors make of them, for the
tests of Kiln's image decoding and preprocessing (model-server/src/images/).

usage: python3 scripts/image_references.py [--out model-server/tests/data/images]

Run it by hand in a virtual environment with the reference libraries:
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.15.0 transformers==5.23.0 pillow==11.3.0
    /tmp/ref/bin/python scripts/image_references.py
and commit what it writes; the tests only read the committed files (CI has no torch).

It draws a few small images with numpy (odd sizes, a wide and a tall one, one with
transparency), saves each as PNG and as JPEG (quality 90), and writes reference.json: for each
file and each preprocessor config (SigLIP's exact resize, CLIP's shortest edge and centre
crop, with small sizes so the file stays small), the config and the pixel values
SiglipImageProcessorPil / CLIPImageProcessorPil (the PIL path: what these checkpoints were
trained with) compute from the file, channels first, rounded to 4 decimals.
"""
import argparse
import json
import os

import numpy as np
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

SEED = 20261203

CONFIGS = {
    "siglip-32": (SiglipImageProcessorPil, {
        "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }),
    "clip-24": (CLIPImageProcessorPil, {
        "do_resize": True, "size": {"shortest_edge": 28}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 24, "width": 24},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }),
    "bilinear-up-40x20": (SiglipImageProcessorPil, {
        "do_resize": True, "size": {"height": 20, "width": 40}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
    }),
}


def images(rng):
    y, x = np.mgrid[0:61, 0:97]
    smooth = np.stack([x * 2.5, y * 4, (x + y) * 1.5], -1)
    yield "gradient-97x61", np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    y, x = np.mgrid[0:120, 0:200]
    rings = 127 + 120 * np.sin(np.hypot(x - 90, y - 50) / 6.0)
    yield "rings-200x120", np.stack([rings, 255 - rings, (x * 1.2) % 256], -1).astype(np.uint8)
    y, x = np.mgrid[0:150, 0:40]
    yield "tall-40x150", np.stack([(y * 1.7) % 256, x * 6, np.full_like(x, 90)], -1).astype(np.uint8)


def alpha_image():
    y, x = np.mgrid[0:30, 0:50]
    rgba = np.stack([x * 5, y * 8, np.full_like(x, 200), np.clip(x * 6 - 40, 0, 255)], -1)
    return rgba.astype(np.uint8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="model-server/tests/data/images")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(SEED)
    files = []
    for name, pixels in images(rng):
        img = Image.fromarray(pixels)
        img.save(os.path.join(a.out, f"{name}.png"))
        img.save(os.path.join(a.out, f"{name}.jpg"), quality=90)
        files += [f"{name}.png", f"{name}.jpg"]
    Image.fromarray(alpha_image()).save(os.path.join(a.out, "alpha-50x30.png"))
    files.append("alpha-50x30.png")
    cases = []
    for file in files:
        with Image.open(os.path.join(a.out, file)) as img:
            img.load()
            for config_name, (cls, config) in CONFIGS.items():
                processor = cls(**config)
                values = processor(img, return_tensors="np")["pixel_values"][0]
                cases.append({
                    "file": file, "config": config_name, "shape": list(values.shape),
                    "pixel_values": [round(float(v), 4) for v in values.reshape(-1)],
                })
    out = {"configs": {k: v[1] for k, v in CONFIGS.items()}, "cases": cases}
    with open(os.path.join(a.out, "reference.json"), "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {len(files)} images and {len(cases)} cases to {a.out}")


if __name__ == "__main__":
    main()
