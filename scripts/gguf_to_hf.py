#!/usr/bin/env python3
"""
Write a Llama GGUF file out as a Hugging Face checkpoint directory, the layout `transformers`
saves: config.json, model.safetensors (float16, HF tensor names, Q and K rows in HF's rotary
order), tokenizer.json and tokenizer_config.json (with the chat template).

Kiln's text-generation tests load the result to check the safetensors path against the same
numpy reference as the GGUF (scripts/fixtures.sh runs this once per GGUF file):

  gguf_to_hf.py GGUF OUT_DIR

The weights are the GGUF's, dequantised by gguf's own code (gguf_reference.load_model), so the
checkpoint holds the same model the reference runs. llama.cpp's converter permutes the rows of
attn_q and attn_k for its interleaved rotary embedding; the inverse permutation here restores
the order Hugging Face models use (rotate_half), so a loader that forgets to permute fails.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_reference import build_tokenizer, field_value, load_model  # noqa: E402


def unpermute(w, n_head):
    """Inverse of llama.cpp's convert_hf_to_gguf permute (HF rotate_half order -> interleaved)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_safetensors(path, tensors):
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        data = np.ascontiguousarray(a.astype(np.float16)).tobytes()
        header[name] = {"dtype": "F16", "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for c in chunks:
            f.write(c)


def main():
    gguf, out = sys.argv[1], sys.argv[2]
    reader, hp, W = load_model(gguf)
    os.makedirs(out, exist_ok=True)
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not hp["tied"]:
        names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    for i in range(hp["n_layer"]):
        for g, h in per_layer.items():
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    tensors = {}
    for g, h in names.items():
        w = W[g]
        if g.endswith("attn_q.weight"):
            w = unpermute(w, hp["n_head"])
        elif g.endswith("attn_k.weight"):
            w = unpermute(w, hp["n_head_kv"])
        tensors[h] = w
    write_safetensors(os.path.join(out, "model.safetensors"), tensors)

    tokens = field_value(reader, "tokenizer.ggml.tokens")
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp["n_embd"],
        "intermediate_size": hp["n_ff"],
        "num_attention_heads": hp["n_head"],
        "num_key_value_heads": hp["n_head_kv"],
        "num_hidden_layers": hp["n_layer"],
        "rms_norm_eps": hp["eps"],
        "rope_theta": hp["freq_base"],
        "rope_scaling": None,
        "max_position_embeddings": field_value(reader, "llama.context_length"),
        "vocab_size": len(tokens),
        "tie_word_embeddings": hp["tied"],
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float16",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    build_tokenizer(reader).save(os.path.join(out, "tokenizer.json"))
    tok_config = {
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "add_bos_token": False,
        "chat_template": field_value(reader, "tokenizer.chat_template"),
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
