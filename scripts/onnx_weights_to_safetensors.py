#!/usr/bin/python3
"""Extract the float weights of an ONNX model into a safetensors file.

Usage: /usr/bin/python3 scripts/onnx_weights_to_safetensors.py IN.onnx OUT.safetensors

Needs only Debian's python3-onnx and python3-numpy (there is no `safetensors` package on Debian,
so the format is written by hand). Always run it with /usr/bin/python3: the `python3` on PATH may
be a pyenv interpreter that cannot import Debian's packages.

Which tensors: graph initializers and the `value` tensors of Constant nodes (paddle2onnx, which
made the PaddleOCR models, stores every weight in Constant nodes). Kept: float16/32/64 tensors
of rank >= 1 with at least one element. Skipped: scalars and integer/bool tensors (shape
constants, Reshape targets, Slice bounds, ...).

Names (stable, unique): a tensor is named after the first consumer (in node order) that gives
it one of these roles:
  input 1 of Conv / MatMul / Gemm        -> <node>.weight   (a 2-D MatMul weight is stored
  input 2 of Conv / Gemm                 -> <node>.bias      transposed, as [out, in] like
                                                             torch.nn.Linear: dim 0 is always the
                                                             output channel)
  inputs 1..4 of BatchNormalization      -> <node>.bn_scale / .bn_bias / .bn_mean / .bn_var
where <node> is the node's name, or `<op_type>_<k>` (the k-th node of that op type, from 0) when
the node is unnamed.
Any other tensor is named after its ONNX value name. Names are sanitized to [A-Za-z0-9._-];
a name already taken gets a `_2`, `_3`, ... suffix.

Output layout (safetensors):
  u64 little-endian N | N bytes of UTF-8 JSON header, space-padded so that 8 + N is a multiple
  of 8 | data section.
  Header: {"__metadata__": {"format": "pt", "source": <onnx basename>, "source_sha256": <hex>},
           "<name>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
  Tensors are stored by element size (F64, F32, F16: keeps each one aligned), then in the order
  of their first use in the graph (node, then input position; unused ones last), so a layer's
  weight, bias and BatchNorm tensors sit together (all of them, in the F32-only OCR models), as raw
  little-endian C-contiguous bytes, back to back; offsets are relative to the data section.
  The same input always gives byte-identical output. The file is written atomically.
"""
import argparse
import json
import os
import re
import struct
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_write import sha256_of  # noqa: E402

# numpy dtype -> safetensors dtype string, for the dtypes we keep.
DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}

# (op_type, input index) -> role suffix used in the tensor name.
ROLES = {
    ("Conv", 1): "weight", ("Conv", 2): "bias",
    ("MatMul", 1): "weight",
    ("Gemm", 1): "weight", ("Gemm", 2): "bias",
    ("BatchNormalization", 1): "bn_scale", ("BatchNormalization", 2): "bn_bias",
    ("BatchNormalization", 3): "bn_mean", ("BatchNormalization", 4): "bn_var",
}

UNUSED = (1 << 62, 0)  # sort key for tensors no node consumes: after every used one


def sanitize(name):
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def collect_sources(graph):
    """Returns [(value_name, array)] for initializers, then Constant nodes, in file order."""
    out = [(t.name, numpy_helper.to_array(t)) for t in graph.initializer]
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value":  # value_float/value_ints/... are scalars or shapes
                out.append((node.output[0], numpy_helper.to_array(attr.t)))
    return out


def keep(arr):
    return arr.dtype in DTYPES and arr.ndim >= 1 and arr.size > 0


def consumer_uses(graph):
    """Maps value name -> [((node index, input position), role name or None)] in node order."""
    uses = {}
    per_op = {}
    for index, node in enumerate(graph.node):
        k = per_op.get(node.op_type, 0)
        per_op[node.op_type] = k + 1
        label = sanitize(node.name) if node.name else f"{node.op_type}_{k}"
        for pos, value in enumerate(node.input):
            if not value:
                continue  # omitted optional input
            role = ROLES.get((node.op_type, pos))
            uses.setdefault(value, []).append(
                ((index, pos), f"{label}.{role}" if role else None, node.op_type))
    return uses


def name_tensors(sources, uses):
    """Returns [(unique name, array)] in storage order; see the module docstring."""
    entries = []
    for order, (value, arr) in enumerate(sources):
        if not keep(arr):
            continue
        value_uses = uses.get(value, [])
        first_use = value_uses[0][0] if value_uses else UNUSED
        role = next(((n, op) for _, n, op in value_uses if n), None)
        if role and role[1] == "MatMul" and arr.ndim == 2:
            # ONNX MatMul multiplies x[.., in] @ W[in, out]; store W as [out, in], the layout of
            # torch.nn.Linear, so that dim 0 is the output channel as for Conv weights.
            arr = np.ascontiguousarray(arr.T)
        entries.append((first_use, order, role[0] if role else sanitize(value), arr))
    # Wider dtypes first (as the reference safetensors writer does): with the data section
    # starting 8-aligned, every tensor is then aligned to its element size without padding.
    entries.sort(key=lambda e: (-e[3].dtype.itemsize, e[0], e[1]))

    taken = {"__metadata__"}
    named = []
    for _, _, name, arr in entries:
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique)
        named.append((unique, arr))
    return named


def build_header(named, metadata):
    """Returns (8-byte length + padded JSON header, size of the data section)."""
    header = {"__metadata__": metadata}
    offset = 0
    for name, arr in named:
        size = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": DTYPES[arr.dtype], "shape": [int(d) for d in arr.shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    # Insertion-ordered dict + fixed separators: the same tensors always give the same bytes.
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_atomically(path, header, named):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the usual mode of a new file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for _, arr in named:
                little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
                f.write(np.ascontiguousarray(little).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def main():
    parser = argparse.ArgumentParser(
        description="Write the float weights of an ONNX model (initializers and Constant nodes) "
                    "to a safetensors file.")
    parser.add_argument("onnx_path", metavar="IN.onnx")
    parser.add_argument("out_path", metavar="OUT.safetensors")
    args = parser.parse_args()
    prog = os.path.basename(sys.argv[0])

    try:
        source_sha256 = sha256_of(args.onnx_path)
        model = onnx.load(args.onnx_path)
    except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
        sys.exit(f"{prog}: cannot read ONNX model {args.onnx_path}: {e}")

    graph = model.graph
    named = name_tensors(collect_sources(graph), consumer_uses(graph))
    if not named:
        sys.exit(f"{prog}: no float weight tensors found in {args.onnx_path}")

    metadata = {"format": "pt", "source": os.path.basename(args.onnx_path),
                "source_sha256": source_sha256}
    header, data_bytes = build_header(named, metadata)
    try:
        write_atomically(args.out_path, header, named)
    except OSError as e:
        sys.exit(f"{prog}: cannot write {args.out_path}: {e}")

    params = sum(arr.size for _, arr in named)
    print(f"{prog}: {os.path.basename(args.onnx_path)} -> {args.out_path}: {len(named)} tensors, "
          f"{params} parameters, {len(header) + data_bytes} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
