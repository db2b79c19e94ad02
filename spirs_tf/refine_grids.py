"""NumPy grid helpers of the test-time refinement (:mod:`spirs_tf.refine`): coarser levels of a volume
(:func:`downsample`), a displacement field moved between grids of one extent (:func:`resample_field`), and
the voxel relation of two parallel grids (:func:`grid_relation`). No TensorFlow.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["downsample", "grid_relation", "resample_field"]


def downsample(image: np.ndarray, factor: int, kind: str = "image") -> np.ndarray:
    """A level ``factor`` times coarser, corner aligned: voxel ``i`` ↔ voxel ``factor·i`` of ``image``.

    ``image``: Gaussian smoothing (σ = factor/2 voxels) normalised inside the head (the blur of the
    non-zero indicator), then the strided subsample; voxels whose smoothed head fraction is below 0.5
    are exactly 0, so the background stays 0. ``mask``: the maximum over a ``(2·factor − 1)``³
    neighbourhood, then the strided subsample (no lesion is lost). Even factors above 2 are a cascade
    of halvings (σ = 1 voxel of each level; 5× faster at 128³ for factor 8). float32.
    """
    if factor == 1:
        return np.asarray(image, np.float32)
    if factor % 2 == 0 and factor > 2:  # a cascade of halvings: same alignment, small kernels
        return downsample(downsample(image, 2, kind), factor // 2, kind)
    if kind == "mask":
        return ndimage.maximum_filter(image, size=2 * factor - 1, mode="constant")[::factor, ::factor, ::factor]
    sigma = 0.5 * factor
    head = ndimage.gaussian_filter((image != 0).astype(np.float32), sigma, mode="constant")
    smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma, mode="constant")
    out = np.where(head >= 0.5, smooth / np.maximum(head, 1e-6), 0.0)
    return out[::factor, ::factor, ::factor].astype(np.float32)


def resample_field(dvf, shape, offset=0.0) -> np.ndarray:
    """A displacement field ``(n0, n1, n2, 3)`` (voxels of its grid) on a grid ``shape`` of the same extent.

    Integer ratio ``f = N/n`` per axis; voxel ``i`` of the coarse grid is voxel ``f·i + offset`` of the
    fine one (``offset`` 0: corner aligned, as the network's pyramid; see :func:`grid_relation`), so
    ``u_N(x) = f·u_n((x − offset)/f)``, linear interpolation (flat beyond the ends); a finer-to-coarser
    ratio (``n = f·N``, offset 0 only) takes the strided subsample ``u_n[::f]/f``. float32 ``(*shape, 3)``.

    Raises:
        ValueError: not a ``(..., 3)`` field, ratios that are not integers, an offset when subsampling.
    """
    u = np.asarray(dvf, np.float32)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    shape = tuple(int(n) for n in shape)
    if u.ndim != 4 or u.shape[-1] != 3 or len(shape) != 3:
        raise ValueError(f"dvf must be (D, H, W, 3) and shape 3 sizes, got {u.shape} and {shape}")
    offset = np.broadcast_to(np.asarray(offset, np.float64), (3,))
    if u.shape[:3] == shape and not offset.any():
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
        if offset.any():
            raise ValueError("resample_field subsamples corner-aligned grids only (offset must be 0)")
        f = -int(ratios[0])
        return u[::f, ::f, ::f] / f
    if any(r < 0 for r in ratios) or len(set(ratios)) != 1:
        raise ValueError(f"dvf grid {u.shape[:3]} and target grid {shape} need one common integer ratio")
    f = ratios[0]
    coords = np.meshgrid(*[np.clip((np.arange(m) - o) / f, 0, n - 1) for n, m, o in zip(u.shape[:3], shape, offset)],
                         indexing="ij")
    out = np.stack([ndimage.map_coordinates(u[..., a], coords, order=1, mode="nearest") for a in range(3)], -1)
    return (out * f).astype(np.float32)


def grid_relation(coarse_affine, fine_affine) -> tuple[float, np.ndarray]:
    """``(scale, offset)`` with fine voxel ``= scale · coarse voxel + offset`` for two voxel→world 4×4
    affines of parallel grids (e.g. the 64³ 3 mm and 128³ 1.5 mm working grids of one scan: scale 2,
    offset 0.5 — they are centred, not corner aligned).

    Raises:
        ValueError: the grids are not parallel with one isotropic scale.
    """
    rel = np.linalg.inv(np.asarray(fine_affine, np.float64)) @ np.asarray(coarse_affine, np.float64)
    scale = float(rel[0, 0])
    if not np.allclose(rel[:3, :3], scale * np.eye(3), atol=1e-4 * max(scale, 1.0)):
        raise ValueError(f"grids are not parallel with one isotropic scale (coarse→fine voxel map {rel[:3, :3]})")
    return scale, rel[:3, 3]
