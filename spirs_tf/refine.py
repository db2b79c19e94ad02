"""Test-time refinement (instance optimisation) of the network's registration, beyond the paper.

Starting from the network's output for one pair, two optimisations on that pair alone (the practice
of the Learn2Reg leaders):

* :func:`refine_affine`: the 12 entries of the affine, coarse to fine on Gaussian-smoothed strided
  grids, maximising the masked LNCC;
* :func:`refine_deformable`: a dense displacement field after that affine, optionally parametrised by
  a control field on a coarser grid (linear upsampling by matrix products), minimising
  ``−LNCC + λ·bending energy + μ·folding penalty``, coarse to fine;
* :func:`refine`: both, by mode (``off``, ``affine``, ``full``), for ``spirs predict --refine``.

Conventions are those of :mod:`spirs_tf.transforms` (FACTS section B): volumes ``(D, H, W)`` of one
grid, output voxel ``x`` ↦ moving location ``p(x) = M·(x − c) + t + u(x) + c`` with ``c = N/2``,
``[M | t]`` a 3×4 matrix and ``u`` a ``(D, H, W, 3)`` field, both in voxels of that grid; trilinear
sampling, zeros outside. The fixed image is the new scan, the moving image the prior (both on the
same grid, background exactly 0), exactly the arrays the network sees at inference. A coarser level
with factor ``f`` holds voxel ``f·i`` of the grid as voxel ``i`` (corner aligned, as the network's
pyramid), so translations and displacements divide by ``f`` and ``M`` is unchanged.

**Similarity.** The authors' LNCC (:func:`spirs_tf.losses.lncc`, window 9, ``n = 9³`` with zero
padding) computed with box *means* from separable average pools of the zero-padded volumes: exact
sums of 9 numbers per axis (no cumulative sums, so a window of background is exactly 0), and
2–5× faster than cumulative sums under XLA (forward + backward at 64³: 0.02 s vs 0.12 s). The
authors' clamps stay (``cross``, ``varI``, ``varJ`` each at least ε = 1e-6, in box-mean units: the
working-grid images lie in [0, 1] and tissue windows have variances around 1e-3): a smooth
denominator such as ``varI·varJ + ε`` biases the optimum towards a moving image of higher local
variance (its gradient at ``J = I`` is not 0) and made identical images drift; the clamps only act
in flat windows (background). The mean runs over the project's
mask, :func:`spirs_tf.losses.lncc_mask`: voxels non-zero in the fixed image and not in its lesion
mask, or non-zero in the warped moving image and not in its warped lesion mask.

**Speed.** Each optimisation step (warp, LNCC, gradient, Adam update) is one XLA-compiled function
(``tf.function(jit_compile=True)``), traced and compiled once per grid shape and process (1–5 s
each on a 2-core CPU); :func:`spirs_tf.xla_cache.enable_compile_cache` keeps the compiled code on
disk for later processes. Measured figures: ``experiments/refine_eval.py``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from spirs_tf import transforms
from spirs_tf._compat import ops
from spirs_tf.refine_grids import downsample, grid_relation, resample_field  # noqa: F401 (re-exported)
from spirs_tf.refine_ops import (DEFORMABLE_ADAM_EPS, WARMUP, affine_coordinates, compiled, fixed_stats,
                                  interpolation_matrix, jacobian_det, lncc_mask, masked_lncc, schedule,
                                  upsample)

__all__ = [
    "AffineRefinement", "DeformableRefinement", "DEFAULT_AFFINE_LEVELS", "DEFAULT_BENDING",
    "DEFAULT_DEFORMABLE_LEVELS",
    "default_levels", "downsample", "grid_relation", "interpolation_matrix", "matrix_to_grid", "refine",
    "refine_affine", "refine_deformable", "resample_field", "terminal_progress",
]

#: ``(factor, iterations)`` per affine level, coarse to fine, for grids up to 64³ (:func:`default_levels`).
DEFAULT_AFFINE_LEVELS = ((4, 40), (2, 30), (1, 10))
#: ``(factor, control factor, iterations)`` per deformable level, coarse to fine: the images are on
#: the grid / factor, the optimised control field on that level grid / control factor. One level on
#: the finest optimised grid: a coarse (6 mm) level first moved small lesions off their place
#: (measured on the 8 ``spirs demo`` patients, native-grid Dice of the warped prior mask, median
#: 0.76 with ``((2, 1, 40), (1, 1, 8))`` and λ = 3, 0.85 with this and λ = :data:`DEFAULT_BENDING`;
#: on 12 synthetic pairs scored on the 3 mm grid, median 0.87 → 0.84, mean 0.84 → 0.84).
DEFAULT_DEFORMABLE_LEVELS = ((1, 1, 30),)
#: Default bending-energy weight λ of :func:`refine_deformable` (see :data:`DEFAULT_DEFORMABLE_LEVELS`).
DEFAULT_BENDING = 10.0
#: Largest grid (voxels per axis) optimised at full resolution by :func:`default_levels`.
FINEST_OPTIMISED = 64


def default_levels(shape) -> tuple[tuple, tuple]:
    """``(affine levels, deformable levels)`` for a grid: the defaults, every factor multiplied by
    ``g = 2^k``, the smallest power of two with ``max(shape)/g ≤`` :data:`FINEST_OPTIMISED`.

    So the optimisation always runs on grids of at most 64³ (3 mm voxels for a 1.5 mm 128³ grid, whose
    result is upsampled linearly): its cost stays that of a 64³ pair, and a field smooth at 3 mm does
    not morph lesions away. Example: 128³ → affine ``((8, 40), (4, 30), (2, 10))``, deformable
    ``((2, 1, 30),)``.
    """
    g = 1
    while max(int(n) for n in shape) / g > FINEST_OPTIMISED:
        g *= 2
    return (tuple((f * g, n) for f, n in DEFAULT_AFFINE_LEVELS),
            tuple((f * g, s, n) for f, s, n in DEFAULT_DEFORMABLE_LEVELS))
Progress = Callable[[str, int, int, float], None]


# ------------------------------------------------------------------------------------ results
@dataclass(eq=False)
class AffineRefinement:
    """Result of :func:`refine_affine`.

    Attributes:
        matrix: ``(3, 4)`` float32 ``[M | t]``, voxels of the input grid (same convention as the network's).
        losses: per level ``(factor, array of the loss before each iteration)``; loss = −masked LNCC.
        lncc_before, lncc_after: the optimised masked LNCC on the finest level for ``matrix0`` and ``matrix``;
            ``lncc_after >= lncc_before`` always (keep-best, :func:`refine_affine`).
        seconds: wall time, compilation included.
    """

    matrix: np.ndarray
    losses: list = field(default_factory=list)
    lncc_before: float = float("nan")
    lncc_after: float = float("nan")
    seconds: float = 0.0


@dataclass(eq=False)
class DeformableRefinement:
    """Result of :func:`refine_deformable`.

    Attributes:
        dvf: ``(D, H, W, 3)`` float32 displacement in voxels of the input grid, added after the affine in
            moving space (same convention as the network's DVF).
        losses: per level ``(factor, array of the loss before each iteration)``; loss = −LNCC + λ·BE + μ·fold.
        lncc_before, lncc_after: the optimised masked LNCC on the finest level for ``dvf0`` and ``dvf``
            (same affine).
        folding_percent: % of voxels with a Jacobian determinant ≤ 0 (the central-difference determinant of
            :func:`spirs_tf.metrics.folding_percent`).
        seconds: wall time, compilation included.
    """

    dvf: np.ndarray
    losses: list = field(default_factory=list)
    lncc_before: float = float("nan")
    lncc_after: float = float("nan")
    folding_percent: float = float("nan")
    seconds: float = 0.0


# ------------------------------------------------------------------------------ argument checks
def _volume(x, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} is required, got None")
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3-D volume (D, H, W) or (D, H, W, 1), got shape {a.shape}")
    if min(a.shape) < 4:
        raise ValueError(f"{name} needs at least 4 voxels per axis, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _optional_mask(x, name: str, shape) -> np.ndarray | None:
    if x is None:
        return None
    a = _volume(x, name)
    if a.shape != shape:
        raise ValueError(f"{name} must be on the fixed grid {shape}, got shape {a.shape}")
    return (a != 0).astype(np.float32)


def _matrix(x, name: str = "matrix0") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.shape == (1, 3, 4):
        a = a[0]
    if a.shape != (3, 4):
        raise ValueError(f"{name} must be a 3×4 matrix [M | t] (or (1, 3, 4)), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if abs(np.linalg.det(a[:, :3])) < 1e-6:
        raise ValueError(f"{name} has a singular linear part (det {np.linalg.det(a[:, :3]):.3g})")
    return a


def _factor(f, what: str) -> int:
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"{what} must be a positive integer, got {f!r}")
    return int(f)


def _iterations(n, what: str) -> int:
    if int(n) != n or n < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {n!r}")
    return int(n)


def _positive(x, what: str, allow_zero: bool = False) -> float:
    x = float(x)
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'non-negative' if allow_zero else 'positive'} and finite, got {x!r}")
    return x


def _window(window) -> int:
    if int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window!r}")
    return int(window)


# ------------------------------------------------------------------------------------ grids
def matrix_to_grid(matrix, scale: float, offset=0.0) -> np.ndarray:
    """A centred voxel affine ``[M | t]`` of an ``n``-voxel grid on the grid ``x' = scale·x + offset`` of
    ``scale·n`` voxels (both centred at N/2): ``[M | scale·t + (I − M)·offset]`` (from
    ``p' = scale·p + offset``); offset 0 is :func:`spirs_tf.transforms.scale_translation`. (3, 4) float32.
    """
    m = _matrix(matrix, "matrix")
    d = np.broadcast_to(np.asarray(offset, np.float64), (3,))
    out = m.copy()
    out[:, 3] = scale * m[:, 3] + (np.eye(3) - m[:, :3]) @ d
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------ helpers
def _t(x):
    return ops.convert_to_tensor(np.asarray(x, np.float32))


def _level_inputs(fixed, moving, fixed_mask, moving_mask, factor: int, window: int, cache: dict | None = None):
    """Tensors of one level: fixed (1, n, n, n, 1), its stats, the fixed keep mask, moving (+ lesion channel).

    ``cache``: a dict kept by the caller for one pair of volumes (:func:`refine` shares it between stages).
    """
    if cache is not None and (factor, window) in cache:
        return cache[(factor, window)]
    if cache is not None:
        cache[(factor, window)] = _level_inputs(fixed, moving, fixed_mask, moving_mask, factor, window)
        return cache[(factor, window)]
    f_l = downsample(fixed, factor)
    m_l = downsample(moving, factor)
    keep = f_l != 0
    if fixed_mask is not None:
        keep &= downsample(fixed_mask, factor, "mask") == 0
    channels = [m_l]
    if moving_mask is not None:
        channels.append(downsample(moving_mask, factor, "mask"))
    fixed_t = _t(f_l[None, ..., None])
    mean_i, var_i = fixed_stats(fixed_t, window)
    return (fixed_t, mean_i, var_i, _t(keep.astype(np.float32)[None, ..., None]),
            _t(np.stack(channels, -1)[None]))


def _lncc_level(inputs, factor: int, shape, matrix, dvf, window: int) -> float:
    """Masked LNCC (the optimised quantity) on one level for the transform ``(matrix, dvf)`` of the grid ``shape``."""
    fixed_t, mean_i, var_i, keep, moving_t = inputs
    grid = transforms.identity_grid(fixed_t.shape[1:4])
    centre = _t(np.asarray(shape, np.float32) / 2.0)
    coords = affine_coordinates(ops.zeros(12), _t(matrix), grid, _t(factor), centre, _t(1.0))[None]
    if dvf is not None:
        coords = coords + _t(dvf[::factor, ::factor, ::factor][None] / factor)
    warped = transforms.resample(moving_t, coords)
    return float(masked_lncc(fixed_t, mean_i, var_i, warped[..., :1], lncc_mask(keep, warped), window))


def terminal_progress(stream=None, every: int = 5) -> Progress:
    """A ``progress`` callback: one updating line ``refine affine      35/80  loss -0.9123`` on ``stream``
    (default stderr) every ``every`` iterations and at the end of each stage (then a newline)."""
    import sys

    def report(stage: str, done: int, total: int, loss: float) -> None:
        out = stream if stream is not None else sys.stderr
        if done % every and done != total:
            return
        print(f"\rrefine {stage:<10} {done:4d}/{total:<4d} loss {loss:+.4f}", end="\n" if done == total else "",
              file=out, flush=True)

    return report


def _notify(progress, stage, done, total, loss):
    if progress is not None:
        progress(stage, done, total, float(loss))


# -------------------------------------------------------------------------------------- affine
def _checked_pair(fixed, moving, fixed_mask, moving_mask):
    """The two volumes and optional masks of a refinement, checked (3-D, finite, one grid) and as float32."""
    fixed, moving = _volume(fixed, "fixed"), _volume(moving, "moving")
    if moving.shape != fixed.shape:
        raise ValueError(f"fixed and moving must be on the same grid, got {fixed.shape} and {moving.shape}")
    return (fixed, moving, _optional_mask(fixed_mask, "fixed_mask", fixed.shape),
            _optional_mask(moving_mask, "moving_mask", fixed.shape))


def refine_affine(fixed, moving, matrix0, *, fixed_mask=None, moving_mask=None,
                  levels: Sequence | None = None, learning_rate: float = 0.3, window: int = 9,
                  progress: Progress | None = None, _cache: dict | None = None) -> AffineRefinement:
    """Optimise the 12 affine entries from ``matrix0`` on the masked LNCC, coarse to fine.

    Parametrisation: ``M = M0 + ΔM/R``, ``t = t0 + Δt`` with ``R = mean(N)/4`` voxels, so one unit of every
    parameter moves a point at distance ``R`` from the centre by about one voxel; Adam per level with a
    learning rate ``learning_rate·factor`` voxels, cosine-decayed to 5 % within the level.

    Keep-best: each level ends at its best iterate by that level's loss (the last one included; on a
    revert Adam's moments restart from 0), and the result is ``matrix0`` itself unless it raises the
    masked LNCC of the finest level, so an optimiser that overshoots (too high a learning rate, a
    step out of the basin) never returns a matrix worse than its start.

    Args:
        fixed: ``(D, H, W)`` (or ``(D, H, W, 1)``) new scan, background exactly 0.
        moving: prior scan on the same grid.
        matrix0: ``(3, 4)`` (or ``(1, 3, 4)``) start ``[M | t]`` in voxels of this grid (the network's
            ``affine`` output, or the identity).
        fixed_mask, moving_mask: optional lesion masks of the two scans (≠ 0 = lesion, excluded from
            the LNCC as in :func:`spirs_tf.losses.lncc_mask`).
        levels: ``(factor, iterations)`` pairs, coarse to fine; factors are positive integers. None:
            :func:`default_levels` of the grid.
        learning_rate: Adam step in voxels of each level.
        window: LNCC box size (odd).
        progress: optional ``progress(stage, done, total, loss)``, called after every iteration with
            ``stage = "affine"``.

    Returns:
        :class:`AffineRefinement` (``matrix`` ``(3, 4)`` float32 in the convention of ``matrix0``).

    Raises:
        ValueError: volumes not 3-D / not on one grid / not finite, a bad matrix, levels, rate or window.
    """
    t_start = time.perf_counter()
    _cache = {} if _cache is None else _cache
    fixed, moving, fixed_mask, moving_mask = _checked_pair(fixed, moving, fixed_mask, moving_mask)
    base = _matrix(matrix0)
    window = _window(window)
    lr0 = _positive(learning_rate, "learning_rate")
    levels = default_levels(fixed.shape)[0] if levels is None else levels
    plan = [(_factor(f, "affine level factor"), _iterations(n, "affine level iterations"))
            for f, n in _pairs(levels, 2, "affine levels")]
    shape = np.asarray(fixed.shape, np.float32)
    centre, radius = _t(shape / 2.0), _t(float(shape.mean()) / 4.0)
    step_fn = compiled("affine")
    theta = ops.zeros(12, "float32")
    m, v = ops.zeros_like(theta), ops.zeros_like(theta)  # Adam's moments carry over from level to level
    total, done, traces = sum(n for _, n in plan), 0, []
    base_t = _t(base)
    for factor, n_iter in plan:
        if n_iter == 0:
            continue
        inputs = _level_inputs(fixed, moving, fixed_mask, moving_mask, factor, window, _cache)
        fixed_t, mean_i, var_i, keep, moving_t = inputs
        grid = transforms.identity_grid(fixed_t.shape[1:4])
        losses, best_loss, best_theta = [], math.inf, theta
        for k in range(n_iter):
            lr = _t(schedule(lr0 * factor, k, n_iter, WARMUP if done < WARMUP else 0))
            new_theta, m, v, loss = step_fn(theta, m, v, _t(done + 1), lr, base_t, grid, _t(factor), centre, radius,
                                            fixed_t, mean_i, var_i, keep, moving_t, window)
            losses.append(float(loss))  # the loss of ``theta``, before this update
            if losses[-1] < best_loss:
                best_loss, best_theta = losses[-1], theta
            theta = new_theta
            done += 1
            _notify(progress, "affine", done, total, loss)
        last = -_lncc_level(inputs, factor, fixed.shape, _theta_matrix(base, theta, radius), None, window)
        if not last <= best_loss:  # keep the level's best iterate (an overshoot, a NaN)
            theta, m, v = best_theta, ops.zeros_like(theta), ops.zeros_like(theta)
        traces.append((factor, np.asarray(losses)))
    matrix = _theta_matrix(base, theta, radius)
    finest = min(f for f, _ in plan)
    inputs = _level_inputs(fixed, moving, fixed_mask, moving_mask, finest, window, _cache)
    before = _lncc_level(inputs, finest, fixed.shape, base.astype(np.float32), None, window)
    after = _lncc_level(inputs, finest, fixed.shape, matrix, None, window)
    if not after >= before:  # never worse than the start on the finest level
        matrix, after = base.astype(np.float32), before
    return AffineRefinement(matrix, traces, before, after, time.perf_counter() - t_start)


def _theta_matrix(base: np.ndarray, theta, radius) -> np.ndarray:
    """``[M0 + ΔM/R | t0 + Δt]`` (float32) from the 12 optimised offsets ``theta``."""
    th = np.asarray(theta, np.float64)
    matrix = np.array(base, np.float64)
    matrix[:, :3] += th[:9].reshape(3, 3) / float(radius)
    matrix[:, 3] += th[9:]
    return matrix.astype(np.float32)


def _pairs(levels, width: int, what: str):
    try:
        items = [tuple(level) for level in levels]
    except TypeError:
        raise ValueError(f"{what} must be a sequence of {width}-tuples, got {levels!r}") from None
    if not items or any(len(item) != width for item in items):
        raise ValueError(f"{what} must be a non-empty sequence of {width}-tuples, got {levels!r}")
    return items


# ---------------------------------------------------------------------------------- deformable
def refine_deformable(fixed, moving, matrix, dvf0=None, *, fixed_mask=None, moving_mask=None,
                      levels: Sequence | None = None, bending_weight: float = DEFAULT_BENDING,
                      folding_weight: float = 100.0, learning_rate: float = 0.2, window: int = 9,
                      progress: Progress | None = None, _cache: dict | None = None) -> DeformableRefinement:
    """Optimise a dense displacement after the fixed affine ``matrix``, starting from ``dvf0``.

    Per level ``(f, s, n)`` the images are on the grid ``N/f`` (:func:`downsample`), the field there is
    ``u_f = u[::f]/f + up_s(v)`` with a control field ``v`` on the grid ``⌈N/f⌉/s`` (zero at the start of
    the level; ``up_s``: linear, corner aligned, :func:`interpolation_matrix`), and ``n`` Adam steps
    (gradients scaled by the level's voxel count, ε = :data:`DEFORMABLE_ADAM_EPS`) minimise::

        −LNCC_masked(fixed, moving ∘ p) + λ·BE(u_f) + μ·mean(max(0.2 − det(I + ∇u_f), 0)²)

    (BE: :func:`spirs_tf.losses.bending_energy`; the last term keeps every Jacobian determinant above
    0.2, so no voxel folds). The level's increment, upsampled to the input grid and multiplied by ``f``,
    is added to ``u``.

    Args:
        fixed, moving, fixed_mask, moving_mask: as :func:`refine_affine`.
        matrix: ``(3, 4)`` affine (kept fixed), voxels of this grid (e.g. ``refine_affine(...).matrix``).
        dvf0: start field ``(n0, n1, n2, 3)`` (or with a batch axis of 1) in voxels of its grid; a
            grid that is an integer multiple or fraction of this one is resampled
            (:func:`resample_field`). None = zero.
        levels: ``(factor, control factor, iterations)`` per level, coarse to fine (None:
            :func:`default_levels` of the grid); positive integers,
            the control grid at least 3 voxels per axis.
        bending_weight: λ. folding_weight: μ.
        learning_rate: Adam step in voxels of each level (cosine-decayed to 5 % within a level).
        window: LNCC box size.
        progress: optional ``progress("deformable", done, total, loss)`` after every iteration.

    Returns:
        :class:`DeformableRefinement` (``dvf`` ``(D, H, W, 3)`` float32 in voxels of this grid).

    Raises:
        ValueError: bad volumes, matrix, field, levels (or a control grid under 3 voxels), weights.
    """
    t_start = time.perf_counter()
    _cache = {} if _cache is None else _cache
    fixed, moving, fixed_mask, moving_mask = _checked_pair(fixed, moving, fixed_mask, moving_mask)
    base = _matrix(matrix, "matrix").astype(np.float32)
    window = _window(window)
    lam = _positive(bending_weight, "bending_weight", allow_zero=True)
    mu = _positive(folding_weight, "folding_weight", allow_zero=True)
    lr0 = _positive(learning_rate, "learning_rate")
    levels = default_levels(fixed.shape)[1] if levels is None else levels
    plan = []
    for f, s, n in _pairs(levels, 3, "deformable levels"):
        f, s = _factor(f, "deformable level factor"), _factor(s, "deformable control factor")
        if min(fixed.shape) < 3 * f * s:
            raise ValueError(f"deformable level {(f, s, n)} leaves a control grid under 3 voxels on {fixed.shape}")
        plan.append((f, s, _iterations(n, "deformable level iterations")))
    if dvf0 is None:
        u = np.zeros(fixed.shape + (3,), np.float32)
    else:
        u = resample_field(dvf0, fixed.shape)
        if not np.all(np.isfinite(u)):
            raise ValueError("dvf0 contains NaN or infinite values")
    u_start = u.copy()
    shape = np.asarray(fixed.shape, np.float32)
    centre = _t(shape / 2.0)
    step_fn = compiled("deformable")
    total, done, traces = sum(n for *_, n in plan), 0, []
    for factor, ctrl_factor, n_iter in plan:
        if n_iter == 0:
            continue
        fixed_t, mean_i, var_i, keep, moving_t = _level_inputs(fixed, moving, fixed_mask, moving_mask, factor, window,
                                                               _cache)
        level_shape = tuple(fixed_t.shape[1:4])
        grid = transforms.identity_grid(level_shape)
        coords_affine = affine_coordinates(ops.zeros(12), _t(base), grid, _t(factor), centre, _t(1.0))[None]
        u_init = _t(u[::factor, ::factor, ::factor][None] / factor)
        ctrl_shape = tuple(-(-n // ctrl_factor) for n in level_shape)
        up_mats = None if ctrl_factor == 1 else tuple(
            _t(interpolation_matrix(n, c, ctrl_factor)) for n, c in zip(level_shape, ctrl_shape))
        ctrl = ops.zeros((1,) + ctrl_shape + (3,), "float32")
        m, v = ops.zeros_like(ctrl), ops.zeros_like(ctrl)
        losses = []
        for k in range(n_iter):
            lr = _t(schedule(lr0, k, n_iter, WARMUP))
            ctrl, m, v, loss = step_fn(ctrl, m, v, _t(k + 1), lr, u_init, coords_affine, up_mats, fixed_t, mean_i,
                                       var_i, keep, moving_t, _t(lam), _t(mu), window)
            losses.append(float(loss))
            done += 1
            _notify(progress, "deformable", done, total, loss)
        traces.append((factor, np.asarray(losses)))
        to_fine = tuple(_t(interpolation_matrix(n, c, factor * ctrl_factor)) for n, c in zip(fixed.shape, ctrl_shape))
        u = u + factor * ops.convert_to_numpy(upsample(ctrl, to_fine))[0]
    finest = min(f for f, *_ in plan)
    inputs = _level_inputs(fixed, moving, fixed_mask, moving_mask, finest, window, _cache)
    before = _lncc_level(inputs, finest, fixed.shape, base, u_start, window)
    after = _lncc_level(inputs, finest, fixed.shape, base, u, window)
    folding = float(100.0 * np.mean(ops.convert_to_numpy(jacobian_det(_t(u[None]))) <= 0))
    return DeformableRefinement(u.astype(np.float32), traces, before, after, folding,
                                time.perf_counter() - t_start)


def refine(fixed, moving, matrix0, dvf0=None, *, mode: str = "full", fixed_mask=None, moving_mask=None,
           deformable_start: str = "zero", affine_options: dict | None = None,
           deformable_options: dict | None = None, progress: Progress | None = None
           ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Refine the network's registration of one pair: ``mode`` ``"off"``, ``"affine"`` or ``"full"``.

    * ``"off"``: ``matrix0`` and ``dvf0`` (resampled to this grid) unchanged;
    * ``"affine"``: :func:`refine_affine` from ``matrix0``, and a zero field: the network's field was
      predicted after the network's affine and does not fit another one (measured on 12 synthetic
      pairs: warped-prior-mask Dice 0.72 with a zero field, 0.50 with the network's);
    * ``"full"``: then :func:`refine_deformable` after the refined affine, from a zero field
      (``deformable_start="zero"``, Dice 0.84) or from ``dvf0`` (``"network"``, Dice 0.83).

    Args:
        fixed, moving, fixed_mask, moving_mask: as :func:`refine_affine`.
        matrix0: the network's ``(3, 4)`` affine, voxels of this grid.
        dvf0: the network's field (any grid in integer ratio, :func:`resample_field`), or None.
        mode: see above.
        deformable_start: ``"zero"`` or ``"network"`` (needs ``dvf0``), the start of the deformable stage.
        affine_options, deformable_options: keyword arguments for the two functions (levels, weights...).
        progress: ``progress(stage, done, total, loss)``, ``stage`` ``"affine"`` then ``"deformable"``.

    Returns:
        ``(matrix (3, 4) float32, dvf (D, H, W, 3) float32 — None only for mode "off" without dvf0 —,
        info)``, both in voxels of this grid and the network's convention; ``info`` =
        ``{"mode", "affine": AffineRefinement | None, "deformable": DeformableRefinement | None,
        "seconds"}``.

    Raises:
        ValueError: an unknown mode or start, and everything the two functions raise.
    """
    if mode not in ("off", "affine", "full"):
        raise ValueError(f"refinement mode must be 'off', 'affine' or 'full', got {mode!r}")
    if deformable_start not in ("zero", "network"):
        raise ValueError(f"deformable_start must be 'zero' or 'network', got {deformable_start!r}")
    if mode == "full" and deformable_start == "network" and dvf0 is None:
        raise ValueError("deformable_start='network' needs the network's field dvf0")
    t0 = time.perf_counter()
    fixed_arr = _volume(fixed, "fixed")
    matrix = _matrix(matrix0).astype(np.float32)
    dvf = None if dvf0 is None else resample_field(dvf0, fixed_arr.shape)
    info = {"mode": mode, "affine": None, "deformable": None}
    cache: dict = {}  # level tensors of this pair, shared by the two stages
    if mode != "off":
        res = refine_affine(fixed_arr, moving, matrix, fixed_mask=fixed_mask, moving_mask=moving_mask,
                            progress=progress, _cache=cache, **(affine_options or {}))
        matrix, info["affine"] = res.matrix, res
        start = dvf if mode == "full" and deformable_start == "network" else None
        dvf = np.zeros(fixed_arr.shape + (3,), np.float32)
    if mode == "full":
        res = refine_deformable(fixed_arr, moving, matrix, start, fixed_mask=fixed_mask, moving_mask=moving_mask,
                                progress=progress, _cache=cache, **(deformable_options or {}))
        dvf, info["deformable"] = res.dvf, res
    info["seconds"] = time.perf_counter() - t0
    return matrix, dvf, info
