#!/usr/bin/python3
"""`fpxint expand` on torch.save files, checked against the same tensors as safetensors.

PyTorch (Debian python3-torch) writes the state dicts; the test writes the same tensors, in the
same order, as a safetensors file with its own writer, expands both with the CLI and requires
the two artifacts to be byte-identical except for the recorded source hash. Hostile files (a
pickle that would call os.system, views outside their storage, compressed entries, truncation)
must be refused with exit code 3 and a message that says what is wrong, without running anything.

Environment: FPXINT_BIN (the fpxint binary). Run with /usr/bin/python3.
"""
import collections
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import tempfile
import unittest
import zipfile

import torch

BIN = os.environ.get("FPXINT_BIN", "build/bin/fpxint")

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def raw_bytes(t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = raw_bytes(t)
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_artifact(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def run(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=120)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(72, 10)


class StateDictTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(7)
        self.dir = tempfile.mkdtemp(prefix="fpxint-sd-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def expand_both(self, obj, flat, *flags):
        """torch.save(obj) and safetensors(flat) expanded with the same flags: same artifact."""
        pt, st = self.path("m.pt"), self.path("m.safetensors")
        torch.save(obj, pt)
        write_safetensors(st, flat)
        a, b = self.path("a.safetensors"), self.path("b.safetensors")
        ra = run("expand", pt, "-o", a, "-b", "4", "-k", "2", "--json", *flags)
        self.assertEqual(ra.returncode, 0, ra.stderr)
        rb = run("expand", st, "-o", b, "-b", "4", "-k", "2", "-q", *flags)
        self.assertEqual(rb.returncode, 0, rb.stderr)
        ha, da = read_artifact(a)
        hb, db = read_artifact(b)
        with open(pt, "rb") as f:
            self.assertEqual(ha["__metadata__"]["source_sha256"], hashlib.sha256(f.read()).hexdigest())
        ha["__metadata__"].pop("source_sha256")
        hb["__metadata__"].pop("source_sha256")
        self.assertEqual(ha, hb)
        self.assertEqual(da, db)
        return json.loads(ra.stdout), ha

    def test_model_state_dict_with_views_dtypes_and_shared_storage(self):
        net = Net()
        sd = net.state_dict()  # includes bn.num_batches_tracked (int64, rank 0)
        base = torch.randn(64, 48)
        sd["view.transposed"] = base.t()                # non-contiguous
        sd["view.sliced"] = base[8:40:2, 4:36]          # offset and strides
        sd["view.tied"] = base                          # shares the storage
        sd["half"] = torch.randn(16, 32).half()
        sd["bf16"] = torch.randn(16, 32).bfloat16()
        sd["double"] = torch.randn(8, 8, dtype=torch.float64)
        sd["ids"] = torch.arange(12, dtype=torch.int32).reshape(3, 4)
        sd["mask"] = torch.rand(4, 4) > 0.5
        sd["empty"] = torch.zeros(0, 5)
        flat = collections.OrderedDict((k, v) for k, v in sd.items())
        report, header = self.expand_both(sd, flat)
        expanded = {t["name"] for t in report["tensors"]}
        self.assertEqual(expanded, {"conv.weight", "fc.weight", "view.transposed", "view.sliced",
                                    "view.tied", "half", "bf16", "double"})
        self.assertIn("conv.weight.t2.codes", header)
        self.assertEqual(header["ids"]["dtype"], "I32")
        self.assertEqual(header["mask"]["dtype"], "BOOL")

    def test_nested_checkpoint_and_parameters(self):
        net = Net()
        ckpt = {"model": net.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1, "betas": (0.9, 0.99)},
                "ema": [torch.randn(6, 6), torch.nn.Parameter(torch.randn(5, 7))], 17: torch.randn(4, 4)}
        flat = collections.OrderedDict()
        for k, v in net.state_dict().items():
            flat["model." + k] = v
        flat["ema.0"] = ckpt["ema"][0]
        flat["ema.1"] = ckpt["ema"][1]
        flat["17"] = ckpt[17]
        report, _ = self.expand_both(ckpt, flat)
        self.assertIn("model.fc.weight", {t["name"] for t in report["tensors"]})
        self.assertIn("ema.1", {t["name"] for t in report["tensors"]})

    def refused(self, data, *needles):
        p = self.path("bad.pt")
        with open(p, "wb") as f:
            f.write(data)
        r = run("expand", p, "-o", self.path("out.safetensors"))
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        for n in needles:
            self.assertIn(n, r.stderr)
        self.assertFalse(os.path.exists(self.path("out.safetensors")))
        return r.stderr

    def zip_with(self, pkl, data=None, compression=zipfile.ZIP_STORED):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression) as z:
            z.writestr("archive/data.pkl", pkl)
            for key, b in (data or {}).items():
                z.writestr("archive/data/" + key, b)
        return buf.getvalue()

    def test_refuses_code_execution(self):
        marker = self.path("pwned")

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch " + marker,))

        pkl = pickle.dumps({"w": Evil()}, protocol=2)
        self.refused(self.zip_with(pkl), "refused global", "system")
        self.assertFalse(os.path.exists(marker))

        b = pickle.dumps({"w": collections.Counter(a=1)}, protocol=2)
        self.refused(self.zip_with(b), "refused global", "collections.Counter")

    def crafted_tensor(self, numel, size, stride, offset=0, then=None):
        """A pickle whose tensor "w" is rebuilt from a storage of `numel` floats; `then`: one more
        entry (key, value) after it."""
        class Storage:
            pass

        class T:
            def __reduce__(self):
                return (torch._utils._rebuild_tensor_v2,
                        (st, offset, size, stride, False, collections.OrderedDict()))

        st = Storage()

        class P(pickle.Pickler):
            def persistent_id(self, obj):
                if obj is st:
                    return ("storage", torch.FloatStorage, "0", "cpu", numel)
                return None

        out = io.BytesIO()
        P(out, protocol=2).dump(dict([("w", T())] + ([then] if then else [])))
        return self.zip_with(out.getvalue(), {"0": b"\0" * (4 * numel)})

    def test_refuses_views_outside_their_storage(self):
        ok = self.crafted_tensor(12, (3, 4), (4, 1))
        p = self.path("ok.pt")
        with open(p, "wb") as f:
            f.write(ok)
        r = run("expand", p, "-o", self.path("ok.safetensors"), "-q")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.refused(self.crafted_tensor(10, (1000,), (1,)), "reaches element 999 of a storage of 10")
        self.refused(self.crafted_tensor(12, (3, 4), (4, 1), offset=1), "reaches element 12")
        self.refused(self.crafted_tensor(12, (2, 2), (1 << 62, 1)), "overflows")
        # Stride 0 repeats one element: 2^61+1 doubles would wrap a 64-bit byte count.
        self.refused(self.crafted_tensor(1, ((1 << 61) + 1,), (0,)), "larger than their storage")
        # A small broadcast view is fine (copied out row-major).
        ok = self.crafted_tensor(4, (8, 4), (0, 1))
        with open(p, "wb") as f:
            f.write(ok)
        r = run("expand", p, "-o", self.path("bc.safetensors"), "-q")
        self.assertEqual(r.returncode, 0, r.stderr)
        # A key set twice keeps its last value, as in Python: {"w": tensor, "w": 3} has no tensor.
        twice = self.crafted_tensor(12, (3, 4), (4, 1), then=("v", 3)).replace(
            b"X\x01\x00\x00\x00v", b"X\x01\x00\x00\x00w")
        self.refused(twice, "no tensors")

    def test_refuses_malformed_archives(self):
        sd = {"w": torch.randn(32, 32)}
        buf = io.BytesIO()
        torch.save(sd, buf)
        good = buf.getvalue()
        self.refused(good[: len(good) // 2], "not a readable torch.save file")
        self.refused(good[:-5], "not a readable torch.save file")
        pkl = zipfile.ZipFile(io.BytesIO(good)).read(
            [n for n in zipfile.ZipFile(io.BytesIO(good)).namelist() if n.endswith("data.pkl")][0])
        self.refused(self.zip_with(pkl, {"0": b"\0" * 4096}, zipfile.ZIP_DEFLATED), "compressed")
        self.refused(self.zip_with(pkl, {}), "has no data/0 entry")
        # A DUP bomb: 3 M one-byte opcodes would each push a value; the op budget stops it.
        bomb = b"\x80\x02]" + b"2" * (3 << 20) + b"."
        self.refused(self.zip_with(bomb), "pickle opcodes")
        legacy = io.BytesIO()
        torch.save(sd, legacy, _use_new_zipfile_serialization=False)
        self.refused(legacy.getvalue(), "legacy")
        ts = io.BytesIO()
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4)), ts)
        self.refused(ts.getvalue(), "TorchScript archive")


if __name__ == "__main__":
    unittest.main(verbosity=2)
