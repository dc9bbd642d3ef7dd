r"""Crash recovery of fpxint-server: kill -9 in the middle of a job and of an upload, restart on the
same data directory, and check what the API shows.

Run:  FPXINT_SERVER_BIN=build/bin/fpxint-server FPXINT_MODELS_DIR=~/.cache/fpxint/models \
      /usr/bin/python3 -m unittest -v tests/e2e/test_crash_recovery.py
"""

import os
import sys
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service_client as sc  # noqa: E402

SC = grpc.StatusCode
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
# The interrupted job: 8 random F32 [2048, 2048] tensors (134 MB), b=4, K=8. Big enough to be
# caught mid-expansion (it runs ~1-2 s on 2 cores), small enough to re-run well within 60 s.
N_TENSORS = 8
SLOW_TERMS = 8


def data_dir_listing(root):
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                out.append((os.path.relpath(p, root), os.path.getsize(p)))
            except OSError:
                pass
    return sorted(out)


class CrashRecoveryE2E(unittest.TestCase):
    def setUp(self):
        self.protos = sc.Protos.load()
        self.rec_st = sc.model_file("ocr", "ocr_rec.safetensors")
        self.server = sc.Server(workers=1, queue_limit=8, max_upload_bytes=256 << 20)
        self.clients = []

    def tearDown(self):
        for c in self.clients:
            c.close()
        self.server.cleanup()

    def tail(self):
        return "\n" + self.server.log_tail(40)

    def client(self):
        c = sc.Client(self.server.address, token="quantize", protos=self.protos)
        self.clients.append(c)
        return c

    def call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except grpc.RpcError as e:
            self.fail(f"unexpected RPC error {sc.rpc_desc(e)}{self.tail()}")

    def verify_artifacts(self, c, job, what):
        """Downloads every artifact of `job`; returns {artifact_id: (kind, sha256, size)}."""
        res = {}
        for a in job.artifacts:
            data, meta = self.call(c.download, a.artifact_id)
            digest = sc.sha256_bytes(data)
            self.assertEqual(len(data), a.size_bytes,
                             f"{what}: artifact {a.kind} {a.file_name}: downloaded {len(data)} bytes, "
                             f"listed size {a.size_bytes} (partial file visible?)")
            self.assertEqual(digest, a.sha256, f"{what}: artifact {a.kind} {a.file_name}: SHA-256 mismatch")
            self.assertTrue(all(m[3] == digest for m in meta), f"{what}: chunk sha256 differs")
            res[a.artifact_id] = (a.kind, a.sha256, a.size_bytes, data)
        return res

    def test_kill9_and_restart(self):
        q = self.protos.q
        srv = self.server
        srv.start(timeout=60)
        c = self.client()

        # 1. a finished TENSOR job
        self.call(c.upload_file, "weights", self.rec_st, q.SAFETENSORS)
        done = self.call(c.submit, c.job_spec("weights", "TENSOR", weight_bits=4, weight_terms=2))
        done = c.wait_state(done.job_id, TERMINAL, timeout=120)
        self.assertEqual(c.state_name(done.state), "SUCCEEDED", done.error + self.tail())
        self.assertTrue(done.artifacts)
        finished = self.verify_artifacts(c, done, "before the crash")

        # 2. a slow job, RUNNING when the server is killed
        big = os.path.join(srv.root, "big_random.safetensors")
        size, sha = sc.write_random_safetensors(big, n_tensors=N_TENSORS, rows=2048, cols=2048, seed=2)
        self.call(c.upload_file, "big", big, q.SAFETENSORS)
        os.unlink(big)
        key = "crash-slow-job"
        slow = self.call(c.submit, c.job_spec("big", "TENSOR", weight_bits=4, weight_terms=SLOW_TERMS), key)

        # 3. an upload that is still streaming when the server is killed
        release = threading.Event()
        sent_half = threading.Event()
        up_result = {}
        psha = sc.sha256_file(self.rec_st)

        def partial_blocks():
            for i, b in enumerate(sc.file_blocks(self.rec_st)):
                if i == 4:
                    sent_half.set()
                    release.wait(120)
                    return
                yield b

        def uploader():
            try:
                up_result["model"] = c.upload_iter("partial_upload", q.SAFETENSORS, psha, partial_blocks(),
                                                   os.path.getsize(self.rec_st), timeout=120)
            except grpc.RpcError as e:
                up_result["error"] = e

        up = threading.Thread(target=uploader, daemon=True)
        up.start()
        self.assertTrue(sent_half.wait(30), "partial upload did not start")

        t0 = time.monotonic()
        job = c.wait_state(slow.job_id, ("RUNNING",) + TERMINAL, timeout=60, poll=0.02)
        self.assertEqual(c.state_name(job.state), "RUNNING",
                         f"slow job is {c.state_name(job.state)} ({job.error!r}); it must be RUNNING at the kill"
                         + self.tail())
        # let it get into its work (expand part of its input), but not finish
        t_run = time.monotonic()
        while time.monotonic() - t_run < 5.0:
            job = c.get_job(slow.job_id)
            if c.state_name(job.state) != "RUNNING" or job.progress.layers_done >= 1:
                break
            time.sleep(0.02)
        self.assertEqual(c.state_name(job.state), "RUNNING",
                         f"slow job finished ({c.state_name(job.state)}) {time.monotonic() - t0:.1f} s after "
                         "submission, before it could be killed: the test needs a slower job")
        progress_at_kill = job.progress
        srv.kill()  # kill -9
        release.set()
        up.join(30)
        self.assertNotIn("model", up_result, "the interrupted upload returned a model")
        listing = data_dir_listing(srv.data_dir)
        sys.stderr.write(f"[e2e] killed while RUNNING (progress: {progress_at_kill.layers_done}/"
                         f"{progress_at_kill.layers_total}, phase {progress_at_kill.phase!r}); data dir holds "
                         f"{len(listing)} files, {sum(s for _, s in listing) / 1e6:.1f} MB\n")
        for c_ in self.clients:
            c_.close()
        self.clients.clear()

        # 4. restart on the same data directory
        srv.start(timeout=60)
        c = self.client()
        h = self.call(c.health, "")
        self.assertEqual(c.serving_status_name(h), "SERVING")

        # the interrupted job is queued / running again
        again = self.call(c.get_job, slow.job_id)
        state = c.state_name(again.state)
        sys.stderr.write(f"[e2e] after restart: slow job {state}, attempts {again.attempts}\n")
        self.assertIn(state, ("QUEUED", "RUNNING", "SUCCEEDED"),
                      f"interrupted job after restart: {state} ({again.error!r})" + self.tail())
        if state != "SUCCEEDED":
            self.assertFalse(again.artifacts,
                             f"an unfinished job lists artifacts: {[(a.kind, a.file_name) for a in again.artifacts]}")

        # the finished job and its artifacts are intact
        done2 = self.call(c.get_job, done.job_id)
        self.assertEqual(c.state_name(done2.state), "SUCCEEDED")
        after = self.verify_artifacts(c, done2, "after the restart")
        self.assertEqual({k: v[:3] for k, v in after.items()}, {k: v[:3] for k, v in finished.items()},
                         "the finished job's artifacts changed across the crash")

        # nothing partial is visible: the interrupted upload is not a model, listed models are whole
        names = sorted(m.name for m in self.call(c.list_models))
        self.assertEqual(names, ["big", "weights"], "models after the restart")
        try:
            m = c.get_model("partial_upload")
            self.fail(f"the upload interrupted by kill -9 is visible: {m}")
        except grpc.RpcError as e:
            self.assertEqual(e.code(), SC.NOT_FOUND, sc.rpc_desc(e))
        g = self.call(c.get_model, "big")
        self.assertEqual((g.sha256, g.size_bytes), (sha, size))
        for j in self.call(c.list_jobs, page_size=1000).jobs:
            if j.job_id != slow.job_id or c.state_name(j.state) == "SUCCEEDED":
                self.verify_artifacts(c, j, f"job {j.job_id} after the restart")

        # the idempotency key survived
        same = self.call(c.submit, c.job_spec("big", "TENSOR", weight_bits=4, weight_terms=SLOW_TERMS), key)
        self.assertEqual(same.job_id, slow.job_id, "idempotency key forgotten across the restart")

        # the interrupted job finishes
        t_restart = time.monotonic()
        final = c.wait_state(slow.job_id, TERMINAL, timeout=120, poll=0.2)
        self.assertEqual(c.state_name(final.state), "SUCCEEDED",
                         f"re-run of the interrupted job: {c.state_name(final.state)} ({final.error!r})" + self.tail())
        self.assertGreaterEqual(final.attempts, 2, "attempts of a job re-queued after a restart")
        sys.stderr.write(f"[e2e] re-run finished {time.monotonic() - t_restart:.1f} s after the restart\n")
        arts = self.verify_artifacts(c, final, "the re-run job")
        packed = [v for v in arts.values() if v[0] == "packed_safetensors"]
        self.assertEqual(len(packed), 1, f"artifacts: {[(v[0]) for v in arts.values()]}")
        header, _ = sc.st_header(packed[0][3])
        md = header.get("__metadata__", {})
        self.assertEqual((md.get("format"), md.get("bits"), md.get("terms"), md.get("source_sha256")),
                         ("fpxint", "4", str(SLOW_TERMS), sha), f"__metadata__: {md}")
        for i in range(N_TENSORS):
            for k in range(1, SLOW_TERMS + 1):
                self.assertIn(f"layer{i}.weight.t{k}.codes", header)

        rc, dt = srv.terminate(timeout=30)
        self.assertEqual(rc, 0, f"exit code after SIGTERM: {rc} ({dt:.1f} s)" + self.tail())


if __name__ == "__main__":
    unittest.main(verbosity=2)
