"""The independent reference for the face-detection tests: OpenCV's cv2.FaceDetectorYN on the
same YuNet ONNX file, over images made from scikit-image's samples.

    python yunet_reference.py MODEL.onnx OUT_DIR

writes OUT_DIR/<name>.{png,jpg} and OUT_DIR/reference.json: for each image, its size and the
faces OpenCV finds with its defaults (score 0.9, NMS 0.3, top-k 5000), each as box [x, y, w, h],
five landmarks and score, in the pixels a viewer shows (cv2.imread applies EXIF orientation).

The images: `astronaut` (one face); a collage of the astronaut's face at five scales on a
1000x700 canvas (not a multiple of 32: the padding path); `coffee` and `chelsea` (no face); and
the astronaut stored rotated in a JPEG whose EXIF orientation turns it upright.
"""

import json
import os
import sys

import cv2
import numpy as np
from PIL import Image
from skimage import data


def collage(astronaut):
    """The astronaut's head at several scales, on a grey 1000x700 canvas."""
    head = astronaut[20:250, 120:340]  # RGB, 230 x 220
    canvas = np.full((700, 1000, 3), 128, np.uint8)
    x = 10
    for scale, y in [(0.35, 40), (0.6, 300), (1.0, 60), (1.4, 330), (0.8, 20)]:
        h, w = int(head.shape[0] * scale), int(head.shape[1] * scale)
        patch = np.asarray(Image.fromarray(head).resize((w, h), Image.BICUBIC))
        if x + w > 1000:
            x = 1000 - w
        canvas[y:y + h, x:x + w] = patch
        x += w + 10
    return canvas


def main():
    model, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    astronaut = data.astronaut()
    rgb = {
        "astronaut": astronaut,
        "collage": collage(astronaut),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
    }
    files = {}
    for name, pixels in rgb.items():
        files[name] = f"{name}.png"
        Image.fromarray(pixels).save(os.path.join(out, files[name]))
    # Stored turned 90 degrees clockwise; EXIF orientation 8 says "rotate 90 counter-clockwise
    # to view", so a viewer (and cv2.imread) shows the astronaut upright.
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(astronaut).rotate(-90, expand=True).save(
        os.path.join(out, "astronaut-exif-rotated.jpg"), quality=95, exif=exif
    )
    files["astronaut-exif-rotated"] = "astronaut-exif-rotated.jpg"

    cv2.setNumThreads(1)
    reference = {"opencv": cv2.__version__, "images": []}
    for name, file in files.items():
        image = cv2.imread(os.path.join(out, file), cv2.IMREAD_COLOR)
        h, w = image.shape[:2]
        detector = cv2.FaceDetectorYN.create(model, "", (w, h))
        _, faces = detector.detect(image)
        faces = [] if faces is None else faces
        reference["images"].append({
            "name": name,
            "file": file,
            "width": w,
            "height": h,
            "faces": [
                {
                    "box": [float(v) for v in f[0:4]],
                    "landmarks": [[float(f[4 + 2 * i]), float(f[5 + 2 * i])] for i in range(5)],
                    "score": float(f[14]),
                }
                for f in faces
            ],
        })
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
    for image in reference["images"]:
        print(f"{image['name']}: {image['width']}x{image['height']}, {len(image['faces'])} faces",
              [round(f["score"], 3) for f in image["faces"]])


if __name__ == "__main__":
    main()
