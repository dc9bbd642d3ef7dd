#!/usr/bin/python3
"""Check a converted TorchScript model against an independent numpy evaluation of its ONNX graph.

Usage:
  /usr/bin/python3 tests/integration/check_onnx_conversion.py MODEL.onnx MODEL.pt INPUTS.safetensors
      [--tensor NAME] [--indices 0,1,-1] [--tolerance 1e-4] [--log-tolerance 1e-3]

What it does: evaluates the ONNX graph with its own float64 numpy implementation of every op
(convolution by im2col -- a strided sliding-window view -- and einsum, pooling over window
views, BatchNormalization from its formula, opset-9 Softmax semantics, ...), with the weights
read from the ONNX file itself, on a few real images, and compares the result with the
TorchScript module (made by scripts/onnx_to_torchscript.py) run by torch on the same images.
Nothing of the converter is imported; torch is used only to run the .pt, after the numpy
evaluation. It also checks that the .pt keeps every float weight of the ONNX model as a module
parameter or buffer (none baked into the graph as a constant).

Inputs: rank-4 F32 tensor NAME of INPUTS.safetensors (scripts/make_ocr_data.py output); by
default the one whose [C, H, W] matches the input shape recorded in the .pt ("fpxint_meta.json"
extra file: rec_images for the recognizer, cls_images for the classifier). --indices picks the
images (Python-style, negative from the end); each is run alone, as [1, C, H, W].

Both models end in a softmax, and the classifier's is saturated (p ~ 1 - 1e-8), so a
probability difference alone would hide errors: the check also compares log-probabilities
wherever the numpy probability exceeds 1e-20 (equivalent to comparing the logits up to a shift).

Output: one line per image and a summary line on stdout, e.g.
  check_onnx_conversion.py: ch_PP-OCRv4_rec_infer.onnx vs ocr_rec.pt: 3 images of rec_images,
  max |numpy - torch| = 2.4e-06 (output scale 1, limit 1.0e-04), max |d log p| = 9.1e-05
  (limit 1.0e-03), argmax agreement 120/120: OK
Exit status 0 if max |numpy - torch| <= tolerance * max(1, max |numpy|) and max |d log p| <=
log-tolerance; 1 (with a message on stderr) on a mismatch or any error.
"""
import argparse
import json
import os
import struct
import sys
import zipfile

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

PROG = os.path.basename(sys.argv[0])


class CheckError(Exception):
    pass


# ---- safetensors input ------------------------------------------------------------------

def read_safetensors_header(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return header, 8 + length


def load_images(path, name, indices):
    header, base = read_safetensors_header(path)
    if name not in header:
        raise CheckError(f"{path} has no tensor {name!r}")
    entry = header[name]
    if entry["dtype"] != "F32" or len(entry["shape"]) != 4:
        raise CheckError(f"{path}: {name} is {entry['dtype']} {entry['shape']}, expected F32 rank 4")
    data = np.memmap(path, dtype="<f4", mode="r", offset=base + entry["data_offsets"][0],
                     shape=tuple(entry["shape"]))
    n = data.shape[0]
    picked = sorted({i % n for i in indices if -n <= i < n})
    if not picked:
        raise CheckError(f"no valid index among {indices} for {name} with {n} images")
    return picked, [np.array(data[i:i + 1]) for i in picked]


def pt_input_shape(pt_path):
    """The input shape recorded by the converter, read from the .pt zip without torch."""
    with zipfile.ZipFile(pt_path) as z:
        for member in z.namelist():
            if member.endswith("/extra/fpxint_meta.json"):
                return json.loads(z.read(member))["input_shape"]
    return None


# ---- the numpy ONNX evaluator -----------------------------------------------------------

def attrs_of(node):
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def conv2d(x, w, b, a):
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise CheckError("Conv auto_pad is not supported")
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        raise CheckError("Conv dilations != 1 are not supported")
    top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
    sh, sw = a.get("strides", [1, 1])
    group = int(a.get("group", 1))
    n, c = x.shape[:2]
    out_c, c_per_group, kh, kw = w.shape
    if c != c_per_group * group or out_c % group:
        raise CheckError(f"Conv shapes do not match: x {x.shape}, w {w.shape}, group {group}")
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    # im2col as a view: [N, C, OH, OW, kh, kw]
    cols = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    oh, ow = cols.shape[2:4]
    cols = cols.reshape(n, group, c_per_group, oh, ow, kh, kw)
    wg = w.reshape(group, out_c // group, c_per_group, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", cols, wg, optimize=True).reshape(n, out_c, oh, ow)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y


def pool_windows(x, a, pad_value):
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "") or a.get("ceil_mode", 0):
        raise CheckError("pool auto_pad / ceil_mode are not supported")
    top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
    kh, kw = a["kernel_shape"]
    sh, sw = a.get("strides", [1, 1])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)),
                    constant_values=pad_value)
    return sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def average_pool(x, a):
    sums = pool_windows(x, a, 0.0).sum(axis=(4, 5))
    if a.get("count_include_pad", 0):
        return sums / (a["kernel_shape"][0] * a["kernel_shape"][1])
    ones = np.ones((1, 1) + x.shape[2:])
    counts = pool_windows(ones, a, 0.0).sum(axis=(4, 5))
    return sums / counts


def softmax_opset9(x, a):
    axis = int(a.get("axis", 1)) % x.ndim
    flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    e = np.exp(flat - flat.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).reshape(x.shape)


def onnx_slice(x, a):
    out = x
    index = [slice(None)] * x.ndim
    for axis, start, end in zip(a.get("axes", range(len(a["starts"]))), a["starts"], a["ends"]):
        index[axis % x.ndim] = slice(start, end)  # numpy clamps like ONNX for step 1
    return out[tuple(index)]


def onnx_reshape(x, shape):
    target = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape.tolist())]
    return x.reshape(target)


CASTS = {1: np.float64, 6: np.int32, 7: np.int64, 9: np.bool_, 11: np.float64}


def evaluate_node(op, ins, a):
    if op == "Conv":
        return conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)
    if op == "BatchNormalization":
        x, scale, bias, mean, var = ins
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = float(np.float32(a.get("epsilon", 1e-5)))
        return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
                * scale.reshape(shape) + bias.reshape(shape))
    if op == "Relu":
        return np.maximum(ins[0], 0.0)
    if op == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-ins[0]))
    if op == "HardSigmoid":
        alpha = float(np.float32(a.get("alpha", 0.2)))
        beta = float(np.float32(a.get("beta", 0.5)))
        return np.clip(alpha * ins[0] + beta, 0.0, 1.0)
    if op == "Clip":
        if len(ins) > 1:
            raise CheckError("Clip with min/max inputs is not supported")
        return np.clip(ins[0], a.get("min", -np.inf), a.get("max", np.inf))
    if op in ("Add", "Sub", "Mul", "Div", "Pow"):
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
              "Pow": np.power}[op]
        if op == "Div" and ins[0].dtype.kind in "iu":
            raise CheckError("integer Div is not supported")
        return fn(ins[0], ins[1])
    if op == "Sqrt":
        return np.sqrt(ins[0])
    if op == "MatMul":
        return np.matmul(ins[0], ins[1])
    if op == "GlobalAveragePool":
        return ins[0].mean(axis=(2, 3), keepdims=True)
    if op == "AveragePool":
        return average_pool(ins[0], a)
    if op == "MaxPool":
        if a.get("storage_order", 0) or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise CheckError("MaxPool storage_order/dilations are not supported")
        return pool_windows(ins[0], a, -np.inf).max(axis=(4, 5))
    if op == "ReduceMean":
        axes = tuple(a.get("axes", range(ins[0].ndim)))
        return ins[0].mean(axis=axes, keepdims=bool(a.get("keepdims", 1)))
    if op == "Softmax":
        return softmax_opset9(ins[0], a)
    if op == "Transpose":
        return np.transpose(ins[0], a.get("perm"))
    if op == "Reshape":
        return onnx_reshape(ins[0], ins[1])
    if op == "Squeeze":
        return np.squeeze(ins[0], axis=tuple(a["axes"]))
    if op == "Slice":
        if len(ins) > 1:
            raise CheckError("Slice with starts/ends inputs is not supported")
        return onnx_slice(ins[0], a)
    if op == "Concat":
        return np.concatenate(ins, axis=int(a["axis"]))
    if op == "Shape":
        return np.array(ins[0].shape, dtype=np.int64)
    if op == "Cast":
        if int(a["to"]) not in CASTS:
            raise CheckError(f"Cast to ONNX type {a['to']} is not supported")
        return ins[0].astype(CASTS[int(a["to"])])
    raise CheckError(f"op {op} is not implemented by the numpy evaluator")


class NumpyOnnx:
    """Float64 evaluation of an ONNX graph (float constants are widened to float64)."""

    def __init__(self, model):
        graph = model.graph
        self.constants = {}
        for t in graph.initializer:
            self.constants[t.name] = self._widen(numpy_helper.to_array(t))
        self.nodes = []
        for node in graph.node:
            a = attrs_of(node)
            if node.op_type == "Constant":
                if "value" not in a:
                    raise CheckError("Constant without a 'value' attribute")
                self.constants[node.output[0]] = self._widen(numpy_helper.to_array(a["value"]))
            else:
                self.nodes.append((node.op_type, list(node.input), list(node.output), a))
        self.inputs = [i.name for i in graph.input if i.name not in self.constants]
        self.outputs = [o.name for o in graph.output]

    @staticmethod
    def _widen(arr):
        return arr.astype(np.float64) if arr.dtype.kind == "f" else arr

    def float_weight_count(self):
        """Float constants of rank >= 1: the tensors the .pt must hold as parameters/buffers."""
        return sum(1 for v in self.constants.values()
                   if v.dtype.kind == "f" and v.ndim >= 1 and v.size > 0)

    def __call__(self, x):
        env = dict(self.constants)
        env[self.inputs[0]] = x.astype(np.float64)
        for op, ins, outs, a in self.nodes:
            try:
                env[outs[0]] = evaluate_node(op, [env[i] if i else None for i in ins], a)
            except CheckError:
                raise
            except Exception as e:
                raise CheckError(f"{op} -> {outs[0]}: {e}") from e
        return env[self.outputs[0]]


# ---- main -------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(
        description="Compare a TorchScript conversion with a numpy float64 evaluation of the ONNX "
                    "graph on real images.")
    parser.add_argument("onnx_path", metavar="MODEL.onnx")
    parser.add_argument("pt_path", metavar="MODEL.pt")
    parser.add_argument("inputs_path", metavar="INPUTS.safetensors")
    parser.add_argument("--tensor", help="input tensor name (default: matched to the .pt's shape)")
    parser.add_argument("--indices", default="0,1,-1",
                        help="comma-separated image indices (default 0,1,-1)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="allowed max |numpy - torch| relative to max(1, output scale)")
    parser.add_argument("--log-tolerance", type=float, default=1e-3,
                        help="allowed max |log p_numpy - log p_torch| where p_numpy > 1e-20")
    args = parser.parse_args()

    try:
        indices = [int(v) for v in args.indices.split(",")]
        name = args.tensor
        if name is None:
            shape = pt_input_shape(args.pt_path)
            if shape is None:
                raise CheckError(f"{args.pt_path} records no input shape; pass --tensor")
            header, _ = read_safetensors_header(args.inputs_path)
            matches = [k for k, v in header.items() if k != "__metadata__"
                       and len(v.get("shape", [])) == 4 and v["shape"][1:] == shape[1:]]
            if len(matches) != 1:
                raise CheckError(f"no single tensor of shape [*, {shape[1:]}] in "
                                 f"{args.inputs_path} ({matches}); pass --tensor")
            name = matches[0]
        picked, images = load_images(args.inputs_path, name, indices)

        evaluator = NumpyOnnx(onnx.load(args.onnx_path))
        references = [evaluator(x) for x in images]

        import torch  # only now: torch runs the .pt and nothing else
        torch.set_num_threads(2)
        module = torch.jit.load(args.pt_path).eval()
        held = len(list(module.parameters())) + len(list(module.buffers()))
        expected = evaluator.float_weight_count()
        if held != expected:
            raise CheckError(f"{args.pt_path} holds {held} parameters+buffers, but the ONNX model "
                             f"has {expected} float weight tensors")
        with torch.no_grad():
            outputs = [module(torch.from_numpy(x)).numpy().astype(np.float64) for x in images]
    except (CheckError, OSError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"{PROG}: error: {e}")

    worst, worst_log, scale, agree, total = 0.0, 0.0, 0.0, 0, 0
    label = f"{os.path.basename(args.onnx_path)} vs {os.path.basename(args.pt_path)}"
    for i, ref, out in zip(picked, references, outputs):
        if ref.shape != out.shape:
            sys.exit(f"{PROG}: MISMATCH {label}: image {i}: output shape {list(out.shape)}, "
                     f"numpy gives {list(ref.shape)}")
        diff = float(np.abs(ref - out).max())
        same = int((ref.argmax(-1) == out.argmax(-1)).sum())
        n = ref.argmax(-1).size
        mask = ref > 1e-20
        log_diff = float(np.abs(np.log(ref[mask]) - np.log(np.maximum(out[mask], 1e-30))).max())
        print(f"{PROG}: {name}[{i}]: max |numpy - torch| = {diff:.2e}, "
              f"max |d log p| (p > 1e-20) = {log_diff:.2e}, argmax agreement {same}/{n}")
        worst, scale = max(worst, diff), max(scale, float(np.abs(ref).max()))
        worst_log = max(worst_log, log_diff)
        agree, total = agree + same, total + n
    limit = args.tolerance * max(1.0, scale)
    ok = worst <= limit and worst_log <= args.log_tolerance
    print(f"{PROG}: {label}: {len(picked)} images of {name}, max |numpy - torch| = {worst:.2e} "
          f"(output scale {scale:.3g}, limit {limit:.1e}), max |d log p| = {worst_log:.2e} "
          f"(limit {args.log_tolerance:.1e}), argmax agreement {agree}/{total}: "
          f"{'OK' if ok else 'MISMATCH'}")
    if not ok:
        sys.exit(f"{PROG}: MISMATCH: {args.pt_path} does not compute what {args.onnx_path} "
                 f"specifies (max |diff| {worst:.2e}, limit {limit:.1e}; max |d log p| "
                 f"{worst_log:.2e}, limit {args.log_tolerance:.1e})")


if __name__ == "__main__":
    main()
