"""Brain anatomy for synthetic patients: the MNI152 2009 template on the working grid, warped per patient.

The template ships with nilearn (ICBM152 2009a nonlinear symmetric, ``mni_icbm152_*_tal_nlin_sym_09a``,
1 mm, skull-stripped T1 plus grey and white matter probability maps); nothing is downloaded.
:func:`working_template` resamples it once per ``(grid_size, spacing_mm)`` onto the working grid of
:func:`spirs_tf.preprocess.working_grid_for` (RAS-aligned cube centred on the brain; world centre at voxel
``(N − 1)/2``) and caches the result in memory.

A *patient* (:func:`patient_anatomy`) is the template pulled back through a smooth random displacement
``w_p`` (a few mm, low spatial frequency) plus a radial ventricle change around the ventricles' centroid::

    patient(x) = template(x + w_p(x)),      w_p(x) = e(x) − k · g(x) · (x − c_v)

with ``e`` the elastic part, ``g`` the smoothed ventricle mask (maximum 1), ``k`` the ventricle
enlargement (``k > 0`` → larger ventricles). All fields are in voxels of the working grid. Patient
space is therefore the working grid's world space before any head repositioning.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Intensity of white matter after template normalisation (grey ≈ 0.78, CSF ≈ 0.37).
WM_LEVEL = 1.0


class _OnWorkingGrid:
    """``shape`` and ``spacing`` of a dataclass holding ``t1`` and an isotropic ``affine``."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])


@dataclass(frozen=True, eq=False)
class Template(_OnWorkingGrid):
    """The MNI152 template on the working grid (all float32 arrays of ``shape``).

    Attributes:
        affine: 4×4 working voxel → RAS world mm.
        t1: skull-stripped T1, white matter median = 1, background 0.
        brain: brain mask probability in [0, 1].
        gm, wm: grey/white matter probabilities.
        ventricle_weight: smoothed lateral-ventricle mask, maximum 1.
        ventricle_centre: (3,) voxel coordinates of the ventricles' centroid.
    """

    affine: np.ndarray
    t1: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    ventricle_weight: np.ndarray
    ventricle_centre: np.ndarray


@dataclass(frozen=True, eq=False)
class PatientAnatomy(_OnWorkingGrid):
    """One patient's anatomy in patient space (the working grid), float32 arrays.

    Attributes:
        t1, brain, gm, wm: as in :class:`Template`, warped.
        vessels: additive enhancement of vessels and dural strips (white-matter units).
        parenchyma_depth: distance in mm from each voxel to the nearest non-parenchyma voxel.
        brain_depth: distance in mm to the outside of the brain mask.
    """

    affine: np.ndarray
    t1: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    vessels: np.ndarray
    parenchyma_depth: np.ndarray
    brain_depth: np.ndarray


@functools.lru_cache(maxsize=1)
def _mni_1mm():
    """The nilearn MNI152 2009 arrays at 1 mm (T1 scaled to [0, 1], mask, GM, WM) and their affine."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        t1 = datasets.load_mni152_template(resolution=1)
        mask = datasets.load_mni152_brain_mask(resolution=1)
        gm = datasets.load_mni152_gm_template(resolution=1)
        wm = datasets.load_mni152_wm_template(resolution=1)
    arrays = [np.asarray(img.dataobj, dtype=np.float32) for img in (t1, mask, gm, wm)]
    return arrays, np.asarray(t1.affine, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def working_template(grid_size: int = 128, spacing_mm: float = 1.5) -> Template:
    """The MNI152 template resampled onto the ``grid_size³`` working grid at ``spacing_mm`` (cached).

    The 1 mm maps are blurred with a Gaussian of σ = √(s² − 1)/2.355 mm before trilinear resampling
    (anti-aliasing for spacings s > 1 mm).

    Raises:
        ValueError: non-positive ``grid_size`` or ``spacing_mm``.
    """
    from spirs_tf.io import Volume
    from spirs_tf.preprocess import to_working, working_grid_for

    (t1, mask, gm, wm), affine = _mni_1mm()
    mapping = working_grid_for(Volume(mask, affine), int(grid_size), float(spacing_mm))
    sigma = np.sqrt(max(float(spacing_mm) ** 2 - 1.0, 0.0)) / 2.355
    out = []
    for array in (t1, mask, gm, wm):
        if sigma > 0.1:
            array = ndimage.gaussian_filter(array, sigma)
        out.append(np.clip(to_working(Volume(array, affine), mapping, order=1), 0.0, None))
    t1w, brain, gmw, wmw = out
    brain = np.clip(brain, 0.0, 1.0)
    t1w *= brain > 0.5
    t1w /= np.median(t1w[(wmw > 0.9) & (brain > 0.5)]) / WM_LEVEL
    ventricle_weight, ventricle_centre = _ventricles(t1w, brain, float(spacing_mm))
    arrays = [a.astype(np.float32) for a in (t1w, brain, gmw, wmw, ventricle_weight)]
    for a in arrays:
        a.setflags(write=False)
    return Template(np.asarray(mapping.working_affine, dtype=np.float64), *arrays[:4], arrays[4],
                    ventricle_centre)


def _ventricles(t1: np.ndarray, brain: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed mask of the deep CSF (lateral ventricles) and its centroid in voxels."""
    inside = brain > 0.5
    depth = ndimage.distance_transform_edt(inside) * spacing
    csf = inside & (t1 < 0.55) & (depth > 18.0)
    labels, n = ndimage.label(csf)
    if n:
        sizes = ndimage.sum(csf, labels, index=np.arange(1, n + 1))
        keep = np.argsort(sizes)[::-1][:2] + 1  # the two lateral ventricles (or their connected body)
        csf = np.isin(labels, keep)
    if not csf.any():  # very coarse grids: fall back to the brain's centre
        centre = np.array(ndimage.center_of_mass(inside), dtype=np.float64)
        return np.zeros_like(t1), centre
    weight = ndimage.gaussian_filter(csf.astype(np.float32), 6.0 / spacing)
    weight /= weight.max()
    return weight, np.array(ndimage.center_of_mass(csf), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# smooth random fields
# --------------------------------------------------------------------------------------------
def smooth_random_field(rng: np.random.Generator, shape, max_frequency: int = 3,
                        channels: int = 1) -> np.ndarray:
    """Random low-frequency field: a separable cosine series with random phases, unit RMS per channel.

    ``f(x) = Σ_{a,b,c ≤ F} C_abc · cos(π a x/N + φ_a) · cos(π b y/N + ψ_b) · cos(π c z/N + χ_c)`` with
    ``C_abc ~ N(0, 1/(1 + a² + b² + c²))`` (energy falls with frequency). Evaluated with tensor
    contractions, so it costs O(N³·F), not O(N³·F³).

    Returns:
        float32 ``(channels, *shape)`` with zero mean and unit RMS per channel.
    """
    shape = tuple(int(n) for n in shape)
    f = np.arange(max_frequency + 1)
    decay = 1.0 / np.sqrt(1.0 + f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    out = np.empty((channels,) + shape, dtype=np.float32)
    for ch in range(channels):
        bases = []
        for n in shape:
            phase = rng.uniform(0, 2 * np.pi, size=(f.size, 1))
            bases.append(np.cos(np.pi * f[:, None] * np.arange(n)[None, :] / n + phase).astype(np.float32))
        coef = (rng.standard_normal((f.size,) * 3) * decay).astype(np.float32)
        field = np.tensordot(coef, bases[0], axes=(0, 0))          # (b, c, i)
        field = np.tensordot(field, bases[1], axes=(0, 0))          # (c, i, j)
        field = np.tensordot(field, bases[2], axes=(0, 0))          # (i, j, k)
        field -= field.mean()
        field /= max(float(np.sqrt(np.mean(field ** 2))), 1e-6)
        out[ch] = field
    return out


def sample(volume: np.ndarray, coords: np.ndarray, order: int = 1, mode: str = "constant") -> np.ndarray:
    """``volume`` at voxel coordinates ``coords`` (3, ...) with :func:`scipy.ndimage.map_coordinates`.

    ``mode="constant"`` (images: 0 outside the grid) or ``"nearest"`` (displacement fields: extended
    from the edge, so that points a hair outside the grid read the edge value, not 0).
    """
    return ndimage.map_coordinates(volume, coords, order=order, mode=mode, cval=0.0,
                                   prefilter=order > 1).astype(np.float32, copy=False)


def patient_anatomy(template: Template, rng: np.random.Generator, warp_mm: float = 2.5,
                    ventricle_change: float = 0.25) -> PatientAnatomy:
    """Warp the template into a new patient (see the module docstring) and add vessels.

    Args:
        template: from :func:`working_template`.
        rng: the patient's anatomy random stream.
        warp_mm: RMS of the elastic displacement in mm.
        ventricle_change: the ventricle enlargement ``k`` is drawn from U(−0.6·v, v).

    Returns:
        :class:`PatientAnatomy` on the template's grid.
    """
    from spirs_tf.synthetic.vessels import vessel_map

    shape, spacing = template.shape, template.spacing
    grid = np.indices(shape, dtype=np.float32)
    field = smooth_random_field(rng, shape, max_frequency=3, channels=3) * np.float32(warp_mm / spacing)
    k = rng.uniform(-0.6 * ventricle_change, ventricle_change)
    offset = grid - template.ventricle_centre.astype(np.float32).reshape(3, 1, 1, 1)
    field -= np.float32(k) * template.ventricle_weight[None] * offset
    coords = grid + field
    del grid, offset, field
    t1 = np.clip(sample(template.t1, coords, order=3), 0.0, None)
    brain = np.clip(sample(template.brain, coords), 0.0, 1.0)
    gm = sample(template.gm, coords)
    wm = sample(template.wm, coords)
    del coords
    inside = brain > 0.5
    t1 *= inside
    parenchyma = inside & (gm + wm > 0.5)
    parenchyma_depth = (ndimage.distance_transform_edt(parenchyma) * spacing).astype(np.float32)
    brain_depth = (ndimage.distance_transform_edt(inside) * spacing).astype(np.float32)
    vessels = vessel_map(rng, inside, brain_depth, spacing, csf=inside & (gm + wm < 0.5))
    return PatientAnatomy(template.affine, t1, brain, gm, wm, vessels, parenchyma_depth, brain_depth)
