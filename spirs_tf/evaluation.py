"""Evaluation of a trained SPIRS run on a manifest split: per-pair registration metrics at every pyramid
level and per-lesion P1/P2 segmentation metrics (paper section 5.1; FACTS decision 10 and section E).

What is evaluated
-----------------
Pairs come from :class:`spirs_tf.data.PairSource`: every (prior, new) pair of the split, the new scan on
its own working grid and the prior image and mask resampled onto it straight from their own voxels (in
world space). Augmentation is OFF. The model's inputs are these arrays subsampled to the model's finest
grid ``S`` (``x[::f, ::f, ::f]``, ``f = G / S``); every metric is computed on the model's grids with the
working spacing (``spacing_mm · f`` at the finest level, ``× 2`` per coarser level).

Registration, per pair and pyramid level ``i`` (grid ``S / 2**(n−i)``, inputs strided as inside the
network), for three transforms:

* ``identity`` -- no registration: the pair as it enters the network (``_affine`` and ``_deformable``
  columns are then equal, the displacement is zero);
* ``SPIRS`` affine -- ``warped_affine_image_i`` / ``warped_affine_mask_i`` (``A_i``);
* ``SPIRS`` deformable -- ``warped_image_i`` / ``warped_mask_i`` (``A_final`` and ``u_i``).

Metrics (:func:`registration_metrics`): unmasked LNCC (window ``cfg.loss.lncc_window``), masked LNCC
(the authors' training mask :func:`spirs_tf.metrics.lncc_mask`: brain voxels outside lesions), both from
:func:`spirs_tf.metrics.lncc` (float64 box sums of each window's own voxels: exact to ~1e-13, also next
to the zero background, unlike the float32 running sums of the training loss), Dice of
the warped prior mask (soft, ``≥ 0.5``) with the new mask, and for the deformable map the % of voxels
with Jacobian determinant ≤ 0 and the std of log-Jacobian. The Jacobian is that of the WHOLE map
``p(x) = M(x − c) + t + u(x) + c`` (:func:`total_displacement`), over all voxels of the grid, so SPIRS
and the baselines (whose fields fold the affine in) are scored alike.

Segmentation, per pair, at the finest level: ``P1 = σ(p1_logits) ≥ 0.5`` and ``P2 = σ(p2_logits) ≥
0.5`` against the new scan's mask, lesion-wise (:func:`spirs_tf.metrics.lesion_table`: 26-connected
lesions, detection by overlap, Dice, HD95 in mm, ``inf`` when missed, size bins in mm³) and BraTS-2023
lesion-wise (:func:`spirs_tf.metrics.brats_lesionwise`).

Output tables (column lists :data:`PAIR_ID_COLUMNS`, :func:`registration_columns`,
:data:`LESION_COLUMNS`, :data:`SEGMENTATION_COLUMNS`) are read by ``experiments/stats.py`` and
``experiments/segmentation_table.py``. TensorFlow is imported only when a model is built.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from spirs_tf import metrics
from spirs_tf.atomic import atomic_write_json, atomic_write_text
from spirs_tf.data import PairSource
from spirs_tf.errors import SpirsInputError
from spirs_tf.geometry import scale_translation, total_displacement  # noqa: F401 (re-exported)
from spirs_tf.manifest import load_manifest
from spirs_tf.predictor import Run, load_run  # noqa: F401 (re-exported)
from spirs_tf.stats import median_iqr, read_csv

#: File written by ``spirs synth`` beside its ``manifest.csv`` (its ``generator`` names the package).
SYNTH_MARKER = "synth.json"
PAIR_ID_COLUMNS = ("pair_id", "patient_id", "fixed_timepoint", "moving_timepoint", "method")
#: Registration metric names (suffix ``_affine``/``_deformable`` for the first three).
REG_METRICS = ("lncc", "lncc_masked", "dice")
JACOBIAN_METRICS = ("folding_percent", "log_jacobian_std")
LESION_COLUMNS = ("pair_id", "patient_id", "fixed_timepoint", "moving_timepoint", "method", "lesion_id",
                  "n_voxels", "volume_mm3", "size_bin", "detected", "dice", "hd95", "n_pred_components",
                  "in_warped_prior", "centroid_i", "centroid_j", "centroid_k")
SEGMENTATION_COLUMNS = ("pair_id", "patient_id", "fixed_timepoint", "moving_timepoint", "method",
                        "n_lesions", "n_detected", "n_false_positive", "dice_global", "brats_dice",
                        "brats_hd95", "brats_tp", "brats_fn", "brats_fp")
SEGMENTATION_METHODS = ("P1", "P2")


# ------------------------------------------------------------------------------------- data labels
def split_arg(split: str | None) -> str | None:
    """Command-line split → :func:`spirs_tf.manifest.make_pairs` split (``"all"`` → every patient)."""
    return None if split in (None, "", "all") else split


def synthetic_source(manifest_path: str) -> dict | None:
    """The ``spirs synth`` settings beside ``manifest_path`` (``synth.json``), or None for other data."""
    marker = os.path.join(os.path.dirname(os.path.abspath(manifest_path)), SYNTH_MARKER)
    try:
        with open(marker, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return doc if str(doc.get("generator", "")).startswith("spirs_tf.synthetic") else None


def data_label(manifest_path: str, synthetic: str = "auto") -> str:
    """``"synthetic (...)"`` or ``"real"`` for result headers; ``synthetic`` is ``auto``/``yes``/``no``.

    ``auto`` looks for the ``spirs synth`` marker file beside the manifest.
    """
    doc = synthetic_source(manifest_path)
    if synthetic == "no" or (synthetic == "auto" and doc is None):
        return "real"
    if doc is None:
        return "synthetic"
    cfg = doc.get("config", {})
    return (f"synthetic (spirs synth: {doc.get('patients', '?')} patients, seed {doc.get('seed', '?')}, "
            f"pose {cfg.get('pose', '?')}, grid {cfg.get('grid_size', '?')} at {cfg.get('spacing_mm', '?')} mm)")


# ------------------------------------------------------------------------------------------ pairs
@dataclass
class PairResult:
    """One pair run through a model: inputs at the model's finest grid and the raw outputs (batch removed)."""

    pair_id: str
    patient_id: str
    fixed_timepoint: str
    moving_timepoint: str
    spacing: tuple[float, float, float]
    inputs: dict                 # fixed_image, fixed_mask, moving_image, moving_mask: (S, S, S) float32
    outputs: dict                # model outputs without the batch axis
    levels: tuple[int, ...]      # pyramid levels present in ``outputs`` (finest last)

    @property
    def ids(self) -> dict:
        return {"pair_id": self.pair_id, "patient_id": self.patient_id,
                "fixed_timepoint": self.fixed_timepoint, "moving_timepoint": self.moving_timepoint}

    def factor(self, level: int) -> int:
        """Finest-grid voxels per voxel of ``level``."""
        return 2 ** (self.levels[-1] - level)

    def level_inputs(self, level: int) -> dict:
        f = self.factor(level)
        return {k: v[::f, ::f, ::f] for k, v in self.inputs.items()}

    def level_spacing(self, level: int) -> tuple[float, ...]:
        return tuple(s * self.factor(level) for s in self.spacing)


def pair_source(run: Run, manifest_path: str, split: str | None, pairing: str | None = None,
                limit: int | None = None):
    """:class:`spirs_tf.data.PairSource` of a split on the run's working grid (``split=None``: all pairs).

    Raises:
        SpirsInputError: bad manifest, unknown split, no pairs, scans without masks.
    """
    manifest = load_manifest(manifest_path)
    data_cfg = dataclasses.replace(run.cfg.data, pairing=pairing or run.cfg.data.pairing, both_directions=False)
    source = PairSource(manifest, split, data_cfg, limit=limit)
    if not len(source):
        raise SpirsInputError(f"no (prior, new) pairs in split {split or 'all'!r}", manifest_path)
    return source


def iterate_pairs(run: Run, source, kind: str = "pyramid") -> Iterator[PairResult]:
    """Run the model (``kind`` of :meth:`Run.predict_fn`) on every pair of ``source``, one at a time."""
    predict = run.predict_fn(kind)
    f = run.factor
    for k, pair in enumerate(source.pairs):
        item = source[k]
        inputs = {"fixed_image": item.fixed_image, "fixed_mask": item.fixed_mask,
                  "moving_image": item.moving_image, "moving_mask": item.moving_mask}
        inputs = {n: np.ascontiguousarray(v[::f, ::f, ::f], dtype=np.float32) for n, v in inputs.items()}
        out = predict({n: inputs[n][None, ..., None] for n in ("fixed_image", "moving_image", "moving_mask")})
        out = {n: v[0] for n, v in out.items()}
        levels = tuple(sorted(int(n.rsplit("_", 1)[1]) for n in out if n.startswith("dvf_")))
        yield PairResult(f"{pair.patient_id}/{pair.prior.timepoint}->{pair.new.timepoint}", str(pair.patient_id),
                         str(pair.new.timepoint), str(pair.prior.timepoint), run.spacing, inputs, out, levels)


# ------------------------------------------------------------------------------------- metrics
def registration_metrics(fixed, fixed_mask, warped, warped_mask, displacement=None, window: int = 9) -> dict:
    """``lncc``, ``lncc_masked``, ``dice`` and, with a displacement, ``folding_percent`` and
    ``log_jacobian_std`` (NaN without one) of one registration result.

    ``lncc_masked`` averages over :func:`spirs_tf.metrics.lncc_mask` (``fixed`` and ``warped`` non-zero
    outside the lesions of ``fixed_mask`` / ``warped_mask``); NaN when that mask is empty. Masks:
    ``≥ 0.5`` (soft warped masks allowed). ``dice`` is NaN when BOTH masks are empty (no lesion on either
    side, e.g. small lesions lost by the strided subsampling of a coarse level: nothing to align, so the
    pair does not count; :func:`spirs_tf.metrics.dice` would say 1); one empty mask gives 0.
    """
    fm, wm = metrics.as_mask(fixed_mask), metrics.as_mask(warped_mask)
    out = {"lncc": metrics.lncc(fixed, warped, window),
           "lncc_masked": metrics.lncc(fixed, warped, window, mask=metrics.lncc_mask(fixed, warped, fm, wm)),
           "dice": metrics.dice(fm, wm) if (fm.any() or wm.any()) else math.nan}
    if displacement is None:
        out.update(folding_percent=math.nan, log_jacobian_std=math.nan)
    else:
        out.update(folding_percent=metrics.folding_percent(displacement),
                   log_jacobian_std=metrics.log_jacobian_std(displacement))
    return out


def registration_columns(levels: Sequence[int]) -> list[str]:
    """Columns of the per-pair registration CSV: ids, the finest-level metrics, then per level ``_l{i}``."""
    base = [f"{m}_{t}" for t in ("affine", "deformable") for m in REG_METRICS] + list(JACOBIAN_METRICS)
    return list(PAIR_ID_COLUMNS) + base + [f"{c}_l{i}" for i in levels for c in base]


def _level_metrics(result: PairResult, level: int, window: int) -> dict[str, dict]:
    """``{"identity": {...}, "SPIRS": {...}}`` metric columns (without level suffix) at ``level``."""
    inp, out = result.level_inputs(level), result.outputs
    shape = inp["fixed_image"].shape
    ident = registration_metrics(inp["fixed_image"], inp["fixed_mask"], inp["moving_image"], inp["moving_mask"],
                                 np.zeros(shape + (3,), np.float32), window)
    affine = registration_metrics(inp["fixed_image"], inp["fixed_mask"], out[f"warped_affine_image_{level}"][..., 0],
                                  out[f"warped_affine_mask_{level}"][..., 0], None, window)
    a_final = scale_translation(out[f"affine_{result.levels[-1]}"], 1.0 / result.factor(level))
    disp = total_displacement(a_final, out[f"dvf_{level}"], shape)
    deform = registration_metrics(inp["fixed_image"], inp["fixed_mask"], out[f"warped_image_{level}"][..., 0],
                                  out[f"warped_mask_{level}"][..., 0], disp, window)
    rows = {}
    for method, (a, d) in (("identity", (ident, ident)), ("SPIRS", (affine, deform))):
        cols = {f"{m}_affine": a[m] for m in REG_METRICS}
        cols.update({f"{m}_deformable": d[m] for m in REG_METRICS})
        cols.update({m: d[m] for m in JACOBIAN_METRICS})
        rows[method] = cols
    return rows


def registration_rows(result: PairResult, window: int = 9, method: str = "SPIRS") -> list[dict]:
    """Two rows (``identity``, then ``method``) of :func:`registration_columns` for one pair.

    The unsuffixed columns are those of the finest level present.
    """
    rows = {"identity": dict(result.ids, method="identity"), "SPIRS": dict(result.ids, method=method)}
    for level in result.levels:
        per = _level_metrics(result, level, window)
        for key, cols in per.items():
            rows[key].update({f"{c}_l{level}": v for c, v in cols.items()})
            if level == result.levels[-1]:
                rows[key].update(cols)
    return [rows["identity"], rows["SPIRS"]]


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(logits, np.float64), -50, 50)))


def segmentation_masks(result: PairResult) -> dict[str, np.ndarray]:
    """``{"P1", "P2"}`` boolean predictions ``σ(logits) ≥ 0.5`` on the finest grid (pyramid models only)."""
    return {"P1": _sigmoid(result.outputs["p1_logits"][..., 0]) >= 0.5,
            "P2": _sigmoid(result.outputs["p2_logits"][..., 0]) >= 0.5}


def segmentation_rows(result: PairResult) -> tuple[list[dict], list[dict]]:
    """``(per-lesion rows, per-pair rows)`` for P1 and P2 (columns :data:`LESION_COLUMNS`,
    :data:`SEGMENTATION_COLUMNS`). ``in_warped_prior``: the lesion overlaps the SPIRS-warped prior mask."""
    gt = metrics.as_mask(result.inputs["fixed_mask"])
    warped_prior = metrics.as_mask(result.outputs[f"warped_mask_{result.levels[-1]}"][..., 0])
    lesion_rows, pair_rows = [], []
    for method, pred in segmentation_masks(result).items():
        table = metrics.lesion_table(gt, pred, result.spacing)
        labels, _ = metrics.label_lesions(gt)
        for row in table:
            ci, cj, ck = row["centroid"]
            lesion_rows.append(dict(result.ids, method=method, lesion_id=row["lesion_id"], n_voxels=row["n_voxels"],
                                    volume_mm3=row["volume_mm3"], size_bin=row["size_bin"], detected=row["detected"],
                                    dice=row["dice"], hd95=row["hd95"], n_pred_components=row["n_pred_components"],
                                    in_warped_prior=bool(warped_prior[labels == row["lesion_id"]].any()),
                                    centroid_i=ci, centroid_j=cj, centroid_k=ck))
        brats = metrics.brats_lesionwise(gt, pred, result.spacing)
        pair_rows.append(dict(result.ids, method=method, n_lesions=len(table),
                              n_detected=sum(r["detected"] for r in table),
                              n_false_positive=len(metrics.false_positive_components(gt, pred, result.spacing)),
                              dice_global=metrics.dice(gt, pred), brats_dice=brats["dice"], brats_hd95=brats["hd95"],
                              brats_tp=brats["num_tp"], brats_fn=brats["num_fn"], brats_fp=brats["num_fp"]))
    return lesion_rows, pair_rows


# ---------------------------------------------------------------------------------- output helpers
def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return "" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write ``rows`` atomically; missing cells and NaN are empty, ±inf ``inf``/``-inf``, bools ``true``/``false``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    atomic_write_text(path, buf.getvalue())


def read_rows(path: str) -> list[dict]:
    """Rows of a CSV written by :func:`write_csv` with numeric cells as floats (empty → NaN)."""
    out = []
    for row in read_csv(path, []):
        parsed = {}
        for k, v in row.items():
            if k == "_line":
                continue
            try:
                parsed[k] = float(v) if v != "" else math.nan
            except ValueError:
                parsed[k] = v
            if k in ("pair_id", "patient_id", "fixed_timepoint", "moving_timepoint", "method", "size_bin"):
                parsed[k] = v
        out.append(parsed)
    return out


def median_iqr_text(values: Sequence[float], digits: int = 2) -> str:
    """``"0.59 (0.52 – 0.65)"`` (median and IQR, NaN dropped; ``inf`` printed as ``inf``; ``n/a`` if empty)."""
    med, q1, q3 = median_iqr(values)
    if math.isnan(med):
        return "n/a"

    def f(x):
        return "inf" if math.isinf(x) else f"{x:.{digits}f}"

    return f"{f(med)} ({f(q1)} – {f(q3)})"


def p_text(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else ("< 1e-4" if p < 1e-4 else f"{p:.3g}")


def write_info(out_dir: str, name: str, info: dict) -> None:
    """``out_dir/<name>.json``, atomic; NaN as null, ±inf as ``"inf"``/``"-inf"``
    (:func:`spirs_tf.atomic.json_safe`)."""
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), info)


def add_common_arguments(parser, split_default: str = "test") -> None:
    """``--run --manifest --split --out --pairing --limit --synthetic`` (shared by the experiment scripts)."""
    parser.add_argument("--run", required=True, help="run directory (stageN/...) or checkpoint .npz")
    parser.add_argument("--manifest", required=True, help="manifest CSV of the cohort")
    parser.add_argument("--split", default=split_default, help="split to evaluate ('all' = every patient)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pairing", choices=("consecutive", "all"),
                        help="pairs per patient (default: the run's data.pairing)")
    parser.add_argument("--limit", type=int, help="evaluate at most this many pairs (spread evenly)")
    parser.add_argument("--synthetic", choices=("auto", "yes", "no"), default="auto",
                        help="label outputs as synthetic (auto: the manifest has spirs synth's synth.json)")


__all__ = ["Run", "PairResult", "load_run", "pair_source", "iterate_pairs",
           "registration_metrics", "registration_rows", "registration_columns", "segmentation_rows",
           "segmentation_masks", "total_displacement", "write_csv", "read_rows", "median_iqr_text", "p_text",
           "data_label", "synthetic_source", "split_arg", "add_common_arguments", "write_info",
           "LESION_COLUMNS", "SEGMENTATION_COLUMNS", "PAIR_ID_COLUMNS"]
