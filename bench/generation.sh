#!/usr/bin/env bash
# Text generation: Kiln's server and llama.cpp's llama-server on the same GGUF file (SmolLM2-135M
# Instruct, Q4_1), the same threads, the same requests (bench/generation.py), in alternating rounds.
#   generation.sh KILN_MODEL_SERVER_BIN OUT      writes OUT/generation-{kiln,llama-cpp}.json
#   env: THREADS (default: nproc), ROUNDS (default 3), WINDOW_S (seconds per aggregate figure, 10)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$1"
OUT="$2"
MODEL_DIR="${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/smollm2"
GGUF="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS="${THREADS:-$(nproc)}"
ROUNDS="${ROUNDS:-3}"
LOGS="$OUT/generation-logs"
mkdir -p "$OUT" "$LOGS"
LLAMA_SERVER="$(bash "$ROOT/bench/llama-cpp.sh" | tail -n1)"

pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap stop EXIT
wait_up() { # URL PATH
  for _ in $(seq 1 600); do
    if curl -fsS "$1$2" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "generation.sh: $1 never came up; logs in $LOGS" >&2
  exit 1
}

# Peak resident memory of a server process (VmHWM), added to its figures.
record_peak_rss() { # PID FILE
  local kib
  kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$1/status")
  python3 -c 'import json, sys; f = sys.argv[1]; d = json.load(open(f)); d["peak_rss_mib"] = round(int(sys.argv[2]) / 1024, 1); json.dump(d, open(f, "w"))' "$2" "$kib"
}

# Both servers stay up (an idle one uses no CPU) and are measured in alternating rounds, so a
# change in the machine's speed (a shared VM's neighbours) falls on both alike; each figure is
# the median over the rounds.
echo "== text generation: kiln ($THREADS threads, 8 sequences per step) and llama.cpp llama-server" \
  "($THREADS threads, 8 parallel slots), $ROUNDS alternating rounds"
"$BIN" serve --family text-generation --model "smollm2:135m=$MODEL_DIR" --listen 127.0.0.1:18431 \
  --threads "$THREADS" --max-batch-size 8 >"$LOGS/kiln.log" 2>&1 &
kiln_pid=$!
pids+=("$kiln_pid")
"$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port 18432 -t "$THREADS" -tb "$THREADS" \
  --parallel 8 -c 16384 >"$LOGS/llama-cpp.log" 2>&1 &
llama_pid=$!
pids+=("$llama_pid")
wait_up http://127.0.0.1:18431 /readyz
wait_up http://127.0.0.1:18432 /health
for round in $(seq 1 "$ROUNDS"); do
  python3 "$ROOT/bench/generation.py" http://127.0.0.1:18431 kiln >"$LOGS/kiln-$round.json"
  python3 "$ROOT/bench/generation.py" http://127.0.0.1:18432 llama.cpp >"$LOGS/llama-cpp-$round.json"
done
rounds() { seq 1 "$ROUNDS" | sed "s|.*|$LOGS/$1-&.json|"; }
# shellcheck disable=SC2046 # one argument per round file
python3 "$ROOT/bench/generation.py" median kiln $(rounds kiln) >"$OUT/generation-kiln.json"
# shellcheck disable=SC2046
python3 "$ROOT/bench/generation.py" median llama.cpp $(rounds llama-cpp) >"$OUT/generation-llama-cpp.json"
record_peak_rss "$kiln_pid" "$OUT/generation-kiln.json"
record_peak_rss "$llama_pid" "$OUT/generation-llama-cpp.json"
stop
