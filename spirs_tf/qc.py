"""Quality control of one predicted case: the warnings of ``report.json`` and the QC figure.

**Warnings** (:func:`intensity_problems` on the inputs, :func:`registration_warnings` on the
result; each also printed as ``spirs: warning: <case>: …``): input intensities whose dynamic range
collapsed (a huge stored ``scl_inter``; an effectively constant image is refused), LNCC after
registration below LNCC before, folding above :data:`FOLDING_WARN_PERCENT` %, an affine whose
principal scales leave :data:`SCALE_RANGE` or whose rotation exceeds :data:`MAX_ROTATION_DEG`
(polar decomposition, :func:`affine_scales_rotation`).

**Figure** (matplotlib, Agg backend, no display needed).

``qc.png``: up to three rows, one per axial slice through the largest P2 lesions and the largest
carried prior lesions (the brain's middle slice when there are none). Columns:

1. the new scan;
2. the warped prior, with the outline of the warped prior mask (yellow);
3. the new scan with the outlines of P1 (cyan, new scan alone) and P2 (magenta, with the prior).

"Axial" is the array axis of the new scan closest to the world superior–inferior axis. Slices are
shown as stored (rotated by 90°, no reorientation, pixel aspect from the voxel spacing), so an
oblique acquisition looks oblique.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from spirs_tf.atomic import atomic_path
from spirs_tf.errors import SpirsInputError
from spirs_tf.io import Volume

P1_COLOUR = "cyan"
P2_COLOUR = "magenta"
PRIOR_COLOUR = "yellow"

#: Registration QC thresholds.
FOLDING_WARN_PERCENT = 0.5
SCALE_RANGE = (0.7, 1.4)
MAX_ROTATION_DEG = 45.0
#: Registration QC: the LNCC may fall by this much before "lowered the similarity" is said (a pair
#: registered to itself loses ~0.004 of its unmasked working-grid LNCC to interpolation)
LNCC_DROP_TOLERANCE = 0.005
#: Intensity QC: a relative range (max − min) / max |value| below this is a collapsed dynamic range.
MIN_RELATIVE_RANGE = 1e-3
#: Intensity QC: fewer distinct voxel values than this cannot carry anatomy.
MIN_DISTINCT = 16


# ------------------------------------------------------------------------------------------ warnings
def _stored_scaling(path: str | None) -> str:
    """``" (stored scl_slope S, scl_inter I)"`` for a NIfTI file with intensity scaling, else ``""``."""
    if not path or not str(path).endswith((".nii", ".nii.gz")):
        return ""
    try:
        import nibabel as nib

        proxy = nib.load(path).dataobj  # nibabel moves the stored scaling from the header to the proxy
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    except Exception:  # the file was read before; a header problem here only loses the detail
        return ""
    if slope == 1.0 and inter == 0.0:
        return ""
    return f" (stored scl_slope {slope:g}, scl_inter {inter:g})"


def intensity_problems(volume: Volume) -> list[str]:
    """Warnings about an image whose intensities cannot carry anatomy; refuse a constant one.

    With ``lo, hi`` the extreme voxel values, the *relative range* is ``(hi − lo) / max(|lo|, |hi|)``
    (1 for any scan with a zero background). Below :data:`MIN_RELATIVE_RANGE` the values sit on a
    huge offset — typically a stored intensity scaling such as ``scl_inter = 1e7`` on float32 data,
    which leaves only the float32 steps of the offset — and the scan is registered and segmented as
    noise. Fewer than :data:`MIN_DISTINCT` distinct values on a collapsed range is *effectively
    constant* and refused; on a full range (a mask or a label image given as a scan) it is warned.

    Returns:
        warning texts (empty for a normal scan).

    Raises:
        SpirsInputError: every voxel has the same value, or the range collapsed and holds fewer
            than :data:`MIN_DISTINCT` distinct values (effectively constant).
    """
    data = np.asarray(volume.data)
    where = volume.path or "<image>"
    lo, hi = float(data.min()), float(data.max())
    scaling = _stored_scaling(volume.path)
    if lo == hi:
        raise SpirsInputError(f"image is constant (every voxel is {lo:g}){scaling}", where)
    relative = (hi - lo) / max(abs(lo), abs(hi))
    sample = data.ravel()[:: max(1, data.size // 200_000)]
    distinct = np.unique(sample).size
    if distinct < MIN_DISTINCT:
        distinct = np.unique(data).size
    if relative < MIN_RELATIVE_RANGE and distinct < MIN_DISTINCT:
        raise SpirsInputError(
            f"image is effectively constant: {distinct} distinct values from {lo:.10g} to {hi:.10g}{scaling}; "
            "its stored intensity scaling has wrecked the dynamic range", where)
    problems = []
    if relative < MIN_RELATIVE_RANGE:
        problems.append(f"{where}: intensities span only {relative:.1e} of their magnitude ({lo:.10g} to {hi:.10g})"
                        f"{scaling}: the stored intensity scaling has wrecked the dynamic range; "
                        "registration and segmentation of this scan are meaningless")
    elif distinct < MIN_DISTINCT:
        problems.append(f"{where}: only {distinct} distinct intensity values; is this a mask or label image "
                        "rather than a scan?")
    return problems


def polar_decomposition(linear: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Polar decomposition of a 3×3 linear map ``L = R·S`` in float64 (SVD ``L = UΣVᵀ``, ``R = UVᵀ``,
    ``S = VΣVᵀ``) → ``(R, Σ, U, Vᵀ)`` (``Σ`` as the SVD orders it; ``det R = −1`` for a reflection)."""
    u, sigma, vt = np.linalg.svd(np.asarray(linear, np.float64))
    return u @ vt, sigma, u, vt


def affine_scales_rotation(linear: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`polar_decomposition` of a 3×3 linear map: the principal scales ``Σ`` (ascending) and the
    rotation angle of ``R`` in degrees, ``arccos((tr R − 1)/2)``. A reflection (``det L < 0``) gives
    angle 180."""
    r, sigma, _, _ = polar_decomposition(linear)
    if np.linalg.det(r) < 0:
        return np.sort(sigma), 180.0
    angle = math.degrees(math.acos(float(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))
    return np.sort(sigma), angle


def registration_warnings(registration: dict, world_affine: np.ndarray) -> list[str]:
    """Warnings for a suspect registration (thresholds :data:`LNCC_DROP_TOLERANCE`,
    :data:`FOLDING_WARN_PERCENT`, :data:`SCALE_RANGE`, :data:`MAX_ROTATION_DEG`); ``registration`` is
    the report's block. The LNCC compared is the brain-masked one when the block has it before and
    after (``lncc_identity_masked``, ``lncc_masked``), else the unmasked one."""
    out = []
    # brain-masked LNCC when the report has both (the unmasked one is mostly background windows)
    masked = registration.get("lncc_identity_masked") is not None and registration.get("lncc_masked") is not None
    before, after = ((registration["lncc_identity_masked"], registration["lncc_masked"]) if masked else
                     (registration.get("lncc_identity"), registration.get("lncc")))
    if before is not None and after is not None and math.isfinite(before) and math.isfinite(after) \
            and after < before - LNCC_DROP_TOLERANCE:
        kind = "masked LNCC" if masked else "LNCC"
        out.append(f"registration lowered the similarity to the new scan ({kind} {after:.3f} after, "
                   f"{before:.3f} before)")
    folding = registration.get("folding_percent")
    if folding is not None and folding > FOLDING_WARN_PERCENT:
        out.append(f"the deformation folds {folding:.2f} % of the voxels (> {FOLDING_WARN_PERCENT} %)")
    scales, angle = affine_scales_rotation(np.asarray(world_affine, float)[:3, :3])
    if scales[0] < SCALE_RANGE[0] or scales[-1] > SCALE_RANGE[1]:
        out.append(f"the affine scales by {scales[0]:.2f}..{scales[-1]:.2f} (outside "
                   f"{SCALE_RANGE[0]}..{SCALE_RANGE[1]}): not a plausible change of the same head")
    if angle > MAX_ROTATION_DEG:
        out.append(f"the affine rotates by {angle:.0f}° (> {MAX_ROTATION_DEG:.0f}°)")
    return out



# ------------------------------------------------------------------------------------------- figure


def axial_axis(affine: np.ndarray) -> int:
    """Array axis whose direction is closest to world z (superior)."""
    a = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(a[2]) / np.linalg.norm(a, axis=0)))


def pick_slices(axis: int, masks: list[np.ndarray], image: np.ndarray, n: int = 3) -> list[int]:
    """Slice indices along ``axis`` through the centroids of the largest components of ``masks``
    (in order of size, distinct slices), up to ``n``; the centre of the image's non-zero region if none."""
    candidates = []
    for m in masks:
        binary = np.asarray(m) > 0
        hit = np.flatnonzero(np.any(binary, axis=tuple(a for a in range(binary.ndim) if a != axis)))
        if not hit.size:
            continue
        # label inside the slab of slices that hold the mask (same components, fewer voxels)
        binary = np.take(binary, np.arange(hit[0], hit[-1] + 1), axis=axis)
        labels, count = ndimage.label(binary, structure=np.ones((3, 3, 3)))
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            idx = np.nonzero(labels)
            com_axis = np.bincount(labels[idx], weights=idx[axis], minlength=count + 1)[1:] / sizes
            candidates += [(int(sizes[i]), int(round(com_axis[i] + hit[0]))) for i in range(count)]
    slices = []
    for _, s in sorted(candidates, key=lambda c: -c[0]):
        if s not in slices:
            slices.append(s)
        if len(slices) == n:
            break
    if not slices:
        nz = np.nonzero(image)[axis]
        slices = [int((nz.min() + nz.max()) // 2) if nz.size else image.shape[axis] // 2]
    return slices


def _slice(x: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.rot90(np.take(np.asarray(x), index, axis=axis))


def _outline(ax, mask2d: np.ndarray, colour: str) -> None:
    if np.any(mask2d) and not np.all(mask2d):
        ax.contour(mask2d.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)


def write_qc_png(path: str, case_id: str, new_image: np.ndarray, prior_warped: np.ndarray,
                 prior_mask_warped: np.ndarray, p1_mask: np.ndarray, p2_mask: np.ndarray,
                 affine: np.ndarray) -> list[int]:
    """Write the QC figure atomically; return the slice indices shown.

    All arrays are on the new scan's original grid ``(X, Y, Z)``; ``affine`` is its voxel → RAS matrix.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    axis = axial_axis(affine)
    spacing = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    cols, rows_ax = [a for a in range(3) if a != axis]  # after rot90: rows ← second axis, columns ← first
    aspect = float(spacing[rows_ax] / spacing[cols])
    slices = pick_slices(axis, [p2_mask, prior_mask_warped], new_image)
    vmax = float(np.percentile(new_image[new_image > 0], 99.5)) if np.any(new_image > 0) else 1.0
    pmax = float(np.percentile(prior_warped[prior_warped > 0], 99.5)) if np.any(prior_warped > 0) else 1.0
    fig = Figure(figsize=(9, 3.1 * len(slices)), dpi=100)
    axes = fig.subplots(len(slices), 3, squeeze=False)
    for row, s in enumerate(slices):
        new2d = _slice(new_image, axis, s)
        panels = [("new scan", new2d, vmax, []),
                  ("warped prior + prior mask", _slice(prior_warped, axis, s), pmax,
                   [(prior_mask_warped, PRIOR_COLOUR)]),
                  ("P1 (cyan) vs P2 (magenta)", new2d, vmax, [(p1_mask, P1_COLOUR), (p2_mask, P2_COLOUR)])]
        for col, (title, img, top, outlines) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=top, interpolation="nearest", aspect=aspect)
            for mask, colour in outlines:
                _outline(ax, _slice(mask, axis, s) > 0, colour)
            ax.set_title(f"{title}\nslice {s} (axis {axis})", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{case_id} — SPIRS QC (not for clinical use)", fontsize=10)
    # fixed margins instead of tight_layout(), which draws the figure several times (~0.5 s)
    top = 1.0 - 0.75 / (3.1 * len(slices))  # room for the title and two-line panel titles
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.03, hspace=0.25)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return slices
