#!/usr/bin/python3
"""Writes a synthetic Hugging Face-layout checkpoint with Llama-like tensor names and shapes.

    /usr/bin/python3 scripts/make_checkpoint.py OUT_DIR [--dtype BF16] [--shards 1]
        [--layers 2] [--hidden 256] [--intermediate 688] [--vocab 1000] [--seed 0]

OUT_DIR gets what a `transformers` save_pretrained directory holds:
  * model.safetensors (one shard) or model-0000i-of-0000N.safetensors and
    model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"});
  * config.json (LlamaForCausalLM), generation_config.json, tokenizer_config.json.
Tensors, in this order: model.embed_tokens.weight, then per layer self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm and post_attention_layernorm, then model.norm.weight and
lm_head.weight. Values are Gaussian with per-row scales (seeded: the same arguments give the same
bytes); norms are near 1. Shards are cut at tensor boundaries into roughly equal sizes.
--dtype: F32, F16, BF16 or F8_E4M3 (round to nearest, ties to even, saturating at 448).
Prints a JSON summary (files, tensors, parameters, bytes).
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}


def e4m3_table():
    """The value of each of the 256 F8_E4M3 (float8_e4m3fn) codes; NaN for 0x7F/0xFF."""
    vals = np.empty(256, dtype=np.float64)
    for c in range(256):
        s, e, m = c >> 7, (c >> 3) & 0xF, c & 7
        if e == 0xF and m == 7:
            vals[c] = np.nan
        elif e == 0:
            vals[c] = (m / 8.0) * 2.0 ** -6
        else:
            vals[c] = (1 + m / 8.0) * 2.0 ** (e - 7)
        if s:
            vals[c] = -vals[c]
    return vals


def to_e4m3(x):
    table = e4m3_table()
    pos_codes = np.arange(0, 0x7F)  # 0 .. 448, increasing
    pos_vals = table[pos_codes]
    a = np.minimum(np.abs(x.astype(np.float64)), 448.0)
    i = np.clip(np.searchsorted(pos_vals, a), 1, len(pos_vals) - 1)
    lo, hi = pos_vals[i - 1], pos_vals[i]
    pick_hi = (a - lo > hi - a) | ((a - lo == hi - a) & (pos_codes[i] % 2 == 0))
    code = np.where(pick_hi, pos_codes[i], pos_codes[i - 1]).astype(np.uint8)
    return np.where(x < 0, code | 0x80, code).astype(np.uint8)


def encode(x, dtype):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    if dtype == "BF16":
        u = x.view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
        return rounded.astype("<u2").tobytes()
    if dtype == "F8_E4M3":
        return to_e4m3(x).tobytes()
    raise ValueError(dtype)


def tensors(a, rng):
    h, f, v = a.hidden, a.intermediate, a.vocab

    def w(rows, cols, std):
        scale = rng.uniform(0.5, 1.5, size=(rows, 1)).astype(np.float32)
        return rng.standard_normal((rows, cols), dtype=np.float32) * (std * scale)

    yield "model.embed_tokens.weight", w(v, h, 0.02)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{proj}.weight", w(h, h, h ** -0.5)
        yield p + "mlp.gate_proj.weight", w(f, h, h ** -0.5)
        yield p + "mlp.up_proj.weight", w(f, h, h ** -0.5)
        yield p + "mlp.down_proj.weight", w(h, f, f ** -0.5)
        yield p + "input_layernorm.weight", 1 + 0.05 * rng.standard_normal(h, dtype=np.float32)
        yield p + "post_attention_layernorm.weight", 1 + 0.05 * rng.standard_normal(h, dtype=np.float32)
    yield "model.norm.weight", 1 + 0.05 * rng.standard_normal(h, dtype=np.float32)
    yield "lm_head.weight", w(v, h, h ** -0.5)


def write_shard(path, items, dtype):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, arr, data in items:
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(hb)))
        out.write(hb)
        for _, _, data in items:
            out.write(data)
    os.replace(tmp, path)
    return offset


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--dtype", default="BF16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.shards < 1 or min(a.layers, a.hidden, a.intermediate, a.vocab) < 1:
        ap.error("--shards, --layers, --hidden, --intermediate and --vocab must be positive")
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    items = [(n, x, encode(x, a.dtype)) for n, x in tensors(a, rng)]
    total = sum(len(d) for _, _, d in items)
    shards, current, size = [], [], 0
    target = total / a.shards
    for it in items:
        if current and size + len(it[2]) / 2 > target * (len(shards) + 1) and len(shards) < a.shards - 1:
            shards.append(current)
            current = []
        current.append(it)
        size += len(it[2])
    shards.append(current)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_shard(os.path.join(a.out, name), shard, a.dtype)
        weight_map.update({t: name for t, _, _ in shard})
    if n > 1:
        with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    torch_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                   "F8_E4M3": "float8_e4m3fn"}[a.dtype]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": a.hidden, "intermediate_size": a.intermediate,
              "num_hidden_layers": a.layers, "num_attention_heads": max(1, a.hidden // 64),
              "vocab_size": a.vocab, "rms_norm_eps": 1e-5, "torch_dtype": torch_dtype,
              "tie_word_embeddings": False}
    sidecars = {"config.json": config,
                "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2},
                "tokenizer_config.json": {"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}}
    for fname, doc in sidecars.items():
        with open(os.path.join(a.out, fname), "w") as f:
            json.dump(doc, f, indent=2)
    params = sum(x.size for _, x, _ in items)
    json.dump({"files": names, "tensors": len(items), "parameters": int(params),
               "bytes": total, "dtype": a.dtype}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
