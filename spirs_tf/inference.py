"""Inference: load a trained SPIRS model and predict on (prior, new) scan pairs.

``predict_case`` reads and validates the three inputs, brings the new scan and the prior (image +
lesion mask) onto their own working grids (each centred on its brain, intensities normalised;
FACTS decision 1), runs the model's finest level once, and writes a case folder on the NEW scan's
original grid. Every output file:

=============================  ==================================================================
``prior_warped.nii.gz``        original prior image resampled once through the registration (float32)
``prior_mask_warped.nii.gz``   original prior mask, trilinear then ≥ 0.5 (uint8)
``prior_labels_warped.nii.gz`` prior lesions (26-connected ids), nearest neighbour (int32)
``p1_prob.nii.gz``             P1 probability (new scan alone), ``σ(clip(logit, ±50))`` (float32)
``p2_prob.nii.gz``             P2 probability (new scan + registered prior)
``p1_mask.nii.gz``             P1 ≥ 0.5 (uint8); ``p2_mask.nii.gz`` likewise
``affine.tfm``                 ITK affine, NEW → PRIOR physical points (LPS mm)
``deformation.nii.gz``         ITK/ANTs displacement field (LPS mm), full map = affine(x + d(x))
                               (``antsApplyTransforms -t deformation.nii.gz -t affine.tfm``);
                               on a compact grid by default, on the new grid with ``all`` (below)
``transform_total.nii.gz``     only with ``transforms="all"``: one displacement field holding
                               everything: x → prior point − x
``lesions.csv``                one row per P2 lesion + unmatched prior lesions (:mod:`spirs_tf.lesions`)
``qc.png``                     QC figure (:mod:`spirs_tf.qc`)
``report.json``                registration quality, model, versions, timings, inputs, outputs
=============================  ==================================================================

The geometry of the one-step resampling and of the transform files is in :mod:`spirs_tf.itk_export`.

**Which transform files** (``transforms=``, ``spirs predict --transforms``):

* ``itk`` (default): ``affine.tfm`` + ``deformation.nii.gz`` — what ITK, ANTs and SimpleITK need to
  apply the registration to any other image of the prior session. The field is stored on its own
  compact grid (the model's working grid of the new scan, extended to cover the new scan; about
  3 mm, a few MB) on which ITK's linear interpolation reproduces the mapping exactly
  (:func:`spirs_tf.itk_export.compact_deformation`).
* ``all``: ``affine.tfm``, ``deformation.nii.gz`` and ``transform_total.nii.gz``, both fields on
  the new scan's own voxel grid (~70 MB each for a 6-megavoxel scan), as before version 0.2.
* ``none``: no transform file (the warped prior, masks and probabilities are still written).

**Registration QC.** ``report.json`` holds a ``warnings`` list (also printed, one line each, as
``spirs: warning: <case>: …`` on stderr): brains that overlap little, LNCC after registration below
LNCC before, folding above 0.5 %, an affine whose scales leave 0.7–1.4 or whose rotation exceeds
45°, and input intensities whose dynamic range collapsed (a constant image is refused); the checks
and thresholds are in :mod:`spirs_tf.qc`.

**Test-time refinement.** ``refine=`` of :func:`predict_case`, :func:`run_case` and
:func:`spirs_tf.cohort_predict.predict_cohort` takes a mode, ``"off"``, ``"affine"`` or ``"full"``
(:mod:`spirs_tf.refinement`; ``spirs predict --refine``, default ``full`` on the command line), or any
callable (:data:`Refine`) that may replace the working-grid affine and displacement field between the
network and the resampling; the prior is then re-warped on the working grid and P2 recomputed from it
(:func:`apply_refinement`). ``report.json`` records the mode, the seconds per stage and the LNCC
before/after under ``registration.refinement``; the QC warnings judge the final transform.

**Modules.** This module writes a case; the model side (loading a trained model:
:func:`spirs_tf.predictor.load_predictor`) is :mod:`spirs_tf.predictor`, reading and preparing a case
:mod:`spirs_tf.case_inputs`; their names are re-exported here. Cohort mode is
:mod:`spirs_tf.cohort_predict`, which builds on this module.

**Brain overlap rule.** Before anything runs, the axis-aligned world (RAS mm) bounding boxes of the
non-zero voxels of the new and the prior image are intersected. If they do not intersect at all the
pair is refused (``SpirsInputError`` naming the prior): the scans do not share a patient coordinate
frame (wrong patient, or a header without real-world geometry). An overlap below
:data:`LOW_OVERLAP` of the smaller box only gives a warning (stderr and ``report.json``): the
working grids are each centred on their own brain, so the centre offset is absorbed anyway.

**Atomic case folders.** Files are written into ``.tmp-spirs-<case>-*`` inside the output's parent
folder, which is renamed to the case folder at the end: a case folder is either complete or absent
(``report.json``, written last, marks a finished case). Inputs are never overwritten, and an output
folder that contains an input is refused. Cohort mode: :func:`spirs_tf.cohort_predict.predict_cohort`.
"""
from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from spirs_tf import __version__, metrics, qc
from spirs_tf.atomic import atomic_write_text, json_safe
from spirs_tf.errors import SpirsInputError
from spirs_tf.case_inputs import (LOW_OVERLAP, CaseInputs, PreparedCase, brain_box, brain_overlap,  # noqa: F401
                                   prepare_case, read_case_inputs)
from spirs_tf.geometry import warp_working  # noqa: F401 (re-exported)
from spirs_tf.io import Volume, write_volume  # noqa: F401
from spirs_tf.itk_export import (case_transform, compact_deformation, resample_to_new, write_displacement,
                                 write_itk_affine)
from spirs_tf.lesions import change_counts, lesion_changes, write_lesions_csv
from spirs_tf.predictor import (DEMO_NAME, LOGIT_CLIP, OUTPUT_NAMES, WEIGHTS_DIR, Predictor,  # noqa: F401
                                find_run_checkpoint, import_runtime, keras_predictor, load_predictor,
                                serving_outputs)
from spirs_tf.preprocess import from_working
from spirs_tf.qc import (FOLDING_WARN_PERCENT, MAX_ROTATION_DEG, MIN_DISTINCT, MIN_RELATIVE_RANGE,  # noqa: F401
                         SCALE_RANGE, affine_scales_rotation, intensity_problems, registration_warnings)
from spirs_tf.refinement import P2_FALLBACK_WARNING, resolve

#: ``--transforms`` choices (module docstring); the first is the default.
TRANSFORMS = ("itk", "all", "none")
#: Prefix of the temporary case folders (also cleaned by spirs_tf.cohort_predict.clean_stale_temp).
TMP_PREFIX = ".tmp-spirs-"
NOT_FOR_CLINICAL_USE = ("Research software, not for clinical use: outputs have not been validated for "
                        "diagnosis or treatment decisions.")


# ---------------------------------------------------------------------------------------- case output
@dataclass(eq=False)
class CaseResult:
    """A finished case: its folder, the files written, the report and the lesion rows."""

    out_dir: str
    case_id: str
    files: list[str]
    report: dict
    lesions: list[dict]


def _input_paths(inputs: CaseInputs) -> list[str]:
    return [os.path.abspath(v.path) for v in (inputs.new, inputs.prior, inputs.prior_mask) if v.path]


def check_out_dir(out_dir: str, input_paths, overwrite: bool) -> str:
    """Absolute ``out_dir`` after checking it may be (re)written.

    Raises:
        SpirsInputError: it is a file; it contains an input; it is a non-empty folder and not ``overwrite``.
    """
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise SpirsInputError("output path exists and is not a folder", out)
    for p in input_paths:
        if os.path.commonpath([out, os.path.abspath(p)]) == out:
            raise SpirsInputError(f"output folder contains the input {p}; choose another --out", out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise SpirsInputError("output folder exists and is not empty (use --overwrite to replace it)", out)
    return out


def _commit_folder(tmp: str, out: str) -> None:
    """Rename the finished temporary folder to ``out`` (replacing an old one, if any)."""
    if os.path.isdir(out) and os.listdir(out):
        old = tempfile.mkdtemp(prefix=TMP_PREFIX + "old-", dir=os.path.dirname(out))
        os.replace(out, os.path.join(old, "case"))
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)


def _versions() -> dict:
    out = {"spirs-tf": __version__}
    for pkg in ("tensorflow", "keras", "numpy", "scipy", "nibabel", "SimpleITK"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


#: A test-time refinement: ``refine(predictor, case, outputs) -> dict | None``. ``outputs`` is the
#: case's network outputs (:data:`OUTPUT_NAMES`, one case, working grid ``S``). The callable returns
#: ``None`` or ``{"rejected": True, "info": ..., "warnings": [...]}`` (keep the network's
#: registration) or a dict with ``"affine"`` (3×4 ``[M | t]``, working
#: voxels, centre ``S/2``) and/or ``"dvf"``: ``(S, S, S, 3)`` in working voxels, or ``(kS, kS, kS, 3)``
#: on the k-times finer grid in ITS voxels (fine voxel ``k·i`` = working voxel ``i``; world affine
#: ``W_n·diag(1/k)``), used as such for the outputs on the native grid; plus optional ``"info"``
#: (JSON-safe, stored in ``report.json``) and ``"keep_network_p2": True`` (a predictor without
#: ``p2_fn`` keeps the network's P2 instead of refusing, with a warning).
Refine = Callable[["Predictor", "PreparedCase", dict], "dict | None"]


def apply_refinement(predictor: Predictor, case: PreparedCase, outputs: dict, refine: Refine | None
                     ) -> tuple[dict, dict | None]:
    """Run ``refine`` and, if it replaced the registration, re-warp the prior on the working grid and
    recompute P2 from it (the model's fusion block on ``[new, σ(P1), warped prior, blur(warped mask)]``).

    Returns:
        ``(outputs, info)``: the (possibly updated) outputs and a report block (``None`` when
        ``refine`` is ``None``).

    Raises:
        ValueError: ``refine`` returned arrays of the wrong shape, or the predictor cannot
            recompute P2 (a SavedModel: it exposes only the whole model).
    """
    if refine is None:
        return outputs, None
    t0 = time.perf_counter()
    result = refine(predictor, case, outputs)
    if not result:
        return outputs, {"applied": False, "seconds": time.perf_counter() - t0}
    if result.get("rejected"):  # the refinement ran but is not used (e.g. it lowered the LNCC)
        return outputs, {"applied": False, "seconds": time.perf_counter() - t0, "info": result.get("info"),
                         "warnings": list(result.get("warnings", []))}
    s = case.new_image.shape[0]
    matrix = np.asarray(result.get("affine", outputs["affine"]), np.float32).reshape(3, 4)
    dvf = np.asarray(result.get("dvf", outputs["dvf"]), np.float32)
    k = dvf.shape[0] // s if dvf.ndim == 4 else 0
    if k < 1 or dvf.shape != (k * s,) * 3 + (3,):
        raise ValueError(f"refined dvf must have shape (kS, kS, kS, 3) with S = {s} and an integer k >= 1, "
                         f"got {dvf.shape}")
    keep_p2 = predictor.p2_fn is None
    # a segmenter (a SavedModel's too) computes P1/P2 afterwards from the refined registration
    fallback = keep_p2 and predictor.segmenter is None
    if fallback and not result.get("keep_network_p2"):
        raise ValueError("this model cannot recompute P2 from a refined registration (a SavedModel); "
                         "use a run directory or checkpoint")
    on_working = dvf[::k, ::k, ::k] / k if k > 1 else dvf  # exact: fine voxel k·i = working voxel i
    warped = warp_working(case.prior_image, matrix, on_working)[..., None]
    warped_mask = warp_working(case.prior_mask, matrix, on_working)[..., None]
    p2 = outputs["p2_prob"] if keep_p2 else \
        predictor.p2_fn(case.new_image[None, ..., None], warped[None], warped_mask[None])[0]
    out = dict(outputs, affine=matrix, dvf=dvf, dvf_factor=k, prior_warped=warped, prior_mask_warped=warped_mask,
               p2_prob=p2)
    window = predictor.cfg.loss.lncc_window
    info = {"applied": True, "seconds": time.perf_counter() - t0, "info": result.get("info"),
            "lncc_before": metrics.lncc(case.new_image, np.asarray(outputs["prior_warped"])[..., 0], window),
            "lncc_after": metrics.lncc(case.new_image, warped[..., 0], window),
            "p2_from": "network registration" if fallback else "refined registration",
            "warnings": [P2_FALLBACK_WARNING] if fallback else [],
            "network_affine_voxel": np.asarray(outputs["affine"], float).reshape(3, 4).tolist()}
    return out, info


def _label_in_box(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`spirs_tf.metrics.label_lesions` computed inside the mask's bounding box (the same ids:
    C order is kept inside a box), for a 6-megavoxel grid whose lesions fill a few thousand voxels."""
    mask = np.asarray(mask)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if not hit.size:
            return np.zeros(mask.shape, np.int32), 0
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    labels = np.zeros(mask.shape, np.int32)
    labels[tuple(box)], n = metrics.label_lesions(mask[tuple(box)])
    return labels, n


def write_case(predictor: Predictor, case: PreparedCase, outputs: dict, out_dir: str, *,
               overwrite: bool = False, case_id: str | None = None, network_s: float = 0.0,
               transforms: str = TRANSFORMS[0], refinement: dict | None = None,
               verbose: bool = True) -> CaseResult:
    """Write every output of one case (``outputs``: this case's slice of :meth:`Predictor.predict`,
    possibly refined by :func:`apply_refinement`, whose report block is ``refinement``).

    Args:
        transforms: which transform files (:data:`TRANSFORMS`, module docstring).
        verbose: print the case's warnings on stderr (they are in ``report.json`` either way).
    """
    if transforms not in TRANSFORMS:
        raise ValueError(f"transforms must be one of {TRANSFORMS}, got {transforms!r}")
    inputs = case.inputs
    protect = _input_paths(inputs)
    out = check_out_dir(out_dir, protect, overwrite)
    case_id = case_id or os.path.basename(out)
    t0 = time.perf_counter()
    new = inputs.new
    transform = case_transform(case, outputs)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.path.basename(out)}-", dir=os.path.dirname(out))
    # One writer thread: gzip (zlib releases the GIL) runs while the next outputs are computed.
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spirs-write")
    pending = []
    try:
        def vol(name, data, **kw):
            pending.append(writer.submit(write_volume, os.path.join(tmp, name), data, new.affine,
                                         protect=protect, **kw))

        seg_mapping = outputs.get("seg_mapping", case.new_mapping)  # a segmenter's finer grid
        probs = {k: np.clip(from_working(np.asarray(outputs.get(f"{k}_prob_fine", outputs[f"{k}_prob"])),
                                         seg_mapping, order=1), 0, 1) for k in ("p1", "p2")}
        masks = {k: (v >= 0.5).astype(np.uint8) for k, v in probs.items()}
        for k in ("p1", "p2"):
            vol(f"{k}_prob.nii.gz", probs[k].astype(np.float32))
            vol(f"{k}_mask.nii.gz", masks[k])
        prior_labels, n_prior = _label_in_box(inputs.prior_mask.data)
        res = resample_to_new(transform, new, inputs.prior, inputs.prior_mask, prior_labels,
                              native_fields=transforms == "all")
        vol("prior_warped.nii.gz", res.prior_warped)
        vol("prior_mask_warped.nii.gz", res.prior_mask_warped)
        vol("prior_labels_warped.nii.gz", res.prior_labels_warped, intent="label")
        field, field_affine = compact_deformation(transform, new)
        if transforms != "none":
            write_itk_affine(os.path.join(tmp, "affine.tfm"), transform.world_affine_lps())
        if transforms == "itk":
            pending.append(writer.submit(write_displacement, os.path.join(tmp, "deformation.nii.gz"), field,
                                         field_affine))
        elif transforms == "all":
            for name, data in (("deformation.nii.gz", res.deformation), ("transform_total.nii.gz", res.total)):
                pending.append(writer.submit(write_displacement, os.path.join(tmp, name), data, new.affine))
        rows = lesion_changes(masks["p2"], res.prior_labels_warped, new.spacing, new.affine)
        write_lesions_csv(os.path.join(tmp, "lesions.csv"), rows)
        qc_slices = qc.write_qc_png(os.path.join(tmp, "qc.png"), case_id, new.data, res.prior_warped,
                                 res.prior_mask_warped, masks["p1"], masks["p2"], new.affine)
        for future in pending:
            future.result()  # re-raises a writer's error here
        new_w, warped_w = case.new_image, np.asarray(outputs["prior_warped"])[..., 0]
        window = predictor.cfg.loss.lncc_window
        lncc_mask = metrics.lncc_mask(new_w, warped_w, np.asarray(outputs["p2_prob"])[..., 0] >= 0.5,
                                      np.asarray(outputs["prior_mask_warped"])[..., 0] >= 0.5)
        files = sorted(os.listdir(tmp)) + ["report.json"]
        registration = {
            "grid": "model working grid of the new scan",
            "network_passes": predictor.passes,
            "network_affine_symmetric": predictor.symmetric,
            "lncc_window": window,
            "lncc_identity": metrics.lncc(new_w, case.prior_image, window),
            "lncc": metrics.lncc(new_w, warped_w, window),
            "lncc_identity_masked": metrics.lncc(new_w, case.prior_image, window, mask=metrics.lncc_mask(
                new_w, case.prior_image, np.asarray(outputs["p2_prob"])[..., 0] >= 0.5, case.prior_mask >= 0.5)),
            "lncc_masked": metrics.lncc(new_w, warped_w, window, mask=lncc_mask),
            "folding_percent": metrics.folding_percent(transform.dvf),
            "affine_voxel": transform.matrix.tolist(),
            "affine_world_ras": transform.world_affine().tolist(),
            "affine_scales": None, "affine_rotation_deg": None,
            "max_displacement_mm": float(np.sqrt((field ** 2).sum(axis=-1).max())),
        }
        scales, angle = affine_scales_rotation(transform.world_affine()[:3, :3])
        registration["affine_scales"], registration["affine_rotation_deg"] = scales.tolist(), angle
        if refinement is not None:
            registration["refinement"] = refinement
        segmentation = {"model": "network", "grid": list(case.new_mapping.working_shape)}
        if predictor.segmenter is not None:
            segmentation = {"model": "segmenter", "segmenter": predictor.segmenter.path,
                            "grid": list(seg_mapping.working_shape), "factor": int(outputs["seg_factor"]),
                            "p2_prior_from": "refined registration" if (refinement or {}).get("applied")
                            else "network registration"}
        warnings = (list(inputs.warnings) + list((refinement or {}).get("warnings", []))
                    + registration_warnings(registration, transform.world_affine()))
        if verbose:
            for text in warnings:
                print(f"spirs: warning: {case_id}: {text}", file=sys.stderr)
        timings = {"read": inputs.read_s, "preprocess": case.preprocess_s, "network": network_s}
        if "segmenter_s" in outputs:
            timings["segmenter"] = float(outputs["segmenter_s"])
        if refinement is not None:
            timings["refine"] = refinement["seconds"]
            stages = (refinement.get("info") or {}).get("seconds")
            if isinstance(stages, dict):  # spirs_tf.refinement: per-stage seconds
                timings.update({f"refine_{k}": v for k, v in stages.items()})
        report = {
            "case_id": case_id, "note": NOT_FOR_CLINICAL_USE,
            "inputs": {"new": new.path, "prior": inputs.prior.path, "prior_mask": inputs.prior_mask.path},
            "model": predictor.info | {"levels": predictor.levels, "input_grid": predictor.size},
            "registration": registration,
            "segmentation": segmentation,
            "warnings": warnings,
            "brain_overlap": inputs.overlap,
            "lesions": {"p2_lesions": sum(r["source"] == "p2" for r in rows), "prior_lesions": n_prior,
                        "changes": change_counts(rows), "growth_ratio": ">1.25", "shrink_ratio": "<0.8"},
            "qc_slices": qc_slices,
            "transforms": {
                "written": transforms,
                "ants": "antsApplyTransforms -d 3 -i PRIOR -r NEW -o OUT -t deformation.nii.gz -t affine.tfm",
                "ants_total": "antsApplyTransforms -d 3 -i PRIOR -r NEW -o OUT -t transform_total.nii.gz",
                "deformation_grid": {"itk": "compact field grid (model working grid of the new scan, extended "
                                            "to cover it); ITK's linear interpolation reproduces the mapping",
                                     "all": "the new scan's voxel grid", "none": None}[transforms],
                "convention": "new-scan physical point x -> prior point affine(x + d(x)), ITK LPS mm; "
                              "vectors LPS, NIfTI intent vector (1007); see spirs_tf/itk_export.py"},
            "timings_s": timings | {"resample_write": time.perf_counter() - t0},
            "versions": _versions(),
            "outputs": files,
        }
        atomic_write_text(os.path.join(tmp, "report.json"),
                          json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
        _commit_folder(tmp, out)
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return CaseResult(out, case_id, files, report, rows)


def _one(outputs: dict, b: int) -> dict:
    return {k: v[b] for k, v in outputs.items()}


def run_network(predictor: Predictor, cases: list[PreparedCase]) -> tuple[list[dict], float]:
    """One batched forward pass → (per-case outputs, seconds)."""
    t0 = time.perf_counter()
    stack = lambda name: np.stack([getattr(c, name) for c in cases])[..., None]  # noqa: E731
    out = predictor.predict(stack("new_image"), stack("prior_image"), stack("prior_mask"))
    return [_one(out, b) for b in range(len(cases))], time.perf_counter() - t0


def refine_case(predictor: Predictor, case: PreparedCase, outputs: dict, refine: Refine | None,
                mode: str | None) -> tuple[dict, dict | None]:
    """:func:`apply_refinement` with the mode (:func:`spirs_tf.refinement.resolve`) in its report
    block; ``mode="off"`` gives ``{"mode": "off", "applied": False, "seconds": 0.0}`` and the
    network's outputs unchanged."""
    if mode == "off":
        return outputs, {"mode": "off", "applied": False, "seconds": 0.0}
    outputs, refinement = apply_refinement(predictor, case, outputs, refine)
    if refinement is not None:
        refinement = {"mode": mode, **refinement}
    return outputs, refinement


def segment_case(predictor: Predictor, case: PreparedCase, outputs: dict) -> dict:
    """With a segmenter on the predictor (``spirs predict --segmenter``): P1 and P2 from it on its finer
    grid, the prior placed by the registration in ``outputs`` (refined when refinement ran;
    :func:`spirs_tf.fine_seg_inference.segment_fine`). Without one: ``outputs`` unchanged."""
    if predictor.segmenter is None:
        return outputs
    from spirs_tf.fine_seg_inference import segment_fine

    t0 = time.perf_counter()
    out = segment_fine(predictor.segmenter, case, outputs, predictor.cfg.data.clip_sigma)
    out["segmenter_s"] = time.perf_counter() - t0
    return out


def predict_case(predictor: Predictor, new, prior, prior_mask, out_dir: str, *, overwrite: bool = False,
                 case_id: str | None = None, transforms: str = TRANSFORMS[0], refine: Refine | str | None = None,
                 verbose: bool = True) -> CaseResult:
    """Predict one (prior, new) pair and write its case folder (see the module docstring).

    Args:
        predictor: from :func:`load_predictor`.
        new, prior, prior_mask: paths or :class:`spirs_tf.io.Volume` objects.
        out_dir: the case folder (created; must not exist unless empty or ``overwrite``).
        overwrite: replace an existing case folder.
        case_id: name in the report and the QC title (default: the folder name).
        transforms: which transform files to write (:data:`TRANSFORMS`; module docstring).
        refine: test-time refinement: ``None`` (default: the network alone), a mode ``"off"``,
            ``"affine"`` or ``"full"`` (:mod:`spirs_tf.refinement`; ``"off"`` is recorded in
            ``report.json``), or a callable (:data:`Refine`, :func:`apply_refinement`).
        verbose: print warnings (``spirs: warning: <case>: …``) and the refinement's progress on stderr.

    Raises:
        SpirsInputError: every input problem of :func:`read_case_inputs`, an output folder that
            exists (without ``overwrite``) or contains an input, an unknown refinement mode.
            Nothing is written then.
    """
    return run_case(predictor, read_case_inputs(new, prior, prior_mask), out_dir, overwrite=overwrite,
                    case_id=case_id, transforms=transforms, refine=refine, verbose=verbose)


def run_case(predictor: Predictor, inputs: CaseInputs, out_dir: str, *, overwrite: bool = False,
             case_id: str | None = None, transforms: str = TRANSFORMS[0], refine: Refine | str | None = None,
             verbose: bool = True) -> CaseResult:
    """:func:`predict_case` for inputs already read and validated by :func:`read_case_inputs`."""
    check_out_dir(out_dir, _input_paths(inputs), overwrite)
    refine_fn, mode = resolve(refine, verbose)
    case = prepare_case(inputs, predictor)
    (outputs,), network_s = run_network(predictor, [case])
    outputs, refinement = refine_case(predictor, case, outputs, refine_fn, mode)
    outputs = segment_case(predictor, case, outputs)
    return write_case(predictor, case, outputs, out_dir, overwrite=overwrite, case_id=case_id,
                      network_s=network_s, transforms=transforms, refinement=refinement, verbose=verbose)
