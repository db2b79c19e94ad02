"""Quality-control picture of a synthetic patient (matplotlib, Agg backend, PNG).

Rows are time points, columns up to four lesions (the largest, the smallest and two in between). Each
panel is the axial slice (array axis 2, superior up the stack) through that lesion's position in that
scan, displayed in radiological-free "RAS as stored" orientation (i to the right, j upwards), with
every lesion outline in the slice drawn in red and the column's lesion boxed in yellow; an inset in the
corner away from the lesion repeats the boxed region, enlarged and without outlines, to judge the lesion's look.
"""
from __future__ import annotations

import numpy as np


def _lesion_columns(patient, n: int = 4) -> list:
    ordered = sorted(patient.lesions, key=lambda les: -float(np.max(les.volumes)))
    if len(ordered) <= n:
        return ordered
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, n)).astype(int))
    return [ordered[i] for i in picks]


def qc_figure(patient, path: str) -> None:
    """Write the QC PNG of ``patient`` (a :class:`~spirs_tf.synthetic.cohort.SynthPatient`) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from spirs_tf.atomic import atomic_path

    columns = _lesion_columns(patient) or [None]
    rows = len(patient.scans)
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.7 * len(columns), 2.8 * rows), squeeze=False,
                             facecolor="black")
    for t, scan in enumerate(patient.scans):
        brain_values = scan.image[scan.brain & (scan.lesions == 0)]
        vmin, vmax = (np.percentile(brain_values, [0.5, 99.5]) * [1.0, 1.3] if brain_values.size else (0.0, 1.0))
        g_inv = np.linalg.inv(scan.affine)
        p_inv = np.linalg.inv(patient.poses[t])
        for col, les in enumerate(columns):
            ax = axes[t, col]
            ax.axis("off")
            if les is None:
                k = scan.image.shape[2] // 2
                centre = None
            else:
                centre = (g_inv @ p_inv @ np.append(les.centre, 1.0))[:3]
                k = int(np.clip(np.rint(centre[2]), 0, scan.image.shape[2] - 1))
            ax.imshow(scan.image[:, :, k].T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
            labels = scan.lesions[:, :, k].T
            if labels.any():
                ax.contour(labels > 0, levels=[0.5], colors="red", linewidths=0.7)
            title = f"tp{t} z={k}"
            if les is not None:
                half = max(4.0, 1.6 * les.extent() / float(scan.affine[0, 0]))
                ax.add_patch(Rectangle((centre[0] - half, centre[1] - half), 2 * half, 2 * half, fill=False,
                                       edgecolor="yellow", linewidth=0.6, linestyle="--"))
                nx, ny = scan.image.shape[:2]
                corner = [0.0 if centre[0] > nx / 2 else 0.68, 0.68 if centre[1] < ny / 2 else 0.0]
                inset = ax.inset_axes(corner + [0.32, 0.32])  # the boxed region without outlines, away from it
                inset.imshow(scan.image[:, :, k].T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
                             interpolation="nearest")
                inset.set_xlim(centre[0] - half, centre[0] + half)
                inset.set_ylim(centre[1] - half, centre[1] + half)
                inset.set_xticks([])
                inset.set_yticks([])
                for spine in inset.spines.values():
                    spine.set_edgecolor("yellow")
                vol = float(np.sum(scan.lesions == les.lesion_id)) * abs(np.linalg.det(scan.affine[:3, :3]))
                title += f"  L{les.lesion_id} {vol:.0f} mm³ {les.trajectory}" + (" faint" if les.faint else "")
                if les.faded(t):
                    title += f" faded ×{les.contrast_at(t):.2f}" + (" on vessel" if les.vessel is not None else "")
            ax.set_title(title, color="white", fontsize=7)
    fig.suptitle(f"{patient.patient_id}: {len(patient.lesions)} lesions", color="white", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, facecolor="black", metadata={"Software": None})
    plt.close(fig)
