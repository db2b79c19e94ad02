"""Lesion table with change tracking between the prior and the new scan (NumPy/SciPy only).

Both inputs live on the NEW scan's grid: the P2 mask predicted there, and the prior lesions carried
there as a label map (each 26-connected component of the prior mask keeps its id; nearest-neighbour
sampling through the registration, see :mod:`spirs_tf.itk_export`).

Rules (:func:`lesion_changes`):

* A **P2 lesion** is a 26-connected component of the P2 mask (ids 1..n in ``scipy.ndimage.label``
  order). Its **match** is the prior lesion sharing the most voxels with it (ties: smallest id).
* ``new`` — no prior lesion overlaps it.
* otherwise, with ``ratio = volume(P2 lesion) / volume(matched prior lesion)`` (both measured on the
  new grid, so both carry the same discretisation): ``growing`` if ``ratio >`` :data:`GROWTH_RATIO`
  (1.25, +25 %), ``shrinking`` if ``ratio <`` :data:`SHRINK_RATIO` (0.8, −20 %), else ``stable``.
  The two thresholds are reciprocal-ish and wide enough to absorb the voxel-level noise of
  registration and segmentation of small lesions; they are not a clinical response criterion
  (RANO-BM uses diameters).
* One row per **prior lesion that no P2 lesion matches**: ``resolved`` when no P2 voxel overlaps it,
  ``merged`` when it overlaps a P2 lesion that matched a larger overlap elsewhere (the lesion joined
  another one).

Volumes are ``voxels × prod(spacing)`` mm³; size bins as in :func:`spirs_tf.metrics.size_bin`
(micro < 25 ≤ small < 125 ≤ medium < 1000 ≤ large mm³); centroids are the voxel centre of mass
mapped through ``affine`` (RAS+ world mm).
"""
from __future__ import annotations

import csv
import io

import numpy as np
from scipy import ndimage

from spirs_tf.atomic import atomic_write_text
from spirs_tf.metrics import label_lesions, size_bin

#: ``volume ratio >`` this → growing.
GROWTH_RATIO = 1.25
#: ``volume ratio <`` this → shrinking.
SHRINK_RATIO = 0.8
CHANGES = ("new", "growing", "shrinking", "stable", "resolved", "merged")
COLUMNS = ("row", "source", "lesion_id", "prior_lesion_id", "change", "volume_mm3", "prior_volume_mm3",
           "volume_ratio", "size_bin", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "n_voxels")


def classify_change(volume_mm3: float, prior_volume_mm3: float | None) -> str:
    """``new`` / ``growing`` / ``shrinking`` / ``stable`` from the two volumes (see module docstring)."""
    if prior_volume_mm3 is None:
        return "new"
    ratio = volume_mm3 / prior_volume_mm3
    if ratio > GROWTH_RATIO:
        return "growing"
    if ratio < SHRINK_RATIO:
        return "shrinking"
    return "stable"


def _centroids(labels: np.ndarray, ids, affine: np.ndarray) -> dict[int, np.ndarray]:
    if not len(ids):
        return {}
    com = np.atleast_2d(np.asarray(ndimage.center_of_mass(np.ones(labels.shape), labels, list(ids))))
    world = (np.asarray(affine, float)[:3, :3] @ com.T + np.asarray(affine, float)[:3, 3:4]).T
    return {int(i): w for i, w in zip(ids, world)}


def _crop_to_content(p2: np.ndarray, prior: np.ndarray, affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop both arrays to the bounding box of ``p2 | prior != 0`` and shift ``affine`` to match.
    Connected-component ids are unchanged (C order is kept inside a box); an empty pair → a 1-voxel box."""
    affine = np.asarray(affine, float)
    occupied = p2 | (prior != 0)
    lo, hi = [], []
    for axis in range(3):
        hit = np.flatnonzero(np.any(occupied, axis=tuple(a for a in range(3) if a != axis)))
        lo.append(int(hit[0]) if hit.size else 0)
        hi.append(int(hit[-1]) + 1 if hit.size else 1)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    return p2[box], prior[box], affine @ shift


def lesion_changes(p2_mask, warped_prior_mask_labels, spacing, affine) -> list[dict]:
    """One row per P2 lesion, then one per unmatched prior lesion (rules in the module docstring).

    Args:
        p2_mask: binary array (X, Y, Z) on the new grid (values ≥ 0.5 count as lesion).
        warped_prior_mask_labels: int array (X, Y, Z): prior lesion ids carried to the new grid, 0 =
            background. Ids need not be contiguous.
        spacing: voxel size (3,) in mm.
        affine: 4×4 voxel → RAS+ mm of the new grid.

    Returns:
        list of dicts with the keys of :data:`COLUMNS` (``lesion_id`` is ``None`` for prior rows,
        ``prior_lesion_id``/``prior_volume_mm3``/``volume_ratio`` ``None`` where not defined; for
        prior rows ``volume_mm3`` is 0 and size bin/centroid describe the carried prior lesion).

    Raises:
        ValueError: shapes differ, or ``spacing`` is not 3 positive numbers.
    """
    p2 = np.asarray(p2_mask)
    p2 = p2 if p2.dtype == bool else p2 >= 0.5
    prior = np.asarray(warped_prior_mask_labels).astype(np.int64)
    if p2.shape != prior.shape or p2.ndim != 3:
        raise ValueError(f"p2_mask {p2.shape} and prior labels {prior.shape} must be the same 3-D shape")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    voxel = float(np.prod(spacing))
    # work inside the bounding box of everything non-zero (same labels, ids and rows; a 6-megavoxel
    # scan holds its lesions in a few thousand voxels)
    p2, prior, affine = _crop_to_content(p2, prior, affine)

    labels, n = label_lesions(p2)
    ids, counts = np.unique(prior[prior != 0], return_counts=True)  # one pass (was one per id)
    prior_ids = [int(i) for i in ids]
    prior_count = {int(i): int(k) for i, k in zip(ids, counts)}
    p2_count = np.bincount(labels.ravel(), minlength=n + 1)
    # overlap[(p2 id, prior id)] = shared voxels
    both = (labels > 0) & (prior > 0)
    pairs, counts = np.unique(np.stack([labels[both], prior[both]]), axis=1, return_counts=True)
    overlap: dict[int, dict[int, int]] = {}
    for (a, b), k in zip(pairs.T, counts):
        overlap.setdefault(int(a), {})[int(b)] = int(k)
    new_centroids = _centroids(labels, range(1, n + 1), affine)
    rows, matched, touched = [], set(), set()
    for lid in range(1, n + 1):
        hits = overlap.get(lid, {})
        touched.update(hits)
        match = min(hits, key=lambda b: (-hits[b], b)) if hits else None
        volume = float(p2_count[lid] * voxel)
        prior_volume = None if match is None else prior_count[match] * voxel
        if match is not None:
            matched.add(match)
        rows.append(_row("p2", lid, match, classify_change(volume, prior_volume), volume, prior_volume,
                         new_centroids[lid], int(p2_count[lid])))
    leftovers = [i for i in prior_ids if i not in matched]
    prior_centroids = _centroids(prior, leftovers, affine)
    for pid in leftovers:
        change = "merged" if pid in touched else "resolved"
        pv = prior_count[pid] * voxel
        row = _row("prior", None, pid, change, 0.0, pv, prior_centroids[pid], 0)
        row["size_bin"] = size_bin(pv)
        rows.append(row)
    for k, row in enumerate(rows, start=1):
        row["row"] = k
    return rows


def _row(source, lid, pid, change, volume, prior_volume, centroid, n_voxels) -> dict:
    return {"row": 0, "source": source, "lesion_id": lid, "prior_lesion_id": pid, "change": change,
            "volume_mm3": float(volume), "prior_volume_mm3": None if prior_volume is None else float(prior_volume),
            "volume_ratio": None if prior_volume is None or lid is None else float(volume / prior_volume),
            "size_bin": size_bin(volume), "centroid_x_mm": float(centroid[0]),
            "centroid_y_mm": float(centroid[1]), "centroid_z_mm": float(centroid[2]), "n_voxels": int(n_voxels)}


def change_counts(rows: list[dict]) -> dict[str, int]:
    """``{change: number of rows}`` for every change in :data:`CHANGES`."""
    return {c: sum(1 for r in rows if r["change"] == c) for c in CHANGES}


def write_lesions_csv(path: str, rows: list[dict]) -> None:
    """Write the rows as CSV (header :data:`COLUMNS`; empty cell for ``None``; floats to 4 decimals),
    atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k])
                         for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())
