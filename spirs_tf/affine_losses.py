"""Affine supervision of SPIRS: the losses between a predicted and the true affine of every level.

* :func:`affine_mse` -- Eq. 1 as written: the MSE over the 12 entries of ``[M | t]``
  (``loss.affine_supervision = "matrix"``, the paper's and the shipped weights' choice);
* :func:`affine_displacement_mse` -- the mean squared displacement error ``mean_x ‖(T̂ − T)[x − c; 1]‖²``
  (``"displacement"``), in closed form from the second moments of the voxel coordinates of a grid
  (:func:`grid_moments`) or of a mask (:func:`mask_moments`);
* :func:`level_affine` -- an affine of the S grid in voxels of a coarser pyramid level.

Why two. With translations in voxels, Eq. 1 is dominated by the translation: on 64³ a 5° rotation error
costs as much as a 0.12-voxel shift, so the linear part (rotation, scale, shear) is barely supervised.
The displacement error weighs every component by how far it moves the voxels: the same rotation moves
the voxels of a 64³ grid by 2.3 voxels (root mean square).

Scale. For a pure translation error the displacement form is 12× Eq. 1 (a sum over 3 components, not a
mean over 12 entries), and its gradient on the linear part grows with the grid's E[(x − c)²] (≈ 21 on 16³,
≈ 341 on 64³): with ``loss.weight_mse = 1`` the cpu-small stage 1 (16³, SGD at 1e-2) turned NaN within 10
steps, with 1/12 it trained stably (measured with 6 synthetic patients, 150 steps).

Conventions (those of :mod:`spirs_tf.transforms`): an affine ``[M | t]`` maps centred voxel coordinates,
``p(x) = M(x − c) + t + c`` with ``c = N/2`` per axis. Same reduction policy as :mod:`spirs_tf.losses`:
every function returns per-sample values (B,); float64 inputs stay float64.
"""
from __future__ import annotations

from spirs_tf._compat import ops
from spirs_tf._loss_util import check_rank as _check_rank
from spirs_tf._loss_util import check_same as _check_same
from spirs_tf._loss_util import float_tensor as _float
from spirs_tf._loss_util import per_sample_sum as _per_sample_sum
from spirs_tf.config import AFFINE_SUPERVISION  # ("matrix", "displacement"): cfg.loss.affine_supervision

__all__ = ["AFFINE_SUPERVISION", "affine_mse", "affine_displacement_mse", "grid_moments", "mask_moments",
           "level_affine"]


def affine_mse(true, pred):
    """Affine MSE of Eq. 1: ``mean over the 12 entries of (T_true − T̂)²``.

    Args:
        true: (B, 3, 4) ground-truth matrices ``[M | t]`` (voxels of the model's finest grid).
        pred: (B, 3, 4) predicted matrices, same units.

    Returns:
        (B,) mean squared difference per sample (the authors average over the 12 entries, not the 15
        parameters; translations in voxels dominate the term).

    Raises:
        ValueError: if the shapes are not (B, 3, 4) or differ.
    """
    true, pred = _float(true), _float(pred)
    _check_rank(true, 3, "true", "(B, 3, 4)")
    _check_same(true, pred, "true", "pred")
    if tuple(true.shape[1:]) != (3, 4):
        raise ValueError(f"affine matrices must have shape (B, 3, 4), got {tuple(true.shape)}")
    pred = ops.cast(pred, true.dtype)
    return ops.mean(ops.square(true - pred), axis=(1, 2))


def grid_moments(shape, dtype="float32"):
    """Second moments ``H = mean_x h·hᵀ`` of ``h = [x − c; 1]`` over a whole voxel grid, ``c = N/2``.

    Per axis the coordinates ``y = x − N/2`` run over ``−N/2 … N/2 − 1`` (x = 0 … N − 1), so
    ``E[y] = −1/2``, ``E[y²] = (N² − 1)/12 + 1/4`` and, the axes being independent,
    ``E[y_j·y_k] = 1/4`` for ``j ≠ k``.

    Args:
        shape: the three grid sizes ``(D, H, W)``.
        dtype: dtype of the result.

    Returns:
        (4, 4) symmetric matrix ``[[E[y yᵀ], E[y]], [E[y]ᵀ, 1]]``.

    Raises:
        ValueError: unless ``shape`` is three sizes >= 1.
    """
    sizes = [float(n) for n in shape]
    if len(sizes) != 3 or any(n < 1 for n in sizes):
        raise ValueError(f"grid shape must be three positive sizes, got {tuple(shape)}")
    rows = []
    for j in range(4):
        row = []
        for k in range(4):
            if j == 3 and k == 3:
                row.append(1.0)
            elif j == 3 or k == 3:
                row.append(-0.5)
            elif j == k:
                row.append((sizes[j] ** 2 - 1.0) / 12.0 + 0.25)
            else:
                row.append(0.25)
        rows.append(row)
    return ops.convert_to_tensor(rows, dtype=dtype)


def mask_moments(mask):
    """Second moments ``H = Σ_x m(x)·h·hᵀ / Σ_x m(x)`` of ``h = [x − c; 1]`` over a voxel mask, per sample.

    ``c = N/2`` per axis (the project's centre). Samples whose mask is empty get the whole-grid
    moments of :func:`grid_moments`. The result carries no gradient.

    Args:
        mask: (B, D, H, W, 1) weights (e.g. ``fixed_image ≠ 0``).

    Returns:
        (B, 4, 4) symmetric moment matrices, dtype of ``mask`` (float32 unless float64).

    Raises:
        ValueError: if ``mask`` is not rank 5 or its spatial shape is unknown.
    """
    m = _float(mask)
    _check_rank(m, 5, "mask", "(B, D, H, W, 1)")
    shape = tuple(m.shape[1:4])
    if any(s is None for s in shape):
        raise ValueError(f"mask_moments needs a static spatial shape, got {tuple(m.shape)}")
    m = ops.stop_gradient(m[..., 0])
    count = _per_sample_sum(m)
    safe = ops.maximum(count, 1e-12)
    coords = []
    for axis, n in enumerate(shape):
        view = [1, 1, 1, 1]
        view[axis + 1] = n
        y = ops.arange(n, dtype=m.dtype) - float(n) / 2.0
        coords.append(ops.reshape(y, tuple(view)))
    ones = ops.ones((1, 1, 1, 1), dtype=m.dtype)
    h = coords + [ones]
    entries = [[None] * 4 for _ in range(4)]
    for j in range(4):
        for k in range(j, 4):
            value = _per_sample_sum(m * (h[j] * h[k])) / safe
            entries[j][k] = entries[k][j] = value
    moments = ops.stack([ops.stack(row, axis=-1) for row in entries], axis=-2)     # (B, 4, 4)
    full = grid_moments(shape, m.dtype)[None]
    return ops.stop_gradient(ops.where((count > 0)[:, None, None], moments, full))


def affine_displacement_mse(true, pred, moments):
    """Mean squared displacement error of an affine: ``mean_x ‖(T̂ − T)·[x − c; 1]‖²``.

    With ``E = T̂ − T`` (3 × 4) and ``H = mean_x h·hᵀ`` the second moments of ``h = [x − c; 1]``
    over the voxels x (the whole grid, :func:`grid_moments`, or a mask, :func:`mask_moments`), the
    mean of the quadratic form is exact in closed form::

        mean_x ‖E·h(x)‖² = trace(E·H·Eᵀ) = Σ_rows e_r·H·e_rᵀ

    (no voxel loop). It is the squared length of the displacement error, summed over the 3 axes and
    averaged over voxels, in the units of the matrices (voxels of the grid that ``H`` describes), so
    rotation, scale, shear and translation weigh by how far they move the voxels. For a pure
    translation error ``t`` it equals ``‖t‖²``, 12× the 12-entry MSE of :func:`affine_mse`.

    Args:
        true: (B, 3, 4) ground-truth matrices ``[M | t]`` in centred voxels of the grid.
        pred: (B, 3, 4) predicted matrices, same units.
        moments: (4, 4) or (B, 4, 4) moments ``H`` of that grid (no gradient flows into them).

    Returns:
        (B,) mean squared displacement error per sample (voxels²).

    Raises:
        ValueError: if the matrices are not (B, 3, 4) or differ, or ``moments`` is not (…, 4, 4).
    """
    true, pred = _float(true), _float(pred)
    _check_rank(true, 3, "true", "(B, 3, 4)")
    _check_same(true, pred, "true", "pred")
    if tuple(true.shape[1:]) != (3, 4):
        raise ValueError(f"affine matrices must have shape (B, 3, 4), got {tuple(true.shape)}")
    h = ops.stop_gradient(ops.cast(ops.convert_to_tensor(moments), true.dtype))
    if len(h.shape) not in (2, 3) or tuple(h.shape[-2:]) != (4, 4):
        raise ValueError(f"moments must have shape (4, 4) or (B, 4, 4), got {tuple(h.shape)}")
    if len(h.shape) == 2:
        h = h[None]
    err = ops.cast(pred, true.dtype) - true
    return ops.sum(err * ops.matmul(err, h), axis=(1, 2))


def level_affine(matrix, factor: int):
    """``[M | t] → [M | t / factor]``: a centred S-grid affine in voxels of the grid ``factor``× coarser."""
    if factor == 1:
        return matrix
    return ops.concatenate([matrix[:, :, :3], matrix[:, :, 3:] / float(factor)], axis=-1)
