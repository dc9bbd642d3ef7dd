#!/usr/bin/python3
"""Python reference numbers for the OCR benchmark (a cross-check for the C++ evaluator).

Usage:
  /usr/bin/python3 scripts/eval_ocr_reference.py [--dir DIR] [--bits 8,4] [--lines N]

DIR (default $CACHE/models/ocr, as made by scripts/fetch_models.sh) must hold ocr_rec.pt,
ocr_cls.pt (scripts/onnx_to_torchscript.py), ocr_eval.safetensors, ocr_eval_labels.json
(scripts/make_ocr_data.py) and ppocr_keys_v1.txt. Needs Debian's python3-torch and numpy.

Metrics:
  character accuracy  1 - sum(Levenshtein(decoded, text)) / sum(len(text)) over the N upright
                      lines (rec_images); greedy CTC decoding: argmax per time step, collapse
                      repeats, drop blank (class 0); class i = keys[i-1], the last class = space
  line accuracy       fraction of lines decoded exactly
  cls accuracy        argmax of the classifier == cls_labels over the 2N cls_images
For FP32 and for each --bits b: weights of rank >= 2 (Conv [out, in/g, kh, kw], MatMul
[in, out]) rounded to nearest, symmetric, per OUTPUT channel (dim 0 of a Conv weight, dim 1 of
a MatMul weight): scale = max|w| / (2^(b-1) - 1), w_q = clamp(round(w / scale)) * scale.
Rank-0/1 tensors (biases, BatchNorm, LayerNorm, scalars) stay FP32.

Output (stdout), one line per configuration, e.g.
  FP32  char_acc 99.70 %  line_acc 96.25 %  cls_acc 99.53 %  (320 lines, 640 cls images, 12.3 s)
  W8    char_acc ...
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np
import torch

PROG = os.path.basename(sys.argv[0])


def cache_dir():
    if os.environ.get("FPXINT_CACHE"):
        return os.environ["FPXINT_CACHE"]
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "fpxint")
    return os.path.join(os.path.expanduser("~"), ".cache", "fpxint")


def read_tensor(path, name):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entry = header[name]
    dtype = {"F32": "<f4", "I64": "<i8"}[entry["dtype"]]
    data = np.memmap(path, dtype=dtype, mode="r", offset=8 + length + entry["data_offsets"][0],
                     shape=tuple(entry["shape"]))
    return torch.from_numpy(np.array(data))


def load_module(path):
    extra = {"fpxint_meta.json": ""}
    module = torch.jit.load(path, _extra_files=extra).eval()
    meta = json.loads(extra["fpxint_meta.json"]) if extra["fpxint_meta.json"] else {"tensors": []}
    return module, meta


def quantize_rtn(module, meta, bits):
    """Per-output-channel symmetric round-to-nearest of every parameter of rank >= 2, in place."""
    # A 2-D MatMul weight is [in, out] in the .pt (the converter records it as transposed
    # relative to safetensors' [out, in]): its output channel is dim 1. Without the converter's
    # metadata, fall back to "every 2-D weight is a MatMul weight", true for these models.
    if meta["tensors"]:
        transposed = {t["torch"] for t in meta["tensors"] if t["transposed_vs_safetensors"]}
    else:
        transposed = {name for name, p in module.named_parameters() if p.dim() == 2}
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() < 2:
                continue
            out_dim = 1 if name in transposed else 0
            w = p.transpose(0, out_dim) if out_dim else p
            rows = w.reshape(w.shape[0], -1)
            scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
            q = (torch.round(rows / scale).clamp(-qmax, qmax) * scale).reshape(w.shape)
            p.copy_(q.transpose(0, out_dim) if out_dim else q)


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def ctc_greedy(probs, charset):
    out, previous = [], -1
    for k in probs.argmax(dim=-1).tolist():
        if k != previous and k != 0:
            out.append(charset[k])
        previous = k
    return "".join(out)


def run_each(module, images):
    with torch.no_grad():
        return [module(images[i:i + 1])[0] for i in range(images.shape[0])]


def evaluate(rec, cls, rec_images, cls_images, cls_labels, texts, charset):
    decoded = [ctc_greedy(p, charset) for p in run_each(rec, rec_images)]
    errors = sum(levenshtein(d, t) for d, t in zip(decoded, texts))
    char_acc = 1.0 - errors / sum(len(t) for t in texts)
    line_acc = sum(d == t for d, t in zip(decoded, texts)) / len(texts)
    predicted = torch.stack([p.argmax() for p in run_each(cls, cls_images)])
    cls_acc = (predicted == cls_labels).double().mean().item()
    return char_acc, line_acc, cls_acc, decoded


def main():
    parser = argparse.ArgumentParser(description="FP32 and RTN-quantized OCR accuracy (reference).")
    parser.add_argument("--dir", default=os.path.join(cache_dir(), "models", "ocr"),
                        help="directory with the models, data and keys (default: %(default)s)")
    parser.add_argument("--bits", default="8,4", help="comma-separated RTN bit widths ('' = none)")
    parser.add_argument("--lines", type=int, default=0, help="use only the first N lines (0 = all)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    def path(name):
        return os.path.join(args.dir, name)

    try:
        with open(path("ppocr_keys_v1.txt"), encoding="utf-8") as f:
            keys = [line.rstrip("\n") for line in f]
        charset = ["<blank>"] + keys + [" "]
        with open(path("ocr_eval_labels.json"), encoding="utf-8") as f:
            texts = json.load(f)["texts"]
        rec_images = read_tensor(path("ocr_eval.safetensors"), "rec_images")
        cls_images = read_tensor(path("ocr_eval.safetensors"), "cls_images")
        cls_labels = read_tensor(path("ocr_eval.safetensors"), "cls_labels")
        if args.lines:
            texts, rec_images = texts[:args.lines], rec_images[:args.lines]
            cls_images, cls_labels = cls_images[:2 * args.lines], cls_labels[:2 * args.lines]
        bits = [int(b) for b in args.bits.split(",") if b]
        if any(b < 2 or b > 16 for b in bits):
            raise ValueError(f"bit widths must be in 2..16, got {bits}")
        for name in ("ocr_rec.pt", "ocr_cls.pt"):
            if not os.path.isfile(path(name)):
                raise OSError(f"{path(name)} not found")
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        sys.exit(f"{PROG}: error: {e} (run scripts/fetch_models.sh first?)")

    for config in ["FP32"] + [f"W{b}" for b in bits]:
        start = time.monotonic()
        rec, rec_meta = load_module(path("ocr_rec.pt"))  # fresh copies: quantization is in place
        cls, cls_meta = load_module(path("ocr_cls.pt"))
        if config != "FP32":
            quantize_rtn(rec, rec_meta, int(config[1:]))
            quantize_rtn(cls, cls_meta, int(config[1:]))
        char_acc, line_acc, cls_acc, decoded = evaluate(rec, cls, rec_images, cls_images,
                                                        cls_labels, texts, charset)
        print(f"{config:5s} char_acc {100 * char_acc:6.2f} %  line_acc {100 * line_acc:6.2f} %  "
              f"cls_acc {100 * cls_acc:6.2f} %  ({len(texts)} lines, {len(cls_labels)} cls images, "
              f"{time.monotonic() - start:.1f} s)  e.g. {decoded[0]!r}", flush=True)


if __name__ == "__main__":
    main()
