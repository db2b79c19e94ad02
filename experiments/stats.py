"""Significance tests of the paper (section 5.1), from the per-case CSV files; never imports TensorFlow.

Registration (``--registration``, one row per image pair and method: ``pair_id``, ``method`` and
metric columns such as ``lncc_affine``, ``lncc_deformable``, ``dice_affine``, ``dice_deformable``,
``folding_percent``): for every metric and every method other than the reference (``--reference``,
default ``SPIRS``), a two-sided **Wilcoxon signed-rank test** of reference vs method, **paired by
``pair_id``** (pairs where either value is missing/NaN are dropped; zero differences are dropped
before ranking; :func:`spirs_tf.stats.wilcoxon_paired`). All these tests form **one family,
Holm-corrected** (:func:`spirs_tf.stats.holm`); raw and Holm-adjusted p are both reported.

Detection (``--lesions``, the per-lesion CSV of ``experiments/segmentation_table.py``): per size bin,
an **exact McNemar test** of ``--methods`` A vs B (default P1 vs P2) detections, **paired by
(exam, lesion id)** (:func:`spirs_tf.stats.mcnemar_exact`). The four bins form a second family,
**Holm-corrected** separately.

Prints a summary and writes JSON (``--out``): NaN → ``null``, ±inf → ``"inf"``/``"-inf"``.

Usage::

    python experiments/stats.py --registration registration.csv --lesions lesions.csv --out stats.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

import numpy as np

from spirs_tf.atomic import atomic_path
from spirs_tf.errors import SpirsInputError
from spirs_tf.stats import (BIN_NAMES, holm, mcnemar_exact, median_iqr, paired_detections,
                            parse_float, read_csv, read_lesion_csv, wilcoxon_paired)

#: Columns of the registration CSV that are never metrics.
ID_COLUMNS = {"pair_id", "method", "patient", "patient_id", "exam_id", "fixed", "moving", "prior",
              "new", "timepoint", "fixed_timepoint", "moving_timepoint", "split", "_line"}
WILCOXON_FAMILY = "Holm over all (metric, method) Wilcoxon tests of the registration table"
MCNEMAR_FAMILY = "Holm over the size bins' McNemar tests"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def registration_tests(path: str, reference: str = "SPIRS", metrics: Sequence[str] | None = None) -> dict:
    """Wilcoxon tests of ``reference`` vs every other method for each metric, Holm-corrected."""
    rows = read_csv(path, ["pair_id", "method"])
    header = [c for c in rows[0] if c not in ID_COLUMNS]
    if metrics:
        unknown = [m for m in metrics if m not in header]
        if unknown:
            raise SpirsInputError(f"no metric column(s) {', '.join(unknown)}", path)
    else:       # every non-identifier column whose non-empty cells are all numbers
        metrics = [c for c in header if all(r[c] == "" or _is_number(r[c]) for r in rows)]
        if not metrics:
            raise SpirsInputError("no numeric metric columns", path)
    values: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        key = (r["method"], r["pair_id"])
        if key in values:
            raise SpirsInputError(f"line {r['_line']}: pair {r['pair_id']!r} appears twice for method "
                                  f"{r['method']!r}", path)
        values[key] = {m: parse_float(r, m, path) for m in metrics}
    methods = sorted({m for m, _ in values})
    if reference not in methods:
        raise SpirsInputError(f"reference method {reference!r} not found (methods: {', '.join(methods)})", path)
    tests = []
    for metric in metrics:
        for other in (m for m in methods if m != reference):
            pairs = sorted(p for m, p in values if m == reference and (other, p) in values)
            a = np.array([values[(reference, p)][metric] for p in pairs], dtype=float)
            b = np.array([values[(other, p)][metric] for p in pairs], dtype=float)
            res = wilcoxon_paired(a, b)
            ok = ~(np.isnan(a) | np.isnan(b))
            tests.append({"metric": metric, "reference": reference, "method": other, "n": res.n,
                          "n_nonzero": res.n_nonzero, "statistic": res.statistic, "p": res.pvalue,
                          "median_difference": res.median_difference,
                          "median_reference": median_iqr(a[ok])[0], "median_method": median_iqr(b[ok])[0]})
    for t, p_adj in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = float(p_adj)
    return {"test": "Wilcoxon signed-rank, two-sided, paired by pair_id (zero differences dropped)",
            "correction": WILCOXON_FAMILY, "reference": reference, "tests": tests}


def detection_tests(path: str, methods: Sequence[str] = ("P1", "P2")) -> dict:
    """Exact McNemar tests of detection per size bin (A = methods[0], B = methods[1]), Holm-corrected."""
    records = read_lesion_csv(path)
    present = {r.method for r in records}
    missing = [m for m in methods[:2] if m not in present]
    if missing:
        raise SpirsInputError(f"no rows for method(s) {', '.join(missing)}", path)
    tests = []
    for bin_name in BIN_NAMES:
        det_a, det_b = paired_detections(records, methods[0], methods[1], bin_name)
        res = mcnemar_exact(det_a, det_b) if det_a.size else None
        tests.append({"size_bin": bin_name, "n": int(det_a.size),
                      "table": res.table.tolist() if res else None,
                      "detected_a": int(det_a.sum()), "detected_b": int(det_b.sum()),
                      "a_only": int(res.table[0, 1]) if res else 0, "b_only": int(res.table[1, 0]) if res else 0,
                      "statistic": res.statistic if res else math.nan, "p": res.pvalue if res else math.nan})
    for t, p_adj in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = float(p_adj)
    return {"test": "exact McNemar (binomial on discordant pairs), paired by (exam, lesion_id)",
            "correction": MCNEMAR_FAMILY, "method_a": methods[0], "method_b": methods[1], "tests": tests}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return None if math.isnan(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _p(p: float) -> str:
    return "nan" if math.isnan(p) else ("<1e-4" if p < 1e-4 else f"{p:.4g}")


def summary(result: dict) -> str:
    lines = []
    if "registration" in result:
        reg = result["registration"]
        lines.append(f"Registration: {reg['test']}; {reg['correction']}.")
        for t in reg["tests"]:
            lines.append(f"  {t['metric']:<24} {t['reference']} vs {t['method']:<10} n={t['n']:<4} "
                         f"median diff={t['median_difference']:.4g}  p={_p(t['p'])}  p_holm={_p(t['p_holm'])}")
    if "detection" in result:
        det = result["detection"]
        lines.append(f"Detection {det['method_a']} vs {det['method_b']}: {det['test']}; {det['correction']}.")
        for t in det["tests"]:
            lines.append(f"  {t['size_bin']:<7} n={t['n']:<5} {det['method_a']} only={t['a_only']:<4} "
                         f"{det['method_b']} only={t['b_only']:<4} p={_p(t['p'])}  p_holm={_p(t['p_holm'])}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registration", help="per-pair registration CSV (pair_id, method, metrics...)")
    parser.add_argument("--lesions", help="per-lesion CSV (see experiments/segmentation_table.py)")
    parser.add_argument("--reference", default="SPIRS", help="method compared against all others")
    parser.add_argument("--metrics", nargs="+", help="metric columns to test (default: all numeric)")
    parser.add_argument("--methods", nargs=2, default=["P1", "P2"], metavar=("A", "B"),
                        help="the two segmentation methods for McNemar (default P1 P2)")
    parser.add_argument("--out", help="output JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.registration and not args.lesions:
        parser.error("give --registration and/or --lesions")
    result = {}
    try:
        if args.registration:
            result["registration"] = registration_tests(args.registration, args.reference, args.metrics)
        if args.lesions:
            result["detection"] = detection_tests(args.lesions, args.methods)
        if args.out:
            inputs = tuple(p for p in (args.registration, args.lesions) if p)
            with atomic_path(args.out, protect=inputs) as tmp:
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(_jsonable(result), fh, indent=2, allow_nan=False)
                    fh.write("\n")
    except SpirsInputError as exc:
        print(f"stats: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
