"""Voxel-space geometry shared by augmentation, the network and inference (NumPy, no TensorFlow).

Conventions (FACTS section B, decision 4):

* Volumes are arrays indexed ``[i, j, k]`` (array-axis order); tensors are channels-last
  ``(batch, D, H, W, channels)``.
* A registration transform maps an output (fixed-grid) voxel ``x`` to the moving-volume location
  ``p(x) = M·(x − c) + t + u(x) + c`` with ``c = N/2`` per axis (the authors' centring, not
  ``(N−1)/2``), ``T = [M | t]`` a 3×4 matrix in voxels of the current grid and ``u`` a displacement
  field in voxels.
* Pyramid levels are strided subsamples (fine voxel ``2i`` = coarse voxel ``i``), so going one level
  coarser halves the translation and leaves ``M`` unchanged.

The 15 affine parameters, in order: translation t (3), rotation angles θ (3, radians, about array
axes 0, 1, 2), scales s (3), shears h (6). ``M = Rx(θ0)·Ry(θ1)·Rz(θ2)·diag(s)·Shx·Shy·Shz`` with
``Shx = I + h0·e01 + h1·e02``, ``Shy = I + h2·e10 + h3·e12``, ``Shz = I + h4·e20 + h5·e21``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

IDENTITY_PARAMS = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=np.float32)


def rotation_matrices(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c, s = np.cos(theta), np.sin(theta)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rx, ry, rz


def params_to_matrix(params: np.ndarray) -> np.ndarray:
    """15 parameters (or a batch ``(B, 15)``) → 3×4 matrix ``[M | t]`` (or ``(B, 3, 4)``)."""
    params = np.asarray(params, dtype=np.float64)
    if params.ndim == 2:
        return np.stack([params_to_matrix(p) for p in params]).astype(np.float32)
    if params.shape != (15,):
        raise ValueError(f"affine parameters must have shape (15,) or (B, 15), got {params.shape}")
    t, theta, s, h = params[0:3], params[3:6], params[6:9], params[9:15]
    rx, ry, rz = rotation_matrices(theta)
    shx = np.eye(3); shx[0, 1], shx[0, 2] = h[0], h[1]
    shy = np.eye(3); shy[1, 0], shy[1, 2] = h[2], h[3]
    shz = np.eye(3); shz[2, 0], shz[2, 1] = h[4], h[5]
    m = rx @ ry @ rz @ np.diag(s) @ shx @ shy @ shz
    return np.concatenate([m, t[:, None]], axis=1).astype(np.float32)


def to_homogeneous(matrix: np.ndarray) -> np.ndarray:
    """3×4 (or B×3×4) → 4×4 (or B×4×4)."""
    matrix = np.asarray(matrix)
    bottom = np.zeros(matrix.shape[:-2] + (1, 4), dtype=matrix.dtype)
    bottom[..., 0, 3] = 1
    return np.concatenate([matrix, bottom], axis=-2)


def scale_translation(matrix: np.ndarray, factor: float) -> np.ndarray:
    """Express a centred voxel affine on a grid ``factor`` times finer (translation × factor)."""
    out = np.array(matrix, dtype=np.float32, copy=True)
    out[..., :, 3] *= factor
    return out


def grid_centre(shape) -> np.ndarray:
    """Centre ``c = N/2`` per axis (authors' convention)."""
    return np.asarray(shape[:3], dtype=np.float64) / 2.0


def sample_locations(matrix: np.ndarray | None, shape, dvf: np.ndarray | None = None) -> np.ndarray:
    """Moving-volume coordinates ``p(x) = M(x − c) + t + u(x) + c`` for every voxel of ``shape``.

    Returns an array ``(3, D, H, W)``. Reference implementation for tests and inference.
    """
    shape = tuple(int(n) for n in shape[:3])
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    c = grid_centre(shape).reshape(3, 1, 1, 1)
    if matrix is None:
        p = x.copy()
    else:
        m = np.asarray(matrix, dtype=np.float64)
        p = np.einsum("ab,bijk->aijk", m[:, :3], x - c) + m[:, 3].reshape(3, 1, 1, 1) + c
    if dvf is not None:
        p = p + np.moveaxis(np.asarray(dvf, dtype=np.float64), -1, 0)
    return p


def total_displacement(matrix: np.ndarray | None, dvf: np.ndarray | None, shape) -> np.ndarray:
    """Displacement ``p(x) − x`` of the whole map ``p(x) = M(x − c) + t + u(x) + c`` → ``(D, H, W, 3)``.

    ``matrix`` (3, 4) and ``dvf`` (D, H, W, 3) in voxels of the grid ``shape``; either may be None.
    """
    shape = tuple(int(n) for n in shape[:3])
    p = sample_locations(matrix, shape, dvf) - sample_locations(None, shape)
    return np.moveaxis(p, 0, -1).astype(np.float32)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a centred 3×4 affine ``[M | t]`` (so that p = M(x−c)+t+c ⇔ x = M⁻¹(p−c) − M⁻¹t + c)."""
    m = np.asarray(matrix, dtype=np.float64)
    inv = np.linalg.inv(m[:, :3])
    return np.concatenate([inv, (-inv @ m[:, 3])[:, None]], axis=1).astype(np.float32)


def affine_log_mean(matrices) -> np.ndarray:
    """Log-Euclidean mean ``expm(mean(logm(Aᵢ)))`` of centred 4×4 affines (each with a linear part of
    positive determinant): the mean of ``A`` and ``A⁻¹`` is the identity, of translations their mean
    translation, of rotations about one axis the mean angle. → float64 4×4.

    Raises:
        ValueError: a linear part with determinant ≤ 0 (no real logarithm).
    """
    from scipy.linalg import expm, logm

    mats = [np.asarray(m, dtype=np.float64) for m in matrices]
    for m in mats:
        if m.shape != (4, 4) or not np.linalg.det(m[:3, :3]) > 0:
            raise ValueError("affine_log_mean needs 4×4 affines whose linear part has a positive determinant")
    return expm(np.mean([np.real(logm(m)) for m in mats], axis=0))


def warp_working(volume: np.ndarray, matrix: np.ndarray, dvf: np.ndarray | None) -> np.ndarray:
    """The network's spatial transformer in NumPy: trilinear, zero padding, at
    ``p(x) = M(x − c) + t + u(x) + c`` (:func:`sample_locations`) → float32."""
    coords = sample_locations(matrix, volume.shape, dvf) + 1.0  # zero-padded: = SciPy's "grid-constant"
    return ndimage.map_coordinates(np.pad(np.asarray(volume, np.float32), 1), coords, order=1, mode="constant",
                                   cval=0.0, prefilter=False).astype(np.float32)


def subsample(x, factor: int = 2):
    """Strided subsample of the spatial axes, ``x[::f, ::f, ::f]`` (corner aligned: fine voxel ``f·i`` =
    coarse voxel ``i``): the pyramid's level inputs, its coarse loss targets and the model's inputs on
    a coarser grid than the working grid.

    Plain slicing, so it works on NumPy arrays and on backend tensors alike (the one implementation
    behind :func:`spirs_tf.transforms.subsample`, :class:`spirs_tf.layers.Subsample`, the losses and
    :func:`spirs_tf.preprocess.subsample`).

    Args:
        x: ``(D, H, W)``, channels-last ``(D, H, W, C)`` or a batch ``(B, D, H, W, C)``.
        factor: positive integer ``f``.

    Raises:
        ValueError: other ranks or a non-positive / non-integer factor.
    """
    f = int(factor)
    if f != factor or f < 1:
        raise ValueError(f"subsample factor must be a positive integer, got {factor}")
    rank = len(x.shape)
    if rank not in (3, 4, 5):
        raise ValueError(f"subsample expects (D,H,W), (D,H,W,C) or (B,D,H,W,C), got shape {tuple(x.shape)}")
    if f == 1:
        return x
    if rank == 5:
        return x[:, ::f, ::f, ::f, :]
    return x[::f, ::f, ::f]
