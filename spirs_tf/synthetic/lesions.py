"""Brain metastases: sizes, irregular shapes, trajectories over time, placement and mass effect.

Sizes (:func:`sample_lesion_volumes`): a size bin is drawn with the proportions of the paper's test set
(Table 2: micro 637, small 465, medium 156, large 72 lesions), then a volume log-uniformly inside the bin
(micro 4–25 mm³ ≈ 2–3.6 mm across, small 25–125, medium 125–1000, large 1000–15000 mm³).

Shape (:class:`LesionShape`): a star-shaped body around the centre. For a local offset ``v`` (mm) the
lesion frame is ``w = (Rᵀ v) / a`` (random rotation ``R``, axis lengths ``a`` with ``Π a = 1``) and the
*normalised radius* is ``u = |w| / (r · ρ(w/|w|))`` with the radial profile
``ρ(n) = exp(Σ_k α_k cos(ω_k · n·e_k + φ_k))`` (low-frequency noise on the radius); ``u ≤ 1`` is inside.
The volume is ``(4π/3) r³ · F`` with ``F = mean_n ρ(n)³`` (Fibonacci-sphere quadrature), so ``r`` is chosen
for each time point to give the wanted volume exactly in the continuum.

Appearance (:func:`render_lesion`): solid enhancement (1.35–1.85 × white matter, with a ±8 % cosine
texture) when small; above a per-lesion radius (4–7 mm) an irregular necrotic core of relative size
``core_fraction`` grows in over 3 mm of radius (ring enhancement); T1-hypointense edema out to
``r (1 + edema_extent) + 1 mm`` with its own irregular shape, strongest in white matter (applied by the
renderer); partial volume is a linear one-voxel ramp across the surface. Some micro lesions are *faint*
(enhancement only 0–15 % above white matter) at every time point.

Fading (:func:`sample_fading`, off by default): what a clinician-edited prior adds. A lesion present in
both the prior ``t − 1`` and the new scan ``t`` (and at most ``max_volume`` mm³ at ``t``) is, with
probability ``fraction``, rendered at ``t`` with its contrast against the tissue beneath scaled by
``c ~ U(lo, hi)`` (the renderer blends it with ``c α`` instead of its partial volume ``α``), so it is barely
visible although it is in the new mask and in the prior's mask. Of those, a share ``vessel_fraction`` also
sits on a small vessel (a thin enhancing tube through its centre, drawn in the image only at every time
point the lesion is present, see :func:`spirs_tf.synthetic.vessels.tube_density`): faded, it looks like a
vessel's cross-section or kink.
Lesions with trajectory ``appear`` are *new*: absent (volume 0, not in the mask) before their first time point.

Mass effect (:func:`mass_effect`): a smooth radial push of surrounding tissue, as a pull-back field
``m(q)`` (mm) so that tissue seen at deformed position ``q`` came from reference position ``q + m(q)``::

    m(q) = −Σ_j s_j(|q − c_j|) · (q − c_j)/|q − c_j|,
    s(ρ) = A sin(π ρ / 2r)               for ρ < r,
    s(ρ) = A (g(ρ) − g(S)) / (1 − g(S))  for r ≤ ρ < S,  g(ρ) = exp(−(ρ − r)² / 2λ²),   0 beyond S,

with amplitude ``A = κ r · min(1, r / 6 mm)``, κ ≤ 0.4, ``λ = 0.8 r + 4 mm``, support ``S = r + 3λ``;
``s`` is C¹ at ``r`` and ``s′ ≤ πκ/2 < 1`` keeps ``q ↦ q + m(q)`` invertible. ``r`` is the lesion's
equivalent radius at that time point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

SIZE_BINS = ("micro", "small", "medium", "large")
#: Upper volume edges (mm³) of micro, small and medium (FACTS decision 10).
BIN_EDGES_MM3 = (25.0, 125.0, 1000.0)
#: Lesions per bin in the paper's test set (Table 2, Appendix A).
PAPER_TEST_COUNTS = (637.0, 465.0, 156.0, 72.0)
#: Volume range (mm³) drawn log-uniformly inside each bin.
VOLUME_RANGES = ((4.0, 25.0), (25.0, 125.0), (125.0, 1000.0), (1000.0, 15000.0))
#: Trajectory kinds and their default probabilities.
TRAJECTORIES = (("stable", 0.3), ("grow", 0.2), ("shrink", 0.25), ("appear", 0.15), ("disappear", 0.1))
MIN_VOLUME_MM3 = 3.0
MAX_VOLUME_MM3 = 25000.0


def size_bin(volume_mm3: float) -> str:
    """``micro`` (< 25 mm³), ``small`` (< 125), ``medium`` (< 1000) or ``large``; ``""`` for 0."""
    if volume_mm3 <= 0:
        return ""
    return SIZE_BINS[int(np.searchsorted(BIN_EDGES_MM3, volume_mm3, side="right"))]


def sample_lesion_volumes(rng: np.random.Generator, n: int, weights=PAPER_TEST_COUNTS) -> np.ndarray:
    """``n`` volumes (mm³): a bin with probability ∝ ``weights``, then log-uniform in :data:`VOLUME_RANGES`."""
    p = np.asarray(weights, dtype=np.float64)
    if p.shape != (4,) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"size weights must be 4 non-negative numbers with a positive sum, got {weights}")
    bins = rng.choice(4, size=int(n), p=p / p.sum())
    lo, hi = np.log(np.array(VOLUME_RANGES)[bins]).T
    return np.exp(rng.uniform(lo, hi))


def fibonacci_sphere(n: int = 1024) -> np.ndarray:
    """``n`` near-uniform unit vectors (n, 3)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = np.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z ** 2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random 3×3 rotation (QR of a Gaussian matrix with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


@dataclass(frozen=True, eq=False)
class LesionShape:
    """Irregular star-shaped body (see the module docstring)."""

    rotation: np.ndarray
    axes: np.ndarray
    directions: np.ndarray
    frequencies: np.ndarray
    phases: np.ndarray
    amplitudes: np.ndarray
    volume_factor: float = field(init=False)
    extent_factor: float = field(init=False)

    def __post_init__(self):
        rho = self.profile(fibonacci_sphere())
        object.__setattr__(self, "volume_factor", float(np.mean(rho ** 3)))
        object.__setattr__(self, "extent_factor", float(rho.max() * self.axes.max() * 1.05))

    def profile(self, n: np.ndarray) -> np.ndarray:
        """ρ(n) for unit vectors ``n`` (m, 3) in the lesion frame."""
        arg = (n @ self.directions.T) * self.frequencies + self.phases
        return np.exp((self.amplitudes * np.cos(arg)).sum(axis=-1))

    def max_extent(self) -> float:
        """Upper bound of |v| / r over the surface (5 % above the largest sampled direction)."""
        return self.extent_factor

    def normalised_radius(self, v: np.ndarray, r: float, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """``u`` (inside ⇔ u ≤ 1) and the surface radius ``r ρ`` (mm, in the lesion frame) for offsets v (m, 3).

        Points farther than ``r · max_extent() + margin`` are outside without evaluating ρ: there the
        surface radius is taken as that bound ``r · max_extent()``, so ``u > 1`` still grows with the
        distance and any partial-volume ramp narrower than ``margin`` is exactly 0.
        """
        v = np.asarray(v)
        dist = np.sqrt(np.einsum("...i,...i->...", v, v))
        surface = np.full(v.shape[:-1], float(r) * self.extent_factor)
        u = dist / max(r * self.extent_factor, 1e-9)
        near = dist <= r * self.extent_factor + margin
        if near.any():
            w = (v[near] @ self.rotation) / self.axes
            norm = np.linalg.norm(w, axis=-1)
            n = w / np.maximum(norm, 1e-9)[..., None]
            surface[near] = r * self.profile(n)
            u[near] = norm / np.maximum(surface[near], 1e-9)
        return u, surface


def sample_shape(rng: np.random.Generator, irregularity: float, elongation: float = 0.12) -> LesionShape:
    """Random :class:`LesionShape`: axes ``exp(N(0, elongation))`` normalised to product 1, five radial
    harmonics with amplitudes ``U(0, irregularity)`` and frequencies 1.5–4."""
    axes = np.exp(rng.normal(0.0, elongation, 3))
    axes /= np.prod(axes) ** (1 / 3)
    k = 5
    directions = fibonacci_sphere(k) @ random_rotation(rng).T
    return LesionShape(random_rotation(rng), axes, directions, rng.uniform(1.5, 4.0, k),
                       rng.uniform(0, 2 * np.pi, k), rng.uniform(0, irregularity, k))


@dataclass(frozen=True, eq=False)
class Lesion:
    """One metastasis over all time points (patient space, mm).

    Attributes:
        lesion_id: 1-based id, the same in every time point's instance map.
        centre: reference centre (3,) in patient world mm.
        volumes: target volume per time point (mm³; 0 = absent).
        trajectory: ``stable``, ``grow``, ``shrink``, ``appear`` or ``disappear``.
        shape, edema_shape, core_shape: :class:`LesionShape` of the lesion, its edema and its necrotic core.
        enhancement: solid/rim intensity (white matter = 1).
        necrosis: intensity of the necrotic core.
        core_fraction: relative core size once fully necrotic.
        ring_radius: equivalent radius (mm) above which the core appears (fully 3 mm later).
        edema_extent, edema_strength: edema radius ``r (1 + extent) + 1 mm``; darkening fraction.
        mass_kappa: mass-effect strength κ.
        contrast: ``None`` or relative contrast per time point (1 = as drawn; :func:`sample_fading`).
        vessel: ``None`` or ``(direction (3,), half_length_mm, radius_mm, strength)`` of the small vessel
            the lesion sits on (:func:`spirs_tf.synthetic.vessels.tube_density`), drawn while it is present.
        faint: a low-contrast micro lesion (at every time point).
        texture: (3, 4) rows ``(k_x, k_y, k_z, phase)``: enhancement × ``1 + 0.08 Σ cos(k·v + φ)``.
    """

    lesion_id: int
    centre: np.ndarray
    volumes: np.ndarray
    trajectory: str
    shape: LesionShape
    edema_shape: LesionShape
    core_shape: LesionShape
    texture: np.ndarray
    enhancement: float
    necrosis: float
    core_fraction: float
    ring_radius: float
    edema_extent: float
    edema_strength: float
    mass_kappa: float
    faint: bool
    contrast: np.ndarray | None = None
    vessel: tuple | None = None

    def present(self, t: int) -> bool:
        return bool(self.volumes[t] > 0)

    def contrast_at(self, t: int) -> float:
        """Relative contrast at time ``t``: 1, or the fading factor ``c`` (:func:`sample_fading`)."""
        return 1.0 if self.contrast is None else float(self.contrast[t])

    def faded(self, t: int) -> bool:
        """Whether the lesion is rendered with reduced contrast at time ``t``."""
        return self.contrast_at(t) != 1.0

    def radius(self, t: int) -> float:
        """Equivalent radius ``r`` (mm) giving ``volumes[t]``: ``(3 V / (4π F))^(1/3)``."""
        return float((3.0 * self.volumes[t] / (4.0 * np.pi * self.shape.volume_factor)) ** (1 / 3))

    def extent(self) -> float:
        """Largest distance (mm) of the lesion surface from its centre over all time points."""
        return max(self.radius(t) for t in range(len(self.volumes))) * self.shape.max_extent()

    def mass_amplitude(self, t: int) -> float:
        r = self.radius(t)
        return self.mass_kappa * r * min(1.0, r / 6.0) if self.present(t) else 0.0


def sample_trajectory(rng: np.random.Generator, volume: float, n_tp: int, kind: str) -> np.ndarray:
    """Volumes (mm³) over ``n_tp`` time points for a lesion of reference ``volume`` (see module docstring)."""
    t = np.arange(n_tp, dtype=np.float64)
    mid = (n_tp - 1) / 2.0
    if kind == "stable" or n_tp == 1:
        v = np.full(n_tp, volume)
    elif kind == "grow":
        v = volume * rng.uniform(1.15, 1.8) ** (t - mid)
    elif kind == "shrink":
        v = volume * rng.uniform(1.2, 2.0) ** (mid - t)
    elif kind == "appear":
        start = int(rng.integers(1, n_tp))
        v = np.where(t >= start, volume * rng.uniform(1.1, 1.8) ** (t - start), 0.0)
    elif kind == "disappear":
        stop = int(rng.integers(1, n_tp))
        v = np.where(t < stop, volume * rng.uniform(1.3, 2.5) ** (-t), 0.0)
    else:
        raise ValueError(f"unknown trajectory {kind!r}; expected one of {[k for k, _ in TRAJECTORIES]}")
    return np.where(v > 0, np.clip(v, MIN_VOLUME_MM3, MAX_VOLUME_MM3), 0.0)


def sample_lesion(rng: np.random.Generator, lesion_id: int, volume: float, n_tp: int, kind: str,
                  faint_fraction: float = 0.3) -> Lesion:
    """A lesion with random shape and appearance (its ``centre`` is set by placement)."""
    volumes = sample_trajectory(rng, volume, n_tp, kind)
    big = float(np.clip(np.log(volume / 25.0) / np.log(1000.0 / 25.0), 0.0, 1.0))
    faint = bool(volume < BIN_EDGES_MM3[0] and rng.random() < faint_fraction)
    return Lesion(
        lesion_id=lesion_id, centre=np.zeros(3), volumes=volumes, trajectory=kind,
        shape=sample_shape(rng, irregularity=0.04 + 0.12 * big),
        edema_shape=sample_shape(rng, irregularity=0.2, elongation=0.15),
        core_shape=sample_shape(rng, irregularity=0.2, elongation=0.15),
        texture=np.concatenate([random_rotation(rng) * (2 * np.pi / rng.uniform(3.0, 9.0, (3, 1))),
                                rng.uniform(0, 2 * np.pi, (3, 1))], axis=1),
        enhancement=float(rng.uniform(1.0, 1.15) if faint else rng.uniform(1.35, 1.85)),
        necrosis=float(rng.uniform(0.3, 0.5)), core_fraction=float(rng.uniform(0.45, 0.75)),
        ring_radius=float(rng.uniform(4.0, 7.0)), edema_extent=float(rng.uniform(0.5, 2.0) * big),
        edema_strength=float(rng.uniform(0.25, 0.5)), mass_kappa=float(rng.uniform(0.15, 0.4)), faint=faint)


def sample_fading(rng: np.random.Generator, lesions: list, fraction: float, contrast=(0.15, 0.45),
                  vessel_fraction: float = 0.0, max_volume: float = BIN_EDGES_MM3[1]) -> list:
    """Fade persisting lesions in the later scan of a pair (module docstring, "Fading").

    For each lesion (in order) and each time point ``t ≥ 1`` with ``0 < volumes[t − 1]``,
    ``0 < volumes[t] ≤ max_volume``, the same seven numbers are drawn whatever the settings (so raising
    ``fraction`` only adds faded instances): ``u, c, v ~ U(0, 1)``, a direction, a half length
    ``U(4, 10)`` mm, a radius ``U(0.35, 0.8)`` mm and a strength ``U(0.8, 1.8)``. The lesion fades at ``t``
    when ``u < fraction`` (relative contrast ``lo + c (hi − lo)``); a faded lesion sits on a vessel when
    ``v < vessel_fraction`` (the first such draw gives the vessel).

    Args:
        rng: the patient's fading stream (never one of the other streams, so the rest is unchanged).
        lesions: :class:`Lesion` list (placed).
        fraction: probability of fading a candidate lesion at a time point, in [0, 1].
        contrast: ``(lo, hi)`` relative contrast of a faded lesion, ``0 ≤ lo ≤ hi < 1``.
        vessel_fraction: share of faded instances drawn on a vessel, in [0, 1].
        max_volume: largest target volume (mm³) at ``t`` that may fade (default: micro and small).

    Returns:
        the lesions, with ``contrast`` (and ``vessel``) set where something faded (others unchanged).
    """
    import dataclasses

    lo, hi = float(contrast[0]), float(contrast[1])
    out = []
    for les in lesions:
        factors = np.ones(len(les.volumes))
        vessel = None
        for t in range(1, len(les.volumes)):
            if not (les.volumes[t - 1] > 0 and 0 < les.volumes[t] <= max_volume):
                continue
            u, c, v = rng.random(3)
            direction = rng.standard_normal(3)
            half_length, radius, strength = rng.uniform(4.0, 10.0), rng.uniform(0.35, 0.8), rng.uniform(0.8, 1.8)
            if u < fraction:
                factors[t] = lo + c * (hi - lo)
                if v < vessel_fraction and vessel is None:
                    vessel = (direction / np.linalg.norm(direction), float(half_length), float(radius),
                              float(strength))
        changed = bool(np.any(factors != 1.0))
        out.append(dataclasses.replace(les, contrast=factors if changed else None, vessel=vessel) if changed
                   else les)
    return out


def render_lesion(lesion: Lesion, t: int, offsets: np.ndarray, voxel_mm: float) -> dict:
    """Lesion and edema at time ``t`` for local offsets ``offsets`` (m, 3) mm from the lesion's centre.

    Returns:
        dict of (m,) arrays: ``inside`` (bool, u ≤ 1), ``alpha`` (partial-volume occupancy in [0, 1],
        a linear ramp one voxel wide across the surface; ``alpha ≥ 0.5`` ⇔ inside), ``intensity``
        (lesion signal, white matter = 1) and ``edema`` (darkening fraction in [0, 1)).
    """
    r = lesion.radius(t)
    u, surface = lesion.shape.normalised_radius(offsets, r, margin=voxel_mm)
    alpha = np.clip(0.5 + (1.0 - u) * surface / voxel_mm, 0.0, 1.0)
    texture = 1.0 + 0.08 * np.cos(offsets @ lesion.texture[:, :3].T + lesion.texture[:, 3]).sum(axis=-1)
    enhancement = 1.0 + (lesion.enhancement - 1.0) * texture
    core = lesion.core_fraction * float(np.clip((r - lesion.ring_radius) / 3.0, 0.0, 1.0))
    if core > 0:
        uc, _ = lesion.core_shape.normalised_radius(offsets, core * r)
        rim = np.maximum(1.0 / (1.0 + np.exp(-(uc - 1.0) / 0.1)), np.clip((u - 0.8) / 0.15, 0.0, 1.0))
        intensity = lesion.necrosis + (enhancement - lesion.necrosis) * rim
    else:
        intensity = enhancement
    edema_radius = r * (1.0 + lesion.edema_extent) + 1.0
    ue, _ = lesion.edema_shape.normalised_radius(offsets, edema_radius)
    strength = lesion.edema_strength * float(np.clip((r - 1.5) / 4.0, 0.0, 1.0)) if lesion.edema_extent > 0 else 0.0
    edema = strength * np.clip((1.0 - ue) / 0.5, 0.0, 1.0)
    return {"inside": u <= 1.0, "alpha": alpha, "intensity": intensity, "edema": edema}


# --------------------------------------------------------------------------------------------
# mass effect
# --------------------------------------------------------------------------------------------
def _push(rho: np.ndarray, r: float, amplitude: float) -> np.ndarray:
    lam = 0.8 * r + 4.0
    support = r + 3.0 * lam
    g_s = np.exp(-0.5 * (3.0) ** 2)
    outer = amplitude * (np.exp(-0.5 * ((rho - r) / lam) ** 2) - g_s) / (1.0 - g_s)
    s = np.where(rho < r, amplitude * np.sin(0.5 * np.pi * rho / max(r, 1e-9)), outer)
    return np.where(rho < support, s, 0.0)


def mass_effect_support(lesion: Lesion, t: int) -> float:
    """Radius (mm) outside which lesion's push is exactly 0 at time ``t`` (0 if it has none)."""
    if lesion.mass_amplitude(t) < 0.02:
        return 0.0
    r = lesion.radius(t)
    return r + 3.0 * (0.8 * r + 4.0)


def mass_effect(points: np.ndarray, lesions, t: int) -> np.ndarray:
    """Pull-back displacement ``m(q)`` (mm) at patient points ``points`` (m, 3) mm (module docstring)."""
    points = np.asarray(points, dtype=np.float64)
    out = np.zeros_like(points)
    for les in lesions:
        support = mass_effect_support(les, t)
        if support == 0.0:
            continue
        v = points - les.centre
        rho = np.linalg.norm(v, axis=-1)
        near = rho < support
        if not near.any():
            continue
        s = _push(rho[near], les.radius(t), les.mass_amplitude(t))
        out[near] -= (s / np.maximum(rho[near], 1e-9))[:, None] * v[near]
    return out


def mass_effect_grid(lesions, t: int, affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mass_effect` on every voxel of a RAS axis-aligned grid, in voxels.

    Returns:
        ``(field, support)``: float32 (3, *shape) pull-back in voxels, bool support (where it is
        non-zero, grown by one voxel so that trilinear reads near its edge are covered).
    """
    spacing, origin = float(affine[0, 0]), np.asarray(affine[:3, 3], dtype=np.float64)
    shape = tuple(int(n) for n in shape)
    fld = np.zeros((3,) + shape, dtype=np.float32)
    support = np.zeros(shape, dtype=bool)
    for les in lesions:
        radius = mass_effect_support(les, t)
        if radius == 0.0:
            continue
        c = (les.centre - origin) / spacing
        lo = np.maximum(np.floor(c - radius / spacing).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(c + radius / spacing).astype(int) + 2, np.array(shape))
        if np.any(hi <= lo):
            continue
        idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        pts = idx.reshape(-1, 3) * spacing + origin
        m = mass_effect(pts, [les], t) / spacing
        box = (slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))
        m = np.moveaxis(m.reshape(idx.shape), -1, 0).astype(np.float32)
        fld[box] += m
        support[box[1:]] |= ndimage.binary_dilation(np.any(m != 0, axis=0))
    return fld, support


def deformed_centre(lesion: Lesion, lesions, t: int, iterations: int = 30) -> np.ndarray:
    """Where the lesion's reference centre lies at time ``t``: solve ``q + m_t(q) = c`` by fixed point."""
    q = lesion.centre.copy()
    for _ in range(iterations):
        new = lesion.centre - mass_effect(q[None], lesions, t)[0]
        if np.max(np.abs(new - q)) < 1e-4:
            return new
        q = new
    return q


# --------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------
def place_lesions(rng: np.random.Generator, lesions: list, parenchyma_depth: np.ndarray, gm: np.ndarray,
                  wm: np.ndarray, affine: np.ndarray, poses=(), gap_mm: float = 3.0, tries: int = 60) -> list:
    """Give each lesion a centre in the parenchyma, preferring the grey/white junction, without overlap.

    Candidates are voxels whose distance to non-parenchyma is at least the lesion's :meth:`Lesion.extent`
    + 0.5 mm, drawn with weight ``4·gm·wm + 0.25`` (largest lesions first) plus a sub-voxel jitter. A
    candidate is rejected if it comes closer than ``extent_i + extent_j + gap_mm`` to a placed lesion, or
    if, under any time point's pose (4×4 scanner world → patient world), the lesion would leave the
    scanner grid. Lesions that find no place are dropped; ids are renumbered 1..n in the input order.

    Returns:
        the placed lesions (copies with ``centre`` and ``lesion_id`` set).
    """
    import dataclasses

    shape = np.array(parenchyma_depth.shape)
    spacing, origin = float(affine[0, 0]), np.asarray(affine[:3, 3], dtype=np.float64)
    inverse_poses = [np.linalg.inv(p) for p in poses]
    weights = (4.0 * gm * wm + 0.25).ravel()
    depth = parenchyma_depth.ravel()
    order = sorted(range(len(lesions)), key=lambda i: -lesions[i].extent())
    placed: dict[int, Lesion] = {}
    for i in order:
        les = lesions[i]
        ext = les.extent()
        cand = np.flatnonzero(depth >= ext + 0.5)
        if cand.size == 0:
            continue
        p = weights[cand] / weights[cand].sum()
        picks = cand[rng.choice(cand.size, size=tries, p=p)]
        jitter = rng.uniform(-0.5, 0.5, size=(tries, 3))
        for pick, jit in zip(picks, jitter):
            c = origin + spacing * (np.array(np.unravel_index(pick, shape), dtype=np.float64) + jit)
            if any(np.linalg.norm(c - o.centre) < ext + o.extent() + gap_mm for o in placed.values()):
                continue
            margin = ext / spacing * 1.05 + 1.0
            ok = True
            for inv in inverse_poses:
                x = ((inv[:3, :3] @ c + inv[:3, 3]) - origin) / spacing
                if np.any(x < margin) or np.any(x > shape - 1 - margin):
                    ok = False
                    break
            if ok:
                placed[i] = dataclasses.replace(les, centre=c)
                break
    return [dataclasses.replace(placed[i], lesion_id=n + 1) for n, i in enumerate(sorted(placed))]
