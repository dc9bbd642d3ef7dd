#!/usr/bin/python3
"""Hostile TorchScript archives for the vetting tests (docs/RELIABILITY.md, threat model).

Usage: make_attack_models.py OUT_DIR

Writes into OUT_DIR:
  secret.txt           16 bytes standing in for a server-side file the caller must never read
  reader_forward.pt    forward() returns the bytes of secret.txt (aten::from_file)
  reader_setstate.pt   __setstate__, which torch.jit.load runs, reads secret.txt into a buffer
                       that forward() then returns
  reader_helper.pt     forward() calls a scripted helper function that does the read, so the
                       operation is only visible after inlining
  benign.pt            a small convolution network built from allow-listed operations only
  linear784.pt         Linear(784, 10), input [-1, 784]: the target of oversized declared shapes

Each reader has a linear layer (so that fpxint serves and quantizes it like any network) and
returns the secret as float values of its bytes added to that layer's output times zero: a
server without vetting loads it, serves it, and ModelInfer answers the file's bytes.
"""
import os
import sys
from typing import Tuple

import torch

SECRET = b"fpxint-secret-42"  # 16 bytes
N = len(SECRET)


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(sys.argv) == 2 else 2
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    secret = os.path.abspath(os.path.join(out, "secret.txt"))
    with open(secret, "wb") as f:
        f.write(SECRET)

    class ReaderForward(torch.nn.Module):
        def __init__(self, path: str):
            super().__init__()
            self.path = path
            self.fc = torch.nn.Linear(64, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x.flatten(1))
            return torch.from_file(self.path, size=16, dtype=torch.uint8).float() + 0 * y

    class ReaderSetstate(torch.nn.Module):
        def __init__(self, path: str):
            super().__init__()
            self.path = path
            self.leak = torch.zeros(16)
            self.w = torch.nn.Parameter(torch.randn(16, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.leak + 0 * torch.nn.functional.linear(x.flatten(1), self.w)

        @torch.jit.export
        def __getstate__(self) -> Tuple[str, torch.Tensor, torch.Tensor, bool]:
            return (self.path, self.leak, self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[str, torch.Tensor, torch.Tensor, bool]) -> None:
            self.path = state[0]
            self.w = state[2]
            self.leak = torch.from_file(state[0], size=16, dtype=torch.uint8).float()
            self.training = state[3]

    @torch.jit.script
    def read_it(path: str) -> torch.Tensor:
        return torch.from_file(path, size=16, dtype=torch.uint8).float()

    class ReaderHelper(torch.nn.Module):
        def __init__(self, path: str):
            super().__init__()
            self.path = path
            self.fc = torch.nn.Linear(64, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return read_it(self.path) + 0 * self.fc(x.flatten(1))

    class Benign(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 8 * 8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.jit.script(ReaderForward(secret)).save(os.path.join(out, "reader_forward.pt"))
    torch.jit.script(ReaderSetstate(secret)).save(os.path.join(out, "reader_setstate.pt"))
    torch.jit.script(ReaderHelper(secret)).save(os.path.join(out, "reader_helper.pt"))
    torch.jit.script(Benign()).save(os.path.join(out, "benign.pt"))
    torch.manual_seed(1)
    torch.jit.script(torch.nn.Linear(784, 10)).save(os.path.join(out, "linear784.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
