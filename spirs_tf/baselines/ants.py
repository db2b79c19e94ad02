"""ANTs affine and ANTs SyN baselines through antspyx (paper section 5.1, FACTS decision 11).

antspyx is an OPTIONAL extra (``pip install 'spirs-tf[baselines]'``). This module imports it only
inside :func:`register_ants`; without it, :func:`register_ants` raises :class:`SpirsInputError`
with an install hint (never an ImportError traceback). No TensorFlow here.

Modes and the antspyx arguments they map to (``ants.registration``):

==============  ==============================================================================
mode            ``ants.registration`` keyword arguments
==============  ==============================================================================
``affine``      ``type_of_transform="Affine"``, ``aff_random_sampling_rate=1.0`` (dense sampling:
                deterministic; with ANTsPy's default 0.2 a 32³ test volume failed 1 run in 4).
                Everything else ANTsPy's defaults: Mattes MI with 32 bins, 2100x1200x1200x10
                iterations, shrink 6x4x2x1, smoothing 3x2x1x0, centre-of-mass initialisation
                (replaced by ``initial_affine`` when given).
``syn-paper``   The paper's SyN (it follows the VoxelMorph paper: "SyN step size of 0.25, Gaussian
                parameters (9, 0.2), at three scales with at most 201 iterations each", CC metric;
                the CC radius 4 is decision 11): ``type_of_transform="SyNOnly"`` (no affine stage:
                deformable baselines get SPIRS-affine pre-aligned pairs), ``syn_metric="CC"``,
                ``syn_sampling=4`` (the CC radius), ``grad_step=0.25``, ``flow_sigma=9.0``,
                ``total_sigma=0.2`` (ANTs' ``SyN[0.25, 9, 0.2]``: update-field and total-field
                variances in voxel units), ``reg_iterations=(201, 201, 201)`` (three levels; ANTsPy
                derives shrink factors 4x2x1 and smoothing sigmas 2x1x0 from its length).
``syn-default`` ANTsPy's SyN defaults without the affine stage: ``type_of_transform="SyNOnly"``
                (Mattes MI, 32 bins, ``SyN[0.2, 3, 0]``, ``reg_iterations=(40, 20, 0)``).
==============  ==============================================================================

Arrays are handed to ANTs with origin 0, identity direction and the given spacing, so ANTs' index
``(i, j, k)`` is our array index ``[i, j, k]`` and a physical point is ``spacing · index``. The
forward transforms are composed by ``antsApplyTransforms`` into one displacement field on the fixed
grid (physical vectors ``d``) and converted to our convention, ``u = d / spacing`` voxels, so that
fixed voxel ``x`` samples the moving array at ``p(x) = x + u(x)``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np

from spirs_tf.baselines import RegistrationResult
from spirs_tf.errors import SpirsInputError

__all__ = ["ANTS_MISSING_MESSAGE", "ANTS_SETTINGS", "AntsResult", "ants_available", "register_ants"]

#: The result of :func:`register_ants` (the baselines' shared result type).
AntsResult = RegistrationResult

ANTS_MISSING_MESSAGE = "ANTs baselines need antspyx: pip install 'spirs-tf[baselines]'"

#: ``ants.registration`` keyword arguments per mode (see the module docstring).
ANTS_SETTINGS: dict[str, dict[str, Any]] = {
    "affine": {"type_of_transform": "Affine", "aff_random_sampling_rate": 1.0},
    "syn-paper": {
        "type_of_transform": "SyNOnly",
        "syn_metric": "CC",
        "syn_sampling": 4,
        "grad_step": 0.25,
        "flow_sigma": 9.0,
        "total_sigma": 0.2,
        "reg_iterations": (201, 201, 201),
    },
    "syn-default": {"type_of_transform": "SyNOnly"},
}

_MASK_INTERPOLATORS = {"linear": "linear", "nearest": "nearestNeighbor"}


def _import_ants():
    """Import antspyx or raise :class:`SpirsInputError` with the install hint."""
    try:
        import ants  # noqa: PLC0415  (optional dependency, imported on use)
    except ImportError:
        raise SpirsInputError(ANTS_MISSING_MESSAGE) from None
    return ants


def ants_available() -> bool:
    """True when antspyx can be imported (the ``baselines`` extra is installed)."""
    try:
        _import_ants()
    except SpirsInputError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def _volume(name: str, array, shape=None) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise SpirsInputError(f"{name} must be a 3-D array, got shape {arr.shape}")
    if shape is not None and arr.shape != tuple(shape):
        raise SpirsInputError(f"{name} has shape {arr.shape} but the fixed image has shape {tuple(shape)}")
    if not np.all(np.isfinite(arr)):
        raise SpirsInputError(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _spacing(spacing) -> np.ndarray:
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise SpirsInputError(f"spacing must be positive, got {spacing!r}")
    return sp


def _check_mask(mask: np.ndarray) -> np.ndarray:
    if not np.all(np.isin(mask, (0.0, 1.0))):
        raise SpirsInputError("moving_mask must be binary {0, 1}")
    return mask


# ------------------------------------------------------------------------------------------------
# affine conversions between our centred voxel convention and ITK's physical AffineTransform
# ------------------------------------------------------------------------------------------------
def _itk_affine_from_ours(matrix: np.ndarray, shape, spacing: np.ndarray):
    """Our ``p(x) = M(x − c) + t + c`` (voxels) → ITK ``T(X) = A(X − C) + C + Tr`` (physical).

    With ``X = S x`` (``S = diag(spacing)``, origin 0): ``A = S M S⁻¹``, ``C = S c``, ``Tr = S t``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 4) or not np.all(np.isfinite(m)):
        raise SpirsInputError(f"initial_affine must be a finite (3, 4) matrix [M | t], got shape {m.shape}")
    s = np.diag(spacing)
    c = np.asarray(shape, dtype=np.float64) / 2.0
    return s @ m[:, :3] @ np.linalg.inv(s), spacing * c, spacing * m[:, 3]


def _ours_from_itk(params: np.ndarray, centre: np.ndarray, shape, spacing: np.ndarray) -> np.ndarray:
    """ITK AffineTransform parameters (A row-major, Tr) and centre C → our ``[M | t]`` (voxels).

    ``p(x) = S⁻¹(A(Sx − C) + C + Tr) = M(x − c') + c' + tr'`` with ``M = S⁻¹AS``, ``c' = C/S``,
    ``tr' = Tr/S``; matching ``M(x − c) + t + c`` gives ``t = (M − I)(c − c') + tr'``.
    """
    params = np.asarray(params, dtype=np.float64)
    a, tr = params[:9].reshape(3, 3), params[9:12]
    s = np.diag(spacing)
    m = np.linalg.inv(s) @ a @ s
    c = np.asarray(shape, dtype=np.float64) / 2.0
    c_prime, tr_prime = np.asarray(centre, dtype=np.float64) / spacing, tr / spacing
    t = (m - np.eye(3)) @ (c - c_prime) + tr_prime
    return np.concatenate([m, t[:, None]], axis=1).astype(np.float32)


@contextlib.contextmanager
def _ants_random_seed(ants, seed: int | None):
    """Pass ``--random-seed`` to antsRegistration (ANTsPy reads ``ants.config._random_seed``)."""
    config = ants.config
    old = getattr(config, "_random_seed", None)
    config._random_seed = seed
    try:
        yield
    finally:
        config._random_seed = old


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def register_ants(
    fixed: np.ndarray,
    moving: np.ndarray,
    moving_mask: np.ndarray | None = None,
    spacing: float | Sequence[float] = 1.0,
    mode: str = "affine",
    initial_affine: np.ndarray | None = None,
    *,
    mask_interpolation: str = "linear",
    random_seed: int | None = 1,
    overrides: Mapping[str, Any] | None = None,
) -> AntsResult:
    """Register ``moving`` to ``fixed`` with ANTs (affine, or SyN on a pre-aligned pair).

    Both volumes live on grids of the same shape with isotropic or anisotropic ``spacing`` (mm),
    origin 0 and identity direction (the working grid). For the deformable modes the caller passes
    the SPIRS-affine pre-aligned moving image, as in the paper, or the affine as ``initial_affine``.

    Args:
        fixed: ``(D, H, W)`` fixed image.
        moving: ``(D, H, W)`` moving image (same shape).
        moving_mask: optional ``(D, H, W)`` binary mask on the moving grid; warped with the same
            transforms. It is NOT used to mask the similarity metric.
        spacing: voxel size in mm, a scalar or 3 values in array-axis order.
        mode: ``"affine"``, ``"syn-paper"`` or ``"syn-default"`` (see the module docstring).
        initial_affine: optional ``(3, 4)`` centred voxel affine ``[M | t]`` (fixed grid → moving
            array, ``p(x) = M(x − c) + t + c``) that ANTs starts from (``initial_transform``). The
            returned displacement includes it.
        mask_interpolation: ``"linear"`` (trilinear, then threshold at 0.5, as spirs-tf writes masks)
            or ``"nearest"`` (nearest neighbour).
        random_seed: antsRegistration ``--random-seed`` (None: ANTs' own, time-based).
        overrides: extra ``ants.registration`` keyword arguments replacing the mode's settings
            (e.g. ``{"reg_iterations": (20, 10, 5)}`` for a quick run, ``{"verbose": True}``).
    Returns:
        :class:`AntsResult` with ``warped_image`` (ANTs' own linear resampling, zeros outside),
        ``warped_mask`` (uint8 or None), ``displacement`` ``(D, H, W, 3)`` in voxels in our
        convention, ``seconds`` of ``ants.registration`` alone, ``method`` ``"ants-<mode>"`` and, for
        ``mode="affine"``, ``matrix`` (3, 4) in our centred voxel convention.
    Raises:
        SpirsInputError: antspyx missing; a bad mode or interpolation name; a non-3-D, mismatched
            or non-finite volume; a non-binary mask; non-positive spacing; a bad initial affine.
    """
    if mode not in ANTS_SETTINGS:
        raise SpirsInputError(f"unknown ANTs mode {mode!r}; choose one of {sorted(ANTS_SETTINGS)}")
    if mask_interpolation not in _MASK_INTERPOLATORS:
        raise SpirsInputError(
            f"unknown mask_interpolation {mask_interpolation!r}; choose one of {sorted(_MASK_INTERPOLATORS)}"
        )
    fixed_arr = _volume("fixed", fixed)
    moving_arr = _volume("moving", moving, fixed_arr.shape)
    mask_arr = None if moving_mask is None else _check_mask(_volume("moving_mask", moving_mask, fixed_arr.shape))
    sp = _spacing(spacing)
    ants = _import_ants()

    def image(arr):
        return ants.from_numpy(arr, origin=(0.0, 0.0, 0.0), spacing=tuple(float(v) for v in sp))

    fixed_img, moving_img = image(fixed_arr), image(moving_arr)
    settings = {**ANTS_SETTINGS[mode], **dict(overrides or {})}

    with tempfile.TemporaryDirectory(prefix="spirs_ants_") as tmp, _ants_random_seed(ants, random_seed):
        if initial_affine is not None:
            a, centre, translation = _itk_affine_from_ours(initial_affine, fixed_arr.shape, sp)
            init = ants.create_ants_transform(
                transform_type="AffineTransform", dimension=3, matrix=a, center=centre, translation=translation
            )
            init_path = os.path.join(tmp, "initial_affine.mat")
            ants.write_transform(init, init_path)
            settings["initial_transform"] = [init_path]

        start = time.perf_counter()
        reg = ants.registration(fixed_img, moving_img, outprefix=os.path.join(tmp, "reg_"), **settings)
        seconds = time.perf_counter() - start

        forward = list(reg["fwdtransforms"])
        warped = np.array(reg["warpedmovout"].numpy(), dtype=np.float32)
        field_path = ants.apply_transforms(fixed_img, moving_img, forward, compose=os.path.join(tmp, "field_"))
        field = np.array(ants.image_read(field_path).numpy(), dtype=np.float64)
        displacement = (field / sp).astype(np.float32)

        warped_mask = None
        if mask_arr is not None:
            soft = ants.apply_transforms(
                fixed_img, image(mask_arr), forward, interpolator=_MASK_INTERPOLATORS[mask_interpolation]
            ).numpy()
            warped_mask = (np.asarray(soft) > 0.5).astype(np.uint8)

        matrix = None
        if mode == "affine":
            tx = ants.read_transform(forward[0])
            matrix = _ours_from_itk(tx.parameters, tx.fixed_parameters, fixed_arr.shape, sp)

    return AntsResult(
        warped_image=warped,
        warped_mask=warped_mask,
        displacement=displacement,
        seconds=float(seconds),
        method=f"ants-{mode}",
        matrix=matrix,
    )
