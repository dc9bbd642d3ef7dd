#!/usr/bin/python3
r"""Security tests of fpxint-server: the access rule of every RPC, TLS and mutual TLS, path
traversal, size limits, hostile inference requests, TorchScript upload policy, tokens in logs.

Run:
  FPXINT_SERVER_BIN=build/bin/fpxint-server FPXINT_CLI_BIN=build/bin/fpxint \
      FPXINT_MODELS_DIR=~/.cache/fpxint/models /usr/bin/python3 tests/security/test_security.py -v

The access rules are the ones the server implements (server/auth.cc, the Check(...) calls in
server/quantizer_service.cc and server/inference_service.cc, docs/SERVICE.md "Services"):
  * fpxint.v1.Quantizer, every RPC: role `quantize` (or `admin`); GetDeployment also `infer`;
  * inference.GRPCInferenceService: ServerLive, ServerReady, ServerMetadata open; every other RPC
    role `infer` (or `admin`); RepositoryModelLoad also `quantize`, which may serve a bare upload
    (an `infer` token may only load existing deployments);
  * grpc.health.v1.Health and server reflection: open.
No / malformed / unknown token: UNAUTHENTICATED; a valid token without the role: PERMISSION_DENIED.
The matrix covers every method of the three service descriptors (a new RPC without a rule here
fails the test).

TLS: a CA, a server certificate for 127.0.0.1/localhost (SAN), a client certificate and a second,
unrelated CA with its own client certificate are generated with the openssl CLI in the test.
"""

import base64
import glob
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import json

import numpy as np
import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import service_client as sc  # noqa: E402

SC = grpc.StatusCode
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
FMNIST_INPUTS = [{"name": "input__0", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]

MULTI_TOKEN = "e2e-multi-role-token-5b1e90"  # quantize,infer
UNKNOWN_TOKEN = "zz-unknown-token-5d2f9a71c3e8"
SECRETS = sorted(set(list(sc.TOKENS.values()) + [MULTI_TOKEN, UNKNOWN_TOKEN]))

# every server this module starts: their logs are searched for tokens at the end
ALL_SERVERS = []


def start_server(**kw):
    extra = kw.pop("extra_lines", ())
    root = tempfile.mkdtemp(prefix="fpxint-sec-")
    sc.write_token_file(os.path.join(root, "tokens.txt"), extra_lines=[f"{MULTI_TOKEN} quantize,infer"] + list(extra))
    srv = sc.Server(root=root, **kw)
    ALL_SERVERS.append(srv)
    srv.start(timeout=60)
    return srv


def tearDownModule():
    for srv in ALL_SERVERS:
        srv.cleanup()


def cli_bin():
    path = os.environ.get("FPXINT_CLI_BIN") or os.path.join(sc.REPO_ROOT, "build", "bin", "fpxint")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise AssertionError(f"fpxint CLI not found: {path!r} (set FPXINT_CLI_BIN)")
    return path


def outside_listing(root, data_dir):
    """Every path under root that is not inside data_dir or a server log/port file."""
    out = []
    for p in sc.dir_entries(root):
        full = os.path.join(root, p)
        if full == data_dir or full.startswith(data_dir + os.sep):
            continue
        out.append(p)
    return out


def data_listing(data_dir):
    """Top-level entries of a data directory outside blobs/, tmp/, repository/ and the journal."""
    allowed = {"blobs", "tmp", "repository", "journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"}
    return sorted(set(os.listdir(data_dir)) - allowed)


def blob_files(data_dir):
    """The blob files of a data directory (relative paths; empty <aa>/ directories do not count)."""
    root = os.path.join(data_dir, "blobs")
    return sorted(p for p in sc.dir_entries(root) if os.path.isfile(os.path.join(root, p)))


class SecCase(sc.RpcAssertions, unittest.TestCase):
    server = None

    def tail(self, srv=None):
        srv = srv or self.server
        return ("\n" + srv.log_tail(30)) if srv is not None else ""


# ----------------------------------------------------------------------------------------------
# Access matrix
# ----------------------------------------------------------------------------------------------

# credential -> (authorization metadata value or None, roles it carries; None: not authenticated)
CREDS = {
    "no token": (None, None),
    "Basic scheme": ("Basic " + base64.b64encode(f"admin:{sc.TOKENS['admin']}".encode()).decode(), None),
    "Bearer, no token": ("Bearer", None),
    "Bearer + empty": ("Bearer ", None),
    "unknown token": (f"Bearer {UNKNOWN_TOKEN}", None),
    "admin token minus a char": (f"Bearer {sc.TOKENS['admin'][:-1]}", None),
    "admin token plus a char": (f"Bearer {sc.TOKENS['admin']}x", None),
    "admin token, 2 spaces": (f"Bearer  {sc.TOKENS['admin']}", None),
    "token without scheme": (sc.TOKENS["admin"], None),
    "quantize": (f"Bearer {sc.TOKENS['quantize']}", {"quantize"}),
    "infer": (f"Bearer {sc.TOKENS['infer']}", {"infer"}),
    "admin": (f"Bearer {sc.TOKENS['admin']}", {"admin"}),
    "admin, lower-case bearer": (f"bearer {sc.TOKENS['admin']}", {"admin"}),
    "quantize,infer": (f"Bearer {MULTI_TOKEN}", {"quantize", "infer"}),
}


class ServerCase(SecCase):
    """A test class with one server of its own (started with `server_kw`) and an admin client."""
    server_kw = {}

    @classmethod
    def setUpClass(cls):
        cls.protos = sc.Protos.load()
        cls.server = start_server(**cls.server_kw)
        cls.c = sc.Client(cls.server.address, token="admin", protos=cls.protos)

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        rc, _ = cls.server.terminate(timeout=60)
        if rc != 0:
            raise AssertionError(f"exit code after SIGTERM: {rc}")


class AccessMatrix(ServerCase):
    server_kw = dict(workers=1, queue_limit=8, extra_args=["--allow-torchscript-uploads", "admin"])


    def rpc_table(self):
        """method full name -> (rule, invoke(metadata), code expected when allowed)."""
        q, inf, h = self.protos.q, self.protos.inf, self.protos.health
        c = self.c
        qs, isv = c.quantizer, c.inference
        tiny = sc.tiny_safetensors_bytes(seed=11)
        tiny_sha = sc.sha256_bytes(tiny)
        ch = c.channel
        health_check = ch.unary_unary("/grpc.health.v1.Health/Check",
                                      request_serializer=h.HealthCheckRequest.SerializeToString,
                                      response_deserializer=h.HealthCheckResponse.FromString)
        health_watch = ch.unary_stream("/grpc.health.v1.Health/Watch",
                                       request_serializer=h.HealthCheckRequest.SerializeToString,
                                       response_deserializer=h.HealthCheckResponse.FromString)
        reflection = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)

        def first(stream):
            try:
                return next(stream)
            finally:
                stream.cancel()

        def watch_health(md):
            return first(health_watch(h.HealthCheckRequest(service=""), metadata=md, timeout=10))

        def reflect(md):
            r = first(reflection(iter([b"\x3a\x00"]), metadata=md, timeout=10))  # list_services
            assert b"fpxint.v1.Quantizer" in r, r
            return r

        def upload(md):
            return qs.UploadModel(c.upload_chunks("acl-probe", q.SAFETENSORS, tiny_sha, iter([tiny]), len(tiny)),
                                  metadata=md, timeout=30)

        Q, INF, OPEN = "quantize", "infer", "open"
        NF, OK = SC.NOT_FOUND, SC.OK
        return {
            "fpxint.v1.Quantizer/UploadModel": (Q, upload, OK),
            "fpxint.v1.Quantizer/CommitModelFiles": (Q, lambda md: qs.CommitModelFiles(q.CommitModelFilesRequest(
                name="acl-dir", dry_run=True, files=[q.ModelFile(path="model.safetensors", sha256=tiny_sha,
                                                                 size_bytes=len(tiny))]), metadata=md, timeout=10), OK),
            "fpxint.v1.Quantizer/GetModel": (Q, lambda md: qs.GetModel(q.ModelRef(name="no-such"), metadata=md, timeout=10), NF),
            "fpxint.v1.Quantizer/ListModels": (Q, lambda md: qs.ListModels(q.ListModelsRequest(), metadata=md, timeout=10), OK),
            "fpxint.v1.Quantizer/DeleteModel": (Q, lambda md: qs.DeleteModel(q.ModelRef(name="no-such"), metadata=md, timeout=10), NF),
            "fpxint.v1.Quantizer/SubmitJob": (Q, lambda md: qs.SubmitJob(q.SubmitJobRequest(spec=q.JobSpec(
                model="no-such", granularity=q.TENSOR)), metadata=md, timeout=10), NF),
            "fpxint.v1.Quantizer/GetJob": (Q, lambda md: qs.GetJob(q.JobRef(job_id="no-such"), metadata=md, timeout=10), NF),
            "fpxint.v1.Quantizer/ListJobs": (Q, lambda md: qs.ListJobs(q.ListJobsRequest(), metadata=md, timeout=10), OK),
            "fpxint.v1.Quantizer/DeleteJob": (Q, lambda md: qs.DeleteJob(q.JobRef(job_id="no-such"), metadata=md, timeout=10), NF),
            "fpxint.v1.Quantizer/CancelJob": (Q, lambda md: qs.CancelJob(q.JobRef(job_id="no-such"), metadata=md, timeout=10), NF),
            "fpxint.v1.Quantizer/WatchJob": (Q, lambda md: list(qs.WatchJob(q.JobRef(job_id="no-such"), metadata=md, timeout=10)), NF),
            "fpxint.v1.Quantizer/DownloadArtifact": (Q, lambda md: list(qs.DownloadArtifact(
                q.ArtifactRef(artifact_id="no-such"), metadata=md, timeout=10)), NF),
            # who serves a model (infer) and who deployed it (quantize) may both describe it
            "fpxint.v1.Quantizer/GetDeployment": (INF + "|" + Q, lambda md: qs.GetDeployment(
                q.DeploymentRef(name="no-such"), metadata=md, timeout=10), NF),
            "inference.GRPCInferenceService/ServerLive": (OPEN, lambda md: isv.ServerLive(inf.ServerLiveRequest(), metadata=md, timeout=10), OK),
            "inference.GRPCInferenceService/ServerReady": (OPEN, lambda md: isv.ServerReady(inf.ServerReadyRequest(), metadata=md, timeout=10), OK),
            "inference.GRPCInferenceService/ServerMetadata": (OPEN, lambda md: isv.ServerMetadata(inf.ServerMetadataRequest(), metadata=md, timeout=10), OK),
            "inference.GRPCInferenceService/ModelReady": (INF, lambda md: isv.ModelReady(inf.ModelReadyRequest(name="no-such"), metadata=md, timeout=10), NF),
            "inference.GRPCInferenceService/ModelMetadata": (INF, lambda md: isv.ModelMetadata(inf.ModelMetadataRequest(name="no-such"), metadata=md, timeout=10), NF),
            "inference.GRPCInferenceService/ModelInfer": (INF, lambda md: isv.ModelInfer(inf.ModelInferRequest(model_name="no-such"), metadata=md, timeout=10), NF),
            "inference.GRPCInferenceService/ModelStatistics": (INF, lambda md: isv.ModelStatistics(inf.ModelStatisticsRequest(), metadata=md, timeout=10), OK),
            "inference.GRPCInferenceService/RepositoryIndex": (INF, lambda md: isv.RepositoryIndex(inf.RepositoryIndexRequest(), metadata=md, timeout=10), OK),
            # infer loads deployments; quantize may serve a bare upload (not an existing deployment)
            "inference.GRPCInferenceService/RepositoryModelLoad": (INF + "|" + Q, lambda md: isv.RepositoryModelLoad(
                inf.RepositoryModelLoadRequest(model_name="no-such"), metadata=md, timeout=10), NF),
            "inference.GRPCInferenceService/RepositoryModelUnload": (INF, lambda md: isv.RepositoryModelUnload(
                inf.RepositoryModelUnloadRequest(model_name="no-such"), metadata=md, timeout=10), NF),
            "grpc.health.v1.Health/Check": (OPEN, lambda md: health_check(h.HealthCheckRequest(service=""), metadata=md, timeout=10), OK),
            "grpc.health.v1.Health/Watch": (OPEN, watch_health, OK),
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (OPEN, reflect, OK),
        }

    def test_table_covers_every_rpc(self):
        table = self.rpc_table()
        described = set()
        for module, svc in ((self.protos.q, "Quantizer"), (self.protos.inf, "GRPCInferenceService"),
                            (self.protos.health, "Health")):
            sd = module.DESCRIPTOR.services_by_name[svc]
            described |= {f"{sd.full_name}/{m.name}" for m in sd.methods}
        missing = sorted(described - set(table))
        self.assertFalse(missing, f"RPCs without an access rule in this test: {missing}")

    def test_access_matrix(self):
        table = self.rpc_table()
        wrong, checked = [], 0
        for method, (rule, invoke, allowed_code) in table.items():
            for cred, (value, roles) in CREDS.items():
                md = () if value is None else (("authorization", value),)
                if rule == "open":
                    want = allowed_code
                elif roles is None:
                    want = SC.UNAUTHENTICATED
                elif "admin" in roles or any(r in roles for r in rule.split("|")):
                    want = allowed_code
                else:
                    want = SC.PERMISSION_DENIED
                try:
                    invoke(md)
                    got, detail = SC.OK, ""
                except grpc.RpcError as e:
                    got, detail = e.code(), e.details()
                checked += 1
                if got != want:
                    wrong.append(f"{method} with {cred}: {got.name} {detail!r}, want {want.name} (rule: {rule})")
        sys.stderr.write(f"[security] access matrix: {checked} calls ({len(table)} RPCs x {len(CREDS)} credentials), "
                         f"{len(wrong)} wrong\n")
        self.assertFalse(wrong, f"{len(wrong)} access-rule violations:\n  " + "\n  ".join(wrong) + self.tail())

    def test_denied_calls_change_nothing(self):
        q, inf = self.protos.q, self.protos.inf
        c = self.c
        victim = sc.tiny_safetensors_bytes(seed=21)
        self.call(c.upload_iter, "victim", q.SAFETENSORS, sc.sha256_bytes(victim), iter([victim]), len(victim))
        self.call(c.upload_file, "fmnist", sc.model_file("fmnist", "fmnist_cnn.pt"), q.TORCHSCRIPT,
                  inputs=FMNIST_INPUTS)
        self.call(c.inference.RepositoryModelLoad, inf.RepositoryModelLoadRequest(model_name="fmnist"),
                  metadata=c.md("admin"))
        jobs_before = len(sc.list_all_jobs(c))
        blobs_before = blob_files(self.server.data_dir)
        self.refused(SC.PERMISSION_DENIED, c.delete_model, "victim", token="infer")
        self.refused(SC.UNAUTHENTICATED, c.delete_model, "victim", token=None)
        self.refused(SC.UNAUTHENTICATED, c.upload_iter, "sneaky", q.SAFETENSORS, sc.sha256_bytes(b"x" * 64),
                     iter([b"x" * 64]), 64, token=None)
        self.refused(SC.PERMISSION_DENIED, c.upload_iter, "sneaky", q.SAFETENSORS, sc.sha256_bytes(b"x" * 64),
                     iter([b"x" * 64]), 64, token="infer")
        self.refused(SC.PERMISSION_DENIED, c.submit, c.job_spec("victim", "TENSOR"), token="infer")
        self.refused(SC.PERMISSION_DENIED, c.inference.RepositoryModelUnload,
                     inf.RepositoryModelUnloadRequest(model_name="fmnist"), metadata=c.md("quantize"))
        self.refused(SC.UNAUTHENTICATED, c.inference.RepositoryModelUnload,
                     inf.RepositoryModelUnloadRequest(model_name="fmnist"), metadata=())
        self.refused(SC.PERMISSION_DENIED, c.infer, "fmnist", np.zeros((1, 1, 28, 28), np.float32), token="quantize")
        names = {m.name for m in self.call(c.list_models)}
        self.assertIn("victim", names, "a refused DeleteModel deleted the model")
        self.assertNotIn("sneaky", names, "a refused UploadModel stored the model")
        self.assertEqual(len(sc.list_all_jobs(c)), jobs_before, "a refused SubmitJob created a job")
        self.assertEqual(blob_files(self.server.data_dir), blobs_before,
                         "refused calls changed the blob store")
        ready = self.call(c.inference.ModelReady, inf.ModelReadyRequest(name="fmnist"), metadata=c.md("infer"))
        self.assertTrue(ready.ready, "a refused RepositoryModelUnload unloaded the model")
        out, _ = c.infer_output(self.call(c.infer, "fmnist", np.zeros((2, 1, 28, 28), np.float32), token="infer"))
        self.assertEqual(out.shape, (2, 10))

    def test_torchscript_admin_only(self):
        q = self.protos.q
        c = self.c
        pt = sc.model_file("ocr", "ocr_cls.pt")
        blobs_before = blob_files(self.server.data_dir)
        for who in ("quantize", "quantize,infer"):
            tok = MULTI_TOKEN if who == "quantize,infer" else who
            self.refused(SC.PERMISSION_DENIED, c.upload_file, f"ts-{who.replace(',', '-')}", pt, q.TORCHSCRIPT,
                         token=tok, contains=("torchscript",))
        self.refused(SC.PERMISSION_DENIED, c.upload_file, "ts-infer", pt, q.TORCHSCRIPT, token="infer")
        self.assertEqual(blob_files(self.server.data_dir), blobs_before,
                         "refused TorchScript uploads reached the blob store")
        # a TorchScript archive declared as safetensors is not accepted either
        self.refused(SC.INVALID_ARGUMENT, c.upload_file, "ts-disguised", pt, q.SAFETENSORS, token="quantize",
                     contains=("safetensors",))
        self.assertEqual(blob_files(self.server.data_dir), blobs_before,
                         "the disguised TorchScript upload stayed in the blob store")
        names = {m.name for m in self.call(c.list_models)}
        self.assertFalse({n for n in names if n.startswith("ts-")}, f"refused uploads listed: {names}")
        m = self.call(c.upload_file, "ts-admin", pt, q.TORCHSCRIPT, token="admin")
        self.assertEqual(m.format, q.TORCHSCRIPT)

    def test_traversal_names_and_ids(self):
        q, inf = self.protos.q, self.protos.inf
        c = self.c
        srv = self.server
        before_out = outside_listing(srv.root, srv.data_dir)
        before_data = data_listing(srv.data_dir)
        tiny = sc.tiny_safetensors_bytes(seed=31)
        tsha = sc.sha256_bytes(tiny)
        bad_names = ["../x", "a/b", "..", ".", "/etc/passwd", "../../../../tmp/fpxint-evil", "a/../b", "x" * 129,
                     "x" * 5000, "a\x00b", "\x00", ".hidden", "-dash", "a\\b", "a b", "\u00fcml", "%2e%2e", "",
                     "a\nb", "*", "' OR '1'='1"]
        denied = (SC.INVALID_ARGUMENT, SC.NOT_FOUND)
        wrong = []

        def expect(what, codes, fn, *args, **kw):
            try:
                r = fn(*args, **kw)
                if hasattr(r, "__iter__") and not hasattr(r, "DESCRIPTOR"):
                    r = list(r)
                wrong.append(f"{what}: accepted ({str(r)[:120]!r})")
            except grpc.RpcError as e:
                if e.code() not in codes:
                    wrong.append(f"{what}: {sc.rpc_desc(e)} (want {'/'.join(x.name for x in codes)})")

        for name in bad_names:
            r = repr(name[:40])
            expect(f"UploadModel name {r}", (SC.INVALID_ARGUMENT,), c.upload_iter, name, q.SAFETENSORS, tsha,
                   iter([tiny]), len(tiny))
            if name:  # an empty signature name is allowed (the server names it input__0)
                expect(f"UploadModel inputs[0].name {r}", (SC.INVALID_ARGUMENT,), c.upload_iter, "sig-probe",
                       q.SAFETENSORS, tsha, iter([tiny]), len(tiny),
                       inputs=[{"name": name, "datatype": "FP32", "shape": [1, 4]}])
            expect(f"GetModel {r}", denied, c.get_model, name)
            expect(f"DeleteModel {r}", denied, c.delete_model, name)
            expect(f"SubmitJob spec.model {r}", denied, c.submit, c.job_spec(name, "TENSOR"))
            expect(f"RepositoryModelLoad {r}", denied, c.inference.RepositoryModelLoad,
                   inf.RepositoryModelLoadRequest(model_name=name), metadata=c.md())
            expect(f"RepositoryModelUnload {r}", denied, c.inference.RepositoryModelUnload,
                   inf.RepositoryModelUnloadRequest(model_name=name), metadata=c.md())
            expect(f"ModelMetadata {r}", denied, c.inference.ModelMetadata, inf.ModelMetadataRequest(name=name),
                   metadata=c.md())
            expect(f"ModelReady {r}", denied, c.inference.ModelReady, inf.ModelReadyRequest(name=name),
                   metadata=c.md())
            expect(f"ModelInfer {r}", denied, c.infer, name, np.zeros((1, 1, 28, 28), np.float32))
            expect(f"ModelInfer version {r}", denied + (SC.FAILED_PRECONDITION,), c.infer, "no-such",
                   np.zeros((1, 1, 28, 28), np.float32), version=name)
            expect(f"CommitModelFiles name {r}", (SC.INVALID_ARGUMENT,), c.commit_model_files, name,
                   [("model.safetensors", tsha, len(tiny))], dry_run=True)
        # A directory model's file paths: relative, no "..", no hidden or odd names; neither an
        # upload nor a commit may name one.
        for path in [n for n in bad_names if n != "a/b"] + ["a/b/c/d/e", "a//b", "dir/"]:
            r = repr(path[:40])
            expect(f"UploadModel file_path {r}", (SC.INVALID_ARGUMENT,), c.upload_iter, "dir-probe",
                   q.HF_DIRECTORY, tsha, iter([tiny]), len(tiny), file_path=path)
            expect(f"CommitModelFiles files[0].path {r}", (SC.INVALID_ARGUMENT,), c.commit_model_files,
                   "dir-probe", [(path, tsha, len(tiny))], dry_run=True)
        bad_ids = ["../journal.sqlite", "../../journal.sqlite", "../../../etc/passwd", "/etc/passwd", "..", ".",
                   "a/b", "\x00", "x" * 5000, "art-" + "../" * 8 + "etc/passwd", "*", "%", "' OR '1'='1",
                   "art-1' OR '1'='1' --", "blobs", "tmp"]
        # a real blob's SHA-256 is not an artifact id either
        blobs = [os.path.basename(p) for p in sc.dir_entries(os.path.join(srv.data_dir, "blobs")) if len(os.path.basename(p)) == 64]
        bad_ids += blobs[:1]
        for aid in bad_ids:
            r = repr(aid[:40])
            for off in (0, 8):
                expect(f"DownloadArtifact {r} offset {off}", denied + (SC.OUT_OF_RANGE,),
                       c.download, aid, offset=off)
            expect(f"GetJob {r}", denied, c.get_job, aid)
            expect(f"CancelJob {r}", denied, c.cancel_job, aid)
            expect(f"WatchJob {r}", denied, c.watch, aid, timeout=10)
        expect("ListJobs page_token traversal", (SC.INVALID_ARGUMENT,), c.list_jobs, page_token="../../x")
        expect("ListJobs page_token SQL", (SC.INVALID_ARGUMENT,), c.list_jobs, page_token="1 OR 1=1")
        self.assertEqual(c.serving_status_name(self.call(c.health)), "SERVING")
        after_out = outside_listing(srv.root, srv.data_dir)
        created = sorted(set(after_out) - set(before_out))
        created = [p for p in created if not os.path.basename(p).startswith(("server", "port"))]
        self.assertFalse(created, f"files created outside the data directory: {created}")
        self.assertEqual(data_listing(srv.data_dir), before_data, "new entries at the top of the data directory")
        self.assertFalse(os.path.exists("/tmp/fpxint-evil"), "/tmp/fpxint-evil was created")
        self.assertFalse(wrong, f"{len(wrong)} hostile names/ids not refused as expected:\n  " + "\n  ".join(wrong))

class DeployTraversal(ServerCase):
    """A server of its own: the deployments a failing run creates must not disturb the other tests."""

    server_kw = dict(workers=1, queue_limit=16)


    def test_traversal_deploy_names(self):
        """spec.deploy.name / version become directories under <data>/repository: a name that leaves
        it must be refused at SubmitJob."""
        q = self.protos.q
        c = self.c
        srv = self.server
        if "fmnist" not in {m.name for m in self.call(c.list_models)}:
            self.call(c.upload_file, "fmnist", sc.model_file("fmnist", "fmnist_cnn.pt"), q.TORCHSCRIPT,
                      inputs=FMNIST_INPUTS)
        repo = os.path.join(srv.data_dir, "repository")
        abs_target = os.path.join(srv.root, "deploy-abs-escape")
        cases = [("name", "../escape-name"), ("name", "../../escape-root"), ("name", "a/b"), ("name", ".."),
                 ("name", "."), ("name", abs_target), ("name", "x" * 300), ("name", "a\x00b"),
                 ("version", "../../escape-version"), ("version", "a/b"), ("version", ".."),
                 ("version", os.path.join(srv.root, "deploy-abs-version")), ("version", "\x00")]
        # an existing directory outside the data directory: a deployment must never replace it
        victim = os.path.join(srv.root, "victim")
        os.makedirs(os.path.join(victim, "1"))
        precious = os.path.join(victim, "1", "precious.txt")
        with open(precious, "w") as f:
            f.write("not the server's\n")
        cases.append(("name", victim))
        before_out = outside_listing(srv.root, srv.data_dir)
        before_data = data_listing(srv.data_dir)
        wrong = []
        for field, value in cases:
            deploy = {"enabled": True, "name": "safe-name", "version": ""}
            deploy[field] = value
            if field == "version":
                deploy["name"] = "fmnist-vcheck"
            try:
                j = c.submit(c.job_spec("fmnist", "LAYER", weight_bits=4, weight_terms=1, deploy=deploy))
            except grpc.RpcError as e:
                if e.code() != SC.INVALID_ARGUMENT:
                    wrong.append(f"deploy.{field} {value[:40]!r}: {sc.rpc_desc(e)} (want INVALID_ARGUMENT)")
                continue
            j = c.wait_state(j.job_id, TERMINAL, timeout=120, poll=0.05)
            wrong.append(f"deploy.{field} {value[:40]!r}: SubmitJob accepted it (want INVALID_ARGUMENT); the job "
                         f"ended {c.state_name(j.state)} {j.error[:100]!r}, deployed as "
                         f"{j.result.deployed_name[:60]!r}/{j.result.deployed_version[:40]!r}")
        created = sorted(set(outside_listing(srv.root, srv.data_dir)) - set(before_out))
        created = [p for p in created if not os.path.basename(p).startswith(("server", "port"))]
        new_top = sorted(set(data_listing(srv.data_dir)) - set(before_data))
        escaped = []
        if created:
            escaped.append(f"outside the data directory: {created}")
        if new_top:
            escaped.append(f"in the data directory outside repository/: {new_top}")
        if os.path.isdir(repo):
            odd = [p for p in os.listdir(repo) if p.startswith(".") or p in ("..", ".")]
            if odd:
                escaped.append(f"odd entries in repository/: {odd}")
        if not os.path.exists(precious):
            escaped.append(f"DELETED {precious} (deploy.name {victim!r}, version '1': the server removed the "
                           f"existing directory {os.path.join(victim, '1')} and put the deployment there)")
        if escaped:
            wrong.append("files written outside <data>/repository/<name>/<version>: " + "; ".join(escaped))
        self.assertEqual(c.serving_status_name(self.call(c.health)), "SERVING")
        self.assertFalse(wrong, f"{len(wrong)} deploy name/version traversals not refused:\n  " + "\n  ".join(wrong)
                         + "\nreproduce: SubmitJob LAYER of a TorchScript upload with spec.deploy "
                           "{enabled: true, name: '../escape-name'}")


# ----------------------------------------------------------------------------------------------
# Limits and hostile inference requests
# ----------------------------------------------------------------------------------------------

def safetensors_of_size(total):
    """A valid F32 safetensors file of exactly `total` bytes (one 1-D tensor; the header is padded
    with spaces to a multiple of 8)."""
    assert total % 8 == 0
    n = (total - 64) // 4
    for _ in range(8):
        hb = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}},
                        separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        n2 = (total - 8 - len(hb)) // 8 * 2
        if n2 == n:
            hb += b" " * (total - 8 - len(hb) - 4 * n)
            data = struct.pack("<Q", len(hb)) + hb + np.arange(n, dtype="<f4").tobytes()
            assert len(data) == total
            return data
        n = n2
    raise AssertionError(f"cannot build a safetensors file of {total} bytes")


class Limits(ServerCase):
    MAX_UPLOAD = 2_000_000
    MAX_MSG = 1 << 20
    server_kw = dict(workers=1, queue_limit=4, max_upload_bytes=MAX_UPLOAD,
                     extra_args=["--max-message-bytes", str(MAX_MSG), "--allow-torchscript-uploads", "all"])

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        q, inf = cls.protos.q, cls.protos.inf
        pt = sc.model_file("fmnist", "fmnist_cnn.pt")  # in 256 KiB chunks: 1 MiB ones exceed --max-message-bytes
        cls.c.upload_iter("fmnist", q.TORCHSCRIPT, sc.sha256_file(pt), sc.file_blocks(pt, 256 << 10),
                          os.path.getsize(pt), inputs=FMNIST_INPUTS)
        cls.c.inference.RepositoryModelLoad(inf.RepositoryModelLoadRequest(model_name="fmnist"), metadata=cls.c.md())


    def store_state(self):
        d = self.server.data_dir
        return (blob_files(d), sorted(m.name for m in self.call(self.c.list_models)))

    def tmp_empty(self):
        tmp = os.path.join(self.server.data_dir, "tmp")
        deadline = time.monotonic() + 10
        while sc.tmp_entries(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        return sc.tmp_entries(tmp)

    def test_upload_limit(self):
        q = self.protos.q
        c = self.c
        before = self.store_state()
        over = os.urandom(3_000_000)
        osha = sc.sha256_bytes(over)
        # exceeded mid-stream (no size announced)
        e = self.refused(SC.RESOURCE_EXHAUSTED, c.upload_iter, "over-stream", q.SAFETENSORS, osha,
                         sc.byte_blocks(over, 256 << 10), 0, contains=("max-upload-bytes", str(self.MAX_UPLOAD)))
        sys.stderr.write(f"[security] upload over the limit mid-stream: {sc.rpc_desc(e)}\n")
        self.assertEqual(self.tmp_empty(), [], "the refused upload left files in tmp/")
        # one byte over, in one piece
        one_over = os.urandom(self.MAX_UPLOAD + 1)
        self.refused(SC.RESOURCE_EXHAUSTED, c.upload_iter, "one-over", q.SAFETENSORS, sc.sha256_bytes(one_over),
                     sc.byte_blocks(one_over, 512 << 10), 0)
        # announced in the header: refused before any data
        self.refused(SC.RESOURCE_EXHAUSTED, c.upload_iter, "over-header", q.SAFETENSORS, osha,
                     sc.byte_blocks(over, 256 << 10), len(over))
        self.assertEqual(self.store_state(), before, "refused uploads changed the store or the model list")
        self.assertEqual(self.tmp_empty(), [])
        # exactly at the limit: accepted
        exact = safetensors_of_size(self.MAX_UPLOAD)
        self.assertEqual(len(exact), self.MAX_UPLOAD)
        m = self.call(c.upload_iter, "exact-limit", q.SAFETENSORS, sc.sha256_bytes(exact),
                      sc.byte_blocks(exact, 256 << 10), len(exact))
        self.assertEqual(m.size_bytes, self.MAX_UPLOAD)

    def test_message_limit(self):
        q = self.protos.q
        c = self.c
        before = self.store_state()
        # one UploadChunk larger than --max-message-bytes
        big = os.urandom(self.MAX_MSG + 4096)
        self.refused(SC.RESOURCE_EXHAUSTED, c.upload_iter, "big-chunk", q.SAFETENSORS, sc.sha256_bytes(big),
                     iter([big]), len(big))
        self.assertEqual(self.store_state(), before)
        self.assertEqual(self.tmp_empty(), [])
        # ModelInfer: 400 images (1.25 MB) > 1 MiB refused; 64 images answered
        x = np.zeros((400, 1, 28, 28), np.float32)
        self.assertGreater(x.nbytes, self.MAX_MSG)
        e = self.refused(SC.RESOURCE_EXHAUSTED, c.infer, "fmnist", x)
        sys.stderr.write(f"[security] ModelInfer of {x.nbytes} bytes: {sc.rpc_desc(e)}\n")
        out, _ = c.infer_output(self.call(c.infer, "fmnist", np.zeros((64, 1, 28, 28), np.float32)))
        self.assertEqual(out.shape, (64, 10))
        self.assertEqual(c.serving_status_name(self.call(c.health)), "SERVING")

    def test_hostile_infer_requests(self):
        inf = self.protos.inf
        c = self.c
        img = np.zeros((1, 1, 28, 28), np.float32)
        raw = img.tobytes()
        cases = [
            ("huge first dimension", dict(shape=[1 << 40, 1, 28, 28], raw_bytes=raw)),
            ("2^28+ elements", dict(shape=[1 << 20, 1, 28, 28], raw_bytes=raw)),
            ("product overflows int64", dict(shape=[1 << 62, 1 << 62, 28, 28], raw_bytes=raw)),
            ("negative dimension", dict(shape=[-1, 1, 28, 28], raw_bytes=raw)),
            ("wrong rank", dict(shape=[784], raw_bytes=raw)),
            ("too few raw bytes", dict(shape=[2, 1, 28, 28], raw_bytes=raw)),
            ("too many raw bytes", dict(shape=[1, 1, 28, 28], raw_bytes=raw + raw)),
            ("odd raw byte count", dict(shape=[1, 1, 28, 28], raw_bytes=raw[:-3])),
            ("datatype FP64", dict(datatype="FP64", raw_bytes=raw + raw)),
            ("datatype BYTES", dict(datatype="BYTES")),
            ("datatype garbage", dict(datatype="NOT_A_TYPE")),
        ]
        for what, kw in cases:
            with self.subTest(case=what):
                self.refused((SC.INVALID_ARGUMENT,), c.infer, "fmnist", img, **kw)
        # an empty batch: refused, or answered with an empty output of the right shape
        try:
            out, _ = c.infer_output(c.infer("fmnist", img, shape=[0, 1, 28, 28], raw_bytes=b""))
            self.assertEqual(out.shape, (0, 10), "empty batch answered with a wrong shape")
        except grpc.RpcError as e:
            self.assertEqual(e.code(), SC.INVALID_ARGUMENT, sc.rpc_desc(e))
        # structurally odd requests
        req = inf.ModelInferRequest(model_name="fmnist")
        self.refused(SC.INVALID_ARGUMENT, c.inference.ModelInfer, req, metadata=c.md())  # no input
        req = inf.ModelInferRequest(model_name="fmnist")
        for _ in range(2):
            req.inputs.add(name="input__0", datatype="FP32", shape=[1, 1, 28, 28])
            req.raw_input_contents.append(raw)
        self.refused(SC.INVALID_ARGUMENT, c.inference.ModelInfer, req, metadata=c.md())  # two inputs
        req = inf.ModelInferRequest(model_name="fmnist")
        req.inputs.add(name="input__0", datatype="FP32", shape=[1, 1, 28, 28])  # no data at all
        self.refused(SC.INVALID_ARGUMENT, c.inference.ModelInfer, req, metadata=c.md())
        req = inf.ModelInferRequest(model_name="fmnist")
        t = req.inputs.add(name="input__0", datatype="FP32", shape=[1, 1, 28, 28])
        t.contents.fp32_contents.extend([0.0] * 10)  # typed contents of the wrong length
        self.refused(SC.INVALID_ARGUMENT, c.inference.ModelInfer, req, metadata=c.md())
        req = inf.ModelInferRequest(model_name="fmnist")
        t = req.inputs.add(name="input__0", datatype="FP32", shape=[1, 1, 28, 28])
        t.contents.fp32_contents.extend([0.0] * 784)
        req.raw_input_contents.append(raw)  # both typed and raw contents
        self.refused(SC.INVALID_ARGUMENT, c.inference.ModelInfer, req, metadata=c.md())
        # the server survived all of it and still answers correctly
        self.assertTrue(self.server.alive(), "the server died" + self.tail())
        out, _ = c.infer_output(self.call(c.infer, "fmnist", img))
        self.assertEqual(out.shape, (1, 10))


class TorchScriptRefused(ServerCase):
    server_kw = dict(workers=1, queue_limit=4, extra_args=["--allow-torchscript-uploads", "none"])


    def test_none(self):
        q, inf = self.protos.q, self.protos.inf
        c = self.c
        pt = sc.model_file("fmnist", "fmnist_cnn.pt")
        for tok in ("admin", "quantize", MULTI_TOKEN):
            self.refused(SC.PERMISSION_DENIED, c.upload_file, "ts", pt, q.TORCHSCRIPT, inputs=FMNIST_INPUTS,
                         token=tok, contains=("torchscript",))
            self.refused(SC.PERMISSION_DENIED, c.upload_file, "ts", pt, q.TORCHSCRIPT, token=tok, with_size=False)
        self.assertEqual(blob_files(self.server.data_dir), [],
                         "refused TorchScript uploads reached the blob store")
        self.assertEqual(self.call(c.list_models), [])
        # safetensors are still welcome, and cannot be turned into a served model
        st = sc.model_file("ocr", "ocr_cls.safetensors")
        self.call(c.upload_file, "weights", st, q.SAFETENSORS, token="quantize")
        self.refused((SC.FAILED_PRECONDITION, SC.INVALID_ARGUMENT), c.inference.RepositoryModelLoad,
                     inf.RepositoryModelLoadRequest(model_name="weights"), metadata=c.md())
        self.refused((SC.FAILED_PRECONDITION, SC.INVALID_ARGUMENT), c.submit, c.job_spec("weights", "LAYER"))
        # the TorchScript bytes declared as safetensors: refused, nothing kept
        self.refused(SC.INVALID_ARGUMENT, c.upload_file, "disguised", pt, q.SAFETENSORS)
        self.assertEqual(sorted(m.name for m in self.call(c.list_models)), ["weights"])
        self.assertEqual(len(blob_files(self.server.data_dir)), 1,
                         "the disguised TorchScript stayed in the blob store")


# ----------------------------------------------------------------------------------------------
# TLS
# ----------------------------------------------------------------------------------------------

def openssl(*args, cwd):
    r = subprocess.run(["openssl"] + list(args), cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: exit {r.returncode}\n{r.stderr}")


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=fpxint test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)


def make_cert(d, name, ca, cn, ext):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


SERVER_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"


class Tls(SecCase):
    @classmethod
    def setUpClass(cls):
        cls.protos = sc.Protos.load()
        cls.dir = tempfile.mkdtemp(prefix="fpxint-tls-")
        d = cls.dir
        make_ca(d, "ca")
        make_ca(d, "otherca")
        make_cert(d, "server", "ca", "localhost", SERVER_EXT)
        make_cert(d, "client", "ca", "fpxint-client", CLIENT_EXT)
        make_cert(d, "rogue", "otherca", "fpxint-client", CLIENT_EXT)
        cls.pem = {}
        for n in ("ca", "otherca", "server", "client", "rogue"):
            with open(os.path.join(d, f"{n}.pem"), "rb") as f:
                cls.pem[n] = f.read()
            with open(os.path.join(d, f"{n}.key"), "rb") as f:
                cls.pem[n + ".key"] = f.read()
        cls.tls = start_server(workers=1, extra_args=["--tls-cert", os.path.join(d, "server.pem"),
                                                      "--tls-key", os.path.join(d, "server.key")])
        cls.mtls = start_server(workers=1, extra_args=["--tls-cert", os.path.join(d, "server.pem"),
                                                       "--tls-key", os.path.join(d, "server.key"),
                                                       "--tls-client-ca", os.path.join(d, "ca.pem")])

    @classmethod
    def tearDownClass(cls):
        bad = []
        for srv in (cls.tls, cls.mtls):
            rc, _ = srv.terminate(timeout=60)
            if rc != 0:
                bad.append(rc)
        shutil.rmtree(cls.dir, ignore_errors=True)
        if bad:
            raise AssertionError(f"exit codes after SIGTERM: {bad}")

    def channel(self, address, ca=None, client=None, override=None, plaintext=False):
        if plaintext:
            return grpc.insecure_channel(address)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.pem[ca] if ca else None,
            private_key=self.pem[client + ".key"] if client else None,
            certificate_chain=self.pem[client] if client else None)
        opts = [("grpc.ssl_target_name_override", override)] if override else []
        return grpc.secure_channel(address, creds, opts)

    def probe(self, ch, token="admin"):
        """(health status name or error code, ListModels outcome) over a channel."""
        h = self.protos.health
        check = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=h.HealthCheckRequest.SerializeToString,
                               response_deserializer=h.HealthCheckResponse.FromString)
        stub = self.protos.qg.QuantizerStub(ch)
        md = () if token is None else (("authorization", f"Bearer {sc.TOKENS.get(token, token)}"),)
        try:
            r = check(h.HealthCheckRequest(service=""), timeout=15)
            health = h.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            health = e.code()
        try:
            stub.ListModels(self.protos.q.ListModelsRequest(), metadata=md, timeout=15)
            listing = "OK"
        except grpc.RpcError as e:
            listing = e.code()
        ch.close()
        return health, listing

    def assert_refused(self, what, res):
        for x in res:
            self.assertIn(x, (SC.UNAVAILABLE, SC.DEADLINE_EXCEEDED), f"{what}: the connection was not refused: {res}")

    def cli(self, srv, *args):
        argv = [cli_bin(), "--server", srv.address, "--timeout", "15"] + list(args)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        return r.returncode, (r.stdout + r.stderr)[-600:]

    def test_tls(self):
        srv = self.tls
        with open(srv.stderr_path) as f:
            self.assertIn("(TLS)", f.read(), "the server does not say it runs TLS")
        self.assertEqual(self.probe(self.channel(srv.address, ca="ca")), ("SERVING", "OK"))
        self.assertEqual(self.probe(self.channel(srv.address, ca="ca"), token=None)[1], SC.UNAUTHENTICATED,
                         "TLS must not replace the token")
        self.assert_refused("plaintext client", self.probe(self.channel(srv.address, plaintext=True)))
        self.assert_refused("client trusting another CA", self.probe(self.channel(srv.address, ca="otherca")))
        self.assert_refused("client expecting another host name",
                            self.probe(self.channel(srv.address, ca="ca", override="not-this-server.example")))
        d = self.dir
        rc, out = self.cli(srv, "--tls-ca", os.path.join(d, "ca.pem"), "health")
        self.assertEqual(rc, 0, f"fpxint --tls-ca health: {out}")
        rc, out = self.cli(srv, "--tls-ca", os.path.join(d, "ca.pem"), "--token", sc.TOKENS["admin"], "models", "list")
        self.assertEqual(rc, 0, f"fpxint --tls-ca models list: {out}")
        rc, out = self.cli(srv, "health")
        self.assertNotEqual(rc, 0, f"fpxint without TLS against a TLS server succeeded: {out}")
        rc, out = self.cli(srv, "--tls-ca", os.path.join(d, "otherca.pem"), "health")
        self.assertNotEqual(rc, 0, f"fpxint trusting another CA succeeded: {out}")

    def test_mutual_tls(self):
        srv = self.mtls
        with open(srv.stderr_path) as f:
            self.assertIn("(mutual TLS)", f.read(), "the server does not say it runs mutual TLS")
        self.assertEqual(self.probe(self.channel(srv.address, ca="ca", client="client")), ("SERVING", "OK"))
        self.assertEqual(self.probe(self.channel(srv.address, ca="ca", client="client"), token=None)[1],
                         SC.UNAUTHENTICATED, "a client certificate must not replace the token")
        self.assert_refused("no client certificate", self.probe(self.channel(srv.address, ca="ca")))
        self.assert_refused("client certificate of another CA",
                            self.probe(self.channel(srv.address, ca="ca", client="rogue")))
        self.assert_refused("plaintext client", self.probe(self.channel(srv.address, plaintext=True)))
        d = self.dir
        tls = ["--tls-ca", os.path.join(d, "ca.pem")]
        good = tls + ["--tls-cert", os.path.join(d, "client.pem"), "--tls-key", os.path.join(d, "client.key")]
        rogue = tls + ["--tls-cert", os.path.join(d, "rogue.pem"), "--tls-key", os.path.join(d, "rogue.key")]
        rc, out = self.cli(srv, *good, "health")
        self.assertEqual(rc, 0, f"fpxint with a client certificate: {out}")
        rc, out = self.cli(srv, *good, "--token", sc.TOKENS["admin"], "models", "list")
        self.assertEqual(rc, 0, f"fpxint models list with a client certificate: {out}")
        rc, out = self.cli(srv, *tls, "health")
        self.assertNotEqual(rc, 0, f"fpxint without a client certificate succeeded: {out}")
        rc, out = self.cli(srv, *rogue, "health")
        self.assertNotEqual(rc, 0, f"fpxint with another CA's client certificate succeeded: {out}")

    def test_bad_tls_configuration_never_serves_plaintext(self):
        d = self.dir
        garbage = os.path.join(d, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        data = os.path.join(d, "data-bad")
        base = [sc.server_bin(), "--listen", "127.0.0.1:0", "--data-dir", data, "--metrics-listen", ""]
        cases = [
            ("--tls-cert without --tls-key", ["--tls-cert", os.path.join(d, "server.pem")], (2,)),
            ("--tls-client-ca without a certificate", ["--tls-client-ca", os.path.join(d, "ca.pem")], (2,)),
            ("garbage certificate and key", ["--tls-cert", garbage, "--tls-key", garbage], (1, 2)),
            ("certificate file missing", ["--tls-cert", os.path.join(d, "missing.pem"),
                                          "--tls-key", os.path.join(d, "server.key")], (1, 2)),
            ("key of another certificate", ["--tls-cert", os.path.join(d, "server.pem"),
                                            "--tls-key", os.path.join(d, "client.key")], (1, 2)),
        ]
        for what, args, codes in cases:
            with self.subTest(case=what):
                port_file = os.path.join(d, "bad-port.txt")
                if os.path.exists(port_file):
                    os.unlink(port_file)
                p = subprocess.Popen(base + args + ["--port-file", port_file], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
                try:
                    out, err = p.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
                    self.fail(f"{what}: the server kept running (port file: {os.path.exists(port_file)})\n{err[-800:]}")
                self.assertIn(p.returncode, codes, f"{what}: exit {p.returncode}\n{err[-800:]}")
                self.assertFalse(os.path.exists(port_file), f"{what}: the server wrote a port file (it served)")


# ----------------------------------------------------------------------------------------------
# Tokens never logged (runs last: searches the logs of every server above)
# ----------------------------------------------------------------------------------------------

class TokensNotLogged(SecCase):
    def test_tokens_not_in_logs_or_data(self):
        protos = sc.Protos.load()
        q = protos.q
        # a server of its own, driven through every error path that might log a credential
        srv = start_server(workers=1, extra_args=["--allow-torchscript-uploads", "admin"])
        c = sc.Client(srv.address, token="admin", protos=protos)
        try:
            tiny = sc.tiny_safetensors_bytes(seed=41)
            for value, _roles in CREDS.values():
                md = () if value is None else (("authorization", value),)
                for fn in (lambda: c.quantizer.ListModels(q.ListModelsRequest(), metadata=md, timeout=10),
                           lambda: c.quantizer.UploadModel(c.upload_chunks("tok-probe", q.SAFETENSORS,
                                                                           sc.sha256_bytes(tiny), iter([tiny]), len(tiny)),
                                                           metadata=md, timeout=10),
                           lambda: c.quantizer.UploadModel(c.upload_chunks("tok-ts", q.TORCHSCRIPT,
                                                                           sc.sha256_bytes(tiny), iter([tiny]), len(tiny)),
                                                           metadata=md, timeout=10),
                           lambda: c.inference.RepositoryIndex(protos.inf.RepositoryIndexRequest(), metadata=md, timeout=10)):
                    try:
                        fn()
                    except grpc.RpcError:
                        pass
        finally:
            c.close()
        rc, _ = srv.terminate(timeout=60)
        self.assertEqual(rc, 0)
        found, scanned, logs = [], 0, 0
        for s in ALL_SERVERS:
            if s.alive():
                s.terminate(timeout=60)
            for path in sorted(glob.glob(os.path.join(s.root, "**"), recursive=True)):
                if not os.path.isfile(path) or os.path.basename(path) == "tokens.txt":
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                scanned += 1
                if path.endswith(".log"):
                    logs += 1
                for secret in SECRETS:
                    if secret.encode() in data:
                        found.append(f"{secret!r} in {path}")
        sys.stderr.write(f"[security] searched {scanned} files ({logs} server logs) of {len(ALL_SERVERS)} servers "
                         f"for {len(SECRETS)} tokens: {len(found)} hits\n")
        self.assertGreaterEqual(logs, len(ALL_SERVERS), "server logs missing")
        self.assertFalse(found, "tokens found in server logs or data:\n  " + "\n  ".join(found))


def load_tests(loader, tests, pattern):
    suite = unittest.TestSuite()
    for cls in (AccessMatrix, DeployTraversal, Limits, TorchScriptRefused, Tls, TokensNotLogged):
        suite.addTests(loader.loadTestsFromTestCase(cls))
    return suite


if __name__ == "__main__":
    unittest.main(verbosity=2)
