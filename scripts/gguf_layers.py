#!/usr/bin/env python3
"""A GGUF decoder with another number of layers: the first N of SRC's, or SRC's repeated in
order up to N (blk.i is SRC's blk.(i mod its layers)). Metadata is copied with the block count
changed; --token-table re-quantizes token_embd.weight (also the output layer of tied models).

scripts/gpu-check.sh cuts SmolLM2 down to fit a GPU machine's 64 MiB of files, and there
rebuilds a file with the full model's shapes and formats for the bench.

usage: gguf_layers.py SRC DST --layers N [--token-table Q4_0|Q8_0]   (needs gguf-py and numpy)
"""
import argparse
import re

import gguf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--token-table", choices=["Q4_0", "Q8_0"])
    a = ap.parse_args()
    reader = gguf.GGUFReader(a.src)
    arch = reader.fields["general.architecture"].contents()
    have = int(reader.fields[f"{arch}.block_count"].contents())
    writer = gguf.GGUFWriter(a.dst, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = a.layers if field.name == f"{arch}.block_count" else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    layer = re.compile(r"blk\.(\d+)\.")
    out = []  # (name, data, format)
    for t in reader.tensors:
        if layer.match(t.name):
            continue
        if t.name == "token_embd.weight" and a.token_table and t.tensor_type.name != a.token_table:
            kind = gguf.GGMLQuantizationType[a.token_table]
            rows = gguf.quants.dequantize(t.data, t.tensor_type)
            out.append((t.name, gguf.quants.quantize(rows, kind), kind))
        else:
            out.append((t.name, t.data, t.tensor_type))
    for i in range(a.layers):
        source = f"blk.{i % have}."
        out += [(f"blk.{i}." + t.name[len(source):], t.data, t.tensor_type)
                for t in reader.tensors if t.name.startswith(source)]
    for name, data, kind in out:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in out:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    print(f"{a.dst}: {a.layers} layers from {have}")


if __name__ == "__main__":
    main()
