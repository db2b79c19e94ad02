"""Statistics for the paper's comparisons (SciPy/statsmodels only; never imports TensorFlow or Keras).

The paper (section 5.1) compares registration methods with the Wilcoxon signed-rank test on paired
per-pair metrics, and P1 vs P2 lesion detection with McNemar's test on paired detections; Table 1
reports medians with IQRs and sensitivities with exact 95% confidence intervals. Each function
below states its test, its pairing and any correction. The reading helpers at the end turn the
per-lesion CSV written by the evaluation into typed records (bad files raise
:class:`~spirs_tf.errors.SpirsInputError`).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats as _scipy_stats
from statsmodels.stats.contingency_tables import mcnemar as _sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from spirs_tf.errors import SpirsInputError
from spirs_tf.metrics import SIZE_BINS, size_bin


class WilcoxonResult(NamedTuple):
    statistic: float          # min(W+, W−) over the non-zero differences (scipy's two-sided statistic)
    pvalue: float
    n: int                    # pairs used (both values present, i.e. not NaN)
    n_nonzero: int            # pairs with a non-zero difference (those that enter the ranks)
    median_difference: float  # median of a − b over the n pairs


class McNemarResult(NamedTuple):
    table: np.ndarray         # 2×2 int: [[both, a only], [b only, neither]]
    statistic: float          # min(b, c), the exact test's binomial statistic
    pvalue: float
    n: int                    # pairs


def wilcoxon_paired(a: Sequence[float], b: Sequence[float]) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of paired samples ``a[i]`` vs ``b[i]``.

    Test: ``scipy.stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided",
    method="auto")`` -- differences ``a − b``, zero differences dropped before ranking, exact null
    distribution for small samples without ties (scipy's ``"auto"``), normal approximation
    otherwise. Pairing: element ``i`` of ``a`` with element ``i`` of ``b`` (the same image pair);
    a pair where either value is NaN is dropped. No multiple-comparison correction (use
    :func:`holm` over a family of these p-values).

    Edge cases: no pair left → statistic and p are NaN; all differences zero → statistic 0, p 1.

    Raises:
        ValueError: ``a`` and ``b`` have different lengths.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    diff = a - b
    n, n_nonzero = int(diff.size), int(np.count_nonzero(diff))
    median = float(np.median(diff)) if n else float("nan")
    if n == 0:
        return WilcoxonResult(float("nan"), float("nan"), 0, 0, median)
    if n_nonzero == 0:
        return WilcoxonResult(0.0, 1.0, n, 0, median)
    res = _scipy_stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided", method="auto")
    return WilcoxonResult(float(res.statistic), float(res.pvalue), n, n_nonzero, median)


def mcnemar_exact(detected_a: Sequence[bool], detected_b: Sequence[bool]) -> McNemarResult:
    """Exact McNemar test of paired binary outcomes (lesion detected by method A / by method B).

    Pairing: element ``i`` of both sequences is the same ground-truth lesion. The 2×2 table is
    ``[[both, A only], [B only, neither]]``; the test uses only the discordant counts ``b = A only``
    and ``c = B only``: under H0 ``b ~ Binomial(b + c, 1/2)``, two-sided
    ``p = min(1, 2·P(X ≤ min(b, c)))`` (``statsmodels.stats.contingency_tables.mcnemar(table,
    exact=True)``). No continuity correction (exact test) and no multiple-comparison correction.
    No discordant pair → p = 1.

    Raises:
        ValueError: lengths differ.
    """
    a = np.asarray(detected_a).astype(bool).ravel()
    b = np.asarray(detected_b).astype(bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired detections must have the same length, got {a.size} and {b.size}")
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64)
    res = _sm_mcnemar(table, exact=True)
    return McNemarResult(table, float(res.statistic), float(res.pvalue), int(a.size))


def binomial_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided confidence interval for a proportion ``k / n``.

    ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=1 − level, method="beta")``:
    lower = Beta quantile ``α/2`` of ``Beta(k, n − k + 1)`` (0 when k = 0), upper = quantile
    ``1 − α/2`` of ``Beta(k + 1, n − k)`` (1 when k = n). Returns fractions in ``[0, 1]``;
    ``n = 0`` → ``(nan, nan)``.

    Raises:
        ValueError: not ``0 ≤ k ≤ n`` or level outside (0, 1).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise ValueError(f"need integers 0 <= k <= n, got k={k!r}, n={n!r}")
    if n == 0:
        return float("nan"), float("nan")
    low, high = proportion_confint(int(k), int(n), alpha=1 - level, method="beta")
    return float(low), float(high)


def _quantile(sorted_values: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile (NumPy's default) that also handles ±inf.

    Between two equal values (also two equal infinities) the result is that value; between a finite
    value and ``±inf`` with a non-zero weight it is that infinity (NumPy would give NaN for
    inf − inf); between ``−inf`` and ``+inf`` it is NaN.
    """
    h = (sorted_values.size - 1) * q
    lo, hi = int(math.floor(h)), int(math.ceil(h))
    x_lo, x_hi = float(sorted_values[lo]), float(sorted_values[hi])
    frac = h - lo
    if frac == 0 or x_lo == x_hi:
        return x_lo
    if math.isinf(x_lo) and math.isinf(x_hi):      # −inf … +inf: undefined
        return float("nan")
    if math.isinf(x_hi):                            # finite … +inf
        return x_hi
    if math.isinf(x_lo):                            # −inf … finite
        return x_lo
    return x_lo + frac * (x_hi - x_lo)


def median_iqr(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, 25th percentile, 75th percentile)``, NaN values dropped.

    Percentiles use linear interpolation between order statistics (NumPy's default). ``inf`` is a
    legitimate value (HD95 of a missed lesion): order statistics are well defined with it, so the
    median is ``inf`` as soon as the middle order statistic(s) are ``inf`` (e.g. more than half of
    the lesions missed), and interpolating between a finite value and ``inf`` gives ``inf`` (where
    NumPy returns NaN). Empty input (after dropping NaN) → ``(nan, nan, nan)``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = np.sort(v[~np.isnan(v)])
    if not v.size:
        return float("nan"), float("nan"), float("nan")
    return _quantile(v, 0.5), _quantile(v, 0.25), _quantile(v, 0.75)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values for one family of tests (same order as input).

    With the m non-NaN p-values sorted ``p(1) ≤ … ≤ p(m)``: ``p̃(i) = max_{j ≤ i} min(1, (m − j + 1)·p(j))``
    (``statsmodels.stats.multitest.multipletests(method="holm")``). Controls the family-wise error
    rate. NaN entries (tests that could not be run) stay NaN and do not count in m.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


# --------------------------------------------------------------------------------------------------
# per-case tables (CSV)
# --------------------------------------------------------------------------------------------------
#: Columns that together identify the exam a lesion belongs to (every one present is used).
EXAM_COLUMNS = ("patient_id", "patient", "pair_id", "exam_id")
BIN_NAMES = tuple(name for name, _ in SIZE_BINS)


@dataclass(frozen=True)
class LesionRecord:
    """One ground-truth lesion scored for one method (a row of the per-lesion CSV)."""

    exam: tuple[str, ...]
    lesion_id: str
    method: str
    size_bin: str
    volume_mm3: float
    detected: bool
    dice: float
    hd95: float

    @property
    def key(self) -> tuple:
        return self.exam + (self.lesion_id,)


def read_csv(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts; each dict also has ``"_line"`` (its line number).

    Raises:
        SpirsInputError: missing/unreadable file, no header, missing columns, or no data rows.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SpirsInputError("file not found", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = []
            for line, row in enumerate(reader, start=2):
                clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
                clean["_line"] = str(line)
                rows.append(clean)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SpirsInputError(f"cannot read CSV: {exc}", path) from None
    missing = [c for c in required if c not in header]
    if missing:
        raise SpirsInputError(f"missing column(s) {', '.join(missing)} (header: {', '.join(header)})", path)
    if not rows:
        raise SpirsInputError("no data rows", path)
    return rows


def parse_float(row: dict, column: str, path: str, allow_empty: bool = True) -> float:
    """Float cell (``inf``/``nan`` accepted; empty → NaN when ``allow_empty``)."""
    text = row.get(column, "")
    if text == "" and allow_empty:
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise SpirsInputError(f"line {row['_line']}: column {column!r} is not a number: {text!r}",
                              path) from None


def parse_bool(row: dict, column: str, path: str) -> bool:
    """Boolean cell: 1/0, true/false, yes/no (case-insensitive)."""
    text = row.get(column, "").lower()
    if text in ("1", "1.0", "true", "yes", "y", "t"):
        return True
    if text in ("0", "0.0", "false", "no", "n", "f"):
        return False
    raise SpirsInputError(f"line {row['_line']}: column {column!r} is not a boolean: {text!r}", path)


def read_lesion_csv(path: str | os.PathLike) -> list[LesionRecord]:
    """Read a per-lesion CSV: ``lesion_id, method, volume_mm3, detected, dice, hd95``, optional
    ``size_bin`` (computed from ``volume_mm3`` when absent) and at least one exam column of
    :data:`EXAM_COLUMNS` (``pair_id`` and/or ``patient``/``patient_id``/``exam_id``).

    Raises:
        SpirsInputError: unreadable file, missing columns, bad cells, a ``size_bin`` that disagrees
            with ``volume_mm3``, or the same (exam, lesion, method) twice.
    """
    path = os.fspath(path)
    rows = read_csv(path, ["lesion_id", "method", "volume_mm3", "detected", "dice", "hd95"])
    exam_cols = [c for c in EXAM_COLUMNS if c in rows[0]]
    if not exam_cols:
        raise SpirsInputError(f"needs an exam column, one of {', '.join(EXAM_COLUMNS)}", path)
    records, seen = [], set()
    for row in rows:
        volume = parse_float(row, "volume_mm3", path, allow_empty=False)
        if not math.isfinite(volume) or volume < 0:
            raise SpirsInputError(f"line {row['_line']}: volume_mm3 must be >= 0, got {volume}", path)
        expected = size_bin(volume)
        given = row.get("size_bin", "").lower() or expected
        if given != expected:
            raise SpirsInputError(f"line {row['_line']}: size_bin {given!r} does not match volume_mm3 "
                                  f"{volume} (expected {expected!r})", path)
        rec = LesionRecord(exam=tuple(row[c] for c in exam_cols), lesion_id=row["lesion_id"],
                           method=row["method"], size_bin=given, volume_mm3=volume,
                           detected=parse_bool(row, "detected", path), dice=parse_float(row, "dice", path),
                           hd95=parse_float(row, "hd95", path))
        if (rec.key, rec.method) in seen:
            raise SpirsInputError(f"line {row['_line']}: lesion {rec.key} appears twice for method "
                                  f"{rec.method!r}", path)
        seen.add((rec.key, rec.method))
        records.append(rec)
    return records


def paired_detections(records: Sequence[LesionRecord], method_a: str, method_b: str,
                      bin_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Detections of the lesions scored by both methods (optionally in one size bin), paired by
    (exam, lesion id), in sorted key order: ``(detected_a, detected_b)`` boolean arrays."""
    by_a = {r.key: r.detected for r in records if r.method == method_a and bin_name in (None, r.size_bin)}
    by_b = {r.key: r.detected for r in records if r.method == method_b and bin_name in (None, r.size_bin)}
    keys = sorted(set(by_a) & set(by_b))
    return (np.array([by_a[k] for k in keys], dtype=bool), np.array([by_b[k] for k in keys], dtype=bool))
