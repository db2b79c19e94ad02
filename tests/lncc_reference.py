"""Exact LNCC references for the tests: a per-voxel window loop and a brain phantom with a zero background.

The phantom is the case that breaks float32 cumulative box sums: a bright textured ellipsoid in an exactly
zero background, against a 3 % zoom of itself (trilinear, zero outside the field of view).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

LNCC_EPS = 1e-7


def phantom(n: int, seed: int = 0, zoom: float = 1.03) -> tuple[np.ndarray, np.ndarray]:
    """(fixed, moving) float32 (n, n, n): a textured brain in [0.5, 1] on an exact-zero background, and the
    same brain zoomed by ``zoom`` about the grid centre n/2 (1.0: an identical copy)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1) - n / 2 + 0.5
    brain = np.sum((g / (np.array([0.42, 0.36, 0.38]) * n)) ** 2, -1) < 1
    tex = ndimage.gaussian_filter(rng.random((n, n, n)), 1.0)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    fixed = np.where(brain, 0.5 + 0.5 * tex, 0.0).astype(np.float32)
    c = np.full(3, n / 2)
    m = np.eye(3) / zoom
    moving = ndimage.affine_transform(fixed, m, c - m @ c, order=1).astype(np.float32)
    return fixed, moving


def brute_force_cc_map(fixed, moving, window: int = 9, eps: float = LNCC_EPS) -> np.ndarray:
    """cc at every voxel from its own zero-padded window, covariance form, float64, one voxel at a time."""
    r = window // 2
    fi = np.pad(np.asarray(fixed, np.float64), r)
    mi = np.pad(np.asarray(moving, np.float64), r)
    out = np.empty(np.shape(fixed))
    for a, b, c in np.ndindex(*out.shape):
        wi = fi[a:a + window, b:b + window, c:c + window]
        wj = mi[a:a + window, b:b + window, c:c + window]
        di, dj = wi - wi.mean(), wj - wj.mean()
        out[a, b, c] = (max((di * dj).sum(), eps) ** 2
                        / (max((di * di).sum(), eps) * max((dj * dj).sum(), eps)))
    return out


def offset_loop_cc_map(fixed, moving, window: int = 9, eps: float = LNCC_EPS) -> np.ndarray:
    """The same covariance form vectorised over voxels, looping over the window³ offsets (for 32³ and up)."""
    r = window // 2
    fi = np.pad(np.asarray(fixed, np.float64), r)
    mi = np.pad(np.asarray(moving, np.float64), r)
    shape = np.shape(fixed)
    offsets = list(np.ndindex(window, window, window))

    def view(a, o):
        return a[o[0]:o[0] + shape[0], o[1]:o[1] + shape[1], o[2]:o[2] + shape[2]]

    mean_i = sum(view(fi, o) for o in offsets) / len(offsets)
    mean_j = sum(view(mi, o) for o in offsets) / len(offsets)
    var_i, var_j, cross = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for o in offsets:
        di, dj = view(fi, o) - mean_i, view(mi, o) - mean_j
        var_i += di * di
        var_j += dj * dj
        cross += di * dj
    return np.maximum(cross, eps) ** 2 / (np.maximum(var_i, eps) * np.maximum(var_j, eps))
