"""Enhancing vessels and dural strips: the thin bright structures that mimic micro-metastases.

On a post-contrast T1 scan, cortical veins, the dural sinuses and the falx enhance; in a single slice
their cross-sections look like small bright foci, much like a micro-metastasis (paper, section 1). Each
patient gets (all in patient space, stable over time; their brightness varies per scan):

* cortical vessels: random walks that stay at a fixed depth of 0.5–2.5 mm below the brain surface,
  radius 0.4–1 mm; sulcal vessels: random walks inside the superficial CSF (the sulci), 0.4–0.9 mm;
* the choroid plexus: a thick enhancing walk inside each lateral ventricle;
* the superior sagittal sinus along the top of the midline (radius 1.2–2 mm) and one or two falx
  strips running down the interhemispheric fissure;
* a few deep medullary vessels: short free random walks deeper than 8 mm.

Thin tubes (radius below the voxel size) are splatted as partial-volume line densities (contrast ×
π r² × step / voxel volume, trilinear) and blurred by a Gaussian point-spread function of σ = 0.5
voxel; thick tubes are drawn with a one-voxel linear partial-volume edge.

:func:`tube_density` draws one straight thin vessel analytically (the small vessel a *vessel-like* lesion
sits on, :func:`spirs_tf.synthetic.lesions.sample_fading`), with the same line-density model.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def _depth_and_normal(depth_vox: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """Distance to the surface (voxels) at point ``p`` and the unit inward normal (its gradient)."""
    offsets = np.concatenate([np.eye(3), -np.eye(3)])
    pts = np.concatenate([p[None], p[None] + offsets]).T
    vals = ndimage.map_coordinates(depth_vox, pts, order=1, mode="nearest")
    grad = (vals[1:4] - vals[4:7]) / 2.0
    norm = float(np.linalg.norm(grad))
    return float(vals[0]), (grad / norm if norm > 1e-6 else np.zeros(3))


def _walk(rng: np.random.Generator, start: np.ndarray, n_steps: int, step: float, depth_vox: np.ndarray,
          target_depth: float | None, direction: np.ndarray | None = None, wiggle: float = 0.25) -> np.ndarray:
    """A smooth random walk (voxel coordinates); with ``target_depth`` it follows the brain surface."""
    shape = np.array(depth_vox.shape)
    p = np.asarray(start, dtype=np.float64).copy()
    d = rng.standard_normal(3) if direction is None else np.asarray(direction, dtype=np.float64).copy()
    points = []
    for _ in range(n_steps):
        depth, normal = _depth_and_normal(depth_vox, p)
        if target_depth is not None:
            p = p + (target_depth - depth) * normal  # back onto the iso-depth surface
            d = d - np.dot(d, normal) * normal      # keep moving along the surface
        nd = np.linalg.norm(d)
        if nd < 1e-6 or depth <= 0 or np.any(p < 1) or np.any(p > shape - 2):
            break
        points.append(p.copy())
        d = d / nd + wiggle * rng.standard_normal(3)
        d /= np.linalg.norm(d)
        p = p + step * d
    return np.array(points).reshape(-1, 3)


def _walk_within(rng: np.random.Generator, start: np.ndarray, n_steps: int, step: float, allowed: np.ndarray,
                 wiggle: float = 0.25) -> np.ndarray:
    """A smooth random walk (voxels) that stays inside the boolean region ``allowed``."""
    shape = np.array(allowed.shape)
    p = np.asarray(start, dtype=np.float64).copy()
    d = rng.standard_normal(3)
    d /= np.linalg.norm(d)
    points = [p.copy()]
    for _ in range(n_steps):
        for _attempt in range(8):
            trial = d + wiggle * rng.standard_normal(3)
            trial /= np.linalg.norm(trial)
            nxt = p + step * trial
            idx = np.rint(nxt).astype(int)
            if np.all(idx >= 0) and np.all(idx < shape) and allowed[tuple(idx)]:
                break
            d = rng.standard_normal(3)
        else:
            break
        p, d = nxt, trial
        points.append(p.copy())
    return np.array(points).reshape(-1, 3)


def _splat_thin(shape, points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Trilinear splat of point weights onto the grid."""
    out = np.zeros(shape, dtype=np.float32)
    base = np.floor(points).astype(np.int64)
    frac = points - base
    for corner in np.ndindex(2, 2, 2):
        idx = base + np.array(corner)
        w = weights * np.prod(np.where(np.array(corner) == 1, frac, 1 - frac), axis=1)
        ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        np.add.at(out, tuple(idx[ok].T), w[ok].astype(np.float32))
    return out


def _draw_thick(out: np.ndarray, points: np.ndarray, radius_vox: float, contrast: float) -> None:
    """Add a tube of ``radius_vox`` around the polyline ``points`` with a one-voxel linear edge."""
    if len(points) == 0:
        return
    lo = np.maximum(np.floor(points.min(0) - radius_vox - 2).astype(int), 0)
    hi = np.minimum(np.ceil(points.max(0) + radius_vox + 3).astype(int), np.array(out.shape))
    box = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    dist, _ = cKDTree(points).query(box, distance_upper_bound=radius_vox + 1.5)
    occupancy = np.clip(0.5 + radius_vox - dist, 0.0, 1.0)
    occupancy[~np.isfinite(dist)] = 0.0
    view = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    view += (contrast * occupancy).reshape(view.shape).astype(np.float32)


def _superior_sagittal(inside: np.ndarray, spacing: float) -> np.ndarray:
    """Points (voxels) along the top of the brain at the midline, 1 mm below the surface."""
    mid = int(round(ndimage.center_of_mass(inside)[0]))
    column = inside[mid]  # (j, k)
    has = column.any(axis=1)
    js = np.nonzero(has)[0]
    if js.size < 4:
        return np.zeros((0, 3))
    top = np.array([np.nonzero(column[j])[0].max() for j in js], dtype=np.float64)
    keep = top > np.percentile(top, 40)  # the upper convexity only
    js, top = js[keep], ndimage.gaussian_filter1d(top[keep], 2.0)
    return np.stack([np.full(js.size, mid, float), js.astype(float), top - 1.0 / spacing], axis=1)


def vessel_map(rng: np.random.Generator, inside: np.ndarray, brain_depth_mm: np.ndarray,
               spacing: float, csf: np.ndarray | None = None) -> np.ndarray:
    """Additive enhancement map of vessels and dural strips in white-matter units (see module docstring).

    Args:
        rng: the patient's anatomy stream.
        inside: boolean brain mask (patient space).
        brain_depth_mm: distance to the outside of the brain in mm.
        spacing: voxel size in mm.
        csf: optional boolean CSF mask: sulcal vessels run in its superficial part, the choroid
            plexus in its deep part (the lateral ventricles).

    Returns:
        float32 array of ``inside.shape``, ≥ 0, zero outside the brain.
    """
    shape = inside.shape
    depth_vox = (brain_depth_mm / spacing).astype(np.float32)
    step = 0.5  # voxels
    thin_pts, thin_w = [], []
    out = np.zeros(shape, dtype=np.float32)

    def add_thin(points, radius_mm, contrast):
        if len(points):
            thin_pts.append(points)
            thin_w.append(np.full(len(points), contrast * np.pi * radius_mm ** 2 * step / spacing ** 2))

    surface = np.argwhere((brain_depth_mm > 0.4) & (brain_depth_mm < 3.0))
    deep = np.argwhere(brain_depth_mm > 10.0)
    for _ in range(int(rng.integers(15, 30))):  # cortical vessels
        if not len(surface):
            break
        start = surface[rng.integers(len(surface))] + rng.uniform(-0.5, 0.5, 3)
        length_mm = rng.uniform(20, 70)
        pts = _walk(rng, start, int(length_mm / (step * spacing)), step, depth_vox,
                    target_depth=rng.uniform(0.5, 2.5) / spacing, wiggle=0.15)
        add_thin(pts, rng.uniform(0.4, 1.0), rng.uniform(1.5, 3.0))
    for _ in range(int(rng.integers(4, 10))):  # deep medullary vessels
        if not len(deep):
            break
        start = deep[rng.integers(len(deep))] + rng.uniform(-0.5, 0.5, 3)
        pts = _walk(rng, start, int(rng.uniform(8, 25) / (step * spacing)), step, depth_vox, None, wiggle=0.2)
        add_thin(pts, rng.uniform(0.3, 0.55), rng.uniform(0.8, 1.8))
    if csf is not None:
        sulci = ndimage.binary_dilation(csf & (brain_depth_mm < 20.0)) & inside
        starts = np.argwhere(csf & (brain_depth_mm > 3.0) & (brain_depth_mm < 20.0))
        for _ in range(int(rng.integers(25, 45)) if len(starts) else 0):  # vessels in the sulci
            start = starts[rng.integers(len(starts))].astype(np.float64)
            pts = _walk_within(rng, start, int(rng.uniform(10, 40) / (step * spacing)), step, sulci)
            add_thin(pts, rng.uniform(0.4, 0.9), rng.uniform(1.2, 2.5))
        plexus = csf & (brain_depth_mm > 18.0)
        starts = np.argwhere(plexus)
        for _ in range(2 if len(starts) else 0):  # choroid plexus in the lateral ventricles
            start = starts[rng.integers(len(starts))].astype(np.float64)
            pts = _walk_within(rng, start, int(rng.uniform(10, 25) / (step * spacing)), step, plexus, wiggle=0.5)
            radius = rng.uniform(1.0, 1.8) / spacing
            if radius >= 1.0:
                _draw_thick(out, pts, radius, rng.uniform(0.5, 1.0))
            else:
                add_thin(pts, radius * spacing, rng.uniform(0.5, 1.0))
    sinus = _superior_sagittal(inside, spacing)
    if len(sinus) > 1:  # densify the polyline to half-voxel steps
        seg = np.linalg.norm(np.diff(sinus, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        t = np.arange(0.0, arc[-1], step)
        sinus = np.stack([np.interp(t, arc, sinus[:, a]) for a in range(3)], axis=1)
        radius = rng.uniform(1.2, 2.0) / spacing
        if radius >= 1.0:
            _draw_thick(out, sinus, radius, rng.uniform(0.8, 1.4))
        else:
            add_thin(sinus, radius * spacing, rng.uniform(0.8, 1.4))
        for _ in range(int(rng.integers(1, 3))):  # falx strips down the interhemispheric fissure
            start = sinus[rng.integers(len(sinus))] + np.array([0.0, 0.0, -1.0 / spacing])
            pts = _walk(rng, start, int(rng.uniform(15, 40) / (step * spacing)), step, depth_vox, None,
                        direction=np.array([0.0, rng.uniform(-0.5, 0.5), -1.0]), wiggle=0.08)
            pts[:, 0] = start[0]  # stay in the midline plane
            add_thin(pts, rng.uniform(0.5, 0.9), rng.uniform(0.8, 1.6))
    if thin_pts:
        out += ndimage.gaussian_filter(_splat_thin(shape, np.concatenate(thin_pts), np.concatenate(thin_w)), 0.5)
    out *= inside
    return out


def tube_density(offsets: np.ndarray, direction: np.ndarray, half_length: float, radius_mm: float,
                 strength: float, voxel_mm: float) -> np.ndarray:
    """Additive enhancement of a straight thin vessel through the origin, at offsets ``offsets`` (m, 3) mm.

    The line density of :func:`vessel_map` (``strength · π r²`` per unit length, white-matter units)
    spread by a Gaussian across the axis, ``σ² = (0.65 voxel)² + (r/2)²`` (the splat and the σ = 0.5 voxel
    blur of :func:`vessel_map`), with ends that fade linearly over one voxel::

        e(v) = strength · π r² / (2π σ²) · exp(−ρ² / 2σ²) · clip(0.5 + (L − |s|) / voxel, 0, 1),

    ``s = v · n`` (along the unit ``direction`` n), ``ρ = |v − s n|``, ``L`` = ``half_length``.

    Returns:
        float64 (m,) ≥ 0.
    """
    v = np.asarray(offsets, dtype=np.float64)
    n = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    s = v @ n
    rho2 = np.einsum("ij,ij->i", v, v) - s * s
    sigma2 = (0.65 * voxel_mm) ** 2 + (0.5 * radius_mm) ** 2
    ends = np.clip(0.5 + (half_length - np.abs(s)) / voxel_mm, 0.0, 1.0)
    return strength * radius_mm ** 2 / (2.0 * sigma2) * np.exp(-0.5 * np.maximum(rho2, 0.0) / sigma2) * ends
