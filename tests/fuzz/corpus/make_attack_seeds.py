#!/usr/bin/python3
"""Writes the hand-made seeds of tests/fuzz/corpus/: inputs shaped like the attacks the parsers
bound, so the fuzzers mutate from them (tests/fuzz/make_seeds.py adds every file under
corpus/<target>/ to that target's seeds). Where reaching a limit costs much work per run (16 MiB
of names, 256 MiB walked), the seed is a smaller copy of the shape: the unit tests
(core/torch_state_dict_test.cc, core/safetensors_test.cc) check the limits themselves. The bytes
are assembled here, without torch.

fuzz_torch_state_dict (first byte 1: data.pkl alone, the fuzzer adds storages "0" of 64 bytes
and "1" of 7; first byte 0: a whole file):
  alias-65-names             one tensor memoized and named 65 times (tensors per storage)
  stride0-view-twice         a 64 MiB stride-0 view of one float under two names (tensor bytes
                             against the storages' bytes)
  shared-list-long-key       10 references to one list of 100 values under a 4000-byte key
                             (bytes the walk over the values builds)
  long-names-4-storages      4 storages each named 64 times under a 4000-byte key (names' bytes)
  overlapping-zip-entries    two storages whose zip entries share their bytes
fuzz_safetensors:
  many-tensors               64 empty tensors (past the parser's scan, into its hash set)
  many-tensors-duplicate     32 empty tensors, the last one named like an earlier one

Usage: /usr/bin/python3 tests/fuzz/corpus/make_attack_seeds.py  (rewrites the files in place)
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


class Pickle:
    """Protocol-2 opcodes, as torch.save writes them."""

    def __init__(self):
        self.b = bytearray(b"\x80\x02")

    def op(self, c):
        self.b += c
        return self

    def str(self, s):
        s = s.encode()
        return self.op(b"X" + struct.pack("<I", len(s)) + s)

    def int(self, v):
        return self.op(b"J" + struct.pack("<i", v))

    def put(self, k):
        return self.op(b"r" + struct.pack("<I", k))

    def get(self, k):
        return self.op(b"j" + struct.pack("<I", k))

    def glob(self, module, name):
        return self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def ints(self, v):
        self.op(b"(")
        for x in v:
            self.int(x)
        return self.op(b"t")

    def tensor(self, key, numel, shape, stride, offset=0):
        self.glob("torch._utils", "_rebuild_tensor_v2").op(b"(")
        self.op(b"(").str("storage").glob("torch", "FloatStorage").str(key).str("cpu")
        self.int(numel).op(b"tQ").int(offset).ints(shape).ints(stride).op(b"\x89")
        return self.glob("collections", "OrderedDict").op(b")R").op(b"tR")

    def stop(self):
        return bytes(self.b + b".")


def zip_stored(files):
    """files: (name, data, alias_of): a stored zip; alias_of points the entry at an earlier one."""
    out, cd, locals_ = bytearray(), bytearray(), []
    for name, data, alias_of in files:
        n = name.encode()
        if alias_of is None:
            local = len(out)
            out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, len(data), len(data),
                               len(n), 0) + n + data
        else:
            local = locals_[alias_of]
        locals_.append(local)
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, len(data),
                          len(data), len(n), 0, 0, 0, 0, 0, local) + n
    off = len(out)
    out += cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(files), len(files), len(cd), off, 0)
    return bytes(out)


def torch_file(pkl, numels):
    files = [("archive/data.pkl", pkl, None)]
    files += [(f"archive/data/{i}", b"\0" * (4 * n), None) for i, n in enumerate(numels)]
    return zip_stored(files)


def torch_seeds():
    seeds = {}
    p = Pickle().op(b"}(")
    for i in range(65):
        p.str(f"n{i}")
        if i == 0:
            p.tensor("0", 16, [16], [1]).put(0)
        else:
            p.get(0)
    seeds["alias-65-names"] = b"\1" + p.op(b"u").stop()

    p = Pickle().op(b"}(").str("a").tensor("0", 1, [(64 << 20) // 4], [0]).put(0)
    seeds["stride0-view-twice"] = b"\1" + p.str("b").get(0).op(b"u").stop()

    p = Pickle().op(b"}(").str("w").tensor("0", 1, [1], [1]).op(b"](").op(b"N" * 100)
    p.op(b"e").put(0).op(b"0").str("k" * 4000).op(b"](")
    for _ in range(10):
        p.get(0)
    seeds["shared-list-long-key"] = b"\1" + p.op(b"eu").stop()

    p = Pickle().op(b"}").str("k" * 4000).op(b"](")
    for s in range(4):
        p.tensor(str(s), 1, [1], [1]).put(s)
        for _ in range(63):
            p.get(s)
    seeds["long-names-4-storages"] = b"\0" + torch_file(p.op(b"es").stop(), [1] * 4)

    p = Pickle().op(b"}(").str("a").tensor("0", 16, [16], [1]).str("b").tensor("1", 16, [16], [1])
    data = b"\0" * 64
    seeds["overlapping-zip-entries"] = b"\0" + zip_stored(
        [("archive/data.pkl", p.op(b"u").stop(), None), ("archive/data/0", data, None),
         ("archive/data/1", data, 1)])
    return seeds


def safetensors_header(names):
    h = "{" + ",".join(f'"{n}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
                       for n in names) + "}"
    h = h.encode()
    return struct.pack("<Q", len(h)) + h


def safetensors_seeds():
    return {"many-tensors": safetensors_header([f"t{i}" for i in range(64)]),
            "many-tensors-duplicate": safetensors_header([f"t{i}" for i in range(32)] + ["t7"])}


def main():
    for target, seeds in (("fuzz_torch_state_dict", torch_seeds()),
                          ("fuzz_safetensors", safetensors_seeds())):
        d = os.path.join(HERE, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            assert len(data) <= 65536, (name, len(data))  # run_fuzzer.sh's -max_len
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
