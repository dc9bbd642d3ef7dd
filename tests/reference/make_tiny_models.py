#!/usr/bin/python3
"""Writes small TorchScript models for the model-layer tests (a ctest fixture).

  /usr/bin/python3 tests/reference/make_tiny_models.py OUT_DIR
writes:
  tiny_cnn.pt          traced: conv(3->8) + BatchNorm + ReLU, flatten, linear(512->10), ReLU,
                       matmul with a constant [10, 6] weight
  tiny_io.safetensors  `input` F32 [2,3,8,8] and the FP output `output` F32 [2,6]
  tiny_cnn_fp16.pt, tiny_cnn_bf16.pt   tiny_cnn.pt with its weights in FP16 / BF16
  conv_zoo.pt          scripted, any input size [N, 4, H, W]: grouped strided conv, depthwise
                       dilated conv, 1x1 conv, conv1d over a flattened row, linear on tokens
                       [N, HW, C] and a matmul (every kind of layer the packed ops rewrite)
  tail_zoo.pt          scripted, any input size [N, 4, H, W]: a 1x1 and a depthwise conv, each
                       followed by elementwise ops as converted ONNX models write them (a
                       learnable scale and shift, which freezing folds into the conv before it;
                       hardswish as x * clamp(x + 3, 0, 6) / 6 with float64 0-dim constants;
                       another scale and shift; hardswish, div, sub, relu)
  no_layers.pt         scripted module without any linear/conv layer (y = 2x + 1)
  fixed_batch.pt       scripted, y = linear(5->5)(x).reshape(1, -1): a model whose output
                       cannot be split back into a batch's requests
  tiny_lm.pt           traced at [2, 8] int64 token ids: embedding(20, 16), linear(16->32),
                       ReLU, linear(32->20); any [B, T]
  c7_layer.pt, c7_io.safetensors   C7: Y = X W^T, d=256, W ~ N(0, 1/d), X = ReLU(N(0,1))
                       64x256 (`input`); c8_mlp.pt, c8_io.safetensors  C8: the 4-layer ReLU
                       MLP (d=256, He init, bias N(0, 0.1^2)) and its 128 inputs. Both drawn from
                       numpy default_rng(0) in the order docs/ALGORITHM.md §7 gives, so the
                       reference numbers of docs/ALGORITHM.md §7 apply to exactly these tensors.
"""
import copy
import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn


class TinyCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.w = nn.Parameter(torch.randn(10, 6) * 0.3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        y = self.fc(h.flatten(1))
        return torch.matmul(torch.relu(y), self.w)


class ConvZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.pointwise = nn.Conv2d(8, 12, 1, bias=False)
        self.seq = nn.Conv1d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 20)
        self.w = nn.Parameter(torch.randn(20, 7) * 0.3)

    def forward(self, x):
        h = torch.relu(self.grouped(x))
        h = torch.relu(self.depthwise(h))
        h = self.pointwise(h)
        n, c = h.shape[0], h.shape[1]
        h = self.seq(h.reshape(n, c, -1))
        t = torch.relu(self.fc(h.transpose(1, 2)))
        return torch.matmul(t, self.w)


class TailZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.a0 = nn.Parameter(torch.tensor([0.75]))
        self.b0 = nn.Parameter(torch.tensor([0.125]))
        self.a1 = nn.Parameter(torch.tensor([1.25]))
        self.b1 = nn.Parameter(torch.tensor([-0.2]))
        self.register_buffer("three", torch.tensor(3.0, dtype=torch.float64))
        self.register_buffer("six", torch.tensor(6.0, dtype=torch.float64))

    def forward(self, x):
        h = self.pw(x) * self.a0 + self.b0
        h = h * torch.clamp(h + self.three, 0.0, 6.0) / self.six
        h = self.a1 * h + self.b1
        h = torch.nn.functional.hardswish(self.dw(h)) / 3.0 - 0.5
        return torch.relu(h)


class Mlp(nn.Module):
    def __init__(self, weights, biases):
        super().__init__()
        self.layers = nn.ModuleList()
        for w, b in zip(weights, biases):
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w))
                lin.bias.copy_(torch.from_numpy(b))
            self.layers.append(lin)

    def forward(self, x):
        n = len(self.layers)
        for i, lin in enumerate(self.layers):
            x = lin(x)
            if i < n - 1:
                x = torch.relu(x)
        return x


class NoBiasLinear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.from_numpy(w))

    def forward(self, x):
        return nn.functional.linear(x, self.w)


def write_reference_models(out):
    """C7/C8 tensors (docs/ALGORITHM.md §7), drawn in exactly the reference's order."""
    rng = np.random.default_rng(0)
    rng.standard_normal((512, 512))  # the tensor-level table's G
    d = 256
    w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    x = np.maximum(rng.standard_normal((64, d)), 0).astype(np.float32)
    layer = NoBiasLinear(w).eval()
    torch.jit.trace(layer, torch.from_numpy(x)).save(os.path.join(out, "c7_layer.pt"))
    write_safetensors(os.path.join(out, "c7_io.safetensors"), {"input": torch.from_numpy(x)})
    ws = [(rng.standard_normal((d, d)) * np.sqrt(2 / d)).astype(np.float32) for _ in range(4)]
    bs = [(rng.standard_normal(d) * 0.1).astype(np.float32) for _ in range(4)]
    x0 = rng.standard_normal((128, d)).astype(np.float32)
    mlp = Mlp(ws, bs).eval()
    torch.jit.trace(mlp, torch.from_numpy(x0)).save(os.path.join(out, "c8_mlp.pt"))
    write_safetensors(os.path.join(out, "c8_io.safetensors"), {"input": torch.from_numpy(x0)})


class NoLayers(nn.Module):
    def forward(self, x):
        return 2 * x + 1


class TinyLm(nn.Module):
    """Token ids [B, T] -> logits [B, T, 20]: a 20-row embedding table, two linear layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 20)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.emb(x))))


class FixedBatch(nn.Module):
    """A model that cannot batch: it folds its whole output into one row."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(x).reshape(1, -1)


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    m = TinyCnn().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(m, x)
    traced.save(os.path.join(out, "tiny_cnn.pt"))
    # The same network with FP16 and BF16 weights (traced in fp32, then converted, as a half
    # checkpoint exported from a GPU would hold them).
    for dtype, name in ((torch.float16, "tiny_cnn_fp16.pt"), (torch.bfloat16, "tiny_cnn_bf16.pt")):
        half = torch.jit.trace(copy.deepcopy(m), x)  # the trace shares the module's parameters
        half.to(dtype)
        half.save(os.path.join(out, name))
    with torch.no_grad():
        y = m(x)
    write_safetensors(os.path.join(out, "tiny_io.safetensors"), {"input": x, "output": y})
    torch.jit.script(NoLayers()).save(os.path.join(out, "no_layers.pt"))
    torch.jit.script(FixedBatch()).save(os.path.join(out, "fixed_batch.pt"))
    torch.jit.trace(TinyLm().eval(), torch.randint(0, 20, (2, 8))).save(os.path.join(out, "tiny_lm.pt"))
    torch.jit.script(ConvZoo().eval()).save(os.path.join(out, "conv_zoo.pt"))
    torch.jit.script(TailZoo().eval()).save(os.path.join(out, "tail_zoo.pt"))
    write_reference_models(out)


if __name__ == "__main__":
    main()
