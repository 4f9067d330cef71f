#!/usr/bin/env bash
# The GPU checks of issue 24 on a machine with a CUDA device but no Rust toolchain or package
# registry: built and packed here, run there.
#
#   gpu-check.sh pack DIR   (here) builds the `cuda` model server, bench_engine, bench_llama,
#                           bench_whisper, bench_faces and the GPU tests (architectures, image_text, device, generation,
#                           faces)
#                           with `make build-cuda`'s toolchain, for KILN_CUDA_ARCHS (default
#                           90) only, into DIR/bin.tar.xz, with
#                           MiniLM's small files, SmolLM2's GGUF cut to its first 2 layers with
#                           its token table in Q4_0 (a device machine takes 64 MiB of files;
#                           the whole file is 98 MB),
#                           gguf-py and the bench corpus. Prints DIR's size.
#   gpu-check.sh run DIR OUT   (there, from the repository root) writes random MiniLM weights
#                           and a full-depth SmolLM2 (the kept layers repeated), puts the binaries
#                           where the tests were told they live, runs the GPU tests, serves
#                           MiniLM (against sentence-transformers on the same weights) and
#                           SmolLM2 on cuda:0 over HTTP, serves Whisper (tiny.en's shape, random
#                           weights) on cuda:0 and on the CPU and transcribes two clips with
#                           each, then `make bench-gpu` (bench/gpu.sh).
#                           Logs and JSON go to OUT. Needs python3 with torch, transformers,
#                           sentence-transformers and numpy, and the CUDA 13 runtime and cuBLAS
#                           (the `nvidia-*` wheels torch brings).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
TESTS=architectures,image_text,device,generation,faces

pack() {
  local dir
  dir="$(mkdir -p "$1" && cd "$1" && pwd)"
  rm -rf "$dir" && mkdir -p "$dir/stage" "$dir/fixtures/minilm"
  # Machine code for the GPU it will run on only (default: Hopper, 9.0): all four capabilities'
  # kernels would not fit beside the model. Its own target directory, first seeded from the
  # usual one so only candle's kernels and what depends on them are built again.
  export KILN_CUDA_ARCHS="${KILN_CUDA_ARCHS:-90}"
  export KILN_CUDA_TARGET_DIR="${KILN_CUDA_TARGET_DIR:-$CACHE/cargo-target-cuda-sm${KILN_CUDA_ARCHS// /-}}"
  if [ ! -d "$KILN_CUDA_TARGET_DIR" ] && [ -d "$CACHE/cargo-target-cuda" ]; then
    cp -a "$CACHE/cargo-target-cuda" "$KILN_CUDA_TARGET_DIR"
    rm -rf "$KILN_CUDA_TARGET_DIR"/release/build/candle-kernels-*
  fi
  local server engine llama whisper faces
  server="$(bash "$ROOT/scripts/build-cuda.sh")"
  engine="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_engine)"
  llama="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_llama)"
  whisper="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_whisper)"
  faces="$(bash "$ROOT/scripts/build-cuda.sh" --example bench_faces)"
  cp "$server" "$engine" "$llama" "$whisper" "$faces" "$dir/stage/"
  while read -r exe; do
    # cargo names a test's executable NAME-HASH.
    cp "$exe" "$dir/stage/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
  done < <(bash "$ROOT/scripts/build-cuda.sh" --tests "$TESTS")
  strip "$dir"/stage/*
  # One stream with a window wider than a binary: the binaries share most of their bytes.
  tar -C "$dir/stage" -cf - . | xz -T1 --lzma2=preset=6,dict=512MiB >"$dir/bin.tar.xz"
  rm -rf "$dir/stage"
  # Where the tests look for their data and the server binary: paths fixed when they compiled.
  cat >"$dir/paths.env" <<EOF
MANIFEST_DIR=$ROOT/model-server
BIN_EXE=$(dirname "$server")/kiln-model-server
EOF
  # MiniLM's files but its weights (87 MB): there, transformers writes random ones of its shape.
  (cd "$CACHE/fixtures/minilm" && find . -type f ! -name model.safetensors ! -name '.git*' ! -name '*.md' \
    -exec cp --parents {} "$dir/fixtures/minilm/" \;)
  cp -r "$ROOT/../shared/bench/corpus" "$dir/corpus"
  # Whisper tiny.en's shape and tokenizer but its weights (73 MB), and two spoken clips: there,
  # transformers writes random weights of that shape for a served smoke run on cuda:0.
  mkdir -p "$dir/fixtures/whisper"
  cp "$CACHE"/fixtures/whisper-tiny-en-hf/{config.json,generation_config.json,tokenizer.json} "$dir/fixtures/whisper/"
  cp "$CACHE"/fixtures/whisper-reference/{fox.wav,kiln.flac} "$dir/fixtures/"
  # YuNet and OpenCV's faces (2 MB): the faces test runs whole there.
  cp -rL "$CACHE/fixtures/yunet" "$CACHE/fixtures/yunet-reference" "$dir/fixtures/"
  # SmolLM2 with its first layers only (the token table alone is 30 MB): the GPU path's greedy
  # tokens are compared with the CPU path's on the same file there, so no reference is needed.
  mkdir -p "$dir/fixtures/smollm2"
  local venv
  venv="$(ls -d "$CACHE"/gguf-reference-venv-* | head -n1)"
  # gguf-py (pure Python) to write the full-size file there: the kept layers repeated.
  mkdir -p "$dir/py" && cp -r "$venv"/lib/python3*/site-packages/gguf "$dir/py/"
  "$venv/bin/python" "$ROOT/scripts/gguf_layers.py" "$CACHE/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
    "$dir/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --layers "${GPU_CHECK_LAYERS:-2}" --token-table Q4_0
  du -sh "$dir"
}

run() {
  local dir out status=0
  dir="$(cd "$1" && pwd)"
  out="$2"
  mkdir -p "$out" "$dir/bin"
  SECONDS=0
  # shellcheck disable=SC1091
  . "$dir/paths.env"
  if command -v xz >/dev/null; then
    xz -dc "$dir/bin.tar.xz" | tar -C "$dir/bin" -xf -
  else
    python3 -c 'import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' \
      "$dir/bin.tar.xz" "$dir/bin"
  fi
  if [ ! -e "$MANIFEST_DIR" ]; then
    mkdir -p "$(dirname "$MANIFEST_DIR")"
    ln -sfn "$ROOT/model-server" "$MANIFEST_DIR"
  fi
  mkdir -p "$(dirname "$BIN_EXE")"
  cp "$dir/bin/kiln-model-server" "$BIN_EXE"
  # The CUDA 13 runtime and cuBLAS the binaries link, from the wheels beside torch.
  local libs
  libs="$(python3 - <<'PY'
import glob, os, site, sys
dirs = set()
for base in site.getsitepackages() + [sys.prefix]:
    for lib in ("libcublas.so.13", "libcudart.so.13", "libcurand.so.10", "libnvrtc.so.13"):
        dirs.update(os.path.dirname(p) for p in glob.glob(f"{base}/**/{lib}", recursive=True))
print(":".join(sorted(dirs)))
PY
)"
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONPATH="$dir/py${PYTHONPATH:+:$PYTHONPATH}"
  echo "CUDA libraries from: $libs"
  ldd "$BIN_EXE" | grep 'not found' && status=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  local fixtures="$dir/fixtures" full="$dir/smollm2-full"
  # MiniLM's and Whisper tiny.en's shapes with seeded random weights, and SmolLM2 at full depth
  # from the kept layers repeated (speed depends on shapes and formats, not values).
  python3 - "$fixtures/minilm" <<'PY' || { status=1; echo "FAILED: writing MiniLM"; }
import sys, torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
BertModel(BertConfig.from_json_file(sys.argv[1] + "/config.json")).save_pretrained(sys.argv[1], safe_serialization=True)
PY
  # Whisper with tiny.en's shape, seeded random weights.
  python3 - "$fixtures/whisper" <<'PY' || { status=1; echo "FAILED: writing Whisper"; }
import sys, torch
from transformers import WhisperConfig, WhisperForConditionalGeneration
torch.manual_seed(0)
WhisperForConditionalGeneration(WhisperConfig.from_json_file(sys.argv[1] + "/config.json")).save_pretrained(
    sys.argv[1], safe_serialization=True)
PY
  mkdir -p "$full"
  python3 "$ROOT/scripts/gguf_layers.py" "$fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
    "$full/SmolLM2-135M-Instruct.Q4_1.gguf" --layers 30 --token-table Q8_0 || { status=1; echo "FAILED: writing SmolLM2"; }
  local t args
  for t in ${TESTS//,/ }; do
    case "$t" in
      # Random MiniLM weights here: the reference vectors are for the real ones.
      device) args=(--skip gpu_embeddings_match_the_reference_vectors) ;;
      # The cut-down SmolLM2 has no numpy reference: the CPU path is the yardstick.
      generation) args=(the_gpu_path_gives_the_cpu_paths_greedy_tokens the_gpu_path_steps_sequences_together) ;;
      faces) args=(the_gpu_path) ;;
      *) args=() ;;
    esac
    echo "== test $t ${args[*]} (at ${SECONDS}s)"
    KILN_FIXTURES="$fixtures" timeout 300 "$dir/bin/$t" "${args[@]}" --test-threads 2 --nocapture \
      >"$out/test-$t.log" 2>&1 || { status=1; echo "FAILED: $t"; }
    grep -E '^test |test result|candle on|skipped|panicked' "$out/test-$t.log" || true
  done
  echo "== served on cuda:0 over HTTP: MiniLM against sentence-transformers, SmolLM2 chat, Whisper (at ${SECONDS}s)"
  timeout 400 python3 - "$BIN_EXE" "$fixtures/minilm" "$ROOT/model-server/tests/data/golden-minilm-sample.json" \
    "$full" "$out" "$fixtures/whisper" "$fixtures/fox.wav" "$fixtures/kiln.flac" >"$out/http.log" 2>&1 <<'PY' \
    || { status=1; echo "FAILED: HTTP on cuda:0"; }
import base64, json, subprocess, sys, time, urllib.request
binary, model, golden, smollm2, log_dir, whisper = sys.argv[1:7]
clips = sys.argv[7:9]
texts = [i["text"] for i in json.load(open(golden))["items"]]

def serve(args, port, log, device="cuda:0"):
    srv = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--device", device] + args,
                           stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    started = time.time()
    while True:
        try:
            if urllib.request.urlopen(base + "/readyz", timeout=2).status == 200:
                break
        except Exception:
            if srv.poll() is not None or time.time() - started > 120:
                srv.kill()
                raise SystemExit(f"server exited or never ready ({srv.returncode}): {open(log).read()[-2000:]}")
            time.sleep(0.1)
    print(f"ready in {time.time() - started:.1f} s", flush=True)
    status = json.load(urllib.request.urlopen(base + "/status", timeout=10))
    print("status device:", json.dumps(status["device"]), flush=True)
    assert status["device"]["device"] == device, status["device"]
    return srv, base

def stop(srv):
    srv.terminate()
    try:
        srv.wait(timeout=30)
    except subprocess.TimeoutExpired:
        srv.kill()

def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))

def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

srv, base = serve(["--model", f"minilm:v1={model}"], 8097, log_dir + "/serve-minilm.log")
try:
    got = [d["embedding"] for d in post(base, "/v1/embeddings", {"model": "minilm", "input": texts})["data"]]
    metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    print([l for l in metrics.splitlines() if l.startswith("kiln_device_info")])
finally:
    stop(srv)
from sentence_transformers import SentenceTransformer
want = SentenceTransformer(model, device="cpu").encode(texts, normalize_embeddings=True).tolist()
worst = min(cos(g, w) for g, w in zip(got, want))
apart = max(cos(want[i], want[j]) for i in range(len(want)) for j in range(i + 1, len(want)) if texts[i] != texts[j])
print(f"{len(texts)} texts: worst cosine against sentence-transformers {worst:.7f}; closest two different texts {apart:.5f}")
assert worst >= 0.99999 and worst > apart, (worst, apart)

srv, base = serve(["--family", "text-generation", "--model", f"smollm2:full={smollm2}"], 8096,
                  log_dir + "/serve-smollm2.log")
try:
    r = post(base, "/v1/chat/completions", {"model": "smollm2", "max_tokens": 16, "temperature": 0,
                                            "messages": [{"role": "user", "content": "What is 2+2?"}]})
    print("chat on cuda:0:", json.dumps(r["usage"]), repr(r["choices"][0]["message"]["content"][:80]))
    assert r["usage"]["completion_tokens"] > 0
finally:
    stop(srv)

# Whisper with tiny.en's shape and random weights: the tokens mean nothing, but every kernel of
# the float16 path and the decoding loop (fallback included) run on the GPU, the CPU beside it.
for device, port in (("cuda:0", 8095), ("cpu", 8094)):
    srv, base = serve(["--family", "speech-to-text", "--model", f"whisper:r={whisper}"], port,
                      f"{log_dir}/serve-whisper-{device.split(':')[0]}.log", device)
    try:
        for clip in clips:
            body = json.dumps({"audio_base64": base64.b64encode(open(clip, "rb").read()).decode()}).encode()
            req = urllib.request.Request(base + "/asr/transcribe", body, {"Content-Type": "application/json"})
            t = time.time()
            r = json.load(urllib.request.urlopen(req, timeout=120))
            print(f"whisper on {device}, {clip.rsplit('/', 1)[-1]}: {time.time() - t:.2f} s, "
                  f"{len(r.get('text', ''))} characters, {len(r.get('segments', []))} segments", flush=True)
    finally:
        stop(srv)
PY
  cat "$out/http.log"
  echo "== make bench-gpu (at ${SECONDS}s)"
  BENCH_ENGINE="$dir/bin/bench_engine" BENCH_SERVER="$BIN_EXE" BENCH_LLAMA="$dir/bin/bench_llama" \
    BENCH_WHISPER="$dir/bin/bench_whisper" BENCH_FACES="$dir/bin/bench_faces" \
    MODEL="$fixtures/minilm" LLAMA_MODEL="$full" WHISPER_MODEL="$fixtures/whisper" YUNET_MODEL="$fixtures/yunet" \
    CORPUS="$dir/corpus" OUT="$out" THREADS="${THREADS:-8}" \
    timeout "${BENCH_TIMEOUT:-420}" bash "$ROOT/bench/gpu.sh" || { status=1; echo "FAILED: bench-gpu"; }
  echo "== done at ${SECONDS}s"
  return "$status"
}

case "${1:-}" in
  pack) pack "${2:?pack DIR}" ;;
  run) run "${2:?run DIR OUT}" "${3:?run DIR OUT}" ;;
  *) echo "usage: gpu-check.sh pack DIR | run DIR OUT" >&2; exit 2 ;;
esac
