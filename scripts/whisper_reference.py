"""The independent reference for the speech-to-text tests: faster-whisper (CTranslate2) on the
same CTranslate2 model directory Kiln loads, over clips that espeak-ng speaks from
model-server/tests/data/speech-cases.json.

Usage: whisper_reference.py MODEL_DIR CASES_JSON OUT_DIR (a case may name its own espeak-ng voice;
a multilingual model detects the language, as faster-whisper does when none is given)

Writes OUT_DIR/<name>.wav (16 kHz mono 16-bit PCM: the exact samples both sides decode) and
OUT_DIR/reference.json: per clip, the prompt and tokens of the first window's greedy decoding
(beam 1, temperature 0, no fallback, timestamps on) as faster-whisper asked CTranslate2 for
them, and the whole transcript with its segments.
"""

import json
import os
import subprocess
import sys
import tempfile
import wave

import numpy as np
from faster_whisper import WhisperModel

RATE = 16000


def speak(text, voice, wpm, path):
    """espeak-ng's 22.05 kHz speech, resampled to 16 kHz by linear interpolation; returns the
    16 kHz samples and the original (int16, rate)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", raw, text], check=True)
        with wave.open(raw, "rb") as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2, "espeak-ng wrote an unexpected format"
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
    n = int(len(pcm) * RATE / rate)
    resampled = np.interp(np.arange(n) * rate / RATE, np.arange(len(pcm)), pcm)
    out = np.clip(np.round(resampled), -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(out.tobytes())
    # What faster-whisper's decode_audio gives for 16-bit PCM.
    return out.astype(np.float32) / 32768.0, (pcm.astype(np.int16), rate)


# (file name suffix, container format, codec, sample format, rate, channels): the containers
# and codecs uploads come in, at rates and channel counts other than Whisper's.
ENCODINGS = [
    (".flac", "flac", "flac", "s16", None, 1),
    (".mp3", "mp3", "libmp3lame", "s16p", 44100, 2),
    ("-24bit.wav", "wav", "pcm_s24le", "s32", 48000, 2),
    ("-float.wav", "wav", "pcm_f32le", "flt", None, 1),
]


def encode(pcm, rate, stem, out_dir):
    """The clip in every encoding of ENCODINGS (PyAV, FFmpeg's encoders and resampler), and as
    stereo Ogg Vorbis through libsndfile's libvorbis (FFmpeg's own Vorbis encoder writes wrong
    granule positions)."""
    import av
    import soundfile

    name = stem + ".ogg"
    stereo = np.stack([pcm, pcm], axis=1).astype(np.float32) / 32768.0
    soundfile.write(os.path.join(out_dir, name), stereo, rate, format="OGG", subtype="VORBIS")
    names = [name]
    for suffix, container, codec, fmt, out_rate, channels in ENCODINGS:
        name = stem + suffix
        with av.open(os.path.join(out_dir, name), "w", format=container) as out:
            stream = out.add_stream(codec, rate=out_rate or rate)
            stream.layout = "stereo" if channels == 2 else "mono"
            resampler = av.AudioResampler(format=fmt, layout=stream.layout, rate=out_rate or rate)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = rate
            for f in resampler.resample(frame) + resampler.resample(None):
                for packet in stream.encode(f):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        names.append(name)
    return names


class Recorder:
    """Stands in for the CTranslate2 model and records every generate() call."""

    def __init__(self, model):
        self._model = model
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, features, prompts, **kwargs):
        results = self._model.generate(features, prompts, **kwargs)
        self.calls.append({
            "prompt": list(prompts[0]),
            "tokens": list(results[0].sequences_ids[0]),
            "no_speech_prob": results[0].no_speech_prob,
        })
        return results


def main():
    model_dir, cases_path, out_dir = sys.argv[1:4]
    with open(cases_path) as f:
        cases = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    model = WhisperModel(model_dir, device="cpu", compute_type="float32", cpu_threads=2)
    recorder = Recorder(model.model)
    model.model = recorder
    out = []
    for case in cases["cases"]:
        wav = f"{case['name']}.wav"
        voice = case.get("voice", cases["voice"])
        audio, (pcm, rate) = speak(case["text"], voice, cases["words_per_minute"], os.path.join(out_dir, wav))
        recorder.calls.clear()
        segments, info = model.transcribe(
            audio,
            beam_size=1,
            temperature=0.0,
            condition_on_previous_text=True,
            without_timestamps=False,
            vad_filter=False,
        )
        segments = [{"start": s.start, "end": s.end, "text": s.text} for s in segments]
        first = recorder.calls[0]
        encodings = {}
        if case.get("encodings"):
            for name in encode(pcm, rate, case["name"], out_dir):
                segs, _ = model.transcribe(os.path.join(out_dir, name), beam_size=1, temperature=0.0, vad_filter=False)
                encodings[name] = "".join(s.text for s in segs).strip()
        out.append({
            "name": case["name"],
            "spoken": case["text"],
            "wav": wav,
            "samples": len(audio),
            "language": info.language,
            "language_probability": info.language_probability,
            "prompt": first["prompt"],
            "tokens": first["tokens"],
            "no_speech_prob": first["no_speech_prob"],
            "transcript": "".join(s["text"] for s in segments).strip(),
            "segments": segments,
            "encodings": encodings,
        })
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump({"engine": "faster-whisper", "cases": out}, f, indent=1)


if __name__ == "__main__":
    main()
