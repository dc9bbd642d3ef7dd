#!/usr/bin/python3
"""Convert an ONNX model (the PaddleOCR cls/rec models) to a traced TorchScript module.

Usage:
  /usr/bin/python3 scripts/onnx_to_torchscript.py IN.onnx OUT.pt --input-shape 1,3,48,320
  (recognizer: 1,3,48,320; orientation classifier: 1,3,48,192)

Needs Debian's python3-onnx, python3-numpy and python3-torch; always run it with
/usr/bin/python3 (the `python3` on PATH may be a pyenv interpreter without them).

How: OnnxGraphModule is a torch.nn.Module that interprets the ONNX graph node by node. It is
traced once with torch.jit.trace at --input-shape (torch.jit.freeze is NOT applied) and saved
with torch.jit.save, atomically. Shape arithmetic (Shape/Cast/Slice/Concat feeding Reshape) is
evaluated while tracing, so the module is specialized to the traced [C, H, W], but NOT to the
batch: before tracing, the graph is run eagerly at batch 1 and batch 2, and every Reshape
target entry that doubles with the batch (and only those; any other change is an error) is
traced as input.size(0) * its batch-1 value. The .pt therefore takes any batch N >= 1 of
[N, C, H, W]; the conversion checks batch 3 against three batch-1 runs.

Weights. Every float tensor that scripts/onnx_weights_to_safetensors.py writes to safetensors
(rank >= 1, F16/F32/F64, from initializers or Constant nodes) becomes a module attribute, so
it shows up in the TorchScript module instead of being baked into the graph as a constant:
  BatchNormalization mean / variance            -> buffer     (named_buffers)
  everything else (Conv/MatMul weights, biases,
  BN scale/bias, LayerNorm affine, scalars [1]) -> nn.Parameter, requires_grad=False
BatchNormalization stays a real aten::batch_norm (not folded into the conv). A Conv weight is
the ONNX [out, in/group, kh, kw] tensor used by aten::_convolution. A 2-D MatMul weight keeps
the ONNX layout [in, out] and is used as torch.matmul(x, W) (aten::matmul against the
parameter), so its OUTPUT channel is dim 1 here -- whereas the safetensors file stores the
same weight transposed, as [out, in].

Names. The torch name is the safetensors name (same rules, computed by importing
scripts/onnx_weights_to_safetensors.py and cross-checked against it) with every character
outside [A-Za-z0-9_] replaced by '_' (torch forbids '.' in attribute names):
  safetensors "p2o.Conv.0.weight"               -> torch "p2o_Conv_0_weight"
  safetensors "p2o.BatchNormalization.0.bn_mean" -> torch buffer "p2o_BatchNormalization_0_bn_mean"
  safetensors "layer_norm_43.w_0"               -> torch "layer_norm_43_w_0"
The exact mapping is stored in the .pt archive as the extra file "fpxint_meta.json"
(torch::jit::load(path, device, extra_files) / torch.jit.load(path, _extra_files=...)):
  {"format": "fpxint-onnx-torchscript/1", "source": <onnx basename>, "source_sha256": <hex>,
   "input_shape": ["N",3,48,320], "output_shape": ["N", ...],
   "tensors": [{"torch": "p2o_Conv_0_weight", "safetensors": "p2o.Conv.0.weight",
                "onnx_value": <ONNX value name>, "kind": "parameter" | "buffer",
                "shape": [...], "transposed_vs_safetensors": false}, ...]}
in safetensors storage order.

Output: OUT.pt (TorchScript archive); one summary line on stderr. Exit status 1 with a message
on any error (unreadable model, unsupported op, naming mismatch, trace mismatch).
"""
import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_write import sha256_of  # noqa: E402

PROG = os.path.basename(sys.argv[0])
META_FILE = "fpxint_meta.json"
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))

# ONNX TensorProto data type -> numpy dtype, for Cast (only what shape arithmetic needs).
CAST_TO = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 11: np.float64}
TORCH_DTYPES = {np.float32: torch.float32, np.int32: torch.int32, np.int64: torch.int64,
                np.bool_: torch.bool, np.float64: torch.float64}


class ConversionError(Exception):
    pass


def load_weight_namer():
    """Imports scripts/onnx_weights_to_safetensors.py: its naming rules are the reference."""
    path = os.path.join(SCRIPT_DIR, "onnx_weights_to_safetensors.py")
    spec = importlib.util.spec_from_file_location("onnx_weights_to_safetensors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weight_names(graph, st):
    """Returns [(safetensors name, onnx value name, array as in ONNX, transposed)] in storage order.

    Mirrors onnx_weights_to_safetensors.name_tensors() but keeps the ONNX value name, then checks
    the result against name_tensors() itself, so the two scripts cannot silently disagree.
    """
    sources = st.collect_sources(graph)
    uses = st.consumer_uses(graph)
    entries = []
    for order, (value, arr) in enumerate(sources):
        if not st.keep(arr):
            continue
        value_uses = uses.get(value, [])
        first_use = value_uses[0][0] if value_uses else st.UNUSED
        role = next(((n, op) for _, n, op in value_uses if n), None)
        transposed = bool(role and role[1] == "MatMul" and arr.ndim == 2)
        name = role[0] if role else st.sanitize(value)
        entries.append((first_use, order, name, value, arr, transposed))
    entries.sort(key=lambda e: (-e[4].dtype.itemsize, e[0], e[1]))
    taken = {"__metadata__"}
    out = []
    for _, _, name, value, arr, transposed in entries:
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique)
        out.append((unique, value, arr, transposed))

    reference = st.name_tensors(sources, uses)
    if len(reference) != len(out) or any(
            r_name != name or not np.array_equal(r_arr, arr.T if transposed else arr)
            for (r_name, r_arr), (name, _, arr, transposed) in zip(reference, out)):
        raise ConversionError("tensor naming disagrees with onnx_weights_to_safetensors.py "
                              "(the two scripts must be updated together)")
    return out


def torch_name(safetensors_name):
    return re.sub(r"[^A-Za-z0-9_]", "_", safetensors_name)


def attributes(node):
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


class OnnxGraphModule(torch.nn.Module):
    """Interprets an ONNX graph with torch ops; weights are parameters/buffers (see top).

    Values during forward() are either torch tensors (depend on the input or on a weight) or
    numpy arrays ("static": shape arithmetic and scalar constants), computed eagerly so that
    the traced graph contains only the tensor computation.
    """

    def __init__(self, model, weights):
        super().__init__()
        graph = model.graph
        self.value_to_attr = {}
        self.meta_tensors = []
        used_names = set()
        for st_name, value, arr, transposed in weights:
            name = torch_name(st_name)
            if name in used_names or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ConversionError(f"tensor {st_name!r}: torch name {name!r} is taken or invalid")
            used_names.add(name)
            tensor = torch.from_numpy(np.array(arr, copy=True))  # ONNX layout, own memory
            is_buffer = st_name.endswith((".bn_mean", ".bn_var"))
            if is_buffer:
                self.register_buffer(name, tensor)
            else:
                self.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
            self.value_to_attr[value] = name
            self.meta_tensors.append({
                "torch": name, "safetensors": st_name, "onnx_value": value,
                "kind": "buffer" if is_buffer else "parameter",
                "shape": [int(d) for d in arr.shape], "transposed_vs_safetensors": transposed})

        initializer_names = {t.name for t in graph.initializer}
        self.static = {}  # constants that are not weights: shapes, axes, float scalars
        for t in graph.initializer:
            if t.name not in self.value_to_attr:
                self.static[t.name] = numpy_helper.to_array(t)
        self.nodes = []
        for node in graph.node:
            if node.op_type == "Constant":
                if node.output[0] not in self.value_to_attr:
                    attrs = attributes(node)
                    if "value" not in attrs:
                        raise ConversionError(f"Constant {node.output[0]}: only 'value' is supported")
                    self.static[node.output[0]] = numpy_helper.to_array(attrs["value"])
                continue
            if node.domain not in ("", "ai.onnx"):
                raise ConversionError(f"node {node.name or node.op_type}: domain {node.domain!r}")
            self.nodes.append((node.op_type, node.name, list(node.input), list(node.output),
                               attributes(node)))
        unsupported = sorted({op for op, *_ in self.nodes if op not in OPS})
        if unsupported:
            raise ConversionError(f"unsupported ONNX op(s): {', '.join(unsupported)}")
        self.inputs = [i.name for i in graph.input if i.name not in initializer_names]
        self.outputs = [o.name for o in graph.output]
        if len(self.inputs) != 1:
            raise ConversionError(f"expected one graph input, got {self.inputs}")
        # Reshape targets seen per node (recording) and, once learned, the entries that scale
        # with the batch (node index -> set of positions); see find_batch_entries().
        self.recorded = None
        self.batch_entries = {}

    def find_batch_entries(self, sample):
        """Runs the graph eagerly at batch 1 and 2 and learns which Reshape entries are N * c."""
        runs = []
        for batch in (1, 2):
            self.recorded = {}
            self(sample[:1].expand(batch, *sample.shape[1:]).contiguous())
            runs.append(self.recorded)
        self.recorded = None
        self.batch_entries = {}
        for index, one in runs[0].items():
            two = runs[1].get(index)
            op, name, _, outs, _ = self.nodes[index]
            where = f"{op} node {name or outs[0]}"
            if two is None or len(two) != len(one):
                raise ConversionError(f"{where}: target {one} at batch 1, {two} at batch 2")
            scaled = set()
            for pos, (a, b) in enumerate(zip(one, two)):
                if b == 2 * a and a > 0:
                    scaled.add(pos)
                elif a != b:
                    raise ConversionError(f"{where}: target entry {pos} is {a} at batch 1 and "
                                          f"{b} at batch 2; only N * constant can be traced")
            if scaled:
                self.batch_entries[index] = scaled

    def _value(self, env, name):
        if name == "":
            return None
        if name in env:
            return env[name]
        if name in self.value_to_attr:
            return getattr(self, self.value_to_attr[name])
        return self.static[name]

    def forward(self, x):
        env = {self.inputs[0]: x}
        # The batch: a traced size (so reshapes follow the input's batch), or a Python int.
        self.batch = x.size(0)
        for index, (op, name, ins, outs, attrs) in enumerate(self.nodes):
            args = [self._value(env, i) for i in ins]
            self.node_index = index
            try:
                result = OPS[op](args, attrs)
            except Exception as e:
                raise ConversionError(f"{op} node {name or outs[0]}: {e}") from e
            env[outs[0]] = result
        results = [env[o] for o in self.outputs]
        return results[0] if len(results) == 1 else tuple(results)


# ---- op implementations: f(args, attrs) -> value ------------------------------------------

def is_static(v):
    return isinstance(v, np.ndarray)


def as_operand(v):
    """A static value used in tensor arithmetic: float scalars become Python floats."""
    if is_static(v):
        if v.ndim == 0 and v.dtype.kind == "f":
            return float(v)
        return torch.from_numpy(np.array(v, copy=True))
    return v


def binary(torch_fn, numpy_fn):
    def run(args, attrs):
        a, b = args
        if is_static(a) and is_static(b):
            return numpy_fn(a, b)
        if is_static(a) and not is_static(b) and a.ndim == 0:
            # scalar op tensor: keep the scalar second where the op allows it
            return torch_fn(torch.full((), float(a), dtype=b.dtype), b)
        return torch_fn(as_operand(a), as_operand(b))
    return run


def conv(args, attrs):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise ConversionError("Conv auto_pad is not supported")
    if w.dim() != 4:
        raise ConversionError("only 2-D convolutions are supported")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    group = int(attrs.get("group", 1))
    if pads[:2] == pads[2:]:
        padding = pads[:2]
    else:  # asymmetric: pad explicitly (F.pad takes [left, right, top, bottom])
        x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
        padding = [0, 0]
    return F.conv2d(x, w, b, strides, padding, dilations, group)


def batch_norm(args, attrs):
    x, scale, bias, mean, var = args
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(attrs.get("epsilon", 1e-5)))


def pool_args(attrs):
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise ConversionError("pool auto_pad is not supported")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise ConversionError("asymmetric pool padding is not supported")
    kernel = list(attrs["kernel_shape"])
    return kernel, list(attrs.get("strides", [1, 1])), pads[:2], bool(attrs.get("ceil_mode", 0))


def average_pool(args, attrs):
    kernel, strides, padding, ceil = pool_args(attrs)
    return F.avg_pool2d(args[0], kernel, strides, padding, ceil,
                        count_include_pad=bool(attrs.get("count_include_pad", 0)))


def max_pool(args, attrs):
    kernel, strides, padding, ceil = pool_args(attrs)
    if attrs.get("storage_order", 0) != 0 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
        raise ConversionError("MaxPool storage_order/dilations are not supported")
    return F.max_pool2d(args[0], kernel, strides, padding, ceil_mode=ceil)


def softmax(args, attrs):
    # Opset < 13 semantics: flatten to 2-D at `axis`, softmax over the second dimension.
    x = args[0]
    axis = int(attrs.get("axis", 1)) % x.dim()
    if axis == x.dim() - 1:
        return torch.softmax(x, dim=-1)
    inner = int(np.prod(list(x.shape)[axis:], dtype=np.int64))  # batch-free when axis > 0
    return torch.softmax(x.reshape(-1, inner), dim=1).reshape(x.size())


def reshape(args, attrs):
    x, shape = args
    if not is_static(shape):
        raise ConversionError("Reshape target must be computable at trace time")
    module = CURRENT[0]
    target = [int(s) for s in shape.tolist()]
    if module.recorded is not None:
        module.recorded[module.node_index] = list(target)
    scaled = module.batch_entries.get(module.node_index, ())
    # 0 copies the input's dimension (a traced size); N * c entries follow the input's batch.
    target = [x.size(i) if s == 0 else module.batch * s if i in scaled else s
              for i, s in enumerate(target)]
    return x.reshape(target)


def onnx_slice(args, attrs):
    if len(args) > 1:
        raise ConversionError("Slice with starts/ends inputs (opset >= 10) is not supported")
    x = args[0]
    ndim = x.ndim if is_static(x) else x.dim()
    axes = list(attrs.get("axes", range(len(attrs["starts"]))))
    index = [slice(None)] * ndim
    for axis, start, end in zip(axes, attrs["starts"], attrs["ends"]):
        n = int(x.shape[axis])
        start = max(0, min(n, start + n if start < 0 else start))
        end = max(0, min(n, end + n if end < 0 else end))  # INT64_MAX clamps to n
        index[axis % ndim] = slice(start, end)
    return x[tuple(index)]


def squeeze(args, attrs):
    x = args[0]
    ndim = x.ndim if is_static(x) else x.dim()
    axes = sorted((a % ndim for a in attrs["axes"]), reverse=True)
    for axis in axes:
        if x.shape[axis] != 1:
            raise ConversionError(f"Squeeze of axis {axis} with size {x.shape[axis]}")
        x = x.squeeze(axis) if not is_static(x) else np.squeeze(x, axis)
    return x


def concat(args, attrs):
    axis = int(attrs["axis"])
    if all(is_static(a) for a in args):
        return np.concatenate(args, axis=axis)
    return torch.cat([as_operand(a) for a in args], dim=axis)


def shape_of(args, attrs):
    return np.array(args[0].shape, dtype=np.int64)


def cast(args, attrs):
    to = int(attrs["to"])
    if to not in CAST_TO:
        raise ConversionError(f"Cast to ONNX type {to}")
    x = args[0]
    if is_static(x):
        return x.astype(CAST_TO[to])
    return x.to(TORCH_DTYPES[CAST_TO[to]])


def matmul(args, attrs):
    a, b = args
    if is_static(a) or is_static(b):
        raise ConversionError("MatMul with a non-weight constant operand")
    return torch.matmul(a, b)


def reduce_mean(args, attrs):
    x = args[0]
    axes = list(attrs.get("axes", range(x.dim())))
    return x.mean(dim=axes, keepdim=bool(attrs.get("keepdims", 1)))


def clip(args, attrs):
    if len(args) > 1:
        raise ConversionError("Clip with min/max inputs (opset >= 11) is not supported")
    return torch.clamp(args[0], float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf)))


def hard_sigmoid(args, attrs):
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return torch.clamp(args[0] * alpha + beta, 0.0, 1.0)


def transpose(args, attrs):
    x = args[0]
    perm = list(attrs.get("perm", reversed(range(x.dim()))))
    return x.permute(*perm)


# The module whose forward() is running (reshape reads its batch and learned entries).
CURRENT = [None]

OPS = {
    "Conv": conv,
    "BatchNormalization": batch_norm,
    "Relu": lambda a, _: F.relu(a[0]),
    "Sigmoid": lambda a, _: torch.sigmoid(a[0]),
    "HardSigmoid": hard_sigmoid,
    "Clip": clip,
    "Add": binary(torch.add, np.add),
    "Sub": binary(torch.sub, np.subtract),
    "Mul": binary(torch.mul, np.multiply),
    "Div": binary(torch.div, np.divide),
    "Pow": lambda a, _: torch.pow(a[0], as_operand(a[1])),
    "Sqrt": lambda a, _: torch.sqrt(a[0]),
    "MatMul": matmul,
    "GlobalAveragePool": lambda a, _: a[0].mean(dim=(2, 3), keepdim=True),
    "AveragePool": average_pool,
    "MaxPool": max_pool,
    "ReduceMean": reduce_mean,
    "Softmax": softmax,
    "Transpose": transpose,
    "Reshape": reshape,
    "Squeeze": squeeze,
    "Slice": onnx_slice,
    "Concat": concat,
    "Shape": shape_of,
    "Cast": cast,
}


def save_atomically(traced, path, extra_files):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.jit.save(traced, tmp, _extra_files=extra_files)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def parse_shape(text):
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W with positive integers, got {text!r}")
    return shape


def convert(onnx_path, out_path, input_shape):
    try:
        model = onnx.load(onnx_path)
    except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
        raise ConversionError(f"cannot read ONNX model {onnx_path}: {e}") from e
    weights = weight_names(model.graph, load_weight_namer())
    module = OnnxGraphModule(model, weights).eval()

    # The tracer warns about every shape it bakes in; that is intended (see the top comment).
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    torch.manual_seed(0)
    example = torch.rand(*input_shape) * 2 - 1  # the models' inputs are in [-1, 1]
    CURRENT[0] = module
    with torch.no_grad():
        module.find_batch_entries(example)
        eager = module(example)
        # check_trace re-runs the trace on the same input; the checks below cover new inputs.
        traced = torch.jit.trace(module, example, check_trace=False)
        probe = torch.rand(*input_shape) * 2 - 1
        diff = (traced(probe) - module(probe)).abs().max().item()
        if not diff <= 1e-6:
            raise ConversionError(f"traced module differs from the interpreter by {diff:g}")
        # Any batch: three images at once against each on its own.
        images = torch.rand(3, *input_shape[1:]) * 2 - 1
        together = traced(images)
        alone = torch.cat([module(images[i:i + 1]) for i in range(3)])
        if together.shape != alone.shape:
            raise ConversionError(f"batch 3 gives {list(together.shape)}, three batch-1 runs "
                                  f"{list(alone.shape)}")
        diff = (together - alone).abs().max().item()
    if not diff <= 1e-5:
        raise ConversionError(f"batch 3 differs from three batch-1 runs by {diff:g}")

    traced_params = dict(traced.named_parameters())
    traced_buffers = dict(traced.named_buffers())
    for t in module.meta_tensors:
        where = traced_params if t["kind"] == "parameter" else traced_buffers
        if t["torch"] not in where:
            raise ConversionError(f"{t['torch']} is missing from the traced module's {t['kind']}s")

    meta = {"format": "fpxint-onnx-torchscript/1", "source": os.path.basename(onnx_path),
            "source_sha256": sha256_of(onnx_path), "input_shape": ["N"] + list(input_shape[1:]),
            "output_shape": ["N"] + [int(d) for d in eager.shape[1:]],
            "tensors": module.meta_tensors}
    try:
        save_atomically(traced, out_path, {META_FILE: json.dumps(meta, indent=1)})
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"cannot write {out_path}: {e}") from e

    n_params = sum(p.numel() for p in traced_params.values())
    print(f"{PROG}: {os.path.basename(onnx_path)} -> {out_path}: traced at {list(input_shape)}, "
          f"any batch, output {list(eager.shape)}, {len(traced_params)} parameters ({n_params} values), "
          f"{len(traced_buffers)} buffers, {len(module.nodes)} ops", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(
        description="Convert an ONNX model to TorchScript with its weights as named parameters.")
    parser.add_argument("onnx_path", metavar="IN.onnx")
    parser.add_argument("out_path", metavar="OUT.pt")
    parser.add_argument("--input-shape", type=parse_shape, required=True, metavar="N,C,H,W",
                        help="shape to trace at, e.g. 1,3,48,320 (rec) or 1,3,48,192 (cls); "
                        "the result takes any batch of that [C, H, W]")
    args = parser.parse_args()
    torch.set_num_threads(2)
    try:
        convert(args.onnx_path, args.out_path, args.input_shape)
    except ConversionError as e:
        sys.exit(f"{PROG}: error: {e}")


if __name__ == "__main__":
    main()
