#!/usr/bin/python3
"""The paper's claim on real pretrained networks (docs/ALGORITHM.md §7, C11, issue "Layer and model expansion"):
a few 4-bit terms give FP accuracy where one 4-bit term (plain round-to-nearest) collapses, with
no calibration data.

Runs build/bin/fpxint-eval --json on the real models and data of scripts/fetch_models.sh and
checks the numbers it reports. One task per test method (ctest runs them as separate tests via
argv: test_eval_accuracy.py TASK). Fails loudly when the models are missing.

Environment: FPXINT_EVAL_BIN (the fpxint-eval binary), FPXINT_MODELS_DIR.
"""
import json
import os
import subprocess
import sys
import unittest

BIN = os.environ.get("FPXINT_EVAL_BIN", "")
MODELS = os.environ.get("FPXINT_MODELS_DIR", "")


def run_eval(task, configs, extra=()):
    cmd = [BIN, task, "--json", "--models-dir", MODELS, "-c", ",".join(configs), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr}")
    doc = json.loads(p.stdout)
    (t,) = doc["tasks"]
    assert t["task"] == task and t["calibration_data"] == "none", t
    return {r["config"]: r for r in t["results"]}, p.stderr


class Accuracy(unittest.TestCase):
    def setUp(self):
        self.assertTrue(os.access(BIN, os.X_OK), f"FPXINT_EVAL_BIN={BIN!r} is not executable")
        self.assertTrue(os.path.isdir(MODELS), f"FPXINT_MODELS_DIR={MODELS!r} is missing: run "
                        "scripts/fetch_models.sh (make test does)")

    def test_ocr_rec(self):
        r, table = run_eval("ocr_rec", ["fp", "rtn4", "w4x1", "w4x2", "w4x3", "w2x4-mid", "w4a4x2"])
        print(table, file=sys.stderr)
        fp = r["fp"]["char_acc"]
        self.assertGreater(fp, 99.0, "the converted FP recognizer reads the rendered lines")
        self.assertEqual(r["fp"]["samples"], 320)
        # Plain RTN at 4 bits collapses; K=1 is bit-for-bit that RTN.
        self.assertLess(r["rtn4"]["char_acc"], 5.0)
        self.assertEqual(r["w4x1"]["weights_sha256"], r["rtn4"]["weights_sha256"])
        self.assertEqual(r["w4x1"]["char_acc"], r["rtn4"]["char_acc"])
        # A few 4-bit terms give FP accuracy.
        self.assertGreaterEqual(r["w4x2"]["char_acc"], fp - 0.3)
        self.assertGreaterEqual(r["w4x3"]["char_acc"], fp - 0.1)
        self.assertGreaterEqual(r["w2x4-mid"]["char_acc"], fp - 0.5)
        self.assertGreaterEqual(r["w4a4x2"]["char_acc"], fp - 0.5)
        # Non-decreasing in K up to noise (3 of the 5560 characters: near FP a term can fix or
        # flip a character either way), and the output error falls with every term.
        noise = 3 * 100.0 / 5560
        self.assertGreaterEqual(r["w4x2"]["char_acc"], r["w4x1"]["char_acc"] - noise)
        self.assertGreaterEqual(r["w4x3"]["char_acc"], r["w4x2"]["char_acc"] - noise)
        e1, e2, e3 = (r[c]["output_rel_err"] for c in ("w4x1", "w4x2", "w4x3"))
        self.assertLess(e2, 0.5 * e1)
        self.assertLess(e3, 0.25 * e2)
        w1, w2, w3 = (r[c]["weight_rel_fro"] for c in ("w4x1", "w4x2", "w4x3"))
        for a, b in ((w1, w2), (w2, w3)):
            self.assertAlmostEqual(b / a, 1 / 14, delta=0.4 / 14)  # sym b=4: r = 1/(2*7)

    def test_ocr_cls(self):
        r, table = run_eval("ocr_cls", ["fp", "rtn4", "w4x2", "w4a4x2"])
        print(table, file=sys.stderr)
        fp = r["fp"]["accuracy"]
        self.assertEqual(r["fp"]["samples"], 640)  # 320 lines, both orientations
        self.assertGreater(fp, 95.0)
        self.assertGreaterEqual(r["w4x2"]["accuracy"], fp - 0.3)
        self.assertGreaterEqual(r["w4a4x2"]["accuracy"], fp - 0.3)
        # C10: the expansion is deterministic across processes.
        again, _ = run_eval("ocr_cls", ["w4x2"], ["--limit", "1"])
        self.assertEqual(again["w4x2"]["weights_sha256"], r["w4x2"]["weights_sha256"])

    def check_packed_matches(self, task, metric, configs, limit, wa_configs=(), noise=0.0):
        """The packed low-bit ops give the model layer's accuracy at the same b, K: on
        the default schedule (packed kernels for few rows, a transient fp32 copy for convolutions
        over many pixels) and with the packed kernels forced on every layer. W×A configs run on
        the integer ops (exact int32 products, float epilogue): the same accuracy up to `noise`,
        and an output error of the same size (within 2x). Not equal: a float-rounding difference in a
        layer's output moves some values of the next layer's activation expansion across a
        rounding boundary, which changes them by a quantization step; measured on the classifier,
        the two implementations' outputs differ by as much as each differs from FP (both
        ~1e-7 on its saturated outputs). model.lowbit_ops checks the W×A ops within 1e-4 of the
        model layer on a network where no such flip occurs."""
        extra = ["--limit", str(limit)]
        ref, _ = run_eval(task, ["fp", *configs, *wa_configs], extra)
        for forced in ([], ["--packed-max-rows", "1000000000"]):
            got, table = run_eval(task, ["fp", *configs, *wa_configs], ["--packed", *forced, *extra])
            print(table, file=sys.stderr)
            for c in wa_configs:
                self.assertLessEqual(abs(got[c][metric] - ref[c][metric]), noise, c)
                # Same size (within 2x either way): on the classifier's saturated outputs the
                # error is a few images' worth and moves by tens of percent with such flips.
                self.assertLess(got[c]["output_rel_err"], 2 * ref[c]["output_rel_err"] + 1e-5, c)
                self.assertGreater(got[c]["output_rel_err"], 0.5 * ref[c]["output_rel_err"], c)
            for c in configs:
                self.assertEqual(got[c]["samples"], ref[c]["samples"])
                self.assertEqual(got[c][metric], ref[c][metric], f"{c} {forced}")
                self.assertEqual(got[c]["weights_sha256"], ref[c]["weights_sha256"])
                # fp32 paths agree to float rounding, far below the expansion's own error.
                self.assertAlmostEqual(got[c]["output_rel_err"], ref[c]["output_rel_err"],
                                       delta=1e-4 * ref[c]["output_rel_err"] + 1e-6)

    def test_ocr_rec_packed(self):
        self.check_packed_matches("ocr_rec", "char_acc", ["w4x1", "w4x2", "w2x4-mid"], 40,
                                  wa_configs=["w4a4x2"], noise=2 * 100.0 / 700)

    def test_ocr_cls_packed(self):
        self.check_packed_matches("ocr_cls", "accuracy", ["w4x1", "w4x2"], 200,
                                  wa_configs=["w4a4x2"], noise=100.0 / 200)

    def test_fmnist(self):
        # Also: K_a apart from K_w inside the comma-separated list (w4a4x4,2-...), an error
        # budget on a W×A config, and folded W4A4×2 (variant D on both sides).
        budget = "w4a4x4,2-t0.05"
        r, table = run_eval("fmnist", ["fp", "rtn4", "w4x1", "w4a4x2", budget,
                                       "w4a4x2-mid-digits-adigits"])
        print(table, file=sys.stderr)
        fp = r["fp"]["accuracy"]
        self.assertEqual(r["fp"]["samples"], 10000)
        self.assertGreater(fp, 85.0)
        self.assertEqual(r["w4x1"]["weights_sha256"], r["rtn4"]["weights_sha256"])
        self.assertGreaterEqual(r["w4a4x2"]["accuracy"], fp - 0.3)
        self.assertEqual((r[budget]["weight_terms"], r[budget]["act_terms"]), (4, 2))
        self.assertLessEqual(r[budget]["probe_rel_error"], 0.05)
        self.assertGreaterEqual(r[budget]["accuracy"], fp - 0.5)
        self.assertGreaterEqual(r["w4a4x2-mid-digits-adigits"]["accuracy"], fp - 0.5)

    def test_charlm(self):
        r, table = run_eval("charlm", ["fp", "w4x1", "w4x2", "w4a4x2"])
        print(table, file=sys.stderr)
        fp = r["fp"]["perplexity"]
        self.assertLess(fp, 8.0, "the LM fixture learned something (unigram is ~20)")
        self.assertLessEqual(r["w4x2"]["perplexity"], fp * 1.01)
        self.assertLess(r["w4x2"]["output_rel_err"], r["w4x1"]["output_rel_err"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        sys.argv[1] = "Accuracy.test_" + sys.argv[1]
    unittest.main(verbosity=2)
