#!/usr/bin/env bash
# Pull throughput: `kiln-model-server pull` (download + sha256 + fsync + atomic rename, process
# start included) against curl fetching the same files to disk and `sync -f`, from a local HTTP
# server (python's http.server) and a local S3 server (moto), in the same run. Best of $RUNS
# (default 3). Writes $OUT/pull.json.
#   usage: bench/pull.sh KILN_BINARY [OUT]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:?usage: bench/pull.sh KILN_BINARY [OUT]}"
OUT="${2:-$ROOT/target/bench}"
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
MODEL="$CACHE/fixtures/minilm"
MOTO="$CACHE/moto-5.1.18"
RUNS="${RUNS:-3}"
FILES=(config.json tokenizer.json model.safetensors)
mkdir -p "$OUT"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

bytes=0; pins=()
for f in "${FILES[@]}"; do
  bytes=$((bytes + $(stat -c %s "$MODEL/$f")))
  pins+=("--sha256=$f=$(sha256sum "$MODEL/$f" | cut -d' ' -f1)")
done

http_port=$(free_port)
(cd "$MODEL" && exec python3 -m http.server --bind 127.0.0.1 "$http_port" >/dev/null 2>&1) & pids+=($!)
s3_port=$(free_port)
PYTHONPATH="$MOTO" INITIAL_NO_AUTH_ACTION_COUNT=3 python3 -m moto.server -H 127.0.0.1 -p "$s3_port" >/dev/null 2>&1 & pids+=($!)
wait_port "$http_port"; wait_port "$s3_port"
mkdir -p "$work/s3src"; for f in "${FILES[@]}"; do cp "$MODEL/$f" "$work/s3src/"; done
key=$(PYTHONPATH="$MOTO" python3 "$ROOT/model-server/tests/support/s3_setup.py" "http://127.0.0.1:$s3_port" bench "" "$work/s3src")
key_id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$key")
secret=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["secret"])' "$key")

# best_of CMD...: prints the fastest wall time in seconds
best_of() {
  local best=""
  for _ in $(seq "$RUNS"); do
    rm -rf "$work/dest"; mkdir -p "$work/dest"; sync
    local t0 t1; t0=$(date +%s.%N)
    "$@" >"$work/last.log" 2>&1 || { echo "bench: $1 failed:" >&2; tail -5 "$work/last.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    best=$(python3 -c "import sys; a=float(sys.argv[1])-float(sys.argv[2]); b=sys.argv[3]; print(a if not b or a<float(b) else b)" "$t1" "$t0" "$best")
  done
  echo "$best"
}
# CURL_SYNC=1: flush to disk as kiln's pull does (it fsyncs every file before the rename).
curl_http() { for f in "${FILES[@]}"; do curl -sSf -o "$work/dest/$f" "http://127.0.0.1:$http_port/$f"; done; [ "$CURL_SYNC" = 0 ] || sync -f "$work/dest"; }
curl_s3() {
  for f in "${FILES[@]}"; do
    # curl's SigV4 does not add x-amz-content-sha256 by itself; S3 requires it.
    curl -sSf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$key_id:$secret" \
      -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -o "$work/dest/$f" "http://127.0.0.1:$s3_port/bench/$f"
  done; [ "$CURL_SYNC" = 0 ] || sync -f "$work/dest"
}
kiln_http() { "$BIN" pull --source "http://127.0.0.1:$http_port/" --dest "$work/dest/m" "${pins[@]}"; }
kiln_s3() {
  AWS_ACCESS_KEY_ID="$key_id" AWS_SECRET_ACCESS_KEY="$secret" AWS_REGION=us-east-1 \
    AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" "$BIN" pull --source s3://bench/ --dest "$work/dest/m" "${pins[@]}"
}
# best_of fails loudly when a command fails, so no error is ever timed as a fast download.

CURL_SYNC=1; t_curl_http=$(best_of curl_http); t_curl_s3=$(best_of curl_s3)
CURL_SYNC=0; t_curl_http_ns=$(best_of curl_http); t_curl_s3_ns=$(best_of curl_s3)
t_kiln_http=$(best_of kiln_http); t_kiln_s3=$(best_of kiln_s3)
python3 - "$OUT/pull.json" "$bytes" "$t_curl_http" "$t_curl_http_ns" "$t_kiln_http" "$t_curl_s3" "$t_curl_s3_ns" "$t_kiln_s3" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
keys = ["curl_http", "curl_http_nosync", "kiln_http", "curl_s3", "curl_s3_nosync", "kiln_s3"]
t = dict(zip(keys, map(float, sys.argv[3:9])))
mb = {k: n / 1e6 / v for k, v in t.items()}
json.dump({"bytes": n, "seconds": t, "mb_per_s": mb}, open(out, "w"), indent=2)
print(f"pull of {n/1e6:.1f} MB, MB/s (best of runs)   curl+sync   curl (no sync)   kiln (hash+fsync)   kiln/curl+sync")
for src in ("http", "s3"):
    c, cn, k = mb[f"curl_{src}"], mb[f"curl_{src}_nosync"], mb[f"kiln_{src}"]
    print(f"  {src:<38} {c:9.1f}   {cn:14.1f}   {k:17.1f}   {k/c:14.2f}")
PY
