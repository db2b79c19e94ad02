"""Learning curves of a training stage (``RUN/stageN/curves.png``), drawn from its history rows."""
from __future__ import annotations

import numpy as np

from spirs_tf.atomic import atomic_path

#: (title, history keys) of the learning-curve panels
CURVE_PANELS = (
    ("losses", ("registration", "segmentation_p1", "segmentation_p2", "val_registration")),
    ("validation LNCC (finest level)", ("val_lncc_identity", "val_lncc_affine", "val_lncc_deformable")),
    ("validation Dice", ("val_dice_identity", "val_dice_affine", "val_dice_deformable", "val_dice_p1",
                         "val_dice_p2")),
)


def plot_curves(history: list[dict], path: str, title: str = "") -> None:
    """Learning curves: training losses and validation metrics per epoch (PNG, written atomically).

    Args:
        history: one dict per epoch with an ``epoch`` key and the logged values (:data:`CURVE_PANELS`
            names those drawn; missing keys are skipped). Nothing is written for an empty history.
        path: the PNG to write.
        title: the figure's title.
    """
    if not history:
        return
    import matplotlib  # only here: matplotlib is slow to import and only the end of fit() draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(15, 4))
    for ax, (panel_title, keys) in zip(axes, CURVE_PANELS):
        for key in keys:
            if key in history[0]:
                ax.plot(epochs, [r.get(key, np.nan) for r in history], label=key)
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        if ax.get_lines():
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
