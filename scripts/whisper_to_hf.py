"""A CTranslate2 Whisper directory rewritten as a Hugging Face checkpoint (the layout
transformers' WhisperForConditionalGeneration saves): model.safetensors with transformers'
tensor names (Q, K, V and the cross-attention K, V split; K without a bias), config.json,
generation_config.json (suppressed tokens, languages) and tokenizer.json. The speech tests load
both layouts of the same weights and hold each to faster-whisper's tokens.

Usage: whisper_to_hf.py CT2_DIR OUT_DIR. numpy and the standard library only.
"""

import json
import os
import shutil
import struct
import sys

import numpy as np

DTYPES = {0: ("<f4", "F32"), 4: ("<f2", "F16"), 5: (None, "BF16")}


def read_ct2(path):
    data = open(path, "rb").read()
    at = 0

    def take(fmt):
        nonlocal at
        values = struct.unpack_from(fmt, data, at)
        at += struct.calcsize(fmt)
        return values

    def string():
        nonlocal at
        (n,) = take("<H")
        s = data[at : at + n].rstrip(b"\0").decode()
        at += n
        return s

    take("<I")
    string()
    take("<I")
    (count,) = take("<I")
    out = {}
    for _ in range(count):
        name = string()
        (rank,) = take("<B")
        dims = take(f"<{rank}I") if rank else ()
        (dtype,) = take("<B")
        (nbytes,) = take("<I")
        raw = data[at : at + nbytes]
        at += nbytes
        if dtype in (0, 4) and rank > 0:
            out[name] = np.frombuffer(raw, DTYPES[dtype][0]).reshape(dims)
        elif rank == 0:
            out[name] = int.from_bytes(raw, "little", signed=True)
    return out


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        kind = {"<f4": "F32", "<f2": "F16", "float32": "F32", "float16": "F16"}[array.dtype.str if array.dtype.str in ("<f4", "<f2") else str(array.dtype)]
        blob = array.tobytes()
        header[name] = {"dtype": kind, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def main():
    src, out = sys.argv[1:3]
    ct2 = read_ct2(os.path.join(src, "model.bin"))
    h = ct2["encoder/conv1/weight"].shape[0]
    t = {}

    def linear(dst, w, b=None):
        t[f"{dst}.weight"] = w
        if b is not None:
            t[f"{dst}.bias"] = b

    def norm(dst, srcp):
        t[f"{dst}.weight"] = ct2[f"{srcp}/gamma"]
        t[f"{dst}.bias"] = ct2[f"{srcp}/beta"]

    for side in ("encoder", "decoder"):
        i = 0
        while f"{side}/layer_{i}/ffn/linear_0/weight" in ct2:
            s, d = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            w, b = ct2[f"{s}/self_attention/linear_0/weight"], ct2[f"{s}/self_attention/linear_0/bias"]
            linear(f"{d}.self_attn.q_proj", w[:h], b[:h])
            linear(f"{d}.self_attn.k_proj", w[h : 2 * h])
            linear(f"{d}.self_attn.v_proj", w[2 * h :], b[2 * h :])
            linear(f"{d}.self_attn.out_proj", ct2[f"{s}/self_attention/linear_1/weight"], ct2[f"{s}/self_attention/linear_1/bias"])
            norm(f"{d}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{d}.encoder_attn.q_proj", ct2[f"{s}/attention/linear_0/weight"], ct2[f"{s}/attention/linear_0/bias"])
                w, b = ct2[f"{s}/attention/linear_1/weight"], ct2[f"{s}/attention/linear_1/bias"]
                linear(f"{d}.encoder_attn.k_proj", w[:h])
                linear(f"{d}.encoder_attn.v_proj", w[h:], b[h:])
                linear(f"{d}.encoder_attn.out_proj", ct2[f"{s}/attention/linear_2/weight"], ct2[f"{s}/attention/linear_2/bias"])
                norm(f"{d}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
            linear(f"{d}.fc1", ct2[f"{s}/ffn/linear_0/weight"], ct2[f"{s}/ffn/linear_0/bias"])
            linear(f"{d}.fc2", ct2[f"{s}/ffn/linear_1/weight"], ct2[f"{s}/ffn/linear_1/bias"])
            norm(f"{d}.final_layer_norm", f"{s}/ffn/layer_norm")
            i += 1
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        t[f"model.{side}.embed_positions.weight"] = ct2[f"{side}/position_encodings/encodings"]
    for c in ("conv1", "conv2"):
        linear(f"model.encoder.{c}", ct2[f"encoder/{c}/weight"], ct2[f"encoder/{c}/bias"])
    t["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]

    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), t)
    layers = lambda side: sum(1 for k in t if k.startswith(f"model.{side}.layers.") and k.endswith(".fc1.weight"))
    vocab = t["model.decoder.embed_tokens.weight"].shape[0]
    config = {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "d_model": h,
        "encoder_layers": layers("encoder"),
        "decoder_layers": layers("decoder"),
        "encoder_attention_heads": ct2["encoder/num_heads"],
        "decoder_attention_heads": ct2["decoder/num_heads"],
        "encoder_ffn_dim": t["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": t["model.decoder.layers.0.fc1.weight"].shape[0],
        "num_mel_bins": t["model.encoder.conv1.weight"].shape[1],
        "vocab_size": vocab,
        "max_source_positions": t["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": t["model.decoder.embed_positions.weight"].shape[0],
        "tie_word_embeddings": True,
    }
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=1)
    ct2_config = json.load(open(os.path.join(src, "config.json")))
    tokenizer = json.load(open(os.path.join(src, "tokenizer.json")))
    by_id = {a["id"]: a["content"] for a in tokenizer.get("added_tokens", [])}
    generation = {
        "suppress_tokens": ct2_config.get("suppress_ids", []),
        "begin_suppress_tokens": ct2_config.get("suppress_ids_begin", []),
        "lang_to_id": {by_id[i]: i for i in ct2_config.get("lang_ids", []) if i in by_id},
    }
    json.dump(generation, open(os.path.join(out, "generation_config.json"), "w"), indent=1)
    shutil.copy(os.path.join(src, "tokenizer.json"), os.path.join(out, "tokenizer.json"))


if __name__ == "__main__":
    main()
