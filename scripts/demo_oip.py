#!/usr/bin/python3
"""The OCR half of `make demo` (scripts/demo.sh): read rendered text lines through fpxint-server's
Open Inference Protocol endpoint (inference.GRPCInferenceService/ModelInfer) and compare the
served FP32 model with its FP=xINT expansions.

Three modes:

  demo_oip.py table --server HOST:PORT --ocr-dir DIR --fp NAME --fp-upload UPLOAD.json \
      --job JOB.json [--job JOB.json ...] [--limit N]
        Every line goes to every served model (interleaved, one request at a time); prints the
        table (model, b, K_w, K_a, size, character accuracy, latency vs FP) and one sample line.
        UPLOAD.json / JOB.json are the `fpxint --json upload` / `fpxint --json quantize --wait`
        documents: sizes, specs, probe errors and deployed names come from them.
  demo_oip.py write-line --ocr-dir DIR --line I OUT.npy
        Saves rendered line I ([1,3,48,320] FP32) as .npy, for `fpxint infer -i`.
  demo_oip.py decode --ocr-dir DIR LOGITS.npy [--line I]
        Greedy-CTC-decodes saved recognizer outputs ([1,T,6625], e.g. `fpxint infer -o`).

Scoring is fpxint-eval's (model/eval.cc, task ocr_rec): greedy CTC decoding (argmax per frame,
repeats merged, class 0 = blank, class c = line c of ppocr_keys_v1.txt, the last class = space),
and character accuracy = 100 * (1 - sum of edit distances / sum of ground-truth characters) over
all lines (micro-averaged, code points, not clamped: it can go below 0).

The gRPC stubs are generated from proto/ by tests/e2e/service_client.py (grpc_tools.protoc into
a temporary directory under $TMPDIR, removed at exit). Run with /usr/bin/python3.
"""

import argparse
import json
import os
import statistics
import sys
import textwrap
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))
import service_client as sc  # noqa: E402  (stubs, safetensors rows)

MB = float(1 << 20)  # the CLI's "MB" (fpxint upload / quantize print bytes / 2^20)


def die(msg):
    sys.stderr.write(f"demo_oip.py: error: {msg}\n")
    sys.exit(1)


# ----------------------------------------------------------------------------------------------
# Data and scoring (fpxint-eval's rules)
# ----------------------------------------------------------------------------------------------

def need_file(path):
    if not os.path.isfile(path):
        die(f"missing {path} (run scripts/fetch_models.sh, or set FPXINT_MODELS_DIR)")
    return path


def load_keys(ocr_dir):
    """CTC class c (1-based) -> keys[c-1]; as model/eval.cc: '\\n'-separated, empty lines skipped,
    a trailing '\\r' dropped, then the space as the last class."""
    with open(need_file(os.path.join(ocr_dir, "ppocr_keys_v1.txt")), encoding="utf-8") as f:
        text = f.read()
    keys = [line[:-1] if line.endswith("\r") else line for line in text.split("\n") if line]
    keys.append(" ")
    return keys


def load_texts(ocr_dir):
    with open(need_file(os.path.join(ocr_dir, "ocr_eval_labels.json")), encoding="utf-8") as f:
        doc = json.load(f)
    texts = doc.get("texts")
    if not isinstance(texts, list) or not texts:
        die("ocr_eval_labels.json: no 'texts' list")
    return texts


def load_lines(ocr_dir, start, count):
    path = need_file(os.path.join(ocr_dir, "ocr_eval.safetensors"))
    header, _ = sc.st_header(path)
    if "rec_images" not in header:
        die(f"{path}: no tensor 'rec_images'")
    total = header["rec_images"]["shape"][0]
    if start < 0 or start + count > total:
        die(f"lines [{start}, {start + count}) out of the {total} rendered lines")
    rows = sc.st_read_rows(path, "rec_images", start, count)
    return [np.ascontiguousarray(rows[i:i + 1], dtype="<f4") for i in range(count)]


def ctc_greedy(probs, keys):
    """probs: [1, T, C] (or [T, C]); returns the decoded string."""
    p = np.asarray(probs)
    p = p.reshape(-1, p.shape[-1])
    out, last = [], -1
    for c in p.argmax(axis=-1).tolist():
        if c != last and c != 0 and c <= len(keys):
            out.append(keys[c - 1])
        last = c
    return "".join(out)


def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        ai = a[i - 1]
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ai != b[j - 1]))
        prev = cur
    return prev[len(b)]


# ----------------------------------------------------------------------------------------------
# OIP client
# ----------------------------------------------------------------------------------------------

class Oip:
    def __init__(self, address):
        self.p = sc.Protos.load()
        try:
            self.client = sc.Client(address, token=None, protos=self.p)
        except Exception as e:  # noqa: BLE001 - grpc future timeout
            die(f"cannot connect to {address}: {e!r}")
        self.inf = self.p.inf
        self.stub = self.client.inference

    def metadata(self, name):
        try:
            return self.stub.ModelMetadata(self.inf.ModelMetadataRequest(name=name), timeout=30)
        except sc.grpc.RpcError as e:
            die(f"ModelMetadata({name}): {sc.rpc_desc(e)}")

    def request(self, name, input_name, image, req_id):
        req = self.inf.ModelInferRequest(model_name=name, id=req_id)
        req.inputs.add(name=input_name, datatype="FP32", shape=list(image.shape))
        req.outputs.add(name="output__0")
        req.raw_input_contents.append(image.tobytes())
        return req

    def infer(self, req):
        """(output array, seconds): one ModelInfer round trip, timed on the client."""
        t0 = time.perf_counter()
        try:
            resp = self.stub.ModelInfer(req, timeout=120)
        except sc.grpc.RpcError as e:
            die(f"ModelInfer({req.model_name}, id {req.id}): {sc.rpc_desc(e)}")
        dt = time.perf_counter() - t0
        if resp.id != req.id:
            die(f"ModelInfer({req.model_name}): response id {resp.id!r} != request id {req.id!r}")
        out, _ = self.client.infer_output(resp)
        return out, dt


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------

def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path}: {e}")


def job_row(path):
    """Row description from a `fpxint --json quantize --wait` document."""
    job = load_json(path)
    if job.get("state") != "SUCCEEDED":
        die(f"{path}: job {job.get('id')} is {job.get('state')} ({job.get('error')!r})")
    spec, report = job.get("spec", {}), job.get("report", {})
    deployed = report.get("deployed_name")
    if not deployed:
        die(f"{path}: job {job.get('id')} was not deployed (report.deployed_name is empty)")
    packed = [a for a in job.get("artifacts", []) if a.get("kind") == "packed_safetensors"]
    if len(packed) != 1:
        die(f"{path}: job {job.get('id')} has {len(packed)} packed_safetensors artifacts")
    kw, ka = int(spec.get("weight_terms", 0)), int(spec.get("act_terms", 0))
    probe = [p for p in report.get("probe", [])
             if int(p.get("weight_terms", 0)) == kw and int(p.get("act_terms", 0)) == ka]
    # An error budget: each layer has its own K; the column shows their range.
    kw_text = str(kw)
    if report.get("allocation"):
        ks = [int(l.get("weight_terms", 0)) for l in report.get("layers", [])]
        if ks:
            kw_text = f"{min(ks)}-{max(ks)}" if min(ks) != max(ks) else str(ks[0])
    return {
        "kw_text": kw_text,
        "name": deployed,
        "version": report.get("deployed_version", ""),
        "bits": int(spec.get("weight_bits", 0)),
        "act_bits": int(spec.get("act_bits", 0)),
        "kw": kw,
        "ka": ka,
        "size": int(packed[0]["size_bytes"]),
        "ratio": float(report.get("compression_ratio", 0)),
        "probe": float(probe[-1]["rel_fro"]) if probe else None,
        "job": job.get("id"),
    }


def cmd_table(a):
    keys = load_keys(a.ocr_dir)
    texts = load_texts(a.ocr_dir)
    n = min(a.limit, len(texts))
    if n <= 0:
        die("--limit must be positive")
    images = load_lines(a.ocr_dir, 0, n)
    upload = load_json(a.fp_upload)
    file_size = int(upload.get("size_bytes", 0))
    if file_size <= 0:
        die(f"{a.fp_upload}: no size_bytes")
    jobs = [dict(job_row(p), fp=False) for p in a.job]
    # The jobs' compression_ratio is the server's: FP32 bytes of the weights / packed artifact.
    # The FP32 row shows those FP32 weights (the same for every job: the same layers).
    fp_weights = [j["size"] * j["ratio"] for j in jobs if j["ratio"] > 0]
    if len(fp_weights) != len(jobs) or not jobs:
        die("a job has no report.compression_ratio")
    if max(fp_weights) - min(fp_weights) > 0.001 * max(fp_weights):
        die(f"the jobs disagree on the FP32 weight bytes: {[round(x) for x in fp_weights]}")
    fp_size = int(round(fp_weights[0]))
    rows = [{"name": a.fp, "version": "", "bits": 32, "act_bits": 0, "kw": 1, "ka": 0,
             "size": fp_size, "ratio": 1.0, "probe": None, "job": None, "fp": True}] + jobs

    oip = Oip(a.server)
    for r in rows:
        meta = oip.metadata(r["name"])
        if len(meta.inputs) != 1:
            die(f"{r['name']}: expected one input, metadata lists {len(meta.inputs)}")
        r["input"] = meta.inputs[0].name
        r["platform"] = meta.platform
        r["decoded"], r["lat"], r["edits"] = [], [], 0
        # warm-up (first requests allocate), not counted
        for w in range(a.warmup):
            oip.infer(oip.request(r["name"], r["input"], images[w % n], f"warmup-{w}"))

    print(f"reading {n} rendered test lines through ModelInfer on {a.server}, "
          f"{len(rows)} models interleaved, one request at a time ...", flush=True)
    chars = 0
    t_all = time.monotonic()
    for i in range(n):
        truth = texts[i]
        chars += len(truth)
        for r in rows:
            out, dt = oip.infer(oip.request(r["name"], r["input"], images[i], f"line-{i}"))
            text = ctc_greedy(out, keys)
            r["decoded"].append(text)
            r["lat"].append(dt)
            r["edits"] += edit_distance(text, truth)
        if (i + 1) % 25 == 0 or i + 1 == n:
            print(f"  {i + 1}/{n} lines  ({time.monotonic() - t_all:.1f} s)", flush=True)

    fp = rows[0]
    fp_p50 = statistics.median(fp["lat"])
    for r in rows:
        r["acc"] = 100.0 * (1.0 - r["edits"] / max(1, chars))
        r["exact"] = sum(1 for d, t in zip(r["decoded"], texts) if d == t)
        r["p50"] = statistics.median(r["lat"]) * 1e3
        r["mean"] = statistics.fmean(r["lat"]) * 1e3
        r["vs_fp"] = statistics.median(r["lat"]) / fp_p50

    def label(r):
        return f"{r['name']} (FP32)" if r["fp"] else r["name"]

    def bits(r):
        if r["fp"]:
            return "32"
        return f"{r['bits']}" if r["ka"] == 0 else f"{r['bits']}/{r['act_bits']}"

    w = max(len(label(r)) for r in rows)
    print()
    print(f"PaddleOCR PP-OCRv4 recognizer, {n} rendered Brown-corpus lines ({chars} characters), "
          "served by fpxint-server")
    head = (f"{'model':<{w}}  {'b (w/a)':>7}  {'K_w':>3}  {'K_a':>3}  {'size MB':>7}  {'smaller':>7}  "
            f"{'probe err':>9}  {'char acc %':>10}  {'lines ok':>8}  {'p50 ms':>7}  {'mean ms':>7}  "
            f"{'vs FP':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        kw = "-" if r["fp"] else r["kw_text"]
        ka = "-" if r["fp"] or r["ka"] == 0 else str(r["ka"])
        probe = "-" if r["probe"] is None else f"{r['probe']:.3f}"
        print(f"{label(r):<{w}}  {bits(r):>7}  {kw:>3}  {ka:>3}  {r['size'] / MB:>7.2f}  "
              f"{r['ratio']:>6.2f}x  {probe:>9}  {r['acc']:>10.2f}  "
              f"{r['exact']:>4}/{n:<3}  {r['p50']:>7.1f}  {r['mean']:>7.1f}  {r['vs_fp']:>4.2f}x")
    print()
    print("no calibration data, no fine-tuning: the terms come from the weights alone; activation")
    print("terms (K_a) are computed from each input at run time.")
    notes = (
        "size: the job's packed_safetensors artifact (low-bit codes + per-channel scales); the "
        "FP32 row is the FP32 weights the server compares it with (report.compression_ratio, "
        f"'smaller'); the uploaded TorchScript file is {file_size / MB:.2f} MB; MB = 2^20 bytes. "
        "probe err: the job's relative output error against FP on a data-free N(0,1) input. "
        "char acc = 1 - sum(edit distance) / sum(characters) after greedy CTC decoding "
        "(fpxint-eval's ocr_rec metric); lines ok = lines read exactly. "
        "Latency: client wall time of one ModelInfer (batch 1, loopback gRPC), 'vs FP' = ratio of "
        "the p50s; the quantized models are served on the packed low-bit ops (weights stay packed "
        "in memory, K*b/32 of FP32; docs/SERVICE.md \"Serving quantized models\"): weight-only, "
        "their fp32 arithmetic on the packed codes runs faster than LibTorch's on FP32 weights; "
        "with expanded activations (K_a) folded, each 1x1 convolution and linear layer runs its "
        "K_w*K_a term products as one u8 x s8 integer product (docs/BENCHMARKS.md).")
    print(textwrap.fill(notes, width=len(head)))

    # One line that makes the point: FP and W4x2 read it, W4x1 does not.
    low = [r for r in rows if not r["fp"] and r["kw"] == 1]
    good = [r for r in rows if not r["fp"] and r["kw"] >= 2 and r["ka"] == 0]
    pick = 0
    for i in range(n):
        if fp["decoded"][i] == texts[i] and all(r["decoded"][i] == texts[i] for r in good) \
                and all(r["decoded"][i] != texts[i] for r in low):
            pick = i
            break
    print()
    print(f"sample: line {pick}")
    lw = max(w, len("ground truth"))
    print(f"  {'ground truth':<{lw}}  {texts[pick]!r}")
    for r in rows:
        d = r["decoded"][pick]
        note = "" if d else "   (empty: every frame decodes to the CTC blank)"
        print(f"  {label(r):<{lw}}  {d!r}{note}")
    if a.json_out:
        doc = {"lines": n, "characters": chars, "server": a.server, "sample_line": pick,
               "rows": [{k: v for k, v in r.items() if k not in ("decoded", "lat")} for r in rows]}
        with open(a.json_out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)


def cmd_write_line(a):
    img = load_lines(a.ocr_dir, a.line, 1)[0]
    np.save(a.out, img)
    texts = load_texts(a.ocr_dir)
    print(f"line {a.line}: {texts[a.line]!r} -> {a.out} (FP32 {list(img.shape)})")


def cmd_decode(a):
    keys = load_keys(a.ocr_dir)
    out = np.load(a.logits)
    text = ctc_greedy(out, keys)
    msg = f"decoded {list(out.shape)}: {text!r}"
    if a.line is not None:
        truth = load_texts(a.ocr_dir)[a.line]
        msg += f"  (ground truth {truth!r}, {edit_distance(text, truth)} edits)"
    print(msg)


def main():
    try:
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")
    except AttributeError:
        pass
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="run the rendered lines through every served model")
    t.add_argument("--server", required=True, help="fpxint-server HOST:PORT")
    t.add_argument("--ocr-dir", required=True, help="models/ocr directory")
    t.add_argument("--fp", required=True, help="served name of the FP32 model")
    t.add_argument("--fp-upload", required=True, help="`fpxint --json upload` document of it")
    t.add_argument("--job", action="append", default=[], help="`fpxint --json quantize --wait` document")
    t.add_argument("--limit", type=int, default=100, help="lines to read (default 100)")
    t.add_argument("--warmup", type=int, default=2, help="uncounted requests per model first")
    t.add_argument("--json-out", help="also write the numbers here")
    t.set_defaults(fn=cmd_table)
    w = sub.add_parser("write-line", help="save one rendered line as .npy")
    w.add_argument("--ocr-dir", required=True)
    w.add_argument("--line", type=int, default=0)
    w.add_argument("out")
    w.set_defaults(fn=cmd_write_line)
    d = sub.add_parser("decode", help="CTC-decode saved recognizer outputs (.npy)")
    d.add_argument("--ocr-dir", required=True)
    d.add_argument("--line", type=int)
    d.add_argument("logits")
    d.set_defaults(fn=cmd_decode)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
