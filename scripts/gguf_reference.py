#!/usr/bin/env python3
"""
Independent pure-numpy reference forward pass for a llama-architecture GGUF
(written for SmolLM2-135M-Instruct.Q4_1.gguf), greedy decoding.

Kiln's tests compare the server's greedy generation with this script's (scripts/fixtures.sh runs
it once per GGUF file and cases file, in a venv of its own: gguf, numpy, tokenizers, jinja2):

  gguf_reference.py GGUF CASES_JSON [-n 24] > reference.json

CASES_JSON is a list of {"name", "prompt"} (raw text, no BOS) or {"name", "messages"} (rendered
with the GGUF chat template, add_generation_prompt=True). For each case the output has the prompt
text and ids, the greedy ids (stopping at eos) and, per step, the five best logits and the margin between
the two best: where that margin is tiny, an implementation with other rounding (llama.cpp and
candle round activations to 8 bits for Q4_1 matmuls) may rightly pick the other token, so the
tests compare logits with a tolerance and tokens only where the margin is clear.

Nothing here is shared with the Rust engine but the file format: dequantisation is gguf's,
the forward pass is plain numpy in float32 (layer norms in float64).

Notes on conventions (the things that are easy to get wrong):

* Tensor shapes. GGUF stores ne[0] as the innermost (contiguous) dimension.
  For a linear weight, ne = [in_features, out_features]. gguf.GGUFReader exposes
  tensor.data with numpy shape reversed, i.e. (out_features, bytes_per_row) for
  quantized tensors, so after dequantisation we get W with shape (out, in) -- the
  same as a PyTorch nn.Linear weight -- and y = x @ W.T.
  token_embd.weight: ne = [576, 49152] -> numpy (49152, 576): row i = embedding of token i.

* Tied embeddings: this file has no output.weight; the LM head is token_embd.weight
  (logits = h @ E.T). If output.weight exists we use it.

* RoPE layout. HF Llama checkpoints use the "rotate_half"/NeoX layout: within a
  head of dim D, element j is paired with j + D/2. llama.cpp's convert_hf_to_gguf.py
  (LlamaModel.modify_tensors -> LlamaModel.permute) permutes the rows of
  q_proj / k_proj back to the original Meta layout:
      w.reshape(n_head, 2, D/2, in).swapaxes(1, 2).reshape(...)
  so that in GGUF, within each head, rows (2i, 2i+1) form a rotation pair.
  llama.cpp then uses LLAMA_ROPE_TYPE_NORM (mode 0) for arch "llama", which
  rotates ADJACENT pairs:
      out[2i]   = x[2i]*cos(p*th_i) - x[2i+1]*sin(p*th_i)
      out[2i+1] = x[2i]*sin(p*th_i) + x[2i+1]*cos(p*th_i)
      th_i = freq_base^(-2i/D), i = 0..D/2-1, p = absolute position (0-based)
  (candle: candle_nn::rotary_emb::rope_i, which is what quantized_llama.rs uses).
  Equivalent alternative: un-permute q/k rows and use NeoX rope_half -- both give
  identical results. Using rope_half on the GGUF weights as-is is WRONG.
  The RoPE rotation of q and k happens after the projection, before attention; V is not rotated.

* GQA: n_head=9, n_head_kv=3 -> query head h uses kv head h // 3
  (same as HF repeat_kv / ggml broadcasting).

* RMSNorm: x / sqrt(mean(x^2) + eps) * weight, eps from
  llama.attention.layer_norm_rms_epsilon (1e-5). No bias anywhere.

* MLP: down( silu(gate(x)) * up(x) ).
"""
import argparse
import json
import sys
import time

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGMLQuantizationType
from gguf.quants import dequantize



# ----------------------------------------------------------------------------
# GGUF helpers
# ----------------------------------------------------------------------------
def field_value(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        if f.types[1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if t == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def manual_dequant(raw, qtype):
    """Hand-written decoders (for cross-checking gguf.quants). raw: uint8 (rows, bytes)."""
    rows = raw.shape[0]
    if qtype == GGMLQuantizationType.Q4_1:
        # block of 32 weights = 20 bytes: d (f16), m (f16), qs[16];
        # weight j (j<16) = d * (qs[j] & 0xF) + m ; weight j+16 = d * (qs[j] >> 4) + m
        b = raw.reshape(rows, -1, 20)
        d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)
        m = b[:, :, 2:4].copy().view(np.float16).astype(np.float32)
        qs = b[:, :, 4:20]
        lo = (qs & 0x0F).astype(np.float32)
        hi = (qs >> 4).astype(np.float32)
        q = np.concatenate([lo, hi], axis=-1)  # (rows, nblk, 32)
        return (d * q + m).reshape(rows, -1)
    if qtype == GGMLQuantizationType.Q8_0:
        # block of 32 weights = 34 bytes: d (f16), qs[32] int8 ; weight = d * qs
        b = raw.reshape(rows, -1, 34)
        d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)
        qs = b[:, :, 2:34].copy().view(np.int8).astype(np.float32)
        return (d * qs).reshape(rows, -1)
    if qtype == GGMLQuantizationType.F32:
        return np.asarray(raw, dtype=np.float32)
    raise NotImplementedError(qtype.name)


def load_model(path, check_dequant=False):
    r = GGUFReader(path)
    arch = field_value(r, "general.architecture")
    assert arch == "llama", arch
    hp = dict(
        n_layer=field_value(r, "llama.block_count"),
        n_embd=field_value(r, "llama.embedding_length"),
        n_ff=field_value(r, "llama.feed_forward_length"),
        n_head=field_value(r, "llama.attention.head_count"),
        n_head_kv=field_value(r, "llama.attention.head_count_kv"),
        eps=field_value(r, "llama.attention.layer_norm_rms_epsilon"),
        freq_base=field_value(r, "llama.rope.freq_base", 10000.0),
    )
    hp["head_dim"] = hp["n_embd"] // hp["n_head"]
    hp["rope_dim"] = field_value(r, "llama.rope.dimension_count", hp["head_dim"])
    assert hp["rope_dim"] == hp["head_dim"], "partial rope not handled"

    W = {}
    for t in r.tensors:
        ne = [int(x) for x in t.shape]  # GGUF order: ne[0] innermost
        a = dequantize(t.data, t.tensor_type)
        # numpy shape = reversed(ne)
        a = np.ascontiguousarray(a.reshape(list(reversed(ne))), dtype=np.float32)
        if check_dequant and t.tensor_type in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
            b = manual_dequant(np.asarray(t.data), t.tensor_type).reshape(a.shape)
            assert np.array_equal(a, b), f"dequant mismatch in {t.name}"
        W[t.name] = a
    if "output.weight" not in W:
        W["output.weight"] = W["token_embd.weight"]  # tied embeddings
        hp["tied"] = True
    else:
        hp["tied"] = False
    return r, hp, W


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
def rms_norm(x, w, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)).astype(np.float32) * w


def rope_interleaved(x, pos, base):
    """x: (T, H, D). GGUF/llama.cpp NORM rope: rotate adjacent pairs (2i, 2i+1)."""
    T, H, D = x.shape
    inv = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)  # (D/2,)
    ang = pos[:, None].astype(np.float64) * inv[None, :]      # (T, D/2)
    cos = np.cos(ang)[:, None, :].astype(np.float32)
    sin = np.sin(ang)[:, None, :].astype(np.float32)
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward_last_logits(ids, hp, W):
    T = len(ids)
    H, Hkv, D = hp["n_head"], hp["n_head_kv"], hp["head_dim"]
    rep = H // Hkv
    pos = np.arange(T)
    x = W["token_embd.weight"][np.asarray(ids)]  # (T, n_embd)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
    for l in range(hp["n_layer"]):
        p = f"blk.{l}."
        h = rms_norm(x, W[p + "attn_norm.weight"], hp["eps"])
        q = (h @ W[p + "attn_q.weight"].T).reshape(T, H, D)
        k = (h @ W[p + "attn_k.weight"].T).reshape(T, Hkv, D)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, Hkv, D)
        q = rope_interleaved(q, pos, hp["freq_base"])
        k = rope_interleaved(k, pos, hp["freq_base"])
        out = np.empty((T, H, D), dtype=np.float32)
        for hh in range(H):
            kv = hh // rep
            s = (q[:, hh, :] @ k[:, kv, :].T) / np.float32(np.sqrt(D)) + mask
            s = s - s.max(axis=-1, keepdims=True)
            pr = np.exp(s)
            pr /= pr.sum(axis=-1, keepdims=True)
            out[:, hh, :] = pr @ v[:, kv, :]
        x = x + out.reshape(T, H * D) @ W[p + "attn_output.weight"].T
        h = rms_norm(x, W[p + "ffn_norm.weight"], hp["eps"])
        g = h @ W[p + "ffn_gate.weight"].T
        u = h @ W[p + "ffn_up.weight"].T
        x = x + (silu(g) * u) @ W[p + "ffn_down.weight"].T
    h = rms_norm(x[-1:], W["output_norm.weight"], hp["eps"])
    return (h @ W["output.weight"].T)[0]


# ----------------------------------------------------------------------------
# Tokenizer (HF `tokenizers`, built from the GGUF vocab + merges)
# ----------------------------------------------------------------------------
def build_tokenizer(reader):
    from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders

    model = field_value(reader, "tokenizer.ggml.model")
    pre = field_value(reader, "tokenizer.ggml.pre")
    assert model == "gpt2", model
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    ttypes = field_value(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre == "smollm":
        # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM (shared with starcoder/refact/command-r/...):
        #   regex_exprs = { "\\p{N}",
        #     "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)" }
        # applied sequentially = HF Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        raise NotImplementedError(f"pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    # control tokens (token_type 3) are matched atomically in the input text
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(ttypes) if t == 3]
    tok.add_special_tokens(specials)
    for s in specials:
        assert tok.token_to_id(s.content) == vocab[s.content]
    return tok


def render_chat(reader, messages):
    import jinja2
    tmpl = field_value(reader, "tokenizer.chat_template")
    env = jinja2.Environment()
    return env.from_string(tmpl).render(messages=messages, add_generation_prompt=True)


# ----------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("cases")
    ap.add_argument("-n", "--max-new", type=int, default=24)
    a = ap.parse_args()

    t0 = time.time()
    reader, hp, W = load_model(a.gguf)
    tok = build_tokenizer(reader)
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    with open(a.cases) as f:
        cases = json.load(f)
    out = []
    for case in cases:
        text = case["prompt"] if "prompt" in case else render_chat(reader, case["messages"])
        ids = tok.encode(text, add_special_tokens=False).ids
        seq, gen, margins, top5 = list(ids), [], [], []
        for _ in range(a.max_new):
            logits = forward_last_logits(seq, hp, W)
            top = np.argsort(-logits)[:5]
            gen.append(int(top[0]))
            margins.append(round(float(logits[top[0]] - logits[top[1]]), 4))
            top5.append([[int(i), round(float(logits[i]), 4)] for i in top])
            seq.append(int(top[0]))
            if int(top[0]) == eos:
                break
        out.append({
            "name": case["name"],
            "prompt_text": text,
            "prompt_ids": [int(i) for i in ids],
            "generated_ids": gen,
            "margins": margins,
            "top5": top5,
            "generated_text": tok.decode(gen, skip_special_tokens=False),
        })
        print(f"{case['name']}: {tok.decode(gen, skip_special_tokens=False)!r} (min margin {min(margins):.3f})",
              file=sys.stderr)
    print(json.dumps({"gguf": a.gguf, "max_new": a.max_new, "seconds": round(time.time() - t0, 1), "cases": out},
                     ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
