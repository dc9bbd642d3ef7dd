r"""End-to-end tests of fpxint-server over gRPC (Quantizer, OIP inference, health).

Run:  FPXINT_SERVER_BIN=build/bin/fpxint-server FPXINT_MODELS_DIR=~/.cache/fpxint/models \
      /usr/bin/python3 -m unittest -v tests/e2e/test_service_e2e.py

The tests of ServiceE2E share one server and run in name order (test_01 ... test_99); a test
whose prerequisite failed fails with a message naming it. UploadRejectionE2E starts its own
server with --max-upload-bytes 64000000.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

import numpy as np
import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service_client as sc  # noqa: E402

SC = grpc.StatusCode


class ServerTestCase(sc.RpcAssertions, unittest.TestCase):
    server = None

    def tail(self):
        srv = type(self).server
        return ("\n" + srv.log_tail(30)) if srv is not None else ""


def check_job_events(tc, client, events, want_final="SUCCEEDED"):
    """WatchJob events: states never go back, fraction never decreases, stream ends finished."""
    tc.assertTrue(events, "WatchJob returned no event")
    names = [client.state_name(ev.job.state) for ev in events]
    order = {"QUEUED": 1, "RUNNING": 2, "SUCCEEDED": 3, "FAILED": 3, "CANCELLED": 3}
    ranks = [order.get(n, 0) for n in names]
    tc.assertEqual(ranks, sorted(ranks), f"job states went backwards: {names}")
    tc.assertEqual(names[-1], want_final,
                   f"last WatchJob event is {names[-1]} (error={events[-1].job.error!r}); states: {names}")
    fractions = [ev.job.progress.fraction for ev in events]
    for a, b in zip(fractions, fractions[1:]):
        tc.assertLessEqual(a, b + 1e-9, f"progress.fraction decreased: {fractions}")
    for f in fractions:
        tc.assertTrue(0.0 <= f <= 1.0 + 1e-9, f"fraction out of [0,1]: {fractions}")
    return names, fractions


class ServiceE2E(ServerTestCase):
    state = {}

    @classmethod
    def setUpClass(cls):
        cls.protos = sc.Protos.load()
        # the real model files must exist: fail loudly
        cls.rec_pt = sc.model_file("ocr", "ocr_rec.pt")
        cls.rec_st = sc.model_file("ocr", "ocr_rec.safetensors")
        cls.eval_st = sc.model_file("ocr", "ocr_eval.safetensors")
        cls.server = sc.Server(workers=2, queue_limit=16, max_upload_bytes=512 << 20,
                               extra_args=["--allow-torchscript-uploads", "admin", "--infer-instances", "1"])
        try:
            cls.server.start(timeout=60)
            cls.cq = sc.Client(cls.server.address, token="quantize", protos=cls.protos)
            cls.ci = sc.Client(cls.server.address, token="infer", protos=cls.protos)
            cls.ca = sc.Client(cls.server.address, token="admin", protos=cls.protos)
        except BaseException:
            cls.server.cleanup()
            raise
        cls.tmp = tempfile.mkdtemp(prefix="fpxint-e2e-files-")

    @classmethod
    def tearDownClass(cls):
        for c in ("cq", "ci", "ca"):
            if hasattr(cls, c):
                getattr(cls, c).close()
        if cls.server is not None:
            if cls.server.alive():
                sys.stderr.write("[e2e] server still running at teardown; SIGKILL\n")
            cls.server.cleanup()
        import shutil
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def need(self, key, test):
        if key not in self.state:
            self.fail(f"prerequisite missing: {key!r} (set by {test}, which failed or did not run)")
        return self.state[key]

    # ------------------------------------------------------------------------------------------
    def test_01_health(self):
        for svc in ("", "inference.GRPCInferenceService", "fpxint.v1.Quantizer"):
            resp = self.call(self.cq.health, svc)
            self.assertEqual(self.cq.serving_status_name(resp), "SERVING", f"health of {svc!r}")
        # health needs no token (the call above sends none) and knows no other services
        self.refused(SC.NOT_FOUND, self.cq.health, "no.such.Service")

    def test_02_live_ready_metadata(self):
        inf = self.protos.inf
        md = self.ci.md()
        self.assertTrue(self.call(self.ci.inference.ServerLive, inf.ServerLiveRequest(), metadata=md).live)
        self.assertTrue(self.call(self.ci.inference.ServerReady, inf.ServerReadyRequest(), metadata=md).ready)
        meta = self.call(self.ci.inference.ServerMetadata, inf.ServerMetadataRequest(), metadata=md)
        self.assertTrue(meta.name, f"ServerMetadata.name empty: {meta}")
        self.assertTrue(meta.version, f"ServerMetadata.version empty: {meta}")

    def test_03_auth(self):
        q, inf = self.protos.q, self.protos.inf
        # missing token
        self.refused(SC.UNAUTHENTICATED, self.cq.list_models, token=None)
        self.refused(SC.UNAUTHENTICATED, self.ci.infer, "ocr_rec", np.zeros((1, 3, 48, 320), np.float32),
                       token=None)
        self.refused(SC.UNAUTHENTICATED, self.ci.inference.ModelMetadata,
                       inf.ModelMetadataRequest(name="ocr_rec"))
        self.refused(SC.UNAUTHENTICATED, self.ci.inference.RepositoryIndex, inf.RepositoryIndexRequest())
        # unknown token
        self.refused(SC.UNAUTHENTICATED, self.cq.list_models, token="not-a-valid-token")
        # valid token, wrong role
        self.refused(SC.PERMISSION_DENIED, self.cq.list_models, token="infer")
        self.refused(SC.PERMISSION_DENIED, self.cq.submit,
                       self.cq.job_spec("whatever", "TENSOR"), token="infer")
        self.refused(SC.PERMISSION_DENIED, self.ci.inference.RepositoryIndex,
                       inf.RepositoryIndexRequest(), metadata=self.ci.md("quantize"))
        # the right roles, and admin for everything
        self.call(self.cq.list_models)
        self.call(self.ca.list_models)
        self.call(self.ci.inference.RepositoryIndex, inf.RepositoryIndexRequest(), metadata=self.ci.md())
        self.call(self.ci.inference.RepositoryIndex, inf.RepositoryIndexRequest(), metadata=self.ci.md("admin"))
        # an upload without a token is refused too
        self.refused(SC.UNAUTHENTICATED, self.cq.upload_iter, "noauth", q.SAFETENSORS,
                       sc.sha256_bytes(b"x" * 16), iter([b"x" * 16]), 16, token=None)

    def test_03b_open_server_calls(self):
        # docs/SERVICE.md: the OIP server-level calls ServerLive, ServerReady and ServerMetadata are
        # open (like grpc.health.v1, for probes); every other OIP call needs the infer role (test_03).
        inf = self.protos.inf
        for method, req in (("ServerLive", inf.ServerLiveRequest()), ("ServerReady", inf.ServerReadyRequest()),
                            ("ServerMetadata", inf.ServerMetadataRequest())):
            with self.subTest(method=method):
                self.call(getattr(self.ci.inference, method), req)
                self.call(getattr(self.ci.inference, method), req, metadata=self.ci.md("quantize"))

    def test_04_upload_models(self):
        q = self.protos.q
        sha_pt, sha_st = sc.sha256_file(self.rec_pt), sc.sha256_file(self.rec_st)
        m = self.call(self.ca.upload_file, "ocr_rec", self.rec_pt, q.TORCHSCRIPT, inputs=sc.OCR_REC_INPUTS)
        self.assertEqual(m.name, "ocr_rec")
        self.assertEqual(m.format, q.TORCHSCRIPT)
        self.assertEqual(m.sha256, sha_pt)
        self.assertEqual(m.size_bytes, os.path.getsize(self.rec_pt))
        self.assertFalse(m.deduplicated, "first upload reported deduplicated=true")
        self.assertEqual([(s.name, s.datatype, list(s.shape)) for s in m.inputs],
                         [("input__0", "FP32", [1, 3, 48, 320])], "signature not kept")
        # safetensors with the quantize role, without size_bytes
        m2 = self.call(self.cq.upload_file, "ocr_rec_weights", self.rec_st, q.SAFETENSORS, with_size=False)
        self.assertEqual((m2.name, m2.format, m2.sha256, m2.size_bytes),
                         ("ocr_rec_weights", q.SAFETENSORS, sha_st, os.path.getsize(self.rec_st)))
        self.assertFalse(m2.deduplicated)
        self.assertGreater(m2.created_unix_ms, 0)
        g = self.call(self.cq.get_model, "ocr_rec")
        self.assertEqual((g.sha256, g.size_bytes, g.format), (sha_pt, m.size_bytes, q.TORCHSCRIPT))
        self.assertEqual(len(g.inputs), 1)
        names = {x.name for x in self.call(self.cq.list_models)}
        self.assertTrue({"ocr_rec", "ocr_rec_weights"} <= names, f"ListModels: {names}")
        self.refused(SC.NOT_FOUND, self.cq.get_model, "no-such-model", contains=("no-such-model",))
        self.state.update(sha_pt=sha_pt, sha_st=sha_st, uploaded=True)

    def test_05_dedup_reupload(self):
        q = self.protos.q
        sha_st = self.need("sha_st", "test_04_upload_models")
        before = sorted((m.name, m.sha256) for m in self.call(self.cq.list_models))
        m = self.call(self.cq.upload_file, "ocr_rec_weights", self.rec_st, q.SAFETENSORS)
        self.assertTrue(m.deduplicated, f"re-upload of the same name+content: deduplicated=false: {m}")
        self.assertEqual((m.name, m.sha256), ("ocr_rec_weights", sha_st))
        after = sorted((m.name, m.sha256) for m in self.call(self.cq.list_models))
        self.assertEqual(before, after, "a deduplicated re-upload changed the model list")
        # the same bytes under a new name: a new model, bytes deduplicated
        m3 = self.call(self.cq.upload_file, "ocr_rec_weights_copy", self.rec_st, q.SAFETENSORS)
        self.assertEqual(m3.sha256, sha_st)
        self.assertTrue(m3.deduplicated, "identical bytes under another name should be deduplicated")
        self.call(self.cq.delete_model, "ocr_rec_weights_copy")

    def test_06_torchscript_upload_needs_admin(self):
        # started with --allow-torchscript-uploads admin: the quantize role may not upload code
        q = self.protos.q
        self.refused(SC.PERMISSION_DENIED, self.cq.upload_file, "ocr_rec_by_quantizer", self.rec_pt,
                       q.TORCHSCRIPT, inputs=sc.OCR_REC_INPUTS)
        names = {m.name for m in self.call(self.cq.list_models)}
        self.assertNotIn("ocr_rec_by_quantizer", names)

    def test_07_bad_job_specs(self):
        self.need("uploaded", "test_04_upload_models")
        c = self.cq
        self.refused(SC.INVALID_ARGUMENT, c.submit, c.job_spec("ocr_rec_weights", "TENSOR", weight_bits=9),
                       contains=("weight_bits",))
        self.refused(SC.INVALID_ARGUMENT, c.submit, c.job_spec("ocr_rec_weights", "TENSOR", weight_terms=17),
                       contains=("weight_terms",))
        self.refused(SC.NOT_FOUND, c.submit, c.job_spec("no-such-model", "TENSOR"),
                       contains=("no-such-model", "model"))
        # a weights-only file cannot be run at LAYER granularity
        self.refused((SC.INVALID_ARGUMENT, SC.FAILED_PRECONDITION), c.submit, c.job_spec("ocr_rec_weights", "LAYER"),
                       contains=("granularity", "layer", "format", "torchscript"))
        self.refused(SC.INVALID_ARGUMENT, c.submit,
                       c.job_spec("ocr_rec_weights", "TENSOR", grid="MID", variant="DIGITS", scale="PER_GROUP",
                                  group_size=0), contains=("group_size",))
        self.refused(SC.NOT_FOUND, c.get_job, "no-such-job")

    def test_08_bad_include_regex(self):
        # an invalid regex is a bad spec value: refused by SubmitJob, not a job that fails later
        self.need("uploaded", "test_04_upload_models")
        c = self.cq
        for field, value in (("include", "(unclosed"), ("exclude", "[z-a]")):
            with self.subTest(field=field):
                self.refused(SC.INVALID_ARGUMENT, c.submit,
                               c.job_spec("ocr_rec_weights", "TENSOR", **{field: value}), contains=(field,))

    # ------------------------------------------------------------------------------------------
    def test_10_tensor_job(self):
        self.need("uploaded", "test_04_upload_models")
        c = self.cq
        spec = c.job_spec("ocr_rec_weights", "TENSOR", weight_bits=4, weight_terms=2, grid="SYM",
                          scale="PER_CHANNEL")
        job = self.call(c.submit, spec)
        self.assertTrue(job.job_id)
        self.assertIn(c.state_name(job.state), ("QUEUED", "RUNNING", "SUCCEEDED"))
        self.assertEqual(job.spec.weight_bits, 4)
        events = self.call(c.watch, job.job_id, timeout=180)
        names, fractions = check_job_events(self, c, events)
        totals = [ev.job.progress.layers_total for ev in events]
        self.assertTrue(any(t > 0 for t in totals), f"no event with progress.layers_total > 0: {totals}")
        final = events[-1].job
        self.assertEqual(final.progress.layers_done, final.progress.layers_total,
                         f"final progress: {final.progress}")
        self.assertAlmostEqual(final.progress.fraction, 1.0, places=6)
        if len(set(fractions)) < 2:
            sys.stderr.write(f"[e2e] note: TENSOR job finished before progress could be seen "
                             f"(states {names}, fractions {fractions})\n")
        job = self.call(c.get_job, job.job_id)
        self.assertEqual(c.state_name(job.state), "SUCCEEDED", job.error)
        self.assertGreaterEqual(job.attempts, 1)
        again = self.call(c.watch, job.job_id, timeout=30)
        self.assertEqual([c.state_name(e.job.state) for e in again], ["SUCCEEDED"],
                         "WatchJob of a finished job: the job now, then the end of the stream")
        self.assertGreater(job.finished_unix_ms, 0)
        self.assertGreaterEqual(job.finished_unix_ms, job.started_unix_ms)
        self.assertGreaterEqual(job.started_unix_ms, job.created_unix_ms)
        r = job.result
        self.assertTrue(r.layers, "result.layers is empty")
        self.assertGreater(r.bytes_in, 0)
        self.assertGreater(r.bytes_out, 0)
        self.assertGreater(r.compression_ratio, 0)
        two = [l for l in r.layers if len(l.terms) == 2]
        self.assertTrue(two, "no layer with 2 terms")
        for l in two[:20]:
            self.assertLessEqual(l.terms[1].rel_fro, l.terms[0].rel_fro + 1e-12,
                                 f"{l.name}: the second term did not reduce the error: {l.terms}")
        kinds = sorted(a.kind for a in job.artifacts)
        self.assertIn("packed_safetensors", kinds)
        self.assertIn("report_json", kinds)
        shas = {}
        for a in job.artifacts:
            data, meta = self.call(c.download, a.artifact_id)
            self.assertTrue(meta, f"no chunk for artifact {a.kind}")
            digest = sc.sha256_bytes(data)
            self.assertEqual(len(data), a.size_bytes, f"{a.kind}: size")
            self.assertEqual(digest, a.sha256, f"{a.kind}: SHA-256 of the download != Artifact.sha256")
            for off, n, total, sha, fname in meta:
                self.assertEqual(total, a.size_bytes)
                self.assertEqual(sha, digest, f"{a.kind}: chunk sha256")
                self.assertEqual(fname, a.file_name)
            offs = [m[0] for m in meta]
            self.assertEqual(offs, list(np.cumsum([0] + [m[1] for m in meta[:-1]])), "chunk offsets")
            self.assertTrue(all(m[1] <= (1 << 20) for m in meta), "chunk larger than the 1 MiB default")
            shas[a.kind] = (a, data)
        a, packed = shas["packed_safetensors"]
        header, _ = sc.st_header(packed)
        md = header.get("__metadata__", {})
        self.assertEqual(md.get("format"), "fpxint", f"__metadata__: {md}")
        self.assertEqual(md.get("bits"), "4", f"__metadata__: {md}")
        self.assertEqual(md.get("terms"), "2", f"__metadata__: {md}")
        self.assertEqual(md.get("grid"), "sym", f"__metadata__: {md}")
        self.assertEqual(md.get("scale"), "channel", f"__metadata__: {md}")
        self.assertEqual(md.get("source_sha256"), self.state["sha_st"])
        for k in (1, 2):
            self.assertIn(f"p2o.Conv.0.weight.t{k}.codes", header)
            self.assertEqual(header[f"p2o.Conv.0.weight.t{k}.scale"]["shape"], [16, 1])
        self.assertEqual(json.loads(md.get("p2o.Conv.0.weight.shape", "null")), [16, 3, 3, 3])
        # copied tensors keep their bytes
        self.assertIn("p2o.BatchNormalization.0.bn_scale", header)
        report = json.loads(shas["report_json"][1].decode("utf-8"))
        self.assertIsInstance(report, dict)
        self.state["tensor_job"] = job
        self.state["packed"] = (a, packed)

    def test_10b_dequantized_safetensors(self):
        """A TENSOR job's dequantized_safetensors output, read with numpy (not fpxint's reader):
        the source's names, order, shapes and dtypes; every expanded weight equal to a float64
        reference of the expansion (docs/ALGORITHM.md §1-2: sym grid, per-channel, b=4, K=2,
        scales rounded down to F32, up when that would be subnormal) rounded once to F32; every
        other tensor byte for byte."""
        self.need("uploaded", "test_04_upload_models")
        c = self.cq
        spec = c.job_spec("ocr_rec_weights", "TENSOR", weight_bits=4, weight_terms=2, grid="SYM",
                          scale="PER_CHANNEL", outputs=["DEQUANTIZED_SAFETENSORS"])
        job = self.call(c.submit, spec)
        done = c.wait_state(job.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"], timeout=180)
        self.assertEqual(c.state_name(done.state), "SUCCEEDED", done.error)
        arts = {a.kind: a for a in done.artifacts}
        self.assertIn("dequantized_safetensors", arts)
        art = arts["dequantized_safetensors"]
        self.assertEqual(art.file_name, "ocr_rec_weights.dequantized.safetensors")
        data, _ = self.call(c.download, art.artifact_id)
        self.assertEqual(sc.sha256_bytes(data), art.sha256)
        with open(self.rec_st, "rb") as f:
            source = f.read()
        src_h, src_off = sc.st_header(source)
        deq_h, deq_off = sc.st_header(data)
        src_names = [k for k in src_h if k != "__metadata__"]
        deq_names = [k for k in deq_h if k != "__metadata__"]
        self.assertEqual(sorted(deq_names), sorted(src_names))
        self.assertIn("fpxint.dequantized", deq_h.get("__metadata__", {}))
        expanded = {l.name for l in done.result.layers}
        self.assertTrue(expanded)
        np_dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
        checked = 0
        for name in src_names:
            s, d = src_h[name], deq_h[name]
            self.assertEqual(d["shape"], s["shape"], name)
            sb = source[src_off + s["data_offsets"][0]:src_off + s["data_offsets"][1]]
            db = data[deq_off + d["data_offsets"][0]:deq_off + d["data_offsets"][1]]
            if name not in expanded:
                self.assertEqual(d["dtype"], s["dtype"], name)
                self.assertEqual(db, sb, f"{name}: a copied tensor changed")
                continue
            self.assertEqual(d["dtype"], s["dtype"], name)
            self.assertEqual(s["dtype"], "F32", name)
            w = np.frombuffer(sb, dtype="<f4").astype(np.float64).reshape(s["shape"][0], -1)
            r = w.copy()
            total = np.zeros_like(r)
            for _ in range(2):
                m = np.abs(r).max(axis=1)
                exact = m / 7.0
                # Round down to a float; one that would be subnormal rounds up instead.
                scale = exact.astype(np.float32)
                over = scale.astype(np.float64) > exact
                scale[over] = np.nextafter(scale[over], np.float32(0))
                tiny = scale < np.finfo(np.float32).tiny
                up = exact.astype(np.float32)
                under = up.astype(np.float64) < exact
                up[under] = np.nextafter(up[under], np.float32(np.inf))
                scale[tiny] = up[tiny]
                scale = np.where(m == 0, np.float32(1), scale).astype(np.float64)[:, None]
                codes = np.clip(np.rint(r / scale), -7, 7)
                term = scale * codes
                total += term
                r -= term
            want = total.astype(np.float32).reshape(-1)
            got = np.frombuffer(db, dtype="<f4")
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            self.assertTrue(np.array_equal(got, want),
                            f"{name}: {int((diff > 0).sum())} of {got.size} values differ from the "
                            f"reference (max {diff.max():.3g})")
            # The job's report states the same error (its K=2 rel_fro, from fp64 residuals).
            rel = np.linalg.norm(w.reshape(-1) - total.reshape(-1)) / max(np.linalg.norm(w), 1e-30)
            reported = [l for l in done.result.layers if l.name == name][0].terms[1].rel_fro
            self.assertAlmostEqual(rel, reported, delta=1e-9 + 1e-6 * reported,
                                   msg=f"{name}: relative error {rel:.6g}, reported {reported:.6g}")
            checked += 1
        self.assertEqual(checked, len(expanded))

    def test_11_resumed_download(self):
        a, full = self.need("packed", "test_10_tensor_job")
        c = self.cq
        for off in (len(full) // 2 + 3, 1, len(full) - 1):
            tail, meta = self.call(c.download, a.artifact_id, offset=off)
            self.assertEqual(meta[0][0], off, "first chunk offset != requested offset")
            self.assertEqual(full[:off] + tail, full, f"resumed download from {off} differs")
            self.assertEqual(meta[0][3], a.sha256, "sha256 of a resumed chunk is not the whole artifact's")
        # smaller chunks
        data, meta = self.call(c.download, a.artifact_id, chunk_bytes=65536)
        self.assertEqual(data, full)
        self.assertTrue(all(m[1] <= 65536 for m in meta), "chunk_bytes not honoured")
        if len(full) > 65536:
            self.assertGreater(len(meta), 1)
        self.refused(SC.NOT_FOUND, c.download, "no-such-artifact")
        end, _ = self.call(c.download, a.artifact_id, offset=len(full))
        self.assertEqual(end, b"", "download from offset == size should give no bytes")
        self.refused((SC.OUT_OF_RANGE, SC.INVALID_ARGUMENT), c.download, a.artifact_id, offset=len(full) + 10,
                       contains=("offset",))

    def test_12_idempotency(self):
        self.need("uploaded", "test_04_upload_models")
        c = self.cq
        key = "e2e-idem-" + uuid.uuid4().hex
        spec = c.job_spec("ocr_rec_weights", "TENSOR", weight_bits=3, weight_terms=1, include=r"^p2o\.Conv\.0\.")
        j1 = self.call(c.submit, spec, key)
        j2 = self.call(c.submit, spec, key)
        self.assertEqual(j1.job_id, j2.job_id, "same idempotency key returned another job")
        self.assertEqual(j2.idempotency_key, key)
        other = c.job_spec("ocr_rec_weights", "TENSOR", weight_bits=5, weight_terms=1)
        self.refused(SC.ALREADY_EXISTS, c.submit, other, key)
        done = c.wait_state(j1.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"], timeout=120)
        self.assertEqual(c.state_name(done.state), "SUCCEEDED", done.error)
        j3 = self.call(c.submit, spec, key)
        self.assertEqual(j3.job_id, j1.job_id, "key reuse after the job finished gave another job")

    def test_13_torch_state_dict_tensor_job(self):
        """The recognizer's weights as a torch.save state dict: uploaded as TORCH_STATE_DICT and
        expanded by a TENSOR job, the artifact equals the one from the safetensors upload (same
        tensors, same order) except for the recorded source hash. A pickle that would call
        os.system is refused at upload, and nothing runs."""
        import pickle
        import zipfile
        import torch
        a10, packed10 = self.need("packed", "test_10_tensor_job")
        c, q = self.cq, self.protos.q
        header, start = sc.st_header(self.rec_st)
        with open(self.rec_st, "rb") as f:
            raw = f.read()
        sd = {}
        for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):
            b, e = info["data_offsets"]
            arr = np.frombuffer(raw[start + b:start + e], dtype=sc.ST_DTYPES[info["dtype"]])
            sd[name] = torch.from_numpy(arr.reshape(info["shape"]).copy())
        pt = os.path.join(self.tmp, "ocr_rec_state_dict.pt")
        torch.save(sd, pt)
        m = self.call(c.upload_file, "ocr_rec_state_dict", pt, q.TORCH_STATE_DICT)
        self.assertEqual(m.format, q.TORCH_STATE_DICT)
        self.refused(SC.INVALID_ARGUMENT, c.submit, c.job_spec("ocr_rec_state_dict", "LAYER"),
                     contains=("TORCHSCRIPT",))
        job = self.call(c.submit, c.job_spec("ocr_rec_state_dict", "TENSOR", weight_bits=4, weight_terms=2,
                                             grid="SYM", scale="PER_CHANNEL"))
        done = c.wait_state(job.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"], timeout=180)
        self.assertEqual(c.state_name(done.state), "SUCCEEDED", done.error)
        art = [x for x in done.artifacts if x.kind == "packed_safetensors"][0]
        data, _ = self.call(c.download, art.artifact_id)
        h_sd, off_sd = sc.st_header(data)
        h_st, off_st = sc.st_header(packed10)
        self.assertEqual(h_sd["__metadata__"].pop("source_sha256"), sc.sha256_bytes(open(pt, "rb").read()))
        h_st["__metadata__"].pop("source_sha256")
        self.assertEqual(h_sd, h_st)
        self.assertEqual(data[off_sd:], packed10[off_st:], "tensor bytes differ from the safetensors job")

        marker = os.path.join(self.tmp, "pwned")

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch " + marker,))

        evil = os.path.join(self.tmp, "evil.pt")
        with zipfile.ZipFile(evil, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        self.refused(SC.INVALID_ARGUMENT, c.upload_file, "evil_state_dict", evil, q.TORCH_STATE_DICT,
                     contains=("refused global",))
        self.assertFalse(os.path.exists(marker))

    # ------------------------------------------------------------------------------------------
    def test_20_layer_job_deploy(self):
        self.need("uploaded", "test_04_upload_models")
        c = self.cq
        spec = c.job_spec("ocr_rec", "LAYER", weight_bits=4, weight_terms=2,
                          deploy={"enabled": True, "name": "rec-q"}, outputs=["DEQUANTIZED_TORCHSCRIPT"])
        job = self.call(c.submit, spec)
        events = self.call(c.watch, job.job_id, timeout=300)
        check_job_events(self, c, events)
        job = events[-1].job
        r = job.result
        self.assertEqual(r.deployed_name, "rec-q", f"result: {r}")
        self.assertEqual(r.deployed_version, "1", f"result: {r}")
        self.assertTrue(r.layers, "LAYER job: result.layers empty")
        self.assertTrue(any(l.op in ("conv", "linear", "matmul") for l in r.layers),
                        f"ops: {sorted({l.op for l in r.layers})}")
        self.assertTrue(r.probe or r.probe_note, "neither a probe error nor a probe_note")
        if r.probe:
            best = min(p.rel_fro for p in r.probe)
            self.assertLess(best, 0.5, f"probe errors: {list(r.probe)}")
        kinds = [a.kind for a in job.artifacts]
        self.assertIn("packed_safetensors", kinds)
        for a in job.artifacts:
            data, _ = self.call(c.download, a.artifact_id)
            self.assertEqual(sc.sha256_bytes(data), a.sha256, a.kind)
        self.state["layer_job"] = job

    def test_21_model_job_basis(self):
        self.need("uploaded", "test_04_upload_models")
        c = self.cq
        spec = c.job_spec("ocr_rec", "MODEL", weight_bits=4, weight_terms=2, outputs=["BASIS_TORCHSCRIPT"])
        job = self.call(c.submit, spec)
        events = self.call(c.watch, job.job_id, timeout=300)
        check_job_events(self, c, events)
        job = events[-1].job
        basis = [a for a in job.artifacts if a.kind == "basis_torchscript"]
        self.assertEqual(len(basis), 2, f"artifacts: {[(a.kind, a.file_name) for a in job.artifacts]}")
        self.assertEqual(len({a.file_name for a in basis}), 2, "basis artifacts share a file name")
        for a in basis:
            data, _ = self.call(c.download, a.artifact_id)
            self.assertEqual(sc.sha256_bytes(data), a.sha256)
            self.assertEqual(data[:2], b"PK", f"{a.file_name} is not a TorchScript (zip) archive")
        kinds = {a.kind for a in job.artifacts}
        self.assertTrue({"packed_safetensors", "report_json"} <= kinds, f"kinds: {kinds}")

    # ------------------------------------------------------------------------------------------
    def _stats(self, name):
        inf = self.protos.inf
        resp = self.call(self.ci.inference.ModelStatistics, inf.ModelStatisticsRequest(name=name),
                         metadata=self.ci.md())
        st = [s for s in resp.model_stats if s.name == name]
        self.assertTrue(st, f"ModelStatistics has no entry for {name}: {resp}")
        return st

    def test_30_fp_load_and_infer(self):
        self.need("uploaded", "test_04_upload_models")
        inf, ci = self.protos.inf, self.ci
        # Serving a bare upload needs the quantize role; infer only loads deployments.
        self.refused(SC.PERMISSION_DENIED, ci.inference.RepositoryModelLoad,
                     inf.RepositoryModelLoadRequest(model_name="ocr_rec"), metadata=ci.md())
        self.call(ci.inference.RepositoryModelLoad, inf.RepositoryModelLoadRequest(model_name="ocr_rec"),
                  metadata=ci.md("quantize"))
        ready = self.call(ci.inference.ModelReady, inf.ModelReadyRequest(name="ocr_rec"), metadata=ci.md())
        self.assertTrue(ready.ready, "ModelReady(ocr_rec) false after RepositoryModelLoad")
        meta = self.call(ci.inference.ModelMetadata, inf.ModelMetadataRequest(name="ocr_rec"), metadata=ci.md())
        self.assertEqual(meta.platform, "pytorch_torchscript")
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                         [("input__0", "FP32", [1, 3, 48, 320])])
        self.assertEqual([t.name for t in meta.outputs], ["output__0"])
        count0 = sum(s.inference_count for s in self._stats("ocr_rec"))
        images = sc.ocr_eval_images(3)
        outs = []
        for i, img in enumerate(images):
            rid = f"fp-{i}"
            resp = self.call(ci.infer, "ocr_rec", img, raw=True, req_id=rid)
            self.assertEqual(resp.id, rid, "request id not echoed")
            self.assertEqual(resp.model_name, "ocr_rec")
            out, used_raw = ci.infer_output(resp)
            self.assertTrue(used_raw, "raw request answered without raw_output_contents")
            self.assertEqual(resp.outputs[0].name, "output__0")
            self.assertEqual(resp.outputs[0].datatype, "FP32")
            self.assertEqual(out.ndim, 3)
            self.assertEqual((out.shape[0], out.shape[2]), (1, 6625), f"output shape {out.shape}")
            self.assertGreater(out.shape[1], 0)
            self.assertTrue(np.all(np.isfinite(out)))
            outs.append(out)
        # the typed-contents path: answered with contents, same numbers
        resp = self.call(ci.infer, "ocr_rec", images[0], raw=False, req_id="fp-contents")
        out, used_raw = ci.infer_output(resp)
        self.assertFalse(used_raw, "contents request answered with raw_output_contents")
        np.testing.assert_allclose(out, outs[0], rtol=1e-4, atol=1e-5)
        count1 = sum(s.inference_count for s in self._stats("ocr_rec"))
        self.assertGreaterEqual(count1 - count0, 4, f"inference_count {count0} -> {count1}")
        self.state["fp_outs"] = outs
        self.state["images"] = images

    def _rel_err_and_agree(self, q_outs, fp_outs):
        num = sum(float(np.sum((q.astype(np.float64) - f) ** 2)) for q, f in zip(q_outs, fp_outs))
        den = sum(float(np.sum(f.astype(np.float64) ** 2)) for f in fp_outs)
        agree = np.concatenate([(q.argmax(-1) == f.argmax(-1)).ravel() for q, f in zip(q_outs, fp_outs)])
        return (num / den) ** 0.5, float(agree.mean())

    def test_31_quantized_infer(self):
        fp_outs = self.need("fp_outs", "test_30_fp_load_and_infer")
        self.need("layer_job", "test_20_layer_job_deploy")
        inf, ci = self.protos.inf, self.ci
        ready = self.call(ci.inference.ModelReady, inf.ModelReadyRequest(name="rec-q", version="1"),
                          metadata=ci.md())
        self.assertTrue(ready.ready, "deployed rec-q v1 is not ready")
        meta = self.call(ci.inference.ModelMetadata, inf.ModelMetadataRequest(name="rec-q"), metadata=ci.md())
        self.assertEqual(meta.platform, "fpxint_series")
        self.assertIn("1", list(meta.versions))
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                         [("input__0", "FP32", [1, 3, 48, 320])])
        q_outs = []
        for i, img in enumerate(self.state["images"]):
            resp = self.call(ci.infer, "rec-q", img, raw=True, version="1" if i == 0 else "", req_id=f"q-{i}")
            self.assertEqual(resp.id, f"q-{i}")
            out, used_raw = ci.infer_output(resp)
            self.assertTrue(used_raw)
            self.assertEqual(out.shape, fp_outs[i].shape)
            q_outs.append(out)
        rel, agree = self._rel_err_and_agree(q_outs, fp_outs)
        sys.stderr.write(f"[e2e] rec-q (b=4, K=2) vs FP: rel L2 {rel:.4g}, argmax agreement {agree:.3f}\n")
        self.assertGreaterEqual(agree, 0.95, f"argmax agreement {agree:.3f}")
        self.assertLess(rel, 0.1, f"relative L2 error {rel:.4g}")
        # typed contents work on the series model too
        resp = self.call(ci.infer, "rec-q", self.state["images"][0], raw=False, req_id="q-contents")
        out, used_raw = ci.infer_output(resp)
        self.assertFalse(used_raw)
        np.testing.assert_allclose(out, q_outs[0], rtol=1e-4, atol=1e-5)
        self.state["q_outs"] = (q_outs, rel)

    def test_31b_dequantized_torchscript_runs_in_python(self):
        """The LAYER job's dequantized_torchscript artifact is plain TorchScript: Debian's Python
        torch loads it without the fpxint op library and gives the served W4x2 model's outputs."""
        q_outs, _ = self.need("q_outs", "test_31_quantized_infer")
        job = self.need("layer_job", "test_20_layer_job_deploy")
        try:
            import torch
        except ImportError as e:  # python3-torch is a declared dependency (scripts/setup.sh)
            self.fail(f"python3-torch is missing: {e}")
        art = [a for a in job.artifacts if a.kind == "dequantized_torchscript"]
        self.assertEqual(len(art), 1, f"artifacts: {[a.kind for a in job.artifacts]}")
        data, _ = self.call(self.cq.download, art[0].artifact_id)
        self.assertEqual(sc.sha256_bytes(data), art[0].sha256)
        path = os.path.join(self.tmp, art[0].file_name)
        with open(path, "wb") as f:
            f.write(data)
        module = torch.jit.load(path)
        module.eval()
        with torch.no_grad():
            for i, img in enumerate(self.state["images"]):
                x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
                y = module(x)
                y = y[0] if isinstance(y, (tuple, list)) else y
                y = y.numpy()
                self.assertEqual(y.shape, q_outs[i].shape)
                # Served on packed ops vs the dequantized fp32 weights: the same model up to the
                # order of the fp32 sums.
                np.testing.assert_allclose(y, q_outs[i], rtol=1e-3, atol=1e-4,
                                           err_msg=f"image {i}: Python vs served W4x2")

    def test_32_fpxint_terms(self):
        fp_outs = self.need("fp_outs", "test_30_fp_load_and_infer")
        q_outs, rel2 = self.need("q_outs", "test_31_quantized_infer")
        ci = self.ci
        outs1, outs2 = [], []
        for i, img in enumerate(self.state["images"]):
            outs1.append(ci.infer_output(self.call(ci.infer, "rec-q", img, params={"fpxint_terms": 1}))[0])
            outs2.append(ci.infer_output(self.call(ci.infer, "rec-q", img, params={"fpxint_terms": 2}))[0])
        rel1, agree1 = self._rel_err_and_agree(outs1, fp_outs)
        rel2b, _ = self._rel_err_and_agree(outs2, fp_outs)
        sys.stderr.write(f"[e2e] fpxint_terms=1: rel L2 {rel1:.4g} (agree {agree1:.3f}); "
                         f"terms=2: {rel2b:.4g}\n")
        self.assertAlmostEqual(rel2b, rel2, delta=1e-6 + 1e-3 * rel2,
                               msg="fpxint_terms=2 differs from the default (all 2 terms)")
        self.assertGreater(rel1, rel2b, "one term is not worse than two")

    def test_32b_packed_serving(self):
        """rec-q (weight-only) is served on the packed low-bit ops: packed once into the version
        directory, weights K·b/32 of FP32 in memory (the server's gauge), and the packed file is
        a TorchScript module that Python runs with the fpxint op library, matching the server's
        outputs at every precision."""
        q_outs, _ = self.need("q_outs", "test_31_quantized_infer")
        text = sc.metrics_text(self.server)
        if text:
            forms = {}
            for line in text.splitlines():
                if line.startswith("fpxint_model_weight_bytes{") and 'model="rec-q"' in line:
                    form = line.split('form="', 1)[1].split('"', 1)[0]
                    forms[form] = float(line.rsplit(" ", 1)[1])
            self.assertEqual(set(forms), {"fp32", "resident"}, text[:2000])
            ratio = forms["resident"] / forms["fp32"]
            sys.stderr.write(f"[e2e] rec-q resident weights {forms['resident']:.0f} B of "
                             f"{forms['fp32']:.0f} B FP32 ({ratio:.3f}; K*b/32 = 0.25)\n")
            self.assertGreater(ratio, 0.25)
            self.assertLess(ratio, 0.32)
        packed = os.path.join(self.server.data_dir, "repository", "rec-q", "1", "model.packed.pt")
        self.assertTrue(os.path.isfile(packed), f"{packed} missing")
        lib = os.environ.get("FPXINT_OPS_LIB", "")
        self.assertTrue(os.path.isfile(lib), f"FPXINT_OPS_LIB={lib!r} (libfpxint_ops.so) missing")
        img = os.path.join(self.server.root, "img0.npy")
        np.save(img, self.state["images"][0])
        script = (
            "import sys, numpy as np, torch\n"
            "torch.ops.load_library(sys.argv[1])\n"
            "m = torch.jit.load(sys.argv[2])\n"
            "x = torch.from_numpy(np.load(sys.argv[3]))\n"
            "with torch.no_grad():\n"
            "    np.save(sys.argv[4], m(x).numpy()); np.save(sys.argv[5], m(x, 1).numpy())\n")
        y_all, y_one = (os.path.join(self.server.root, f) for f in ("y_all.npy", "y_one.npy"))
        env = dict(os.environ)
        if os.environ.get("FPXINT_OPS_PRELOAD"):  # an ASan build of the library (make test-asan)
            env.update(LD_PRELOAD=os.environ["FPXINT_OPS_PRELOAD"], ASAN_OPTIONS="detect_leaks=0")
        p = subprocess.run([sys.executable, "-c", script, lib, packed, img, y_all, y_one],
                           capture_output=True, text=True, timeout=120, env=env)
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        np.testing.assert_allclose(np.load(y_all), q_outs[0], rtol=1e-4, atol=1e-4)
        one = self.ci.infer_output(self.call(self.ci.infer, "rec-q", self.state["images"][0],
                                             params={"fpxint_terms": 1}))[0]
        np.testing.assert_allclose(np.load(y_one), one, rtol=1e-4, atol=1e-4)
        # Without the op library, loading fails and names the missing fpxint class.
        p = subprocess.run([sys.executable, "-c", "import sys, torch; torch.jit.load(sys.argv[1])",
                            packed], capture_output=True, text=True, timeout=120)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("fpxint", p.stderr)

    def test_33_metadata_index_stats(self):
        self.need("fp_outs", "test_30_fp_load_and_infer")
        inf, ci = self.protos.inf, self.ci
        idx = self.call(ci.inference.RepositoryIndex, inf.RepositoryIndexRequest(), metadata=ci.md())
        by_name = {}
        for m in idx.models:
            by_name.setdefault(m.name, []).append(m)
        for name in ("ocr_rec", "rec-q"):
            self.assertIn(name, by_name, f"RepositoryIndex: {[(m.name, m.version, m.state) for m in idx.models]}")
            self.assertTrue(any(m.state.upper() == "READY" for m in by_name[name]),
                            f"{name}: states {[(m.version, m.state) for m in by_name[name]]}")
        ready_idx = self.call(ci.inference.RepositoryIndex, inf.RepositoryIndexRequest(ready=True),
                              metadata=ci.md())
        self.assertTrue({"ocr_rec", "rec-q"} <= {m.name for m in ready_idx.models})
        self.assertTrue(all(m.state.upper() == "READY" for m in ready_idx.models),
                        f"ready=true listed non-ready models: {ready_idx}")
        st = self._stats("rec-q")
        self.assertGreaterEqual(sum(s.inference_count for s in st), 3, f"rec-q stats: {st}")
        self.assertGreater(sum(s.inference_stats.success.count for s in st), 0)
        self.assertGreater(max(s.last_inference for s in st), 0)
        allstats = self.call(ci.inference.ModelStatistics, inf.ModelStatisticsRequest(), metadata=ci.md())
        self.assertTrue({"ocr_rec", "rec-q"} <= {s.name for s in allstats.model_stats})
        # unknown models
        r = None
        try:
            r = ci.inference.ModelReady(inf.ModelReadyRequest(name="no-such-model"), metadata=ci.md(), timeout=10)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), SC.NOT_FOUND, sc.rpc_desc(e))
        if r is not None:
            self.assertFalse(r.ready)
        self.refused(SC.NOT_FOUND, ci.inference.ModelMetadata, inf.ModelMetadataRequest(name="no-such-model"),
                       metadata=ci.md())

    def test_34_bad_infer(self):
        images = self.need("images", "test_30_fp_load_and_infer")
        ci = self.ci
        img = images[0]
        good = np.ascontiguousarray(img, dtype="<f4").tobytes()
        # wrong shape (bytes consistent with the wrong shape)
        wrong = np.zeros((1, 3, 48, 321), dtype="<f4")
        self.refused(SC.INVALID_ARGUMENT, ci.infer, "ocr_rec", wrong, contains=("shape",))
        # wrong datatype, wrong byte count for it
        self.refused(SC.INVALID_ARGUMENT, ci.infer, "ocr_rec", img, datatype="FP64", raw_bytes=good,
                       contains=("datatype", "FP64", "raw_input_contents"))
        # raw byte count off by 4
        self.refused(SC.INVALID_ARGUMENT, ci.infer, "ocr_rec", img, raw_bytes=good[:-4],
                       contains=("raw_input_contents", "byte"))
        self.refused(SC.INVALID_ARGUMENT, ci.infer, "rec-q", img, raw_bytes=good + b"\0\0\0\0",
                       contains=("raw_input_contents", "byte"))
        # unknown model
        self.refused(SC.NOT_FOUND, ci.infer, "no-such-model", img, contains=("no-such-model",))
        # unknown version of a known model
        self.refused(SC.NOT_FOUND, ci.infer, "rec-q", img, version="99", contains=("99", "version"))
        # both raw and typed contents
        inf = self.protos.inf
        req = inf.ModelInferRequest(model_name="ocr_rec")
        t = req.inputs.add(name="input__0", datatype="FP32", shape=[1, 3, 48, 320])
        t.contents.fp32_contents.extend(img.ravel().tolist())
        req.raw_input_contents.append(good)
        self.refused(SC.INVALID_ARGUMENT, ci.inference.ModelInfer, req, metadata=ci.md(),
                       contains=("raw_input_contents", "contents"))
        # wrong input name
        req = inf.ModelInferRequest(model_name="ocr_rec")
        req.inputs.add(name="input__7", datatype="FP32", shape=[1, 3, 48, 320])
        req.raw_input_contents.append(good)
        self.refused(SC.INVALID_ARGUMENT, ci.inference.ModelInfer, req, metadata=ci.md(),
                       contains=("input__7", "input"))
        # the server still answers
        out, _ = ci.infer_output(self.call(ci.infer, "ocr_rec", img))
        np.testing.assert_allclose(out, self.state["fp_outs"][0], rtol=1e-4, atol=1e-5)
        st = self._stats("ocr_rec")
        sys.stderr.write(f"[e2e] ocr_rec fail count after bad requests: "
                         f"{sum(s.inference_stats.fail.count for s in st)}\n")

    def test_35_unload_reload(self):
        images = self.need("images", "test_30_fp_load_and_infer")
        inf, ci = self.protos.inf, self.ci
        # fpxint_terms is for series models only
        self.refused(SC.INVALID_ARGUMENT, ci.infer, "ocr_rec", images[0], params={"fpxint_terms": 1},
                       contains=("fpxint_terms",))
        self.call(ci.inference.RepositoryModelUnload, inf.RepositoryModelUnloadRequest(model_name="ocr_rec"),
                  metadata=ci.md())
        ready = self.call(ci.inference.ModelReady, inf.ModelReadyRequest(name="ocr_rec"), metadata=ci.md())
        self.assertFalse(ready.ready, "ModelReady true after RepositoryModelUnload")
        try:
            ci.infer("ocr_rec", images[0])
            self.fail("ModelInfer on an unloaded model succeeded")
        except grpc.RpcError as e:
            self.assertIn(e.code(), (SC.FAILED_PRECONDITION, SC.UNAVAILABLE, SC.NOT_FOUND), sc.rpc_desc(e))
        idx = self.call(ci.inference.RepositoryIndex, inf.RepositoryIndexRequest(ready=True), metadata=ci.md())
        self.assertNotIn("ocr_rec", [m.name for m in idx.models], "ready=true index lists an unloaded model")
        self.call(ci.inference.RepositoryModelLoad, inf.RepositoryModelLoadRequest(model_name="ocr_rec"),
                  metadata=ci.md())
        out, _ = ci.infer_output(self.call(ci.infer, "ocr_rec", images[0]))
        np.testing.assert_allclose(out, self.state["fp_outs"][0], rtol=1e-4, atol=1e-5)
        self.refused(SC.NOT_FOUND, ci.inference.RepositoryModelLoad,
                       inf.RepositoryModelLoadRequest(model_name="no-such-model"), metadata=ci.md(),
                       contains=("no-such-model",))

    # ------------------------------------------------------------------------------------------
    def test_40_list_jobs_paging(self):
        self.need("tensor_job", "test_10_tensor_job")
        c = self.cq
        full = self.call(c.list_jobs, page_size=1000)
        all_ids = [j.job_id for j in full.jobs]
        self.assertEqual(full.next_page_token, "")
        self.assertGreaterEqual(len(all_ids), 3, f"jobs: {all_ids}")
        created = [j.created_unix_ms for j in full.jobs]
        self.assertEqual(created, sorted(created, reverse=True), "ListJobs not newest first")
        paged, token, pages = [], "", 0
        while True:
            resp = self.call(c.list_jobs, page_size=1, page_token=token)
            pages += 1
            self.assertLessEqual(len(resp.jobs), 1, "page_size=1 returned more than one job")
            paged.extend(j.job_id for j in resp.jobs)
            token = resp.next_page_token
            if not token:
                break
            self.assertLess(pages, len(all_ids) + 5, "paging does not terminate")
        self.assertEqual(paged, all_ids, "paging with page_size=1 does not give the full list")
        succ = self.call(c.list_jobs, page_size=1000, state="SUCCEEDED")
        self.assertTrue(succ.jobs)
        self.assertTrue(all(c.state_name(j.state) == "SUCCEEDED" for j in succ.jobs))
        self.assertIn(self.state["tensor_job"].job_id, [j.job_id for j in succ.jobs])
        n_succ = sum(1 for j in full.jobs if c.state_name(j.state) == "SUCCEEDED")
        self.assertEqual(len(succ.jobs), n_succ)
        failed = self.call(c.list_jobs, page_size=1000, state="FAILED")
        self.assertTrue(all(c.state_name(j.state) == "FAILED" for j in failed.jobs))
        self.refused(SC.INVALID_ARGUMENT, c.list_jobs, page_size=1, page_token="garbage-token!",
                       contains=("page_token",))

    def test_50_cancel_running_job(self):
        c = self.cq
        path = os.path.join(self.tmp, "big_random.safetensors")
        t0 = time.monotonic()
        size, sha = sc.write_random_safetensors(path, n_tensors=12, rows=2048, cols=2048, seed=1)
        m = self.call(c.upload_file, "big_random", path, self.protos.q.SAFETENSORS)
        os.unlink(path)
        self.assertEqual((m.sha256, m.size_bytes), (sha, size))
        sys.stderr.write(f"[e2e] generated and uploaded {size / 1e6:.0f} MB in {time.monotonic() - t0:.1f} s\n")
        self.state["big_uploaded"] = True
        job = self.call(c.submit, c.job_spec("big_random", "TENSOR", weight_bits=2, weight_terms=8))
        watcher = sc.Watcher(c, job.job_id, timeout=120)
        watcher.start()
        t_submit = time.monotonic()
        job = c.wait_state(job.job_id, ["RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"], timeout=60, poll=0.02)
        self.assertEqual(c.state_name(job.state), "RUNNING",
                         f"slow job went to {c.state_name(job.state)} ({job.error!r}) before it could be cancelled")
        # a model in use cannot be deleted
        self.refused(SC.FAILED_PRECONDITION, c.delete_model, "big_random")
        t_cancel = time.monotonic()
        try:
            cj = c.cancel_job(job.job_id)
        except grpc.RpcError as e:
            j = c.get_job(job.job_id)
            self.fail(f"CancelJob failed: {sc.rpc_desc(e)}; job now {c.state_name(j.state)} after "
                      f"{t_cancel - t_submit:.1f} s (too fast for the test?){self.tail()}")
        self.assertIn(c.state_name(cj.state), ("RUNNING", "CANCELLED"))
        job = c.wait_state(job.job_id, ["CANCELLED", "SUCCEEDED", "FAILED"], timeout=15, poll=0.05)
        dt = time.monotonic() - t_cancel
        self.assertEqual(c.state_name(job.state), "CANCELLED", f"after cancel: {c.state_name(job.state)}")
        self.assertLess(dt, 5.0, f"cancellation took {dt:.1f} s")
        self.assertTrue(job.error, "a CANCELLED job should say what happened in Job.error")
        watcher.join(30)
        self.assertFalse(watcher.is_alive(), "WatchJob did not end after the job was cancelled")
        self.assertIsNone(watcher.error, f"WatchJob error: {sc.rpc_desc(watcher.error)}")
        self.assertTrue(watcher.events)
        self.assertEqual(c.state_name(watcher.events[-1].job.state), "CANCELLED")
        self.refused(SC.FAILED_PRECONDITION, c.cancel_job, job.job_id)
        canc = self.call(c.list_jobs, page_size=1000, state="CANCELLED")
        self.assertIn(job.job_id, [j.job_id for j in canc.jobs])
        sys.stderr.write(f"[e2e] cancel: RUNNING after {t_cancel - t_submit:.2f} s, CANCELLED {dt:.2f} s after "
                         f"CancelJob\n")

    def test_51_delete_model(self):
        self.need("big_uploaded", "test_50_cancel_running_job")
        c = self.cq
        before = {m.name for m in self.call(c.list_models)}
        self.assertIn("big_random", before)
        self.call(c.delete_model, "big_random")
        after = {m.name for m in self.call(c.list_models)}
        self.assertEqual(after, before - {"big_random"})
        self.refused(SC.NOT_FOUND, c.get_model, "big_random")
        self.refused(SC.NOT_FOUND, c.delete_model, "big_random")
        self.refused(SC.NOT_FOUND, c.submit, c.job_spec("big_random", "TENSOR"))

    def test_99_sigterm(self):
        srv = self.server
        self.assertTrue(srv.alive(), "server died during the tests" + self.tail())
        rc, dt = srv.terminate(timeout=30)
        self.assertIsNotNone(rc, f"server did not exit within 30 s of SIGTERM{self.tail()}")
        self.assertEqual(rc, 0, f"exit code after SIGTERM: {rc}{self.tail()}")
        self.assertLess(dt, 30.0)


class UploadRejectionE2E(ServerTestCase):
    """Small limits: rejected uploads (--max-upload-bytes 64000000) and a full job queue
    (--workers 1 --queue-limit 2)."""

    @classmethod
    def setUpClass(cls):
        cls.protos = sc.Protos.load()
        cls.rec_st = sc.model_file("ocr", "ocr_rec.safetensors")
        cls.server = sc.Server(workers=1, queue_limit=2, max_upload_bytes=64000000)
        try:
            cls.server.start(timeout=60)
            cls.c = sc.Client(cls.server.address, token="quantize", protos=cls.protos)
        except BaseException:
            cls.server.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        if hasattr(cls, "c"):
            cls.c.close()
        rc, _ = cls.server.terminate(timeout=30)
        cls.server.cleanup()
        if rc != 0:
            raise AssertionError(f"upload-rejection server: exit code {rc} after SIGTERM")

    def test_queue_full(self):
        c, q = self.c, self.protos.q
        path = os.path.join(self.server.root, "queue_random.safetensors")
        sc.write_random_safetensors(path, n_tensors=7, rows=1024, cols=2048, seed=3)  # 59 MB
        self.call(c.upload_file, "queue_random", path, q.SAFETENSORS)
        os.unlink(path)
        spec = c.job_spec("queue_random", "TENSOR", weight_bits=2, weight_terms=16)
        ids, err = [], None
        for _ in range(6):
            try:
                ids.append(c.submit(spec).job_id)
            except grpc.RpcError as e:
                err = e
                break
        try:
            self.assertIsNotNone(err, f"6 jobs accepted with --workers 1 --queue-limit 2: "
                                      f"{[c.state_name(c.get_job(i).state) for i in ids]}")
            self.assertEqual(err.code(), SC.RESOURCE_EXHAUSTED, sc.rpc_desc(err))
            self.assertGreaterEqual(len(ids), 2, "the queue refused a job while (nearly) empty")
        finally:
            for i in ids:
                try:
                    c.cancel_job(i)
                except grpc.RpcError:
                    pass  # finished meanwhile
        for i in ids:
            c.wait_state(i, ["SUCCEEDED", "FAILED", "CANCELLED"], timeout=60)
        self.call(c.delete_model, "queue_random")

    def models(self):
        return sorted((m.name, m.sha256, m.size_bytes) for m in self.call(self.c.list_models))

    def test_rejected_uploads(self):
        c, q = self.c, self.protos.q
        real = self.call(c.upload_file, "weights", self.rec_st, q.SAFETENSORS)
        before = self.models()
        size = os.path.getsize(self.rec_st)
        sha = sc.sha256_file(self.rec_st)

        # wrong sha256
        bad_sha = hashlib.sha256(b"something else").hexdigest()
        self.refused(SC.INVALID_ARGUMENT, c.upload_file, "wrong_sha", self.rec_st, q.SAFETENSORS,
                       sha256=bad_sha, contains=("sha256",))
        # not lower-case hex
        self.refused(SC.INVALID_ARGUMENT, c.upload_file, "upper_sha", self.rec_st, q.SAFETENSORS,
                       sha256=sha.upper(), contains=("sha256",))
        # truncated: half of the bytes, header says the full size
        self.refused(SC.INVALID_ARGUMENT, c.upload_iter, "truncated", q.SAFETENSORS, sha,
                       sc.file_blocks(self.rec_st, limit=size // 2), size, contains=("size", "bytes", "trunc"))
        # oversize: 65 MB streamed without size_bytes
        block = os.urandom(1 << 20)
        total = 65 * 1000 * 1000
        h = hashlib.sha256()
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            h.update(block[:n])
            sent += n
        big_sha = h.hexdigest()

        def blocks():
            s = 0
            while s < total:
                n = min(len(block), total - s)
                yield block[:n]
                s += n

        t0 = time.monotonic()
        self.refused(SC.RESOURCE_EXHAUSTED, c.upload_iter, "oversize", q.SAFETENSORS, big_sha, blocks(),
                       contains=("max-upload-bytes", "64000000", "limit", "size"))
        sys.stderr.write(f"[e2e] oversize stream refused after {time.monotonic() - t0:.2f} s\n")
        # oversize announced in size_bytes: refused early
        self.refused(SC.RESOURCE_EXHAUSTED, c.upload_iter, "oversize2", q.SAFETENSORS, big_sha, blocks(),
                       total)
        # the same name with other content
        other = sc.tiny_safetensors_bytes(seed=7)
        self.refused(SC.ALREADY_EXISTS, c.upload_iter, "weights", q.SAFETENSORS, sc.sha256_bytes(other),
                       iter([other]), len(other), contains=("weights",))
        # data before the header / no header at all
        self.refused(SC.INVALID_ARGUMENT, c.quantizer.UploadModel,
                       iter([q.UploadChunk(data=b"abc")]), metadata=c.md(), contains=("header",))
        self.refused(SC.INVALID_ARGUMENT, c.quantizer.UploadModel, iter([]), metadata=c.md(),
                       contains=("header",))
        # bad names / format
        self.refused(SC.INVALID_ARGUMENT, c.upload_iter, "../evil", q.SAFETENSORS, sc.sha256_bytes(other),
                       iter([other]), contains=("name",))
        self.refused(SC.INVALID_ARGUMENT, c.upload_iter, "", q.SAFETENSORS, sc.sha256_bytes(other),
                       iter([other]), contains=("name",))
        self.refused(SC.INVALID_ARGUMENT, c.upload_iter, "nofmt", q.MODEL_FORMAT_UNSPECIFIED,
                       sc.sha256_bytes(other), iter([other]), contains=("format",))

        after = self.models()
        self.assertEqual(before, after, "rejected uploads changed the model list")
        for name in ("wrong_sha", "upper_sha", "truncated", "oversize", "oversize2", "../evil", "nofmt"):
            try:
                c.get_model(name)
                self.fail(f"rejected upload {name!r} is visible through GetModel")
            except grpc.RpcError as e:
                self.assertIn(e.code(), (SC.NOT_FOUND, SC.INVALID_ARGUMENT), sc.rpc_desc(e))
        # the good model is intact and still usable after all this
        g = self.call(c.get_model, "weights")
        self.assertEqual((g.sha256, g.size_bytes), (real.sha256, real.size_bytes))
        # the server still takes a good upload
        m = self.call(c.upload_iter, "small_blob", q.SAFETENSORS, sc.sha256_bytes(other), iter([other]), len(other))
        self.assertEqual((m.name, m.sha256), ("small_blob", sc.sha256_bytes(other)))


if __name__ == "__main__":
    unittest.main(verbosity=2)
