#!/usr/bin/python3
r"""Fault tests of fpxint-server: kill -9 at random points, a full disk, clients that disconnect.

Run (make test: 4 kill -9 trials):
  FPXINT_SERVER_BIN=build/bin/fpxint-server FPXINT_MODELS_DIR=~/.cache/fpxint/models \
      /usr/bin/python3 tests/fault/test_faults.py -v
Long run (20 trials, a given seed):
  ... /usr/bin/python3 tests/fault/test_faults.py -v --trials 20 --seed 12345
Environment: FPXINT_FAULT_TRIALS (default 4), FPXINT_FAULT_SEED (default: random, printed).

KillNineTrials: one data directory lives through every trial. A trial does one of
  upload    stream a 24 MB upload and kill -9 after a random chunk (or just after the last one,
            while the server commits it), with a quick job running alongside;
  job       kill -9 at a random moment of a running expansion job (another job queued behind
            it, a slow upload streaming in);
  artifact  kill -9 while the job writes its artifact: when the scratch file reaches a random
            fraction of its size, right after it is renamed, or just after the job reports
            phase "done" (the artifacts are imported into the store then);
then checks the journal of the dead server (PRAGMA integrity_check on a copy), restarts on the
same data directory and checks: every acknowledged upload and job is there; every blob in the
store hashes to its name; every SUCCEEDED job's artifacts download with the listed size and
SHA-256 and are whole files (safetensors header and offsets, report JSON); unfinished jobs list
no artifact; no job FAILED; the interrupted upload is absent or whole; nothing from before the
kill is left in tmp/. At the end every interrupted job runs again to SUCCEEDED, tmp/ is empty,
SIGTERM exits 0 and the real journal passes PRAGMA integrity_check.

DiskFull: the data directory on a 24 MB tmpfs (or a loop-mounted ext4 image): an upload that
does not fit fails with RESOURCE_EXHAUSTED naming the disk and leaves nothing behind; a job whose
artifact does not fit ends FAILED saying so (also after a restart); earlier models and artifacts
stay intact; with space again the server works as before. Skipped with a loud message when
neither mount is possible.

ClientDisconnect: uploads and downloads abandoned mid-stream (cancelled calls and client
processes killed with SIGKILL): the server removes the partial upload from tmp/, closes the
artifact file and keeps serving.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import service_client as sc  # noqa: E402

SC = grpc.StatusCode
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
UPLOAD_CHUNK = 256 << 10


def _pop_arg(name, cast):
    """Removes `--name VALUE` from sys.argv (so unittest does not see it); returns VALUE or None."""
    if name in sys.argv:
        i = sys.argv.index(name)
        if i + 1 >= len(sys.argv):
            raise SystemExit(f"{name} needs a value")
        value = cast(sys.argv[i + 1])
        del sys.argv[i:i + 2]
        return value
    return None


def trials_wanted():
    return int(os.environ.get("FPXINT_FAULT_TRIALS", "4"))


def seed_wanted():
    s = os.environ.get("FPXINT_FAULT_SEED")
    return int(s) if s else random.SystemRandom().randrange(1 << 31)


def log(msg):
    sys.stderr.write(f"[fault] {msg}\n")
    sys.stderr.flush()


def check_whole_artifact(kind, data):
    """A downloaded artifact must be a whole file of its kind; returns a problem or None."""
    if kind == "packed_safetensors":
        try:
            header, base = sc.st_header(data)
        except Exception as e:  # noqa: BLE001
            return f"packed_safetensors: header unreadable ({e})"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if base + end != len(data):
            return f"packed_safetensors: header says {base + end} bytes, file has {len(data)}"
    elif kind == "report_json":
        try:
            json.loads(data)
        except ValueError as e:
            return f"report_json: not JSON ({e})"
    return None


class FaultCase(unittest.TestCase):
    server = None

    def tail(self):
        return ("\n" + self.server.log_tail(30)) if self.server is not None else ""

    def call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except grpc.RpcError as e:
            self.fail(f"unexpected RPC error {sc.rpc_desc(e)}{self.tail()}")


# ----------------------------------------------------------------------------------------------
# kill -9
# ----------------------------------------------------------------------------------------------

class KillNineTrials(FaultCase):
    TRIALS = None
    SEED = None

    def setUp(self):
        self.protos = sc.Protos.load()
        self.cls_st = sc.model_file("ocr", "ocr_cls.safetensors")
        # Every trial kills the server, sometimes during a job that an earlier kill interrupted
        # already: these trials test recovery, so no job runs out of attempts here
        # (--max-job-attempts has its own test, JobManagerStartup.* in server/server_test.cc).
        self.server = sc.Server(workers=1, queue_limit=64, max_upload_bytes=256 << 20,
                                extra_args=["--max-job-attempts", "1000"])
        self.client_ = None
        # what the server acknowledged: it must survive every crash
        self.models = {}  # name -> (sha256, size)
        self.jobs = {}  # job_id -> model name
        self.pending_uploads = {}  # name -> (sha256, size): killed before an answer
        self.verified_artifacts = set()
        self.verified_blobs = set()
        self.requeued = {}  # job_id -> attempts seen QUEUED/RUNNING after a restart
        self.outcomes = []

    def tearDown(self):
        if self.client_ is not None:
            self.client_.close()
        self.server.cleanup()

    # helpers ------------------------------------------------------------------------------------
    def connect(self):
        if self.client_ is not None:
            self.client_.close()
        self.client_ = sc.Client(self.server.address, token="admin", protos=self.protos)
        return self.client_

    def upload(self, c, name, data):
        sha = sc.sha256_bytes(data)
        m = self.call(c.upload_iter, name, self.protos.q.SAFETENSORS, sha, sc.byte_blocks(data, UPLOAD_CHUNK),
                      len(data))
        self.assertEqual((m.sha256, m.size_bytes), (sha, len(data)))
        self.models[name] = (sha, len(data))

    def submit(self, c, model, terms):
        j = self.call(c.submit, c.job_spec(model, "TENSOR", weight_bits=4, weight_terms=terms))
        self.jobs[j.job_id] = model
        return j

    def kill(self, what):
        pid = self.server.proc.pid
        self.server.kill()
        self.assertFalse(self.server.alive())
        log(f"  kill -9 {pid} ({what})")

    def after_kill(self, label):
        """The dead server's journal and tmp/; returns the tmp/ entries."""
        rows = sc.journal_integrity(os.path.join(self.server.data_dir, "journal.sqlite"), copy_first=True)
        self.assertEqual(rows, ["ok"], f"{label}: PRAGMA integrity_check of the journal after kill -9: {rows}")
        return sc.tmp_entries(os.path.join(self.server.data_dir, "tmp"))

    def verify(self, c, label, tmp_before=(), final=False):
        """The invariants after a restart (see the module doc)."""
        srv = self.server
        self.assertEqual(c.serving_status_name(self.call(c.health)), "SERVING", label)
        # tmp/: nothing from before the kill, never an upload in flight now
        tmp_now = sc.tmp_entries(os.path.join(srv.data_dir, "tmp"))
        survivors = sorted(set(tmp_before) & set(tmp_now))
        self.assertFalse(survivors, f"{label}: tmp/ entries survived the restart: {survivors}")
        # models
        listed = {m.name: m for m in self.call(c.list_models)}
        for name, (sha, size) in self.models.items():
            self.assertIn(name, listed, f"{label}: acknowledged upload {name!r} is gone after the restart")
            self.assertEqual((listed[name].sha256, listed[name].size_bytes), (sha, size),
                             f"{label}: model {name!r} changed")
        for name, (sha, size) in list(self.pending_uploads.items()):
            if name in listed:
                self.assertEqual((listed[name].sha256, listed[name].size_bytes), (sha, size),
                                 f"{label}: the upload interrupted by kill -9 is listed with other bytes")
                self.models[name] = (sha, size)
                self.outcomes.append(f"{label}: interrupted upload {name} was committed before the kill")
            else:
                try:
                    c.get_model(name)
                    self.fail(f"{label}: {name!r} is not listed but GetModel finds it")
                except grpc.RpcError as e:
                    self.assertEqual(e.code(), SC.NOT_FOUND, f"{label}: GetModel({name!r}): {sc.rpc_desc(e)}")
            del self.pending_uploads[name]
        for name, m in listed.items():
            p = os.path.join(srv.data_dir, "blobs", m.sha256[:2], m.sha256)
            self.assertTrue(os.path.isfile(p), f"{label}: blob of model {name!r} missing")
            self.assertEqual(os.path.getsize(p), m.size_bytes, f"{label}: blob of model {name!r} has the wrong size")
        # the blob store: every file hashes to its name (checked once per blob; blobs are immutable)
        problems = []
        for dirpath, _, files in os.walk(os.path.join(srv.data_dir, "blobs")):
            for f in files:
                if f in self.verified_blobs and not final:
                    continue
                p = os.path.join(dirpath, f)
                rel = os.path.relpath(p, srv.data_dir)
                if len(f) != 64 or os.path.basename(dirpath) != f[:2]:
                    problems.append(f"{rel}: not a content-addressed name (temporary file in the store?)")
                elif sc.sha256_file(p) != f:
                    problems.append(f"{rel}: content does not hash to its name (partial blob)")
                else:
                    self.verified_blobs.add(f)
        self.assertFalse(problems, f"{label}: blob store: {problems}")
        # jobs
        jobs = {j.job_id: j for j in sc.list_all_jobs(c)}
        for jid in self.jobs:
            self.assertIn(jid, jobs, f"{label}: acknowledged job {jid} is gone after the restart")
        for jid, j in jobs.items():
            state = c.state_name(j.state)
            self.assertIn(state, ("QUEUED", "RUNNING", "SUCCEEDED"),
                          f"{label}: job {jid} is {state} ({j.error!r}) after the restart" + self.tail())
            if state != "SUCCEEDED":
                self.assertFalse(j.artifacts, f"{label}: unfinished job {jid} ({state}) lists artifacts")
                self.assertGreaterEqual(j.attempts, 0)
                if j.attempts >= 1 and not final:
                    self.requeued[jid] = (state, j.attempts)
                continue
            self.assertTrue(j.artifacts, f"{label}: SUCCEEDED job {jid} has no artifacts")
            kinds = sorted(a.kind for a in j.artifacts)
            self.assertEqual(kinds, ["packed_safetensors", "report_json"], f"{label}: job {jid} artifacts")
            for a in j.artifacts:
                if a.artifact_id in self.verified_artifacts and not final:
                    continue
                data, meta = self.call(c.download, a.artifact_id, timeout=120)
                self.assertEqual(len(data), a.size_bytes,
                                 f"{label}: artifact {a.artifact_id} of {jid}: {len(data)} bytes, listed {a.size_bytes}")
                self.assertEqual(sc.sha256_bytes(data), a.sha256,
                                 f"{label}: artifact {a.artifact_id} of {jid}: SHA-256 mismatch")
                problem = check_whole_artifact(a.kind, data)
                self.assertIsNone(problem, f"{label}: artifact {a.artifact_id} of {jid}: {problem}")
                self.verified_artifacts.add(a.artifact_id)
        return jobs

    def restart(self, label, tmp_before):
        self.server.start(timeout=60)
        c = self.connect()
        self.verify(c, label, tmp_before)
        return c

    # trials -------------------------------------------------------------------------------------
    def trial_upload(self, c, rng, label):
        q = self.protos.q
        data = sc.random_safetensors_bytes(3, 1024, 2048, seed=rng.randrange(1 << 30))
        sha = sc.sha256_bytes(data)
        n_chunks = (len(data) + UPLOAD_CHUNK - 1) // UPLOAD_CHUNK
        # n_chunks: after the last chunk, while the server hashes, fsyncs, renames and records it
        kill_after = n_chunks if rng.random() < 0.25 else rng.randint(0, n_chunks - 1)
        delay = rng.uniform(0.0, 0.03)
        name = f"{label}-upload"
        side = self.submit(c, "cls", rng.choice([1, 2, 3]))  # a quick job alongside
        reached, release, res = threading.Event(), threading.Event(), {}

        def blocks():
            for i, b in enumerate(sc.byte_blocks(data, UPLOAD_CHUNK)):
                if i == kill_after:
                    reached.set()
                    release.wait(60)
                    return
                yield b
            reached.set()

        def run():
            try:
                res["model"] = c.upload_iter(name, q.SAFETENSORS, sha, blocks(), len(data), timeout=120)
            except grpc.RpcError as e:
                res["error"] = e

        t = threading.Thread(target=run, daemon=True)
        self.pending_uploads[name] = (sha, len(data))
        t.start()
        self.assertTrue(reached.wait(60), f"{label}: the upload did not reach chunk {kill_after}")
        time.sleep(delay)
        self.kill(f"upload after chunk {kill_after}/{n_chunks} + {delay * 1000:.0f} ms; side job {side.job_id}")
        release.set()
        t.join(60)
        if "model" in res:  # answered before the kill: it must be there after the restart
            self.models[name] = self.pending_uploads.pop(name)
            self.outcomes.append(f"{label}: the upload was acknowledged before the kill")
        return f"upload killed after chunk {kill_after}/{n_chunks} (+{delay * 1000:.0f} ms)"

    def trial_job(self, c, rng, label, duration):
        q = self.protos.q
        terms = rng.choice([4, 6, 8])
        j = self.submit(c, "base", terms)
        self.submit(c, "cls", 2)  # queued behind it
        # a slow upload streaming in at the same time
        slow = sc.random_safetensors_bytes(1, 256, 1024, seed=rng.randrange(1 << 30))
        name = f"{label}-slow"
        self.pending_uploads[name] = (sc.sha256_bytes(slow), len(slow))
        stop = threading.Event()

        def trickle():
            for b in sc.byte_blocks(slow, 16 << 10):
                if stop.wait(0.05):
                    return
                yield b

        def run():
            try:
                c.upload_iter(name, q.SAFETENSORS, sc.sha256_bytes(slow), trickle(), len(slow), timeout=120)
                self.models[name] = self.pending_uploads.pop(name, None) or self.models.get(name)
            except grpc.RpcError:
                pass

        t = threading.Thread(target=run, daemon=True)
        t.start()
        c.wait_state(j.job_id, ("RUNNING",) + TERMINAL, timeout=60, poll=0.005)
        delay = rng.uniform(0.0, 0.9) * duration * terms / 4  # the calibration job had K=4
        time.sleep(delay)
        state = c.state_name(c.get_job(j.job_id).state)
        self.kill(f"job {j.job_id} K={terms}, {delay:.2f} s after RUNNING (last seen {state})")
        stop.set()
        t.join(30)
        return f"job killed {delay:.2f} s into the run (of ~{duration * terms / 4:.2f} s; last seen {state})"

    def trial_artifact(self, c, rng, label, expected_size):
        terms = 4  # the calibration job's K: the artifact size is known
        mode = rng.choice(["partial", "renamed", "done"])
        frac = rng.uniform(0.05, 0.95)
        delay = rng.uniform(0.0, 0.03)
        j = self.submit(c, "base", terms)
        tmp = sc.replica_tmp(self.server.data_dir)
        deadline = time.monotonic() + 60
        seen = {"phase": ""}
        what = None
        if mode == "done":
            done = threading.Event()

            def watch():
                try:
                    for ev in c.quantizer.WatchJob(c.p.q.JobRef(job_id=j.job_id), metadata=c.md(), timeout=120):
                        seen["phase"] = ev.job.progress.phase
                        if ev.job.progress.phase == "done" or c.state_name(ev.job.state) in TERMINAL:
                            done.set()
                            return
                except grpc.RpcError:
                    done.set()

            threading.Thread(target=watch, daemon=True).start()
            self.assertTrue(done.wait(60), f"{label}: job {j.job_id} never reported phase 'done'")
            time.sleep(delay)
            what = f"phase 'done' seen + {delay * 1000:.0f} ms"
        else:
            # one worker: once this job runs, the only job scratch directory in tmp/ is its own
            c.wait_state(j.job_id, ("RUNNING",) + TERMINAL, timeout=60, poll=0.002)
            while time.monotonic() < deadline:
                hit = None
                for d in os.listdir(tmp) if os.path.isdir(tmp) else []:
                    jd = os.path.join(tmp, d)
                    try:
                        names = os.listdir(jd)
                    except (NotADirectoryError, FileNotFoundError):
                        continue
                    for n in names:
                        try:
                            size = os.path.getsize(os.path.join(jd, n))
                        except FileNotFoundError:
                            continue
                        if mode == "partial" and n.startswith("artifact.safetensors.tmp") and size >= frac * expected_size:
                            hit = f"scratch artifact at {size}/{expected_size} bytes"
                        elif mode == "renamed" and n == "artifact.safetensors":
                            hit = "scratch artifact renamed into place"
                if hit:
                    if mode == "renamed":
                        time.sleep(delay)
                        hit += f" + {delay * 1000:.0f} ms"
                    what = hit
                    break
                try:
                    if c.state_name(c.get_job(j.job_id).state) in TERMINAL:
                        what = "job finished before the trigger"
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.001)
            if what is None:
                self.fail(f"{label}: no trigger within 60 s")
        try:
            state = c.state_name(c.get_job(j.job_id).state)
        except grpc.RpcError:
            state = "?"
        self.kill(f"artifact write of {j.job_id}: {what} (job {state})")
        return f"artifact write killed ({mode}: {what}; job {state} just before)"

    # the test -----------------------------------------------------------------------------------
    def test_kill9_trials(self):
        trials = self.TRIALS if self.TRIALS is not None else trials_wanted()
        seed = self.SEED if self.SEED is not None else seed_wanted()
        log(f"seed {seed}, {trials} kill -9 trials (reproduce: --seed {seed} --trials {trials})")
        rng = random.Random(seed)
        srv = self.server
        srv.start(timeout=60)
        c = self.connect()
        # the jobs' inputs: a 32 MB random weights file and the OCR classifier weights
        base = sc.random_safetensors_bytes(4, 1024, 2048, seed=seed % 1000)
        self.upload(c, "base", base)
        with open(self.cls_st, "rb") as f:
            self.upload(c, "cls", f.read())
        # calibration: one job without a fault (how long a job runs, how big its artifact is)
        j = self.submit(c, "base", 4)
        c.wait_state(j.job_id, ("RUNNING",) + TERMINAL, timeout=60, poll=0.005)
        t0 = time.monotonic()
        j = c.wait_state(j.job_id, TERMINAL, timeout=120, poll=0.01)
        duration = time.monotonic() - t0
        self.assertEqual(c.state_name(j.state), "SUCCEEDED", j.error + self.tail())
        packed = [a for a in j.artifacts if a.kind == "packed_safetensors"]
        self.assertEqual(len(packed), 1)
        expected_size = packed[0].size_bytes
        log(f"calibration job: {duration:.2f} s, packed artifact {expected_size / 1e6:.1f} MB")

        kinds = ["upload", "job", "artifact"]
        schedule = [kinds[i % 3] for i in range(trials)]
        rng.shuffle(schedule)
        survived = 0
        for t, kind in enumerate(schedule):
            label = f"trial{t + 1}"
            log(f"{label}/{trials}: {kind}")
            if kind == "upload":
                how = self.trial_upload(c, rng, label)
            elif kind == "job":
                how = self.trial_job(c, rng, label, duration)
            else:
                how = self.trial_artifact(c, rng, label, expected_size)
            tmp_before = self.after_kill(label)
            c = self.restart(label, tmp_before)
            survived += 1
            self.outcomes.append(f"{label}: {how}; tmp/ held {len(tmp_before)} entries at the kill; restart OK")

        # the end: every job finishes, nothing is left over, the journal is intact
        label = "final"
        for jid in list(self.jobs):
            j = c.wait_state(jid, TERMINAL, timeout=180, poll=0.05)
            self.assertEqual(c.state_name(j.state), "SUCCEEDED",
                             f"{label}: job {jid}: {c.state_name(j.state)} {j.error!r}" + self.tail())
            if jid in self.requeued:
                st, attempts = self.requeued[jid]
                want = attempts + 1 if st == "QUEUED" else attempts
                self.assertGreaterEqual(j.attempts, want,
                                        f"job {jid} was {st} with attempts={attempts} after a restart; "
                                        f"it finished with attempts={j.attempts}")
        jobs = self.verify(c, label, final=True)
        deadline = time.monotonic() + 10
        tmp = os.path.join(srv.data_dir, "tmp")
        while sc.tmp_entries(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(sc.tmp_entries(tmp), [], f"{label}: tmp/ not empty with every job finished")
        c.close()
        self.client_ = None
        rc, dt = srv.terminate(timeout=60)
        self.assertEqual(rc, 0, f"exit code after SIGTERM: {rc}" + self.tail())
        db = os.path.join(srv.data_dir, "journal.sqlite")
        rows = sc.journal_integrity(db, copy_first=False)
        self.assertEqual(rows, ["ok"], f"PRAGMA integrity_check after the last stop: {rows}")
        import sqlite3
        con = sqlite3.connect(db)
        try:
            referenced = {r[0] for r in con.execute(
                "SELECT sha256 FROM models UNION SELECT sha256 FROM artifacts UNION SELECT sha256 FROM deployments")}
            n_jobs = con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        finally:
            con.close()
        blobs = {f for _, _, files in os.walk(os.path.join(srv.data_dir, "blobs")) for f in files}
        missing = sorted(referenced - blobs)
        self.assertFalse(missing, f"the journal references blobs that are not in the store: {missing}")
        self.assertEqual(n_jobs, len(jobs), "jobs in the journal vs ListJobs")
        orphans = len(blobs - referenced)
        interrupted = sum(1 for j in jobs.values() if j.attempts >= 2)
        log(f"RESULT: {survived}/{trials} kill -9 trials survived (seed {seed}); {len(jobs)} jobs all SUCCEEDED "
            f"({interrupted} ran again after a kill), {len(self.models)} models, {len(self.verified_artifacts)} "
            f"artifacts verified by SHA-256, {len(blobs)} blobs ({orphans} unreferenced: uploads killed between "
            f"commit and journal), journal integrity ok")
        for o in self.outcomes:
            log(f"  {o}")


# ----------------------------------------------------------------------------------------------
# disk full
# ----------------------------------------------------------------------------------------------

def mount_small_fs(mnt, size_mb):
    """Mounts a size_mb file system on mnt: tmpfs, else a loop-mounted ext4 image. Returns
    (description, cleanup) or (None, reasons)."""
    reasons = []
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", mnt],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return f"tmpfs size={size_mb}m", lambda: subprocess.run(["umount", mnt], capture_output=True)
    reasons.append(f"mount -t tmpfs: exit {r.returncode} {r.stderr.strip()}")
    img = mnt.rstrip("/") + ".img"
    try:
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        r = subprocess.run(["mkfs.ext4", "-q", "-F", img], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"mkfs.ext4: exit {r.returncode} {r.stderr.strip()}")
        r = subprocess.run(["mount", "-o", "loop", img, mnt], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"mount -o loop: exit {r.returncode} {r.stderr.strip()}")

        def cleanup():
            subprocess.run(["umount", mnt], capture_output=True)
            os.unlink(img)
        return f"ext4 loop image {size_mb} MB", cleanup
    except (OSError, FileNotFoundError) as e:
        reasons.append(str(e))
        if os.path.exists(img):
            os.unlink(img)
    return None, reasons


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskFull(FaultCase):
    SIZE_MB = 24

    def setUp(self):
        self.protos = sc.Protos.load()
        self.cls_st = sc.model_file("ocr", "ocr_cls.safetensors")
        self.rec_st = sc.model_file("ocr", "ocr_rec.safetensors")
        self.root = tempfile.mkdtemp(prefix="fpxint-diskfull-")
        self.mnt = os.path.join(self.root, "mnt")
        os.makedirs(self.mnt)
        desc, how = mount_small_fs(self.mnt, self.SIZE_MB)
        if desc is None:
            msg = ("\n" + "!" * 100 + "\n!!! DISK-FULL TEST SKIPPED: cannot mount a size-limited file system here: "
                   + "; ".join(how) + "\n" + "!" * 100 + "\n")
            sys.stderr.write(msg)
            shutil.rmtree(self.root, ignore_errors=True)
            self.skipTest("no size-limited file system (tmpfs or loop ext4) can be mounted: " + "; ".join(how))
        # cleanups run last-in first-out, also when setUp fails: stop the server, then unmount
        self.addCleanup(shutil.rmtree, self.root, True)
        self.addCleanup(how)
        log(f"disk full: {desc} on {self.mnt}")
        self.data = os.path.join(self.mnt, "data")
        os.makedirs(os.path.join(self.root, "srv"))
        self.server = sc.Server(root=os.path.join(self.root, "srv"), data_dir=self.data, workers=1,
                                queue_limit=8, max_upload_bytes=256 << 20)
        self.clients = []
        self.addCleanup(self.server.kill)

    def tearDown(self):
        for c in self.clients:
            c.close()
        self.server.kill()

    def client(self):
        c = sc.Client(self.server.address, token="admin", protos=self.protos)
        self.clients.append(c)
        return c

    def verify_artifacts(self, c, job, what):
        for a in job.artifacts:
            data, _ = self.call(c.download, a.artifact_id)
            self.assertEqual((len(data), sc.sha256_bytes(data)), (a.size_bytes, a.sha256),
                             f"{what}: artifact {a.kind} changed")

    def test_disk_full(self):
        q = self.protos.q
        srv = self.server
        srv.start(timeout=60)
        c = self.client()
        tmp = os.path.join(self.data, "tmp")
        # earlier data: a model, a finished job
        m_cls = self.call(c.upload_file, "cls", self.cls_st, q.SAFETENSORS)
        j1 = self.call(c.submit, c.job_spec("cls", "TENSOR", weight_bits=4, weight_terms=2))
        j1 = c.wait_state(j1.job_id, TERMINAL, timeout=120)
        self.assertEqual(c.state_name(j1.state), "SUCCEEDED", j1.error + self.tail())
        self.verify_artifacts(c, j1, "before the disk filled")
        m_rec = self.call(c.upload_file, "rec", self.rec_st, q.SAFETENSORS)

        # 1. an upload that does not fit
        free0 = free_bytes(self.mnt)
        big = os.urandom(1 << 20) * ((free0 >> 20) + 4)  # 4 MiB more than is free
        t0 = time.monotonic()
        try:
            c.upload_iter("too-big", q.SAFETENSORS, sc.sha256_bytes(big), sc.byte_blocks(big), 0)
            self.fail(f"a {len(big)}-byte upload succeeded on a file system with {free0} bytes free")
        except grpc.RpcError as e:
            err = e
        log(f"upload onto the full disk: {sc.rpc_desc(err)} ({time.monotonic() - t0:.1f} s)")
        self.assertEqual(err.code(), SC.RESOURCE_EXHAUSTED, sc.rpc_desc(err) + self.tail())
        self.assertIn("space", err.details().lower(), f"the error does not say the disk is full: {err.details()!r}")
        self.assertIn(self.data, err.details(), f"the error does not name the data directory: {err.details()!r}")
        deadline = time.monotonic() + 10
        while sc.tmp_entries(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(sc.tmp_entries(tmp), [], "the refused upload left files in tmp/")
        self.assertGreaterEqual(free_bytes(self.mnt), free0 - (256 << 10), "the refused upload's space was not freed")
        self.assertNotIn("too-big", [m.name for m in self.call(c.list_models)])

        # 2. a job whose artifact does not fit
        filler = os.path.join(self.mnt, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free_bytes(self.mnt) - (512 << 10)))
            f.flush()
            os.fsync(f.fileno())
        log(f"filled the disk: {free_bytes(self.mnt)} bytes free")
        j2 = self.call(c.submit, c.job_spec("rec", "TENSOR", weight_bits=4, weight_terms=2))
        j2 = c.wait_state(j2.job_id, TERMINAL, timeout=120)
        log(f"job on the full disk: {c.state_name(j2.state)}: {j2.error}")
        self.assertEqual(c.state_name(j2.state), "FAILED", f"job with no room for its artifact: "
                                                           f"{c.state_name(j2.state)}" + self.tail())
        self.assertIn("space", j2.error.lower(), f"the job's error does not say the disk is full: {j2.error!r}")
        self.assertFalse(j2.artifacts, "the failed job lists artifacts")
        time.sleep(0.5)  # the job has left the live table: GetJob reads the journal now
        again = self.call(c.get_job, j2.job_id)
        self.assertEqual(c.state_name(again.state), "FAILED",
                         f"GetJob after the job ended on a full disk says {c.state_name(again.state)} "
                         f"(the journal did not record the failure?) {again.error!r}" + self.tail())
        listed = {j.job_id: c.state_name(j.state) for j in sc.list_all_jobs(c)}
        self.assertEqual(listed.get(j2.job_id), "FAILED", f"ListJobs: {listed}")

        # 3. earlier data intact, the server works again once there is room
        os.unlink(filler)
        deadline = time.monotonic() + 10
        while sc.tmp_entries(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(sc.tmp_entries(tmp), [], "tmp/ not empty after the failed job")
        self.verify_artifacts(c, self.call(c.get_job, j1.job_id), "after the disk was full")
        models = {m.name: (m.sha256, m.size_bytes) for m in self.call(c.list_models)}
        self.assertEqual(models, {"cls": (m_cls.sha256, m_cls.size_bytes), "rec": (m_rec.sha256, m_rec.size_bytes)})
        problems, _, _ = sc.scan_blob_store(self.data)
        self.assertFalse(problems, problems)
        j3 = self.call(c.submit, c.job_spec("rec", "TENSOR", weight_bits=4, weight_terms=2))
        j3 = c.wait_state(j3.job_id, TERMINAL, timeout=120)
        self.assertEqual(c.state_name(j3.state), "SUCCEEDED", j3.error + self.tail())
        self.verify_artifacts(c, j3, "the job after the disk had room again")

        # 4. the same after a restart: journal intact, the failed job stays FAILED
        for cl in self.clients:
            cl.close()
        self.clients.clear()
        rc, _ = srv.terminate(timeout=60)
        self.assertEqual(rc, 0, f"exit code after SIGTERM: {rc}" + self.tail())
        rows = sc.journal_integrity(os.path.join(self.data, "journal.sqlite"), copy_first=False)
        self.assertEqual(rows, ["ok"], f"PRAGMA integrity_check: {rows}")
        srv.start(timeout=60)
        c = self.client()
        states = {j.job_id: c.state_name(j.state) for j in sc.list_all_jobs(c)}
        self.assertEqual(states, {j1.job_id: "SUCCEEDED", j2.job_id: "FAILED", j3.job_id: "SUCCEEDED"},
                         "job states after the restart")
        self.verify_artifacts(c, self.call(c.get_job, j1.job_id), "after the restart")
        rc, _ = srv.terminate(timeout=60)
        self.assertEqual(rc, 0)
        log(f"RESULT: disk full: upload refused ({sc.rpc_desc(err)[:160]}); job FAILED ({j2.error[:160]}); "
            "earlier data intact; journal ok")


    def test_journal_on_full_disk(self):
        """With not one byte free, calls that write the journal must answer RESOURCE_EXHAUSTED naming
        the disk (not INTERNAL), create nothing, and work again once there is room."""
        q = self.protos.q
        srv = self.server
        srv.start(timeout=60)
        c = self.client()
        m_cls = self.call(c.upload_file, "cls", self.cls_st, q.SAFETENSORS)
        j1 = self.call(c.submit, c.job_spec("cls", "TENSOR", weight_bits=4, weight_terms=2))
        j1 = c.wait_state(j1.job_id, TERMINAL, timeout=120)
        self.assertEqual(c.state_name(j1.state), "SUCCEEDED", j1.error + self.tail())
        filler = os.path.join(self.mnt, "filler")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        self.assertEqual(free_bytes(self.mnt), 0, "could not fill the file system")
        tiny = sc.tiny_safetensors_bytes(seed=9)
        calls = [
            ("UploadModel", lambda: c.upload_iter("tiny", q.SAFETENSORS, sc.sha256_bytes(tiny), iter([tiny]), len(tiny))),
            ("SubmitJob", lambda: c.submit(c.job_spec("cls", "TENSOR", weight_bits=4, weight_terms=3))),
            ("DeleteModel", lambda: c.delete_model("cls")),
        ]
        answers, wrong = {}, []
        for name, fn in calls:
            try:
                r = fn()
                answers[name] = f"OK {str(r)[:100]}"
                wrong.append(f"{name} succeeded on a full disk")
            except grpc.RpcError as e:
                answers[name] = sc.rpc_desc(e)
                msg = (e.details() or "")
                if e.code() != SC.RESOURCE_EXHAUSTED:
                    wrong.append(f"{name}: {sc.rpc_desc(e)} (want RESOURCE_EXHAUSTED)")
                elif not ("space" in msg.lower() or "full" in msg.lower()) or self.data not in msg:
                    wrong.append(f"{name}: {msg!r} does not say which disk is full (want the data directory "
                                 f"{self.data} and 'space'/'full' in the message)")
        log(f"calls on a 100% full disk: {answers}")
        os.unlink(filler)
        # nothing was created, earlier data is intact, the server works again
        states = {j.job_id: c.state_name(j.state) for j in sc.list_all_jobs(c)}
        self.assertEqual(states, {j1.job_id: "SUCCEEDED"}, "jobs after the refused SubmitJob")
        models = {m.name: m.sha256 for m in self.call(c.list_models)}
        self.assertEqual(models, {"cls": m_cls.sha256}, "models after the refused calls")
        j2 = self.call(c.submit, c.job_spec("cls", "TENSOR", weight_bits=4, weight_terms=3))
        j2 = c.wait_state(j2.job_id, TERMINAL, timeout=120)
        self.assertEqual(c.state_name(j2.state), "SUCCEEDED", j2.error + self.tail())
        for cl in self.clients:
            cl.close()
        self.clients.clear()
        rc, _ = srv.terminate(timeout=60)
        self.assertEqual(rc, 0)
        rows = sc.journal_integrity(os.path.join(self.data, "journal.sqlite"), copy_first=False)
        self.assertEqual(rows, ["ok"], f"PRAGMA integrity_check: {rows}")
        self.assertFalse(wrong, "on a 100% full disk: " + "; ".join(wrong) + self.tail())


# ----------------------------------------------------------------------------------------------
# clients that go away
# ----------------------------------------------------------------------------------------------

CHILD_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {e2e!r})
import service_client as sc
mode, addr = sys.argv[1], sys.argv[2]
c = sc.Client(addr, token="admin")
if mode == "upload":
    data = os.urandom(64 << 10)
    sha = "0" * 64
    def blocks():
        i = 0
        while True:
            yield data
            i += 1
            if i == 8:
                print("streaming", flush=True)
            time.sleep(0.05)
    c.upload_iter("child-upload", c.p.q.SAFETENSORS, sha, blocks(), 0, timeout=600)
else:
    it = c.quantizer.DownloadArtifact(c.p.q.ArtifactRef(artifact_id=sys.argv[3], chunk_bytes=65536),
                                      metadata=c.md(), timeout=600)
    next(it)
    print("streaming", flush=True)
    time.sleep(600)
"""


class ClientDisconnect(FaultCase):
    def setUp(self):
        self.protos = sc.Protos.load()
        self.server = sc.Server(workers=1, queue_limit=8, max_upload_bytes=256 << 20)
        self.children = []

    def tearDown(self):
        for p in self.children:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
        self.server.cleanup()

    def tmp_uploads(self):
        return [e for e in sc.tmp_entries(os.path.join(self.server.data_dir, "tmp")) if os.path.basename(e).startswith("upload")]

    def wait_until(self, cond, what, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.05)
        self.fail(f"{what} (after {timeout} s)" + self.tail())

    def server_files_under(self, sub):
        d = os.path.join(self.server.data_dir, sub)
        return [p for p in sc.open_files(self.server.proc.pid) if p.startswith(d)]

    def child(self, *args):
        script = CHILD_SCRIPT.format(e2e=os.path.dirname(os.path.abspath(sc.__file__)))
        # TMPDIR inside the server's directory: the stubs the child generates go when the test cleans up
        # (a child killed with SIGKILL cannot remove them itself)
        env = dict(os.environ, TMPDIR=self.server.root)
        p = subprocess.Popen([sys.executable, "-c", script] + list(args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        self.children.append(p)
        line = p.stdout.readline()
        self.assertEqual(line.strip(), "streaming", f"child client: {line!r} {p.stderr.read() if p.poll() else ''}")
        return p

    def test_disconnects(self):
        q = self.protos.q
        srv = self.server
        srv.start(timeout=60)
        c = sc.Client(srv.address, token="admin", protos=self.protos)
        try:
            base = sc.proc_status(srv.proc.pid)
            # 1. an upload cancelled by the client mid-stream
            data = os.urandom(UPLOAD_CHUNK) * 64
            sent, release = threading.Event(), threading.Event()

            def blocks():
                for i, b in enumerate(sc.byte_blocks(data, UPLOAD_CHUNK)):
                    if i == 8:
                        sent.set()
                        release.wait(60)
                        return
                    yield b

            fut = c.quantizer.UploadModel.future(
                c.upload_chunks("cancelled-upload", q.SAFETENSORS, sc.sha256_bytes(data), blocks(), len(data)),
                metadata=c.md(), timeout=120)
            self.assertTrue(sent.wait(30))
            self.wait_until(lambda: self.tmp_uploads(), "the upload never appeared in tmp/")
            fut.cancel()
            release.set()
            self.wait_until(lambda: not self.tmp_uploads(),
                            f"the cancelled upload is still in tmp/: {self.tmp_uploads()}")
            self.wait_until(lambda: not self.server_files_under("tmp"),
                            f"the server keeps files in tmp/ open: {self.server_files_under('tmp')}")

            # 2. an uploading client killed with SIGKILL
            p = self.child("upload", srv.address)
            self.wait_until(lambda: self.tmp_uploads(), "the child's upload never appeared in tmp/")
            p.send_signal(signal.SIGKILL)
            p.wait()
            self.wait_until(lambda: not self.tmp_uploads(),
                            f"the killed client's upload is still in tmp/: {self.tmp_uploads()}")
            names = [m.name for m in self.call(c.list_models)]
            self.assertFalse({"cancelled-upload", "child-upload"} & set(names), f"models: {names}")

            # a big artifact to download
            w = sc.random_safetensors_bytes(2, 1024, 2048, seed=5)
            self.call(c.upload_iter, "w", q.SAFETENSORS, sc.sha256_bytes(w), sc.byte_blocks(w), len(w))
            j = self.call(c.submit, c.job_spec("w", "TENSOR", weight_bits=4, weight_terms=4))
            j = c.wait_state(j.job_id, TERMINAL, timeout=120)
            self.assertEqual(c.state_name(j.state), "SUCCEEDED", j.error + self.tail())
            art = [a for a in j.artifacts if a.kind == "packed_safetensors"][0]
            self.assertGreater(art.size_bytes, 1 << 20)

            # 3. a download cancelled after two chunks
            it = c.quantizer.DownloadArtifact(q.ArtifactRef(artifact_id=art.artifact_id, chunk_bytes=65536),
                                              metadata=c.md(), timeout=120)
            next(it)
            next(it)
            it.cancel()
            self.wait_until(lambda: not self.server_files_under("blobs"),
                            f"the server keeps the artifact open after the download was cancelled: "
                            f"{self.server_files_under('blobs')}")

            # 4. a downloading client killed with SIGKILL
            p = self.child("download", srv.address, art.artifact_id)
            p.send_signal(signal.SIGKILL)
            p.wait()
            self.wait_until(lambda: not self.server_files_under("blobs"),
                            f"the server keeps the artifact open after the client was killed: "
                            f"{self.server_files_under('blobs')}")

            # the server still serves: a whole download, a new upload, health
            data2, _ = self.call(c.download, art.artifact_id)
            self.assertEqual(sc.sha256_bytes(data2), art.sha256)
            tiny = sc.tiny_safetensors_bytes(seed=3)
            self.call(c.upload_iter, "after", q.SAFETENSORS, sc.sha256_bytes(tiny), iter([tiny]), len(tiny))
            self.assertEqual(c.serving_status_name(self.call(c.health)), "SERVING")
            self.assertEqual(sc.tmp_entries(os.path.join(srv.data_dir, "tmp")), [])
            problems, _, _ = sc.scan_blob_store(srv.data_dir)
            self.assertFalse(problems, problems)
            time.sleep(0.5)
            end = sc.proc_status(srv.proc.pid)
            self.assertLessEqual(end["fds"], base["fds"] + 8,
                                 f"open fds {base['fds']} at the start, {end['fds']} after the disconnects: "
                                 f"{sc.open_files(srv.proc.pid)}")
            log(f"RESULT: disconnects: cancelled + SIGKILLed upload and download cleaned up; fds {base['fds']} -> "
                f"{end['fds']}, threads {base['Threads']} -> {end['Threads']}")
        finally:
            c.close()
        rc, _ = srv.terminate(timeout=60)
        self.assertEqual(rc, 0, f"exit code after SIGTERM: {rc}" + self.tail())


if __name__ == "__main__":
    KillNineTrials.TRIALS = _pop_arg("--trials", int)
    KillNineTrials.SEED = _pop_arg("--seed", int)
    unittest.main(verbosity=2)
