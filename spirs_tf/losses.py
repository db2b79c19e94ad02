"""Losses of SPIRS (paper Eq. 1–10) with the authors' details (FACTS section C, decision 6).

Reduction policy: **every function returns per-sample values of shape (B,)**; the training loop reduces
over the batch. Tensors are channels-last ``(B, D, H, W, C)``. Losses are computed in float32 (float64
inputs stay float64, which the gradient tests use); under mixed precision the network already casts its
outputs to float32.

Contents, grouped by what they compare:

* affine (defined in :mod:`spirs_tf.affine_losses`, re-exported here): :func:`affine_mse` (Eq. 1 as
  written: the 12 matrix entries) and :func:`affine_displacement_mse` (the mean squared displacement
  error, ``loss.affine_supervision = "displacement"``) with its moments :func:`grid_moments` and
  :func:`mask_moments`;
* image: :func:`lncc`, :func:`lncc_loss`, :func:`lncc_mask` (Eq. 2–4, the authors' masked unsigned
  LNCC) and :func:`lncc_exact` (float64 box sums, for every LNCC that is logged);
* deformation: :func:`bending_energy`, :func:`background_displacement`, :func:`smoothness_loss` (Eq. 5
  plus the authors' background penalty);
* label: :func:`soft_dice`, :func:`dice_loss`, :func:`weighted_bce`, :func:`segmentation_loss`,
  :func:`registration_dice_loss` (Eq. 6–9 plus the authors' weighted BCE), :func:`hard_dice` (metric);
* the whole pyramid: :func:`spirs_losses` (Eq. 10).
"""
from __future__ import annotations

from collections.abc import Mapping

from spirs_tf._compat import ops
from spirs_tf._loss_util import check_rank as _check_rank
from spirs_tf._loss_util import check_same as _check_same
from spirs_tf._loss_util import float_tensor as _float
from spirs_tf._loss_util import per_sample_mean as _per_sample_mean
from spirs_tf._loss_util import per_sample_sum as _per_sample_sum
from spirs_tf.affine_losses import (AFFINE_SUPERVISION, affine_displacement_mse, affine_mse, grid_moments,
                                    level_affine, mask_moments)
from spirs_tf.geometry import subsample

#: Keras' probability clip for cross-entropy.
BCE_EPSILON = 1e-7

__all__ = [
    "affine_mse", "affine_displacement_mse", "grid_moments", "mask_moments", "lncc", "lncc_exact",
    "lncc_loss", "lncc_mask", "bending_energy", "background_displacement", "smoothness_loss", "soft_dice",
    "dice_loss", "weighted_bce", "segmentation_loss", "registration_dice_loss", "hard_dice", "spirs_losses",
]


# ----------------------------------------------------------------------------------------- helpers
def _label_pair(target, other, function: str, other_name: str):
    """float32 ``(target, other)`` of equal shape with a batch axis, for the label losses.

    Raises:
        ValueError: rank below 2 (names ``function``) or mismatched shapes.
    """
    q, x = _float(target), _float(other)
    if len(q.shape) < 2:
        raise ValueError(f"{function} needs a batch axis, got shape {tuple(q.shape)}")
    _check_same(q, x, "target", other_name)
    return q, ops.cast(x, q.dtype)


# ------------------------------------------------------------------------------------------- image
BOX_SUM_METHODS = ("cumsum", "conv")


def _box_sum(x, window: int, method: str = "cumsum"):
    """Sum of ``x`` over a ``window``³ box centred on each voxel, zero padding outside ('same').

    The box filter is separable and zero padding commutes with it, so both methods equal the
    authors' single 9³ all-ones Conv3D up to float rounding:

    * ``"cumsum"`` (default): per axis, zero-pad, cumulative sum, and the difference of the sums
      ``w`` apart. Plain float32 additions, so the result does not depend on the device; on Ampere
      or newer GPUs TensorFlow runs float32 convolutions in TF32 (10-bit mantissa) by default, which
      shifts the mean LNCC of a realistic 96³ pair by about 1e-3 (emulated), against < 1e-7 here.
      **But** a running sum's rounding error is relative to the running total along the axis, not to
      the window: in float32, windows centred in the zero background next to the brain get cross and
      variance terms made of rounding residue and an arbitrary cc (far above 1). Masked to the brain
      (the training loss) that is harmless (|Δ mean| ≤ 3e-7 on 64³ and 128³ pairs, gradient 1e-5
      relative); unmasked means drift (+1.9e-4 on 64³, +1.8e-2 on 128³ for a 3 % zoom). In float64
      (:func:`lncc_exact`) both agree with a per-voxel window loop to ~1e-13.
    * ``"conv"``: three 1-D all-ones convolutions (3·w multiply-adds per voxel); about 3× faster on
      CPU, subject to TF32 on GPUs.

    ``x``: (N, D, H, W, 1).
    """
    if method not in BOX_SUM_METHODS:
        raise ValueError(f"box-sum method must be one of {BOX_SUM_METHODS}, got {method!r}")
    r = window // 2
    out = x
    for axis in (1, 2, 3):
        if method == "conv":
            shape = [1, 1, 1, 1, 1]
            shape[axis - 1] = window
            out = ops.conv(out, ops.ones(tuple(shape), dtype=x.dtype), strides=1, padding="same")
            continue
        size = out.shape[axis]
        if size is None:
            size = ops.shape(out)[axis]
        pad = [(0, 0)] * 5
        pad[axis] = (r + 1, r)          # one extra leading zero: csum[i + w] − csum[i] = Σ x[i−r … i+r]
        csum = ops.cumsum(ops.pad(out, pad), axis=axis)
        upper = [slice(None)] * 5
        lower = [slice(None)] * 5
        upper[axis] = slice(window, window + size)
        lower[axis] = slice(0, size)
        out = csum[tuple(upper)] - csum[tuple(lower)]
    return out


def lncc(fixed, moving, window: int = 9, mask=None, eps: float = 1e-7, box_sum: str = "cumsum"):
    """The authors' unsigned local normalised cross-correlation (Eq. 2), as a similarity.

    With box sums Σ over a ``window``³ neighbourhood (zero padding, n = window³ always, also at the
    border), box means Î = ΣI/n, Ĵ = ΣJ/n::

        cross = Σ(IJ) − Ĵ·ΣI − Î·ΣJ + n·Î·Ĵ
        varI  = Σ(I²) − 2Î·ΣI + n·Î²
        varJ  = Σ(J²) − 2Ĵ·ΣJ + n·Ĵ²
        cc    = max(cross, eps)² / (max(varI, eps) · max(varJ, eps))

    and the result is the (masked) mean of cc over voxels. cc lies in (0, 1] up to rounding
    (Cauchy–Schwarz). **Anti-correlation gives ≈ 0, not 1**: the authors clamp ``cross`` below at
    ``eps`` before squaring, so an image and its negation score ≈ 0 although cross²/(varI·varJ) on its
    own would be 1. All-zero windows (background) score exactly 1 (every term clamps to eps), which
    is one reason the authors mask the mean; in near-constant non-zero windows the float32
    cancellation in varI/varJ dominates cc. Numbers that are logged or reported use :func:`lncc_exact`
    (float64 box sums): the float32 running sums are exact enough for the masked training loss but
    inflate an unmasked mean next to the zero background (see :func:`_box_sum`).

    Args:
        fixed: (B, D, H, W, 1) image I.
        moving: (B, D, H, W, 1) image J.
        window: odd box size (authors: 9).
        mask: optional (B, D, H, W, 1) weights in {0, 1}; None = every voxel. The mean is
            Σ(cc·mask)/Σmask; an empty mask gives 0 (finite, zero gradient), never NaN.
        eps: lower clamp of cross, varI and varJ (authors: 1e-7).
        box_sum: ``"cumsum"`` (default) or ``"conv"``, how the window sums are computed (see
            :func:`_box_sum`; the authors used an all-ones convolution, equal up to rounding).

    Returns:
        (B,) mean cc per sample (similarity; use :func:`lncc_loss` for −lncc).

    Raises:
        ValueError: on a wrong rank, more than one channel, mismatched shapes, an even window, or an
            unknown ``box_sum``.
    """
    fixed, moving = _float(fixed), _float(moving)
    _check_rank(fixed, 5, "fixed", "(B, D, H, W, 1)")
    _check_same(fixed, moving, "fixed", "moving")
    if fixed.shape[-1] not in (None, 1):
        raise ValueError(f"lncc expects single-channel images, got shape {tuple(fixed.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"lncc window must be a positive odd integer, got {window}")
    moving = ops.cast(moving, fixed.dtype)
    n = float(window) ** 3
    batch = ops.shape(fixed)[0]
    stacked = ops.concatenate([fixed, moving, fixed * fixed, moving * moving, fixed * moving], axis=0)
    sums = _box_sum(stacked, window, box_sum)
    sum_i, sum_j, sum_ii, sum_jj, sum_ij = (sums[k * batch:(k + 1) * batch] for k in range(5))
    mean_i, mean_j = sum_i / n, sum_j / n
    cross = sum_ij - mean_j * sum_i - mean_i * sum_j + n * mean_i * mean_j
    var_i = sum_ii - 2.0 * mean_i * sum_i + n * mean_i * mean_i
    var_j = sum_jj - 2.0 * mean_j * sum_j + n * mean_j * mean_j
    cross = ops.maximum(cross, eps)
    var_i = ops.maximum(var_i, eps)
    var_j = ops.maximum(var_j, eps)
    cc = (cross / var_i) * (cross / var_j)
    if mask is None:
        return _per_sample_mean(cc)
    mask = ops.cast(ops.convert_to_tensor(mask), cc.dtype)
    _check_same(fixed, mask, "fixed", "mask")
    count = _per_sample_sum(mask)
    return _per_sample_sum(cc * mask) / ops.maximum(count, eps)


def lncc_loss(fixed, moving, window: int = 9, mask=None, eps: float = 1e-7, box_sum: str = "cumsum"):
    """``−lncc(fixed, moving, ...)`` (Eq. 3 and 4); (B,). Arguments and Raises as :func:`lncc`."""
    return -lncc(fixed, moving, window=window, mask=mask, eps=eps, box_sum=box_sum)


def lncc_exact(fixed, moving, window: int = 9, mask=None, eps: float = 1e-7):
    """:func:`lncc` computed in float64 and returned as float32: the LNCC to log or report.

    The float32 cumulative sums of :func:`lncc` carry a rounding error proportional to the running
    sum along each axis, not to the window's own values. Masked to the brain, as in training, that
    error is harmless (|Δ| ≈ 2e-7 on a realistic 128³ pair); but windows centred in the zero
    background next to the brain get cross/variance terms made of rounding residue, their cc is
    arbitrary (far above 1), and the *unmasked* mean is inflated (+1.9e-4 at 64³, +1.8e-2 at 128³
    for a 3 % zoom; ``experiments/lncc_precision.py``). In float64 the same sums agree with a
    per-voxel window loop to ~1e-13 and cost about as much on a CPU; every logged LNCC uses this.

    Args and Raises as :func:`lncc`; returns (B,) float32 (no gradient is intended, but one flows).
    """
    fixed = ops.cast(ops.convert_to_tensor(fixed), "float64")
    moving = ops.cast(ops.convert_to_tensor(moving), "float64")
    if mask is not None:
        mask = ops.cast(ops.convert_to_tensor(mask), "float64")
    return ops.cast(lncc(fixed, moving, window=window, mask=mask, eps=eps, box_sum="cumsum"), "float32")


def lncc_mask(fixed, moving, fixed_mask, moving_mask):
    """The authors' LNCC voxel mask: brain voxels that are not tumour in the image they come from.

    ``mask = (I ≠ 0 AND fixed_mask = 0) OR (J ≠ 0 AND moving_mask = 0)``, where a (soft) label value
    ≠ 0 counts as tumour. Background (I = J = 0) and tumour voxels are excluded. The mask carries no
    gradient.

    Args:
        fixed, moving: (B, D, H, W, 1) images I and J (background exactly 0).
        fixed_mask, moving_mask: (B, D, H, W, 1) lesion labels (soft allowed) in the spaces of I and J.

    Returns:
        (B, D, H, W, 1) float mask in {0, 1}, dtype of ``fixed``.

    Raises:
        ValueError: if the four shapes differ.
    """
    fixed = _float(fixed)
    for other, name in ((moving, "moving"), (fixed_mask, "fixed_mask"), (moving_mask, "moving_mask")):
        _check_same(fixed, ops.convert_to_tensor(other), "fixed", name)
    keep_i = ops.logical_and(ops.not_equal(fixed, 0), ops.equal(fixed_mask, 0))
    keep_j = ops.logical_and(ops.not_equal(moving, 0), ops.equal(moving_mask, 0))
    return ops.stop_gradient(ops.cast(ops.logical_or(keep_i, keep_j), fixed.dtype))


# ------------------------------------------------------------------------------------- deformation
def bending_energy(dvf):
    """Second-order bending energy of Eq. 5 as the authors compute it: a mean, not a sum.

    Finite differences on the voxel grid (no spacing scaling; x, y, z are the array axes 1, 2, 3)::

        u_xx = u[i−1] − 2u[i] + u[i+1]
        u_xy = (u[i−1, j−1] − u[i+1, j−1] − u[i−1, j+1] + u[i+1, j+1]) / 4     (likewise xz, yz)
        BE   = mean over interior voxels (1 … N−2 on every axis) and the 3 channels of
               u_xx² + u_yy² + u_zz² + 2u_xy² + 2u_xz² + 2u_yz²

    Example: u = x² in one channel (0 in the others) gives u_xx = 2, so BE = 4/3.

    Args:
        dvf: (B, D, H, W, C) displacement field (C = 3 for SPIRS; any C works), level voxels.

    Returns:
        (B,) bending energy per sample; 0 for any affine (linear) field.

    Raises:
        ValueError: if ``dvf`` is not rank 5 or a spatial size is below 3 (no interior voxel).
    """
    u = _float(dvf)
    _check_rank(u, 5, "dvf", "(B, D, H, W, C)")
    if any(s is not None and s < 3 for s in u.shape[1:4]):
        raise ValueError(f"bending_energy needs at least 3 voxels per axis, got shape {tuple(u.shape)}")
    c = slice(1, -1)
    lo, hi = slice(0, -2), slice(2, None)

    def pick(a, b, d):
        return u[:, a, b, d, :]

    u_xx = pick(lo, c, c) - 2.0 * pick(c, c, c) + pick(hi, c, c)
    u_yy = pick(c, lo, c) - 2.0 * pick(c, c, c) + pick(c, hi, c)
    u_zz = pick(c, c, lo) - 2.0 * pick(c, c, c) + pick(c, c, hi)
    u_xy = (pick(lo, lo, c) - pick(hi, lo, c) - pick(lo, hi, c) + pick(hi, hi, c)) / 4.0
    u_xz = (pick(lo, c, lo) - pick(hi, c, lo) - pick(lo, c, hi) + pick(hi, c, hi)) / 4.0
    u_yz = (pick(c, lo, lo) - pick(c, hi, lo) - pick(c, lo, hi) + pick(c, hi, hi)) / 4.0
    energy = (ops.square(u_xx) + ops.square(u_yy) + ops.square(u_zz)
              + 2.0 * (ops.square(u_xy) + ops.square(u_xz) + ops.square(u_yz)))
    return _per_sample_mean(energy)


def background_displacement(dvf, fixed, warped_affine):
    """Authors' background penalty: ``mean over the whole tensor of u² · [I_f = 0 and I_wA = 0]``.

    Pushes the displacement to zero outside the head. The mean runs over all voxels and channels
    (not only background voxels).

    Args:
        dvf: (B, D, H, W, C) displacement field.
        fixed: (B, D, H, W, 1) fixed image I_f (background exactly 0).
        warped_affine: (B, D, H, W, 1) affinely warped moving image I_wA on the same grid.

    Returns:
        (B,) penalty per sample.

    Raises:
        ValueError: on wrong ranks or mismatched grids.
    """
    u = _float(dvf)
    fixed, warped_affine = ops.convert_to_tensor(fixed), ops.convert_to_tensor(warped_affine)
    _check_rank(u, 5, "dvf", "(B, D, H, W, C)")
    _check_same(fixed, warped_affine, "fixed", "warped_affine")
    _check_same(u[..., :1], fixed[..., :1], "dvf", "fixed")
    background = ops.logical_and(ops.equal(fixed, 0), ops.equal(warped_affine, 0))
    background = ops.stop_gradient(ops.cast(background, u.dtype))
    return _per_sample_mean(ops.square(u) * background)


def smoothness_loss(dvf, fixed, warped_affine, background_weight: float = 0.01):
    """``bending_energy(dvf) + background_weight · background_displacement(dvf, fixed, warped_affine)``.

    The authors' deformation regulariser (weights [0.01 background, 0 gradient, 1 bending]); shapes,
    returns (B,) and Raises as the two terms.
    """
    bending = bending_energy(dvf)
    if background_weight == 0:
        return bending
    return bending + background_weight * background_displacement(dvf, fixed, warped_affine)


# ------------------------------------------------------------------------------------------- label
def soft_dice(target, prob, smooth: float = 1.0):
    """Soft Dice of the foreground (Eq. 6 with the authors' +1 smoothing).

    ``dice = (2·Σ p·q + smooth) / (Σ p + Σ q + smooth)``, sums over all voxels (and channels) of one
    sample. Empty target and empty prediction give exactly 1 (for smooth > 0).

    Args:
        target: (B, D, H, W, 1) label q in [0, 1] (soft allowed).
        prob: (B, D, H, W, 1) predicted probabilities p in [0, 1].
        smooth: additive smoothing of numerator and denominator.

    Returns:
        (B,) Dice per sample.

    Raises:
        ValueError: on mismatched shapes or a rank below 2.
    """
    q, p = _label_pair(target, prob, "soft_dice", "prob")
    intersection = _per_sample_sum(p * q)
    return (2.0 * intersection + smooth) / (_per_sample_sum(p) + _per_sample_sum(q) + smooth)


def dice_loss(target, prob, smooth: float = 1.0):
    """``1 − soft_dice(target, prob, smooth)``; (B,). Raises as :func:`soft_dice`."""
    return 1.0 - soft_dice(target, prob, smooth=smooth)


def weighted_bce(target, prob_or_logits, pos_weight: float = 3.0, from_logits: bool = False,
                 positive_scale=None):
    """Binary cross-entropy with a positive-class weight, mean over voxels (authors: weight 3).

    ``bce = −[q·log p + (1 − q)·log(1 − p)]``, ``w = pos_weight where q == 1 else 1``, result
    ``mean(w · bce)`` over all voxels of a sample. Probabilities are clipped to [1e-7, 1 − 1e-7] as
    Keras does (so a hard 0/1 prediction costs at most −log 1e-7 ≈ 16.1 per voxel). From logits x the
    stable form ``max(x, 0) − x·q + log(1 + exp(−|x|))`` is used (no clipping).

    Args:
        target: (B, ...) labels q in [0, 1].
        prob_or_logits: (B, ...) probabilities, or logits when ``from_logits``.
        pos_weight: weight of voxels whose target equals 1.
        from_logits: interpret the second argument as logits.
        positive_scale: ``None``, or a tensor of the target's shape that multiplies ``pos_weight`` voxel
            by voxel (the segmenter's lesion-balanced BCE, :func:`spirs_tf.fine_seg.lesion_balance`).

    Returns:
        (B,) weighted BCE per sample.

    Raises:
        ValueError: on mismatched shapes or a rank below 2.
    """
    q, x = _label_pair(target, prob_or_logits, "weighted_bce", "prob_or_logits")
    if from_logits:
        bce = ops.relu(x) - x * q + ops.log1p(ops.exp(-ops.abs(x)))
    else:
        p = ops.clip(x, BCE_EPSILON, 1.0 - BCE_EPSILON)
        bce = -(q * ops.log(p) + (1.0 - q) * ops.log(1.0 - p))
    positive = ops.cast(pos_weight, q.dtype)
    if positive_scale is not None:
        positive = positive * _float(positive_scale)
    weight = ops.where(ops.equal(q, 1.0), positive, ops.cast(1.0, q.dtype))
    return _per_sample_mean(weight * bce)


def segmentation_loss(target, logits, pos_weight: float = 3.0, smooth: float = 1.0, positive_scale=None):
    """Segmentation loss of P1 / P2: ``dice_loss(q, sigmoid(x)) + weighted_bce(q, x, from_logits)``.

    Args:
        target: (B, D, H, W, 1) fixed lesion mask S_f.
        logits: (B, D, H, W, 1) P1 or P2 logits.
        pos_weight, smooth, positive_scale: see :func:`weighted_bce` and :func:`soft_dice`.

    Returns:
        (B,) loss per sample. Raises as :func:`soft_dice`.
    """
    logits = _float(logits)
    return (dice_loss(target, ops.sigmoid(logits), smooth=smooth)
            + weighted_bce(target, logits, pos_weight=pos_weight, from_logits=True,
                           positive_scale=positive_scale))


def registration_dice_loss(target, prob, pos_weight: float = 3.0, smooth: float = 1.0):
    """Registration label loss (Eq. 7 as coded): ``dice_loss(q, p) + weighted_bce(q, p)`` on probabilities.

    Args:
        target: (B, D, H, W, 1) Dice target (fixed lesions with a counterpart in the prior).
        prob: (B, D, H, W, 1) soft warped prior mask S_wD.

    Returns:
        (B,) loss per sample. Raises as :func:`soft_dice`.
    """
    return (dice_loss(target, prob, smooth=smooth)
            + weighted_bce(target, prob, pos_weight=pos_weight, from_logits=False))


def hard_dice(target, logits, threshold: float = 0.0):
    """Logged metric: Dice of ``logits > threshold`` against ``target > 0.5``.

    With the default ``threshold = 0`` that is ``sigmoid(logits) > 0.5`` (the segmentation heads);
    ``threshold = 0.5`` scores a soft mask in [0, 1] instead (a trilinearly warped prior mask).
    ``2|P∩Q| / (|P| + |Q|)`` per sample; empty prediction and empty target give 1 (the authors'
    NaN → 1 rule), one of them empty gives 0.

    Args:
        target: (B, D, H, W, 1) labels.
        logits: (B, D, H, W, 1) logits (or probabilities, with ``threshold = 0.5``).
        threshold: the prediction is ``logits > threshold``.

    Returns:
        (B,) Dice per sample, float32, no gradient.

    Raises:
        ValueError: on mismatched shapes.
    """
    q, x = _float(target), _float(logits)
    _check_same(q, x, "target", "logits")
    pred = ops.cast(ops.greater(x, threshold), "float32")
    truth = ops.cast(ops.greater(q, 0.5), "float32")
    intersection = _per_sample_sum(pred * truth)
    total = _per_sample_sum(pred) + _per_sample_sum(truth)
    dice = ops.where(total > 0, 2.0 * intersection / ops.maximum(total, 1.0), 1.0)
    return ops.stop_gradient(dice)


# ----------------------------------------------------------------------------------------- pyramid
#: The keys of a batch (:data:`spirs_tf.data.BATCH_KEYS`) that :func:`spirs_losses` reads.
LOSS_BATCH_KEYS = ("fixed_image", "fixed_mask", "dice_target", "ncc_mask", "true_affine")
#: Per-level output names of ``networks.build_spirs`` that :func:`spirs_losses` reads.
LEVEL_OUTPUTS = ("affine", "warped_affine_image", "warped_affine_mask", "dvf", "warped_image",
                 "warped_mask")


def _check_grid(x, grid: int, name: str) -> None:
    spatial = tuple(x.shape[1:4])
    if len(x.shape) != 5 or any(s is not None and s != grid for s in spatial):
        raise ValueError(f"output {name!r} must be on the {grid}³ grid (B, {grid}, {grid}, {grid}, C), "
                         f"got shape {tuple(x.shape)}")


def spirs_losses(outputs: Mapping, batch: Mapping, cfg, levels: int, exact_lncc: bool = False) -> dict:
    """All SPIRS loss terms of a model with ``levels`` pyramid levels, per sample.

    Level i (1 = coarsest) lives on the grid S / 2**(levels − i), S = the model's input size; its
    targets are strided subsamples of the batch tensors. Per level (cfg.loss = ``w``)::

        mse_i             = affine_mse(true_affine, affine_i)           (affine_supervision "matrix",
                                                                         Eq. 1, S-grid voxels)
                          = affine_displacement_mse(level_affine(true_affine, f),
                                                    level_affine(affine_i, f), H_i)
                                                                        ("displacement", level voxels)
        lncc_affine_i     = lncc(I_f,i, warped_affine_image_i,
                                 mask = lncc_mask(I_f,i, I_wA,i, fixed_mask_i, warped_affine_mask_i))
        lncc_deformable_i = lncc(I_f,i, warped_image_i,
                                 mask = lncc_mask(I_f,i, I_wD,i, ncc_mask_i, ncc_mask_i))
        smooth_i          = smoothness_loss(dvf_i, I_f,i, warped_affine_image_i)
        dice_i            = registration_dice_loss(dice_target_i, warped_mask_i)   (Dice + BCE)
        registration_i    = γ^(levels−i) · (w_mse·mse_i − w_lncc_a·lncc_affine_i
                                            − w_lncc_d·lncc_deformable_i + λ1·smooth_i + λ2·dice_i)

    Every level's ``affine_i`` and ``true_affine`` are centred affines with translations in voxels of
    the S grid. With ``affine_supervision = "displacement"`` both are first expressed in voxels of
    level i's grid (translation divided by f = 2**(levels − i), ``M`` unchanged since c = N/2 scales
    with the grid), and ``H_i`` holds the moments of ``[x − c; 1]`` over the **brain of the fixed
    image at that level** (voxels with I_f,i ≠ 0; the whole level grid for an empty image), so
    ``mse_i`` is the mean squared displacement error over the brain in level voxels: the voxels that
    the LNCC sees, including the coupling of translation and linear part for an off-centre brain
    (whole-grid moments would weigh the linear part by the empty corners of the grid too).

    The ``lncc_*`` entries are similarities (higher is better); they enter the loss with a minus sign.
    Then ``registration = Σ_i registration_i``, ``segmentation_p1 = w_seg·segmentation_loss(fixed_mask,
    p1_logits)`` (positive weight ``segmentation_bce_positive_weight``, default ``bce_positive_weight``),
    ``segmentation_p2`` likewise with ``p2_logits`` (positive weight ``p2_bce_positive_weight`` when set;
    finest level only, no γ), and
    ``total = registration + segmentation_p1 + segmentation_p2`` (Eq. 10 as used in ``joint`` mode; in
    ``isolated`` mode the three parts are minimised by separate optimisers).

    Args:
        outputs: the model's output dict (``affine_{i}``, ``warped_affine_image_{i}``,
            ``warped_affine_mask_{i}``, ``dvf_{i}``, ``warped_image_{i}``, ``warped_mask_{i}`` for
            i = 1..levels, ``p1_logits``, ``p2_logits``).
        batch: the training batch (``fixed_image``, ``fixed_mask``, ``dice_target``, ``ncc_mask``
            (B, S, S, S, 1) and ``true_affine`` (B, 3, 4)); other keys are ignored.
        cfg: a :class:`spirs_tf.config.SpirsConfig` (only ``cfg.loss`` is read).
        levels: number of pyramid levels of the model (1..cfg.model.num_levels).
        exact_lncc: compute the LNCC terms with :func:`lncc_exact` (float64), for validation numbers
            that are logged; training keeps the float32 :func:`lncc` (its masked error is ~1e-7).

    Returns:
        dict of (B,) tensors: ``mse_i``, ``lncc_affine_i``, ``lncc_deformable_i``, ``smooth_i``,
        ``dice_i``, ``registration_i`` for each level, plus ``registration``, ``segmentation_p1``,
        ``segmentation_p2`` and ``total``.

    Raises:
        ValueError: if ``levels`` < 1, a key is missing, an output is not on its level's grid, or
            ``cfg.loss.affine_supervision`` is unknown.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    supervision = getattr(cfg.loss, "affine_supervision", "matrix")
    if supervision not in AFFINE_SUPERVISION:
        raise ValueError(f"loss.affine_supervision must be one of {AFFINE_SUPERVISION}, got {supervision!r}")
    missing = [k for k in LOSS_BATCH_KEYS if k not in batch]
    missing += [f"{name}_{i}" for i in range(1, levels + 1) for name in LEVEL_OUTPUTS
                if f"{name}_{i}" not in outputs]
    missing += [k for k in ("p1_logits", "p2_logits") if k not in outputs]
    if missing:
        raise ValueError(f"spirs_losses: missing outputs/batch keys {missing}")
    lw = cfg.loss
    fixed = _float(batch["fixed_image"])
    _check_rank(fixed, 5, "batch['fixed_image']", "(B, S, S, S, 1)")
    size = fixed.shape[1]
    if size is not None and size % 2 ** (levels - 1):
        raise ValueError(f"input size {size} is not divisible by 2**(levels-1) = {2 ** (levels - 1)}")
    fixed_mask = _float(batch["fixed_mask"])
    dice_target = _float(batch["dice_target"])
    ncc_mask = _float(batch["ncc_mask"])
    true_affine = _float(batch["true_affine"])

    result = {}
    registration = None
    for i in range(1, levels + 1):
        factor = 2 ** (levels - i)
        f_i = subsample(fixed, factor)
        out = {name: _float(outputs[f"{name}_{i}"]) for name in LEVEL_OUTPUTS}
        if size is not None:
            for name in LEVEL_OUTPUTS[1:]:
                _check_grid(out[name], size // factor, f"{name}_{i}")
        mask_a = lncc_mask(f_i, out["warped_affine_image"], subsample(fixed_mask, factor),
                           out["warped_affine_mask"])
        ncc_i = subsample(ncc_mask, factor)
        mask_d = lncc_mask(f_i, out["warped_image"], ncc_i, ncc_i)
        if supervision == "displacement":
            moments = mask_moments(ops.cast(ops.not_equal(f_i, 0), f_i.dtype))
            mse = affine_displacement_mse(level_affine(true_affine, factor),
                                          level_affine(ops.cast(out["affine"], true_affine.dtype), factor),
                                          moments)
        else:
            mse = affine_mse(true_affine, out["affine"])
        similarity = lncc_exact if exact_lncc else lncc
        terms = {
            "mse": mse,
            "lncc_affine": similarity(f_i, out["warped_affine_image"], window=lw.lncc_window, mask=mask_a),
            "lncc_deformable": similarity(f_i, out["warped_image"], window=lw.lncc_window, mask=mask_d),
            "smooth": smoothness_loss(out["dvf"], f_i, out["warped_affine_image"],
                                      background_weight=lw.background_displacement_weight),
            "dice": registration_dice_loss(subsample(dice_target, factor), out["warped_mask"],
                                           pos_weight=lw.bce_positive_weight, smooth=lw.dice_smooth),
        }
        level_loss = (lw.weight_mse * terms["mse"]
                      - lw.weight_lncc_affine * terms["lncc_affine"]
                      - lw.weight_lncc_deformable * terms["lncc_deformable"]
                      + lw.lambda_smooth * terms["smooth"]
                      + lw.lambda_dice * terms["dice"])
        weighted = (lw.gamma ** (levels - i)) * level_loss
        for name, value in terms.items():
            result[f"{name}_{i}"] = value
        result[f"registration_{i}"] = weighted
        registration = weighted if registration is None else registration + weighted

    result["registration"] = registration
    seg_pos_weight = (lw.bce_positive_weight if lw.segmentation_bce_positive_weight is None
                      else lw.segmentation_bce_positive_weight)
    p2_pos_weight = seg_pos_weight if lw.p2_bce_positive_weight is None else lw.p2_bce_positive_weight
    for key, logits, pos_weight in (("segmentation_p1", "p1_logits", seg_pos_weight),
                                    ("segmentation_p2", "p2_logits", p2_pos_weight)):
        result[key] = lw.weight_segmentation * segmentation_loss(
            fixed_mask, outputs[logits], pos_weight=pos_weight, smooth=lw.dice_smooth)
    result["total"] = registration + result["segmentation_p1"] + result["segmentation_p2"]
    return result
