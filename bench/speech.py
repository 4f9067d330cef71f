"""Speech to text: Kiln's server against faster-whisper (CTranslate2, float32 and int8) on the same
CTranslate2 model directory, the same clips and the same threads, in one run.

Usage: speech.py KILN_BINARY MODEL_DIR PYTHON OUT_JSON [--threads 2] [--torch-python PY --hf-model DIR]
  PYTHON: an interpreter with faster-whisper (make fixtures installs one:
  ~/.cache/kiln/fixtures/whisper-reference-venv/bin/python).
  --torch-python, --hf-model: transformers' Whisper on torch as well, on the same weights written
  as a Hugging Face checkpoint (make fixtures writes ~/.cache/kiln/fixtures/whisper-tiny-en-hf).

Clips: espeak-ng speaks sentences of the Whisper test cases (and the bench corpus when
present) into a 60-second and a 5-minute 16 kHz clip. Figures per engine: start to ready (Kiln:
process start to /readyz 200; faster-whisper: model load), single-stream real-time factor on
each clip, aggregate audio seconds per second with 4 concurrent requests of the 60-second clip,
time to first segment, peak RSS, and the word error rate against the spoken text.
"""

import argparse
import base64
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave

from kiln_http import ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def words(text):
    return [w for w in re.sub(r"[^a-z0-9' ]", " ", text.lower()).split() if w]


def wer(got, want):
    g, w = words(got), words(want)
    prev = list(range(len(g) + 1))
    for i, wi in enumerate(w):
        cur = [i + 1] + [0] * len(g)
        for j, gj in enumerate(g):
            cur[j + 1] = min(prev[j] + (wi != gj), prev[j + 1] + 1, cur[j] + 1)
        prev = cur
    return prev[len(g)] / max(1, len(w))


def sentences():
    cases = json.load(open(os.path.join(ROOT, "model-server/tests/data/speech-cases.json")))
    out = []
    for c in cases["cases"]:
        out += [s.strip() + "." for s in c["text"].split(".") if len(s.split()) > 3]
    return out


def make_clip(python, seconds, path):
    """espeak-ng sentences until the clip is `seconds` long; returns the spoken text."""
    script = r"""
import sys, json, numpy as np, wave
sys.path.insert(0, sys.argv[1])
from whisper_reference import speak
target, path, sentences = float(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
pieces, spoken, total, i = [], [], 0, 0
import tempfile, os
tmp = tempfile.mkdtemp()
while total < target * 16000:
    s = sentences[i % len(sentences)]
    audio, _ = speak(s, "en-us", 150, os.path.join(tmp, "s.wav"))
    pieces.append(audio); pieces.append(np.zeros(8000, np.float32)); spoken.append(s)
    total += len(audio) + 8000; i += 1
x = np.concatenate(pieces)[: int(target * 16000)]
with wave.open(path, "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
print(json.dumps(" ".join(spoken)))
"""
    out = subprocess.run([python, "-c", script, os.path.join(ROOT, "scripts"), str(seconds), path,
                          json.dumps(sentences())], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def post(port, wav):
    body = json.dumps({"audio_base64": base64.b64encode(open(wav, "rb").read()).decode()}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/asr/transcribe", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def kiln(binary, model, clips, threads):
    port = 18590
    t0 = time.time()
    proc = subprocess.Popen([binary, "serve", "--family", "speech-to-text", "--model", f"whisper:b={model}",
                             "--listen", f"127.0.0.1:{port}", "--threads", str(threads), "--warmup-iterations", "1",
                             "--max-queued-tokens", "100000"],
                            stdout=subprocess.DEVNULL, stderr=open(os.devnull, "w"))
    try:
        while not ready(f"http://127.0.0.1:{port}"):
            if proc.poll() is not None:
                raise RuntimeError("kiln-model-server exited")
            time.sleep(0.02)
        ready_s = time.time() - t0
        res = {"start_to_ready_s": ready_s, "single": {}}
        for name, (path, spoken, seconds) in clips.items():
            t = time.time()
            r = post(port, path)
            elapsed = time.time() - t
            res["single"][name] = {"rtf": elapsed / seconds, "first_segment_s": elapsed, "wer": wer(r["text"], spoken)}
        path, spoken, seconds = clips["60s"]
        t = time.time()
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda _: post(port, path), range(4)))
        res["aggregate_4"] = 4 * seconds / (time.time() - t)
        res["peak_rss_mib"] = peak_rss_mib(proc.pid)
        return res
    finally:
        proc.terminate()
        proc.wait()


FW = r"""
import json, resource, sys, time, concurrent.futures
t0 = time.time()
from faster_whisper import WhisperModel
model_dir, compute, threads, clips = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
model = WhisperModel(model_dir, device="cpu", compute_type=compute, cpu_threads=threads, num_workers=4)
res = {"start_to_ready_s": time.time() - t0, "single": {}}
def run(path):
    t = time.time(); first = None; text = []
    # Its default decoding, as Kiln's: greedy with the temperature fallback.
    segs, _ = model.transcribe(path, beam_size=1, vad_filter=False)
    for s in segs:
        first = first or time.time() - t
        text.append(s.text)
    return time.time() - t, first, "".join(text)
"""


TORCH = r"""
import json, resource, sys, time, wave, concurrent.futures
t0 = time.time()
import numpy as np, torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast
model_dir, threads, clips = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(threads)
model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
tokenizer = WhisperTokenizerFast(tokenizer_file=model_dir + "/tokenizer.json")
# What openai's generation_config.json says and the converted checkpoint leaves out.
g, ids = model.generation_config, tokenizer.convert_tokens_to_ids
g.no_timestamps_token_id, g.prev_sot_token_id = ids("<|notimestamps|>"), ids("<|startofprev|>")
g.decoder_start_token_id = ids("<|startoftranscript|>")
g.eos_token_id = g.pad_token_id = ids("<|endoftext|>")
g.max_initial_timestamp_index, g.max_length = 50, model.config.max_target_positions
g.is_multilingual = model.config.vocab_size >= 51865
if not g.is_multilingual and hasattr(g, "lang_to_id"):
    del g.lang_to_id
res = {"start_to_ready_s": time.time() - t0, "single": {}}
def samples(path):
    with wave.open(path) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
def run(path):
    audio = samples(path)
    t = time.time()
    # Long-form: the whole clip's features, walked in sequential 30 s windows by generate().
    inputs = features(audio, sampling_rate=16000, return_tensors="pt", truncation=False,
                      padding="longest", return_attention_mask=True)
    with torch.inference_mode():
        out = model.generate(inputs.input_features, attention_mask=inputs.attention_mask,
                             return_timestamps=True, condition_on_prev_tokens=True,
                             temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), compression_ratio_threshold=2.4,
                             logprob_threshold=-1.0, no_speech_threshold=0.6)
    text = tokenizer.batch_decode(out, skip_special_tokens=True)[0]
    elapsed = time.time() - t
    return elapsed, elapsed, text
"""

# The in-process engines' common part: each script above defines `run(path)` -> (seconds, seconds
# to the first segment, text) and `res` with its start to ready.
MEASURE = r"""
for name, (path, spoken, seconds) in clips.items():
    el, first, text = run(path)
    res["single"][name] = {"rtf": el / seconds, "first_segment_s": first, "text": text}
path, spoken, seconds = clips["60s"]
t = time.time()
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    list(ex.map(lambda _: run(path), range(4)))
res["aggregate_4"] = 4 * seconds / (time.time() - t)
res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(res))
"""


def in_process(python, script, args, clips):
    out = subprocess.run([python, "-c", script + MEASURE, *args, json.dumps(clips)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{python} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout)
    for name, r in res["single"].items():
        r["wer"] = wer(r.pop("text"), clips[name][1])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("model")
    ap.add_argument("python")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-python", help="an interpreter with torch and transformers (the Python baseline's)")
    ap.add_argument("--hf-model", help="the same weights as a Hugging Face checkpoint, for transformers")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kiln-speech-bench-")
    clips = {}
    for name, seconds in [("60s", 60.0), ("5min", 300.0)]:
        path = os.path.join(tmp, f"{name}.wav")
        clips[name] = (path, make_clip(a.python, seconds, path), seconds)
    result = {
        "kiln": kiln(a.binary, a.model, clips, a.threads),
        "faster_whisper_float32": in_process(a.python, FW, [a.model, "float32", str(a.threads)], clips),
        "faster_whisper_int8": in_process(a.python, FW, [a.model, "int8", str(a.threads)], clips),
        "threads": a.threads,
    }
    engines = [("kiln", "kiln"), ("faster_whisper_float32", "fw f32"), ("faster_whisper_int8", "fw int8")]
    if a.torch_python and a.hf_model:
        result["transformers_torch"] = in_process(a.torch_python, TORCH, [a.hf_model, str(a.threads)], clips)
        engines.append(("transformers_torch", "torch"))
    json.dump(result, open(a.out, "w"), indent=1)
    k, f = result["kiln"], result["faster_whisper_float32"]
    print(f"{'':28}" + "".join(f"{label:>10}" for _, label in engines))
    rows = [("start to ready (s)", lambda r: r["start_to_ready_s"]),
            ("RTF 60 s", lambda r: r["single"]["60s"]["rtf"]),
            ("RTF 5 min", lambda r: r["single"]["5min"]["rtf"]),
            ("first segment 60 s (s)", lambda r: r["single"]["60s"]["first_segment_s"]),
            ("aggregate x4 (audio s/s)", lambda r: r["aggregate_4"]),
            ("peak RSS (MiB)", lambda r: r["peak_rss_mib"]),
            ("WER 5 min", lambda r: r["single"]["5min"]["wer"])]
    for label, get in rows:
        vals = [get(result[e]) for e, _ in engines]
        print(f"{label:28}" + "".join(f"{v:10.3f}" for v in vals))
    print(f"single-stream speed vs faster-whisper float32 (5 min): "
          f"{f['single']['5min']['rtf'] / k['single']['5min']['rtf']:.2f}x; aggregate x4: "
          f"{k['aggregate_4'] / f['aggregate_4']:.2f}x")
    if "transformers_torch" in result:
        t = result["transformers_torch"]
        print(f"vs transformers on torch (5 min): {t['single']['5min']['rtf'] / k['single']['5min']['rtf']:.2f}x; "
              f"aggregate x4: {k['aggregate_4'] / t['aggregate_4']:.2f}x")


if __name__ == "__main__":
    main()
