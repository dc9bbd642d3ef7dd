r"""The real fpxint-server scraped by Debian's real Prometheus with the project's prometheus.yml.

Run:  FPXINT_SERVER_BIN=build/bin/fpxint-server FPXINT_MODELS_DIR=~/.cache/fpxint/models \
      /usr/bin/python3 tests/deploy/test_prometheus_scrape.py

The server runs with --metrics-listen 127.0.0.1:0; deploy/prometheus/prometheus.yml is copied with
its fpxint target rewritten to that port (scrape interval 1 s, rules from alerts.yml); then known
traffic goes through the server (uploads, one job, 50 inferences of which 10 fail, one unknown
model) and `promtool query instant` must show exactly that traffic. The scraped exposition is
then handed to validate_deploy.py, so every metric the Grafana dashboard and the alert rules
query must exist in the server's real output.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import service_client as sc  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusScrape(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        for tool in (PROMETHEUS, PROMTOOL):
            if not os.access(tool, os.X_OK):
                raise AssertionError(f"{tool} is missing (Debian package prometheus; scripts/setup.sh)")
        cls.work = tempfile.mkdtemp(prefix="fpxint-prom-")
        cls.server = sc.Server(workers=1)
        cls.server.start()
        if not cls.server.metrics_address:
            raise AssertionError("the server wrote no --metrics-port-file\n" + cls.server.log_tail())
        # The shipped config, with the fpxint target pointed at this server.
        with open(os.path.join(REPO, "deploy", "prometheus", "prometheus.yml")) as f:
            cfg = yaml.safe_load(f)
        cfg["global"]["scrape_interval"] = "1s"
        cfg["global"]["evaluation_interval"] = "1s"
        cfg["global"]["scrape_timeout"] = "1s"
        cfg["rule_files"] = [os.path.join(REPO, "deploy", "prometheus", r) for r in cfg["rule_files"]]
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        jobs["fpxint"]["scrape_interval"] = "1s"
        jobs["fpxint"]["static_configs"][0]["targets"] = [cls.server.metrics_address]
        cfg["scrape_configs"] = [jobs["fpxint"]]
        cls.cfg_path = os.path.join(cls.work, "prometheus.yml")
        with open(cls.cfg_path, "w") as f:
            yaml.safe_dump(cfg, f)
        cls.prom_addr = f"127.0.0.1:{free_port()}"
        cls.prom_log = open(os.path.join(cls.work, "prometheus.log"), "wb")
        cls.prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cls.cfg_path}", f"--web.listen-address={cls.prom_addr}",
             f"--storage.tsdb.path={os.path.join(cls.work, 'tsdb')}"],
            stdout=cls.prom_log, stderr=subprocess.STDOUT)

    @classmethod
    def tearDownClass(cls):
        cls.prom.terminate()
        try:
            cls.prom.wait(30)
        except subprocess.TimeoutExpired:
            cls.prom.kill()
        cls.prom_log.close()
        cls.server.terminate()
        cls.server.cleanup()
        if not sc.keep_temp():
            shutil.rmtree(cls.work, ignore_errors=True)

    def prom_tail(self):
        with open(os.path.join(self.work, "prometheus.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")[-3000:]

    def query(self, expr):
        """promtool query instant -> {labels string: value}."""
        p = subprocess.run([PROMTOOL, "query", "instant", f"http://{self.prom_addr}", expr],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise AssertionError(f"promtool query {expr!r} failed: {p.stderr}\n{self.prom_tail()}")
        out = {}
        for line in p.stdout.splitlines():
            m = re.match(r"^(.*) => ([-+0-9.eE]+|NaN) @\[", line.strip())
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def value(self, expr):
        res = self.query(expr)
        self.assertEqual(len(res), 1, f"{expr}: expected one series, got {res}")
        return next(iter(res.values()))

    def wait_for(self, expr, want, timeout=60):
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            res = self.query(expr)
            got = next(iter(res.values())) if len(res) == 1 else res
            if got == want:
                return
            time.sleep(0.5)
        self.fail(f"{expr}: wanted {want}, last seen {got}\n{self.prom_tail()}")

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.prom.poll() is not None:
                self.fail(f"prometheus exited with {self.prom.returncode}\n{self.prom_tail()}")
            r = subprocess.run(["curl", "-sf", f"http://{self.prom_addr}/-/ready"], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.25)
        self.fail(f"prometheus not ready after {timeout} s\n{self.prom_tail()}")

    def test_scraped_traffic(self):
        # Prometheus is up and scraping the server.
        self.wait_ready()
        self.wait_for('up{job="fpxint"}', 1.0)
        c = sc.Client(self.server.address)
        try:
            pt = sc.model_file("fmnist", "fmnist_cnn.pt")
            st = sc.model_file("ocr", "ocr_cls.safetensors")
            sig = [{"name": "input__0", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
            c.upload_file("fm", pt, c.p.q.TORCHSCRIPT, inputs=sig)
            c.upload_file("cls", st, c.p.q.SAFETENSORS)
            uploaded = os.path.getsize(pt) + os.path.getsize(st)
            job = c.submit(c.p.q.JobSpec(model="fm", granularity=c.p.q.LAYER, weight_bits=4,
                                         weight_terms=2, deploy=c.p.q.DeploySpec(enabled=True, name="fm4")))
            job = c.wait_state(job.job_id, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=120)
            self.assertEqual(job.state, c.p.q.SUCCEEDED, job.error)
            layers = len(job.result.layers)
            written = sum(a.size_bytes for a in job.artifacts)
            rng = np.random.RandomState(0)
            ok = bad = 0
            for i in range(50):
                if i % 5 == 4:  # 10 requests with a wrong shape: INVALID_ARGUMENT
                    x = rng.rand(1, 1, 27, 28).astype(np.float32)
                    with self.assertRaises(Exception):
                        c.infer("fm4", x)
                    bad += 1
                else:
                    c.infer("fm4", rng.rand(1, 1, 28, 28).astype(np.float32))
                    ok += 1
            with self.assertRaises(Exception):
                c.infer("no_such_model", rng.rand(1, 1, 28, 28).astype(np.float32))
        finally:
            c.close()
        self.assertEqual((ok, bad), (40, 10))
        # The server's counters as Prometheus scraped them.
        q = 'fpxint_inference_requests_total{model="fm4",version="1",status="OK"}'
        self.wait_for(q, 40.0)
        self.wait_for('fpxint_grpc_requests_total{method="/inference.GRPCInferenceService/ModelInfer",code="INVALID_ARGUMENT"}', 10.0)
        self.wait_for('fpxint_inference_requests_total{model="fm4",status="INVALID_ARGUMENT"}', 10.0, timeout=30)
        self.wait_for('fpxint_inference_requests_total{model="",status="NOT_FOUND"}', 1.0, timeout=30)
        self.wait_for('fpxint_inference_request_duration_seconds_count{model="fm4"}', 50.0, timeout=30)
        self.wait_for('fpxint_inference_queue_duration_seconds_count{model="fm4"}', 40.0, timeout=30)
        # Every successful request took more than 0 and less than 10 s; buckets are cumulative.
        self.wait_for('fpxint_inference_request_duration_seconds_bucket{model="fm4",le="+Inf"}', 50.0, timeout=30)
        self.assertGreater(self.value('fpxint_inference_request_duration_seconds_sum{model="fm4"}'), 0.0)
        self.wait_for('fpxint_grpc_requests_total{method="/inference.GRPCInferenceService/ModelInfer",code="OK"}', 40.0, timeout=30)
        self.wait_for('fpxint_grpc_requests_total{method="/fpxint.v1.Quantizer/UploadModel",code="OK"}', 2.0, timeout=30)
        self.wait_for('fpxint_grpc_requests_total{method="/fpxint.v1.Quantizer/SubmitJob",code="OK"}', 1.0, timeout=30)
        self.wait_for('fpxint_jobs_total{granularity="LAYER",state="QUEUED"}', 1.0, timeout=30)
        self.wait_for('fpxint_jobs_total{granularity="LAYER",state="SUCCEEDED"}', 1.0, timeout=30)
        self.wait_for('fpxint_jobs_total{granularity="TENSOR",state="FAILED"}', 0.0, timeout=30)
        self.wait_for('fpxint_job_duration_seconds_count{granularity="LAYER"}', 1.0, timeout=30)
        self.wait_for("fpxint_layers_expanded_total", float(layers), timeout=30)
        self.wait_for("fpxint_bytes_uploaded_total", float(uploaded), timeout=30)
        self.wait_for("fpxint_bytes_written_total", float(written), timeout=30)
        self.wait_for("fpxint_inference_pending_requests", 0.0, timeout=30)
        self.wait_for("fpxint_jobs_queued", 0.0, timeout=30)
        self.wait_for("fpxint_workers_busy", 0.0, timeout=30)
        self.wait_for("fpxint_workers", 1.0, timeout=30)
        self.wait_for("fpxint_queue_limit", 16.0, timeout=30)
        self.assertGreater(self.value('process_resident_memory_bytes{job="fpxint"}'), 50e6)
        self.assertGreater(self.value('process_open_fds{job="fpxint"}'), 3)
        self.assertGreater(self.value('process_cpu_seconds_total{job="fpxint"}'), 0)
        # The alert rules load and evaluate against the real series (none must be in error).
        rules = subprocess.run(["curl", "-sf", f"http://{self.prom_addr}/api/v1/rules"],
                               capture_output=True, text=True)
        self.assertEqual(rules.returncode, 0, rules.stderr)
        self.assertNotIn('"health":"err"', rules.stdout)
        self.assertIn("FpxintInferenceErrorRate", rules.stdout)
        # Every metric the dashboard and the alert rules use exists in the real exposition.
        text = subprocess.run(["curl", "-sf", f"http://{self.server.metrics_address}/metrics"],
                              capture_output=True, text=True)
        self.assertEqual(text.returncode, 0)
        mfile = os.path.join(self.work, "metrics.txt")
        with open(mfile, "w") as f:
            f.write(text.stdout)
        v = subprocess.run([sys.executable, os.path.join(HERE, "validate_deploy.py"), "--repo", REPO,
                            "--metrics-file", mfile], capture_output=True, text=True)
        self.assertEqual(v.returncode, 0, v.stdout + v.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
