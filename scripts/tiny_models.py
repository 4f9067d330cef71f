#!/usr/bin/env python3
"""Tiny random-weight checkpoints and their reference outputs, written with the reference
implementations (transformers, sentence-transformers, tokenizers), for the architectures no
package ships weights of.

usage: python3 scripts/tiny_models.py [--out model-server/tests/data/tiny] [--corpus FILE ...]
       python3 scripts/tiny_models.py --bge-m3-shaped DIR     (bench/bge_m3.py runs this)

Run it by hand in a virtual environment with the reference libraries:
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.15.0 transformers==5.23.0 \\
        sentence-transformers==6.2.0 tokenizers==0.23.3 pillow==11.3.0
    /tmp/ref/bin/python scripts/tiny_models.py
and commit what it writes; the tests only read the committed files (CI has no torch).

For each model it writes a Hugging Face directory (config.json, model.safetensors in float16,
tokenizer.json, tokenizer_config.json, the sentence-transformers files) and reference.json:
the sentences and, per pooling, the vectors sentence-transformers computes on them.
- xlm-roberta: XLMRobertaModel (hidden 64, 2 layers) with a Unigram (sentencepiece-style)
  tokenizer of about 1,000 pieces trained on the corpus; CLS pooling and normalization as
  BGE-M3 ships, and reference vectors for mean pooling too (as multilingual-e5 ships).
- bert: BertModel of the same size with a WordPiece tokenizer trained on the same corpus; mean
  pooling and normalization as all-MiniLM ships.
- siglip: SiglipModel (both towers 64 wide, 2 layers; 32-pixel images in 8-pixel patches; the
  attention-pooling head) with a Unigram tokenizer that appends </s>, texts padded to 16 tokens
  as SigLIP's processor pads to its maximum; preprocessor_config.json as SigLIP ships it, at 32.
- clip: CLIPModel of the same size with quick-GELU, 24-pixel crops of a 28-pixel shortest edge,
  32-wide projections, and a byte-level BPE tokenizer with <|startoftext|> and <|endoftext|>.
For these two, reference.json holds the sentences, their token ids, the images (the files of
tests/data/images, written by scripts/image_references.py) and the text and image features
transformers computes (before normalisation) on the float16 weights upcast to float32.
`--only siglip clip` writes just those.
The corpus defaults to the license texts every Debian machine has under
/usr/share/common-licenses, the texts the benchmark corpus is cut from.
"""
import argparse
import glob
import json
import os
import random

import torch
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertModel, CLIPConfig, CLIPModel, SiglipConfig, SiglipModel,
                          XLMRobertaConfig, XLMRobertaModel)

SEED = 20261202
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 64, 2, 4, 128
MAX_SEQ = 128
VOCAB = 1000

SENTENCES = [
    "Kiln keeps pods out of endpoints until the model is warm.",
    "The licensor grants you a perpetual, worldwide, non-exclusive license.",
    "a",
    "",
    "Redistribution and use in source and binary forms, with or without modification, are permitted.",
    "Der Lizenzgeber gewährt Ihnen eine weltweite, gebührenfreie Lizenz.",
    "Le concédant vous accorde une licence mondiale et gratuite.",
    "模型在预热之前不接收流量。",
    "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND!!!",
    "tabs\tand\nnewlines   and   spaces",
    # Longer than MAX_SEQ tokens: truncated at the model's limit.
    " ".join(["Each contributor grants a patent license to make, use and sell the work."] * 16),
]


def corpus_lines(paths):
    lines = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = " ".join(line.split())
                if len(line) > 20:
                    lines.append(line)
    return lines


def unigram_tokenizer(lines):
    """A sentencepiece-style Unigram tokenizer with XLM-RoBERTa's special tokens and ids."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(r"\s+", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3], "XLM-R ids of <s> <pad> </s> <unk>"
    return tok


def wordpiece_tokenizer(lines):
    """A BERT-style WordPiece tokenizer (lower case, [CLS] ... [SEP])."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials)
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return tok


def sentence_transformers_files(out, pooling, normalize):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
    write_json(os.path.join(out, "modules.json"), modules)
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    write_json(os.path.join(out, "1_Pooling", "config.json"), pooling_config(pooling))
    write_json(os.path.join(out, "sentence_bert_config.json"), {"max_seq_length": MAX_SEQ, "do_lower_case": False})


def pooling_config(pooling):
    return {
        "word_embedding_dimension": HIDDEN,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.write("\n")


def references(out, poolings):
    """Vectors sentence-transformers computes for SENTENCES, per pooling (the directory's own
    pooling first), on the float16 weights as saved (upcast to float32, as Kiln loads them)."""
    result = {"sentences": SENTENCES, "vectors": {}, "tokens": []}
    own = json.load(open(os.path.join(out, "1_Pooling", "config.json")))
    for pooling in poolings:
        write_json(os.path.join(out, "1_Pooling", "config.json"), pooling_config(pooling))
        st = SentenceTransformer(out, device="cpu")
        st.float()
        vectors = st.encode(SENTENCES, convert_to_numpy=True, batch_size=4)
        result["vectors"][pooling] = [[round(float(x), 7) for x in v] for v in vectors]
    write_json(os.path.join(out, "1_Pooling", "config.json"), own)
    st = SentenceTransformer(out, device="cpu")
    for s in SENTENCES:
        result["tokens"].append(st.tokenizer(s, truncation=True, max_length=MAX_SEQ)["input_ids"])
    write_json(os.path.join(out, "reference.json"), result)


def tokenizer_config(out, special):
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_SEQ,
        **special,
    })


def xlm_roberta(out, lines):
    os.makedirs(out, exist_ok=True)
    tok = unigram_tokenizer(lines)
    tok.save(os.path.join(out, "tokenizer.json"))
    tokenizer_config(out, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                           "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"})
    config = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, hidden_act="gelu",
        max_position_embeddings=MAX_SEQ + 2, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, layer_norm_eps=1e-5,
    )
    torch.manual_seed(SEED)
    model = XLMRobertaModel(config, add_pooling_layer=False)
    randomize(model)
    model.half().save_pretrained(out, safe_serialization=True)
    sentence_transformers_files(out, "cls", normalize=True)
    references(out, ["cls", "mean"])


def bert(out, lines):
    os.makedirs(out, exist_ok=True)
    tok = wordpiece_tokenizer(lines)
    tok.save(os.path.join(out, "tokenizer.json"))
    tokenizer_config(out, {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                           "mask_token": "[MASK]", "do_lower_case": True})
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, hidden_act="gelu",
        max_position_embeddings=MAX_SEQ, type_vocab_size=2, layer_norm_eps=1e-12,
    )
    torch.manual_seed(SEED + 1)
    model = BertModel(config, add_pooling_layer=False)
    randomize(model)
    model.half().save_pretrained(out, safe_serialization=True)
    sentence_transformers_files(out, "mean", normalize=True)
    references(out, ["mean", "cls"])


def randomize(model):
    """Larger-than-init weights, so differences in layout (positions, token types, norms)
    move the outputs far more than float16 rounding does."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("LayerNorm.bias") or name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))


TEXT_LEN = 16
IMAGES = ["gradient-97x61.png", "rings-200x120.png", "tall-40x150.png", "alpha-50x30.png", "rings-200x120.jpg"]
TEXTS = [
    "a photo of a dog",
    "Kiln keeps pods out of endpoints until the model is warm.",
    "",
    "THE SOFTWARE IS PROVIDED AS IS",
    # Longer than TEXT_LEN tokens: cut at the limit.
    " ".join(["Each contributor grants a patent license to make, use and sell the work."] * 4),
]


def image_text_references(out, model, tok, processor, pad_id, images_dir):
    """Token ids (padded or cut to TEXT_LEN), text and image features of the float16 weights
    upcast to float32, as the server will compute them."""
    from PIL import Image
    model = model.float().eval()
    # Cut as the tokenizer cuts (its special tokens kept), then padded to the fixed length.
    tok.enable_truncation(TEXT_LEN)
    ids = []
    for text in TEXTS:
        enc = tok.encode(text).ids
        ids.append(enc + [pad_id] * (TEXT_LEN - len(enc)))
    tok.no_truncation()
    with torch.no_grad():
        text = model.get_text_features(input_ids=torch.tensor(ids))
        text = getattr(text, "pooler_output", text)
        pixels = []
        for name in IMAGES:
            with Image.open(os.path.join(images_dir, name)) as img:
                img.load()
                pixels.append(processor(img, return_tensors="pt")["pixel_values"][0])
        image = model.get_image_features(pixel_values=torch.stack(pixels))
        image = getattr(image, "pooler_output", image)
    write_json(os.path.join(out, "reference.json"), {
        "texts": TEXTS, "input_ids": ids, "images": IMAGES,
        "text_embeds": [[round(float(x), 7) for x in v] for v in text],
        "image_embeds": [[round(float(x), 7) for x in v] for v in image],
    })


def siglip(out, lines, images_dir):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    os.makedirs(out, exist_ok=True)
    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(r"\s+", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.save(os.path.join(out, "tokenizer.json"))
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": TEXT_LEN,
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    })
    config = SiglipConfig(
        text_config={"vocab_size": tok.get_vocab_size(), "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
                     "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "max_position_embeddings": TEXT_LEN,
                     "pad_token_id": pad, "eos_token_id": eos, "bos_token_id": None},
        vision_config={"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
                       "num_attention_heads": HEADS, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(SEED + 3)
    model = SiglipModel(config)
    randomize(model)
    model.half().save_pretrained(out, safe_serialization=True)
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=3, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3)
    processor.save_pretrained(out)
    image_text_references(out, model, tok, processor, pad, images_dir)


def clip(out, lines, images_dir):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    os.makedirs(out, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(r"\s+", " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tok.save(os.path.join(out, "tokenizer.json"))
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": TEXT_LEN,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    })
    # eos_token_id other than 2: the pooled token is the first <|endoftext|>, as current CLIP
    # checkpoints declare (2 would select the legacy argmax of the ids).
    assert eos != 2
    config = CLIPConfig(
        text_config={"vocab_size": tok.get_vocab_size(), "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
                     "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "max_position_embeddings": TEXT_LEN,
                     "hidden_act": "quick_gelu", "pad_token_id": eos, "bos_token_id": bos, "eos_token_id": eos},
        vision_config={"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
                       "num_attention_heads": HEADS, "image_size": 24, "patch_size": 8, "hidden_act": "quick_gelu"},
        projection_dim=32,
    )
    torch.manual_seed(SEED + 4)
    model = CLIPModel(config)
    randomize(model)
    model.half().save_pretrained(out, safe_serialization=True)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}, resample=3,
                                      do_center_crop=True)
    processor.save_pretrained(out)
    image_text_references(out, model, tok, processor, eos, images_dir)


def bge_m3_shaped(out, lines):
    """For benchmarks, not committed: XLM-RoBERTa with BGE-M3's shape (1024 wide, 24 layers, 16
    heads, 8194 positions, 250,002 ids) and random weights, its sentence-transformers files (CLS
    pooling, normalized, 8192 tokens) and the small Unigram tokenizer (speed does not depend on
    the values, and both sides of a comparison use the same tokenizer)."""
    os.makedirs(out, exist_ok=True)
    tok = unigram_tokenizer(lines)
    tok.save(os.path.join(out, "tokenizer.json"))
    tokenizer_config(out, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                           "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"})
    config = XLMRobertaConfig(
        vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, hidden_act="gelu", max_position_embeddings=8194, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
    )
    torch.manual_seed(SEED + 2)
    model = XLMRobertaModel(config, add_pooling_layer=False)
    model.half().save_pretrained(out, safe_serialization=True)
    sentence_transformers_files(out, "cls", normalize=True)
    write_json(os.path.join(out, "sentence_bert_config.json"), {"max_seq_length": 8192, "do_lower_case": False})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "model-server", "tests", "data", "tiny"))
    ap.add_argument("--corpus", nargs="*", default=sorted(glob.glob("/usr/share/common-licenses/*")))
    ap.add_argument("--bge-m3-shaped", metavar="DIR", help="write only the full-size random checkpoint, to DIR")
    ap.add_argument("--only", nargs="*", choices=["xlm-roberta", "bert", "siglip", "clip"],
                    default=["xlm-roberta", "bert", "siglip", "clip"])
    a = ap.parse_args()
    random.seed(SEED)
    lines = corpus_lines([p for p in a.corpus if os.path.isfile(p)])
    assert len(lines) > 1000, f"only {len(lines)} corpus lines"
    if a.bge_m3_shaped:
        bge_m3_shaped(a.bge_m3_shaped, lines)
        print(f"wrote {a.bge_m3_shaped}")
        return
    images = os.path.join(os.path.dirname(__file__), "..", "model-server", "tests", "data", "images")
    writers = {
        "xlm-roberta": lambda: xlm_roberta(os.path.join(a.out, "xlm-roberta"), lines),
        "bert": lambda: bert(os.path.join(a.out, "bert"), lines),
        "siglip": lambda: siglip(os.path.join(a.out, "siglip"), lines, images),
        "clip": lambda: clip(os.path.join(a.out, "clip"), lines, images),
    }
    for name in a.only:
        writers[name]()
    print(f"wrote {', '.join(a.only)} to {a.out}")


if __name__ == "__main__":
    main()
