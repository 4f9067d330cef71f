#!/usr/bin/env bash
# make bench: Kiln and the Python stack people run today, side by side, in the same run.
# Writes JSON under $OUT and prints the table that docs/benchmarks.md records.
#   env: DURATION (wrk seconds per point, default 20), OUT (default target/bench), SKIP_BASELINE=1,
#        SKIP_CLUSTER=1 (no operator-at-scale part), BENCH_MDS (default 1000),
#        SKIP_GENERATION=1 (no text-generation part; it builds llama.cpp's llama-server once),
#        SKIP_BGE_M3=1 (no BGE-M3-shaped XLM-RoBERTa part; it writes a 1.1 GB checkpoint once),
#        SKIP_SPEECH=1 (no speech-to-text part: Kiln against faster-whisper),
#        SKIP_LAZY=1 (no lazy-loading part: first request, swap, RSS after unload),
#        SKIP_IMAGE_TEXT=1 (no image-text part: SigLIP base and so400m against transformers),
#        IMAGE_TEXT_MODELS (default base,so400m),
#        SKIP_FACES=1 (no face-detection part: YuNet against OpenCV's FaceDetectorYN)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="$ROOT/../shared/bench"
OUT="${OUT:-$ROOT/target/bench}"  # results, beside the sources
MODEL="${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/minilm"
mkdir -p "$OUT"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
bash "$ROOT/scripts/fixtures.sh"

echo "== building (release)"
(cd "$ROOT" && cargo build --release --locked -p kiln-operator -p kiln-model-server)

echo "== pull: kiln vs curl, local HTTP and S3 (moto)"
bash "$ROOT/bench/pull.sh" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-model-server" "$OUT"

(cd "$ROOT" && cargo build --release --locked -p kiln-model-server --example bench_engine)

echo "== kiln engine"
"${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench_engine" "$MODEL" "$SHARED/corpus" --out "$OUT/kiln-engine.json" >/dev/null
if [ "${SKIP_BASELINE:-0}" != 1 ]; then
  # ONNX Runtime on the same model and corpus right after Kiln's engine, so both meet the same
  # machine (tokenization and pooling included; it checks its cosine against
  # sentence-transformers).
  echo "== onnx runtime engine"
  OUT="$OUT/baseline" bash "$SHARED/python-baseline/run.sh" ort
fi
echo "== kiln http"
python3 "$ROOT/bench/kiln_http.py" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-model-server" "$MODEL" "$SHARED/corpus" \
  "$OUT/kiln-http.json" --duration "${DURATION:-20}" --baseline-dir "$SHARED/python-baseline"

if [ "${SKIP_GENERATION:-0}" != 1 ]; then
  # Kiln's text-generation server and llama.cpp's llama-server, same GGUF and threads.
  bash "$ROOT/bench/generation.sh" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-model-server" "$OUT"
fi

if [ "${SKIP_SPEECH:-0}" != 1 ]; then
  # Whisper tiny.en (CTranslate2 files from make fixtures): Kiln against faster-whisper float32
  # and int8, and transformers on torch (the Python baseline's venv) on the same weights as a
  # Hugging Face checkpoint; same clips and threads.
  echo "== speech to text: kiln vs faster-whisper and transformers"
  torch_args=()
  if [ "${SKIP_BASELINE:-0}" != 1 ]; then
    bash "$SHARED/python-baseline/run.sh" setup
    torch_args=(--torch-python "${KILN_CACHE:-$HOME/.cache/kiln}/python-baseline/venv/bin/python"
      --hf-model "${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/whisper-tiny-en-hf")
  fi
  python3 "$ROOT/bench/speech.py" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-model-server" \
    "${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/whisper-tiny-en" \
    "${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/whisper-reference-venv/bin/python" "$OUT/speech.json" \
    "${torch_args[@]}"
fi

if [ "${SKIP_LAZY:-0}" != 1 ]; then
  # Lazy models: first-request latency, swaps under a budget, RSS across an unload; the Python
  # baseline's load-on-demand cost beside them.
  echo "== lazy loading: first request, swap, RSS after unload"
  lazy_args=()
  if [ "${SKIP_BASELINE:-0}" != 1 ]; then
    bash "$SHARED/python-baseline/run.sh" setup
    lazy_args=(--torch-python "${KILN_CACHE:-$HOME/.cache/kiln}/python-baseline/venv/bin/python")
  fi
  python3 "$ROOT/bench/lazy.py" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-model-server" "$MODEL" \
    "${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/smollm2" "$OUT/lazy.json" "${lazy_args[@]}"
fi

if [ "${SKIP_IMAGE_TEXT:-0}" != 1 ] && [ "${SKIP_BASELINE:-0}" != 1 ]; then
  # SigLIP at base-224 and so400m-384 (random weights): Kiln's server against transformers on
  # torch. The baseline's venv plus Pillow (transformers' PIL image processor), in a venv of its
  # own so the baseline stays as shipped.
  echo "== image-text embeddings: kiln vs transformers (SigLIP)"
  bash "$SHARED/python-baseline/run.sh" setup
  base_venv="${KILN_CACHE:-$HOME/.cache/kiln}/python-baseline/venv"
  image_venv="${KILN_CACHE:-$HOME/.cache/kiln}/image-text-bench-venv-pillow-11.3.0"
  if [ ! -f "$image_venv/.kiln-complete" ]; then
    rm -rf "$image_venv"
    python3 -m venv "$image_venv"
    site=$("$base_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$site" >"$("$image_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/baseline.pth"
    "$image_venv/bin/python" -m pip install --quiet --disable-pip-version-check pillow==11.3.0
    touch "$image_venv/.kiln-complete"
  fi
  python3 "$ROOT/bench/image_text.py" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-model-server" \
    "$image_venv/bin/python" "$OUT/image-text.json" --models "${IMAGE_TEXT_MODELS:-base,so400m}"
fi

if [ "${SKIP_FACES:-0}" != 1 ]; then
  # YuNet at 640x640 and 1920x1080: Kiln's server against OpenCV's FaceDetectorYN on the same
  # ONNX file (both from make fixtures; OpenCV in the face-detection reference's venv).
  echo "== face detection: kiln vs OpenCV FaceDetectorYN"
  python3 "$ROOT/bench/faces.py" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-model-server" \
    "${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/yunet" \
    "${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/yunet-reference-venv/bin/python" "$OUT/faces.json"
fi

if [ "${SKIP_BASELINE:-0}" != 1 ]; then
  echo "== python baseline (sentence-transformers on torch, FastAPI/uvicorn)"
  OUT="$OUT/baseline" DURATION="${DURATION:-20}" bash "$SHARED/python-baseline/run.sh" all
  if [ "${SKIP_BGE_M3:-0}" != 1 ]; then
    # XLM-RoBERTa at BGE-M3's size (random weights), Kiln's server against sentence-transformers.
    echo "== BGE-M3-shaped XLM-RoBERTa: kiln vs sentence-transformers"
    python3 "$ROOT/bench/bge_m3.py" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-model-server" "$SHARED/corpus" \
      "${KILN_CACHE:-$HOME/.cache/kiln}/python-baseline/venv/bin/python" "$OUT/bge-m3.json"
  fi
fi
if [ "${SKIP_CLUSTER:-0}" != 1 ]; then
  echo "== the operator at scale on the local control plane"
  bash "$ROOT/bench/cluster.sh" "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln-operator" "$OUT"
fi
if [ "${SKIP_AUTOSCALING:-0}" != 1 ]; then
  # The e2e autoscaling test under real Prometheus and prometheus-adapter; it writes its
  # timings (queue over target -> new pod Ready, load end -> back at minReplicas) to $OUT.
  echo "== autoscaling on queue depth (e2e test, dev cluster with monitoring)"
  (cd "$ROOT" && KILN_E2E_FIGURES="$OUT" bash e2e/run.sh autoscaling)
fi
python3 "$ROOT/bench/report.py" "$OUT"
