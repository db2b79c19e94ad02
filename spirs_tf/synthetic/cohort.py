"""Synthetic longitudinal cohorts: one patient at a time, written with ground truth and a manifest.

Randomness: patient ``k`` of a cohort with seed ``S`` draws everything from
``numpy.random.SeedSequence(S, spawn_key=(k,))`` (split into independent streams for anatomy,
lesions, poses and each scan), so patient ``k`` is identical whatever the cohort size.

Output layout (paths in the CSVs are relative to ``OUT``)::

    OUT/manifest.csv                 patient_id,timepoint,image,mask,split  (the manifest contract)
    OUT/lesions.csv                  one row per lesion and time point (see LESION_COLUMNS; ``contrast``:
                                     relative contrast, < 1 where faded; ``on_vessel``: 0/1)
    OUT/synth.json                   generator settings
    OUT/patient_000/tp0/image.nii.gz     float32 post-contrast T1
    OUT/patient_000/tp0/mask.nii.gz      uint8 lesion mask
    OUT/patient_000/tp0/lesions.nii.gz   int16 lesion ids (stable across time points)
    OUT/patient_000/transforms/tp0_to_tp1.json                 world affine new → prior (+ voxel form)
    OUT/patient_000/transforms/tp0_to_tp1_displacement.nii.gz  d (mm), (X, Y, Z, 1, 3) vector field
    OUT/patient_000/qc.png           with ``qc=True``

Transform convention (:mod:`spirs_tf.synthetic.render`): for a new-scan world point ``w``,
``prior_world = A · w + d(w)`` with ``A`` = ``world_affine_new_to_prior`` and ``d`` sampled at the
new-scan voxel of ``w``. Splits: a seeded permutation of the patients, 70 % train, 15 % val, 15 % test
(at least one val and one test patient from three patients on). All files are written atomically and
deterministically (gzip without timestamp), so the same seed gives byte-identical files.
"""
from __future__ import annotations

import csv
import io as _io
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from spirs_tf.errors import SpirsInputError
from spirs_tf.io import MAX_AXIS
from spirs_tf.synthetic.anatomy import patient_anatomy, working_template
from spirs_tf.synthetic.lesions import (PAPER_TEST_COUNTS, TRAJECTORIES, Lesion, mass_effect_grid,
                                        place_lesions, sample_fading, sample_lesion, sample_lesion_volumes,
                                        size_bin)
from spirs_tf.synthetic.render import PairTransform, render_scan, true_transform
from spirs_tf.synthetic.scanner import POSES, sample_pose

LESION_COLUMNS = ("patient_id", "timepoint", "lesion_id", "volume_mm3", "size_bin", "centroid_x_mm",
                  "centroid_y_mm", "centroid_z_mm", "status", "trajectory", "target_volume_mm3", "faint",
                  "contrast", "on_vessel")


@dataclass(frozen=True)
class SynthConfig:
    """Generator settings.

    Attributes:
        grid_size, spacing_mm: the working grid (voxels per axis, mm).
        timepoints: (min, max) number of time points per patient, inclusive.
        pose: ``raw`` (random head position per time point) or ``aligned``.
        lesions_per_patient: (min, max), drawn log-uniformly.
        size_weights: relative frequency of micro, small, medium, large lesions.
        trajectory_weights: ((kind, weight), ...) over stable, grow, shrink, appear, disappear.
        faint_fraction: share of micro lesions with low contrast at every time point.
        warp_mm: RMS of each patient's elastic anatomical variation.
        fade_fraction: probability that a lesion present in the prior and the new scan (and at most
            ``fade_max_volume_mm3`` in the new one) is rendered faded in the new scan, per pair
            (:func:`~spirs_tf.synthetic.lesions.sample_fading`); 0 (default) = off.
        fade_contrast: (lo, hi) relative contrast of a faded lesion against the tissue beneath,
            ``0 ≤ lo ≤ hi < 1``.
        fade_max_volume_mm3: largest lesion that may fade (default 125: micro and small).
        vessel_like_fraction: share of faded lesions that sit on a small vessel (vessel-like).
        new_lesion_fraction: ``None`` (default: ``trajectory_weights`` as given) or the probability of the
            ``appear`` trajectory (new lesions, absent from the earlier scans); the other kinds keep
            their relative weights.
    """

    grid_size: int = 128
    spacing_mm: float = 1.5
    timepoints: tuple = (3, 6)
    pose: str = "raw"
    lesions_per_patient: tuple = (1, 20)
    size_weights: tuple = PAPER_TEST_COUNTS
    trajectory_weights: tuple = TRAJECTORIES
    faint_fraction: float = 0.3
    warp_mm: float = 2.5
    fade_fraction: float = 0.0
    fade_contrast: tuple = (0.15, 0.45)
    fade_max_volume_mm3: float = 125.0
    vessel_like_fraction: float = 0.0
    new_lesion_fraction: float | None = None

    def trajectories(self) -> tuple:
        """``((kind, weight), ...)``: ``trajectory_weights`` with ``new_lesion_fraction`` applied."""
        if self.new_lesion_fraction is None:
            return tuple(self.trajectory_weights)
        p = float(self.new_lesion_fraction)
        others = [(k, float(w)) for k, w in self.trajectory_weights if k != "appear"]
        rest = sum(w for _, w in others)
        if rest <= 0 and p < 1:
            raise SpirsInputError("a new-lesion fraction below 1 needs a trajectory other than 'appear'")
        return tuple((k, w * (1.0 - p) / rest) for k, w in others) + (("appear", p),)

    def validate(self) -> None:
        """Raises SpirsInputError naming the bad setting."""
        if int(self.grid_size) < 16:
            raise SpirsInputError(f"grid size must be at least 16 voxels, got {self.grid_size}")
        if int(self.grid_size) > MAX_AXIS:  # checked before anything is allocated
            raise SpirsInputError(f"grid size must be at most {MAX_AXIS} voxels (the largest scan spirs-tf "
                                  f"reads), got {self.grid_size}")
        if not 0.5 <= float(self.spacing_mm) <= 10.0:
            raise SpirsInputError(f"spacing must be between 0.5 and 10 mm, got {self.spacing_mm}")
        lo, hi = self.timepoints
        if not 1 <= lo <= hi <= 50:
            raise SpirsInputError(f"time points must satisfy 1 <= min <= max <= 50, got {lo}-{hi}")
        if self.pose not in POSES:
            raise SpirsInputError(f"pose must be one of {', '.join(POSES)}, got {self.pose!r}")
        lo, hi = self.lesions_per_patient
        if not 0 <= lo <= hi <= 100:
            raise SpirsInputError(f"lesions per patient must satisfy 0 <= min <= max <= 100, got {lo}-{hi}")
        for name in ("fade_fraction", "vessel_like_fraction"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise SpirsInputError(f"{name.replace('_', ' ')} must be between 0 and 1, got {getattr(self, name)}")
        lo, hi = self.fade_contrast
        if not 0.0 <= float(lo) <= float(hi) < 1.0:
            raise SpirsInputError(f"fade contrast must satisfy 0 <= lo <= hi < 1, got {lo},{hi}")
        if not float(self.fade_max_volume_mm3) > 0:
            raise SpirsInputError(f"fade max volume must be positive, got {self.fade_max_volume_mm3}")
        if self.new_lesion_fraction is not None and not 0.0 <= float(self.new_lesion_fraction) <= 1.0:
            raise SpirsInputError(f"new-lesion fraction must be between 0 and 1, got {self.new_lesion_fraction}")
        self.trajectories()


@dataclass(frozen=True, eq=False)
class SynthPatient:
    """A generated patient: its scans, the true transforms of consecutive pairs and its lesions."""

    index: int
    patient_id: str
    scans: list
    transforms: list
    lesions: list
    poses: list
    table: list = field(default_factory=list)


def _streams(seed: int, index: int):
    """Anatomy, lesion, pose, scan and fading streams of patient ``index`` (the fifth was added later,
    so the first four, and with fading off every volume, are what they always were)."""
    root = np.random.SeedSequence(int(seed), spawn_key=(int(index),))
    anat, les, pose, scans, fade = root.spawn(5)
    return anat, les, pose, scans, fade


def generate_patient(index: int, seed: int, cfg: SynthConfig = SynthConfig(),
                     patient_id: str | None = None) -> SynthPatient:
    """Generate patient ``index`` of the cohort with ``seed`` (independent of the cohort size)."""
    cfg.validate()
    template = working_template(int(cfg.grid_size), float(cfg.spacing_mm))
    ss_anat, ss_les, ss_pose, ss_scan, ss_fade = _streams(seed, index)
    rng_les, rng_pose = np.random.default_rng(ss_les), np.random.default_rng(ss_pose)
    n_tp = int(rng_les.integers(cfg.timepoints[0], cfg.timepoints[1] + 1))
    centre = template.affine[:3, :3] @ (np.array(template.shape) - 1) / 2.0 + template.affine[:3, 3]
    poses = [sample_pose(rng_pose, centre, cfg.pose) for _ in range(n_tp)]
    anatomy = patient_anatomy(template, np.random.default_rng(ss_anat), warp_mm=cfg.warp_mm)

    lo, hi = cfg.lesions_per_patient
    n_les = int(np.floor(np.exp(rng_les.uniform(np.log(lo + 1), np.log(hi + 1))))) - 1 if hi > 0 else 0
    n_les = int(np.clip(n_les, lo, hi))
    kinds, weights = zip(*cfg.trajectories())
    weights = np.asarray(weights, dtype=np.float64)
    volumes = sample_lesion_volumes(rng_les, n_les, cfg.size_weights)
    drawn = [sample_lesion(rng_les, i + 1, v, n_tp, kinds[rng_les.choice(len(kinds), p=weights / weights.sum())],
                           cfg.faint_fraction) for i, v in enumerate(volumes)]
    lesions = place_lesions(rng_les, drawn, anatomy.parenchyma_depth, anatomy.gm, anatomy.wm,
                            anatomy.affine, poses)
    if cfg.fade_fraction > 0:
        lesions = sample_fading(np.random.default_rng(ss_fade), lesions, cfg.fade_fraction, cfg.fade_contrast,
                                cfg.vessel_like_fraction, cfg.fade_max_volume_mm3)

    fields = [mass_effect_grid(lesions, t, anatomy.affine, anatomy.shape) for t in range(n_tp)]
    scan_rngs = [np.random.default_rng(s) for s in ss_scan.spawn(n_tp)]
    scans = [render_scan(anatomy, lesions, t, poses[t], *fields[t], scan_rngs[t]) for t in range(n_tp)]
    transforms = [true_transform(anatomy, t, t + 1, poses[t], poses[t + 1], *fields[t], *fields[t + 1])
                  for t in range(n_tp - 1)]
    pid = patient_id or f"patient_{index:03d}"
    patient = SynthPatient(index, pid, scans, transforms, lesions, poses)
    patient.table.extend(lesion_rows(patient))
    return patient


def _status(les: Lesion, t: int) -> str:
    now, before = les.volumes[t], (les.volumes[t - 1] if t > 0 else 0.0)
    if now <= 0:
        return "resolved"
    if before <= 0:
        return "baseline" if t == 0 else "new"
    ratio = now / before
    return "growing" if ratio > 1.1 else "shrinking" if ratio < 1 / 1.1 else "stable"


def lesion_rows(patient: SynthPatient) -> list[dict]:
    """Rows of ``lesions.csv``: volumes and centroids measured on the written instance maps."""
    rows = []
    for t, scan in enumerate(patient.scans):
        voxel_mm3 = float(abs(np.linalg.det(scan.affine[:3, :3])))
        for les in patient.lesions:
            if les.volumes[t] <= 0 and (t == 0 or les.volumes[t - 1] <= 0):
                continue
            idx = np.argwhere(scan.lesions == les.lesion_id)
            volume = idx.shape[0] * voxel_mm3
            centroid = (scan.affine[:3, :3] @ idx.mean(0) + scan.affine[:3, 3]) if len(idx) else [np.nan] * 3
            rows.append({
                "patient_id": patient.patient_id, "timepoint": t, "lesion_id": les.lesion_id,
                "volume_mm3": round(volume, 3), "size_bin": size_bin(volume),
                "centroid_x_mm": round(float(centroid[0]), 2), "centroid_y_mm": round(float(centroid[1]), 2),
                "centroid_z_mm": round(float(centroid[2]), 2), "status": _status(les, t),
                "trajectory": les.trajectory, "target_volume_mm3": round(float(les.volumes[t]), 3),
                "faint": int(les.faint), "contrast": round(les.contrast_at(t), 4),
                "on_vessel": int(les.vessel is not None and les.present(t))})
    return rows


def _csv_text(rows, columns) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()})
    return buf.getvalue()


def write_patient(patient: SynthPatient, out_dir: str, qc: bool = False) -> list[dict]:
    """Write one patient under ``out_dir/<patient_id>/`` (module docstring); returns its manifest rows
    (without ``split``), with paths relative to ``out_dir``."""
    from spirs_tf.atomic import atomic_write_text
    from spirs_tf.io import write_volume

    rows = []
    for t, scan in enumerate(patient.scans):
        rel = f"{patient.patient_id}/tp{t}"
        write_volume(os.path.join(out_dir, rel, "image.nii.gz"), scan.image, scan.affine)
        write_volume(os.path.join(out_dir, rel, "mask.nii.gz"), scan.mask, scan.affine)
        write_volume(os.path.join(out_dir, rel, "lesions.nii.gz"), scan.lesions, scan.affine, intent="label")
        rows.append({"patient_id": patient.patient_id, "timepoint": t, "image": f"{rel}/image.nii.gz",
                     "mask": f"{rel}/mask.nii.gz"})
    folder = os.path.join(out_dir, patient.patient_id, "transforms")
    for tr in patient.transforms:
        name = f"tp{tr.prior}_to_tp{tr.new}"
        write_volume(os.path.join(folder, f"{name}_displacement.nii.gz"), tr.displacement, tr.grid_affine,
                     intent="vector")
        doc = transform_document(tr, name)
        atomic_write_text(os.path.join(folder, f"{name}.json"), json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if qc:
        from spirs_tf.synthetic.qc import qc_figure

        qc_figure(patient, os.path.join(out_dir, patient.patient_id, "qc.png"))
    return rows


def transform_document(tr: PairTransform, name: str) -> dict:
    """JSON content describing one pair's true transform."""
    d = np.linalg.norm(tr.displacement.reshape(-1, 3), axis=1)
    return {
        "prior": f"tp{tr.prior}", "new": f"tp{tr.new}",
        "prior_image": f"../tp{tr.prior}/image.nii.gz", "new_image": f"../tp{tr.new}/image.nii.gz",
        "world_affine_new_to_prior": np.round(tr.world_affine, 9).tolist(),
        "displacement": f"{name}_displacement.nii.gz",
        "displacement_max_mm": round(float(d.max()), 6),
        "convention": ("prior_world = world_affine_new_to_prior @ [new_world, 1] + d(new voxel); d in mm "
                       "along RAS world axes, stored on the new scan's grid as a (X, Y, Z, 1, 3) NIfTI vector "
                       "field; both scans share the same grid affine"),
        "voxel_matrix_centred": np.round(tr.voxel_matrix(), 9).tolist(),
        "voxel_convention": ("prior voxel = M (x - c) + t + c + d(x) / spacing for new voxel x, c = N/2 "
                             "(spirs_tf.geometry); [M | t] = voxel_matrix_centred"),
    }


def assign_splits(n_patients: int, seed: int, fractions=(0.7, 0.15, 0.15)) -> list[str]:
    """Split name per patient index: a seeded permutation cut at the rounded fractions."""
    n = int(n_patients)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    elif n == 2:
        n_val, n_test = 1, 0
    else:
        n_val = n_test = 0
    order = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(2**31 - 1,))).permutation(n)
    splits = [""] * n
    for rank, k in enumerate(order):
        splits[k] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return splits


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`synthesize_cohort` wrote and how long it took."""

    manifest: str
    lesions_csv: str
    n_patients: int
    n_scans: int
    seconds: float
    seconds_per_timepoint: float


def check_output_dir(out_dir: str) -> str:
    """Create ``out_dir`` if needed and prove it is writable.

    Raises:
        SpirsInputError: it cannot be created or written.
    """
    from spirs_tf.atomic import atomic_write_bytes

    out_dir = os.fspath(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".spirs-write-test")
        atomic_write_bytes(probe, b"")
        os.remove(probe)
    except OSError as exc:
        raise SpirsInputError(f"cannot write the output folder: {exc.strerror or exc}", out_dir) from None
    return out_dir


def _make_patient(job: tuple) -> tuple:
    """Generate and write one patient (a worker's task): ``(patient_id, manifest rows, lesion rows,
    n_scans, n_lesions, seconds)``."""
    k, seed, cfg, patient_id, out_dir, qc = job
    t0 = time.perf_counter()
    patient = generate_patient(k, seed, cfg, patient_id=patient_id)
    rows = write_patient(patient, out_dir, qc=qc)
    return (patient.patient_id, rows, patient.table, len(patient.scans), len(patient.lesions),
            time.perf_counter() - t0)


def synthesize_cohort(out_dir: str, n_patients: int, seed: int = 0, cfg: SynthConfig = SynthConfig(),
                      qc: bool | None = None, log=None, workers: int = 1) -> CohortSummary:
    """Generate and write ``n_patients`` patients, ``manifest.csv``, ``lesions.csv`` and ``synth.json``.

    Args:
        out_dir: output folder (created; existing files of the same names are replaced).
        n_patients: number of patients (> 0).
        seed: cohort seed.
        cfg: generator settings.
        qc: write ``qc.png`` per patient; ``None`` = only for cohorts of at most 20 patients.
        log: optional callable taking one progress line.
        workers: patients generated at once, each in its own process (``spawn``); every patient draws
            from its own seeded streams, so the files are the same for any number of workers.

    Raises:
        SpirsInputError: ``n_patients`` ≤ 0, ``workers`` < 1, bad settings, or an unwritable ``out_dir``.
    """
    from spirs_tf.atomic import atomic_write_text

    if int(n_patients) <= 0:
        raise SpirsInputError(f"the number of patients must be positive, got {n_patients}")
    if int(workers) < 1:
        raise SpirsInputError(f"the number of workers must be at least 1, got {workers}")
    cfg.validate()
    out_dir = check_output_dir(out_dir)
    qc = n_patients <= 20 if qc is None else bool(qc)
    splits = assign_splits(n_patients, seed)
    width = max(3, len(str(int(n_patients) - 1)))
    manifest_rows, lesion_table = [], []
    start = time.perf_counter()
    n_scans = 0
    jobs = [(k, seed, cfg, f"patient_{k:0{width}d}", out_dir, qc) for k in range(int(n_patients))]
    pool = None
    if int(workers) > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(min(int(workers), len(jobs)), mp_context=multiprocessing.get_context("spawn"))
    try:
        results = pool.map(_make_patient, jobs) if pool is not None else map(_make_patient, jobs)
        for k, (patient_id, rows, table, scans, lesions, seconds) in enumerate(results):  # in patient order
            for row in rows:
                row["split"] = splits[k]
            manifest_rows.extend(rows)
            lesion_table.extend(table)
            n_scans += scans
            if log is not None:
                log(f"{patient_id}: {scans} time points, {lesions} lesions, {splits[k]}, {seconds:.1f} s")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    atomic_write_text(os.path.join(out_dir, "manifest.csv"),
                      _csv_text(manifest_rows, ("patient_id", "timepoint", "image", "mask", "split")))
    atomic_write_text(os.path.join(out_dir, "lesions.csv"), _csv_text(lesion_table, LESION_COLUMNS))
    settings = {"generator": "spirs_tf.synthetic", "seed": int(seed), "patients": int(n_patients),
                "config": asdict(cfg), "template": "ICBM152 2009a nonlinear symmetric (nilearn, 1 mm)"}
    atomic_write_text(os.path.join(out_dir, "synth.json"), json.dumps(settings, indent=2, sort_keys=True) + "\n")
    seconds = time.perf_counter() - start
    return CohortSummary(os.path.join(out_dir, "manifest.csv"), os.path.join(out_dir, "lesions.csv"),
                         int(n_patients), n_scans, seconds, seconds / max(n_scans, 1))
