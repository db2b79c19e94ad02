"""Test-time refinement in the prediction flow: ``spirs predict --refine {off,affine,full}``.

Glue between :mod:`spirs_tf.refine` (the optimisation, beyond the paper) and the refinement hook of
:mod:`spirs_tf.inference` (:data:`spirs_tf.inference.Refine`, :func:`spirs_tf.inference.apply_refinement`).

* ``off``: the paper's pure network; the case folder is exactly what the network gives.
* ``affine``: the network's affine refined (12 parameters, coarse to fine, masked LNCC), zero field.
* ``full`` (the default of ``spirs predict`` and ``spirs demo``): then a dense displacement field
  (LNCC + bending energy), from zero, after the refined affine.

The optimisation runs on the model's input grid of the new scan (64³ at 3 mm for ``cpu-small``), on
exactly the arrays the network sees: fixed = the new scan, moving = the prior, ``moving_mask`` = the
prior's lesion mask (its lesion voxels leave the LNCC, FACTS decision on the masked LNCC). No
``fixed_mask`` is passed: the new scan's lesions are what P1/P2 are about to find, and the refinement
was measured without one (``experiments/refine_eval.py``: median warped-prior-mask Dice 0.34 → 0.84
on 12 synthetic raw-pose pairs scored on the 3 mm grid; ``--demo-seeds 1-8``: the 8 demo patients
scored on their native 1.5 mm grid). The refined affine and field replace the network's; the prior is
re-warped and P2 recomputed from it (:func:`spirs_tf.inference.apply_refinement`).

**Guard.** The refinement optimises LNCC on this pair; should it end with a masked LNCC
(:func:`masked_lncc`) below the network's, e.g. on a brain only a few voxels wide on the model grid,
the network's registration is kept and ``report.json`` / the terminal say so.

A SavedModel predictor cannot recompute P2: the registration outputs (warped prior, masks, labels,
transform files, lesion matching) still use the refined registration, P2 stays the network's, and
``report.json`` / the terminal carry a warning saying so.

Cost: XLA compiles the optimisation steps once per grid shape and process (10–25 s for the
first case on a 2-core CPU, a few seconds with the on-disk cache of :mod:`spirs_tf.xla_cache`, which
the CLI enables), then about 5 s per 64³ case.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from spirs_tf import metrics
from spirs_tf.errors import SpirsInputError
from spirs_tf.geometry import warp_working

__all__ = ["REFINE_MODES", "DEFAULT_REFINE", "check_mode", "make_refine", "resolve"]

#: ``--refine`` choices.
REFINE_MODES = ("off", "affine", "full")
#: Default of ``spirs predict`` and ``spirs demo`` (the Python API's default stays ``None`` = off).
DEFAULT_REFINE = "full"
#: A refinement whose masked LNCC ends more than this below the network's is not used (warning).
REJECT_TOLERANCE = 1e-3
#: Warning (report.json + stderr) when P2 cannot follow the refined registration.
P2_FALLBACK_WARNING = ("P2 uses the network's registration: this model (a SavedModel) cannot recompute P2 "
                       "from the refined registration; the warped prior, masks and transforms are refined")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`REFINE_MODES`.

    Raises:
        SpirsInputError: another value.
    """
    if mode not in REFINE_MODES:
        raise SpirsInputError(f"--refine must be one of {', '.join(REFINE_MODES)}, got {mode!r}")
    return mode


def make_refine(mode: str, *, progress: Callable | None = None, affine_options: dict | None = None,
                deformable_options: dict | None = None) -> Callable | None:
    """A refinement for :func:`spirs_tf.inference.apply_refinement`, or None for ``"off"``.

    Args:
        mode: ``"off"``, ``"affine"`` or ``"full"`` (module docstring).
        progress: ``progress(stage, done, total, loss)`` (e.g. :func:`spirs_tf.refine.terminal_progress`).
        affine_options, deformable_options: passed to :func:`spirs_tf.refine.refine` (levels, weights...).

    Returns:
        ``fn(predictor, case, outputs) -> {"affine", "dvf", "info"[, "keep_network_p2"]}`` with the
        refined ``(3, 4)`` affine and ``(S, S, S, 3)`` field on the model grid of the new scan, and
        ``info`` = ``{"mode", "fixed_mask", "moving_mask", "deformable_start", "seconds": {"affine",
        "deformable"}, "lncc_optimised": {...}, "folding_percent"}`` for ``report.json``.

    Raises:
        SpirsInputError: an unknown mode.
    """
    check_mode(mode)
    if mode == "off":
        return None

    def run(predictor, case, outputs) -> dict:
        from spirs_tf import refine as refine_lib  # TensorFlow: imported when a refinement runs

        window = predictor.cfg.loss.lncc_window
        matrix, dvf, info = refine_lib.refine(
            case.new_image, case.prior_image, outputs["affine"], outputs["dvf"], mode=mode,
            fixed_mask=None, moving_mask=case.prior_mask, deformable_start="zero",
            affine_options=affine_options, deformable_options=deformable_options, progress=progress)
        aff, dfm = info["affine"], info["deformable"]
        block = {
            "mode": mode, "grid": list(case.new_image.shape), "fixed_mask": None,
            "moving_mask": "prior lesion mask", "deformable_start": "zero" if dfm is not None else None,
            "seconds": {"affine": aff.seconds, "deformable": dfm.seconds if dfm is not None else 0.0},
            "lncc_optimised": {  # the optimised masked LNCC on the finest optimised level
                "network_affine": aff.lncc_before, "refined_affine": aff.lncc_after,
                "refined": dfm.lncc_after if dfm is not None else aff.lncc_after},
            "folding_percent": dfm.folding_percent if dfm is not None else 0.0,
        }
        # guard: never hand back a registration the masked LNCC rates below the network's
        before = masked_lncc(case, outputs["prior_warped"][..., 0], outputs["prior_mask_warped"][..., 0], window)
        after = masked_lncc(case, *(warp_working(v, matrix, dvf) for v in (case.prior_image, case.prior_mask)),
                            window)
        block["masked_lncc"] = {"network": before, "refined": after}
        if not after >= before - REJECT_TOLERANCE:
            return {"rejected": True, "info": block,
                    "warnings": [f"the {mode} refinement lowered the masked LNCC ({before:.3f} -> {after:.3f}); "
                                 "the network's registration is kept"]}
        result = {"affine": matrix, "dvf": dvf, "info": block}
        if predictor.p2_fn is None:
            result["keep_network_p2"] = True
        return result

    run.mode = mode
    return run


def masked_lncc(case, warped, warped_mask, window: int) -> float:
    """The project's masked LNCC (:func:`spirs_tf.metrics.lncc_mask`: brain voxels outside the warped
    prior lesions) of the new scan and a warped prior, on the model grid."""
    warped = np.asarray(warped, np.float32)
    mask = metrics.lncc_mask(case.new_image, warped, None, warped_mask)  # soft mask: tumour where != 0
    return float(metrics.lncc(case.new_image, warped, window, mask=mask))


def resolve(refine, verbose: bool = False):
    """``(refine callable or None, mode)`` from what the API accepts: ``None``, a mode string, or a
    callable (:data:`spirs_tf.inference.Refine`; mode ``"custom"``). A mode string gets a terminal
    progress line when ``verbose``.

    Raises:
        SpirsInputError: an unknown mode string.
    """
    if refine is None:
        return None, None
    if isinstance(refine, str):
        progress = None
        if verbose and check_mode(refine) != "off":
            from spirs_tf.refine import terminal_progress

            progress = terminal_progress()
        return make_refine(refine, progress=progress), refine
    return refine, getattr(refine, "mode", "custom")
