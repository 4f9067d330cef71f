#!/usr/bin/env bash
# make bench-gpu: each family with a GPU path, on CUDA device 0, in one run:
# - text embeddings: BERT (all-MiniLM-L6-v2) on the GPU beside the CPU's packed encoder:
#   sentences/s at batch 32 over the bench corpus's short and long inputs, and batch-1 p50/p99
#   (bench_engine, tokenization and pooling included);
# - text generation: SmolLM2-135M Q4_1 (bench_llama: prefill 128 tokens, decode with 1, 4 and 8
#   sequences) on the GPU and on the CPU;
# - image-text embeddings: SigLIP base and so400m (random weights, full size) served by Kiln on
#   the GPU over HTTP beside transformers on torch on the same GPU (bench/image_text.py);
# - speech to text: Whisper (WHISPER_MODEL, default tiny.en from make fixtures) encoder windows/s
#   and decoder tokens/s at 1, 4 and 8 sequences per step on the GPU and on the CPU
#   (bench_whisper);
# - face detection: YuNet images/s and batch-1 latency at 640x640 and 1080p on the GPU and on
#   the CPU (bench_faces).
# Needs a CUDA device; without one it says so and exits 2.
#   env: OUT (default target/bench-gpu); BENCH_ENGINE, BENCH_LLAMA and BENCH_SERVER use
#        already built CUDA binaries, as do BENCH_WHISPER and BENCH_FACES (on a GPU machine without the package registries, carry
#        them there: scripts/gpu-check.sh); MODEL (MiniLM) and LLAMA_MODEL (SmolLM2) directories;
#        TORCH_PYTHON (default python3) has torch with CUDA and transformers; THREADS (default 8)
#        for both image-text engines.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="$ROOT/../shared/bench"
OUT="${OUT:-$ROOT/target/bench-gpu}"
MODEL="${MODEL:-${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/minilm}"
LLAMA_MODEL="${LLAMA_MODEL:-${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/smollm2}"
WHISPER_MODEL="${WHISPER_MODEL:-${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/whisper-tiny-en}"
YUNET_MODEL="${YUNET_MODEL:-${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/yunet}"
CORPUS="${CORPUS:-$SHARED/corpus}"
mkdir -p "$OUT"
engine="${BENCH_ENGINE:-}"
llama="${BENCH_LLAMA:-}"
server="${BENCH_SERVER:-}"
whisper="${BENCH_WHISPER:-}"
faces="${BENCH_FACES:-}"
if [ -z "$engine" ] || [ -z "$llama" ] || [ -z "$server" ] || [ -z "$whisper" ] || [ -z "$faces" ]; then
  bash "$ROOT/scripts/fixtures.sh"
  server="$(bash "$ROOT/scripts/build-cuda.sh")"
  engine="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_engine)"
  llama="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_llama)"
  whisper="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_whisper)"
  faces="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_faces)"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
echo "== BERT on cuda:0 and on the CPU (packed)"
status=0
QUIET_WAIT_S="${QUIET_WAIT_S:-10}" "$engine" "$MODEL" "$CORPUS" --engines cuda,packed --out "$OUT/gpu-engine.json" >/dev/null \
  || status=$?
if [ "$status" = 2 ]; then
  echo "bench-gpu: skipped: no CUDA device" >&2
  exit 2
fi
[ "$status" = 0 ] || exit "$status"
python3 - "$OUT/gpu-engine.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| engine | device | short sentences/s | long sentences/s | batch-1 p50 ms | p99 ms |")
print(f"|---|---|---|---|---|---|")
for name, e in r.items():
    d = e.get("engine", {})
    dev = d.get("name") or d.get("isa", "cpu")
    s = e.get("throughput_short", {}).get("sentences_per_s")
    l = e.get("throughput_long", {}).get("sentences_per_s")
    lat = e.get("latency_single", {})
    print(f"| {name} | {dev} | {s} | {l} | {lat.get('p50_ms')} | {lat.get('p99_ms')} |")
PY
echo "== SmolLM2-135M Q4_1: the GPU path on cuda:0, the packed decoder on the CPU (bench_llama)"
for dev in cuda:0 cpu; do
  echo "-- $dev"
  "$llama" "$LLAMA_MODEL" "$dev" 2>&1 | tee "$OUT/gpu-llama-${dev%%:*}.txt"
done
echo "== Whisper ($(basename "$WHISPER_MODEL")): the GPU path on cuda:0 (float16), the packed network on the CPU (bench_whisper)"
for dev in cuda:0 cpu; do
  echo "-- $dev"
  "$whisper" "$WHISPER_MODEL" "$dev" 2>&1 | tee "$OUT/gpu-whisper-${dev%%:*}.txt"
done
echo "== YuNet: the GPU path on cuda:0, the packed kernels on the CPU (bench_faces)"
for dev in cuda:0 cpu; do
  echo "-- $dev"
  "$faces" "$YUNET_MODEL" "$dev" 2>&1 | tee "$OUT/gpu-faces-${dev%%:*}.txt"
done
echo "== SigLIP on cuda:0: Kiln over HTTP and transformers on torch"
"${TORCH_PYTHON:-python3}" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "bench-gpu: image-text skipped: ${TORCH_PYTHON:-python3} has no torch with CUDA" >&2; exit 2; }
python3 "$ROOT/bench/image_text.py" "$server" "${TORCH_PYTHON:-python3}" "$OUT/gpu-image-text.json" \
  --device cuda:0 --threads "${THREADS:-8}" --models base,so400m >"$OUT/gpu-image-text.log" 2>&1 \
  || { tail -30 "$OUT/gpu-image-text.log"; exit 1; }
python3 - "$OUT/gpu-image-text.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("| checkpoint | engine | ready s | images/s (batch 32) | image p50 ms | text p50 ms | min cosine image / text |")
print("|---|---|---|---|---|---|---|")
for name, row in r["checkpoints"].items():
    for engine in ("kiln", "torch"):
        e = row[engine]
        print(f"| {name} | {engine} | {e['ready_s']:.2f} | {e['images_per_s']:.1f} | {e['image_p50_ms']:.2f} | "
              f"{e['text_p50_ms']:.2f} | {row['min_image_cosine']:.6f} / {row['min_text_cosine']:.6f} |")
PY
