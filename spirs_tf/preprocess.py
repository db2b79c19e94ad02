"""User scan ↔ the network's working grid (FACTS decision 1), in NumPy/SciPy.

The working grid is a cube of ``grid_size`` voxels at ``spacing_mm`` isotropic, axis-aligned in RAS+
(voxel axes i, j, k point to Right, Anterior, Superior) and centred on the brain. Bringing a scan onto
it reorients to RAS, resamples to the working spacing and crops/pads **in one resampling** of the
original data: for every working voxel ``w`` we read the original volume at

    v(w) = A_orig⁻¹ · A_work · w            (4×4 homogeneous, voxel → world → voxel)

with :func:`scipy.ndimage.affine_transform` (order 1 = trilinear for images and probabilities,
order 0 = nearest for masks; zeros outside the scan). :func:`from_working` is the same operation in
the other direction, ``w(v) = A_work⁻¹ · A_orig · v``, so every prediction returns to the user's grid.

Grid placement: the centre of the bounding box of the non-zero voxels of the image (or of the brain
mask when one is given), in world mm, is placed at working voxel ``(grid_size − 1)/2`` per axis (the
middle of the cube, so the field of view is symmetric about the brain).

Intensities (:func:`normalize_intensity`): clip the non-zero voxels at mean ± k·σ (their mean and
standard deviation), then divide by the largest clipped value after shifting by ``min(0, lowest)``,
so that for the usual non-negative MR intensities this is exactly a min–max rescale of the whole
volume with the background as the minimum. Voxels that were 0 stay exactly 0 (the losses rely on it)
and every non-zero voxel ends at least :data:`BRAIN_FLOOR` (so "non-zero" = "brain" still holds after
normalisation, even when a brain voxel had the lowest value of a signed image).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from spirs_tf.errors import SpirsInputError
from spirs_tf.geometry import subsample  # noqa: F401 (re-exported)
from spirs_tf.io import Volume, check_same_grid

#: Smallest value a non-zero (brain) voxel takes after :func:`normalize_intensity`.
#: Representable in float16 (normal range starts at 6.1e-5) and far below any contrast that matters.
BRAIN_FLOOR = 1e-3


@dataclass(frozen=True, eq=False)
class GridMapping:
    """Geometry linking the working grid and the original scan.

    Attributes:
        working_affine: 4×4, working voxel → RAS+ world mm.
        working_shape: ``(G, G, G)``.
        original_affine: 4×4, original voxel → RAS+ world mm.
        original_shape: shape of the original scan.
    """

    working_affine: np.ndarray
    working_shape: tuple[int, int, int]
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]

    def working_to_original(self) -> np.ndarray:
        """4×4 matrix taking a working voxel index to an original voxel index."""
        return np.linalg.solve(np.asarray(self.original_affine, float), np.asarray(self.working_affine, float))

    def original_to_working(self) -> np.ndarray:
        """4×4 matrix taking an original voxel index to a working voxel index."""
        return np.linalg.solve(np.asarray(self.working_affine, float), np.asarray(self.original_affine, float))

    def to_dict(self) -> dict:
        """JSON-safe dict (lists of Python floats and ints)."""
        return {
            "working_affine": np.asarray(self.working_affine, dtype=float).tolist(),
            "working_shape": [int(n) for n in self.working_shape],
            "original_affine": np.asarray(self.original_affine, dtype=float).tolist(),
            "original_shape": [int(n) for n in self.original_shape],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GridMapping":
        """Inverse of :meth:`to_dict`.

        Raises:
            SpirsInputError: missing keys or wrong shapes (e.g. a hand-edited file).
        """
        try:
            mapping = cls(np.asarray(d["working_affine"], dtype=np.float64),
                          tuple(int(n) for n in d["working_shape"]),
                          np.asarray(d["original_affine"], dtype=np.float64),
                          tuple(int(n) for n in d["original_shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SpirsInputError(f"invalid grid mapping: {exc!r}") from exc
        if (mapping.working_affine.shape != (4, 4) or mapping.original_affine.shape != (4, 4)
                or len(mapping.working_shape) != 3 or len(mapping.original_shape) != 3):
            raise SpirsInputError("invalid grid mapping: affines must be 4x4 and shapes 3-D")
        return mapping


@dataclass(frozen=True, eq=False)
class PreprocessedScan:
    """A scan on the working grid: ``image`` float32 in [0, 1] (background 0), ``mask`` float32
    {0, 1} or ``None``, and the :class:`GridMapping` to go back."""

    image: np.ndarray
    mask: np.ndarray | None
    mapping: GridMapping


def brain_centre_world(volume: Volume, brain_mask: Volume | None = None) -> np.ndarray:
    """World (RAS mm) centre of the bounding box of the non-zero voxels of ``brain_mask`` (or ``volume``).

    Raises:
        SpirsInputError: the region is empty, or the brain mask is on another grid.
    """
    region = volume if brain_mask is None else brain_mask
    if brain_mask is not None:
        check_same_grid(brain_mask, volume)
    nz = np.nonzero(region.data)
    if nz[0].size == 0:
        raise SpirsInputError("no non-zero voxels to centre the working grid on", region.path)
    centre = np.array([(idx.min() + idx.max()) / 2.0 for idx in nz] + [1.0])
    return (np.asarray(region.affine, dtype=np.float64) @ centre)[:3]


def working_grid_for(volume: Volume, grid_size: int, spacing_mm: float,
                     brain_mask: Volume | None = None) -> GridMapping:
    """RAS-aligned cube of ``grid_size`` voxels at ``spacing_mm``, centred on the brain.

    ``working_affine = [[s, 0, 0, o0], [0, s, 0, o1], [0, 0, s, o2], [0, 0, 0, 1]]`` with
    ``o = centre − s·(grid_size − 1)/2`` and ``centre`` from :func:`brain_centre_world`.

    Raises:
        SpirsInputError: empty image/brain mask, mask on another grid.
        ValueError: non-positive ``grid_size`` or ``spacing_mm``.
    """
    if int(grid_size) <= 0 or not spacing_mm > 0:
        raise ValueError(f"grid_size and spacing_mm must be positive, got {grid_size}, {spacing_mm}")
    centre = brain_centre_world(volume, brain_mask)
    affine = np.diag([float(spacing_mm)] * 3 + [1.0])
    affine[:3, 3] = centre - spacing_mm * (int(grid_size) - 1) / 2.0
    return GridMapping(affine, (int(grid_size),) * 3, np.asarray(volume.affine, dtype=np.float64).copy(),
                       volume.shape)


def _resample(data: np.ndarray, matrix: np.ndarray, shape, order: int) -> np.ndarray:
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest, masks) or 1 (linear, images), got {order}")
    return ndimage.affine_transform(np.asarray(data, dtype=np.float32), matrix[:3, :3], offset=matrix[:3, 3],
                                    output_shape=tuple(shape), order=order, mode="constant", cval=0.0,
                                    prefilter=False).astype(np.float32, copy=False)


def to_working(volume: Volume, mapping: GridMapping, order: int) -> np.ndarray:
    """Resample ``volume`` onto the working grid (one resampling of the original data).

    Args:
        volume: on ``mapping``'s original grid.
        order: 1 (trilinear) for images, 0 (nearest) for masks.

    Returns:
        float32 array of ``mapping.working_shape``; 0 outside the scan. Nearest keeps mask values.

    Raises:
        SpirsInputError: ``volume`` is not on the mapping's original grid.
    """
    if volume.shape != tuple(mapping.original_shape) or not np.allclose(
            volume.affine, mapping.original_affine, atol=1e-3, rtol=0):
        raise SpirsInputError("not on the grid this working-grid mapping was made for", volume.path)
    return _resample(volume.data, mapping.working_to_original(), mapping.working_shape, order)


def from_working(array: np.ndarray, mapping: GridMapping, order: int) -> np.ndarray:
    """Put a working-grid array back on the original scan's grid.

    Args:
        array: ``mapping.working_shape`` (a trailing channel of size 1 is dropped).
        order: 1 (trilinear) for images and probabilities, 0 (nearest) for masks/labels.

    Returns:
        float32 array of ``mapping.original_shape``; 0 where the original grid lies outside the
        working cube.

    Raises:
        ValueError: ``array`` does not have the working shape.
    """
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.shape != tuple(mapping.working_shape):
        raise ValueError(
            f"expected an array of the working shape {tuple(mapping.working_shape)}, got {array.shape}")
    return _resample(array, mapping.original_to_working(), mapping.original_shape, order)


def normalize_intensity(array: np.ndarray, clip_sigma: float = 5.0) -> np.ndarray:
    """Clip at mean ± ``clip_sigma``·σ of the non-zero voxels, rescale to [0, 1], background 0.

    With ``v`` the non-zero voxels, ``lo, hi = mean(v) ∓ k·std(v)``, ``c = clip(v, lo, hi)``,
    ``m = min(0, min c)``, ``M = max c``::

        out = max((c − m) / (M − m), BRAIN_FLOOR)   on non-zero voxels,   0 elsewhere.

    For non-negative inputs ``m = 0``: a min–max of the whole volume with the zero background as
    minimum. The maximum is 1 (all brain voxels are 1 when they are constant).

    Args:
        array: any shape; float.
        clip_sigma: k; ``None`` or ``<= 0`` disables clipping.

    Returns:
        float32 array of the same shape; an all-zero input gives all zeros.

    Raises:
        ValueError: NaN or infinite values.
    """
    x = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("normalize_intensity: array holds NaN or infinite values")
    out = np.zeros(x.shape, dtype=np.float32)
    nz = x != 0
    if not nz.any():
        return out
    v = x[nz]
    if clip_sigma is not None and clip_sigma > 0:
        mean, std = v.mean(), v.std()
        v = np.clip(v, mean - clip_sigma * std, mean + clip_sigma * std)
    m, big = min(0.0, float(v.min())), float(v.max())
    scaled = np.ones_like(v) if big - m <= 0 else (v - m) / (big - m)
    out[nz] = np.maximum(scaled, BRAIN_FLOOR)
    return out


def preprocess_scan(image: Volume, mask: Volume | None, data_cfg, brain_mask: Volume | None = None
                    ) -> PreprocessedScan:
    """Bring one scan (and its lesion mask) onto the working grid (decision 1).

    Image: :func:`to_working` order 1, then :func:`normalize_intensity` with ``data_cfg.clip_sigma``.
    Mask: :func:`to_working` order 0 (stays {0, 1}).

    Args:
        image: the scan (skull-stripped; background 0).
        mask: its lesion mask on the same grid, or ``None``.
        data_cfg: :class:`spirs_tf.config.DataConfig` (``grid_size``, ``spacing_mm``, ``clip_sigma``).
        brain_mask: optional brain mask on the same grid, used to centre the working grid.

    Raises:
        SpirsInputError: mask or brain mask on another grid; empty image.
    """
    if mask is not None:
        check_same_grid(mask, image)
    mapping = working_grid_for(image, data_cfg.grid_size, data_cfg.spacing_mm, brain_mask)
    work_image = normalize_intensity(to_working(image, mapping, order=1), data_cfg.clip_sigma)
    work_mask = None if mask is None else to_working(mask, mapping, order=0)
    return PreprocessedScan(work_image, work_mask, mapping)
