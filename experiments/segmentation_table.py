"""Table 1 of the paper: lesion-wise DSC, HD95 and sensitivity per lesion-size bin, P1 vs P2.

Reads the per-lesion CSV written by the evaluation (one row per ground-truth lesion and method;
columns ``pair_id`` and/or ``patient``/``patient_id``/``exam_id``, ``lesion_id``, ``volume_mm3``,
``size_bin`` (optional, recomputed from the volume when absent), ``method``, ``detected``, ``dice``,
``hd95``) and writes, per size bin (micro < 25 ≤ small < 125 ≤ medium < 1000 ≤ large mm³, plus
``all``) and method:

* median DSC with IQR (25th–75th percentile) over the bin's lesions, missed lesions counting DSC 0;
* median HD95 (mm) with IQR, missed lesions counting ``inf`` (so a median can be ``inf``, as in the
  paper's micro row);
* sensitivity = detected / lesions in %, with the exact Clopper–Pearson 95% CI
  (:func:`spirs_tf.stats.binomial_ci`);
* McNemar's exact test of P1 vs P2 detection (:func:`spirs_tf.stats.mcnemar_exact`), paired by
  (exam, lesion id) over the lesions scored by both methods; no multiple-comparison correction in
  this table (``experiments/stats.py`` reports Holm-adjusted values over the four bins).

Outputs: a CSV (``--out``), and a Markdown table on stdout (and in ``--markdown`` if given).
Never imports TensorFlow.

Usage::

    python experiments/segmentation_table.py lesions.csv --out table1.csv --markdown table1.md
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from typing import Sequence

from spirs_tf.atomic import atomic_path
from spirs_tf.errors import SpirsInputError
from spirs_tf.stats import (BIN_NAMES, LesionRecord, binomial_ci, mcnemar_exact, median_iqr,
                            paired_detections, read_lesion_csv)

COLUMNS = ("size_bin", "method", "n_lesions", "n_detected", "dsc_median", "dsc_q1", "dsc_q3",
           "hd95_median", "hd95_q1", "hd95_q3", "sensitivity_pct", "sensitivity_ci_low_pct",
           "sensitivity_ci_high_pct", "mcnemar_n", "mcnemar_a_only", "mcnemar_b_only",
           "mcnemar_statistic", "mcnemar_p")


def build_table(records: Sequence[LesionRecord], methods: Sequence[str] = ("P1", "P2"),
                level: float = 0.95) -> list[dict]:
    """Rows of Table 1: one per (size bin, method), bins in size order then ``all``.

    McNemar columns compare ``methods[0]`` (a) with ``methods[1]`` (b) and repeat on both rows of a
    bin; they are NaN when fewer than two methods are given or no lesion is paired.
    """
    rows = []
    for bin_name in BIN_NAMES + ("all",):
        in_bin = [r for r in records if bin_name in ("all", r.size_bin)]
        if len(methods) >= 2:
            det_a, det_b = paired_detections(records, methods[0], methods[1],
                                             None if bin_name == "all" else bin_name)
            test = mcnemar_exact(det_a, det_b) if det_a.size else None
        else:
            test = None
        for method in methods:
            mine = [r for r in in_bin if r.method == method]
            n, k = len(mine), sum(r.detected for r in mine)
            dsc = median_iqr([r.dice for r in mine])
            hd = median_iqr([r.hd95 for r in mine])
            low, high = binomial_ci(k, n, level)
            rows.append({
                "size_bin": bin_name, "method": method, "n_lesions": n, "n_detected": k,
                "dsc_median": dsc[0], "dsc_q1": dsc[1], "dsc_q3": dsc[2],
                "hd95_median": hd[0], "hd95_q1": hd[1], "hd95_q3": hd[2],
                "sensitivity_pct": 100.0 * k / n if n else math.nan,
                "sensitivity_ci_low_pct": 100.0 * low, "sensitivity_ci_high_pct": 100.0 * high,
                "mcnemar_n": test.n if test else 0,
                "mcnemar_a_only": int(test.table[0, 1]) if test else 0,
                "mcnemar_b_only": int(test.table[1, 0]) if test else 0,
                "mcnemar_statistic": test.statistic if test else math.nan,
                "mcnemar_p": test.pvalue if test else math.nan,
            })
    return rows


def _num(x: float, digits: int = 2) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def format_p(p: float) -> str:
    """``<0.0001`` below 1e-4, else four decimals; ``–`` when not computed."""
    if math.isnan(p):
        return "–"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def to_markdown(rows: Sequence[dict], level: float = 0.95) -> str:
    """Markdown rendering in the layout of the paper's Table 1."""
    pct = f"{round(100 * level)}%"
    lines = [f"| Lesion size | Method | n | DSC median (IQR) | HD95 mm median (IQR) | "
             f"Sensitivity % ({pct} CI) | McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["n_lesions"] == 0:
            lines.append(f"| {r['size_bin']} | {r['method']} | 0 | – | – | – | – |")
            continue
        sens = (f"{_num(r['sensitivity_pct'], 0)} ({_num(r['sensitivity_ci_low_pct'], 0)}–"
                f"{_num(r['sensitivity_ci_high_pct'], 0)})")
        lines.append(
            f"| {r['size_bin']} | {r['method']} | {r['n_lesions']} | "
            f"{_num(r['dsc_median'])} ({_num(r['dsc_q1'])}–{_num(r['dsc_q3'])}) | "
            f"{_num(r['hd95_median'])} ({_num(r['hd95_q1'])}–{_num(r['hd95_q3'])}) | {sens} | "
            f"{format_p(r['mcnemar_p'])} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict]) -> str:
    """CSV text with :data:`COLUMNS`; floats at full precision (``inf``/``nan`` spelled out)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()


def _write(path: str, text: str, protect: tuple) -> None:
    with atomic_path(path, protect=protect) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lesions", help="per-lesion CSV (one row per ground-truth lesion and method)")
    parser.add_argument("--out", help="output CSV for the table")
    parser.add_argument("--markdown", help="also write the Markdown table to this file")
    parser.add_argument("--methods", nargs="+", default=["P1", "P2"],
                        help="methods in table order; McNemar compares the first two (default P1 P2)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the CI")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = read_lesion_csv(args.lesions)
        present = {r.method for r in records}
        missing = [m for m in args.methods if m not in present]
        if missing:
            raise SpirsInputError(f"no rows for method(s) {', '.join(missing)} "
                                  f"(found: {', '.join(sorted(present))})", args.lesions)
        rows = build_table(records, args.methods, args.level)
        markdown = to_markdown(rows, args.level)
        if args.out:
            _write(args.out, to_csv(rows), (args.lesions,))
        if args.markdown:
            _write(args.markdown, markdown, (args.lesions,))
    except SpirsInputError as exc:
        print(f"segmentation_table: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
