"""On-the-fly augmentation of one pre-aligned (prior, new) pair (NumPy/SciPy, no TensorFlow).

FACTS decisions 2 and 9, section D. The pair arrives pre-aligned on the new scan's working grid
(``G`` voxels per axis). One call of :func:`augment_pair`

1. draws mirror flips (p = ``flip_probability`` per axis) and applies them to all four volumes alike
   (a reflection is not representable by the network's affine, so it must not separate the pair);
2. draws a random affine ``T_true = [M | t]`` (:func:`random_affine_params`, then
   :func:`spirs_tf.geometry.params_to_matrix`) in centred voxels of the full ``G`` grid and resamples the
   pre-aligned moving volume and mask with its inverse::

       moving_aug(y) = moving(T_true⁻¹(y)),   T_true⁻¹(y) = M⁻¹(y − c) − M⁻¹t + c,   c = G/2,

   so that the network's transformer, which samples the moving volume at ``p(x) = M(x − c) + t + c``,
   brings the augmented moving volume back onto the fixed one: ``warp(moving_aug, T_true) ≈ moving``.
   ``T_true`` is therefore exactly the affine the network should predict (the MSE target);
   With ``augment.fixed_pose_probability = p > 0`` (not the authors'), the fixed volumes also move,
   with probability p, by a rigid pose ``P`` (:func:`random_fixed_pose`): ``fixed_aug(x) = fixed(P x)``
   (image, mask, ``dice_target`` and ``ncc_mask``, the same resampling rules as the moving pair), and
   the target becomes ``T_true·P``, so that the fixed image is not always upright;
3. applies gamma correction (p = ``gamma_probability`` per image, independently) to non-zero voxels;
4. returns everything at the model input size ``S = G / factor`` (a strided subsample, fine voxel
   ``factor·i`` = output voxel ``i``), with ``true_affine`` expressed in voxels of the ``S`` grid
   (translation divided by ``factor``; ``M`` unchanged because both grids share the centre
   ``c = G/2 = factor·S/2``).

Only the ``S³`` strided positions are resampled (not the whole ``G³`` grid), which gives the same values
as resampling at ``G`` and subsampling, ``factor³`` times cheaper.

Resampling rules. Images use spline order ``image_order`` (cubic by default, as the authors): the
spline coefficients are computed once (SciPy's ``spline_filter``), sampled with zeros outside the
volume, clipped to [0, 1] (cubic splines overshoot), and set to exactly 0 wherever the nearest source
voxel is 0. The last rule keeps the background exactly 0, which the masked LNCC and the background
displacement penalty rely on (FACTS section A, "Intensity"); it is applied for every order. Masks use
``mask_order``: 0 = nearest neighbour (authors), 1 = linear, then ``>= 0.5``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from spirs_tf import geometry
from spirs_tf.config import AugmentConfig

#: The keys of :func:`augment_pair`'s result, all ``(S, S, S)`` float32 except ``true_affine`` (3, 4).
OUTPUT_KEYS = ("fixed_image", "moving_image", "fixed_mask", "moving_mask", "dice_target", "ncc_mask",
               "true_affine")

_CUBE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity / one-voxel dilation element


def random_affine_params(rng: np.random.Generator, aug_cfg: AugmentConfig, grid_size: int) -> np.ndarray:
    """Draw the 15 augmentation parameters in the order of :mod:`spirs_tf.geometry`.

    ``[t0, t1, t2, θ0, θ1, θ2, s0, s1, s2, h0 … h5]``: translation ``t ~ U(±T)`` voxels of the
    ``grid_size`` grid with ``T = translation_voxels_at_128 · grid_size / 128``; rotations
    ``θ ~ U(±rotation_degrees)`` converted to radians; anisotropic scales ``s ~ U(scale_range)``;
    shears ``h ~ U(±shear_range)``. Each of the four groups is applied with probability
    ``spatial_probability`` (independently), otherwise it keeps its identity value (t = θ = h = 0,
    s = 1).

    With ``near_identity_probability = q > 0`` (not the authors') two more draws follow: with
    probability q every deviation from the identity (``t``, ``θ``, ``s − 1``, ``h``) is multiplied by
    one factor ``f ~ U(0, near_identity_scale)``, so that pairs close to alignment, which a second affine
    pass sees, are common in training. With q = 0 nothing more is drawn (the authors' stream).

    The generator is always advanced by the same amount (4 + 15 draws, + 2 when q > 0), whatever is
    applied, so the random stream after this call does not depend on the outcome.

    Args:
        rng: NumPy generator.
        aug_cfg: augmentation settings.
        grid_size: voxels per axis of the grid the translation is expressed in.

    Returns:
        float64 array of shape (15,).
    """
    apply = rng.random(4) < aug_cfg.spatial_probability  # translation, rotation, scale, shear
    t_max = aug_cfg.translation_voxels_at_128 * grid_size / 128.0
    translation = rng.uniform(-t_max, t_max, 3)
    rotation = np.deg2rad(rng.uniform(-aug_cfg.rotation_degrees, aug_cfg.rotation_degrees, 3))
    scale = rng.uniform(aug_cfg.scale_range[0], aug_cfg.scale_range[1], 3)
    shear = rng.uniform(-aug_cfg.shear_range, aug_cfg.shear_range, 6)
    params = geometry.IDENTITY_PARAMS.astype(np.float64)
    for on, part, lo, hi in zip(apply, (translation, rotation, scale, shear), (0, 3, 6, 9), (3, 6, 9, 15)):
        if on:
            params[lo:hi] = part
    if aug_cfg.near_identity_probability > 0:
        near = rng.random() < aug_cfg.near_identity_probability
        factor = rng.uniform(0.0, aug_cfg.near_identity_scale)
        if near:
            params = geometry.IDENTITY_PARAMS + factor * (params - geometry.IDENTITY_PARAMS)
    return params


def random_fixed_pose(rng: np.random.Generator, aug_cfg: AugmentConfig, grid_size: int) -> np.ndarray | None:
    """The rigid pose ``P`` (centred 3×4, voxels of ``grid_size``) given to the fixed image, or ``None``.

    ``augment.fixed_pose_probability = 0`` (authors): ``None`` and no draws, so the random stream is
    the authors'. Otherwise always 7 draws: whether (probability p), rotations ``U(±fixed_rotation_degrees)``
    and a translation drawn as the moving image's (:func:`random_affine_params`).
    """
    if not aug_cfg.fixed_pose_probability > 0:
        return None
    on = rng.random() < aug_cfg.fixed_pose_probability
    angles = np.deg2rad(rng.uniform(-aug_cfg.fixed_rotation_degrees, aug_cfg.fixed_rotation_degrees, 3))
    t_max = aug_cfg.translation_voxels_at_128 * grid_size / 128.0
    translation = rng.uniform(-t_max, t_max, 3)
    if not on:
        return None
    params = geometry.IDENTITY_PARAMS.astype(np.float64)
    params[0:3], params[3:6] = translation, angles
    return geometry.params_to_matrix(params)


def lesion_targets(fixed_mask: np.ndarray, moving_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two extra label channels of the authors' generator, in fixed space (FACTS section C).

    * ``dice_target``: the 26-connected components of the fixed mask that overlap the pre-aligned
      moving mask dilated by one voxel (3³ cube), i.e. the new lesions that have a counterpart in the
      prior scan; the registration Dice compares them with the warped prior mask.
    * ``ncc_mask``: fixed mask ∪ pre-aligned moving mask, excluded from the deformable LNCC.

    Both masks are binarised at 0.5. Work is restricted to the bounding box of the two masks.

    Args:
        fixed_mask, moving_mask: arrays of the same 3-D shape.

    Returns:
        ``(dice_target, ncc_mask)``, float32 arrays of that shape with values in {0, 1}.
    """
    fm = np.asarray(fixed_mask) > 0.5
    mm = np.asarray(moving_mask) > 0.5
    if fm.shape != mm.shape:
        raise ValueError(f"fixed and moving masks differ in shape: {fm.shape} vs {mm.shape}")
    ncc = fm | mm
    dice = np.zeros(fm.shape, dtype=np.float32)
    if fm.any() and mm.any():
        box = ndimage.find_objects(ncc.astype(np.uint8))[0]
        box = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(box, fm.shape))
        labels, _ = ndimage.label(fm[box], structure=_CUBE)
        near = ndimage.binary_dilation(mm[box], structure=_CUBE)
        hit = np.unique(labels[near & fm[box]])
        dice[box] = np.isin(labels, hit[hit > 0])
    return dice, ncc.astype(np.float32)


def strided_positions(matrix: np.ndarray, grid_size: int, out_size: int) -> np.ndarray:
    """Full-grid source coordinates ``matrix(factor·i)`` for the ``out_size³`` strided output voxels.

    ``matrix`` is a centred 3×4 affine ``[M | t]`` in voxels of the full grid (centre
    ``c = grid_size/2``) and ``factor = grid_size / out_size``::

        q(i) = M(factor·i − c) + t + c,   i ∈ {0 … out_size − 1}³

    (the same as ``factor · geometry.sample_locations([M | t/factor], (out_size,)*3)``). Built from
    separable broadcasts, without a meshgrid.

    Returns:
        float64 array (3, S, S, S).
    """
    factor = grid_size // out_size
    m = np.asarray(matrix, dtype=np.float64)
    c = grid_size / 2.0
    axis = np.arange(out_size, dtype=np.float64) * factor - c
    shapes = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))
    out = np.empty((3, out_size, out_size, out_size), dtype=np.float64)
    for a in range(3):
        np.add((m[a, 0] * axis + m[a, 3] + c).reshape(shapes[0]), (m[a, 1] * axis).reshape(shapes[1]),
               out=out[a])
        out[a] += (m[a, 2] * axis).reshape(shapes[2])
    return out


def resample_image(volume: np.ndarray, coords: np.ndarray, order: int,
                   support: np.ndarray | None = None) -> np.ndarray:
    """Sample an image at ``coords`` (3, ...) with spline ``order``; zeros outside; see module rules.

    Values are clipped to [0, 1] and set to 0 where the nearest source voxel is 0. ``support``, if
    given, is that nearest-neighbour sample of ``volume != 0`` (computed by the caller).
    """
    volume = np.asarray(volume, dtype=np.float32)
    coeffs = ndimage.spline_filter(volume, order, mode="constant", output=np.float32) if order > 1 else volume
    out = ndimage.map_coordinates(coeffs, coords, order=order, mode="constant", cval=0.0,
                                  prefilter=False, output=np.float32)
    if support is None:
        support = _nearest((volume != 0).view(np.uint8), coords)
    out[support == 0] = 0.0
    return np.clip(out, 0.0, 1.0, out=out)


def _nearest(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(volume, coords, order=0, mode="constant", cval=0, prefilter=False)


def resample_mask(mask: np.ndarray, coords: np.ndarray, order: int, soft: bool = False) -> np.ndarray:
    """Sample a binary mask at ``coords``: order 0 nearest, order 1 linear then ``>= 0.5`` (``soft``: the
    linear value itself, in [0, 1]). float32."""
    if order not in (0, 1):
        raise ValueError(f"mask_order must be 0 (nearest) or 1 (linear + threshold), got {order}")
    if order == 0:
        return (_nearest((np.asarray(mask) > 0.5).view(np.uint8), coords) > 0).astype(np.float32)
    out = ndimage.map_coordinates(np.asarray(mask, dtype=np.float32), coords, order=1, mode="constant",
                                  cval=0.0, prefilter=False, output=np.float32)
    return np.clip(out, 0.0, 1.0, out=out) if soft else (out >= 0.5).astype(np.float32)


def resample_moving(image: np.ndarray, mask: np.ndarray, coords: np.ndarray, image_order: int,
                    mask_order: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resample_image` and :func:`resample_mask` of the moving pair at ``coords``.

    With ``mask_order = 0`` the image support and the mask share one nearest-neighbour pass
    (bit 0 = image non-zero, bit 1 = lesion).
    """
    if mask_order != 0:
        return resample_image(image, coords, image_order), resample_mask(mask, coords, mask_order)
    packed = (np.asarray(image) != 0).view(np.uint8) | ((np.asarray(mask) > 0.5).view(np.uint8) << 1)
    near = _nearest(packed, coords)
    return resample_image(image, coords, image_order, support=near & 1), (near >> 1).astype(np.float32)


def random_gamma(image: np.ndarray, rng: np.random.Generator, aug_cfg: AugmentConfig) -> np.ndarray:
    """Gamma correction ``x ← x^γ`` of the non-zero voxels, with probability ``gamma_probability``.

    γ ~ U(lo, 1) (brighten) or U(1, hi) (darken), 50/50, with ``(lo, hi) = gamma_range``. Values in
    [0, 1] stay in [0, 1] and zeros stay 0. Always consumes three draws. Returns a new array.
    """
    apply, brighten, u = rng.random(3)
    out = np.array(image, dtype=np.float32, copy=True)
    if apply < aug_cfg.gamma_probability:
        lo, hi = aug_cfg.gamma_range
        gamma = lo + u * (1.0 - lo) if brighten < 0.5 else 1.0 + u * (hi - 1.0)
        nz = out > 0
        out[nz] = out[nz] ** np.float32(gamma)
    return out


def _check_inputs(arrays: dict[str, np.ndarray], out_size: int) -> int:
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    shape = shapes["fixed"]
    if len(shape) != 3 or len(set(shape)) != 1 or any(s != shape for s in shapes.values()):
        raise ValueError(f"augment_pair needs four cubic 3-D volumes of one shape, got {shapes}")
    grid = shape[0]
    if out_size <= 0 or grid % out_size:
        raise ValueError(f"out_size {out_size} must divide the grid size {grid}")
    return grid // out_size


def augment_pair(fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray, moving_mask: np.ndarray,
                 rng: np.random.Generator, aug_cfg: AugmentConfig, out_size: int) -> dict[str, Any]:
    """Augment one pre-aligned pair and return it at the model input size (module docstring).

    Args:
        fixed, moving: images (G, G, G), values in [0, 1], background 0, pre-aligned on one grid.
        fixed_mask, moving_mask: binary lesion masks (G, G, G) (any dtype; > 0.5 is lesion).
        rng: NumPy generator; the result is a deterministic function of its state.
        aug_cfg: augmentation settings; ``enabled = False`` returns the strided pair with
            ``true_affine = [I | 0]``.
        out_size: S, must divide G.

    Returns:
        dict with ``fixed_image``, ``moving_image``, ``fixed_mask``, ``moving_mask``, ``dice_target``,
        ``ncc_mask`` (S, S, S) float32 and ``true_affine`` (3, 4) float32 in centred voxels of the
        S grid, mapping fixed coordinates to the augmented moving volume.

    Raises:
        ValueError: shapes differ, are not cubic 3-D, or ``out_size`` does not divide G.
    """
    factor = _check_inputs({"fixed": fixed, "moving": moving, "fixed_mask": fixed_mask,
                            "moving_mask": moving_mask}, out_size)
    grid = np.shape(fixed)[0]
    dice_target, ncc_mask = lesion_targets(fixed_mask, moving_mask)
    fixed_space = {"fixed_image": np.asarray(fixed, dtype=np.float32), "fixed_mask": fixed_mask,
                   "dice_target": dice_target, "ncc_mask": ncc_mask}
    stride = (slice(None, None, factor),) * 3

    if not aug_cfg.enabled:
        out = {k: np.ascontiguousarray(v[stride], dtype=np.float32) for k, v in fixed_space.items()}
        out["fixed_mask"] = (out["fixed_mask"] > 0.5).astype(np.float32)
        out["moving_image"] = np.ascontiguousarray(np.asarray(moving, dtype=np.float32)[stride])
        out["moving_mask"] = (np.asarray(moving_mask)[stride] > 0.5).astype(np.float32)
        out["true_affine"] = np.eye(3, 4, dtype=np.float32)
        return out

    flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < aug_cfg.flip_probability))
    params = random_affine_params(rng, aug_cfg, grid)
    true_affine = geometry.params_to_matrix(params)
    pose = random_fixed_pose(rng, aug_cfg, grid)

    def flip(x):
        return np.flip(np.asarray(x), axis=flips) if flips else np.asarray(x)

    if pose is None:
        out = {k: np.ascontiguousarray(flip(v)[stride], dtype=np.float32) for k, v in fixed_space.items()}
    else:  # fixed(P x): the fixed image and its label channels at the posed strided positions
        at = strided_positions(pose, grid, out_size)
        out = {}
        out["fixed_image"], out["fixed_mask"] = resample_moving(flip(fixed), flip(fixed_mask), at,
                                                                aug_cfg.image_order, aug_cfg.mask_order)
        for k in ("dice_target", "ncc_mask"):
            out[k] = resample_mask(flip(fixed_space[k]), at, aug_cfg.mask_order)
    out["fixed_mask"] = (out["fixed_mask"] > 0.5).astype(np.float32)
    coords = strided_positions(geometry.invert_affine(true_affine), grid, out_size)
    out["moving_image"], out["moving_mask"] = resample_moving(flip(moving), flip(moving_mask), coords,
                                                              aug_cfg.image_order, aug_cfg.mask_order)
    out["fixed_image"] = random_gamma(out["fixed_image"], rng, aug_cfg)
    out["moving_image"] = random_gamma(out["moving_image"], rng, aug_cfg)
    if pose is not None:  # moving_aug(T⁻¹ A x) = fixed(P x) for the pre-aligned pair  ⇒  A = T·P
        true_affine = (geometry.to_homogeneous(true_affine) @ geometry.to_homogeneous(pose))[:3]
    out["true_affine"] = geometry.scale_translation(true_affine, 1.0 / factor)
    return out
