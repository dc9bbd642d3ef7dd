#!/usr/bin/python3
"""Writes the exact test tensors of docs/ALGORITHM.md §7 (numpy default_rng(0)) for the C++ tests.

The reference numbers of docs/ALGORITHM.md §7 were computed on these tensors; per-tensor errors
depend on the sample maximum, so the C++ tests use the very same samples instead of their own
generator.

  /usr/bin/python3 tests/reference/make_reference_tensors.py OUT_DIR
writes OUT_DIR/gaussian512_seed0.f64: 512*512 little-endian float64, row-major.
"""
import os
import sys

import numpy as np


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    g = np.random.default_rng(0).standard_normal((512, 512))
    tmp = os.path.join(out, "gaussian512_seed0.f64.tmp")
    g.astype("<f8").tofile(tmp)
    os.replace(tmp, os.path.join(out, "gaussian512_seed0.f64"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
