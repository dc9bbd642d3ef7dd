#!/usr/bin/python3
"""Writes small TorchScript models for the model-layer tests (a ctest fixture).

  /usr/bin/python3 tests/reference/make_tiny_models.py OUT_DIR
writes:
  tiny_cnn.pt          traced: conv(3->8) + BatchNorm + ReLU, flatten, linear(512->10), ReLU,
                       matmul with a constant [10, 6] weight
  tiny_io.safetensors  `input` F32 [2,3,8,8] and the FP output `output` F32 [2,6]
  no_layers.pt         scripted module without any linear/conv layer (y = 2x + 1)
"""
import json
import os
import struct
import sys

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


class NoLayers(nn.Module):
    def forward(self, x):
        return 2 * x + 1


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
    with torch.no_grad():
        y = m(x)
    write_safetensors(os.path.join(out, "tiny_io.safetensors"), {"input": x, "output": y})
    torch.jit.script(NoLayers()).save(os.path.join(out, "no_layers.pt"))


if __name__ == "__main__":
    main()
