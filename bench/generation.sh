#!/usr/bin/env bash
# Text generation: Kiln's server and llama.cpp's llama-server on the same GGUF file (SmolLM2-135M
# Instruct, Q4_1), the same threads, the same requests (bench/generation.py), one after the other.
#   generation.sh KILN_MODEL_SERVER_BIN OUT      writes OUT/generation-{kiln,llama-cpp}.json
#   env: THREADS (default: nproc)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$1"
OUT="$2"
MODEL_DIR="${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/smollm2"
GGUF="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS="${THREADS:-$(nproc)}"
LOGS="$OUT/generation-logs"
mkdir -p "$OUT" "$LOGS"
LLAMA_SERVER="$(bash "$ROOT/bench/llama-cpp.sh" | tail -n1)"

pid=""
stop() { if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
trap stop EXIT
wait_up() { # URL PATH
  for _ in $(seq 1 600); do
    if curl -fsS "$1$2" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "generation.sh: $1 never came up; logs in $LOGS" >&2
  exit 1
}

echo "== text generation: kiln ($THREADS threads, 8 sequences per step)"
"$BIN" serve --family text-generation --model "smollm2:135m=$MODEL_DIR" --listen 127.0.0.1:18431 \
  --threads "$THREADS" --max-batch-size 8 >"$LOGS/kiln.log" 2>&1 &
pid=$!
wait_up http://127.0.0.1:18431 /readyz
python3 "$ROOT/bench/generation.py" http://127.0.0.1:18431 kiln >"$OUT/generation-kiln.json"
stop

echo "== text generation: llama.cpp llama-server ($THREADS threads, 8 parallel slots)"
"$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port 18432 -t "$THREADS" -tb "$THREADS" \
  --parallel 8 -c 16384 >"$LOGS/llama-cpp.log" 2>&1 &
pid=$!
wait_up http://127.0.0.1:18432 /health
python3 "$ROOT/bench/generation.py" http://127.0.0.1:18432 llama.cpp >"$OUT/generation-llama-cpp.json"
stop
