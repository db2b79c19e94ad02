"""From the network's working-grid transform to the new scan's original grid, and to ITK/ANTs files.

Geometry of one case (all 4×4 matrices map voxel indices to **RAS+** world mm, nibabel's convention):

* ``A_n``, ``A_p`` — original new / prior scan (``Volume.affine``);
* ``W_n``, ``W_p`` — the model's working grids of the new and the prior scan (each centred on its own
  brain, so the difference of the two brain centres is a free initial alignment);
* ``T = [M | t]`` (3×4) and ``u`` (S, S, S, 3) — the network's affine and displacement field in
  working voxels, ``c = S/2``: a new working voxel ``y`` maps to the prior working location
  ``p(y) = M(y − c) + t + c + u(y)``.

**One resampling from the original data.** For a voxel ``x`` of the new scan's original grid::

    w = A_n x  →  y = W_n⁻¹ w  →  p(y) = M(y − c) + t + c + u(y)  →  q = W_p p  →  x_p = A_p⁻¹ q

and the ORIGINAL prior image (trilinear) and mask (trilinear, then ≥ 0.5) are sampled at ``x_p``,
with zeros outside the prior scan (the same zero padding as the network's spatial transformer).
``u(y)`` is interpolated trilinearly; outside the working cube it takes the value of the nearest
cube voxel (edge extension), so the mapping stays continuous there.

**World-space transforms.** The affine part in world mm is
``Aw = W_p · [[M, t + c − Mc], [0, 1]] · W_n⁻¹`` and the full map is
``q(w) = Aw(w) + L_p u(y)`` with ``L_p`` the linear part of ``W_p``. Because the network adds
``u`` *after* the affine, in prior (moving) space, ``p = A(y) + u(y) = A(y + M⁻¹u(y))``, so in
world mm ``q(w) = Aw(w + d(w))`` with ``d = L_n M⁻¹ u(y(w))``. These are written for ITK/ANTs:

* ``affine.tfm`` — ``AffineTransform_double_3_3`` mapping NEW physical points to PRIOR physical
  points, in ITK's **LPS** mm (``F·Aw·F`` with ``F = diag(−1, −1, 1)``), centre (0, 0, 0);
* ``deformation.nii.gz`` — the displacement ``F·d``: by default on the compact *field grid*
  (:func:`compact_deformation`: ``W_n`` extended by whole voxels to cover the new scan). ``d`` is a
  fixed linear map of the trilinearly interpolated ``u``, so ITK's linear interpolation of the field
  on that grid reproduces it exactly (a few MB instead of ~70 MB for a 6-megavoxel scan);
  with ``transforms="all"`` on the new scan's grid;
* ``transform_total.nii.gz`` (``transforms="all"`` only) — everything in one displacement field on
  the new scan's grid: ``F·(q(w) − w)``.

Displacement fields are NIfTI ``(X, Y, Z, 1, 3)`` float32 with intent code 1007 (*vector*) and the
vectors' components in **LPS** mm — the ANTs convention. ITK (≥ 5.3, InsightSoftwareConsortium/ITK
PR #3884) converts components from RAS only for intent 1006 (*displacement vector*); for intent
1007 it reads them as stored, i.e. as LPS. ``tests/test_inference.py`` proves the convention with
SimpleITK on oblique, anisotropic, non-RAS-stored grids.

Applying them (both verified against ``prior_warped.nii.gz``: SimpleITK in
``tests/test_inference.py``, ANTs through antspyx 0.6.3 in the optional ANTs test there)::

    antsApplyTransforms -d 3 -i prior.nii.gz -r new.nii.gz -o prior_in_new.nii.gz \\
        -t deformation.nii.gz -t affine.tfm
    antsApplyTransforms -d 3 -i prior.nii.gz -r new.nii.gz -o prior_in_new.nii.gz \\
        -t transform_total.nii.gz                     # the same, one field

The order is that of ANTs' own registration output (``-t 1Warp.nii.gz -t 0GenericAffine.mat``):
the displacement lives on the new (fixed) grid and moves a new-scan point first, then the affine
takes it to the prior. The other order, ``-t affine.tfm -t deformation.nii.gz``, computes
``A(x) + d(A(x))`` instead (measured: 0.36 max difference on intensities up to 1.7 in the test
case). In ANTsPy: ``ants.apply_transforms(..., transformlist=[deformation, affine])``.
In SimpleITK the list runs the other way: ``CompositeTransform`` with ``AddTransform(affine)`` then
``AddTransform(deformation)`` (the transform added last is applied to the point first), or
``DisplacementFieldTransform(transform_total)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from spirs_tf.atomic import atomic_write_text
from spirs_tf.io import Volume, write_volume

#: RAS ↔ LPS (its own inverse).
LPS_RAS = np.diag([-1.0, -1.0, 1.0])
#: Slices of the original grid processed at once (bounds the memory of the coordinate arrays).
CHUNK_SLICES = 16


def voxel_affine(matrix: np.ndarray, size: int) -> np.ndarray:
    """``[M | t]`` with centre ``c = size/2`` → 4×4 ``y ↦ M(y − c) + t + c``."""
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 4)
    c = np.full(3, size / 2.0)
    out = np.eye(4)
    out[:3, :3] = m[:, :3]
    out[:3, 3] = m[:, 3] + c - m[:, :3] @ c
    return out


@dataclass(frozen=True, eq=False)
class CaseTransform:
    """The registration of one case: working grids, the network's ``[M | t]`` and ``u``.

    Attributes:
        new_working_affine: ``W_n`` (4×4, working voxel → RAS mm) of the model's grid.
        prior_working_affine: ``W_p``.
        matrix: ``[M | t]`` (3×4), working voxels, ``c = S/2``.
        dvf: ``u`` ``(S, S, S, 3)`` working voxels, channels in array-axis order; or, with
            ``dvf_factor = k > 1``, ``u_k`` on the k-times finer grid ``(kS, kS, kS, 3)`` in ITS voxels
            (fine voxel ``k·i`` = working voxel ``i``, the pyramid's convention), i.e.
            ``u(y) = u_k(k·y) / k`` — e.g. a test-time refinement at a finer resolution.
        dvf_factor: k (default 1).
    """

    new_working_affine: np.ndarray
    prior_working_affine: np.ndarray
    matrix: np.ndarray
    dvf: np.ndarray
    dvf_factor: int = 1

    @property
    def size(self) -> int:
        """``S``: the working grid (the affine's centre is ``S/2``)."""
        return int(np.asarray(self.dvf).shape[0]) // self.dvf_factor

    def dvf_on_working_grid(self) -> np.ndarray:
        """``u`` at the working grid's voxels ``(S, S, S, 3)`` in working voxels (exact: every k-th
        fine voxel)."""
        k = self.dvf_factor
        return np.asarray(self.dvf)[::k, ::k, ::k] / k if k > 1 else np.asarray(self.dvf)

    def world_affine(self) -> np.ndarray:
        """``Aw`` (4×4): new RAS mm → prior RAS mm, the affine part alone."""
        return (np.asarray(self.prior_working_affine, float) @ voxel_affine(self.matrix, self.size)
                @ np.linalg.inv(np.asarray(self.new_working_affine, float)))

    def world_affine_lps(self) -> np.ndarray:
        """``F · Aw · F``: the same map in ITK's LPS mm."""
        f = np.eye(4)
        f[:3, :3] = LPS_RAS
        return f @ self.world_affine() @ f

    def _dvf_at(self, y: np.ndarray) -> np.ndarray:
        """``u`` at working coordinates ``y`` (3, n): trilinear, nearest-edge extension → (3, n)."""
        u = np.asarray(self.dvf, dtype=np.float64)
        k = self.dvf_factor
        yk = y * k if k > 1 else y
        out = np.stack([ndimage.map_coordinates(u[..., a], yk, order=1, mode="nearest", prefilter=False)
                        for a in range(3)])
        return out / k if k > 1 else out

    def map_points(self, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New-scan RAS points ``w`` (3, n) → (prior RAS points ``q`` (3, n), world ``d`` (3, n))."""
        wn = np.asarray(self.new_working_affine, float)
        wp = np.asarray(self.prior_working_affine, float)
        wn_inv = np.linalg.inv(wn)
        y = wn_inv[:3, :3] @ world + wn_inv[:3, 3:4]
        a = voxel_affine(self.matrix, self.size)
        u = self._dvf_at(y)
        p = a[:3, :3] @ y + a[:3, 3:4] + u
        q = wp[:3, :3] @ p + wp[:3, 3:4]
        d = (wn[:3, :3] @ np.linalg.inv(a[:3, :3])) @ u
        return q, d


def case_transform(case, outputs: dict) -> CaseTransform:
    """The registration of a prepared case (:class:`spirs_tf.case_inputs.PreparedCase`: its working
    grids and model-grid shape) from its outputs: ``affine`` and ``dvf``, the latter on a
    ``dvf_factor``-times finer grid after a refinement."""
    factor = int(outputs.get("dvf_factor", 1))  # > 1: a refined field on a k-times finer grid
    dvf_shape = tuple(factor * n for n in case.new_image.shape) + (3,)
    return CaseTransform(case.new_mapping.working_affine, case.prior_mapping.working_affine,
                         np.asarray(outputs["affine"], np.float64).reshape(3, 4),
                         np.asarray(outputs["dvf"], np.float32).reshape(dvf_shape), factor)


@dataclass(frozen=True, eq=False)
class Resampled:
    """Everything on the new scan's original grid ``(X, Y, Z)``.

    ``prior_warped`` float32, ``prior_mask_warped`` uint8 (trilinear ≥ 0.5; with ``soft_mask`` the
    trilinear value, float32), ``prior_labels_warped`` int32 (nearest), ``deformation`` and ``total``
    ``(X, Y, Z, 3)`` float64 RAS mm (``d`` and ``q − w``; ``None`` unless asked for with
    ``native_fields=True``).
    """

    prior_warped: np.ndarray
    prior_mask_warped: np.ndarray
    prior_labels_warped: np.ndarray
    deformation: np.ndarray | None
    total: np.ndarray | None


def _nonzero_box(array: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(lo, hi) voxel indices of the non-zero voxels of ``array`` (inclusive), ``None`` if all zero."""
    lo, hi = [], []
    for axis in range(array.ndim):
        other = tuple(a for a in range(array.ndim) if a != axis)
        hit = np.flatnonzero(np.any(array, axis=other))
        if hit.size == 0:
            return None
        lo.append(hit[0])
        hi.append(hit[-1])
    return np.array(lo, float), np.array(hi, float)


def _zero_ring(array: np.ndarray, box="all") -> tuple[np.ndarray | None, np.ndarray]:
    """``array`` (whole, or its part inside ``box`` = (lo, hi) inclusive) with one ring of zeros
    around it, and the original index of the result's voxel 0 as a (3, 1) column: sample the result
    at ``x − origin``. ``box`` ``None`` (an all-zero array, see :func:`_nonzero_box`) → ``None``."""
    if box is None:
        return None, np.zeros((3, 1))
    if isinstance(box, str):
        lo, hi = np.zeros(3, int), np.array(array.shape) - 1
    else:
        lo, hi = (np.asarray(v, int) for v in box)
    out = np.zeros(tuple(hi - lo + 3), array.dtype)
    out[1:-1, 1:-1, 1:-1] = array[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    return out, (lo - 1).astype(float)[:, None]


def _inside(points: np.ndarray, box, margin: float) -> np.ndarray:
    """Boolean (n,): points (3, n) within ``box`` widened by ``margin`` voxels (strictly)."""
    if box is None:
        return np.zeros(points.shape[1], bool)
    lo, hi = box
    return np.all((points > (lo - margin)[:, None]) & (points < (hi + margin)[:, None]), axis=0)


def _chunk_points(matrix: np.ndarray, shape, i0: int, i1: int) -> np.ndarray:
    """``matrix`` (4×4 or 3×4) applied to the voxel indices of slices ``i0:i1`` of ``shape`` → (3, n)
    float64, by broadcasting (no index arrays)."""
    i = np.arange(i0, i1, dtype=np.float64)[:, None, None]
    j = np.arange(shape[1], dtype=np.float64)[None, :, None]
    k = np.arange(shape[2], dtype=np.float64)[None, None, :]
    m = np.asarray(matrix, float)
    return np.stack([(m[a, 0] * i + m[a, 1] * j + m[a, 2] * k + m[a, 3]).ravel() for a in range(3)])


def resample_to_new(transform: CaseTransform, new: Volume, prior: Volume, prior_mask: Volume,
                    prior_labels: np.ndarray | None = None, *, native_fields: bool = True,
                    soft_mask: bool = False) -> Resampled:
    """Carry the prior image, mask and lesion labels onto ``new``'s grid with one resampling each.

    The composed map from a new-grid voxel ``x`` to a prior voxel is
    ``x_p = G·x + H·u(B·x)`` with ``B = W_n⁻¹A_n`` (new voxel → new working voxel),
    ``G = A_p⁻¹W_p·T·B`` (the affine part) and ``H`` the linear part of ``A_p⁻¹W_p``; it is built
    once. The mask and the labels are sampled only where ``x_p`` lies within one voxel of their
    non-zero box (trilinear and nearest interpolation of zero data are zero elsewhere).

    Args:
        transform: the case's :class:`CaseTransform`.
        new: the new scan (only its grid is used).
        prior, prior_mask: the original prior image and its binary mask (same grid).
        prior_labels: integer labels on the prior grid (e.g. its 26-connected lesions), sampled with
            nearest neighbour; ``None`` → the mask itself.
        native_fields: also return ``deformation`` and ``total`` on the new grid (``(X, Y, Z, 3)``
            float64, ~150 MB each for a 6-megavoxel scan); ``False`` leaves them ``None``.
        soft_mask: ``prior_mask_warped`` is the trilinear value (float32, in [0, 1]) instead of ``>= 0.5``.

    Returns:
        :class:`Resampled`.
    """
    shape = new.shape
    a_n = np.asarray(new.affine, float)
    wn = np.asarray(transform.new_working_affine, float)
    wp = np.asarray(transform.prior_working_affine, float)
    a = voxel_affine(transform.matrix, transform.size)
    b = np.linalg.inv(wn) @ a_n
    pw = np.linalg.inv(np.asarray(prior.affine, float)) @ wp
    g = pw @ a @ b
    h = pw[:3, :3]
    # zero padding + mode "constant" is exactly SciPy's "grid-constant" (zeros outside, interpolated
    # across the border) and 3.5x faster (measured: 0.39 s against 1.39 s, 6 megavoxels); the mask
    # and the labels are cut to their non-zero box (+ a zero ring) first
    image, image_origin = _zero_ring(np.asarray(prior.data, dtype=np.float32))
    mask, mask_origin = _zero_ring(np.asarray(prior_mask.data, dtype=np.float32), _nonzero_box(prior_mask.data))
    labels = np.asarray(prior_mask.data if prior_labels is None else prior_labels)
    labels, label_origin = _zero_ring(labels.astype(np.int32, copy=False), _nonzero_box(labels))
    out_img = np.zeros(shape, np.float32)
    out_mask = np.zeros(shape, np.float32 if soft_mask else np.uint8)
    out_lab = np.zeros(shape, np.int32)
    deformation = np.zeros(shape + (3,), np.float64) if native_fields else None
    total = np.zeros(shape + (3,), np.float64) if native_fields else None
    d_matrix = wn[:3, :3] @ np.linalg.inv(a[:3, :3])
    sample = dict(order=1, mode="constant", cval=0.0, prefilter=False)
    for i0 in range(0, shape[0], CHUNK_SLICES):
        i1 = min(shape[0], i0 + CHUNK_SLICES)
        slab = (i1 - i0,) + shape[1:]
        u = transform._dvf_at(_chunk_points(b, shape, i0, i1))
        xp = _chunk_points(g, shape, i0, i1) + h @ u
        out_img[i0:i1] = ndimage.map_coordinates(image, xp - image_origin, **sample).reshape(slab)
        for target, data, origin, margin, kw in (
                (out_mask, mask, mask_origin, 1.0, sample),
                (out_lab, labels, label_origin, 0.51, dict(order=0, mode="constant", cval=0, prefilter=False))):
            if data is None:
                continue
            local = xp - origin
            sel = _inside(local, (np.ones(3), np.array(data.shape, float) - 2), margin)
            if not sel.any():
                continue
            values = ndimage.map_coordinates(data, local[:, sel], **kw)
            flat = target[i0:i1].reshape(-1)
            flat[sel] = (values >= 0.5) if target is out_mask and not soft_mask else values
        if native_fields:
            world = _chunk_points(a_n, shape, i0, i1)
            q = wp[:3, :3] @ (_chunk_points(a @ b, shape, i0, i1) + u) + wp[:3, 3:4]
            deformation[i0:i1] = (d_matrix @ u).T.reshape(slab + (3,))
            total[i0:i1] = (q - world).T.reshape(slab + (3,))
    return Resampled(out_img, out_mask, out_lab, deformation, total)


def compact_deformation(transform: CaseTransform, new: Volume, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``d`` (RAS mm) on the *field grid*: the new scan's model working grid ``W_n`` (or the grid of
    ``dvf``, k times finer, when ``dvf_factor = k``), extended by whole voxels (values of the nearest
    cube voxel, as :meth:`CaseTransform._dvf_at` extends ``u``) until it covers every voxel of
    ``new`` with ``margin`` voxels to spare.

    ``d(w) = L_n M⁻¹ u(y(w))`` is a fixed linear map of the trilinearly interpolated ``u``, so ITK's
    linear interpolation of this field at any new-scan point gives exactly the ``d`` that
    :func:`resample_to_new` used: a few megabytes instead of a field on the new scan's own grid.

    Returns:
        ``(field (X', Y', Z', 3) float64 RAS mm, its 4×4 voxel → RAS affine)``.
    """
    k = transform.dvf_factor
    wn = np.asarray(transform.new_working_affine, float)
    fine = wn @ np.diag([1.0 / k, 1.0 / k, 1.0 / k, 1.0])  # the grid of ``dvf`` (= wn for k = 1)
    b = np.linalg.inv(fine) @ np.asarray(new.affine, float)
    corners = np.array([[(n - 1) * bit for n, bit in zip(new.shape, bits)] + [1.0]
                        for bits in np.ndindex(2, 2, 2)]).T
    y = (b @ corners)[:3]
    lo = np.floor(y.min(axis=1)).astype(int) - margin
    hi = np.ceil(y.max(axis=1)).astype(int) + margin
    s = transform.size
    u = np.asarray(transform.dvf, dtype=np.float64) / k  # working voxels
    idx = [np.clip(np.arange(lo[a], hi[a] + 1), 0, u.shape[a] - 1) for a in range(3)]
    u_ext = u[np.ix_(idx[0], idx[1], idx[2])]
    d = u_ext @ (wn[:3, :3] @ np.linalg.inv(voxel_affine(transform.matrix, s)[:3, :3])).T
    affine = fine.copy()
    affine[:3, 3] = fine[:3, :3] @ lo + fine[:3, 3]
    return d, affine


def write_itk_affine(path: str, affine_lps: np.ndarray) -> None:
    """Write a 4×4 LPS affine as an ITK ``AffineTransform_double_3_3`` text file (atomic).

    ITK's affine maps ``x ↦ A(x − C) + T + C``; we write centre ``C = 0`` and ``T`` = the offset. The
    text is ITK's own transform-file format (``#Insight Transform File V1.0``; 12 parameters: the
    matrix row by row, then the translation; fixed parameters = the centre), written with 17
    significant digits (``repr``), as SimpleITK writes it — without importing SimpleITK.
    """
    a = np.asarray(affine_lps, dtype=np.float64)
    params = [float(v) for v in a[:3, :3].ravel()] + [float(v) for v in a[:3, 3]]
    text = ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {' '.join(repr(v) for v in params)}\nFixedParameters: 0 0 0\n")
    atomic_write_text(path, text)


def write_displacement(path: str, displacement_ras: np.ndarray, affine: np.ndarray) -> None:
    """Write a RAS-mm displacement field ``(X, Y, Z, 3)`` as an ITK/ANTs field: LPS components,
    NIfTI ``(X, Y, Z, 1, 3)`` float32, intent *vector* (1007), on the grid of ``affine``."""
    lps = np.asarray(displacement_ras, dtype=np.float64) @ LPS_RAS.T
    write_volume(path, lps.astype(np.float32)[:, :, :, None, :], affine, intent="vector")
