"""Test-time refinement (instance optimisation) of the network's registration, beyond the paper.

Starting from the network's output for one pair, two optimisations on that pair alone (the practice
of the Learn2Reg leaders):

* :func:`refine_affine`: the 12 entries of the affine, coarse to fine on Gaussian-smoothed strided
  grids, maximising the masked LNCC;
* :func:`refine_deformable`: a dense displacement field after that affine, parametrised by a control
  field on a coarser grid (upsampled with :func:`spirs_tf.transforms.upsample2x`), minimising
  ``−LNCC + λ·bending energy + μ·folding penalty``, coarse to fine.

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
about 5× faster than the cumulative sums under XLA. The clamp is ``eps`` on the box-mean
covariances (1e-6; the working-grid images lie in [0, 1]). The mean runs over the project's
mask, :func:`spirs_tf.losses.lncc_mask`: voxels non-zero in the fixed image and not in its lesion
mask, or non-zero in the warped moving image and not in its warped lesion mask.

**Speed.** Each optimisation step (warp, LNCC, gradient, Adam update) is one XLA-compiled function
(``tf.function(jit_compile=True)``), traced once per grid shape; measured figures are in
``experiments/refine_eval.py``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from spirs_tf import transforms
from spirs_tf._compat import tf
from spirs_tf.losses import bending_energy

__all__ = [
    "AffineRefinement", "DeformableRefinement", "DEFAULT_AFFINE_LEVELS", "DEFAULT_DEFORMABLE_LEVELS",
    "downsample", "refine", "refine_affine", "refine_deformable", "resample_field",
]

#: ``(factor, iterations)`` per affine level, coarse to fine.
DEFAULT_AFFINE_LEVELS = ((4, 40), (2, 30), (1, 10))
#: ``(factor, control factor, iterations)`` per deformable level, coarse to fine: the images are on
#: the grid / factor, the optimised control field on that level grid / control factor.
DEFAULT_DEFORMABLE_LEVELS = ((2, 1, 40), (1, 2, 20))
LNCC_EPS = 1e-6

Progress = Callable[[str, int, int, float], None]


# ------------------------------------------------------------------------------------ results
@dataclass(eq=False)
class AffineRefinement:
    """Result of :func:`refine_affine`.

    Attributes:
        matrix: ``(3, 4)`` float32 ``[M | t]``, voxels of the input grid (same convention as the network's).
        losses: per level ``(factor, array of the loss before each iteration)``; loss = −masked LNCC.
        lncc_before, lncc_after: masked LNCC on the input grid for ``matrix0`` and ``matrix``.
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
        lncc_before, lncc_after: masked LNCC on the input grid for ``dvf0`` and ``dvf`` (same affine).
        folding_percent: % of voxels with a Jacobian determinant ≤ 0 (:func:`spirs_tf.metrics.folding_percent`).
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


# ------------------------------------------------------------------------------------ pyramids
def downsample(image: np.ndarray, factor: int, kind: str = "image") -> np.ndarray:
    """A level ``factor`` times coarser, corner aligned: voxel ``i`` ↔ voxel ``factor·i`` of ``image``.

    ``image``: Gaussian smoothing (σ = factor/2 voxels) normalised inside the head (the blur of the
    non-zero indicator), then the strided subsample; voxels whose smoothed head fraction is below 0.5
    are exactly 0, so the background stays 0. ``mask``: the maximum over a ``(2·factor − 1)``³
    neighbourhood, then the strided subsample (no lesion is lost). float32.
    """
    if factor == 1:
        return np.asarray(image, np.float32)
    if kind == "mask":
        return ndimage.maximum_filter(image, size=2 * factor - 1, mode="constant")[::factor, ::factor, ::factor]
    sigma = 0.5 * factor
    head = ndimage.gaussian_filter((image != 0).astype(np.float32), sigma, mode="constant")
    smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma, mode="constant")
    out = np.where(head >= 0.5, smooth / np.maximum(head, 1e-6), 0.0)
    return out[::factor, ::factor, ::factor].astype(np.float32)


def resample_field(dvf, shape) -> np.ndarray:
    """A displacement field ``(n0, n1, n2, 3)`` (voxels of its grid) on a grid ``shape`` of the same extent.

    The grids are corner aligned with integer ratio ``f = N/n`` per axis (voxel ``i`` of the coarse grid
    is voxel ``f·i`` of the fine one, as the network's pyramid), so ``u_N(x) = f·u_n(x/f)``, linear
    interpolation (extrapolated flat beyond the last coarse voxel); a finer-to-coarser ratio
    (``n = f·N``) takes the strided subsample ``u_n[::f]/f``. Returns float32 ``(*shape, 3)``.

    Raises:
        ValueError: not a ``(..., 3)`` field or ratios that are not integers.
    """
    u = np.asarray(dvf, np.float32)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    shape = tuple(int(n) for n in shape)
    if u.ndim != 4 or u.shape[-1] != 3 or len(shape) != 3:
        raise ValueError(f"dvf must be (D, H, W, 3) and shape 3 sizes, got {u.shape} and {shape}")
    if u.shape[:3] == shape:
        return u
    ratios = []
    for n, m in zip(u.shape[:3], shape):
        if m % n == 0:
            ratios.append(m / n)
        elif n % m == 0:
            ratios.append(-(n // m))
        else:
            raise ValueError(f"dvf grid {u.shape[:3]} and target grid {shape} are not integer multiples")
    if all(r < 0 for r in ratios) and len(set(ratios)) == 1:
        f = -int(ratios[0])
        return u[::f, ::f, ::f] / f
    if any(r < 0 for r in ratios) or len(set(ratios)) != 1:
        raise ValueError(f"dvf grid {u.shape[:3]} and target grid {shape} need one common integer ratio")
    f = ratios[0]
    coords = np.meshgrid(*[np.minimum(np.arange(m) / f, n - 1) for n, m in zip(u.shape[:3], shape)],
                         indexing="ij")
    out = np.stack([ndimage.map_coordinates(u[..., a], coords, order=1, mode="nearest") for a in range(3)], -1)
    return (out * f).astype(np.float32)


# -------------------------------------------------------------------------------- tensor pieces
def _box_mean(x, window: int):
    """Mean over a ``window``³ box centred on each voxel, zero padding, ``n = window³`` always."""
    r = window // 2
    x = tf.pad(x, [[0, 0], [r, r], [r, r], [r, r], [0, 0]])
    for ksize in ((window, 1, 1), (1, window, 1), (1, 1, window)):
        x = tf.nn.avg_pool3d(x, ksize, [1, 1, 1, 1, 1], "VALID")
    return x


def _fixed_stats(fixed, window: int):
    """Box mean and variance of the fixed image ``(1, D, H, W, 1)`` each (computed once per level)."""
    m = _box_mean(tf.concat([fixed, fixed * fixed], -1), window)
    return m[..., :1], m[..., 1:] - m[..., :1] * m[..., :1]


def _masked_lncc(fixed, mean_i, var_i, warped, mask, window: int):
    """Masked mean of the authors' cc = cross² / (varI·varJ) from box means (see the module docstring)."""
    m = _box_mean(tf.concat([warped, warped * warped, fixed * warped], -1), window)
    mean_j = m[..., 0:1]
    cross = tf.maximum(m[..., 2:3] - mean_i * mean_j, LNCC_EPS)
    var_j = tf.maximum(m[..., 1:2] - mean_j * mean_j, LNCC_EPS)
    cc = (cross / tf.maximum(var_i, LNCC_EPS)) * (cross / var_j)
    return tf.reduce_sum(cc * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


def _lncc_mask(fixed_keep, warped):
    """The project's LNCC mask from the precomputed fixed part and the warped (image, lesion) channels."""
    moving_keep = tf.cast(tf.not_equal(warped[..., :1], 0.0), tf.float32)
    if warped.shape[-1] > 1:
        moving_keep = moving_keep * tf.cast(tf.equal(warped[..., 1:2], 0.0), tf.float32)
    return tf.stop_gradient(tf.maximum(fixed_keep, moving_keep))


def _jacobian_det(u):
    """det(I + ∇u) by central differences on the interior, ``(1, D, H, W, 3) → (1, D−2, H−2, W−2)``."""
    c = slice(1, -1)
    d0 = (u[:, 2:, c, c] - u[:, :-2, c, c]) * 0.5
    d1 = (u[:, c, 2:, c] - u[:, c, :-2, c]) * 0.5
    d2 = (u[:, c, c, 2:] - u[:, c, c, :-2]) * 0.5
    # j[a][b] = δ_ab + ∂u_a/∂x_b
    j = [[d[..., a] + (1.0 if a == b else 0.0) for b, d in enumerate((d0, d1, d2))] for a in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def _adam(params, grad, m, v, step, lr):
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad * grad
    m_hat = m / (1.0 - tf.pow(0.9, step))
    v_hat = v / (1.0 - tf.pow(0.999, step))
    return params - lr * m_hat / (tf.sqrt(v_hat) + 1e-8), m, v


def _cosine(lr: float, k: int, n: int) -> float:
    """Learning rate of iteration ``k`` of ``n``: cosine decay from ``lr`` to ``0.1·lr``."""
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * k / max(n - 1, 1))))


def interpolation_matrix(n_out: int, n_in: int, ratio: float) -> np.ndarray:
    """``(n_out, n_in)`` linear interpolation along one axis: output ``j`` reads input position ``j/ratio``.

    Corner aligned (output ``ratio·i`` = input ``i``), clamped to ``[0, n_in − 1]`` beyond the ends. float32.
    """
    pos = np.minimum(np.arange(n_out) / float(ratio), n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    out = np.zeros((n_out, n_in), np.float32)
    out[np.arange(n_out), lo] += 1.0 - w
    out[np.arange(n_out), hi] += w
    return out


def _upsample(v, mats):
    """Separable linear upsampling of ``(1, d, h, w, C)`` by three interpolation matrices (matmuls)."""
    v = tf.einsum("Ii,bijkc->bIjkc", mats[0], v)
    v = tf.einsum("Jj,bijkc->biJkc", mats[1], v)
    return tf.einsum("Kk,bijkc->bijKc", mats[2], v)


# ----------------------------------------------------------------------------- compiled steps
def _affine_coordinates(theta, base, grid, factor, centre, radius):
    """Level coordinates of ``p = (M0 + ΔM/R)(f·x − c) + t0 + Δt + c``, divided by ``f``."""
    m = base[:, :3] + tf.reshape(theta[:9], (3, 3)) / radius
    t = base[:, 3] + theta[9:]
    p = tf.einsum("ij,dhwj->dhwi", m, grid * factor - centre) + t + centre
    return p / factor


def _affine_loss(theta, base, grid, factor, centre, radius, fixed, mean_i, var_i, fixed_keep, moving, window):
    coords = _affine_coordinates(theta, base, grid, factor, centre, radius)
    warped = transforms.resample(moving, coords[None])
    mask = _lncc_mask(fixed_keep, warped)
    return -_masked_lncc(fixed, mean_i, var_i, warped[..., :1], mask, window)


def _affine_step(theta, m, v, step, lr, base, grid, factor, centre, radius, fixed, mean_i, var_i, fixed_keep,
                 moving, window):
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = _affine_loss(theta, base, grid, factor, centre, radius, fixed, mean_i, var_i, fixed_keep, moving,
                            window)
    grad = tape.gradient(loss, theta)
    theta, m, v = _adam(theta, grad, m, v, step, lr)
    return theta, m, v, loss


def _deformable_loss(ctrl, u_init, coords_affine, up_mats, fixed, mean_i, var_i, fixed_keep, moving, lam, mu,
                     window):
    u = u_init + (_upsample(ctrl, up_mats) if up_mats is not None else ctrl)
    warped = transforms.resample(moving, coords_affine + u)
    mask = _lncc_mask(fixed_keep, warped)
    sim = _masked_lncc(fixed, mean_i, var_i, warped[..., :1], mask, window)
    fold = tf.reduce_mean(tf.nn.relu(0.2 - _jacobian_det(u)) ** 2)
    return -sim + lam * bending_energy(u)[0] + mu * fold, sim


def _deformable_step(ctrl, m, v, step, lr, u_init, coords_affine, up_mats, fixed, mean_i, var_i, fixed_keep,
                     moving, lam, mu, window):
    with tf.GradientTape() as tape:
        tape.watch(ctrl)
        loss, _ = _deformable_loss(ctrl, u_init, coords_affine, up_mats, fixed, mean_i, var_i, fixed_keep,
                                   moving, lam, mu, window)
    grad = tape.gradient(loss, ctrl)
    ctrl, m, v = _adam(ctrl, grad, m, v, step, lr)
    return ctrl, m, v, loss


_COMPILED: dict = {}


def _compiled(name: str):
    """XLA-compiled step functions (one trace per shape; static ints marked by reduce_retracing off)."""
    if name not in _COMPILED:
        fn = {"affine": _affine_step, "deformable": _deformable_step}[name]
        _COMPILED[name] = tf.function(fn, jit_compile=True, autograph=False)
    return _COMPILED[name]


# ------------------------------------------------------------------------------------ helpers
def _t(x):
    return tf.constant(np.asarray(x, np.float32))


def _level_inputs(fixed, moving, fixed_mask, moving_mask, factor: int, window: int):
    """Tensors of one level: fixed (1, n, n, n, 1), its stats, the fixed keep mask, moving (+ lesion channel)."""
    f_l = downsample(fixed, factor)
    m_l = downsample(moving, factor)
    keep = f_l != 0
    if fixed_mask is not None:
        keep &= downsample(fixed_mask, factor, "mask") == 0
    channels = [m_l]
    if moving_mask is not None:
        channels.append(downsample(moving_mask, factor, "mask"))
    fixed_t = _t(f_l[None, ..., None])
    mean_i, var_i = _fixed_stats(fixed_t, window)
    return (fixed_t, mean_i, var_i, _t(keep.astype(np.float32)[None, ..., None]),
            _t(np.stack(channels, -1)[None]))


def _lncc_full(fixed, moving, fixed_mask, moving_mask, matrix, dvf, window: int) -> float:
    """Masked LNCC (the optimised quantity, float32 box means) on the full grid for one transform."""
    fixed_t, mean_i, var_i, keep, moving_t = _level_inputs(fixed, moving, fixed_mask, moving_mask, 1, window)
    coords = transforms.sample_coordinates(fixed.shape, _t(matrix[None]), None if dvf is None else _t(dvf[None]))
    warped = transforms.resample(moving_t, coords)
    return float(_masked_lncc(fixed_t, mean_i, var_i, warped[..., :1], _lncc_mask(keep, warped), window))


def _notify(progress, stage, done, total, loss):
    if progress is not None:
        progress(stage, done, total, float(loss))


# -------------------------------------------------------------------------------------- affine
def refine_affine(fixed, moving, matrix0, *, fixed_mask=None, moving_mask=None,
                  levels: Sequence = DEFAULT_AFFINE_LEVELS, learning_rate: float = 0.3, window: int = 9,
                  progress: Progress | None = None) -> AffineRefinement:
    """Optimise the 12 affine entries from ``matrix0`` on the masked LNCC, coarse to fine.

    Parametrisation: ``M = M0 + ΔM/R``, ``t = t0 + Δt`` with ``R = mean(N)/4`` voxels, so one unit of every
    parameter moves a point at distance ``R`` from the centre by about one voxel; Adam per level with a
    learning rate ``learning_rate·factor`` voxels, cosine-decayed to a tenth within the level.

    Args:
        fixed: ``(D, H, W)`` (or ``(D, H, W, 1)``) new scan, background exactly 0.
        moving: prior scan on the same grid.
        matrix0: ``(3, 4)`` (or ``(1, 3, 4)``) start ``[M | t]`` in voxels of this grid (the network's
            ``affine`` output, or the identity).
        fixed_mask, moving_mask: optional lesion masks of the two scans (≠ 0 = lesion, excluded from
            the LNCC as in :func:`spirs_tf.losses.lncc_mask`).
        levels: ``(factor, iterations)`` pairs, coarse to fine; factors are powers of two.
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
    fixed, moving = _volume(fixed, "fixed"), _volume(moving, "moving")
    if moving.shape != fixed.shape:
        raise ValueError(f"fixed and moving must be on the same grid, got {fixed.shape} and {moving.shape}")
    fixed_mask = _optional_mask(fixed_mask, "fixed_mask", fixed.shape)
    moving_mask = _optional_mask(moving_mask, "moving_mask", fixed.shape)
    base = _matrix(matrix0)
    window = _window(window)
    lr0 = _positive(learning_rate, "learning_rate")
    plan = [(_factor(f, "affine level factor"), _iterations(n, "affine level iterations"))
            for f, n in _pairs(levels, 2, "affine levels")]
    shape = np.asarray(fixed.shape, np.float32)
    centre, radius = _t(shape / 2.0), _t(float(shape.mean()) / 4.0)
    step_fn = _compiled("affine")
    theta = tf.zeros(12, tf.float32)
    total, done, traces = sum(n for _, n in plan), 0, []
    base_t = _t(base)
    for factor, n_iter in plan:
        if n_iter == 0:
            continue
        fixed_t, mean_i, var_i, keep, moving_t = _level_inputs(fixed, moving, fixed_mask, moving_mask, factor, window)
        grid = transforms.identity_grid(fixed_t.shape[1:4])
        m, v = tf.zeros_like(theta), tf.zeros_like(theta)
        losses = []
        for k in range(n_iter):
            lr = _t(_cosine(lr0 * factor, k, n_iter))
            theta, m, v, loss = step_fn(theta, m, v, _t(k + 1), lr, base_t, grid, _t(factor), centre, radius,
                                        fixed_t, mean_i, var_i, keep, moving_t, window)
            losses.append(float(loss))
            done += 1
            _notify(progress, "affine", done, total, loss)
        traces.append((factor, np.asarray(losses)))
    th = theta.numpy().astype(np.float64)
    matrix = base.copy()
    matrix[:, :3] += th[:9].reshape(3, 3) / float(radius)
    matrix[:, 3] += th[9:]
    matrix = matrix.astype(np.float32)
    before = _lncc_full(fixed, moving, fixed_mask, moving_mask, base.astype(np.float32), None, window)
    after = _lncc_full(fixed, moving, fixed_mask, moving_mask, matrix, None, window)
    return AffineRefinement(matrix, traces, before, after, time.perf_counter() - t_start)


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
                      levels: Sequence = DEFAULT_DEFORMABLE_LEVELS, bending_weight: float = 1.0,
                      folding_weight: float = 10.0, learning_rate: float = 0.2, window: int = 9,
                      progress: Progress | None = None) -> DeformableRefinement:
    """Optimise a dense displacement after the fixed affine ``matrix``, starting from ``dvf0``.

    Per level ``(f, s, n)`` the images are on the grid ``N/f`` (:func:`downsample`), the field there is
    ``u_f = u[::f]/f + up_s(v)`` with a control field ``v`` on the grid ``N/(f·s)`` (zero at the start of
    the level, :func:`spirs_tf.transforms.upsample2x` applied ``log2 s`` times), and ``n`` Adam steps
    minimise::

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
        levels: ``(factor, control factor, iterations)`` per level, coarse to fine; powers of two, and
            every grid size must be divisible by ``factor·control factor``.
        bending_weight: λ. folding_weight: μ.
        learning_rate: Adam step in voxels of each level (cosine-decayed to a tenth within a level).
        window: LNCC box size.
        progress: optional ``progress("deformable", done, total, loss)`` after every iteration.

    Returns:
        :class:`DeformableRefinement` (``dvf`` ``(D, H, W, 3)`` float32 in voxels of this grid).

    Raises:
        ValueError: bad volumes, matrix, field, levels (including grid sizes not divisible), weights.
    """
    from spirs_tf.metrics import folding_percent

    t_start = time.perf_counter()
    fixed, moving = _volume(fixed, "fixed"), _volume(moving, "moving")
    if moving.shape != fixed.shape:
        raise ValueError(f"fixed and moving must be on the same grid, got {fixed.shape} and {moving.shape}")
    fixed_mask = _optional_mask(fixed_mask, "fixed_mask", fixed.shape)
    moving_mask = _optional_mask(moving_mask, "moving_mask", fixed.shape)
    base = _matrix(matrix, "matrix").astype(np.float32)
    window = _window(window)
    lam = _positive(bending_weight, "bending_weight", allow_zero=True)
    mu = _positive(folding_weight, "folding_weight", allow_zero=True)
    lr0 = _positive(learning_rate, "learning_rate")
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
    step_fn = _compiled("deformable")
    total, done, traces = sum(n for *_, n in plan), 0, []
    for factor, ctrl_factor, n_iter in plan:
        if n_iter == 0:
            continue
        fixed_t, mean_i, var_i, keep, moving_t = _level_inputs(fixed, moving, fixed_mask, moving_mask, factor, window)
        level_shape = tuple(fixed_t.shape[1:4])
        grid = transforms.identity_grid(level_shape)
        coords_affine = _affine_coordinates(tf.zeros(12), _t(base), grid, _t(factor), centre, _t(1.0))[None]
        u_init = _t(u[::factor, ::factor, ::factor][None] / factor)
        ctrl_shape = tuple(-(-n // ctrl_factor) for n in level_shape)
        up_mats = None if ctrl_factor == 1 else tuple(
            _t(interpolation_matrix(n, c, ctrl_factor)) for n, c in zip(level_shape, ctrl_shape))
        ctrl = tf.zeros((1,) + ctrl_shape + (3,), tf.float32)
        m, v = tf.zeros_like(ctrl), tf.zeros_like(ctrl)
        losses = []
        for k in range(n_iter):
            lr = _t(_cosine(lr0, k, n_iter))
            ctrl, m, v, loss = step_fn(ctrl, m, v, _t(k + 1), lr, u_init, coords_affine, up_mats, fixed_t, mean_i,
                                       var_i, keep, moving_t, _t(lam), _t(mu), window)
            losses.append(float(loss))
            done += 1
            _notify(progress, "deformable", done, total, loss)
        traces.append((factor, np.asarray(losses)))
        to_fine = tuple(_t(interpolation_matrix(n, c, factor * ctrl_factor)) for n, c in zip(fixed.shape, ctrl_shape))
        u = u + factor * _upsample(ctrl, to_fine).numpy()[0]
    before = _lncc_full(fixed, moving, fixed_mask, moving_mask, base, u_start, window)
    after = _lncc_full(fixed, moving, fixed_mask, moving_mask, base, u, window)
    return DeformableRefinement(u.astype(np.float32), traces, before, after, folding_percent(u),
                                time.perf_counter() - t_start)


def refine(fixed, moving, matrix0, dvf0=None, *, mode: str = "full", fixed_mask=None, moving_mask=None,
           affine_options: dict | None = None, deformable_options: dict | None = None,
           progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Refine the network's registration of one pair: ``mode`` ``"off"``, ``"affine"`` or ``"full"``.

    ``"affine"``: :func:`refine_affine` from ``matrix0``; the field is ``dvf0`` unchanged (resampled to
    this grid). ``"full"``: then :func:`refine_deformable` from ``dvf0`` after the refined affine.

    Returns:
        ``(matrix (3, 4), dvf (D, H, W, 3) or None when dvf0 is None and mode != "full", info)`` with
        ``info`` = ``{"mode", "affine": AffineRefinement | None, "deformable": DeformableRefinement | None,
        "seconds"}``.

    Raises:
        ValueError: an unknown mode, and everything the two functions raise.
    """
    if mode not in ("off", "affine", "full"):
        raise ValueError(f"refinement mode must be 'off', 'affine' or 'full', got {mode!r}")
    t0 = time.perf_counter()
    fixed_arr = _volume(fixed, "fixed")
    matrix = _matrix(matrix0).astype(np.float32)
    dvf = None if dvf0 is None else resample_field(dvf0, fixed_arr.shape)
    info = {"mode": mode, "affine": None, "deformable": None}
    if mode != "off":
        res = refine_affine(fixed_arr, moving, matrix, fixed_mask=fixed_mask, moving_mask=moving_mask,
                            progress=progress, **(affine_options or {}))
        matrix, info["affine"] = res.matrix, res
    if mode == "full":
        res = refine_deformable(fixed_arr, moving, matrix, dvf, fixed_mask=fixed_mask, moving_mask=moving_mask,
                                progress=progress, **(deformable_options or {}))
        dvf, info["deformable"] = res.dvf, res
    info["seconds"] = time.perf_counter() - t0
    return matrix, dvf, info
