#!/usr/bin/python3
"""End-to-end tests of `fpxint expand` with an independent Python reader of the artifact.

Everything here is written from the format contract (core/artifact.h, docs/FORMAT.md), not from
the C++ code: safetensors is read and written with numpy, codes are unpacked bit by bit, and the
reconstruction is compared with a numpy implementation of the expansion (docs/ALGORITHM.md §1-2).

Environment: FPXINT_BIN (the fpxint binary), FPXINT_MODELS_DIR (scripts/fetch_models.sh output).
Run with /usr/bin/python3 (Debian numpy).
"""
import hashlib
import json
import os
import pty
import select
import struct
import subprocess
import tempfile
import unittest

import numpy as np

BIN = os.environ.get("FPXINT_BIN", "build/bin/fpxint")
MODELS = os.environ.get("FPXINT_MODELS_DIR", "")

NP_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "U8": "u1", "I32": "<i4",
             "I64": "<i8"}


def write_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        dtype = {v: k for k, v in NP_DTYPES.items()}[arr.dtype.str.replace("|", "")]
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    tensors, order = {}, []
    for name, info in header.items():
        b, e = info["data_offsets"]
        arr = np.frombuffer(data[base + b:base + e], dtype=NP_DTYPES[info["dtype"]])
        tensors[name] = (info["dtype"], arr.reshape(info["shape"]), b)
        order.append((b, name))
    return meta, tensors, [name for _, name in sorted(order)]


def unpack(codes, bits, signed, row_len):
    """codes: [rows, packed] uint8/int8 -> [rows, row_len] int64, per the packing contract."""
    raw = codes.view(np.uint8).astype(np.int64)
    if bits in (1, 2, 4):
        per = 8 // bits
        out = np.zeros((raw.shape[0], raw.shape[1] * per), dtype=np.int64)
        for t in range(per):
            out[:, t::per] = (raw >> (t * bits)) & ((1 << bits) - 1)
        out = out[:, :row_len]
        if signed:
            out = np.where(out >= (1 << (bits - 1)), out - (1 << bits), out)
        return out
    return codes.astype(np.int64) if signed else raw


def reconstruct(meta, tensors, name, k_max):
    bits, grid, scale_mode = int(meta["bits"]), meta["grid"], meta["scale"]
    shape = json.loads(meta[name + ".shape"])
    rows, row_len = shape[0], int(np.prod(shape[1:]))
    acc = np.zeros((rows, row_len))
    for k in range(1, k_max + 1):
        c = unpack(tensors[f"{name}.t{k}.codes"][1], bits, grid != "asym", row_len).astype(np.float64)
        s = tensors[f"{name}.t{k}.scale"][1].astype(np.float64)
        if scale_mode == "group":
            g = int(meta["group_size"])
            s = np.repeat(s, min(g, row_len), axis=1)[:, :row_len]
        if grid == "sym":
            acc += c * s
        elif grid == "mid":
            acc += (c + 0.5) * s
        else:
            z = tensors[f"{name}.t{k}.zero"][1].astype(np.float64)
            if scale_mode == "group":
                z = np.repeat(z, min(int(meta["group_size"]), row_len), axis=1)[:, :row_len]
            acc += s * (c - z)
    return acc.reshape(shape)


def numpy_expansion_errors(w, bits, terms, grid, per_channel):
    """docs/ALGORITHM.md §1-2 with float64 scales (the reference): relative Frobenius error per
    term."""
    r = w.astype(np.float64).reshape(w.shape[0], -1)
    axis = 1 if per_channel else None
    errs = []
    for _ in range(terms):
        m = np.max(np.abs(r), axis=axis, keepdims=axis is not None)
        if grid == "sym":
            q = 2 ** (bits - 1) - 1
            s = np.where(m > 0, m / q, 1.0)
            d = s * np.clip(np.rint(r / s), -q, q)
        else:  # mid
            s = np.where(m > 0, m / 2 ** (bits - 1), 1.0)
            d = s * (np.clip(np.floor(r / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1) + 0.5)
        r = r - d
        errs.append(np.linalg.norm(r) / np.linalg.norm(w))
    return errs


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def run(*args, check=None):
    p = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300)
    if check is not None and p.returncode != check:
        raise AssertionError(f"exit {p.returncode} != {check}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


class ExpandCli(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        rng = np.random.default_rng(5)
        self.src = {
            "conv.weight": (rng.standard_normal((16, 8, 3, 3)) * 0.05).astype(np.float32),
            "conv.bias": rng.standard_normal(16).astype(np.float32),
            "fc.weight": rng.standard_normal((33, 100)).astype(np.float32),
            "emb.weight": rng.standard_normal((10, 7)).astype(np.float16),
            "counter": np.arange(6, dtype=np.int64).reshape(2, 3),
        }
        self.path = os.path.join(self.dir, "src.safetensors")
        write_safetensors(self.path, self.src, {"format": "pt"})

    def tearDown(self):
        self.tmp.cleanup()

    def out(self, name):
        return os.path.join(self.dir, name)

    def test_contract_and_reconstruction(self):
        for grid in ("sym", "asym", "mid"):
            for bits, scale, extra in ((4, "channel", []), (2, "group", ["--group-size", "16"]),
                                       (3, "tensor", [])):
                out, rep = self.out(f"o_{grid}{bits}.st"), self.out(f"r_{grid}{bits}.json")
                run("expand", self.path, "-o", out, "--bits", str(bits), "--terms", "3",
                    "--grid", grid, "--scale", scale, *extra, "--exclude", "^emb", "--report",
                    rep, "-q", check=0)
                meta, tensors, order = read_safetensors(out)
                report = load_json(rep)
                label = f"{grid} b={bits} {scale}"
                self.assertEqual(meta["format"], "fpxint")
                self.assertEqual(meta["format_version"], "1")
                for key, want in (("bits", str(bits)), ("terms", "3"), ("grid", grid),
                                  ("variant", "rescaled"), ("scale", scale),
                                  ("packing", "lsb_first" if bits in (1, 2, 4) else "byte")):
                    self.assertEqual(meta[key], want, label)
                self.assertEqual(meta["source_sha256"],
                                 hashlib.sha256(read_bytes(self.path)).hexdigest())
                self.assertEqual(json.loads(meta["conv.weight.shape"]), [16, 8, 3, 3])
                # Copied unchanged: rank < 2, integers, excluded.
                for name in ("conv.bias", "counter", "emb.weight"):
                    np.testing.assert_array_equal(tensors[name][1], self.src[name])
                self.assertNotIn("fc.weight", tensors)
                # Term-major order, copied tensors first.
                ks = [int(n.split(".t")[-1].split(".")[0]) for n in order if ".t" in n and
                      n.rsplit(".", 1)[-1] in ("codes", "scale", "zero")]
                self.assertEqual(ks, sorted(ks), label)
                self.assertTrue(all(".t" not in n for n in order[:3]))
                # dtypes and shapes.
                codes = tensors["fc.weight.t1.codes"]
                self.assertEqual(codes[0], "U8" if bits in (1, 2, 4) or grid == "asym" else "I8")
                self.assertEqual(list(codes[1].shape), [33, -(-100 * bits // 8) if bits in (1, 2, 4) else 100])
                want_scale = {"channel": [33, 1], "tensor": [1, 1], "group": [33, 7]}[scale]
                self.assertEqual(list(tensors["fc.weight.t1.scale"][1].shape), want_scale)
                self.assertEqual("fc.weight.t1.zero" in tensors, grid == "asym")
                # Independent reconstruction reproduces the report's errors.
                for t in report["tensors"]:
                    w = self.src[t["name"]].astype(np.float64)
                    for term in t["terms"]:
                        rec = reconstruct(meta, tensors, t["name"], term["k"])
                        rel = np.linalg.norm(w - rec) / np.linalg.norm(w)
                        self.assertAlmostEqual(rel / term["rel_fro"], 1.0, delta=1e-9, msg=label)
                        relmax = np.abs(w - rec).max() / np.abs(w).max()
                        self.assertAlmostEqual(relmax / term["rel_max"], 1.0, delta=1e-9, msg=label)
                # ... and agrees with the numpy reference expansion (float64 scales).
                if grid != "asym" and scale != "group":
                    w = self.src["fc.weight"]
                    ref = numpy_expansion_errors(w, bits, 3, grid, scale == "channel")
                    got = [t["terms"] for t in report["tensors"] if t["name"] == "fc.weight"][0]
                    for k in range(3):
                        self.assertAlmostEqual(got[k]["rel_fro"] / ref[k], 1.0, delta=1e-3, msg=label)

    def test_deterministic_and_json_output(self):
        a, b = self.out("a.st"), self.out("b.st")
        pa = run("expand", self.path, "-o", a, "-b", "4", "-k", "2", "--json", check=0)
        run("expand", self.path, "-o", b, "-b", "4", "-k", "2", "-j", "1", "--kernel", "ref",
            "-q", check=0)
        self.assertEqual(read_bytes(a), read_bytes(b))
        report = json.loads(pa.stdout)
        for key in ("spec", "tensors", "bytes_in", "bytes_out", "compression_ratio",
                    "wall_seconds"):
            self.assertIn(key, report)
        self.assertEqual(report["spec"]["calibration_data"], "none")
        self.assertEqual(report["bytes_out"], os.path.getsize(a))
        self.assertEqual(report["artifact_sha256"], hashlib.sha256(read_bytes(a)).hexdigest())
        q = run("expand", self.path, "-o", a, "-q", check=0)
        self.assertEqual(q.stdout, "")
        self.assertEqual(q.stderr, "")

    def test_exit_codes_and_messages(self):
        out = self.out("x.st")
        cases = [
            (["expand", self.out("missing.st"), "-o", out], 2, "does not exist"),
            (["expand", self.path, "-o", out, "--bits", "9"], 2, "bits"),
            (["expand", self.path, "-o", out, "--grid", "sym", "--bits", "1"], 2, "bits: 1"),
            (["expand", self.path, "-o", out, "--variant", "digits"], 2, "needs grid mid"),
            (["expand", self.path, "-o", out, "--scale", "group"], 2, "--group-size"),
            (["expand", self.path, "-o", out, "--grid", "int4"], 2, "int4"),
            (["expand", self.path, "-o", out, "--include", "(["], 2, "include"),
            (["expand", self.path, "-o", self.out("no/such/dir/x.st")], 4, "cannot create"),
            (["expand"], 2, "input"),
            (["frobnicate"], 2, ""),
        ]
        garbage = self.out("garbage.st")
        with open(garbage, "wb") as f:
            f.write(struct.pack("<Q", 1 << 50) + b"{}")
        cases.append((["expand", garbage, "-o", out], 3, "header length"))
        nan = self.out("nan.st")
        write_safetensors(nan, {"w": np.array([[1.0, np.nan]], dtype=np.float32)})
        cases.append((["expand", nan, "-o", out], 3, "tensor 'w'"))
        for args, code, text in cases:
            p = run(*args)
            self.assertEqual(p.returncode, code, f"{args}: {p.stderr}")
            self.assertIn(text, p.stderr, args)
        self.assertFalse(os.path.exists(out), "nothing is written on error")
        self.assertEqual(run("--help").returncode, 0)
        self.assertIn("Exit codes", run("expand", "--help").stdout)

    def test_progress_bar_only_on_a_terminal(self):
        out = self.out("p.st")
        plain = run("expand", self.path, "-o", out, check=0)
        self.assertNotIn("\r", plain.stderr)
        self.assertIn("expanded 3 tensors, copied 2 unchanged", plain.stdout)
        # stderr on a pseudo-terminal: the bar is drawn with carriage returns.
        master, slave = pty.openpty()
        p = subprocess.Popen([BIN, "expand", self.path, "-o", out], stdout=subprocess.PIPE,
                             stderr=slave)
        os.close(slave)
        tty = b""
        while True:
            r, _, _ = select.select([master], [], [], 30)
            if not r:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            tty += chunk
        p.wait(timeout=30)
        os.close(master)
        self.assertEqual(p.returncode, 0)
        self.assertIn(b"\r[", tty)
        self.assertIn(b"%", tty)

    def test_real_ocr_recognizer(self):
        self.assertTrue(MODELS and os.path.isdir(MODELS),
                        f"FPXINT_MODELS_DIR={MODELS!r} is missing: scripts/fetch_models.sh failed?")
        src = os.path.join(MODELS, "ocr", "ocr_rec.safetensors")
        out, rep = self.out("rec.st"), self.out("rec.json")
        run("expand", src, "-o", out, "-b", "4", "-k", "3", "--report", rep, "-q", check=0)
        report = load_json(rep)
        self.assertGreaterEqual(len(report["tensors"]), 47)
        meta, tensors, _ = read_safetensors(out)
        _, source, _ = read_safetensors(src)
        prev = None
        for k in (1, 2, 3):
            num = den = 0.0
            for t in report["tensors"]:
                w = source[t["name"]][1].astype(np.float64)
                rec = reconstruct(meta, tensors, t["name"], k)
                num += np.sum((w - rec) ** 2)
                den += np.sum(w ** 2)
            rel = np.sqrt(num / den)
            self.assertAlmostEqual(rel / report["summary"][k - 1]["rel_fro"], 1.0, delta=1e-9)
            if prev is not None:
                self.assertLess(rel, prev / 8)  # geometric: r = 1/14 per term
            prev = rel


if __name__ == "__main__":
    unittest.main(verbosity=2)
