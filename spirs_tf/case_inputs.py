"""One case's inputs: reading and validating the three volumes (brain overlap, intensity checks) and
bringing them onto the model's grid (:class:`PreparedCase`).

Split out of :mod:`spirs_tf.inference`, which re-exports every name here; the brain overlap rule is
described in its module docstring.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from spirs_tf.errors import SpirsInputError
from spirs_tf.io import Volume, check_same_grid, read_volume
from spirs_tf.predictor import Predictor
from spirs_tf.preprocess import GridMapping, preprocess_scan, subsample
from spirs_tf.qc import intensity_problems

LOW_OVERLAP = 0.3

@dataclass(eq=False)
class CaseInputs:
    """Validated volumes of one case, their brain overlap and the reading time."""

    new: Volume
    prior: Volume
    prior_mask: Volume
    overlap: dict
    read_s: float = 0.0
    warnings: list = field(default_factory=list)


def brain_box(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS box (lo, hi) in mm around the non-zero voxels (voxel corners included)."""
    nonzero = np.asarray(volume.data) != 0
    lo, hi = np.zeros(3), np.zeros(3)
    for axis in range(3):  # projections instead of np.nonzero: no index arrays for millions of voxels
        hit = np.flatnonzero(np.any(nonzero, axis=tuple(a for a in range(3) if a != axis)))
        lo[axis], hi[axis] = hit[0] - 0.5, hit[-1] + 0.5
    corners = np.array([[(hi if b else lo)[a] for a, b in enumerate(bits)] + [1.0]
                        for bits in np.ndindex(2, 2, 2)]).T
    world = (np.asarray(volume.affine, float) @ corners)[:3]
    return world.min(axis=1), world.max(axis=1)


def brain_overlap(new: Volume, prior: Volume) -> dict:
    """Overlap of the two brain boxes (:func:`brain_box`): intersection volume / smaller box volume.

    Raises:
        SpirsInputError: (naming the prior) when the boxes do not intersect.
    """
    (lo_n, hi_n), (lo_p, hi_p) = brain_box(new), brain_box(prior)
    inter = np.minimum(hi_n, hi_p) - np.maximum(lo_n, lo_p)
    fmt = lambda lo, hi: "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi)) + "] mm"  # noqa: E731
    if np.any(inter <= 0):
        raise SpirsInputError(
            f"its brain does not overlap the brain of {new.path or 'the new scan'} in world coordinates "
            f"(RAS boxes {fmt(lo_p, hi_p)} vs {fmt(lo_n, hi_n)}); both scans must be of the same patient "
            "with real-world (scanner) geometry in their headers", prior.path or "<prior>")
    fraction = float(np.prod(inter) / min(np.prod(hi_n - lo_n), np.prod(hi_p - lo_p)))
    return {"box_overlap_fraction": fraction, "new_box_mm": [lo_n.tolist(), hi_n.tolist()],
            "prior_box_mm": [lo_p.tolist(), hi_p.tolist()], "low_overlap_warning": fraction < LOW_OVERLAP}


def read_case_inputs(new, prior, prior_mask) -> CaseInputs:
    """Read (paths) or accept (Volumes) the three inputs and validate them.

    Raises:
        SpirsInputError: unreadable/missing file, not 3-D, several volumes, NaN/inf, mask not
            binary, mask not on the prior's grid, brains that do not overlap (:func:`brain_overlap`),
            an image that is (effectively) constant (:func:`intensity_problems`).
    """
    t0 = time.perf_counter()
    new = new if isinstance(new, Volume) else read_volume(new, "image")
    prior = prior if isinstance(prior, Volume) else read_volume(prior, "image")
    prior_mask = prior_mask if isinstance(prior_mask, Volume) else read_volume(prior_mask, "mask")
    check_same_grid(prior_mask, prior)
    problems = intensity_problems(new) + intensity_problems(prior)
    overlap = brain_overlap(new, prior)
    if overlap["low_overlap_warning"]:
        problems.append(f"brains of {new.path} and {prior.path} overlap little "
                        f"({100 * overlap['box_overlap_fraction']:.0f} % of the smaller box)")
    return CaseInputs(new, prior, prior_mask, overlap, time.perf_counter() - t0, problems)


@dataclass(eq=False)
class PreparedCase:
    """Model inputs of one case on the model grid ``S`` and the mappings back to the originals."""

    inputs: CaseInputs
    new_image: np.ndarray
    prior_image: np.ndarray
    prior_mask: np.ndarray
    new_mapping: GridMapping
    prior_mapping: GridMapping
    preprocess_s: float


def _model_grid(image, mask, mapping: GridMapping, factor: int):
    """Strided subsample of the working grid to the model's input grid (corner aligned)."""
    if factor == 1:
        return image, mask, mapping
    affine = mapping.working_affine @ np.diag([factor, factor, factor, 1.0])
    shape = tuple(n // factor for n in mapping.working_shape)
    return (subsample(image, factor), None if mask is None else subsample(mask, factor),
            GridMapping(affine, shape, mapping.original_affine, mapping.original_shape))


def prepare_case(inputs: CaseInputs, predictor: Predictor) -> PreparedCase:
    """Preprocess the new scan and the prior (image + mask) onto their own working grids."""
    t0 = time.perf_counter()
    f = predictor.subsample_factor
    n = preprocess_scan(inputs.new, None, predictor.cfg.data)
    p = preprocess_scan(inputs.prior, inputs.prior_mask, predictor.cfg.data)
    new_img, _, new_map = _model_grid(n.image, None, n.mapping, f)
    prior_img, prior_mask, prior_map = _model_grid(p.image, p.mask, p.mapping, f)
    return PreparedCase(inputs, new_img, prior_img, prior_mask, new_map, prior_map, time.perf_counter() - t0)
