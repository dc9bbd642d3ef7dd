"""Helpers for the fpxint-server end-to-end tests.

Written against the public contract only (proto/fpxint/v1/quantizer.proto,
proto/inference/grpc_service.proto, proto/grpc/health/v1/health.proto and docs/FORMAT.md):

  * stub generation with grpc_tools.protoc into a temporary directory,
  * starting / stopping a real `fpxint-server` on 127.0.0.1:0 (port file),
  * a small client wrapping the three services with bearer-token metadata,
  * a tiny numpy safetensors reader/writer.

Environment:
  FPXINT_SERVER_BIN   path of fpxint-server (default: <repo>/build/bin/fpxint-server)
  FPXINT_MODELS_DIR   real models (default: ~/.cache/fpxint/models)
  FPXINT_PROTO_DIR    protos (default: <repo>/proto)
  FPXINT_E2E_KEEP=1   keep temporary data directories and server logs
"""

import atexit
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import grpc

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHUNK = 1 << 20  # upload chunk size (1 MiB)
MAX_MSG = 64 << 20

TOKENS = {
    "quantize": "e2e-quantize-token-7f3a",
    "infer": "e2e-infer-token-91c2",
    "admin": "e2e-admin-token-c0d4",
}


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------

def server_bin():
    path = os.environ.get("FPXINT_SERVER_BIN") or os.path.join(REPO_ROOT, "build", "bin", "fpxint-server")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise AssertionError(
            f"fpxint-server binary not found or not executable: {path!r} "
            "(set FPXINT_SERVER_BIN to the built server)")
    return path


def proto_dir():
    return os.environ.get("FPXINT_PROTO_DIR") or os.path.join(REPO_ROOT, "proto")


def models_dir():
    return os.environ.get("FPXINT_MODELS_DIR") or os.path.expanduser("~/.cache/fpxint/models")


def model_file(*parts):
    """A real model file; FAILS (never skips) when it is missing."""
    path = os.path.join(models_dir(), *parts)
    if not os.path.isfile(path):
        raise AssertionError(
            f"required model file is missing: {path} (FPXINT_MODELS_DIR={models_dir()!r}; "
            "stage the models with the project's fetch script)")
    return path


def keep_temp():
    return os.environ.get("FPXINT_E2E_KEEP") == "1"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK * 4)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Stubs
# ----------------------------------------------------------------------------------------------

class Protos:
    """Generated modules: q (quantizer_pb2), qg (quantizer_pb2_grpc), inf, infg, health."""

    _cached = None

    @classmethod
    def load(cls):
        if cls._cached is None:
            cls._cached = cls()
        return cls._cached

    def __init__(self):
        pdir = proto_dir()
        files = ["fpxint/v1/quantizer.proto", "inference/grpc_service.proto", "grpc/health/v1/health.proto"]
        for f in files:
            if not os.path.isfile(os.path.join(pdir, f)):
                raise AssertionError(f"proto file missing: {os.path.join(pdir, f)}")
        self.out_dir = tempfile.mkdtemp(prefix="fpxint-e2e-stubs-")
        if not keep_temp():
            atexit.register(shutil.rmtree, self.out_dir, True)
        cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", pdir,
               f"--python_out={self.out_dir}", f"--grpc_python_out={self.out_dir}"] + files
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"protoc failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
        if self.out_dir not in sys.path:
            sys.path.insert(0, self.out_dir)
        self.q = importlib.import_module("fpxint.v1.quantizer_pb2")
        self.qg = importlib.import_module("fpxint.v1.quantizer_pb2_grpc")
        self.inf = importlib.import_module("inference.grpc_service_pb2")
        self.infg = importlib.import_module("inference.grpc_service_pb2_grpc")
        # The health stubs live in package `grpc.health.v1`, which would collide with the grpcio
        # package `grpc`: load the message module by path and call the method by its full name.
        hpath = os.path.join(self.out_dir, "grpc", "health", "v1", "health_pb2.py")
        spec = importlib.util.spec_from_file_location("fpxint_e2e_health_pb2", hpath)
        self.health = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.health)


# ----------------------------------------------------------------------------------------------
# Server process
# ----------------------------------------------------------------------------------------------

def write_token_file(path, extra_lines=()):
    with open(path, "w") as f:
        f.write("# fpxint e2e tokens: <token> <role>[,<role>...]\n")
        f.write(f"{TOKENS['quantize']} quantize\n")
        f.write("\n")
        f.write(f"{TOKENS['infer']} infer\n")
        f.write(f"{TOKENS['admin']} admin\n")
        for line in extra_lines:
            f.write(line + "\n")


class Server:
    """A real fpxint-server on 127.0.0.1:0. `root` holds data/, tokens, port file and logs."""

    def __init__(self, root=None, workers=2, queue_limit=16, max_upload_bytes=512 << 20,
                 extra_args=(), data_dir=None):
        self.root = root or tempfile.mkdtemp(prefix="fpxint-e2e-")
        self.data_dir = data_dir or os.path.join(self.root, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        self.token_file = os.path.join(self.root, "tokens.txt")
        if not os.path.exists(self.token_file):
            write_token_file(self.token_file)
        self.workers = workers
        self.queue_limit = queue_limit
        self.max_upload_bytes = max_upload_bytes
        self.extra_args = list(extra_args)
        self.proc = None
        self.address = None
        self.starts = 0
        self.stdout_path = self.stderr_path = None

    def argv(self, port_file):
        return [server_bin(), "--listen", "127.0.0.1:0", "--data-dir", self.data_dir,
                "--workers", str(self.workers), "--queue-limit", str(self.queue_limit),
                "--max-upload-bytes", str(self.max_upload_bytes), "--token-file", self.token_file,
                "--port-file", port_file, "--metrics-listen", "127.0.0.1:0",
                "--metrics-port-file", port_file + ".metrics"] + self.extra_args

    def start(self, timeout=60.0):
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        self.starts += 1
        port_file = os.path.join(self.root, f"port{self.starts}.txt")
        if os.path.exists(port_file):
            os.unlink(port_file)
        self.stdout_path = os.path.join(self.root, f"server{self.starts}.stdout.log")
        self.stderr_path = os.path.join(self.root, f"server{self.starts}.stderr.log")
        argv = self.argv(port_file)
        self.cmdline = " ".join(argv)
        with open(self.stdout_path, "wb") as so, open(self.stderr_path, "wb") as se:
            self.proc = subprocess.Popen(argv, stdout=so, stderr=se, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(
                    f"fpxint-server exited with code {rc} before writing its port file\n"
                    f"command: {self.cmdline}\n{self.log_tail()}")
            if os.path.exists(port_file):
                with open(port_file) as f:
                    text = f.read()
                if text.endswith("\n") or ":" in text:
                    addr = text.strip()
                    if addr.startswith("127.0.0.1:") and addr.rsplit(":", 1)[1].isdigit():
                        self.address = addr
                        mfile = port_file + ".metrics"
                        self.metrics_address = None
                        if os.path.exists(mfile):
                            with open(mfile) as f:
                                self.metrics_address = f.read().strip()
                        break
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"fpxint-server did not write its port file within {timeout:.0f} s\n"
                    f"command: {self.cmdline}\n{self.log_tail()}")
            time.sleep(0.05)
        return self.address

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines=40):
        out = []
        for label, path in (("stderr", self.stderr_path), ("stdout", self.stdout_path)):
            if path and os.path.exists(path):
                with open(path, "rb") as f:
                    data = f.read().decode("utf-8", "replace").splitlines()
                out.append(f"--- server {label} (last {min(lines, len(data))} of {len(data)} lines, "
                           f"{path}) ---")
                out.extend(data[-lines:])
        return "\n".join(out)

    def terminate(self, timeout=30.0):
        """SIGTERM; returns (exit code, seconds). Kills with SIGKILL after the timeout."""
        if not self.alive():
            return (self.proc.returncode if self.proc else None), 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None, time.monotonic() - t0
        return rc, time.monotonic() - t0

    def kill(self):
        """SIGKILL (kill -9) the server process this object started."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def cleanup(self):
        self.kill()
        if keep_temp():
            sys.stderr.write(f"[e2e] kept server directory {self.root}\n")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------

def rpc_code(err):
    return err.code() if isinstance(err, grpc.RpcError) else None


def rpc_desc(err):
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return repr(err)


class RpcAssertions:
    """Assertions on RPC outcomes for unittest.TestCase subclasses that define tail() (the server
    log excerpt appended to failures)."""

    def call(self, fn, *args, **kw):
        """fn(*args) with the server's log tail on an unexpected RpcError."""
        try:
            return fn(*args, **kw)
        except grpc.RpcError as e:
            self.fail(f"unexpected RPC error {rpc_desc(e)}{self.tail()}")

    def refused(self, codes, fn, *args, contains=(), **kw):
        """fn must fail with one of `codes` (a StatusCode or a tuple); `contains`: the message must
        mention one of these (case-insensitive). Returns the error."""
        codes = codes if isinstance(codes, tuple) else (codes,)
        try:
            res = fn(*args, **kw)
            if hasattr(res, "__iter__") and not hasattr(res, "DESCRIPTOR"):
                res = list(res)
        except grpc.RpcError as e:
            self.assertIn(e.code(), codes, f"expected {'/'.join(c.name for c in codes)}, got {rpc_desc(e)}"
                          + self.tail())
            if contains:
                msg = (e.details() or "").lower()
                self.assertTrue(any(x.lower() in msg for x in contains),
                                f"{e.code().name} {e.details()!r} should mention one of {list(contains)}")
            return e
        self.fail(f"expected {'/'.join(c.name for c in codes)}, the call succeeded: {str(res)[:300]}"
                  + self.tail())


class Client:
    def __init__(self, address, token="admin", protos=None):
        self.p = protos or Protos.load()
        self.address = address
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MSG),
            ("grpc.max_send_message_length", MAX_MSG),
        ])
        grpc.channel_ready_future(self.channel).result(timeout=20)
        self.quantizer = self.p.qg.QuantizerStub(self.channel)
        self.inference = self.p.infg.GRPCInferenceServiceStub(self.channel)
        self._health_check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=self.p.health.HealthCheckRequest.SerializeToString,
            response_deserializer=self.p.health.HealthCheckResponse.FromString)
        self.token = token

    def close(self):
        self.channel.close()

    # metadata ---------------------------------------------------------------------------------
    def md(self, token=...):
        """token: a role name from TOKENS, a literal token, None (no metadata), or ... (default)."""
        if token is ...:
            token = self.token
        if token is None:
            return ()
        return (("authorization", f"Bearer {TOKENS.get(token, token)}"),)

    # health -----------------------------------------------------------------------------------
    def health(self, service="", timeout=10):
        return self._health_check(self.p.health.HealthCheckRequest(service=service), timeout=timeout)

    def serving_status_name(self, resp):
        return self.p.health.HealthCheckResponse.ServingStatus.Name(resp.status)

    # quantizer --------------------------------------------------------------------------------
    def upload_chunks(self, name, fmt, sha256, data_iter, size_bytes=0, inputs=(), file_path=""):
        q = self.p.q
        header = q.UploadHeader(name=name, format=fmt, sha256=sha256, size_bytes=size_bytes,
                                file_path=file_path)
        for sig in inputs:
            header.inputs.add(name=sig["name"], datatype=sig["datatype"], shape=list(sig["shape"]))
        yield q.UploadChunk(header=header)
        for block in data_iter:
            yield q.UploadChunk(data=block)

    def upload_iter(self, name, fmt, sha256, data_iter, size_bytes=0, inputs=(), token=..., timeout=300,
                    file_path=""):
        return self.quantizer.UploadModel(
            self.upload_chunks(name, fmt, sha256, data_iter, size_bytes, inputs, file_path),
            metadata=self.md(token), timeout=timeout)

    def commit_model_files(self, name, files, dry_run=False, token=...):
        """files: [(path, sha256, size_bytes)]."""
        q = self.p.q
        req = q.CommitModelFilesRequest(name=name, dry_run=dry_run, files=[
            q.ModelFile(path=p, sha256=sha, size_bytes=n) for p, sha, n in files])
        return self.quantizer.CommitModelFiles(req, metadata=self.md(token), timeout=60)

    def upload_file(self, name, path, fmt, inputs=(), token=..., sha256=None, with_size=True, timeout=300):
        sha = sha256 or sha256_file(path)
        size = os.path.getsize(path) if with_size else 0
        return self.upload_iter(name, fmt, sha, file_blocks(path), size, inputs, token, timeout)

    def list_models(self, token=...):
        return list(self.quantizer.ListModels(self.p.q.ListModelsRequest(), metadata=self.md(token),
                                              timeout=30).models)

    def get_model(self, name, token=...):
        return self.quantizer.GetModel(self.p.q.ModelRef(name=name), metadata=self.md(token), timeout=30)

    def delete_model(self, name, token=...):
        return self.quantizer.DeleteModel(self.p.q.ModelRef(name=name), metadata=self.md(token), timeout=30)

    def job_spec(self, model, granularity, weight_bits=4, weight_terms=2, **kw):
        q = self.p.q
        g = q.Granularity.Value(granularity) if isinstance(granularity, str) else granularity
        spec = q.JobSpec(model=model, granularity=g, weight_bits=weight_bits, weight_terms=weight_terms)
        for key, value in kw.items():
            if key == "outputs":
                spec.outputs.extend(q.OutputFormat.Value(v) if isinstance(v, str) else v for v in value)
            elif key == "deploy":
                spec.deploy.CopyFrom(q.DeploySpec(**value))
            elif key in ("grid", "act_grid"):
                setattr(spec, key, q.Grid.Value(value) if isinstance(value, str) else value)
            elif key == "scale":
                setattr(spec, key, q.ScaleGranularity.Value(value) if isinstance(value, str) else value)
            elif key == "variant":
                setattr(spec, key, q.Variant.Value(value) if isinstance(value, str) else value)
            else:
                setattr(spec, key, value)
        return spec

    def submit(self, spec, idempotency_key="", token=...):
        return self.quantizer.SubmitJob(self.p.q.SubmitJobRequest(spec=spec, idempotency_key=idempotency_key),
                                        metadata=self.md(token), timeout=30)

    def get_job(self, job_id, token=...):
        return self.quantizer.GetJob(self.p.q.JobRef(job_id=job_id), metadata=self.md(token), timeout=30)

    def cancel_job(self, job_id, token=...):
        return self.quantizer.CancelJob(self.p.q.JobRef(job_id=job_id), metadata=self.md(token), timeout=30)

    def list_jobs(self, page_size=0, page_token="", state=0, token=...):
        if isinstance(state, str):
            state = self.p.q.JobState.Value(state)
        return self.quantizer.ListJobs(self.p.q.ListJobsRequest(page_size=page_size, page_token=page_token,
                                                                state=state),
                                       metadata=self.md(token), timeout=30)

    def watch(self, job_id, timeout=180, token=...):
        """All JobEvents until the server ends the stream (the job finished)."""
        events = []
        for ev in self.quantizer.WatchJob(self.p.q.JobRef(job_id=job_id), metadata=self.md(token),
                                          timeout=timeout):
            events.append(ev)
        return events

    def state_name(self, state):
        return self.p.q.JobState.Name(state)

    def wait_state(self, job_id, states, timeout=60, poll=0.05):
        """Poll GetJob until the job's state is one of `states` (names); returns the Job."""
        want = {self.p.q.JobState.Value(s) for s in states}
        deadline = time.monotonic() + timeout
        job = self.get_job(job_id)
        while job.state not in want:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {self.state_name(job.state)} after {timeout} s "
                                     f"(waiting for {states}); progress={job.progress}; error={job.error!r}")
            time.sleep(poll)
            job = self.get_job(job_id)
        return job

    def download(self, artifact_id, offset=0, chunk_bytes=0, token=..., timeout=300):
        """Returns (data, chunks-without-data-list): chunk metadata tuples (offset, len, total, sha, name)."""
        parts, meta = [], []
        for ch in self.quantizer.DownloadArtifact(
                self.p.q.ArtifactRef(artifact_id=artifact_id, offset=offset, chunk_bytes=chunk_bytes),
                metadata=self.md(token), timeout=timeout):
            parts.append(ch.data)
            meta.append((ch.offset, len(ch.data), ch.total_size, ch.sha256, ch.file_name))
        return b"".join(parts), meta

    # inference --------------------------------------------------------------------------------
    def infer(self, model, image, raw=True, version="", req_id="", params=None, datatype="FP32",
              shape=None, raw_bytes=None, token=..., timeout=120):
        inf = self.p.inf
        req = inf.ModelInferRequest(model_name=model, model_version=version, id=req_id)
        for k, v in (params or {}).items():
            if isinstance(v, bool):
                req.parameters[k].bool_param = v
            elif isinstance(v, int):
                req.parameters[k].int64_param = v
            elif isinstance(v, float):
                req.parameters[k].double_param = v
            else:
                req.parameters[k].string_param = str(v)
        arr = np.ascontiguousarray(image, dtype="<f4")
        tin = req.inputs.add(name="input__0", datatype=datatype,
                             shape=list(shape if shape is not None else arr.shape))
        if raw:
            req.raw_input_contents.append(raw_bytes if raw_bytes is not None else arr.tobytes())
        else:
            tin.contents.fp32_contents.extend(arr.ravel().tolist())
        req.outputs.add(name="output__0")
        return self.inference.ModelInfer(req, metadata=self.md(token), timeout=timeout)

    def infer_output(self, resp):
        """(numpy array, used_raw) of the single output."""
        assert len(resp.outputs) == 1, f"expected exactly one output, got {len(resp.outputs)}"
        out = resp.outputs[0]
        shape = tuple(out.shape)
        if len(resp.raw_output_contents):
            data = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
            used_raw = True
        else:
            data = np.asarray(out.contents.fp32_contents, dtype=np.float32)
            used_raw = False
        assert data.size == int(np.prod(shape)), \
            f"output element count {data.size} does not match shape {list(shape)}"
        return data.reshape(shape), used_raw


def file_blocks(path, block=CHUNK, limit=None):
    sent = 0
    with open(path, "rb") as f:
        while True:
            n = block if limit is None else min(block, limit - sent)
            if n <= 0:
                return
            b = f.read(n)
            if not b:
                return
            sent += len(b)
            yield b


# ----------------------------------------------------------------------------------------------
# safetensors (numpy)
# ----------------------------------------------------------------------------------------------

ST_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I8": "i1", "U8": "u1",
             "I16": "<i2", "BOOL": "?"}


def st_header(path_or_bytes):
    """(header dict, data offset) of a safetensors file or bytes."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        buf = bytes(path_or_bytes[:8])
        (n,) = struct.unpack("<Q", buf)
        header = json.loads(bytes(path_or_bytes[8:8 + n]))
    else:
        with open(path_or_bytes, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    return header, 8 + n


def st_read_rows(path, name, start, count):
    """Rows [start, start+count) along dim 0 of tensor `name` (reads only those bytes)."""
    header, base = st_header(path)
    if name not in header:
        raise AssertionError(f"{path}: no tensor {name!r}; has {sorted(k for k in header if k != '__metadata__')}")
    info = header[name]
    dt = np.dtype(ST_DTYPES[info["dtype"]])
    shape = info["shape"]
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    begin, end = info["data_offsets"]
    off = base + begin + start * row * dt.itemsize
    with open(path, "rb") as f:
        f.seek(off)
        buf = f.read(count * row * dt.itemsize)
    assert base + begin + (start + count) * row * dt.itemsize <= base + end, "row range out of tensor"
    return np.frombuffer(buf, dtype=dt).reshape([count] + list(shape[1:]))


def write_random_safetensors(path, n_tensors, rows, cols, seed=0):
    """A F32 safetensors file of n_tensors random [rows, cols] tensors; returns (size, sha256)."""
    rng = np.random.default_rng(seed)
    nbytes = rows * cols * 4
    header = {"__metadata__": {"format": "pt", "origin": "fpxint e2e random"}}
    for i in range(n_tensors):
        header[f"layer{i}.weight"] = {"dtype": "F32", "shape": [rows, cols],
                                      "data_offsets": [i * nbytes, (i + 1) * nbytes]}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - (len(hb) % 8)) % 8)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (struct.pack("<Q", len(hb)), hb):
            f.write(part)
            h.update(part)
        for i in range(n_tensors):
            block = rng.standard_normal((rows, cols), dtype=np.float32)
            # vary the channel scales a little so the expansion is not trivial
            block *= rng.uniform(0.01, 2.0, size=(rows, 1)).astype(np.float32)
            data = block.astype("<f4").tobytes()
            f.write(data)
            h.update(data)
    return os.path.getsize(path), h.hexdigest()


def make_checkpoint(out, dtype, layers, hidden, intermediate, vocab, seed, shards=1, timeout=300):
    """Writes a synthetic Hugging Face-layout checkpoint into `out` (scripts/make_checkpoint.py,
    seeded and deterministic) and returns the summary it prints (tensors, parameters, ...)."""
    cmd = ["/usr/bin/python3", os.path.join(REPO_ROOT, "scripts", "make_checkpoint.py"), out,
           "--dtype", dtype, "--shards", str(shards), "--layers", str(layers),
           "--hidden", str(hidden), "--intermediate", str(intermediate), "--vocab", str(vocab),
           "--seed", str(seed)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr}")
    return json.loads(p.stdout)


def tiny_safetensors_bytes(seed=0, rows=8, cols=16):
    """A small valid F32 safetensors file (one [rows, cols] tensor) as bytes."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, cols), dtype=np.float32).astype("<f4").tobytes()
    header = {"w.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, len(data)]}}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - (len(hb) % 8)) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


# ----------------------------------------------------------------------------------------------
# Misc
# ----------------------------------------------------------------------------------------------

OCR_REC_INPUTS = [{"name": "input__0", "datatype": "FP32", "shape": [1, 3, 48, 320]}]


def ocr_eval_images(count, start=0):
    """`count` recognizer eval images, each [1, 3, 48, 320] F32."""
    path = model_file("ocr", "ocr_eval.safetensors")
    rows = st_read_rows(path, "rec_images", start, count)
    return [rows[i:i + 1].copy() for i in range(count)]


class Watcher(threading.Thread):
    """WatchJob in the background; .events, .error."""

    def __init__(self, client, job_id, timeout=300):
        super().__init__(daemon=True)
        self.client, self.job_id, self.timeout = client, job_id, timeout
        self.events, self.error = [], None

    def run(self):
        try:
            for ev in self.client.quantizer.WatchJob(self.client.p.q.JobRef(job_id=self.job_id),
                                                     metadata=self.client.md(), timeout=self.timeout):
                self.events.append(ev)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


# ----------------------------------------------------------------------------------------------
# Reliability helpers (tests/load, tests/fault, tests/security)
# ----------------------------------------------------------------------------------------------

def proc_status(pid):
    """Resident memory and resources of a live process from /proc: {'VmRSS_kB', 'VmHWM_kB',
    'Threads', 'fds'}; None when the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key + "_kB"] = int(value.split()[0])
                elif key == "Threads":
                    out["Threads"] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    return out


def open_files(pid):
    """Targets of the open file descriptors of a process (paths, 'socket:[..]', ...)."""
    res = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return res
    for n in names:
        try:
            res.append(os.readlink(f"/proc/{pid}/fd/{n}"))
        except OSError:
            pass
    return res


def metrics_text(server, timeout=5):
    """The Prometheus text of a Server started with a metrics port ('' when it has none)."""
    import urllib.request
    if not getattr(server, "metrics_address", None):
        return ""
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def metric_value(text, name):
    """The value of an unlabelled sample `name` in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


def journal_integrity(db_path, copy_first=True):
    """PRAGMA integrity_check of an fpxint journal (SQLite, WAL). With copy_first the database and
    its -wal are copied to a temporary directory first, so the check neither takes locks on nor
    checkpoints the original (use it on the data directory of a killed server before the
    restart). Returns the list of result rows (['ok'] when intact)."""
    import sqlite3
    if not os.path.isfile(db_path):
        raise AssertionError(f"journal missing: {db_path}")
    tmpdir = None
    path = db_path
    if copy_first:
        tmpdir = tempfile.mkdtemp(prefix="fpxint-journal-copy-")
        path = os.path.join(tmpdir, os.path.basename(db_path))
        shutil.copy2(db_path, path)
        if os.path.exists(db_path + "-wal"):
            shutil.copy2(db_path + "-wal", path + "-wal")
    try:
        con = sqlite3.connect(path)
        try:
            return [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
        finally:
            con.close()
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def scan_blob_store(data_dir):
    """Checks every file under <data_dir>/blobs: it must sit at blobs/<sha[:2]>/<sha> and hash to
    its name (a partial or temporary file in the store would not). Returns (problems, count,
    total_bytes)."""
    problems, count, total = [], 0, 0
    root = os.path.join(data_dir, "blobs")
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            count += 1
            try:
                total += os.path.getsize(p)
            except OSError:
                pass
            parts = rel.split(os.sep)
            if len(parts) != 2 or len(f) != 64 or parts[0] != f[:2] or any(c not in "0123456789abcdef" for c in f):
                problems.append(f"blobs/{rel}: not a content-addressed blob name")
                continue
            digest = sha256_file(p)
            if digest != f:
                problems.append(f"blobs/{rel}: content hashes to {digest} (partial or corrupt blob)")
    return problems, count, total


def tmp_entries(tmp):
    """What the server keeps under its data directory's tmp/: every file and directory inside the
    per-replica directories tmp/<replica-id>/ (which themselves do not count), as relative paths."""
    return [e for e in dir_entries(tmp) if os.sep in e or not os.path.isdir(os.path.join(tmp, e))]


def replica_tmp(data_dir):
    """The temp directory of the one server running on `data_dir` (tmp/<replica-id>/)."""
    tmp = os.path.join(data_dir, "tmp")
    dirs = [d for d in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, d))] if os.path.isdir(tmp) else []
    assert len(dirs) == 1, f"expected one replica directory in {tmp}, found {dirs}"
    return os.path.join(tmp, dirs[0])


def dir_entries(path):
    """Relative paths of every file and directory under `path` (sorted; [] when missing)."""
    out = []
    for dirpath, dirs, files in os.walk(path):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(dirpath, n), path))
    return sorted(out)


def list_all_jobs(client, token=...):
    """Every job (ListJobs, all pages)."""
    jobs, page = [], ""
    while True:
        r = client.list_jobs(page_size=1000, page_token=page, token=token)
        jobs.extend(r.jobs)
        page = r.next_page_token
        if not page:
            return jobs


def random_safetensors_bytes(n_tensors, rows, cols, seed=0):
    """A random F32 safetensors file of n_tensors [rows, cols] tensors, as bytes."""
    rng = np.random.default_rng(seed)
    nbytes = rows * cols * 4
    header = {"__metadata__": {"format": "pt", "origin": "fpxint reliability random"}}
    for i in range(n_tensors):
        header[f"layer{i}.weight"] = {"dtype": "F32", "shape": [rows, cols],
                                      "data_offsets": [i * nbytes, (i + 1) * nbytes]}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - (len(hb) % 8)) % 8)
    parts = [struct.pack("<Q", len(hb)), hb]
    for _ in range(n_tensors):
        block = rng.standard_normal((rows, cols), dtype=np.float32)
        block *= rng.uniform(0.01, 2.0, size=(rows, 1)).astype(np.float32)
        parts.append(block.astype("<f4").tobytes())
    return b"".join(parts)


def byte_blocks(data, block=CHUNK):
    """`data` in blocks of `block` bytes (an upload stream)."""
    for i in range(0, len(data), block):
        yield data[i:i + block]


def percentile(values, q):
    """q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ----------------------------------------------------------------------------------------------
# PostgreSQL
# ----------------------------------------------------------------------------------------------

class TempPostgres:
    """A real PostgreSQL 15 server (Debian postgresql-15) in a temporary directory, on a Unix
    socket only; stop() removes it. As root, the server runs as the `postgres` user."""

    def __init__(self):
        self.bin = os.environ.get("FPXINT_PG_BIN", "/usr/lib/postgresql/15/bin")
        self.dir = tempfile.mkdtemp(prefix="fpxint-pg-")
        self.prefix = []
        if os.geteuid() == 0:
            import pwd
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.prefix = ["/usr/sbin/runuser", "-u", "postgres", "--"]
        data = os.path.join(self.dir, "data")
        self._run([f"{self.bin}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync",
                   "-E", "UTF8"], "initdb")
        self.pg_ctl("start")

    def _run(self, argv, what):
        r = subprocess.run(self.prefix + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise AssertionError(f"{what} failed ({r.returncode}):\n"
                                 f"{r.stdout.decode('utf-8', 'replace')}")

    def pg_ctl(self, action):
        """Stops (fast) or starts the database server, keeping its data."""
        data = os.path.join(self.dir, "data")
        opts = (f"-k {self.dir} -c listen_addresses= -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off")
        extra = ["-m", "fast"] if action == "stop" else ["-l", os.path.join(self.dir, "server.log"),
                                                          "-o", opts]
        self._run([f"{self.bin}/pg_ctl", "-D", data, "-w", "-t", "60"] + extra + [action],
                  f"pg_ctl {action}")

    def url(self, db="postgres"):
        return f"postgresql:///{db}?host={self.dir}&user=postgres"

    def stop(self):
        data = os.path.join(self.dir, "data")
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            subprocess.run(self.prefix + [f"{self.bin}/pg_ctl", "-D", data, "-m", "immediate",
                                          "-w", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)
