r"""fpxint-server as replicas: two server processes on one real PostgreSQL journal and one shared
data directory, as a scaled-out deployment runs them.

  * a job submitted on one replica is followed (WatchJob, GetJob, ListJobs) and downloaded from
    the other;
  * CancelJob on one replica stops the job where it runs, on the other;
  * a job's deployment made on one replica is served by the other with the same outputs; a
    model loaded on one becomes ready on the other, and unloading it on the other unloads it
    everywhere;
  * PostgreSQL stopped and started again under running replicas: they say NOT_SERVING while it
    is gone and come back without a restart;
  * a replica killed with SIGKILL in the middle of a job: the other one runs the job again to
    the end, and removes the dead replica's temp files;
  * a replica frozen with SIGSTOP in the middle of a job loses it: after its lease the other
    replica runs the job to the end, and when the frozen one resumes its late write is refused
    (logged, counted in fpxint_job_writes_fenced_total) and changes nothing;
  * a TENSOR job over a 4-shard model directory runs as shard tasks on both replicas, its
    progress summed over them and seen from both; the replica coordinating it is killed while it
    expands a shard: the other takes the job over, runs that one shard again (and no shard that
    was done), and writes every shard exactly once into the artifact and its index.

Run:  FPXINT_SERVER_BIN=build/bin/fpxint-server /usr/bin/python3 -m unittest -v tests/e2e/test_replicas.py
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service_client as sc  # noqa: E402

LEASE_SECONDS = 3
# The slow job: 12 random F32 [2048, 2048] tensors (201 MB), b=4, K=16 (a service job's most):
# under a second on 2 AVX-512 cores, long enough to be caught running; a cancel made on the other
# replica reaches the runner at its next lease renewal or, at the latest, at the renewal it makes
# before storing its outputs.
N_TENSORS = 12
SLOW_TERMS = 16


class Replicas(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.protos = sc.Protos.load()
        cls.pg = sc.TempPostgres()
        cls.root = tempfile.mkdtemp(prefix="fpxint-replicas-")
        cls.data = os.path.join(cls.root, "data")
        os.makedirs(cls.data)
        cls.servers = {}
        cls.clients = []
        for rid in ("a", "b"):
            os.makedirs(os.path.join(cls.root, rid))
            cls.servers[rid] = sc.Server(
                root=os.path.join(cls.root, rid), data_dir=cls.data, workers=1, queue_limit=8,
                extra_args=["--database-url", cls.pg.url(), "--replica-id", rid,
                            "--job-lease-seconds", str(LEASE_SECONDS)])
        cls.servers["a"].start()
        cls.servers["b"].start()
        cls.a = cls.client("a")
        cls.b = cls.client("b")
        slow = os.path.join(cls.root, "slow.safetensors")
        sc.write_random_safetensors(slow, N_TENSORS, 2048, 2048, seed=5)
        cls.a.upload_file("slow", slow, cls.protos.q.SAFETENSORS)
        os.unlink(slow)
        small = os.path.join(cls.root, "small.safetensors")
        sc.write_random_safetensors(small, 2, 256, 256, seed=6)
        cls.b.upload_file("small", small, cls.protos.q.SAFETENSORS)

    @classmethod
    def client(cls, rid, token="quantize"):
        c = sc.Client(cls.servers[rid].address, token=token, protos=cls.protos)
        cls.clients.append(c)
        return c

    @classmethod
    def tearDownClass(cls):
        for s in cls.servers.values():
            if s.alive():
                try:
                    s.proc.send_signal(signal.SIGCONT)
                except OSError:
                    pass
        for c in cls.clients:
            c.close()
        for s in cls.servers.values():
            s.kill()
        cls.pg.stop()
        if not sc.keep_temp():
            import shutil
            shutil.rmtree(cls.root, ignore_errors=True)

    def tail(self):
        return "".join(f"\n[{rid}]\n{s.log_tail(30)}" for rid, s in self.servers.items())

    def slow_spec(self):
        return self.a.job_spec("slow", self.protos.q.TENSOR, weight_bits=4, weight_terms=SLOW_TERMS)

    def wait_running(self, c, job_id, timeout=60):
        return c.wait_state(job_id, ["RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"], timeout=timeout)

    def test_1_a_job_is_followed_and_downloaded_from_the_other_replica(self):
        job = self.a.submit(self.a.job_spec("small", self.protos.q.TENSOR, weight_terms=2))
        events = self.b.watch(job.job_id, timeout=120)
        self.assertTrue(events, "WatchJob on the other replica sent nothing" + self.tail())
        done = events[-1].job
        self.assertEqual(self.b.state_name(done.state), "SUCCEEDED", done.error + self.tail())
        self.assertIn(done.replica, ("a", "b"))
        self.assertEqual(self.a.get_job(job.job_id), self.b.get_job(job.job_id))
        listed = [j.job_id for j in self.b.list_jobs().jobs]
        self.assertIn(job.job_id, listed)
        for art in done.artifacts:
            for c in (self.a, self.b):
                data, _ = c.download(art.artifact_id)
                self.assertEqual(sc.sha256_bytes(data), art.sha256)

    def test_2_cancel_on_one_replica_stops_the_job_on_the_other(self):
        job = self.a.submit(self.slow_spec())
        running = self.wait_running(self.a, job.job_id)
        self.assertEqual(self.a.state_name(running.state), "RUNNING", self.tail())
        other = self.b if running.replica == "a" else self.a
        other.cancel_job(job.job_id)
        done = other.wait_state(job.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"], timeout=60)
        self.assertEqual(other.state_name(done.state), "CANCELLED",
                         f"{done.error!r} (ran on {running.replica})" + self.tail())
        self.assertEqual(done.replica, running.replica)

    def test_3_a_frozen_replica_loses_its_job_and_its_late_write_is_refused(self):
        # Only `a` runs when the job is claimed; it is frozen as soon as it has the job (before
        # `b` is started again: the job may take less time than a server start), and `b` comes
        # back to take it over once a's lease expires.
        rc, _ = self.servers["b"].terminate()
        self.assertEqual(rc, 0, self.tail())
        job = self.a.submit(self.slow_spec())
        running = self.wait_running(self.a, job.job_id)
        frozen = self.servers["a"]
        frozen.proc.send_signal(signal.SIGSTOP)
        try:
            self.assertEqual(self.a.state_name(running.state), "RUNNING", self.tail())
            self.assertEqual(running.replica, "a")
            self.servers["b"].start()
            b = self.client("b")
            done = b.wait_state(job.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"], timeout=180,
                                poll=0.2)
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        self.assertEqual(b.state_name(done.state), "SUCCEEDED", done.error + self.tail())
        self.assertEqual(done.replica, "b")
        self.assertEqual(done.attempts, 2)
        self.assertEqual(done.crashed_attempts, 1)
        # The frozen replica resumes, finds its lease gone and writes nothing more.
        deadline = time.monotonic() + 60
        fenced = 0.0
        while time.monotonic() < deadline:
            text = sc.metrics_text(frozen)
            fenced = sc.metric_value(text, "fpxint_job_writes_fenced_total") or 0.0
            if fenced >= 1:
                break
            time.sleep(0.2)
        self.assertGreaterEqual(fenced, 1, "the resumed replica's write was not fenced" + self.tail())
        log = ""
        for path in (frozen.stderr_path, frozen.stdout_path):
            with open(path, encoding="utf-8", errors="replace") as f:
                log += f.read()
        self.assertRegex(log, re.escape(job.job_id) + r" attempt 1: this replica's lease was lost")
        time.sleep(1)
        for c in (self.a, b):
            now = c.get_job(job.job_id)
            self.assertEqual(c.state_name(now.state), "SUCCEEDED")
            self.assertEqual(now.replica, "b")
            self.assertEqual(now.artifacts, done.artifacts)

    def test_4_a_deployment_on_one_replica_is_served_by_every_replica(self):
        inf = self.protos.inf
        a = self.client("a", token="admin")
        b = self.client("b", token="admin")
        a.upload_file("rec", sc.model_file("ocr", "ocr_rec.pt"), self.protos.q.TORCHSCRIPT,
                      inputs=sc.OCR_REC_INPUTS)
        # A quantized deployment made by a job submitted on a (whichever replica runs it).
        job = a.submit(a.job_spec("rec", self.protos.q.LAYER, weight_bits=4, weight_terms=2,
                                  deploy={"enabled": True, "name": "rec-q"}))
        done = a.wait_state(job.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"], timeout=300)
        self.assertEqual(a.state_name(done.state), "SUCCEEDED", done.error + self.tail())

        def ready(c, name):
            try:
                return c.inference.ModelReady(inf.ModelReadyRequest(name=name), metadata=c.md(),
                                              timeout=10).ready
            except grpc.RpcError:
                return False

        def wait_ready(c, name, want, what):
            t0 = time.monotonic()
            while ready(c, name) != want:
                if time.monotonic() - t0 > 120:
                    self.fail(f"{what}: ModelReady still {not want} after 120 s" + self.tail())
                time.sleep(0.1)
            sys.stderr.write(f"[replicas] {what}: {time.monotonic() - t0:.1f} s\n")

        runner = a if done.replica == "a" else b
        other = b if runner is a else a
        self.assertTrue(ready(runner, "rec-q"))
        wait_ready(other, "rec-q", True, f"deployed on {done.replica}, ready on the other")
        # Both replicas serve the job's artifact: the same outputs for the same images.
        for image in sc.ocr_eval_images(2):
            out_a, _ = a.infer_output(a.infer("rec-q", image))
            out_b, _ = b.infer_output(b.infer("rec-q", image))
            self.assertEqual(out_a.tobytes(), out_b.tobytes())
        # Loaded (FP) on a, ready on b; unloaded on b, unloaded on a.
        a.inference.RepositoryModelLoad(inf.RepositoryModelLoadRequest(model_name="rec"),
                                        metadata=a.md(), timeout=300)
        self.assertTrue(ready(a, "rec"))
        wait_ready(b, "rec", True, "loaded on a, ready on b")
        b.inference.RepositoryModelUnload(inf.RepositoryModelUnloadRequest(model_name="rec"),
                                          metadata=b.md(), timeout=60)
        self.assertFalse(ready(b, "rec"))
        wait_ready(a, "rec", False, "unloaded on b, unloaded on a")

    def test_5_the_replicas_ride_out_a_database_restart(self):
        a = self.client("a")
        b = self.client("b")

        def wait_health(c, service, want, what):
            t0 = time.monotonic()
            while True:
                try:
                    got = c.serving_status_name(c.health(service))
                except grpc.RpcError as e:
                    got = sc.rpc_desc(e)
                if got == want:
                    break
                if time.monotonic() - t0 > 120:
                    self.fail(f"{what}: health({service!r}) is {got}, not {want}, after 120 s"
                              + self.tail())
                time.sleep(0.2)
            sys.stderr.write(f"[replicas] {what}: {time.monotonic() - t0:.1f} s\n")

        self.pg.pg_ctl("stop")
        try:
            wait_health(a, "", "NOT_SERVING", "database stopped, a not serving")
            wait_health(b, "", "NOT_SERVING", "database stopped, b not serving")
            # Loaded models need no database: inference stays up.
            self.assertEqual(a.serving_status_name(a.health("inference.GRPCInferenceService")),
                             "SERVING")
        finally:
            self.pg.pg_ctl("start")
        wait_health(a, "", "SERVING", "database back, a serving")
        wait_health(b, "", "SERVING", "database back, b serving")
        job = b.submit(b.job_spec("small", self.protos.q.TENSOR, weight_terms=3))
        done = a.wait_state(job.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"], timeout=120)
        self.assertEqual(a.state_name(done.state), "SUCCEEDED", done.error + self.tail())

    def test_6_a_killed_replicas_job_is_finished_by_the_other(self):
        a = self.client("a")
        b = self.client("b")
        job = a.submit(self.slow_spec())
        running = self.wait_running(a, job.job_id)
        self.assertEqual(a.state_name(running.state), "RUNNING", self.tail())
        dead, alive = running.replica, ("b" if running.replica == "a" else "a")
        survivor = a if alive == "a" else b
        t0 = time.monotonic()
        self.servers[dead].kill()
        done = survivor.wait_state(job.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"],
                                   timeout=LEASE_SECONDS + 120, poll=0.2)
        sys.stderr.write(f"[replicas] {dead} killed, job finished on {alive} after "
                         f"{time.monotonic() - t0:.1f} s (lease {LEASE_SECONDS} s)\n")
        self.assertEqual(survivor.state_name(done.state), "SUCCEEDED", done.error + self.tail())
        self.assertEqual(done.replica, alive)
        self.assertEqual(done.attempts, 2)
        self.assertEqual(done.crashed_attempts, 1)
        for art in done.artifacts:
            data, _ = survivor.download(art.artifact_id)
            self.assertEqual(sc.sha256_bytes(data), art.sha256)
        # The dead replica's temp directory (its job scratch) is removed by the survivor.
        dead_tmp = os.path.join(self.data, "tmp", dead)
        deadline = time.monotonic() + 120
        while os.path.exists(dead_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.assertFalse(os.path.exists(dead_tmp), f"{dead_tmp} left behind" + self.tail())

    def test_7_shard_tasks_split_across_replicas_and_survive_a_killed_one(self):
        for rid, srv in self.servers.items():
            if not srv.alive():
                srv.start()
        a = self.client("a")
        b = self.client("b")
        ck = os.path.join(self.root, "llama4")
        sc.make_checkpoint(ck, "BF16", shards=4, layers=8, hidden=1024, intermediate=2816,
                           vocab=2000, seed=7)
        with open(os.path.join(ck, "model.safetensors.index.json"), encoding="utf-8") as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        self.assertEqual(len(shards), 4)
        cli = os.environ.get("FPXINT_CLI_BIN") or os.path.join(sc.REPO_ROOT, "build", "bin",
                                                                "fpxint")
        env = dict(os.environ, FPXINT_TOKEN=sc.TOKENS["quantize"])
        up = subprocess.run([cli, "--server", self.servers["a"].address, "--json", "upload", ck,
                             "--name", "llama4"], capture_output=True, text=True, env=env,
                            timeout=600)
        self.assertEqual(up.returncode, 0, up.stdout + up.stderr + self.tail())
        logs = {rid: srv.stderr_path for rid, srv in self.servers.items()}
        job = a.submit(a.job_spec("llama4", self.protos.q.TENSOR, weight_bits=4,
                                  weight_terms=SLOW_TERMS, preset="transformer"))
        task_ids = [f"{job.job_id}.shard-{i:05d}" for i in range(4)]

        def task(c, tid):
            try:
                return c.get_job(tid)
            except grpc.RpcError:
                return None

        # Both replicas expanding a shard of it: one as the job's coordinator, one as a helper.
        deadline = time.monotonic() + 120
        while True:
            running = {t.replica for t in (task(a, tid) for tid in task_ids)
                       if t is not None and a.state_name(t.state) == "RUNNING"}
            if running == {"a", "b"}:
                break
            self.assertLess(time.monotonic(), deadline,
                            "the shard tasks never ran on both replicas at once" + self.tail())
            time.sleep(0.05)
        parent = a.get_job(job.job_id)
        self.assertEqual(a.state_name(parent.state), "RUNNING")
        # Its progress sums over the tasks, seen from both replicas (the coordinator writes it
        # with its lease renewals, within a second).
        for c in (a, b):
            deadline = time.monotonic() + 10
            while c.get_job(job.job_id).progress.tasks_running < 1:
                self.assertLess(time.monotonic(), deadline,
                                f"no task progress: {c.get_job(job.job_id).progress}")
                time.sleep(0.05)
            p = c.get_job(job.job_id).progress
            self.assertEqual(p.tasks_total, 4, str(p))
            self.assertGreater(p.layers_total, 0, str(p))
        self.assertEqual([j.job_id for j in b.list_jobs().jobs].count(task_ids[0]), 0,
                         "a shard task is listed")
        dead, alive = parent.replica, ("b" if parent.replica == "a" else "a")
        survivor = a if alive == "a" else b
        self.servers[dead].kill()
        done = survivor.wait_state(job.job_id, ["SUCCEEDED", "FAILED", "CANCELLED"],
                                   timeout=LEASE_SECONDS + 300, poll=0.2)
        self.assertEqual(survivor.state_name(done.state), "SUCCEEDED", done.error + self.tail())
        self.assertEqual(done.replica, alive)
        self.assertEqual(done.crashed_attempts, 1)
        # Shard runs, from both replicas' logs: the shard the killed replica was expanding runs
        # again; no shard that was done does.
        runs = {tid: 0 for tid in task_ids}
        for path in logs.values():
            with open(path, encoding="utf-8", errors="replace") as f:
                for m in re.finditer(r"job (\S+\.shard-\d+) running:", f.read()):
                    runs[m.group(1)] += 1
        sys.stderr.write(f"[replicas] shard task runs {runs} (killed {dead})\n")
        self.assertTrue(all(n >= 1 for n in runs.values()), runs)
        self.assertLessEqual(sum(runs.values()), 5, f"more than one shard ran again: {runs}")
        # Every shard exactly once in the artifact, every tensor in exactly one packed shard.
        packed = [x for x in done.artifacts if x.kind == "packed_safetensors"]
        self.assertEqual(sorted(x.file_name for x in packed), [f"packed/{s}" for s in shards])
        idx_art = [x for x in done.artifacts if x.file_name == "packed/model.fpxint.index.json"]
        self.assertEqual(len(idx_art), 1)
        data, _ = survivor.download(idx_art[0].artifact_id)
        packed_index = json.loads(data)
        seen = {}
        for x in packed:
            data, _ = survivor.download(x.artifact_id)
            self.assertEqual(sc.sha256_bytes(data), x.sha256)
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            shard = x.file_name[len("packed/"):]
            for name in header:
                if name == "__metadata__":
                    continue
                self.assertNotIn(name, seen, f"{name} in {seen.get(name)} and {shard}")
                seen[name] = shard
        self.assertEqual(seen, packed_index["weight_map"])
        self.assertEqual(len(done.result.shards), 4)
        # The tasks are gone with their job's success.
        deadline = time.monotonic() + 30
        while any(task(survivor, tid) is not None for tid in task_ids):
            self.assertLess(time.monotonic(), deadline, "shard tasks left behind" + self.tail())
            time.sleep(0.2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
