r"""End-to-end tests of the `fpxint` CLI against a real fpxint-server on 127.0.0.1.

Run:  FPXINT_CLI_BIN=build/bin/fpxint FPXINT_SERVER_BIN=build/bin/fpxint-server \
      FPXINT_MODELS_DIR=~/.cache/fpxint/models /usr/bin/python3 -m unittest -v tests/e2e/test_cli_e2e.py

Every command is run as a subprocess, as a user or a pipeline would: exit codes (README.md "Exit
codes"), the --json documents' schema, stderr messages, progress on a pseudo-terminal (`script`)
and plain lines in a pipe. The tests of CliE2E share one server (1 worker, tokens required) and
run in name order; a test whose prerequisite failed fails with a message naming it.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service_client as sc  # noqa: E402

ADMIN = sc.TOKENS["admin"]


def read_text(path):
    with open(path) as f:
        return f.read()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def load_json(path):
    with open(path) as f:
        return json.load(f)


def cli_bin():
    path = os.environ.get("FPXINT_CLI_BIN") or os.path.join(sc.REPO_ROOT, "build", "bin", "fpxint")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise AssertionError(f"fpxint CLI not found: {path!r} (set FPXINT_CLI_BIN)")
    return os.path.abspath(path)


# The documented --json schemas: keys every document of that kind must have.
JOB_KEYS = {"id", "state", "spec", "progress", "report", "artifacts", "error", "created_unix_ms"}
UPLOAD_KEYS = {"model", "name", "sha256", "format", "size_bytes", "deduplicated"}
DOWNLOAD_KEYS = {"artifact_id", "path", "sha256", "size_bytes", "resumed_from", "already_present"}
INFER_KEYS = {"model_name", "model_version", "outputs", "latency_ms"}
HEALTH_KEYS = {"status", "serving", "server"}
ERROR_KEYS = {"message", "exit_code"}


class Result:
    def __init__(self, argv, proc):
        self.argv = argv
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self):
        try:
            return json.loads(self.out)
        except json.JSONDecodeError as e:
            raise AssertionError(f"stdout of {' '.join(self.argv)} is not JSON ({e}):\n{self.out[:2000]}")

    def __str__(self):
        return (f"$ {' '.join(self.argv)}\nexit {self.rc}\n--- stdout ---\n{self.out[-3000:]}"
                f"\n--- stderr ---\n{self.err[-3000:]}")


class CliTestCase(unittest.TestCase):
    server = None
    work = None
    state = {}

    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="fpxint-cli-e2e-")
        cls.server = sc.Server(workers=1, queue_limit=8)
        cls.server.start()

    @classmethod
    def tearDownClass(cls):
        if cls.server is not None:
            cls.server.terminate()
            cls.server.cleanup()
        if not sc.keep_temp():
            shutil.rmtree(cls.work, ignore_errors=True)

    def run_cli(self, *args, token=ADMIN, server=None, expect=0, env=None, timeout=600, cwd=None):
        argv = [cli_bin(), "--server", server or self.server.address] + [str(a) for a in args]
        e = dict(os.environ)
        e.pop("FPXINT_TOKEN", None)
        if token:
            e["FPXINT_TOKEN"] = token
        if env:
            e.update(env)
        p = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=timeout,
                           cwd=cwd or self.work)
        r = Result(argv, p)
        if expect is not None:
            self.assertEqual(r.rc, expect, f"unexpected exit code\n{r}\n{self.server.log_tail(20)}")
        return r

    def need(self, key, test):
        if key not in self.state:
            self.fail(f"prerequisite {test} did not pass")
        return self.state[key]

    def assert_keys(self, doc, keys, what):
        missing = keys - set(doc)
        self.assertFalse(missing, f"{what} JSON lacks {sorted(missing)}: {json.dumps(doc)[:1500]}")

    def assert_error_doc(self, r, exit_code):
        doc = r.json()
        self.assertIn("error", doc, str(r))
        self.assert_keys(doc["error"], ERROR_KEYS, "error")
        self.assertEqual(doc["error"]["exit_code"], exit_code, str(r))


class CliE2E(CliTestCase):

    def test_00_help_and_usage(self):
        r = self.run_cli("--help")
        for cmd in ("upload", "quantize", "jobs", "download", "models", "infer", "health", "expand"):
            self.assertIn(cmd, r.out)
        self.assertIn("Exit codes", r.out)
        for cmd in (["upload"], ["quantize"], ["jobs", "list"], ["jobs", "watch"], ["download"],
                    ["models", "list"], ["infer"], ["health"], ["expand"], ["completion"]):
            h = self.run_cli(*cmd, "--help")
            self.assertIn("Usage", h.out, f"{cmd} --help")
        q = self.run_cli("quantize", "--help").out
        for flag in ("--model", "--granularity", "--bits", "--terms", "--grid", "--scale",
                     "--group-size", "--variant", "--act-bits", "--act-terms", "--truncate",
                     "--include", "--exclude", "--deploy-as", "--wait", "--max-rel-error"):
            self.assertIn(flag, q, f"quantize --help lacks {flag}")
        self.run_cli("nosuchcommand", expect=2)
        self.run_cli("quantize", "--bits", "9", expect=2)
        # Usage errors still give --json callers a document.
        r = self.run_cli("--json", "quantize", "--bits", "9", expect=2)
        self.assert_error_doc(r, 2)
        self.assertIn("--bits", r.json()["error"]["message"])
        self.run_cli("upload", "/nonexistent/file", "--name", "x", expect=2)

    def test_01_health(self):
        r = self.run_cli("--json", "health", token=None)
        doc = r.json()
        self.assert_keys(doc, HEALTH_KEYS, "health")
        self.assertEqual(doc["status"], "SERVING")
        self.assertTrue(doc["serving"])
        r = self.run_cli("health", "--service", "inference.GRPCInferenceService", token=None)
        self.assertIn("SERVING", r.out)
        # Nothing listens on port 1: exit 4 with the hint and a JSON error document.
        r = self.run_cli("--json", "health", server="127.0.0.1:1", expect=4)
        self.assert_error_doc(r, 4)
        self.assertIn("is fpxint-server running", r.err)

    def test_02_upload(self):
        path = sc.model_file("ocr", "ocr_cls.safetensors")
        r = self.run_cli("--json", "upload", path, "--name", "cls_weights")
        doc = r.json()
        self.assert_keys(doc, UPLOAD_KEYS, "upload")
        self.assertEqual(doc["model"], "cls_weights")
        self.assertEqual(doc["sha256"], sc.sha256_file(path))
        self.assertEqual(doc["format"], "SAFETENSORS")
        self.assertFalse(doc["deduplicated"])
        # The same bytes again under another name: stored once.
        doc2 = self.run_cli("--json", "upload", path, "--name", "cls_weights_again").json()
        self.assertTrue(doc2["deduplicated"])
        self.assertEqual(doc2["sha256"], doc["sha256"])
        # A TorchScript model with its input signature (format detected from the archive).
        pt = sc.model_file("fmnist", "fmnist_cnn.pt")
        doc3 = self.run_cli("--json", "upload", pt, "--name", "fmnist", "--input", "x:FP32:-1,1,28,28").json()
        self.assertEqual(doc3["format"], "TORCHSCRIPT")
        self.assertEqual(doc3["inputs"][0]["shape"], ["-1", "1", "28", "28"])
        # Human output.
        r = self.run_cli("upload", path, "--name", "cls_weights_3")
        self.assertRegex(r.out, r"uploaded cls_weights_3 .*safetensors")
        self.state["uploaded"] = doc

    def test_03_upload_errors(self):
        path = sc.model_file("ocr", "ocr_cls.safetensors")
        r = self.run_cli("--json", "upload", path, "--name", "x", token=None, expect=7)
        self.assert_error_doc(r, 7)
        self.assertIn("UNAUTHENTICATED", r.err)
        self.assertIn("FPXINT_TOKEN", r.err)
        r = self.run_cli("upload", path, "--name", "x", token=sc.TOKENS["infer"], expect=7)
        self.assertIn("PERMISSION_DENIED", r.err)
        r = self.run_cli("upload", path, "--name", "x", token="wrong-token-000000000", expect=7)
        r = self.run_cli("upload", path, "--name", "bad/name", expect=3)
        self.assertIn("name", r.err)
        r = self.run_cli("upload", path, "--name", "x", "--input", "x:FP32", expect=2)
        self.assertIn("NAME:DATATYPE:DIMS", r.err)
        junk = os.path.join(self.work, "junk.bin")
        with open(junk, "wb") as f:
            f.write(b"\x00" * 100)
        r = self.run_cli("upload", junk, "--name", "junk", expect=2)
        self.assertIn("--format", r.err)
        # Declared safetensors but not: the server refuses with INVALID_ARGUMENT (exit 3).
        r = self.run_cli("upload", junk, "--name", "junk", "--format", "safetensors", expect=3)
        self.assertIn("not a valid safetensors file", r.err)
        self.assertNotIn("/blobs/", r.err, "error messages must not reveal the server's paths")

    def test_04_quantize_tensor_json(self):
        self.need("uploaded", "test_02_upload")
        r = self.run_cli("--json", "quantize", "--model", "cls_weights", "--granularity", "tensor",
                         "--bits", "4", "--terms", "3", "--grid", "mid", "--scale", "group",
                         "--group-size", "32", "--wait")
        job = r.json()
        self.assert_keys(job, JOB_KEYS, "quantize")
        self.assertEqual(job["state"], "SUCCEEDED", str(r))
        self.assertTrue(job["id"].startswith("job-"))
        spec = job["spec"]
        self.assertEqual((spec["weight_bits"], spec["weight_terms"], spec["grid"], spec["scale"],
                          spec["group_size"]), (4, 3, "MID", "PER_GROUP", 32))
        kinds = sorted(a["kind"] for a in job["artifacts"])
        self.assertEqual(kinds, ["packed_safetensors", "report_json"])
        layers = job["report"]["layers"]
        self.assertGreater(len(layers), 5)
        # Every tensor's error falls with every term (the series converges).
        for l in layers:
            errs = [t["rel_fro"] for t in l["terms"]]
            self.assertEqual(len(errs), 3, l["name"])
            self.assertTrue(errs[0] > errs[1] > errs[2], f"{l['name']}: {errs}")
        self.state["tensor_job"] = job

    def test_04b_torch_state_dict(self):
        """A torch.save checkpoint: `upload` detects the format, a TENSOR job expands it."""
        import torch
        torch.manual_seed(3)
        pt = os.path.join(self.work, "checkpoint.pt")
        torch.save({"model": torch.nn.Linear(64, 32).state_dict(), "epoch": 7}, pt)
        doc = self.run_cli("--json", "upload", pt, "--name", "ckpt").json()
        self.assertEqual(doc["format"], "TORCH_STATE_DICT")
        job = self.run_cli("--json", "quantize", "--model", "ckpt", "--granularity", "tensor",
                           "--bits", "4", "--terms", "2", "--wait").json()
        self.assertEqual(job["state"], "SUCCEEDED", str(job))
        self.assertEqual([l["name"] for l in job["report"]["layers"]], ["model.weight"])
        # LAYER needs a TorchScript model: a usage-level refusal from the server (exit 3).
        r = self.run_cli("quantize", "--model", "ckpt", "--granularity", "layer", expect=3)
        self.assertIn("TORCHSCRIPT", r.err)

    def test_04c_transformer_checkpoint_preset(self):
        """A generated Llama-layout BF16 checkpoint (scripts/make_checkpoint.py): `--preset
        transformer` expands the projections only; the dequantized_safetensors download keeps
        every name, shape and dtype, the kept tensors' bytes, and the projections within the
        series' error; an --include naming lm_head expands it as well."""
        ck = os.path.join(self.work, "llama")
        summary = sc.make_checkpoint(ck, "BF16", layers=2, hidden=128, intermediate=344,
                                     vocab=500, seed=3)
        src = os.path.join(ck, "model.safetensors")
        self.run_cli("--json", "upload", src, "--name", "llama_bf16")
        # What the upload holds, as the generator reported it.
        got = self.run_cli("--json", "models", "get", "llama_bf16").json()["uploaded"]
        self.assertEqual(int(got["tensor_count"]), summary["tensors"])
        self.assertEqual(int(got["parameter_count"]), summary["parameters"])
        self.assertEqual({k: int(v) for k, v in got["dtypes"].items()}, {"BF16": summary["tensors"]})
        human = self.run_cli("models", "get", "llama_bf16").out
        self.assertIn(f"{summary['tensors']} tensors, {summary['parameters']} parameters (BF16 "
                      f"{summary['tensors']})", human)
        job = self.run_cli("--json", "quantize", "--model", "llama_bf16", "--granularity",
                           "tensor", "--bits", "4", "--terms", "2", "--preset", "transformer",
                           "--output-format", "dequantized_safetensors", "--wait").json()
        self.assertEqual(job["state"], "SUCCEEDED", json.dumps(job)[:2000])
        self.assertEqual(job["spec"].get("preset"), "transformer")
        expanded = {l["name"] for l in job["report"]["layers"]}
        projections = {f"model.layers.{i}.{p}.weight" for i in range(2)
                       for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                 "mlp.down_proj")}
        self.assertEqual(expanded, projections)
        out = os.path.join(self.work, "llama.dequantized.safetensors")
        self.run_cli("--json", "download", job["id"], "--kind", "dequantized_safetensors",
                     "-o", out)
        source, deq = read_bytes(src), read_bytes(out)
        sh, so = sc.st_header(source)
        dh, do = sc.st_header(deq)
        self.assertEqual(sorted(k for k in dh if k != "__metadata__"),
                         sorted(k for k in sh if k != "__metadata__"))

        def bf16(buf, h, off, name):
            a, b = h[name]["data_offsets"]
            u = np.frombuffer(buf[off + a:off + b], dtype="<u2").astype(np.uint32) << 16
            return u.view(np.float32).astype(np.float64)

        for name in (k for k in sh if k != "__metadata__"):
            self.assertEqual((dh[name]["dtype"], dh[name]["shape"]),
                             (sh[name]["dtype"], sh[name]["shape"]), name)
            a, b = sh[name]["data_offsets"]
            c, d = dh[name]["data_offsets"]
            if name not in expanded:
                self.assertEqual(deq[do + c:do + d], source[so + a:so + b], f"{name} changed")
                continue
            w, q = bf16(source, sh, so, name), bf16(deq, dh, do, name)
            rel = np.linalg.norm(w - q) / np.linalg.norm(w)
            self.assertLess(rel, 0.02, f"{name}: relative error {rel:.4f}")
            self.assertGreater(rel, 0, f"{name}: unchanged although expanded")
        # Asked for by name, lm_head is expanded despite the preset.
        job2 = self.run_cli("--json", "quantize", "--model", "llama_bf16", "--granularity",
                            "tensor", "--preset", "transformer", "--include", "proj|lm_head",
                            "--wait").json()
        self.assertEqual({l["name"] for l in job2["report"]["layers"]},
                         projections | {"lm_head.weight"})
        # The preset is for TENSOR jobs; a LAYER job names the field.
        self.need("uploaded", "test_02_upload")
        r = self.run_cli("--json", "quantize", "--model", "fmnist", "--granularity", "layer",
                         "--preset", "transformer", expect=3)
        self.assertIn("preset", r.err + r.out)

    def test_04d_model_directory(self):
        """A Hugging Face directory (2 BF16 shards, index, config and tokenizer files) uploads as
        one model; an upload cut short (the second shard not there yet) fails naming that shard,
        and running it again sends only what is missing. A group-128 W4x2 TENSOR job writes
        packed shards with model.fpxint.index.json and the dequantized directory, which
        `download --all` lays out as packed/ and dequantized/: sidecars and index as in the
        source, kept tensors byte for byte, and every expanded tensor equal to the BF16 rounding
        of the independent decoder's sum of the packed terms."""
        ck = os.path.join(self.work, "llama_dir")
        summary = sc.make_checkpoint(ck, "BF16", shards=2, layers=2, hidden=128, intermediate=344,
                                     vocab=500, seed=5)
        index = load_json(os.path.join(ck, "model.safetensors.index.json"))
        shards = sorted(set(index["weight_map"].values()))
        self.assertEqual(len(shards), 2)
        # An interrupted upload: the second shard is not there yet.
        partial = os.path.join(self.work, "llama_dir_partial")
        shutil.copytree(ck, partial)
        os.remove(os.path.join(partial, shards[1]))
        r = self.run_cli("--json", "upload", partial, "--name", "llama_dir", expect=3)
        self.assertIn(shards[1], r.out + r.err)
        up = self.run_cli("--json", "upload", ck, "--name", "llama_dir").json()
        self.assertEqual(up["format"], "HF_DIRECTORY")
        self.assertEqual(up["files_sent"], 1, "only the missing shard is sent again")
        self.assertEqual(up["files_already_stored"], len(os.listdir(ck)) - 1)
        self.assertEqual(int(up["tensor_count"]), summary["tensors"])
        self.assertEqual(int(up["parameter_count"]), summary["parameters"])
        roles = {f["path"]: f.get("role") for f in up["files"]}
        self.assertEqual(roles, {**{s: "shard" for s in shards},
                                 "model.safetensors.index.json": "index",
                                 "config.json": "sidecar", "generation_config.json": "sidecar",
                                 "tokenizer_config.json": "sidecar"})
        again = self.run_cli("--json", "upload", ck, "--name", "llama_dir").json()
        self.assertEqual(again["files_sent"], 0)
        human = self.run_cli("models", "get", "llama_dir").out
        self.assertIn(f"{len(os.listdir(ck))} files, 2 shards", human)
        self.assertIn(shards[0], human)

        job = self.run_cli("--json", "quantize", "--model", "llama_dir", "--granularity",
                           "tensor", "--bits", "4", "--terms", "2", "--scale", "group",
                           "--group-size", "128", "--preset", "transformer",
                           "--output-format", "dequantized_safetensors", "--wait").json()
        self.assertEqual(job["state"], "SUCCEEDED", json.dumps(job)[:2000])
        self.assertEqual([s["file"] for s in job["report"]["shards"]], shards)
        self.assertGreater(job["report"]["read_gb_per_second"], 0)
        shown = self.run_cli("jobs", "get", job["id"]).out
        self.assertIn("2 shards, source read at", shown)
        for s in job["report"]["shards"]:
            self.assertRegex(shown, re.escape(s["file"]) + r"\s+%d expanded\s+%d kept" %
                             (s.get("tensors", 0), s.get("copied", 0)))
        out = os.path.join(self.work, "llama_dir_out")
        self.run_cli("--json", "download", job["id"], "--all", "-o", out)
        self.assertEqual(sorted(os.listdir(os.path.join(out, "packed"))),
                         sorted(shards + ["model.fpxint.index.json"]))
        self.assertEqual(sorted(os.listdir(os.path.join(out, "dequantized"))),
                         sorted(os.listdir(ck)))
        for side in ("config.json", "generation_config.json", "tokenizer_config.json"):
            self.assertEqual(read_bytes(os.path.join(out, "dequantized", side)),
                             read_bytes(os.path.join(ck, side)), side)
        dindex = load_json(os.path.join(out, "dequantized", "model.safetensors.index.json"))
        self.assertEqual(dindex["weight_map"], index["weight_map"])
        pindex = load_json(os.path.join(out, "packed", "model.fpxint.index.json"))

        def tensors_of(path):
            buf = read_bytes(path)
            h, off = sc.st_header(buf)
            meta = h.pop("__metadata__", {})
            return buf, h, off, meta

        def bf16(buf, info, off):
            a, b = info["data_offsets"]
            u = np.frombuffer(buf[off + a:off + b], dtype="<u2").astype(np.uint32) << 16
            return u.view(np.float32).reshape(info["shape"])

        def to_bf16(x):  # round to nearest even, as the writer does
            u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            return (u.astype(np.uint32) << 16).view(np.float32)

        sys.path.insert(0, os.path.join(sc.REPO_ROOT, "tests", "integration"))
        from test_expand_cli import reconstruct  # the independent decoder  # noqa: E402
        np_types = {"U8": "u1", "I8": "i1", "F32": "<f4", "F64": "<f8"}
        expanded = {l["name"] for l in job["report"]["layers"]}
        self.assertEqual(len(expanded), 14)  # 2 layers x 7 projections
        for shard in shards:
            sbuf, sh, soff, _ = tensors_of(os.path.join(ck, shard))
            dbuf, dh, doff, _ = tensors_of(os.path.join(out, "dequantized", shard))
            pbuf, ph, poff, pmeta = tensors_of(os.path.join(out, "packed", shard))
            self.assertEqual(sorted(dh), sorted(sh))
            for name in ph:
                self.assertEqual(pindex["weight_map"].get(name), shard, name)
            packed = {}
            for name, info in ph.items():
                if info["dtype"] in np_types:
                    a, b = info["data_offsets"]
                    arr = np.frombuffer(pbuf[poff + a:poff + b], dtype=np_types[info["dtype"]])
                    packed[name] = (info["dtype"], arr.reshape(info["shape"]), a)
            for name, info in sh.items():
                self.assertEqual((dh[name]["dtype"], dh[name]["shape"]),
                                 (info["dtype"], info["shape"]), name)
                if name not in expanded:
                    a, b = info["data_offsets"]
                    c, d = dh[name]["data_offsets"]
                    self.assertEqual(dbuf[doff + c:doff + d], sbuf[soff + a:soff + b], name)
                    continue
                want = to_bf16(reconstruct(pmeta, packed, name, 2))
                got = bf16(dbuf, dh[name], doff)
                np.testing.assert_array_equal(got, want, err_msg=name)
                w = bf16(sbuf, info, soff).astype(np.float64)
                rel = np.linalg.norm(w - got) / np.linalg.norm(w)
                self.assertLess(rel, 0.02, name)

    def test_04e_fp8_directory_reads_exactly(self):
        """An F8_E4M3 checkpoint directory: the server reads each code as its exact value. A
        W8x3 expansion's independent reconstruction matches the codes decoded with the format's
        own table to about 1e-6, where any misread code would show as an O(1) error."""
        ck = os.path.join(self.work, "fp8_dir")
        sc.make_checkpoint(ck, "F8_E4M3", layers=1, hidden=64, intermediate=128, vocab=100, seed=2)
        up = self.run_cli("--json", "upload", ck, "--name", "fp8_dir").json()
        self.assertEqual({k: int(v) for k, v in up["dtypes"].items()}, {"F8_E4M3": int(up["tensor_count"])})
        job = self.run_cli("--json", "quantize", "--model", "fp8_dir", "--granularity", "tensor",
                           "--bits", "8", "--terms", "3", "--wait").json()
        self.assertEqual(job["state"], "SUCCEEDED", json.dumps(job)[:2000])
        out = os.path.join(self.work, "fp8_out")
        self.run_cli("--json", "download", job["id"], "--all", "-o", out)
        sys.path.insert(0, os.path.join(sc.REPO_ROOT, "scripts"))
        sys.path.insert(0, os.path.join(sc.REPO_ROOT, "tests", "integration"))
        from make_checkpoint import e4m3_table  # noqa: E402
        from test_expand_cli import reconstruct  # noqa: E402
        table = e4m3_table()
        src = read_bytes(os.path.join(ck, "model.safetensors"))
        sh, so = sc.st_header(src)
        pk = read_bytes(os.path.join(out, "packed", "model.safetensors"))
        ph, po = sc.st_header(pk)
        meta = ph.pop("__metadata__")
        np_types = {"U8": "u1", "I8": "i1", "F32": "<f4"}
        packed = {}
        for name, info in ph.items():
            if info["dtype"] in np_types:
                a, b = info["data_offsets"]
                packed[name] = (info["dtype"], np.frombuffer(pk[po + a:po + b], dtype=np_types[
                    info["dtype"]]).reshape(info["shape"]), a)
        expanded = [l["name"] for l in job["report"]["layers"]]
        self.assertGreater(len(expanded), 5)
        for name in expanded:
            a, b = sh[name]["data_offsets"]
            exact = table[np.frombuffer(src[so + a:so + b], dtype=np.uint8)].reshape(sh[name]["shape"])
            rec = reconstruct(meta, packed, name, 3)
            rel = np.linalg.norm(rec - exact) / np.linalg.norm(exact)
            self.assertLess(rel, 1e-5, name)

    def test_05_quantize_layer_deploy_human(self):
        self.need("uploaded", "test_02_upload")
        r = self.run_cli("quantize", "--model", "fmnist", "--granularity", "layer", "--bits", "4",
                         "--terms", "2", "--deploy-as", "fm_w4x2", "--wait")
        self.assertIn("SUCCEEDED", r.out)
        self.assertIn("deployed for inference as fm_w4x2 version 1", r.out)
        self.assertRegex(r.out, r"K_w=2\s+\d\.\d+e-0[2-4]")  # output error of 2 terms: 1e-2..1e-4
        # The layers' data-free sensitivity: the top of the ranking here, all of it in --json.
        self.assertIn("most sensitive layers per byte", r.out)
        self.assertRegex(r.out, r"K=1 \d\.\d\de-\d\d  K=2 \d\.\d\de-\d\d  \(\d\.\d\de[-+]\d\d per MiB")
        # Plain progress lines on a pipe (stderr is not a terminal here).
        self.assertRegex(r.err, r"job-\w+ RUNNING .*%")
        self.assertNotIn("\r", r.err)
        jid = re.search(r"job (job-\w+)", r.out).group(1)
        self.state["layer_job"] = jid
        doc = self.run_cli("--json", "jobs", "get", jid).json()
        sens = doc["report"]["sensitivity"]
        self.assertEqual({l["name"] for l in sens}, {l["name"] for l in doc["report"]["layers"]})
        per_mib = [l["error_per_mib"] for l in sens]
        self.assertEqual(per_mib, sorted(per_mib, reverse=True))
        for l in sens:
            self.assertEqual(len(l["rel_fro"]), 2, l)

    def test_05b_quantize_with_an_error_budget(self):
        """--target-rel-error: each layer gets its own K (between --min-terms and --max-terms,
        pins by --weight-terms-for); the probe output error meets the target, and the report
        compares the bytes with uniform K."""
        self.need("uploaded", "test_02_upload")
        r = self.run_cli("quantize", "--model", "fmnist", "--granularity", "layer",
                         "--target-rel-error", "0.01", "--max-terms", "3", "--wait",
                         "--deploy-as", "fm_budget")
        self.assertIn("SUCCEEDED", r.out)
        m = re.search(r"error budget: target 1\.000e-02, measured (\S+) \(estimated \S+\) "
                      r"with (.*); terms", r.out)
        self.assertIsNotNone(m, r.out)
        self.assertLessEqual(float(m.group(1)), 0.01)
        self.assertRegex(m.group(2), r"\d+ at K=\d")
        jid = re.search(r"job (job-\w+)", r.out).group(1)
        doc = self.run_cli("--json", "jobs", "get", jid).json()
        alloc = doc["report"]["allocation"]
        self.assertLessEqual(alloc["measured_rel_error"], 0.01)
        self.assertEqual([u["weight_terms"] for u in alloc["uniform"]], [1, 2, 3])
        ks = [l["weight_terms"] for l in doc["report"]["layers"]]
        self.assertTrue(all(1 <= k <= 3 for k in ks), ks)
        # `models get` shows each layer's K, as text and as JSON.
        got = self.run_cli("models", "get", "fm_budget")
        self.assertIn("terms      per layer, error budget 0.01", got.out)
        for l in doc["report"]["layers"]:
            self.assertIn(f"K={l['weight_terms']:<2} {l['name']}\n", got.out)
        dep = self.run_cli("--json", "models", "get", "fm_budget").json()["deployment"]
        self.assertEqual([t["weight_terms"] for t in dep["layer_terms"]], ks)
        # The mixed-K artifact through the independent reader: each layer holds exactly its K
        # terms, and the linear layers (no BatchNorm folded into them) reconstruct the model's
        # own weights with the error the report gives for that K.
        sys.path.insert(0, os.path.join(sc.REPO_ROOT, "tests", "integration"))
        from test_expand_cli import read_safetensors, reconstruct  # noqa: E402
        import torch  # Debian's python3-torch, to read the uploaded model's weights
        art = next(a for a in doc["artifacts"] if a["kind"] == "packed_safetensors")
        path = os.path.join(self.work, "fm_budget.safetensors")
        self.run_cli("--json", "download", art["artifact_id"], "-o", path)
        meta, tensors, _ = read_safetensors(path)
        fp = {n: p.detach().numpy().astype(np.float64)
              for n, p in torch.jit.load(sc.model_file("fmnist", "fmnist_cnn.pt")).named_parameters()}
        checked = 0
        for l in doc["report"]["layers"]:
            name, k = l["name"], l["weight_terms"]
            self.assertEqual(int(meta[name + ".terms"]), k, name)
            self.assertIn(f"{name}.t{k}.codes", tensors)
            self.assertNotIn(f"{name}.t{k + 1}.codes", tensors)
            if l["op"] != "linear":
                continue
            w = next(v for n, v in fp.items() if n.endswith(name.split(".")[-2] + ".weight"))
            got = reconstruct(meta, tensors, name, k)
            err = np.linalg.norm(got - w) / np.linalg.norm(w)
            self.assertAlmostEqual(err, l["terms"][k - 1]["rel_fro"],
                                   delta=1e-3 * l["terms"][k - 1]["rel_fro"])
            checked += 1
        self.assertGreaterEqual(checked, 2)
        # A pin, and a budget on a TENSOR job named as the mistake it is.
        first = doc["report"]["layers"][0]["name"]
        pinned = self.run_cli("--json", "quantize", "--model", "fmnist", "--granularity", "layer",
                              "--target-rel-error", "0.01", "--max-terms", "3",
                              "--weight-terms-for", re.escape(first) + "=3", "--wait").json()
        self.assertEqual(pinned["report"]["layers"][0]["weight_terms"], 3)
        r = self.run_cli("quantize", "--model", "fmnist", "--granularity", "tensor",
                         "--target-rel-error", "0.01", expect=3)
        self.assertIn("target_rel_error", r.err + r.out)

    def test_06_quantize_job_file(self):
        self.need("uploaded", "test_02_upload")
        spec = os.path.join(self.work, "w4a4.yaml")
        with open(spec, "w") as f:
            f.write("# activations too: W4A4 x 2\n"
                    "model: fmnist\n"
                    "granularity: layer\n"
                    "bits: 4\n"
                    "terms: 3          # overridden by --terms 2\n"
                    "act-bits: 4\n"
                    "act_terms: 2\n"
                    "scale: channel\n"
                    "deploy:\n"
                    "  enabled: true\n"
                    "  name: fm_w4a4x2\n")
        job = self.run_cli("--json", "quantize", "-f", spec, "--terms", "2", "--wait").json()
        self.assertEqual(job["state"], "SUCCEEDED")
        self.assertEqual((job["spec"]["weight_terms"], job["spec"]["act_bits"], job["spec"]["act_terms"]),
                         (2, 4, 2))
        self.assertEqual(job["report"]["deployed_name"], "fm_w4a4x2")
        # JSON job files work too.
        jspec = os.path.join(self.work, "t.json")
        with open(jspec, "w") as f:
            json.dump({"model": "cls_weights", "granularity": "TENSOR", "weight_bits": 8,
                       "weight_terms": 1}, f)
        job = self.run_cli("--json", "quantize", "-f", jspec, "--wait").json()
        self.assertEqual(job["state"], "SUCCEEDED")
        # Mistakes in a job file: exit 3 naming the key and what is accepted.
        bad = os.path.join(self.work, "bad.yaml")
        for text, needle in (("model: fmnist\nbogus: 1\n", "unknown key 'bogus'"),
                             ("model: fmnist\ngrid: weird\n", "accepted: sym, asym, mid"),
                             ("model: fmnist\nbits: four\n", "weight_bits"),
                             ("model: fmnist\n  granularity: layer\n", "line 2")):
            with open(bad, "w") as f:
                f.write(text)
            r = self.run_cli("quantize", "-f", bad, expect=3)
            self.assertIn(needle, r.err)
        r = self.run_cli("quantize", "--granularity", "layer", expect=2)
        self.assertIn("--model", r.err)
        # The server's own validation: LAYER needs a TorchScript model.
        r = self.run_cli("--json", "quantize", "--model", "cls_weights", "--granularity", "layer", expect=3)
        self.assert_error_doc(r, 3)

    def test_07_quality_gate(self):
        self.need("uploaded", "test_02_upload")
        # The server checks the gate before storing or deploying anything: the job is FAILED, with
        # its report and the measured value.
        r = self.run_cli("--json", "quantize", "--model", "fmnist", "--granularity", "layer",
                         "--bits", "2", "--terms", "1", "--max-rel-error", "0.01",
                         "--deploy-as", "gate-fail", expect=5)
        job = r.json()
        self.assertEqual(job["state"], "FAILED")
        self.assertIn("quality gate", job["error"])
        self.assertEqual(job.get("artifacts", []), [])
        gate = job["quality_gate"]
        self.assertFalse(gate["passed"])
        self.assertGreater(gate["rel_error"], 0.01)
        self.assertIn("quality gate FAILED", r.err)
        r = self.run_cli("--json", "quantize", "--model", "fmnist", "--granularity", "layer",
                         "--bits", "4", "--terms", "3", "--max-rel-error", "0.01")
        gate = r.json()["quality_gate"]
        self.assertTrue(gate["passed"])
        self.assertLess(gate["rel_error"], 0.01)

    def test_08_jobs(self):
        tjob = self.need("tensor_job", "test_04_quantize_tensor_json")
        doc = self.run_cli("--json", "jobs", "list").json()
        ids = [j["id"] for j in doc["jobs"]]
        self.assertIn(tjob["id"], ids)
        for j in doc["jobs"]:
            self.assert_keys(j, JOB_KEYS, "jobs list")
        doc = self.run_cli("--json", "jobs", "list", "--state", "succeeded", "--limit", "2").json()
        self.assertEqual(len(doc["jobs"]), 2)
        self.assertTrue(all(j["state"] == "SUCCEEDED" for j in doc["jobs"]))
        self.assertTrue(doc["next_page_token"])
        got = self.run_cli("--json", "jobs", "get", tjob["id"]).json()
        self.assertEqual(got["id"], tjob["id"])
        self.assertEqual(got["artifacts"], tjob["artifacts"])
        r = self.run_cli("jobs", "list")
        self.assertIn(tjob["id"], r.out)
        r = self.run_cli("jobs", "get", tjob["id"])
        self.assertIn("SUCCEEDED", r.out)
        # The replica that ran it (the server's default id, hostname:pid).
        self.assertRegex(got["replica"], r"^[^:]+:\d+$")
        self.assertIn(f"on replica {got['replica']}", r.out)
        r = self.run_cli("--json", "jobs", "get", "job-doesnotexist", expect=3)
        self.assert_error_doc(r, 3)
        self.assertIn("NOT_FOUND", r.err)
        r = self.run_cli("jobs", "watch", tjob["id"])  # already finished: prints and exits 0
        self.assertIn("SUCCEEDED", r.out)
        r = self.run_cli("jobs", "cancel", tjob["id"], expect=3)  # nothing to cancel
        self.assertIn("FAILED_PRECONDITION", r.err)

    def test_09_cancel(self):
        self.need("uploaded", "test_02_upload")
        # One worker: a long job runs (MODEL expansion of the OCR recognizer with 16 terms, ~9 s
        # here), the next one waits in the queue and is cancelled there; then the running one.
        rec = sc.model_file("ocr", "ocr_rec.pt")
        self.run_cli("upload", rec, "--name", "rec_net", "--input", "x:FP32:1,3,48,320")
        long_job = self.run_cli("--json", "quantize", "--model", "rec_net", "--granularity",
                                "model", "--bits", "2", "--terms", "16").json()
        deadline = time.monotonic() + 60
        while self.run_cli("--json", "jobs", "get", long_job["id"]).json()["state"] == "QUEUED":
            self.assertLess(time.monotonic(), deadline, "the long job never started")
            time.sleep(0.05)
        queued = self.run_cli("--json", "quantize", "--model", "cls_weights", "--granularity",
                              "tensor").json()
        self.assertEqual(queued["state"], "QUEUED")
        r = self.run_cli("jobs", "cancel", queued["id"])
        self.assertIn("cancel", r.out)
        r = self.run_cli("--json", "jobs", "watch", queued["id"], expect=6)
        self.assertEqual(r.json()["state"], "CANCELLED")
        self.assertIn("CANCELLED", r.err)
        # The running one stops promptly (cooperative cancel between layers and terms).
        t0 = time.monotonic()
        r = self.run_cli("--json", "jobs", "cancel", long_job["id"], "--wait")
        self.assertEqual(r.json()["state"], "CANCELLED", str(r))
        # Two CLI start-ups plus the job's next cancellation poll; generous for a loaded machine.
        self.assertLess(time.monotonic() - t0, 20.0, "cancel was not prompt")
        self.run_cli("jobs", "watch", long_job["id"], expect=6)

    def test_10_download(self):
        tjob = self.need("tensor_job", "test_04_quantize_tensor_json")
        art = next(a for a in tjob["artifacts"] if a["kind"] == "packed_safetensors")
        out = os.path.join(self.work, "dl", "a.safetensors")
        os.makedirs(os.path.dirname(out))
        doc = self.run_cli("--json", "download", tjob["id"], "-o", out).json()
        self.assert_keys(doc, DOWNLOAD_KEYS, "download")
        self.assertEqual(doc["sha256"], art["sha256"])
        self.assertEqual(sc.sha256_file(out), art["sha256"])
        self.assertFalse(os.path.exists(out + ".part"))
        data = read_bytes(out)
        # Resume: a .part holding the first third.
        out2 = os.path.join(self.work, "dl", "b.safetensors")
        with open(out2 + ".part", "wb") as f:
            f.write(data[: len(data) // 3])
        doc = self.run_cli("--json", "download", art["artifact_id"], "-o", out2,
                           "--chunk-bytes", "65536").json()
        self.assertEqual(doc["resumed_from"], len(data) // 3)
        self.assertEqual(sc.sha256_file(out2), art["sha256"])
        # A corrupt .part cannot be resumed: detected by SHA-256, discarded, downloaded again.
        out3 = os.path.join(self.work, "dl", "c.safetensors")
        with open(out3 + ".part", "wb") as f:
            f.write(b"garbage" + data[7: len(data) // 2])
        doc = self.run_cli("--json", "download", art["artifact_id"], "-o", out3).json()
        self.assertEqual(sc.sha256_file(out3), art["sha256"])
        # Already there: nothing to do.
        doc = self.run_cli("--json", "download", tjob["id"], "-o", out).json()
        self.assertTrue(doc["already_present"])
        # An artifact id into a directory: the file gets the artifact's own name.
        d1 = os.path.join(self.work, "dl", "by_id")
        os.makedirs(d1)
        doc = self.run_cli("--json", "download", art["artifact_id"], "-o", d1).json()
        self.assertEqual(doc["path"], os.path.join(d1, art["file_name"]))
        self.assertEqual(sc.sha256_file(doc["path"]), art["sha256"])
        # Every artifact of a job into a new directory.
        d = os.path.join(self.work, "dl", "all")
        doc = self.run_cli("--json", "download", tjob["id"], "--all", "-o", d).json()
        self.assertEqual(sorted(os.listdir(d)), sorted(a["file_name"] for a in tjob["artifacts"]))
        report = load_json(os.path.join(d, next(a["file_name"] for a in tjob["artifacts"]
                                                  if a["kind"] == "report_json")))
        self.assertIn("result", report)
        r = self.run_cli("download", "art-doesnotexist", "-o", os.path.join(self.work, "x"), expect=3)
        self.assertIn("NOT_FOUND", r.err)
        r = self.run_cli("download", tjob["id"], "--kind", "basis_torchscript", expect=3)
        self.assertIn("has no artifact of kind", r.err)

    def test_11_infer(self):
        self.need("layer_job", "test_05_quantize_layer_deploy_human")
        rng = np.random.RandomState(7)
        x = rng.rand(2, 1, 28, 28).astype(np.float32)
        np.save(os.path.join(self.work, "x.npy"), x)
        x.tofile(os.path.join(self.work, "x.raw"))
        with open(os.path.join(self.work, "x.json"), "w") as f:
            json.dump({"shape": list(x.shape), "data": x.ravel().tolist()}, f)
        with open(os.path.join(self.work, "nested.json"), "w") as f:
            json.dump(x.tolist(), f)
        docs = []
        for args in (["-i", "x.npy"], ["-i", "x.json"], ["-i", "nested.json"],
                     ["-i", "x.raw", "--shape", "2,1,28,28"]):
            doc = self.run_cli("--json", "infer", "fm_w4x2", *args).json()
            self.assert_keys(doc, INFER_KEYS, "infer")
            docs.append(doc)
        out0 = np.array(docs[0]["outputs"][0]["data"], dtype=np.float32).reshape(docs[0]["outputs"][0]["shape"])
        self.assertEqual(out0.shape, (2, 10))
        for d in docs[1:]:
            np.testing.assert_array_equal(np.array(d["outputs"][0]["data"], dtype=np.float32).reshape(2, 10), out0)
        self.assertEqual(docs[0]["outputs"][0]["argmax_last_axis"], out0.argmax(1).tolist())
        # -o saves an .npy NumPy reads back; --terms 1 (any-precision) gives a different answer.
        npy = os.path.join(self.work, "y.npy")
        r = self.run_cli("infer", "fm_w4x2", "-i", "x.npy", "-o", npy, "--repeat", "3")
        self.assertIn("3 runs", r.out)
        np.testing.assert_array_equal(np.load(npy), out0)
        one = self.run_cli("--json", "infer", "fm_w4x2", "-i", "x.npy", "--terms", "1").json()
        out1 = np.array(one["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
        self.assertGreater(np.abs(out1 - out0).max(), 0)
        self.assertLess(np.abs(out1 - out0).max(), np.abs(out0).max())
        # Bad inputs: clear errors, right exit codes.
        r = self.run_cli("infer", "fm_w4x2", "-i", "x.raw", expect=2)
        self.assertIn("--shape", r.err)
        r = self.run_cli("infer", "fm_w4x2", "-i", "x.raw", "--shape", "3,1,28,28", expect=3)
        self.assertIn("bytes", r.err)
        np.save(os.path.join(self.work, "bad.npy"), np.zeros((1, 1, 27, 28), np.float32))
        r = self.run_cli("infer", "fm_w4x2", "-i", "bad.npy", expect=3)
        self.assertIn("INVALID_ARGUMENT", r.err)
        with open(os.path.join(self.work, "trunc.npy"), "wb") as f:
            f.write(read_bytes(os.path.join(self.work, "x.npy"))[:300])
        r = self.run_cli("infer", "fm_w4x2", "-i", "trunc.npy", expect=3)
        self.assertIn("npy", r.err)
        r = self.run_cli("infer", "no_such_model", "-i", "x.npy", expect=3)
        self.assertIn("NOT_FOUND", r.err)
        r = self.run_cli("infer", "fm_w4x2", "-i", "x.npy", token=None, expect=7)

    def test_11b_dynamic_batching(self):
        """--max-batch-size and friends deploy a version that batches concurrent requests;
        `models get` shows the setting, and a request above the batch size is refused."""
        self.need("uploaded", "test_02_upload")
        r = self.run_cli("quantize", "--model", "fmnist", "--granularity", "layer", "--wait",
                         "--deploy-as", "fm_batch", "--max-batch-size", "8",
                         "--preferred-batch-size", "4", "--max-queue-delay-us", "2000")
        self.assertIn("SUCCEEDED", r.out)
        got = self.run_cli("models", "get", "fm_batch")
        self.assertIn("batching   up to 8 rows per pass, preferred 4, waiting at most 2000 µs",
                      got.out)
        dep = self.run_cli("--json", "models", "get", "fm_batch").json()["deployment"]
        self.assertEqual(dep["batching"], {"max_batch_size": 8, "preferred_batch_size": [4],
                                           "max_queue_delay_microseconds": "2000"})
        x = np.random.RandomState(9).rand(2, 1, 28, 28).astype(np.float32)
        np.save(os.path.join(self.work, "xb.npy"), x)
        doc = self.run_cli("--json", "infer", "fm_batch", "-i", "xb.npy").json()
        self.assertEqual(doc["outputs"][0]["shape"], [2, 10])
        np.save(os.path.join(self.work, "big.npy"), np.zeros((9, 1, 28, 28), np.float32))
        r = self.run_cli("infer", "fm_batch", "-i", "big.npy", expect=3)
        self.assertIn("max_batch_size", r.err)
        # The flags belong to a deployment; the server names a size it does not take.
        r = self.run_cli("quantize", "--model", "fmnist", "--granularity", "layer",
                         "--max-batch-size", "8", expect=2)
        self.assertIn("--deploy", r.err)
        r = self.run_cli("quantize", "--model", "fmnist", "--granularity", "layer",
                         "--deploy-as", "fm_batch2", "--max-batch-size", "4",
                         "--preferred-batch-size", "6", expect=3)
        self.assertIn("preferred_batch_size: 6", r.err)

    def test_11c_folded_terms(self):
        """Digits weights and activations (W4A4 x 2, mid grid): the job report and `models get`
        say which layers run every term product as one u8 x s8 product; the version serves
        the same answer as the dequantized network within float rounding."""
        self.need("uploaded", "test_02_upload")
        folded = ["--grid", "mid", "--variant", "digits", "--act-bits", "4", "--act-terms", "2",
                  "--act-grid", "mid", "--act-variant", "digits"]
        job = self.run_cli("--json", "quantize", "--model", "fmnist", "--granularity", "layer",
                           *folded, "--deploy-as", "fm_folded", "--wait").json()
        self.assertEqual(job["state"], "SUCCEEDED")
        self.assertEqual(job["spec"]["act_variant"], "DIGITS")
        self.assertTrue(job["report"]["wa_products"].startswith(
            "folded: each linear layer and 1x1 convolution runs its 4 term products"),
            job["report"]["wa_products"])
        shown = self.run_cli("jobs", "get", job["id"]).out
        self.assertIn("W×A products: folded", shown)
        dep = self.run_cli("--json", "models", "get", "fm_folded").json()["deployment"]
        self.assertGreaterEqual(dep["folded_layers"], 1)
        self.assertEqual(dep.get("integer_layers", 0), 0)
        got = self.run_cli("models", "get", "fm_folded").out
        self.assertIn("%d layers folded" % dep["folded_layers"], got)
        # fc1's ReLU runs in the folded product's epilogue; the ReLUs after the two 3x3
        # convolutions (not folded: weight-only fpxint::conv2d on the expanded input) as their
        # one-step tails.
        self.assertEqual(dep["fused_post_ops"], 1)
        self.assertEqual(dep["fused_tail_steps"], 2)
        self.assertIn("layers with the following ReLU or hardswish in their epilogue: 1; "
                      "elementwise ops after packed layers run with their layer: 2", got)
        x = np.random.RandomState(11).rand(3, 1, 28, 28).astype(np.float32)
        np.save(os.path.join(self.work, "xf.npy"), x)
        doc = self.run_cli("--json", "infer", "fm_folded", "-i", "xf.npy").json()
        self.assertEqual(doc["outputs"][0]["shape"], [3, 10])
        # Rescaled activations on the same weights: separate products, and the report says why.
        job = self.run_cli("--json", "quantize", "--model", "fmnist", "--granularity", "layer",
                           *folded[:-2], "--wait").json()
        self.assertIn("not folded: folding needs variant digits", job["report"]["wa_products"])
        # Digits activations need the mid grid: the server names the field.
        r = self.run_cli("quantize", "--model", "fmnist", "--granularity", "layer",
                         "--act-bits", "4", "--act-terms", "2", "--act-variant", "digits",
                         expect=3)
        self.assertIn("act_variant", r.err)

    def test_12_models(self):
        self.need("layer_job", "test_05_quantize_layer_deploy_human")
        doc = self.run_cli("--json", "models", "list").json()
        self.assert_keys(doc, {"uploaded", "served"}, "models list")
        for m in doc["uploaded"]:
            self.assert_keys(m, {"name", "sha256", "format", "size_bytes"}, "models list: uploaded")
        for m in doc["served"]:
            self.assert_keys(m, {"name", "version", "state", "reason"}, "models list: served")
        self.assertIn("fmnist", [m["name"] for m in doc["uploaded"]])
        served = {m["name"]: m for m in doc["served"]}
        self.assertEqual(served["fm_w4x2"]["state"], "READY")
        doc = self.run_cli("--json", "models", "get", "fm_w4x2").json()
        self.assert_keys(doc, {"uploaded", "served"}, "models get")
        self.assert_keys(doc["served"], {"name", "versions", "platform", "inputs", "outputs"},
                         "models get: served")
        self.assertEqual(doc["served"]["inputs"][0]["datatype"], "FP32")
        self.assertIsNone(doc["uploaded"])
        doc = self.run_cli("--json", "models", "get", "fmnist").json()
        self.assertEqual(doc["uploaded"]["name"], "fmnist")
        self.assert_keys(doc["uploaded"], {"name", "sha256", "format", "size_bytes"}, "models get")
        doc = self.run_cli("--json", "models", "unload", "fm_w4x2").json()
        self.assertEqual(doc, {"model": "fm_w4x2", "result": "unloaded"})
        self.run_cli("infer", "fm_w4x2", "-i", "x.npy", expect=3)
        doc = self.run_cli("--json", "models", "load", "fm_w4x2").json()
        self.assertEqual(doc, {"model": "fm_w4x2", "result": "loaded"})
        self.run_cli("infer", "fm_w4x2", "-i", "x.npy")
        self.run_cli("models", "unload", "fm_w4x2", token=sc.TOKENS["quantize"], expect=7)
        doc = self.run_cli("--json", "models", "delete", "cls_weights_3").json()
        self.assertEqual(doc, {"model": "cls_weights_3", "result": "deleted"})
        names = [m["name"] for m in self.run_cli("--json", "models", "list").json()["uploaded"]]
        self.assertNotIn("cls_weights_3", names)
        r = self.run_cli("models", "get", "nothing_here", expect=3)
        self.assertIn("no uploaded or served model", r.err)
        r = self.run_cli("models", "list")
        self.assertIn("served models", r.out)

    def pty(self, cmd, env):
        """Runs `cmd` under `script` (a pseudo-terminal); stdout keeps its \r (bytes, decoded)."""
        p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, env=env,
                           timeout=600, cwd=self.work)
        p.stdout = p.stdout.decode("utf-8", "replace")
        self.assertEqual(p.returncode, 0, p.stdout[-3000:])
        return p

    def test_13_progress_on_a_terminal(self):
        self.need("uploaded", "test_02_upload")
        if shutil.which("script") is None:
            self.fail("`script` (util-linux) is needed to give the CLI a pseudo-terminal")
        env = dict(os.environ, FPXINT_TOKEN=ADMIN, COLUMNS="100")
        # The upload's bar (hashing, then bytes sent).
        cmd = (f"{cli_bin()} --server {self.server.address} upload "
               f"{sc.model_file('ocr', 'ocr_rec.safetensors')} --name rec_tty")
        p = self.pty(cmd, env)
        self.assertIn("uploading", p.stdout)
        cmd = (f"{cli_bin()} --server {self.server.address} quantize --model rec_tty "
               f"--granularity tensor --bits 4 --terms 3 --wait")
        p = self.pty(cmd, env)
        # A bar redrawn in place with \r: "[#####.....]  42% ..." and the final summary.
        self.assertRegex(p.stdout, r"\r\[[#.]{24}\]\s+\d+%")
        self.assertIn("SUCCEEDED", p.stdout)
        # --quiet: nothing but errors.
        r = self.run_cli("--quiet", "quantize", "--model", "cls_weights", "--granularity", "tensor",
                         "--wait")
        self.assertEqual((r.out, r.err), ("", ""))

    def test_14_timeout_and_completion(self):
        r = self.run_cli("--timeout", "0.000001", "jobs", "list", expect=4)
        self.assertIn("DEADLINE_EXCEEDED", r.err)
        r = self.run_cli("completion", "bash")
        path = os.path.join(self.work, "fpxint.bash")
        with open(path, "w") as f:
            f.write(r.out)
        p = subprocess.run(["bash", "-c", f"source {path} && complete -p fpxint && "
                            "COMP_WORDS=(fpxint quantize --gr) COMP_CWORD=2 && _fpxint && "
                            "echo \"${COMPREPLY[@]}\" && COMP_WORDS=(fpxint quantize --granularity '') "
                            "COMP_CWORD=3 && _fpxint && echo \"${COMPREPLY[@]}\""],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("complete -F _fpxint fpxint", p.stdout)
        self.assertIn("--granularity", p.stdout)
        self.assertIn("tensor layer model", p.stdout)

    def test_15_pipeline_step(self):
        self.need("uploaded", "test_02_upload")
        step = os.path.join(sc.REPO_ROOT, "deploy", "pipeline", "fpxint-quantize-step.sh")
        env = dict(os.environ, FPXINT_BIN=cli_bin(), FPXINT_SERVER=self.server.address,
                   FPXINT_TOKEN=ADMIN)
        model = sc.model_file("fmnist", "fmnist_cnn.pt")

        def run(out, gate, *extra):
            return subprocess.run([step, "--model-file", model, "--name", "fm_step", "--input",
                                   "x:FP32:-1,1,28,28", "--out", out, "--max-rel-error", gate,
                                   "--granularity", "layer", "--bits", "4", *extra],
                                  capture_output=True, text=True, env=env, timeout=600)

        ok_dir = os.path.join(self.work, "step_ok")
        p = run(ok_dir, "0.02", "--terms", "2")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        job = load_json(os.path.join(ok_dir, "job.json"))
        self.assertTrue(job["quality_gate"]["passed"])
        self.assertEqual(read_text(os.path.join(ok_dir, "state")).strip(), "SUCCEEDED")
        self.assertEqual(read_text(os.path.join(ok_dir, "job_id")).strip(), job["id"])
        self.assertAlmostEqual(float(read_text(os.path.join(ok_dir, "rel_error"))),
                               job["quality_gate"]["rel_error"], places=12)
        for a in job["artifacts"]:
            self.assertEqual(sc.sha256_file(os.path.join(ok_dir, a["file_name"])), a["sha256"])
        # Too strict a threshold fails the step (exit 5) and still leaves the record behind.
        bad_dir = os.path.join(self.work, "step_bad")
        p = run(bad_dir, "0.0001", "--terms", "1")
        self.assertEqual(p.returncode, 5, p.stdout + p.stderr)
        self.assertIn("FAILED", p.stderr)
        job = load_json(os.path.join(bad_dir, "job.json"))
        self.assertFalse(job["quality_gate"]["passed"])
        self.assertGreater(float(read_text(os.path.join(bad_dir, "rel_error"))), 0.0001)
        # An error budget: the layers' K chosen to meet the target, checked by the same gate.
        budget_dir = os.path.join(self.work, "step_budget")
        p = run(budget_dir, "0.02", "--target-rel-error", "0.01")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        job = load_json(os.path.join(budget_dir, "job.json"))
        self.assertLessEqual(job["report"]["allocation"]["measured_rel_error"], 0.01)
        self.assertTrue(job["quality_gate"]["passed"])
        # Missing inputs are usage errors.
        p = subprocess.run([step, "--name", "x", "--out", bad_dir], capture_output=True, text=True, env=env)
        self.assertEqual(p.returncode, 2)
        self.assertIn("--model-file", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
