"""One time point: pose + mass effect + lesions + scanner → image, masks; and the true pair transform.

Chain of coordinates for a scan at time ``t`` (all grids are the same working grid ``G``, voxel → world)::

    scanner voxel x ─G─▶ scanner world w ─P_t─▶ patient q ─(q + m_t(q))─▶ reference anatomy r

``P_t`` is the pose (:mod:`spirs_tf.synthetic.scanner`), ``m_t`` the mass-effect pull-back of the lesions
present at ``t`` (:func:`spirs_tf.synthetic.lesions.mass_effect`). Tissue (T1, brain mask, vessels) is read
from the patient anatomy at ``r``; lesion ``j`` is drawn undeformed around its displaced centre
``c_j^t`` (solving ``c + m_t(c) = c_j``), in patient coordinates ``q``, so it moves and turns with the head.
Lesions are blended over the tissue (and vessels) beneath, ``base (1 − α) + s α`` with partial volume ``α``
and signal ``s``; a lesion faded at ``t`` is blended with ``c α``, so its contrast against that tissue,
``α (s − base)``, is scaled by its factor ``c`` while its mask is unchanged; the small vessel of a
vessel-like lesion is added, like the other vessels, before the lesions are drawn over the tissue
(:func:`spirs_tf.synthetic.lesions.sample_fading`).

True transform of a pair (prior ``t``, new ``t + 1``), for a new-scan world point ``w``::

    q      = P_{t+1} w                       (patient position at t+1)
    q_t    = Φ_t⁻¹(q + m_{t+1}(q)),  Φ_t(q) = q + m_t(q)    (same tissue at time t; fixed-point iteration)
    w_prior = P_t⁻¹ q_t = A w + d(w),   A = P_t⁻¹ P_{t+1},   d(w) = L_t⁻¹ (q_t − q)

with ``L_t`` the linear part of ``P_t``. ``A`` is the composed pose (4×4, world mm) and ``d`` (mm, world
axes) is non-zero only near lesions whose mass effect differs between the two time points.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spirs_tf.synthetic.anatomy import PatientAnatomy, sample
from spirs_tf.synthetic.lesions import deformed_centre, render_lesion
from spirs_tf.synthetic.scanner import acquire
from spirs_tf.synthetic.vessels import tube_density


@dataclass(frozen=True, eq=False)
class SynthScan:
    """One synthetic time point on the working grid.

    Attributes:
        image: float32 post-contrast T1 (arbitrary units, background exactly 0).
        mask: uint8 binary lesion mask.
        lesions: int16 instance map (lesion ids, 0 = background).
        brain: bool brain mask.
        affine: 4×4 voxel → world mm.
    """

    image: np.ndarray
    mask: np.ndarray
    lesions: np.ndarray
    brain: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True, eq=False)
class PairTransform:
    """True correspondence from the new scan to the prior scan (module docstring).

    Attributes:
        prior, new: time point indices.
        world_affine: 4×4 ``A``, new world mm → prior world mm.
        displacement: float32 ``(X, Y, Z, 3)`` ``d`` in mm (RAS axes) on the new scan's grid.
        grid_affine: 4×4 voxel → world of both scans.
    """

    prior: int
    new: int
    world_affine: np.ndarray
    displacement: np.ndarray
    grid_affine: np.ndarray

    def voxel_matrix(self) -> np.ndarray:
        """3×4 ``[M | t]`` in the project's centred voxel convention (``spirs_tf.geometry``): a new-scan
        voxel ``x`` corresponds to prior voxel ``M (x − c) + t + c + d(x)/spacing``, ``c = N/2``."""
        g = np.asarray(self.grid_affine, dtype=np.float64)
        vox = np.linalg.solve(g, self.world_affine @ g)
        c = np.asarray(self.displacement.shape[:3], dtype=np.float64) / 2.0
        m = vox[:3, :3]
        t = vox[:3, :3] @ c + vox[:3, 3] - c
        return np.concatenate([m, t[:, None]], axis=1)

    def prior_voxel_coords(self) -> np.ndarray:
        """Prior-scan voxel coordinates (3, X, Y, Z) of every new-scan voxel (for resampling the prior)."""
        g = np.asarray(self.grid_affine, dtype=np.float64)
        shape = self.displacement.shape[:3]
        x = np.indices(shape, dtype=np.float64).reshape(3, -1)
        w = g[:3, :3] @ x + g[:3, 3:4]
        w_prior = self.world_affine[:3, :3] @ w + self.world_affine[:3, 3:4]
        w_prior += self.displacement.reshape(-1, 3).T
        return np.linalg.solve(g[:3, :3], w_prior - g[:3, 3:4]).reshape((3,) + tuple(shape))


def _voxel_map(affine: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """4×4 scanner voxel → patient voxel (same grid)."""
    return np.linalg.solve(affine, pose @ affine)


def _patient_coords(q_map: np.ndarray, shape) -> np.ndarray | None:
    """Patient voxel coordinates (3, *shape) float32 of every scanner voxel; ``None`` if identity."""
    if np.allclose(q_map, np.eye(4), atol=1e-9):
        return None
    x = np.indices(shape, dtype=np.float32)
    out = np.einsum("ab,b...->a...", q_map[:3, :3].astype(np.float32), x)
    out += q_map[:3, 3].astype(np.float32).reshape(3, 1, 1, 1)
    return out


def _support_at(support: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Nearest-neighbour lookup of a boolean grid at coordinates ``q`` (3, ...); False outside."""
    idx = np.rint(q).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.array(support.shape).reshape((3,) + (1,) * (q.ndim - 1))), axis=0)
    out = np.zeros(q.shape[1:], dtype=bool)
    out[ok] = support[tuple(i[ok] for i in idx)]
    return out


def _pullback(q: np.ndarray | None, field: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference coordinates ``r = q + m(q)`` (3, *shape) and the mask where ``m`` may be non-zero."""
    shape = field.shape[1:]
    if q is None:
        r = np.indices(shape, dtype=np.float32)
        r += field
        return r, support
    sub = _support_at(support, q)
    r = q.copy()
    if sub.any():
        pts = q[:, sub]
        for a in range(3):
            r[a][sub] += sample(field[a], pts, mode="nearest")
    return r, sub


def _tube(vessel: tuple, centre: np.ndarray, g: np.ndarray, pose: np.ndarray, shape, spacing: float):
    """``(box, float32 enhancement)`` of a lesion's vessel (:func:`~spirs_tf.synthetic.vessels.tube_density`)
    around its patient-space ``centre``, on the scanner grid ``g`` under ``pose``."""
    direction, half_length, radius, strength = vessel
    sigma = np.sqrt((0.65 * spacing) ** 2 + (0.5 * radius) ** 2)
    centre_vox = np.linalg.solve(g, np.linalg.solve(pose, np.append(centre, 1.0)))[:3]
    half = (half_length + spacing + 4.0 * sigma) / spacing * 1.04 + 1
    lo = np.maximum(np.floor(centre_vox - half).astype(int), 0)
    hi = np.maximum(np.minimum(np.ceil(centre_vox + half).astype(int) + 1, np.array(shape)), lo)
    idx = np.indices(hi - lo, dtype=np.float64).reshape(3, -1) + lo[:, None]
    patient = (pose[:3, :3] @ (g[:3, :3] @ idx + g[:3, 3:4]) + pose[:3, 3:4]).T
    density = tube_density(patient - centre, direction, half_length, radius, strength, spacing)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), density.reshape(hi - lo).astype(np.float32)


def render_scan(anatomy: PatientAnatomy, lesions, t: int, pose: np.ndarray, field: np.ndarray,
                support: np.ndarray, rng: np.random.Generator) -> SynthScan:
    """Render time point ``t`` of a patient (module docstring).

    Args:
        anatomy: the patient's anatomy.
        lesions: all of the patient's :class:`~spirs_tf.synthetic.lesions.Lesion` (absent ones are skipped).
        t: time point index.
        pose: 4×4 scanner world → patient world.
        field, support: :func:`~spirs_tf.synthetic.lesions.mass_effect_grid` of time ``t``.
        rng: the scan's random stream (contrast, bias, noise).
    """
    g = np.asarray(anatomy.affine, dtype=np.float64)
    shape, spacing = anatomy.shape, anatomy.spacing
    q_map = _voxel_map(g, pose)
    q = _patient_coords(q_map, shape)
    r, moved = _pullback(q, field, support)
    if q is None:  # aligned: only voxels inside the mass effect need interpolation
        t1, brain, vessels = anatomy.t1.copy(), anatomy.brain.copy(), anatomy.vessels.copy()
        if moved.any():
            pts = r[:, moved]
            for dst, src in ((t1, anatomy.t1), (brain, anatomy.brain), (vessels, anatomy.vessels)):
                dst[moved] = sample(src, pts)
    else:
        t1, brain, vessels = (sample(v, r) for v in (anatomy.t1, anatomy.brain, anatomy.vessels))
    inside_brain = brain > 0.5
    enhancement_gain = rng.uniform(0.85, 1.15)
    vessel_gain = rng.uniform(0.6, 1.4)

    labels = np.zeros(shape, dtype=np.int16)
    drawn, tubes = [], []
    for les in lesions:
        if not les.present(t):
            continue
        centre = deformed_centre(les, lesions, t)
        if les.vessel is not None:
            tubes.append(_tube(les.vessel, centre, g, pose, shape, spacing))
        radius = les.radius(t)
        reach = max(radius * les.shape.max_extent(),
                    (radius * (1 + les.edema_extent) + 1.0) * les.edema_shape.max_extent())
        centre_vox = np.linalg.solve(g, np.linalg.solve(pose, np.append(centre, 1.0)))[:3]
        half = reach / spacing * 1.04 + 2
        lo = np.maximum(np.floor(centre_vox - half).astype(int), 0)
        hi = np.minimum(np.ceil(centre_vox + half).astype(int) + 1, np.array(shape))
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        idx = np.indices(hi - lo, dtype=np.float64).reshape(3, -1) + lo[:, None]
        patient = (pose[:3, :3] @ (g[:3, :3] @ idx + g[:3, 3:4]) + pose[:3, 3:4]).T
        out = render_lesion(les, t, patient - centre, spacing)
        if not out["inside"].any():  # a micro lesion smaller than a voxel: keep its best voxel
            best = int(np.argmax(out["alpha"]))
            out["inside"][best] = True
            out["alpha"][best] = max(out["alpha"][best], 0.6)
        drawn.append((les, box, hi - lo, out))
        if np.any(out["edema"] > 0):
            wm = sample(anatomy.wm, r[(slice(None),) + box].reshape(3, -1))
            darken = 1.0 - out["edema"] * (0.1 + 0.9 * np.clip(wm, 0, 1))
            t1[box] *= darken.reshape(hi - lo).astype(np.float32)

    composite = t1 + np.float32(vessel_gain) * vessels
    for box, tube in tubes:  # the small vessels that vessel-like lesions sit on (lesions are drawn over them)
        composite[box] += np.float32(vessel_gain) * tube
    for les, box, size, out in drawn:
        alpha = out["alpha"].reshape(size).astype(np.float32)
        if les.faded(t):  # base + c α (signal − base): the contrast against the tissue beneath, × c
            alpha = alpha * np.float32(les.contrast_at(t))
        signal = (1.0 + (out["intensity"] - 1.0) * enhancement_gain).reshape(size).astype(np.float32)
        composite[box] = composite[box] * (1 - alpha) + signal * alpha
        view = labels[box]
        view[out["inside"].reshape(size) & (view == 0)] = les.lesion_id
        inside_brain[box] |= out["inside"].reshape(size)
    image = acquire(rng, composite, inside_brain)
    return SynthScan(image, (labels > 0).astype(np.uint8), labels, inside_brain, g)


def true_transform(anatomy: PatientAnatomy, prior: int, new: int, pose_prior: np.ndarray,
                   pose_new: np.ndarray, field_prior: np.ndarray, support_prior: np.ndarray,
                   field_new: np.ndarray, support_new: np.ndarray, iterations: int = 30) -> PairTransform:
    """The exact (prior ← new) correspondence of the generative model (module docstring).

    ``Φ_t⁻¹`` is found by the fixed-point iteration ``q ← r − m_t(q)`` (a contraction because the
    mass-effect slope is below 1), run only where either field may be non-zero.
    """
    g = np.asarray(anatomy.affine, dtype=np.float64)
    shape, spacing = anatomy.shape, anatomy.spacing
    world_affine = np.linalg.solve(pose_prior, pose_new)
    q = _patient_coords(_voxel_map(g, pose_new), shape)
    grid_q = np.indices(shape, dtype=np.float32) if q is None else q
    active = _support_at(support_new | support_prior, grid_q)
    displacement = np.zeros(shape + (3,), dtype=np.float32)
    if active.any():
        q_sub = grid_q[:, active].astype(np.float64)
        r = q_sub + np.stack([sample(field_new[a], q_sub, mode="nearest") for a in range(3)])
        q_t = r.copy()
        todo = np.arange(q_t.shape[1])
        for _ in range(iterations):  # points drop out once they have converged
            nxt = r[:, todo] - np.stack([sample(field_prior[a], q_t[:, todo], mode="nearest") for a in range(3)])
            step = np.max(np.abs(nxt - q_t[:, todo]), axis=0)
            q_t[:, todo] = nxt
            todo = todo[step >= 1e-4]
            if todo.size == 0:
                break
        delta_mm = (q_t - q_sub) * spacing
        displacement[active] = np.linalg.solve(pose_prior[:3, :3], delta_mm).T.astype(np.float32)
    return PairTransform(prior, new, world_affine, displacement, g)
