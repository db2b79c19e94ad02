"""Quality-control figure of one predicted case (matplotlib, Agg backend, no display needed).

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

import numpy as np
from scipy import ndimage

from spirs_tf.atomic import atomic_path

P1_COLOUR = "cyan"
P2_COLOUR = "magenta"
PRIOR_COLOUR = "yellow"


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return slices
