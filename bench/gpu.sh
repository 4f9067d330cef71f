#!/usr/bin/env bash
# make bench-gpu: BERT (all-MiniLM-L6-v2) on CUDA device 0 beside the CPU's packed encoder, in the
# same run: sentences/s at batch 32 over the bench corpus's short and long inputs, and batch-1
# p50/p99 (bench_engine, tokenization and pooling included). Needs a CUDA device; without one it
# says so and exits 2. The other families have no GPU path yet (docs/model-server.md).
#   env: OUT (default target/bench-gpu); BENCH_ENGINE=PATH uses an already built CUDA
#        bench_engine (on a GPU machine without the package registries, carry it there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="$ROOT/../shared/bench"
OUT="${OUT:-$ROOT/target/bench-gpu}"
MODEL="${MODEL:-${KILN_CACHE:-$HOME/.cache/kiln}/fixtures/minilm}"
CORPUS="${CORPUS:-$SHARED/corpus}"
mkdir -p "$OUT"
engine="${BENCH_ENGINE:-}"
if [ -z "$engine" ]; then
  bash "$ROOT/scripts/fixtures.sh"
  engine="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_engine)"
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
