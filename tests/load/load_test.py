#!/usr/bin/python3
r"""Load test of fpxint-server: N concurrent ModelInfer clients while jobs are submitted, watched and
cancelled, job bursts run into the queue limit and uploads stream in. 127.0.0.1 only, bounded in
clients and time.

Run (make test runs the defaults: 4 clients, 8 s):
  FPXINT_SERVER_BIN=build/bin/fpxint-server FPXINT_MODELS_DIR=~/.cache/fpxint/models \
      /usr/bin/python3 tests/load/load_test.py --clients 4 --seconds 8 --json load.json

The server runs with --workers 1 --queue-limit 2 so that the job bursts are refused with
RESOURCE_EXHAUSTED (deliberate: counted apart from the errors). Traffic:
  * inference: the FMNIST CNN (TorchScript, input [N,1,28,28] FP32) expanded by a LAYER job
    (W4, K=2) and deployed; every client sends real test images and alternates fpxint_terms 1/2;
    every answer is compared with a reference computed before the load (a race between requests
    that switch the precision of a shared instance would show as a mismatch);
  * jobs: TENSOR jobs on the OCR classifier weights, watched with WatchJob to the end, every third
    one cancelled; some artifacts downloaded and verified by SHA-256;
  * bursts: queue-limit + 4 jobs submitted back to back every 1.5 s;
  * uploads: 4 MB random safetensors streamed in 256 KiB chunks, verified, deleted.
Reported: throughput, latency p50/p90/p99/max, errors by status code (must be zero apart from the
deliberate ones), peak server memory (VmHWM of /proc/<pid>/status, VmRSS sampled), threads and file
descriptors, the largest queue seen (metric fpxint_jobs_queued and ListJobs state=QUEUED).

After the load a memory probe sends --leak-requests sequential requests, first with a constant
fpxint_terms, then alternating 1/2, and compares the server's VmRSS before and after (a server
that keeps memory per request grows linearly; --leak-limit-mib bounds the growth).

Exit code 0: no unexpected error, every answer right, the queue limit enforced (RESOURCE_EXHAUSTED
seen, never more than --queue-limit jobs queued), every job finished consistently, nothing left in
the server's tmp/, no file descriptor leak, no memory growth in the probe, the server still healthy
and stopping cleanly. 1 otherwise (the failures are listed). Never asserts on timing.
"""

import argparse
import json
import os
import random
import sys
import threading
import time
import traceback

import numpy as np
import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import service_client as sc  # noqa: E402

SC = grpc.StatusCode
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
FMNIST_INPUTS = [{"name": "input__0", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
DEPLOYED = "fmnist-w4"
STATE_RANK = {"QUEUED": 1, "RUNNING": 2, "SUCCEEDED": 3, "FAILED": 3, "CANCELLED": 3}


class Stats:
    """Thread-safe counters and samples."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies_ms = []
        self.infer_ok = 0
        self.images = 0
        self.infer_errors = {}
        self.mismatches = []
        self.unexpected = []  # (where, description)
        self.deliberate = {}  # what -> count
        self.jobs = {"submitted": 0, "succeeded": 0, "cancelled": 0, "failed": 0, "watched": 0,
                     "cancel_requests": 0, "artifacts_verified": 0, "burst_submitted": 0,
                     "burst_accepted": 0}
        self.uploads = {"count": 0, "bytes": 0, "deleted": 0}
        self.samples = []  # (t, rss_kB, hwm_kB, threads, fds, jobs_queued_metric)
        self.queued_listjobs_max = 0

    def unexpected_error(self, where, desc):
        with self.lock:
            self.unexpected.append((where, desc))

    def count(self, table, key, n=1):
        with self.lock:
            table[key] = table.get(key, 0) + n


def error_desc(e):
    if isinstance(e, grpc.RpcError):
        return sc.rpc_desc(e)
    return "".join(traceback.format_exception_only(type(e), e)).strip()


# ----------------------------------------------------------------------------------------------
# Traffic
# ----------------------------------------------------------------------------------------------

def infer_client(idx, address, images, refs, stop, stats, protos, fixed_terms=0):
    try:
        c = sc.Client(address, token="infer", protos=protos)
    except Exception as e:  # noqa: BLE001
        stats.unexpected_error(f"infer client {idx}", f"cannot connect: {error_desc(e)}")
        return
    n = 0
    try:
        while not stop.is_set():
            terms = fixed_terms or 1 + (n + idx) % 2
            n += 1
            t0 = time.perf_counter()
            try:
                resp = c.infer(DEPLOYED, images, params={"fpxint_terms": terms}, req_id=f"c{idx}-{n}",
                               timeout=60)
            except grpc.RpcError as e:
                stats.count(stats.infer_errors, e.code().name)
                stats.unexpected_error(f"infer client {idx}", sc.rpc_desc(e))
                continue
            dt = (time.perf_counter() - t0) * 1000.0
            try:
                out, _ = c.infer_output(resp)
                used = resp.parameters["fpxint_terms"].int64_param
                problem = None
                if resp.id != f"c{idx}-{n}":
                    problem = f"id {resp.id!r} not echoed"
                elif used != terms:
                    problem = f"fpxint_terms answered {used}, asked {terms}"
                elif out.shape != refs[terms].shape or not np.allclose(out, refs[terms], rtol=1e-4, atol=1e-4):
                    diff = float(np.max(np.abs(out - refs[terms]))) if out.shape == refs[terms].shape else None
                    problem = f"output differs from the reference (K'={terms}, max |diff| {diff})"
            except AssertionError as e:
                problem = str(e)
            with stats.lock:
                if problem:
                    stats.mismatches.append(f"client {idx} request {n}: {problem}")
                else:
                    stats.infer_ok += 1
                    stats.images += images.shape[0]
                    stats.latencies_ms.append(dt)
    finally:
        c.close()


def watch_to_end(c, job_id, stats, where):
    """WatchJob until the stream ends; returns the last Job (None on an error)."""
    events = []
    try:
        for ev in c.quantizer.WatchJob(c.p.q.JobRef(job_id=job_id), metadata=c.md(), timeout=120):
            events.append(ev)
    except grpc.RpcError as e:
        stats.unexpected_error(where, f"WatchJob {job_id}: {sc.rpc_desc(e)}")
        return None
    if not events:
        stats.unexpected_error(where, f"WatchJob {job_id}: no event")
        return None
    names = [c.state_name(ev.job.state) for ev in events]
    ranks = [STATE_RANK.get(x, 0) for x in names]
    if ranks != sorted(ranks):
        stats.unexpected_error(where, f"WatchJob {job_id}: states went backwards: {names}")
    if names[-1] not in TERMINAL:
        stats.unexpected_error(where, f"WatchJob {job_id}: stream ended in {names[-1]}")
    with stats.lock:
        stats.jobs["watched"] += 1
    return events[-1].job


def verify_artifacts(c, job, stats, where):
    for a in job.artifacts:
        try:
            data, meta = c.download(a.artifact_id, timeout=60)
        except grpc.RpcError as e:
            stats.unexpected_error(where, f"DownloadArtifact {a.artifact_id}: {sc.rpc_desc(e)}")
            continue
        if len(data) != a.size_bytes or sc.sha256_bytes(data) != a.sha256:
            stats.unexpected_error(where, f"artifact {a.artifact_id} ({a.kind}): {len(data)} bytes, sha "
                                          f"{sc.sha256_bytes(data)[:16]}.. vs listed {a.size_bytes} / "
                                          f"{a.sha256[:16]}..")
        else:
            with stats.lock:
                stats.jobs["artifacts_verified"] += 1


def record_final(job, cancelled_state, stats, where, c):
    """Checks a finished job's state against what we did to it."""
    state = c.state_name(job.state)
    with stats.lock:
        key = {"SUCCEEDED": "succeeded", "CANCELLED": "cancelled", "FAILED": "failed"}.get(state)
        if key:
            stats.jobs[key] += 1
    if state == "FAILED":
        stats.unexpected_error(where, f"job {job.job_id} FAILED: {job.error}")
    elif cancelled_state is None and state != "SUCCEEDED":
        stats.unexpected_error(where, f"job {job.job_id} ended {state} without a cancel ({job.error!r})")
    elif cancelled_state == "CANCELLED" and state != "CANCELLED":
        stats.unexpected_error(where, f"job {job.job_id}: CancelJob answered CANCELLED, job ended {state}")
    if state == "SUCCEEDED" and not job.artifacts:
        stats.unexpected_error(where, f"job {job.job_id} SUCCEEDED without artifacts")
    if state != "SUCCEEDED" and job.artifacts:
        stats.unexpected_error(where, f"job {job.job_id} {state} lists artifacts")


def submit(c, spec, key, stats, where):
    """SubmitJob; returns the Job, or None when the queue is full (deliberate) or on an error."""
    try:
        return c.submit(spec, idempotency_key=key)
    except grpc.RpcError as e:
        if e.code() == SC.RESOURCE_EXHAUSTED and "queue" in (e.details() or "").lower():
            stats.count(stats.deliberate, "SubmitJob RESOURCE_EXHAUSTED (queue full)")
            return None
        stats.unexpected_error(where, f"SubmitJob: {sc.rpc_desc(e)}")
        return None


def cancel(c, job_id, stats, where):
    """CancelJob; returns the state it answered, 'late' when the job had finished already."""
    with stats.lock:
        stats.jobs["cancel_requests"] += 1
    try:
        return c.state_name(c.cancel_job(job_id).state)
    except grpc.RpcError as e:
        if e.code() == SC.FAILED_PRECONDITION:
            stats.count(stats.deliberate, "CancelJob FAILED_PRECONDITION (job already finished)")
            return "late"
        stats.unexpected_error(where, f"CancelJob {job_id}: {sc.rpc_desc(e)}")
        return "error"


def job_driver(address, stop, stats, protos, rng, accepted):
    c = sc.Client(address, token="quantize", protos=protos)
    i = 0
    try:
        while not stop.is_set():
            i += 1
            spec = c.job_spec("cls", "TENSOR", weight_bits=4, weight_terms=int(rng.choice([1, 2, 3, 4])))
            job = submit(c, spec, f"load-job-{i}" if i % 2 else "", stats, "job driver")
            if job is None:
                time.sleep(0.05)
                continue
            with stats.lock:
                stats.jobs["submitted"] += 1
            accepted.append(job.job_id)
            cancelled_state = cancel(c, job.job_id, stats, "job driver") if i % 3 == 0 else None
            final = watch_to_end(c, job.job_id, stats, "job driver")
            if final is None:
                continue
            record_final(final, cancelled_state, stats, "job driver", c)
            if c.state_name(final.state) == "SUCCEEDED" and i % 4 == 1:
                verify_artifacts(c, final, stats, "job driver")
    except Exception as e:  # noqa: BLE001
        stats.unexpected_error("job driver", error_desc(e))
    finally:
        c.close()


def burst_driver(address, stop, stats, protos, queue_limit, accepted, period=1.5):
    c = sc.Client(address, token="quantize", protos=protos)
    spec = c.job_spec("cls", "TENSOR", weight_bits=4, weight_terms=8)
    mine = []
    try:
        while not stop.is_set():
            for _ in range(queue_limit + 4):
                with stats.lock:
                    stats.jobs["burst_submitted"] += 1
                job = submit(c, spec, "", stats, "burst driver")
                if job is not None:
                    with stats.lock:
                        stats.jobs["burst_accepted"] += 1
                        stats.jobs["submitted"] += 1
                    accepted.append(job.job_id)
                    mine.append(job.job_id)
            stop.wait(period)
        # every accepted burst job is watched to its end
        for jid in mine:
            final = watch_to_end(c, jid, stats, "burst driver")
            if final is not None:
                record_final(final, None, stats, "burst driver", c)
    except Exception as e:  # noqa: BLE001
        stats.unexpected_error("burst driver", error_desc(e))
    finally:
        c.close()


def uploader(address, stop, stats, protos, seed):
    c = sc.Client(address, token="quantize", protos=protos)
    q = protos.q
    i = 0
    try:
        while not stop.is_set():
            i += 1
            data = sc.random_safetensors_bytes(2, 512, 1024, seed=seed * 1000 + i)
            sha = sc.sha256_bytes(data)
            name = f"load-upload-{i}"
            try:
                m = c.upload_iter(name, q.SAFETENSORS, sha, sc.byte_blocks(data, 256 << 10), len(data),
                                  timeout=120)
            except grpc.RpcError as e:
                stats.unexpected_error("uploader", f"UploadModel {name}: {sc.rpc_desc(e)}")
                continue
            if (m.name, m.sha256, m.size_bytes) != (name, sha, len(data)):
                stats.unexpected_error("uploader", f"UploadModel {name}: answered {(m.name, m.sha256, m.size_bytes)}")
            with stats.lock:
                stats.uploads["count"] += 1
                stats.uploads["bytes"] += len(data)
            try:
                c.delete_model(name)
                with stats.lock:
                    stats.uploads["deleted"] += 1
            except grpc.RpcError as e:
                stats.unexpected_error("uploader", f"DeleteModel {name}: {sc.rpc_desc(e)}")
    except Exception as e:  # noqa: BLE001
        stats.unexpected_error("uploader", error_desc(e))
    finally:
        c.close()


def sampler(server, stop, stats, protos, period=0.1):
    c = sc.Client(server.address, token="quantize", protos=protos)
    t0 = time.monotonic()
    last_list = 0.0
    try:
        while not stop.is_set():
            st = sc.proc_status(server.proc.pid)
            if st is None:
                stats.unexpected_error("sampler", "the server process is gone")
                return
            try:
                queued = sc.metric_value(sc.metrics_text(server), "fpxint_jobs_queued")
            except OSError as e:
                queued = None
                stats.unexpected_error("sampler", f"metrics endpoint: {e}")
            now = time.monotonic()
            if now - last_list > 0.5:
                last_list = now
                try:
                    n = len(c.list_jobs(page_size=1000, state="QUEUED").jobs)
                    with stats.lock:
                        stats.queued_listjobs_max = max(stats.queued_listjobs_max, n)
                except grpc.RpcError as e:
                    stats.unexpected_error("sampler", f"ListJobs: {sc.rpc_desc(e)}")
            with stats.lock:
                stats.samples.append((now - t0, st["VmRSS_kB"], st["VmHWM_kB"], st["Threads"], st["fds"], queued))
            stop.wait(period)
    finally:
        c.close()


def memory_probe(server, protos, images, refs, n):
    """Server VmRSS before and after n sequential ModelInfer requests: first with a constant
    fpxint_terms, then alternating 1/2 (each answer checked). A server that keeps something per
    request grows linearly; a healthy one stays flat once warm (the load phase warmed it)."""
    c = sc.Client(server.address, token="infer", protos=protos)
    pid = server.proc.pid
    try:
        for i in range(20):  # warm-up of this connection
            c.infer(DEPLOYED, images, params={"fpxint_terms": 2})
        r0 = sc.proc_status(pid)["VmRSS_kB"]
        for i in range(n):
            c.infer(DEPLOYED, images, params={"fpxint_terms": 2})
        r1 = sc.proc_status(pid)["VmRSS_kB"]
        for i in range(n):
            k = 1 + i % 2
            out, _ = c.infer_output(c.infer(DEPLOYED, images, params={"fpxint_terms": k}))
            if not np.allclose(out, refs[k], rtol=1e-4, atol=1e-4):
                return {"error": f"request {i} of the memory probe (K'={k}): wrong answer"}
        r2 = sc.proc_status(pid)["VmRSS_kB"]
    except grpc.RpcError as e:
        return {"error": sc.rpc_desc(e)}
    finally:
        c.close()
    return {"requests": n, "rss_before_kB": r1, "rss_after_kB": r2, "growth_kB": r2 - r1,
            "const_rss_before_kB": r0, "const_growth_kB": r1 - r0}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="concurrent ModelInfer clients (1..64)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of the load phase (1..600)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--batch", type=int, default=8, help="images per ModelInfer request")
    ap.add_argument("--queue-limit", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--infer-instances", type=int, default=2)
    ap.add_argument("--fixed-terms", type=int, default=0, choices=(0, 1, 2),
                    help="every load request asks this fpxint_terms (default 0: alternate 1/2 per request)")
    ap.add_argument("--leak-requests", type=int, default=100,
                    help="sequential requests of the memory probe after the load")
    ap.add_argument("--leak-limit-mib", type=int, default=64,
                    help="largest VmRSS growth over the memory probe's alternating requests")
    ap.add_argument("--seed", type=int, default=None, help="seed of the job mix (default: random, printed)")
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 600 or not 1 <= args.batch <= 256:
        ap.error("bounds: --clients 1..64, --seconds 1..600, --batch 1..256")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"[load] seed {seed}; {args.clients} clients, {args.seconds:g} s, batch {args.batch}, "
          f"--workers {args.workers} --queue-limit {args.queue_limit} --infer-instances {args.infer_instances}"
          f"{f', fpxint_terms {args.fixed_terms} only' if args.fixed_terms else ''}",
          flush=True)
    rng = np.random.default_rng(seed)
    protos = sc.Protos.load()
    q = protos.q
    fmnist_pt = sc.model_file("fmnist", "fmnist_cnn.pt")
    fmnist_test = sc.model_file("fmnist", "fmnist_test.safetensors")
    cls_st = sc.model_file("ocr", "ocr_cls.safetensors")

    server = sc.Server(workers=args.workers, queue_limit=args.queue_limit, max_upload_bytes=64 << 20,
                       extra_args=["--infer-instances", str(args.infer_instances)])
    failures = []
    stats = Stats()
    result = {"seed": seed, "config": vars(args)}
    try:
        server.start(timeout=60)
        pid = server.proc.pid
        st_start = sc.proc_status(pid)
        admin = sc.Client(server.address, token="admin", protos=protos)

        # --- setup: the served model and the job input ----------------------------------------
        admin.upload_file("fmnist", fmnist_pt, q.TORCHSCRIPT, inputs=FMNIST_INPUTS)
        job = admin.submit(admin.job_spec("fmnist", "LAYER", weight_bits=4, weight_terms=2,
                                          deploy={"enabled": True, "name": DEPLOYED}))
        job = admin.wait_state(job.job_id, TERMINAL, timeout=180, poll=0.1)
        if admin.state_name(job.state) != "SUCCEEDED" or job.result.deployed_name != DEPLOYED:
            raise AssertionError(f"LAYER deploy job: {admin.state_name(job.state)} {job.error!r} "
                                 f"deployed {job.result.deployed_name!r}\n{server.log_tail()}")
        admin.upload_file("cls", cls_st, q.SAFETENSORS)

        n_img = args.clients * args.batch
        images = sc.st_read_rows(fmnist_test, "images", 0, n_img).astype(np.float32)
        labels = sc.st_read_rows(fmnist_test, "labels", 0, n_img).astype(np.int64)
        refs = []  # per client {terms: logits}
        correct = 0
        for i in range(args.clients):
            x = images[i * args.batch:(i + 1) * args.batch]
            r = {}
            for k in (1, 2):
                r[k], _ = admin.infer_output(admin.infer(DEPLOYED, x, params={"fpxint_terms": k}))
            refs.append(r)
            correct += int(np.sum(np.argmax(r[2], axis=1) == labels[i * args.batch:(i + 1) * args.batch]))
        ref_accuracy = correct / n_img
        if ref_accuracy < 0.6:
            failures.append(f"the deployed W4 K=2 FMNIST model classifies only {ref_accuracy:.2%} of "
                            f"{n_img} test images right (expected about 90%)")
        admin.close()
        st_base = sc.proc_status(pid)

        # --- load ------------------------------------------------------------------------------
        stop = threading.Event()
        accepted = []
        threads = [threading.Thread(target=sampler, args=(server, stop, stats, protos), daemon=True)]
        for i in range(args.clients):
            threads.append(threading.Thread(
                target=infer_client,
                args=(i, server.address, images[i * args.batch:(i + 1) * args.batch], refs[i], stop, stats,
                      protos, args.fixed_terms), daemon=True))
        threads.append(threading.Thread(target=job_driver,
                                        args=(server.address, stop, stats, protos, rng, accepted), daemon=True))
        threads.append(threading.Thread(target=burst_driver,
                                        args=(server.address, stop, stats, protos, args.queue_limit, accepted),
                                        daemon=True))
        threads.append(threading.Thread(target=uploader, args=(server.address, stop, stats, protos, seed),
                                        daemon=True))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        stop.wait(args.seconds)
        stop.set()
        load_seconds = time.monotonic() - t0  # the infer clients stop within one request
        for t in threads:
            t.join(180)
            if t.is_alive():
                failures.append(f"a load thread ({t.name}) did not finish within 180 s after the stop")
        drain_seconds = time.monotonic() - t0 - load_seconds

        # --- after the load -------------------------------------------------------------------
        c = sc.Client(server.address, token="quantize", protos=protos)
        if not server.alive():
            failures.append(f"the server died under load (exit {server.proc.returncode})")
        else:
            all_jobs = {j.job_id: j for j in sc.list_all_jobs(c)}
            missing = [j for j in accepted if j not in all_jobs]
            if missing:
                failures.append(f"{len(missing)} accepted jobs are not listed by ListJobs: {missing[:5]}")
            for jid in accepted:
                j = c.wait_state(jid, TERMINAL, timeout=120, poll=0.1)
                if c.state_name(j.state) == "FAILED":
                    failures.append(f"job {jid} FAILED: {j.error}")
            queued_now = len(c.list_jobs(page_size=1000, state="QUEUED").jobs)
            if queued_now:
                failures.append(f"{queued_now} jobs still QUEUED after the drain")
            # tmp/ empties once the last job's scratch directory is removed
            tmp = os.path.join(server.data_dir, "tmp")
            deadline = time.monotonic() + 10
            while sc.tmp_entries(tmp) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = sc.tmp_entries(tmp)
            if left:
                failures.append(f"the server's tmp/ still holds {left[:10]} after the load")
            h = c.health()
            if c.serving_status_name(h) != "SERVING":
                failures.append(f"health after the load: {c.serving_status_name(h)}")
            blob_problems, n_blobs, blob_bytes = sc.scan_blob_store(server.data_dir)
            failures.extend(blob_problems)
        c.close()
        time.sleep(1.0)  # let the server notice the closed connections
        st_end = sc.proc_status(server.proc.pid) if server.alive() else None
        st_probe = None
        if server.alive():
            # steady state: the same requests again and again must not grow the server's memory
            leak = memory_probe(server, protos, images[:args.batch], refs[0], args.leak_requests)
            result["memory_probe"] = leak
            if leak.get("error"):
                failures.append(f"memory probe: {leak['error']}")
            elif leak["growth_kB"] > args.leak_limit_mib * 1024:
                failures.append(
                    f"server memory grows without bound: VmRSS {leak['rss_before_kB'] / 1024:.0f} MiB -> "
                    f"{leak['rss_after_kB'] / 1024:.0f} MiB over {leak['requests']} sequential ModelInfer requests "
                    f"alternating fpxint_terms 1/2 on {DEPLOYED} ({leak['growth_kB'] / leak['requests']:.0f} KiB per "
                    f"request; limit {args.leak_limit_mib} MiB in total); with a constant fpxint_terms: "
                    f"{leak['const_growth_kB'] / 1024:.0f} MiB over {leak['requests']} requests")
            st_probe = sc.proc_status(server.proc.pid)
        rc, stop_s = server.terminate(timeout=60)
        if rc != 0:
            failures.append(f"exit code after SIGTERM: {rc} ({stop_s:.1f} s)")

        # --- figures ---------------------------------------------------------------------------
        lat = stats.latencies_ms
        infer = {
            "requests_ok": stats.infer_ok, "images": stats.images, "batch": args.batch,
            "requests_per_s": stats.infer_ok / load_seconds, "images_per_s": stats.images / load_seconds,
            "p50_ms": sc.percentile(lat, 50), "p90_ms": sc.percentile(lat, 90),
            "p99_ms": sc.percentile(lat, 99), "max_ms": max(lat) if lat else None,
            "errors_by_code": dict(stats.infer_errors), "wrong_answers": len(stats.mismatches),
            "reference_accuracy": ref_accuracy,
        }
        samples = stats.samples
        queued_metric_max = max((s[5] for s in samples if s[5] is not None), default=None)
        srv = {
            "rss_start_kB": st_start["VmRSS_kB"], "rss_before_load_kB": st_base["VmRSS_kB"],
            "rss_max_sampled_kB": max((s[1] for s in samples), default=None),
            "peak_rss_VmHWM_kB": max([s[2] for s in samples] + ([st_end["VmHWM_kB"]] if st_end else [])),
            "peak_rss_after_probe_VmHWM_kB": st_probe["VmHWM_kB"] if st_probe else None,
            "rss_end_kB": st_end["VmRSS_kB"] if st_end else None,
            "threads_before_load": st_base["Threads"], "threads_max": max((s[3] for s in samples), default=None),
            "threads_end": st_end["Threads"] if st_end else None,
            "fds_before_load": st_base["fds"], "fds_max": max((s[4] for s in samples), default=None),
            "fds_end": st_end["fds"] if st_end else None, "sigterm_exit": rc, "sigterm_seconds": stop_s,
            "samples": len(samples),
        }
        queue = {"limit": args.queue_limit, "max_queued_metric": queued_metric_max,
                 "max_queued_listjobs": stats.queued_listjobs_max,
                 "resource_exhausted": stats.deliberate.get("SubmitJob RESOURCE_EXHAUSTED (queue full)", 0)}
        result.update(load_seconds=load_seconds, drain_seconds=drain_seconds, infer=infer, jobs=dict(stats.jobs),
                      uploads=dict(stats.uploads), queue=queue, server=srv, deliberate=dict(stats.deliberate),
                      unexpected_errors=[f"{w}: {d}" for w, d in stats.unexpected[:50]],
                      unexpected_error_count=len(stats.unexpected), wrong_answers=stats.mismatches[:20])

        # --- verdict ---------------------------------------------------------------------------
        if stats.unexpected:
            failures.append(f"{len(stats.unexpected)} unexpected errors, first: "
                            + "; ".join(f"{w}: {d}" for w, d in stats.unexpected[:5]))
        if stats.mismatches:
            failures.append(f"{len(stats.mismatches)} wrong ModelInfer answers, first: {stats.mismatches[:3]}")
        if stats.infer_ok == 0:
            failures.append("no ModelInfer request succeeded")
        if stats.jobs["succeeded"] == 0:
            failures.append("no job succeeded during the load")
        if stats.uploads["count"] == 0:
            failures.append("no upload finished during the load")
        if queue["resource_exhausted"] == 0:
            failures.append(f"the queue limit was never enforced: {stats.jobs['burst_submitted']} burst "
                            f"submissions with --queue-limit {args.queue_limit} --workers {args.workers}, "
                            "no RESOURCE_EXHAUSTED")
        for what, v in (("fpxint_jobs_queued", queued_metric_max), ("ListJobs(QUEUED)", stats.queued_listjobs_max)):
            if v is not None and v > args.queue_limit:
                failures.append(f"{what} reached {v:g} > --queue-limit {args.queue_limit}: the queue grew past its limit")
        if st_end and st_end["fds"] > st_base["fds"] + 16:
            failures.append(f"open file descriptors {st_base['fds']} before the load, {st_end['fds']} after it "
                            "with every client gone (leak?)")
    except BaseException as e:  # noqa: BLE001
        failures.append(f"load test aborted: {error_desc(e)}\n{traceback.format_exc()}\n{server.log_tail(30)}")
    finally:
        if server.alive():
            server.kill()
    result["failures"] = failures
    result["ok"] = not failures
    result["server_command"] = getattr(server, "cmdline", None)

    # --- report --------------------------------------------------------------------------------
    if "infer" in result:
        i, j, u, qq, s = result["infer"], result["jobs"], result["uploads"], result["queue"], result["server"]
        rows = [
            ("load phase", f"{result['load_seconds']:.1f} s, {args.clients} infer clients (+ jobs, bursts, uploads)"),
            ("ModelInfer ok", f"{i['requests_ok']} requests, {i['images']} images"),
            ("throughput", f"{i['requests_per_s']:.1f} req/s, {i['images_per_s']:.0f} images/s"),
            ("latency ms", f"p50 {fmt(i['p50_ms'])}, p90 {fmt(i['p90_ms'])}, p99 {fmt(i['p99_ms'])}, "
                           f"max {fmt(i['max_ms'])}"),
            ("infer errors", f"{sum(i['errors_by_code'].values())} {i['errors_by_code'] or ''}".strip()),
            ("wrong answers", str(i["wrong_answers"])),
            ("jobs", f"{j['submitted']} accepted ({j['burst_accepted']} of {j['burst_submitted']} burst), "
                     f"{j['succeeded']} succeeded, {j['cancelled']} cancelled, {j['failed']} failed; "
                     f"{j['watched']} watched, {j['artifacts_verified']} artifacts verified"),
            ("queue limit", f"{qq['limit']}; RESOURCE_EXHAUSTED {qq['resource_exhausted']}x; max queued "
                            f"{fmt(qq['max_queued_metric'], 0)} (metric), {qq['max_queued_listjobs']} (ListJobs)"),
            ("uploads", f"{u['count']} x 4 MB streamed ({u['bytes'] / 1e6:.1f} MB), {u['deleted']} deleted"),
            ("deliberate", ", ".join(f"{k}: {v}" for k, v in result["deliberate"].items()) or "-"),
            ("unexpected errors", str(result["unexpected_error_count"])),
            ("server RSS", f"start {s['rss_start_kB'] / 1024:.0f} MiB, before load {s['rss_before_load_kB'] / 1024:.0f} "
                           f"MiB, peak (VmHWM) {s['peak_rss_VmHWM_kB'] / 1024:.0f} MiB, after the load "
                           f"{fmt(s['rss_end_kB'] and s['rss_end_kB'] / 1024, 0)} MiB"),
            ("threads / fds", f"threads {s['threads_before_load']} -> max {s['threads_max']} -> {s['threads_end']}; "
                              f"fds {s['fds_before_load']} -> max {s['fds_max']} -> {s['fds_end']}"),
            ("SIGTERM", f"exit {s['sigterm_exit']} after {s['sigterm_seconds']:.1f} s"),
        ]
        mp = result.get("memory_probe")
        if mp and "growth_kB" in mp:
            rows.insert(-2, ("memory probe", f"{mp['requests']} sequential requests: constant K' "
                                             f"{mp['const_growth_kB'] / 1024:+.0f} MiB, alternating K'=1/2 "
                                             f"{mp['growth_kB'] / 1024:+.0f} MiB VmRSS "
                                             f"({mp['growth_kB'] / mp['requests']:.0f} KiB/request); VmHWM after it "
                                             f"{fmt(s['peak_rss_after_probe_VmHWM_kB'] and s['peak_rss_after_probe_VmHWM_kB'] / 1024, 0)} MiB"))
        w = max(len(r[0]) for r in rows)
        print("\n" + "-" * 100)
        for k, v in rows:
            print(f"{k.ljust(w)}  {v}")
        print("-" * 100)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"[load] wrote {args.json}")
    if failures:
        print(f"\n[load] FAILED ({len(failures)}); reproduce with: {sys.executable} {' '.join(sys.argv)} "
              f"--seed {seed}", file=sys.stderr)
        for fl in failures:
            print(f"  - {fl}", file=sys.stderr)
        if server.stderr_path and os.path.exists(server.stderr_path):
            print(server.log_tail(30), file=sys.stderr)
        server.cleanup()
        return 1
    server.cleanup()
    print("[load] OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
