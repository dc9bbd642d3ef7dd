#!/usr/bin/python3
"""Checks the deployment files of fpxint (Dockerfile, deploy/, scripts/runtime-packages.txt).

    /usr/bin/python3 tests/deploy/validate_deploy.py [--metrics-file FILE] [--repo ROOT]

Prints one line per check ("ok" or "FAIL") and a closing "N passed, N failed" line; exits 1 when
any check failed. Needs PyYAML and promtool (Debian package prometheus); uses docker-compose,
kubectl and apt-cache when they are installed and says so when they are not.

--metrics-file: a Prometheus text exposition scraped from a real fpxint-server
(curl -s http://127.0.0.1:8002/metrics > FILE). The PromQL of the alert rules and the dashboard
may then use only the metric families (and labels) in that file. Without it they are checked
against EXPECTED below, the names the server promises to export (docs/ARCHITECTURE.md "Metrics").
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("validate_deploy.py: PyYAML is missing (apt-get install python3-yaml); "
             "run with /usr/bin/python3")

# name -> (type, labels). Histograms export name_bucket{le}, name_sum and name_count.
EXPECTED = {
    "fpxint_inference_requests_total": ("counter", {"model", "version", "status"}),
    "fpxint_inference_request_duration_seconds": ("histogram", {"model", "version"}),
    "fpxint_inference_queue_duration_seconds": ("histogram", {"model", "version"}),
    "fpxint_inference_batch_rows": ("histogram", {"model", "version"}),
    "fpxint_inference_batch_requests": ("histogram", {"model", "version"}),
    "fpxint_inference_pending_requests": ("gauge", set()),
    "fpxint_jobs_total": ("counter", {"granularity", "state"}),
    "fpxint_jobs_queued": ("gauge", set()),
    "fpxint_queue_limit": ("gauge", set()),
    "fpxint_workers_busy": ("gauge", set()),
    "fpxint_workers": ("gauge", set()),
    "fpxint_job_duration_seconds": ("histogram", {"granularity"}),
    "fpxint_layers_expanded_total": ("counter", set()),
    "fpxint_job_writes_fenced_total": ("counter", set()),
    "fpxint_replica_info": ("gauge", {"replica", "journal"}),
    "fpxint_bytes_uploaded_total": ("counter", set()),
    "fpxint_bytes_written_total": ("counter", set()),
    "fpxint_grpc_requests_total": ("counter", {"method", "code"}),
    "fpxint_grpc_request_duration_seconds": ("histogram", {"method"}),
    "process_cpu_seconds_total": ("counter", set()),
    "process_resident_memory_bytes": ("gauge", set()),
    "process_virtual_memory_bytes": ("gauge", set()),
    "process_open_fds": ("gauge", set()),
    "process_start_time_seconds": ("gauge", set()),
}
# Series that Prometheus itself makes for every target, and the alert state series.
PROMETHEUS_SERIES = {
    "up": set(), "scrape_duration_seconds": set(), "scrape_samples_scraped": set(),
    "scrape_samples_post_metric_relabeling": set(), "scrape_series_added": set(),
    "ALERTS": {"alertname", "alertstate", "severity"}, "ALERTS_FOR_STATE": {"alertname"},
}
# Labels every scraped series has (target labels of deploy/prometheus/prometheus.yml).
TARGET_LABELS = {"job", "instance", "service", "__name__"}

# The compose services and k8s objects this project ships.
COMPOSE_SERVICES = ("fpxint", "prometheus", "grafana")
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "bool", "offset", "inf", "nan", "atan2"}


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, name, detail=""):
        self.passed += 1
        print(f"ok    {name}" + (f" ({detail})" if detail else ""))

    def fail(self, name, message):
        self.failed += 1
        print(f"FAIL  {name}: {message}")

    def note(self, message):
        print(f"note  {message}")

    def check(self, name, problems, detail=""):
        """problems: list of strings; empty means the check passed."""
        if problems:
            self.fail(name, "; ".join(problems))
        else:
            self.ok(name, detail)


# ----------------------------------------------------------------------------------------------
# Metric names


def expand_families(families):
    """{name: (type, labels)} -> {series name: labels}; labels None: not known (no samples)."""
    series = {}
    for name, (kind, labels) in families.items():
        if labels is None:
            suffixes = {"histogram": ("_bucket", "_sum", "_count"),
                        "summary": ("", "_sum", "_count")}.get(kind, ("",))
            series.update({name + s: None for s in suffixes})
        elif kind == "histogram":
            series[name + "_bucket"] = set(labels) | {"le"}
            series[name + "_sum"] = set(labels)
            series[name + "_count"] = set(labels)
        elif kind == "summary":
            series[name] = set(labels) | {"quantile"}
            series[name + "_sum"] = set(labels)
            series[name + "_count"] = set(labels)
        else:
            series[name] = set(labels)
    return series


def parse_exposition(text):
    """Metric families of a Prometheus text exposition -> {series name: labels seen}."""
    types = {}
    samples = {}
    sample_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+")
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        m = sample_re.match(line)
        if not m:
            continue
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"', m.group(3) or ""))
        samples.setdefault(m.group(1), set()).update(labels)
    series = {}
    for name, kind in types.items():
        base_labels = None  # a family without samples (labelled, never touched): labels unknown
        for suffix in ("", "_bucket", "_sum", "_count", "_total", "_created"):
            if name + suffix in samples:
                base_labels = (base_labels or set()) | samples[name + suffix]
        if base_labels is not None:
            base_labels -= {"le", "quantile"}
        series.update(expand_families({name: (kind, base_labels)}))
    for name, labels in samples.items():
        if series.get(name) is not None or name not in series:
            series.setdefault(name, set()).update(labels)
    return series


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def promql_selectors(expr):
    """(metric names, [(metric or None, label names in its matchers)]) used by a PromQL expr."""
    e = strip_strings(expr)
    e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "1m", e)  # Grafana variables
    selectors = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", e):
        labels = re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2))
        name = m.group(1) if m.group(1) and m.group(1) not in PROMQL_KEYWORDS else None
        selectors.append((name, set(labels)))
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d+(\.\d+)?(ms|s|m|h|d|w|y)\b", " ", e)
    e = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d*)?([eE][+-]?\d+)?", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        if word in PROMQL_KEYWORDS:
            continue
        if re.match(r"\s*\(", e[m.end():]):  # a function call
            continue
        names.add(word)
    return names, selectors


def check_exprs(ck, name, exprs, known):
    """Every metric in exprs is in known {series: labels}; matcher labels exist on it."""
    problems = []
    for where, expr in exprs:
        names, selectors = promql_selectors(expr)
        for n in sorted(names):
            if n not in known:
                problems.append(f"{where}: unknown metric '{n}'")
        for metric, labels in selectors:
            if metric is None or metric not in known:
                continue
            if known[metric] is None:
                continue
            extra = labels - known[metric] - TARGET_LABELS
            if extra:
                problems.append(f"{where}: {metric} has no label(s) {sorted(extra)}")
    ck.check(name, problems, f"{len(exprs)} expressions")


# ----------------------------------------------------------------------------------------------
# Helpers


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def run(cmd, cwd=None):
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout


def first_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return " | ".join(lines[-3:]) if lines else "(no output)"


# ----------------------------------------------------------------------------------------------
# Checks


def check_yaml_parses(ck, deploy):
    problems, count = [], 0
    for root, _, files in os.walk(deploy):
        for f in sorted(files):
            if f.endswith((".yml", ".yaml")):
                count += 1
                try:
                    load_yaml_docs(os.path.join(root, f))
                except yaml.YAMLError as e:
                    problems.append(f"{os.path.relpath(os.path.join(root, f), deploy)}: {e}")
    if count == 0:
        problems.append("no YAML files under deploy/")
    ck.check("deploy/**/*.yml parse", problems, f"{count} files")


def k8s_objects(k8s_dir):
    objs = []  # (file, doc)
    for f in sorted(os.listdir(k8s_dir)):
        if f.endswith((".yml", ".yaml")) and f != "kustomization.yaml":
            for d in load_yaml_docs(os.path.join(k8s_dir, f)):
                objs.append((f, d))
    return objs


def container_port_lookup(container):
    names = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    numbers = {p.get("containerPort") for p in container.get("ports", [])}
    return names, numbers


def check_k8s(ck, repo, configmap_env):
    k8s_dir = os.path.join(repo, "deploy", "k8s")
    if not os.path.isdir(k8s_dir):
        ck.fail("k8s manifests", "deploy/k8s is missing")
        return
    objs = k8s_objects(k8s_dir)

    problems = []
    for f, d in objs:
        if not isinstance(d, dict):
            problems.append(f"{f}: not a mapping")
            continue
        for key in ("apiVersion", "kind"):
            if not d.get(key):
                problems.append(f"{f}: no {key}")
        if not (d.get("metadata") or {}).get("name"):
            problems.append(f"{f}: no metadata.name")
        if (d.get("metadata") or {}).get("namespace"):
            problems.append(f"{f}: has a namespace (the manifests are namespace-less)")
    ck.check("k8s: apiVersion/kind/metadata.name", problems, f"{len(objs)} objects")
    objs = [(f, d) for f, d in objs if isinstance(d, dict)]

    by_kind = {}
    for f, d in objs:
        by_kind.setdefault(d.get("kind"), {})[(d.get("metadata") or {}).get("name")] = d
    deployments = by_kind.get("Deployment", {})
    pvcs = by_kind.get("PersistentVolumeClaim", {})
    cms = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})
    if not deployments:
        ck.fail("k8s: Deployment", "no Deployment in deploy/k8s")
        return

    for dname, dep in deployments.items():
        spec = dep.get("spec") or {}
        tmpl = spec.get("template") or {}
        tlabels = (tmpl.get("metadata") or {}).get("labels") or {}
        pod = tmpl.get("spec") or {}
        p = []
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        if not sel:
            p.append("no spec.selector.matchLabels")
        for k, v in sel.items():
            if tlabels.get(k) != v:
                p.append(f"selector {k}={v} not in the template's labels")
        ck.check(f"k8s: Deployment {dname} selector matches template labels", p)

        p = []
        containers = pod.get("containers") or []
        if not containers:
            p.append("no containers")
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for c in containers:
            cn = c.get("name", "?")
            if not c.get("image"):
                p.append(f"container {cn}: no image")
            names, numbers = container_port_lookup(c)
            for port in c.get("ports") or []:
                if not port.get("name"):
                    p.append(f"container {cn}: port {port.get('containerPort')} has no name")
                elif len(port["name"]) > 15:
                    p.append(f"container {cn}: port name {port['name']} longer than 15")
            for probe_key in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(probe_key)
                if not probe:
                    p.append(f"container {cn}: no {probe_key}")
                    continue
                if "grpc" in probe:
                    port = probe["grpc"].get("port")
                    if not isinstance(port, int):
                        p.append(f"{cn}.{probe_key}: grpc.port must be a number, got {port!r}")
                    elif port not in numbers:
                        p.append(f"{cn}.{probe_key}: grpc port {port} is not a containerPort")
                    elif names.get("grpc") != port:
                        p.append(f"{cn}.{probe_key}: grpc probe port {port} is not the port "
                                 f"named grpc")
                else:
                    p.append(f"{cn}.{probe_key}: not a native grpc probe")
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    p.append(f"{cn}: volumeMount {m.get('name')} has no volume")
            for ef in c.get("envFrom") or []:
                if "configMapRef" in ef and ef["configMapRef"].get("name") not in cms:
                    p.append(f"{cn}: envFrom ConfigMap {ef['configMapRef'].get('name')} missing")
                if "secretRef" in ef and ef["secretRef"].get("name") not in secrets:
                    p.append(f"{cn}: envFrom Secret {ef['secretRef'].get('name')} missing")
            for ev in c.get("env") or []:
                vf = ev.get("valueFrom") or {}
                if "configMapKeyRef" in vf and vf["configMapKeyRef"].get("name") not in cms:
                    p.append(f"{cn}: env {ev.get('name')} refers to a missing ConfigMap")
                if "secretKeyRef" in vf and vf["secretKeyRef"].get("name") not in secrets:
                    p.append(f"{cn}: env {ev.get('name')} refers to a missing Secret")
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem"):
                mounts = {m.get("mountPath") for m in c.get("volumeMounts") or []}
                if "/tmp" not in mounts:
                    p.append(f"{cn}: readOnlyRootFilesystem without a /tmp volume")
        ck.check(f"k8s: Deployment {dname} containers, ports, grpc probes, mounts", p,
                 f"{len(containers)} container(s)")

        p = []
        rwo = False
        for vname, v in volumes.items():
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"].get("claimName")
                if claim not in pvcs:
                    p.append(f"volume {vname}: PVC {claim} not among the manifests")
                elif "ReadWriteOnce" in ((pvcs[claim].get("spec") or {}).get("accessModes") or []):
                    rwo = True
            if "configMap" in v and v["configMap"].get("name") not in cms:
                p.append(f"volume {vname}: ConfigMap {v['configMap'].get('name')} missing")
            if "secret" in v and v["secret"].get("secretName") not in secrets:
                p.append(f"volume {vname}: Secret {v['secret'].get('secretName')} missing")
        ck.check(f"k8s: Deployment {dname} PVC/ConfigMap/Secret references exist", p,
                 f"{len(volumes)} volumes")

        p = []
        if rwo:
            if (spec.get("strategy") or {}).get("type") != "Recreate":
                p.append("a ReadWriteOnce PVC needs strategy Recreate")
            if spec.get("replicas", 1) != 1:
                p.append("a ReadWriteOnce PVC with the SQLite journal allows one replica")
        psc = pod.get("securityContext") or {}
        if not psc.get("runAsNonRoot"):
            p.append("pod securityContext.runAsNonRoot is not true")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        sg = configmap_env.get("FPXINT_SHUTDOWN_GRACE")
        if sg is not None and not float(sg) < grace:
            p.append(f"terminationGracePeriodSeconds {grace} <= FPXINT_SHUTDOWN_GRACE {sg}")
        ann = (tmpl.get("metadata") or {}).get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true":
            p.append("no prometheus.io/scrape annotation")
        ck.check(f"k8s: Deployment {dname} single replica, Recreate, non-root, grace period", p,
                 f"grace {grace}s > shutdown grace {sg}s")

    # Services
    for sname, svc in by_kind.get("Service", {}).items():
        spec = svc.get("spec") or {}
        sel = spec.get("selector") or {}
        p = []
        targets = []
        for dname, dep in deployments.items():
            tl = (((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
                "labels") or {}
            if sel and all(tl.get(k) == v for k, v in sel.items()):
                targets.append(dep)
        if not targets:
            p.append(f"selector {sel} matches no Deployment's pod labels")
        for port in spec.get("ports") or []:
            tp = port.get("targetPort", port.get("port"))
            for dep in targets:
                cs = ((dep.get("spec") or {}).get("template") or {}).get("spec", {}).get(
                    "containers") or []
                found = False
                for c in cs:
                    names, numbers = container_port_lookup(c)
                    if (isinstance(tp, str) and tp in names) or (isinstance(tp, int) and
                                                                 tp in numbers):
                        found = True
                if not found:
                    p.append(f"port {port.get('name')}: targetPort {tp} not in the pod")
            if not port.get("name"):
                p.append(f"port {port.get('port')} has no name")
        ck.check(f"k8s: Service {sname} selector and targetPorts", p)

    # HPAs
    for hname, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        spec = hpa.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        p = []
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            p.append(f"scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not a Deployment "
                     "among the manifests")
        elif (deployments[ref["name"]].get("spec") or {}).get("strategy", {}).get(
                "type") == "Recreate" and spec.get("maxReplicas", 1) > 1:
            p.append("maxReplicas > 1 on a Recreate (single-writer) Deployment")
        if not hpa.get("apiVersion", "").startswith("autoscaling/v2"):
            p.append("not autoscaling/v2")
        ck.check(f"k8s: HPA {hname} targets the Deployment", p,
                 f"min {spec.get('minReplicas')} max {spec.get('maxReplicas')}")

    # kustomization lists exactly the files present
    kpath = os.path.join(k8s_dir, "kustomization.yaml")
    p = []
    if not os.path.isfile(kpath):
        p.append("deploy/k8s/kustomization.yaml is missing")
    else:
        k = load_yaml_docs(kpath)[0]
        listed = list(k.get("resources") or [])
        present = sorted(f for f in os.listdir(k8s_dir)
                         if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml")
        if len(listed) != len(set(listed)):
            p.append("resources lists a file twice")
        if set(listed) != set(present):
            missing = sorted(set(present) - set(listed))
            extra = sorted(set(listed) - set(present))
            if missing:
                p.append(f"not listed: {missing}")
            if extra:
                p.append(f"listed but absent: {extra}")
    ck.check("k8s: kustomization.yaml lists exactly the manifests", p)

    kubectl = shutil.which("kubectl")
    if kubectl:
        rc, out = run([kubectl, "kustomize", k8s_dir])
        ck.check("k8s: kubectl kustomize deploy/k8s", [] if rc == 0 else [first_line(out)])
    else:
        ck.note("kubectl not installed: kustomize build not run")


def merge_patch(base, patch):
    """A strategic-merge patch as kustomize applies it to the fields these manifests use: maps
    merge; lists of named items (containers, env) merge by name; other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge_patch(base.get(k), v) if k in base else v
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = list(base)
        for item in patch:
            idx = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if idx is None:
                out.append(item)
            else:
                out[idx] = merge_patch(out[idx], item)
        return out
    return patch


def check_k8s_replicas(ck, repo):
    """deploy/k8s-replicas: the base (deploy/k8s) with its patches applied, checked as a scaled-out
    deployment (PostgreSQL journal, shared volume, rolling updates, a real HPA range)."""
    k8s_dir = os.path.join(repo, "deploy", "k8s")
    odir = os.path.join(repo, "deploy", "k8s-replicas")
    kpath = os.path.join(odir, "kustomization.yaml")
    if not os.path.isfile(kpath):
        ck.fail("k8s replicas overlay", "deploy/k8s-replicas/kustomization.yaml is missing")
        return
    k = load_yaml_docs(kpath)[0]
    p = []
    objs = {}
    for f, d in k8s_objects(k8s_dir):
        if isinstance(d, dict):
            objs[(d.get("kind"), (d.get("metadata") or {}).get("name"))] = d
    for r in k.get("resources") or []:
        if r == "../k8s":
            continue
        path = os.path.join(odir, r)
        if not os.path.isfile(path):
            p.append(f"resource {r} is missing")
            continue
        for d in load_yaml_docs(path):
            objs[(d.get("kind"), (d.get("metadata") or {}).get("name"))] = d
    if "../k8s" not in (k.get("resources") or []):
        p.append("the overlay does not build on the base (resources: ../k8s)")
    for patch in k.get("patches") or []:
        path = os.path.join(odir, patch.get("path", ""))
        if not os.path.isfile(path):
            p.append(f"patch {patch.get('path')} is missing")
            continue
        for d in load_yaml_docs(path):
            key = (d.get("kind"), (d.get("metadata") or {}).get("name"))
            if key not in objs:
                p.append(f"patch {patch.get('path')}: no {key[0]} {key[1]} in the base")
                continue
            objs[key] = merge_patch(objs[key], d)
    listed = {pt.get("path") for pt in k.get("patches") or []} | set(k.get("resources") or [])
    present = {f for f in os.listdir(odir)
               if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml"}
    if present - listed:
        p.append(f"files not used by the kustomization: {sorted(present - listed)}")
    ck.check("k8s replicas: the overlay's resources and patches apply to the base", p)

    p = []
    dep = objs.get(("Deployment", "fpxint")) or {}
    spec = dep.get("spec") or {}
    if not spec.get("replicas", 1) > 1:
        p.append(f"replicas {spec.get('replicas')}: expected more than one")
    if (spec.get("strategy") or {}).get("type") != "RollingUpdate":
        p.append("strategy is not RollingUpdate")
    pod = (spec.get("template") or {}).get("spec") or {}
    c = next((c for c in pod.get("containers") or [] if c.get("name") == "fpxint"), {})
    env = {e.get("name"): e for e in c.get("env") or []}
    rid = ((env.get("FPXINT_REPLICA_ID") or {}).get("valueFrom") or {}).get("fieldRef") or {}
    if rid.get("fieldPath") != "metadata.name":
        p.append("FPXINT_REPLICA_ID is not the pod's name (fieldRef metadata.name)")
    refs = c.get("envFrom") or []
    if not any((r.get("configMapRef") or {}).get("name") == "fpxint-config" for r in refs):
        p.append("envFrom lost the fpxint-config ConfigMap")
    sec_names = [(r.get("secretRef") or {}).get("name") for r in refs if "secretRef" in r]
    url = ""
    for name in sec_names:
        sec = objs.get(("Secret", name))
        if sec is None:
            p.append(f"envFrom Secret {name} is not among the manifests")
            continue
        url = (sec.get("stringData") or {}).get("FPXINT_DATABASE_URL", url)
    if not re.match(r"postgres(ql)?://", url or ""):
        p.append("no Secret in envFrom gives FPXINT_DATABASE_URL=postgresql://...")
    if configmap_env(repo).get("FPXINT_DATABASE_URL"):
        p.append("configmap.yaml sets FPXINT_DATABASE_URL, which would override the Secret")
    pvc = objs.get(("PersistentVolumeClaim", "fpxint-data")) or {}
    if (pvc.get("spec") or {}).get("accessModes") != ["ReadWriteMany"]:
        p.append("the data PVC is not ReadWriteMany")
    probe = ((c.get("readinessProbe") or {}).get("grpc") or {})
    if probe.get("service", None) != "":
        p.append("readiness does not follow the journal (grpc probe of the overall service \"\")")
    pdb = (objs.get(("PodDisruptionBudget", "fpxint")) or {}).get("spec") or {}
    pod_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    sel = (pdb.get("selector") or {}).get("matchLabels") or {}
    if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
        p.append("no PodDisruptionBudget selecting the server's pods")
    hpa = (objs.get(("HorizontalPodAutoscaler", "fpxint")) or {}).get("spec") or {}
    lo, hi = hpa.get("minReplicas", 1), hpa.get("maxReplicas", 1)
    if not 1 < lo <= hi:
        p.append(f"HPA range {lo}..{hi}: expected 1 < min <= max")
    ck.check("k8s replicas: PostgreSQL journal, shared volume, rolling update, pod-name replica "
             "ids, readiness on the journal, PDB, HPA range", p,
             f"replicas {spec.get('replicas')}, HPA {lo}..{hi}")

    kubectl = shutil.which("kubectl")
    if kubectl:
        rc, out = run([kubectl, "kustomize", odir])
        ck.check("k8s: kubectl kustomize deploy/k8s-replicas",
                 [] if rc == 0 else [first_line(out)])


def configmap_env(repo):
    path = os.path.join(repo, "deploy", "k8s", "configmap.yaml")
    env = {}
    if os.path.isfile(path):
        for d in load_yaml_docs(path):
            if isinstance(d, dict) and d.get("kind") == "ConfigMap":
                env.update(d.get("data") or {})
    return env


def duration_seconds(text):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text).strip())
    if not m or not any(m.groups()):
        return None
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def check_compose(ck, repo):
    deploy = os.path.join(repo, "deploy")
    path = os.path.join(deploy, "docker-compose.yml")
    if not os.path.isfile(path):
        ck.fail("compose: deploy/docker-compose.yml", "missing")
        return None
    c = load_yaml_docs(path)[0]
    services = c.get("services") or {}
    ck.check("compose: services fpxint, prometheus, grafana",
             [f"no service {s}" for s in COMPOSE_SERVICES if s not in services])

    declared = set((c.get("volumes") or {}).keys())
    p = []
    mounts = 0
    for sname, s in services.items():
        for v in s.get("volumes") or []:
            src = v.split(":")[0] if isinstance(v, str) else (v.get("source") or "")
            if not src:
                continue
            mounts += 1
            if src.startswith((".", "/", "~")):
                if not os.path.exists(os.path.normpath(os.path.join(deploy, src))):
                    p.append(f"{sname}: host path {src} does not exist (relative to deploy/)")
            elif src not in declared:
                p.append(f"{sname}: named volume {src} is not declared under volumes:")
        build = s.get("build")
        if build:
            ctx = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                                "Dockerfile")
            if not os.path.isfile(os.path.join(deploy, ctx, dockerfile)):
                p.append(f"{sname}: build {ctx}/{dockerfile} does not exist")
    ck.check("compose: volumes declared, host paths exist, build context", p,
             f"{mounts} mounts")

    f = services.get("fpxint") or {}
    p = []
    test = (f.get("healthcheck") or {}).get("test") or []
    test_s = " ".join(test) if isinstance(test, list) else str(test)
    if not re.search(r"\bfpxint health\b", test_s):
        p.append(f"healthcheck does not run 'fpxint health': {test_s!r}")
    if f.get("restart") != "unless-stopped":
        p.append("restart is not unless-stopped")
    env = f.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env if "=" in e)
    sg = env.get("FPXINT_SHUTDOWN_GRACE")
    spg = duration_seconds(f.get("stop_grace_period", "10s"))
    if spg is None:
        p.append(f"stop_grace_period {f.get('stop_grace_period')!r} not understood")
    elif sg is not None and not float(sg) < spg:
        p.append(f"stop_grace_period {spg}s <= FPXINT_SHUTDOWN_GRACE {sg}s")
    ports = [str(x) for x in f.get("ports") or []]
    for port in ("8001", "8002"):
        if not any(x.endswith(":" + port) or x == port for x in ports):
            p.append(f"port {port} not published")
    ck.check("compose: fpxint health check, restart, ports, stop grace", p)

    # Safe by default: an open server (no token file) must say so explicitly, publish its ports
    # on loopback only, and cannot reserve TorchScript to an admin it does not have.
    p = []
    insecure = str(env.get("FPXINT_INSECURE_NO_AUTH", "")).lower() in ("1", "true", "yes")
    if not env.get("FPXINT_TOKEN_FILE"):
        if not insecure:
            p.append("no FPXINT_TOKEN_FILE and no FPXINT_INSECURE_NO_AUTH: the server would not "
                     "start on 0.0.0.0")
        for x in ports:
            if not x.startswith("127.0.0.1:"):
                p.append(f"open server (no token file) publishes {x} beyond loopback")
        if env.get("FPXINT_ALLOW_TORCHSCRIPT_UPLOADS") == "admin":
            p.append("FPXINT_ALLOW_TORCHSCRIPT_UPLOADS admin without tokens refuses every upload")
    ck.check("compose: authentication or an explicit, loopback-only open server", p)

    exe = shutil.which("docker-compose")
    if exe:
        rc, out = run([exe, "-f", path, "config", "-q"], cwd=repo)
        ck.check("compose: docker-compose config -q", [] if rc == 0 else [first_line(out)])
    else:
        ck.note("docker-compose not installed: `docker-compose config` not run "
                "(apt-get install docker-compose)")
    return c


def check_compose_replicas(ck, repo):
    """deploy/docker-compose.replicas.yml: two or more fpxint replicas on one PostgreSQL service
    and one shared data volume, each with its own replica id."""
    path = os.path.join(repo, "deploy", "docker-compose.replicas.yml")
    if not os.path.isfile(path):
        ck.fail("compose replicas: deploy/docker-compose.replicas.yml", "missing")
        return
    c = load_yaml_docs(path)[0]  # PyYAML resolves the anchors and merge keys
    services = c.get("services") or {}
    p = []
    pg = [n for n, sv in services.items() if str(sv.get("image", "")).startswith("postgres:15")]
    if len(pg) != 1:
        p.append(f"expected one postgres:15 service, found {pg}")
    replicas = {n: sv for n, sv in services.items() if "FPXINT_DATABASE_URL" in
                (sv.get("environment") or {})}
    if len(replicas) < 2:
        p.append(f"expected at least two fpxint replicas, found {sorted(replicas)}")
    ids, urls, data_mounts = set(), set(), set()
    for n, sv in replicas.items():
        env = sv.get("environment") or {}
        ids.add(env.get("FPXINT_REPLICA_ID"))
        urls.add(env.get("FPXINT_DATABASE_URL"))
        mounts = [v for v in sv.get("volumes") or [] if isinstance(v, str)
                  and v.split(":")[1:2] == [env.get("FPXINT_DATA_DIR")]]
        if not mounts:
            p.append(f"{n}: FPXINT_DATA_DIR {env.get('FPXINT_DATA_DIR')} is not a mounted volume")
        data_mounts.update(m.split(":")[0] for m in mounts)
        if pg and pg[0] not in (sv.get("depends_on") or {}):
            p.append(f"{n}: does not depend on {pg[0]}")
        if env.get("FPXINT_INSECURE_NO_AUTH") and not all(
                str(x).startswith("127.0.0.1:") for x in sv.get("ports") or []):
            p.append(f"{n}: open server publishes ports beyond loopback")
    if None in ids or len(ids) != len(replicas):
        p.append(f"replica ids not distinct: {sorted(map(str, ids))}")
    if len(urls) != 1 or not all(re.match(rf"postgres(ql)?://[^@]*@{re.escape(pg[0] if pg else '')}[:/]",
                                           u or "") for u in urls):
        p.append(f"the replicas do not share one URL of the postgres service: {sorted(map(str, urls))}")
    if len(data_mounts) != 1:
        p.append(f"the replicas do not share one data volume: {sorted(data_mounts)}")
    ck.check("compose replicas: one PostgreSQL, one shared data volume, distinct replica ids", p,
             f"{len(replicas)} replicas")
    exe = shutil.which("docker-compose")
    if exe:
        rc, out = run([exe, "-f", path, "config", "-q"], cwd=repo)
        ck.check("compose replicas: docker-compose config -q",
                 [] if rc == 0 else [first_line(out)])


def check_prometheus(ck, repo, compose, known):
    pdir = os.path.join(repo, "deploy", "prometheus")
    config = os.path.join(pdir, "prometheus.yml")
    rules = os.path.join(pdir, "alerts.yml")
    promtool = shutil.which("promtool")
    if not promtool:
        ck.fail("prometheus: promtool", "promtool is not installed (apt-get install prometheus)")
    else:
        rc, out = run([promtool, "check", "config", config])
        ck.check("prometheus: promtool check config", [] if rc == 0 else [first_line(out)])
        rc, out = run([promtool, "check", "rules", rules])
        ck.check("prometheus: promtool check rules", [] if rc == 0 else [first_line(out)])

    cfg = load_yaml_docs(config)[0]
    p = []
    rf = cfg.get("rule_files") or []
    if "alerts.yml" not in rf:
        p.append(f"rule_files {rf} does not name alerts.yml relatively")
    jobs = {j.get("job_name"): j for j in cfg.get("scrape_configs") or []}
    targets = []
    if "fpxint" not in jobs:
        p.append("no scrape job fpxint")
    else:
        for sc in jobs["fpxint"].get("static_configs") or []:
            targets += sc.get("targets") or []
        if "fpxint:8002" not in targets:
            p.append(f"job fpxint does not scrape fpxint:8002 (targets {targets})")
    if compose is not None:
        svc = (compose.get("services") or {}).get("fpxint") or {}
        env = svc.get("environment") or {}
        ml = env.get("FPXINT_METRICS_LISTEN", "0.0.0.0:8002") if isinstance(env, dict) else ""
        if ml and not ml.endswith(":8002"):
            p.append(f"compose FPXINT_METRICS_LISTEN {ml} is not the scraped port 8002")
    ck.check("prometheus: scrape job fpxint -> fpxint:8002, rule_files alerts.yml", p)

    groups = (load_yaml_docs(rules)[0] or {}).get("groups") or []
    exprs = []
    names = []
    for g in groups:
        for r in g.get("rules") or []:
            exprs.append((f"alert {r.get('alert') or r.get('record')}", str(r.get("expr", ""))))
            names.append(r.get("alert"))
    wanted = {
        "jobs failing": lambda e: "fpxint_jobs_total" in e and "FAILED" in e,
        "queue saturation": lambda e: "fpxint_jobs_queued" in e and "fpxint_queue_limit" in e,
        "inference error rate": lambda e: "fpxint_inference_requests_total" in e and "OK" in e,
        "gRPC error rate": lambda e: "fpxint_grpc_requests_total" in e,
        "target down": lambda e: re.search(r'up\{job="fpxint"\}\s*==\s*0', e) is not None,
    }
    ck.check("prometheus: alerts for job failures, queue, inference/gRPC errors, target down",
             [f"no alert for {k}" for k, f in wanted.items()
              if not any(f(e) for _, e in exprs)], f"{len(exprs)} rules")
    check_exprs(ck, "prometheus: alert expressions use known metrics and labels", exprs, known)
    if promtool:
        unit_test_alerts(ck, promtool, rules)


# promtool unit tests of the alert rules: each alert fires on the data it is meant for, and the
# queue and target-down alerts wait for their `for:` durations.
ALERT_TESTS = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="fpxint", instance="fpxint:8002"}'
        values: '1 1 0 0 0 0 0'
    alert_rule_test:
      - {eval_time: 2m, alertname: FpxintTargetDown, exp_alerts: []}
      - eval_time: 4m
        alertname: FpxintTargetDown
        exp_alerts:
          - exp_labels: {severity: critical, job: fpxint, instance: "fpxint:8002"}
  - interval: 1m
    input_series:
      - series: 'fpxint_jobs_queued{job="fpxint", instance="a"}'
        values: '60x10'
      - series: 'fpxint_queue_limit{job="fpxint", instance="a"}'
        values: '64x10'
    alert_rule_test:
      - {eval_time: 3m, alertname: FpxintQueueSaturated, exp_alerts: []}
      - eval_time: 6m
        alertname: FpxintQueueSaturated
        exp_alerts:
          - exp_labels: {severity: warning, job: fpxint, instance: a}
  - interval: 1m
    input_series:
      - series: 'fpxint_jobs_queued{job="fpxint", instance="a"}'
        values: '10x10'
      - series: 'fpxint_queue_limit{job="fpxint", instance="a"}'
        values: '64x10'
    alert_rule_test:
      - {eval_time: 8m, alertname: FpxintQueueSaturated, exp_alerts: []}
  - interval: 1m
    input_series:
      - series: 'fpxint_job_writes_fenced_total{job="fpxint", instance="b"}'
        values: '0x5 1x40'
    alert_rule_test:
      - {eval_time: 4m, alertname: FpxintJobLeaseLost, exp_alerts: []}
      - eval_time: 7m
        alertname: FpxintJobLeaseLost
        exp_alerts:
          - exp_labels: {severity: warning, job: fpxint, instance: b}
      - {eval_time: 40m, alertname: FpxintJobLeaseLost, exp_alerts: []}
  - interval: 1m
    input_series:
      # first sample already 1 (the series appears with the first failure), then constant
      - series: 'fpxint_jobs_total{job="fpxint", instance="a", granularity="LAYER", state="FAILED"}'
        values: '_ _ 1x40'
      - series: 'fpxint_jobs_total{job="fpxint", instance="a", granularity="LAYER", state="SUCCEEDED"}'
        values: '0+1x42'
    alert_rule_test:
      - eval_time: 3m
        alertname: FpxintJobsFailing
        exp_alerts:
          - exp_labels: {severity: warning, granularity: LAYER}
      - {eval_time: 30m, alertname: FpxintJobsFailing, exp_alerts: []}
  - interval: 1m
    input_series:
      - series: 'fpxint_jobs_total{job="fpxint", instance="a", granularity="MODEL", state="FAILED"}'
        values: '0x10 1x20'
    alert_rule_test:
      - {eval_time: 9m, alertname: FpxintJobsFailing, exp_alerts: []}
      - eval_time: 12m
        alertname: FpxintJobsFailing
        exp_alerts:
          - exp_labels: {severity: warning, granularity: MODEL}
  - interval: 1m
    input_series:
      - series: 'fpxint_inference_requests_total{job="fpxint", instance="a", model="m", version="1", status="OK"}'
        values: '0+100x20'
      - series: 'fpxint_inference_requests_total{job="fpxint", instance="a", model="m", version="1", status="INVALID_ARGUMENT"}'
        values: '0+10x20'
      - series: 'fpxint_inference_requests_total{job="fpxint", instance="a", model="good", version="1", status="OK"}'
        values: '0+100x20'
    alert_rule_test:
      - eval_time: 12m
        alertname: FpxintInferenceErrorRate
        exp_alerts:
          - exp_labels: {severity: warning, model: m, version: "1"}
  - interval: 1m
    input_series:
      - series: 'fpxint_grpc_requests_total{job="fpxint", instance="a", method="/fpxint.v1.Quantizer/GetJob", code="OK"}'
        values: '0+10x30'
      - series: 'fpxint_grpc_requests_total{job="fpxint", instance="a", method="/fpxint.v1.Quantizer/GetJob", code="NOT_FOUND"}'
        values: '0+5x30'
      - series: 'fpxint_grpc_requests_total{job="fpxint", instance="a", method="/fpxint.v1.Quantizer/WatchJob", code="OK"}'
        values: '0+10x30'
      - series: 'fpxint_grpc_requests_total{job="fpxint", instance="a", method="/fpxint.v1.Quantizer/WatchJob", code="CANCELLED"}'
        values: '0+10x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: FpxintGrpcErrorRate
        exp_alerts:
          - exp_labels: {severity: warning, method: /fpxint.v1.Quantizer/GetJob}
      - {eval_time: 20m, alertname: FpxintGrpcServerErrors, exp_alerts: []}
  - interval: 1m
    input_series:
      - series: 'fpxint_grpc_requests_total{job="fpxint", instance="a", method="/inference.GRPCInferenceService/ModelInfer", code="INTERNAL"}'
        values: '_ _ _ 1x30'
    alert_rule_test:
      - eval_time: 4m
        alertname: FpxintGrpcServerErrors
        exp_alerts:
          - exp_labels: {severity: critical, method: /inference.GRPCInferenceService/ModelInfer, code: INTERNAL}
      - {eval_time: 30m, alertname: FpxintGrpcServerErrors, exp_alerts: []}
"""


def unit_test_alerts(ck, promtool, rules_path):
    with tempfile.TemporaryDirectory(prefix="fpxint-deploy-") as tmp:
        # Annotations are for people; the tests compare labels only.
        groups = load_yaml_docs(rules_path)[0]
        for g in groups.get("groups") or []:
            for r in g.get("rules") or []:
                r.pop("annotations", None)
        with open(os.path.join(tmp, "rules.yml"), "w") as f:
            yaml.safe_dump(groups, f)
        test = yaml.safe_load(ALERT_TESTS)
        test["rule_files"] = ["rules.yml"]
        with open(os.path.join(tmp, "test.yml"), "w") as f:
            yaml.safe_dump(test, f)
        rc, out = run([promtool, "test", "rules", "test.yml"], cwd=tmp)
        ck.check("prometheus: promtool test rules (alerts fire on the data they are for)",
                 [] if rc == 0 else [out.strip().replace("\n", " | ")[:2000]],
                 f"{len(test['tests'])} cases")


def check_grafana(ck, repo, compose, known):
    gdir = os.path.join(repo, "deploy", "grafana")
    ds_path = os.path.join(gdir, "provisioning", "datasources", "prometheus.yml")
    prov_path = os.path.join(gdir, "provisioning", "dashboards", "fpxint.yml")
    dash_path = os.path.join(gdir, "dashboards", "fpxint.json")
    p = []
    uids = set()
    try:
        for d in (load_yaml_docs(ds_path)[0] or {}).get("datasources") or []:
            if d.get("uid"):
                uids.add(d["uid"])
            url = d.get("url", "")
            host = re.sub(r"^\w+://", "", url).split(":")[0].split("/")[0]
            if compose is not None and host not in (compose.get("services") or {}):
                p.append(f"datasource url {url}: {host} is not a compose service")
    except (OSError, yaml.YAMLError) as e:
        p.append(str(e))
    if not uids:
        p.append("the provisioned datasource has no uid")
    ck.check("grafana: provisioned datasource with a uid", p, ", ".join(sorted(uids)))

    p = []
    try:
        providers = (load_yaml_docs(prov_path)[0] or {}).get("providers") or []
        paths = [(x.get("options") or {}).get("path") for x in providers if x.get("type") == "file"]
        if not paths:
            p.append("no file provider")
        if compose is not None:
            gm = [v.split(":")[1] for v in (compose["services"].get("grafana") or {}).get(
                "volumes") or [] if isinstance(v, str) and v.count(":") >= 1]
            for path in paths:
                if path not in gm:
                    p.append(f"provider path {path} is not a grafana mount in compose ({gm})")
    except (OSError, yaml.YAMLError) as e:
        p.append(str(e))
    ck.check("grafana: dashboard file provider path is mounted", p)

    try:
        with open(dash_path) as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        ck.fail("grafana: dashboard JSON parses", str(e))
        return
    ck.ok("grafana: dashboard JSON parses")

    panels = []

    def walk(ps):
        for x in ps or []:
            panels.append(x)
            walk(x.get("panels"))

    walk(dash.get("panels"))
    p = []
    if not 30 <= int(dash.get("schemaVersion", 0)) <= 40:
        p.append(f"schemaVersion {dash.get('schemaVersion')}")
    if not dash.get("uid") or not dash.get("title"):
        p.append("no uid or title")
    ids = [x.get("id") for x in panels]
    if len(ids) != len(set(ids)):
        p.append("panel ids repeat")
    exprs = []
    for x in panels:
        for ds in [x.get("datasource")] + [t.get("datasource") for t in x.get("targets") or []]:
            if isinstance(ds, dict) and ds.get("type") == "prometheus" and ds.get(
                    "uid") not in uids:
                p.append(f"panel {x.get('title')!r}: datasource uid {ds.get('uid')} "
                         "is not the provisioned one")
        if x.get("type") != "row" and not x.get("targets"):
            p.append(f"panel {x.get('title')!r} has no targets")
        for t in x.get("targets") or []:
            if not t.get("expr"):
                p.append(f"panel {x.get('title')!r} target {t.get('refId')}: no expr")
            else:
                exprs.append((f"panel {x.get('title')!r}", t["expr"]))
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        ds = v.get("datasource")
        if isinstance(ds, dict) and ds.get("uid") not in uids:
            p.append(f"variable {v.get('name')}: datasource uid {ds.get('uid')} unknown")
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else str(q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q)
        if m:
            exprs.append((f"variable {v.get('name')}", m.group(1)))
            metric = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", m.group(1)).group(1)
            if known.get(metric) is not None and m.group(2) not in known[metric] | TARGET_LABELS:
                p.append(f"variable {v.get('name')}: {metric} has no label {m.group(2)}")
        else:
            exprs.append((f"variable {v.get('name')}", q))
    ck.check("grafana: dashboard schema, panel ids, datasource uids, targets", p,
             f"{len(panels)} panels, {len(exprs)} expressions")

    want = {
        "inference rate by model/status": r"fpxint_inference_requests_total",
        "inference latency quantiles": r"histogram_quantile\(0\.99,.*fpxint_inference_request_duration_seconds_bucket",
        "queue wait": r"fpxint_inference_queue_duration_seconds",
        "pending requests": r"fpxint_inference_pending_requests",
        "jobs by granularity/state": r"by \(granularity, state\).*fpxint_jobs_total",
        "queued vs limit": r"fpxint_queue_limit",
        "workers busy vs workers": r"fpxint_workers\b",
        "job duration": r"fpxint_job_duration_seconds_bucket",
        "layers expanded": r"fpxint_layers_expanded_total",
        "bytes uploaded/written": r"fpxint_bytes_written_total",
        "gRPC by method/code": r"by \(method, code\).*fpxint_grpc_requests_total",
        "process RSS": r"process_resident_memory_bytes",
        "process CPU": r"process_cpu_seconds_total",
    }
    ck.check("grafana: dashboard has the panels of the deployment issue",
             [f"no panel for {k}" for k, r in want.items()
              if not any(re.search(r, e) for _, e in exprs)])
    check_exprs(ck, "grafana: dashboard expressions use known metrics and labels", exprs, known)

    promtool = shutil.which("promtool")
    if promtool:
        # PromQL syntax: each expression as a recording rule, Grafana variables substituted.
        rules = []
        for i, (_, e) in enumerate(exprs):
            e = (e.replace("$__rate_interval", "1m").replace("$__interval", "1m")
                 .replace("$__range", "1h").replace("$job", "fpxint"))
            e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", e)
            rules.append({"record": f"fpxint_dashboard_check_{i}", "expr": e})
        with tempfile.TemporaryDirectory(prefix="fpxint-deploy-") as tmp:
            path = os.path.join(tmp, "dashboard_rules.yml")
            with open(path, "w") as f:
                yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
            rc, out = run([promtool, "check", "rules", path])
        ck.check("grafana: dashboard PromQL parses (promtool)",
                 [] if rc == 0 else [first_line(out)], f"{len(rules)} expressions")


def dockerfile_stages(text):
    text = re.sub(r"\\\n", " ", text)
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stages.append({"from": rest.strip(), "instr": []})
        elif stages:
            stages[-1]["instr"].append((word, rest.strip()))
    return stages


def check_dockerfile(ck, repo):
    path = os.path.join(repo, "Dockerfile")
    try:
        with open(path) as f:
            stages = dockerfile_stages(f.read())
    except OSError as e:
        ck.fail("Dockerfile", str(e))
        return
    p = []
    if len(stages) < 2:
        ck.fail("Dockerfile: multi-stage", f"{len(stages)} stage(s)")
        return
    build, rt = stages[0], stages[-1]
    if not build["from"].startswith("debian:bookworm"):
        p.append(f"build stage FROM {build['from']}")
    runs = [a for w, a in build["instr"] if w == "RUN"]
    copies = [a for w, a in build["instr"] if w == "COPY"]
    if not any(re.match(r"scripts/setup\.sh\b", c) for c in copies):
        p.append("build stage does not COPY scripts/setup.sh first")
    if "scripts/setup.sh" not in runs:
        p.append("build stage does not RUN scripts/setup.sh (what CI runs)")
    if "make build" not in runs:
        p.append("build stage does not RUN make build (what CI runs)")
    elif "scripts/setup.sh" in runs and runs.index("scripts/setup.sh") > runs.index("make build"):
        p.append("make build runs before scripts/setup.sh")
    with open(os.path.join(repo, "Makefile")) as f:
        if not re.search(r"^build:", f.read(), re.M):
            p.append("the Makefile has no build target")
    ck.check("Dockerfile: build stage runs scripts/setup.sh and make build", p)

    p = []
    instr = rt["instr"]
    if not rt["from"].startswith("debian:bookworm-slim"):
        p.append(f"runtime stage FROM {rt['from']}")
    users = [a for w, a in instr if w == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        p.append("runtime stage does not end with a non-root USER")
    hc = [a for w, a in instr if w == "HEALTHCHECK"]
    if not hc or not re.search(r'fpxint"?,?\s*"?health\b', hc[-1]):
        p.append("HEALTHCHECK does not run `fpxint health`")
    ep = [a for w, a in instr if w == "ENTRYPOINT"]
    if not ep or "/usr/local/bin/fpxint-server" not in ep[-1]:
        p.append("ENTRYPOINT is not /usr/local/bin/fpxint-server")
    copied = " ".join(a for w, a in instr if w == "COPY" and "--from=" in a)
    for b in ("build/bin/fpxint-server", "build/bin/fpxint ", "build/bin/fpxint-vet"):
        if b not in copied + " ":
            p.append(f"runtime stage does not copy {b.strip()}")
    if not any("runtime-packages.txt" in a for w, a in instr):
        p.append("runtime stage does not install from scripts/runtime-packages.txt")
    exposed = " ".join(a for w, a in instr if w == "EXPOSE").split()
    for port in ("8001", "8002"):
        if port not in exposed:
            p.append(f"port {port} not exposed")
    if not any(w == "VOLUME" and "/var/lib/fpxint" in a for w, a in instr):
        p.append("no VOLUME /var/lib/fpxint")
    env = " ".join(a for w, a in instr if w == "ENV")
    for kv in ("FPXINT_LISTEN=0.0.0.0:8001", "FPXINT_METRICS_LISTEN=0.0.0.0:8002",
               "FPXINT_DATA_DIR=/var/lib/fpxint"):
        if kv not in env:
            p.append(f"no ENV {kv}")
    if any(re.search(r"-dev\b", a) for w, a in instr if w == "RUN"):
        p.append("runtime stage names a -dev package")
    ck.check("Dockerfile: runtime stage (non-root USER, fpxint health, binaries, env, ports)", p,
             f"USER {users[-1] if users else '?'}")

    pk_path = os.path.join(repo, "scripts", "runtime-packages.txt")
    try:
        with open(pk_path) as f:
            pkgs = [l.split("#")[0].strip() for l in f]
        pkgs = [x for x in pkgs if x]
    except OSError as e:
        ck.fail("runtime packages", str(e))
        return
    p = [f"{x} is a -dev package" for x in pkgs if x.endswith("-dev")]
    p += [f"{x}: one package per line" for x in pkgs if " " in x]
    apt_cache = shutil.which("apt-cache")
    if not apt_cache:
        ck.check("runtime packages: no -dev packages", p, f"{len(pkgs)} packages")
        ck.note("apt-cache not installed: runtime package names not looked up")
        return
    for x in pkgs:
        rc, _ = run([apt_cache, "show", x])
        if rc != 0:
            p.append(f"apt-cache show {x} failed (unknown package, or run apt-get update)")
    ck.check("runtime packages: each exists in apt-cache, none is -dev", p,
             " ".join(pkgs))


def check_pipeline(ck, repo):
    """The MLOps step's two wrappers against the script they run: every input a wrapper uses is
    declared, every declared output is produced, and the script they call exists."""
    pdir = os.path.join(repo, "deploy", "pipeline")
    script = "fpxint-quantize-step.sh"
    problems = []
    if not os.access(os.path.join(pdir, script), os.X_OK):
        problems.append(f"deploy/pipeline/{script} is missing or not executable")

    action = load_yaml_docs(os.path.join(pdir, "action.yml"))[0]
    inputs = set((action.get("inputs") or {}).keys())
    for req in ("server", "model-file", "name", "max-rel-error"):
        if req not in inputs:
            problems.append(f"action.yml: no input '{req}'")
    runs = action.get("runs") or {}
    if runs.get("using") != "composite":
        problems.append(f"action.yml: runs.using is {runs.get('using')!r}, expected 'composite'")
    steps = runs.get("steps") or []
    step_ids = {st.get("id") for st in steps if isinstance(st, dict)}
    text = yaml.safe_dump(steps)
    for used in sorted(set(re.findall(r"inputs\.([A-Za-z0-9_-]+)", text))):
        if used not in inputs:
            problems.append(f"action.yml: steps use undeclared input '{used}'")
    for name, out in (action.get("outputs") or {}).items():
        m = re.search(r"steps\.([A-Za-z0-9_-]+)\.outputs\.([A-Za-z0-9_-]+)", str(out.get("value", "")))
        if m and m.group(1) not in step_ids:
            problems.append(f"action.yml: output '{name}' reads step '{m.group(1)}', which does not exist")
        if m and f"{m.group(2)}=" not in text:
            problems.append(f"action.yml: output '{name}' reads '{m.group(2)}', which no step writes")
    if script not in text:
        problems.append(f"action.yml: the step does not run {script}")

    comp = load_yaml_docs(os.path.join(pdir, "component.yaml"))[0]
    cin = {i["name"] for i in comp.get("inputs") or []}
    cout = {o["name"] for o in comp.get("outputs") or []}
    container = (comp.get("implementation") or {}).get("container") or {}
    args = container.get("args") or []
    placeholders = args[1:] if args and isinstance(args[0], str) else args
    for a in placeholders:
        if not isinstance(a, dict) or len(a) != 1:
            problems.append(f"component.yaml: argument {a!r} is not one placeholder")
            continue
        (kind, ref), = a.items()
        if kind == "inputValue" and ref not in cin:
            problems.append(f"component.yaml: inputValue '{ref}' is not a declared input")
        if kind == "outputPath" and ref not in cout:
            problems.append(f"component.yaml: outputPath '{ref}' is not a declared output")
    body = args[0] if args and isinstance(args[0], str) else ""
    used = [int(n) for n in re.findall(r"\$\{?(\d+)\}?", body)]
    if used and max(used) >= len(placeholders):
        problems.append(f"component.yaml: the script reads ${max(used)} but gets "
                        f"{len(placeholders)} arguments")
    if len(set(used)) != len(placeholders):
        problems.append(f"component.yaml: {len(placeholders)} arguments, the script reads "
                        f"{len(set(used))} of them")
    if script not in body:
        problems.append(f"component.yaml: the command does not run {script}")
    ck.check("pipeline: action.yml and component.yaml match their inputs, outputs and script",
             problems, f"{len(inputs)} action inputs, {len(cin)} component inputs")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=os.path.normpath(os.path.join(here, "..", "..")),
                    help="repository root (default: two levels above this script)")
    ap.add_argument("--metrics-file", help="Prometheus text exposition scraped from the server")
    args = ap.parse_args()
    repo = os.path.abspath(args.repo)
    ck = Checker()

    if args.metrics_file:
        with open(args.metrics_file) as f:
            scraped = parse_exposition(f.read())
        fpx = sorted(n for n in scraped if n.startswith("fpxint_"))
        if not fpx:
            ck.fail("metrics file", f"{args.metrics_file} has no fpxint_* metrics")
        else:
            ck.ok("metrics file parses", f"{len(scraped)} series names, {len(fpx)} fpxint_*")
        promised = expand_families(EXPECTED)
        missing = sorted(set(promised) - set(scraped))
        if missing:
            ck.note(f"in EXPECTED but not in {args.metrics_file}: {', '.join(missing)}")
        known = dict(scraped)
    else:
        print(f"note  no --metrics-file: checking PromQL against the {len(EXPECTED)} metric "
              "families hard-coded in EXPECTED")
        known = expand_families(EXPECTED)
    known.update({k: set(v) for k, v in PROMETHEUS_SERIES.items()})

    try:
        check_yaml_parses(ck, os.path.join(repo, "deploy"))
        check_k8s(ck, repo, configmap_env(repo))
        check_k8s_replicas(ck, repo)
        compose = check_compose(ck, repo)
        check_compose_replicas(ck, repo)
        check_prometheus(ck, repo, compose, known)
        check_grafana(ck, repo, compose, known)
        check_dockerfile(ck, repo)
        check_pipeline(ck, repo)
    except (OSError, yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError) as e:
        ck.fail("validator", f"{type(e).__name__}: {e} (a file is missing or malformed)")

    print(f"{ck.passed} passed, {ck.failed} failed")
    return 1 if ck.failed else 0


if __name__ == "__main__":
    sys.exit(main())
