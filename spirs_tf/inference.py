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

**Test-time refinement hook.** ``refine`` (see :data:`Refine`) may replace the working-grid affine
and displacement field between the network and the resampling; the prior is then re-warped on the
working grid and P2 recomputed from it (:func:`apply_refinement`).

**Brain overlap rule.** Before anything runs, the axis-aligned world (RAS mm) bounding boxes of the
non-zero voxels of the new and the prior image are intersected. If they do not intersect at all the
pair is refused (``SpirsInputError`` naming the prior): the scans do not share a patient coordinate
frame (wrong patient, or a header without real-world geometry). An overlap below
:data:`LOW_OVERLAP` of the smaller box only gives a warning (stderr and ``report.json``): the
working grids are each centred on their own brain, so the centre offset is absorbed anyway.

**Atomic case folders.** Files are written into ``.tmp-spirs-<case>-*`` inside the output's parent
folder, which is renamed to the case folder at the end: a case folder is either complete or absent
(``report.json``, written last, marks a finished case). Inputs are never overwritten, and an output
folder that contains an input is refused. Cohort mode: :func:`predict_cohort`.
"""
from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from spirs_tf import __version__
from spirs_tf import config as config_lib
from spirs_tf.atomic import atomic_write_text
from spirs_tf.errors import SpirsInputError
from spirs_tf.io import Volume, check_same_grid, read_volume, write_volume
from spirs_tf.preprocess import GridMapping, from_working, preprocess_scan, subsample
from spirs_tf.qc import (FOLDING_WARN_PERCENT, MAX_ROTATION_DEG, MIN_DISTINCT, MIN_RELATIVE_RANGE,  # noqa: F401
                         SCALE_RANGE, affine_scales_rotation, intensity_problems, registration_warnings)

OUTPUT_NAMES = ("p1_prob", "p2_prob", "affine", "dvf", "prior_warped", "prior_mask_warped")
LOGIT_CLIP = 50.0
LOW_OVERLAP = 0.3
#: ``--transforms`` choices (module docstring); the first is the default.
TRANSFORMS = ("itk", "all", "none")
TMP_PREFIX = ".tmp-spirs-"
NOT_FOR_CLINICAL_USE = ("Research software, not for clinical use: outputs have not been validated for "
                        "diagnosis or treatment decisions.")
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEMO_NAME = "cpu-small"


# ------------------------------------------------------------------------------------------ predictor
def serving_outputs(raw: dict, levels: int) -> dict:
    """Model output dict → the six inference outputs (float32 tensors) of :data:`OUTPUT_NAMES`.

    ``p*_prob = σ(clip(p*_logits, ±50))`` (B, S, S, S, 1); ``affine = affine_{levels}`` (B, 3, 4);
    ``dvf = dvf_{levels}`` (B, S, S, S, 3); ``prior_warped``/``prior_mask_warped`` = the finest
    ``warped_image``/``warped_mask`` (soft, trilinear) on the new scan's working grid.
    """
    from spirs_tf._compat import ops

    def prob(x):
        return ops.sigmoid(ops.clip(ops.cast(x, "float32"), -LOGIT_CLIP, LOGIT_CLIP))

    f32 = lambda x: ops.cast(x, "float32")  # noqa: E731
    return {"p1_prob": prob(raw["p1_logits"]), "p2_prob": prob(raw["p2_logits"]),
            "affine": f32(raw[f"affine_{levels}"]), "dvf": f32(raw[f"dvf_{levels}"]),
            "prior_warped": f32(raw[f"warped_image_{levels}"]),
            "prior_mask_warped": f32(raw[f"warped_mask_{levels}"])}


@dataclass(eq=False)
class Predictor:
    """A model ready for inference.

    Attributes:
        cfg: the run's config (working grid, spacing, clipping, LNCC window).
        levels: pyramid levels of the model; its inputs are ``S = cfg.level_grid(levels)`` voxels.
        run_fn: ``(new, prior, prior_mask) → {name: array}`` on batches ``(B, S, S, S, 1)``, returning
            :data:`OUTPUT_NAMES`.
        info: description for reports (``kind``, ``path``, ``checkpoint``, ``stage``, ``config``).
        p2_fn: ``(new, warped_prior, warped_prior_mask) → p2_prob`` on batches ``(B, S, S, S, 1)``:
            P2 recomputed from a replaced warped prior (test-time refinement); ``None`` when the
            model cannot provide it (a SavedModel).
    """

    cfg: config_lib.SpirsConfig
    levels: int
    run_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], dict]
    info: dict = field(default_factory=dict)
    p2_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None

    @property
    def size(self) -> int:
        return self.cfg.level_grid(self.levels)

    @property
    def subsample_factor(self) -> int:
        """Working grid (``cfg.data.grid_size``) voxels per model-input voxel."""
        return self.cfg.data.grid_size // self.size

    def predict(self, new: np.ndarray, prior: np.ndarray, prior_mask: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on a batch ``(B, S, S, S, 1)`` each → NumPy outputs (:data:`OUTPUT_NAMES`)."""
        arrays = [np.asarray(a, dtype=np.float32) for a in (new, prior, prior_mask)]
        s = self.size
        for a in arrays:
            if a.ndim != 5 or a.shape[1:] != (s, s, s, 1):
                raise ValueError(f"model inputs must be (B, {s}, {s}, {s}, 1), got {a.shape}")
        out = self.run_fn(*arrays)
        return {k: np.asarray(out[k]) for k in OUTPUT_NAMES}


def keras_predictor(model, cfg: config_lib.SpirsConfig, levels: int, info: dict | None = None) -> Predictor:
    """Wrap a SPIRS Keras model (``training=False``) in a predictor.

    The first call runs eagerly: for one case that is faster than tracing a graph (measured with
    cpu-small at 64³: eager 1.3 s against 4.9 s to trace + 0.3 s to run). Later calls go through
    one ``tf.function`` whose signature has a free batch axis, traced once for every batch size;
    ``run_fn.use_graph()`` (called by :func:`predict_cohort` for more than one case) skips the eager
    call. Both compute the same model.
    """
    from spirs_tf._compat import tf

    s = cfg.level_grid(levels)
    spec = tf.TensorSpec((None, s, s, s, 1), tf.float32)

    def forward(new, prior, mask):
        raw = model({"fixed_image": new, "moving_image": prior, "moving_mask": mask}, training=False)
        return serving_outputs(raw, levels)

    infer = tf.function(forward, input_signature=[spec, spec, spec])
    calls = []

    def run(new, prior, mask):
        fn = infer if calls else forward
        calls.append(1)
        args = [tf.convert_to_tensor(a) for a in (new, prior, mask)]
        return {k: np.asarray(v) for k, v in fn(*args).items()}

    run.model = model  # keep the model reachable for export and tests
    run.use_graph = lambda: calls.append(0)  # a cohort: trace from the first batch on
    p2_model = []

    def p2(new, warped, warped_mask):
        """P2 from the fixed image and a (replaced) warped prior: the model's own layers, from its
        ``fixed_image`` input and ``warped_image_{levels}``/``warped_mask_{levels}`` outputs."""
        from spirs_tf._compat import keras

        if not p2_model:
            p2_model.append(keras.Model(
                [model.get_layer("fixed_image").output, model.get_layer(f"warped_image_{levels}").output,
                 model.get_layer(f"warped_mask_{levels}").output], model.get_layer("p2_logits").output))
        logits = p2_model[0]([tf.convert_to_tensor(np.asarray(a, np.float32)) for a in (new, warped, warped_mask)],
                             training=False)
        x = tf.clip_by_value(tf.cast(logits, tf.float32), -LOGIT_CLIP, LOGIT_CLIP)
        return np.asarray(tf.sigmoid(x))

    return Predictor(cfg, levels, run, dict(info or {}), p2)


def import_runtime() -> None:
    """Import Keras/TensorFlow and the network code, without Keras' optional scikit-learn wrappers.

    Keras imports scikit-learn (~1 s of the ~5 s start-up on this CPU) only for its sklearn
    wrappers, which spirs never uses: a ``None`` entry in ``sys.modules`` makes that import fail
    fast and Keras carries on without them; the entry is removed afterwards, so a later
    ``import sklearn`` works as usual. Nothing happens when Keras is already imported.
    """
    if "keras" in sys.modules:
        return
    block = "sklearn" not in sys.modules
    if block:
        sys.modules["sklearn"] = None
    try:
        import spirs_tf.networks  # noqa: F401
    finally:
        if block and "sklearn" in sys.modules and sys.modules["sklearn"] is None:
            del sys.modules["sklearn"]


def _checkpoint_predictor(checkpoint: str, config_path: str, stage: int | None = None) -> Predictor:
    import_runtime()
    from spirs_tf import networks
    from spirs_tf.train import load_checkpoint

    cfg = config_lib.get_config(config_path)
    state, _, meta = load_checkpoint(checkpoint)
    stage = meta.get("stage", stage)
    levels = meta.get("levels") or (cfg.train.stages[stage - 1].levels if stage else cfg.model.num_levels)
    model = networks.build_spirs(cfg, int(levels), bn_trainable=False)
    try:
        networks.load_model_state(model, state)
    except SpirsInputError as exc:
        raise SpirsInputError(f"checkpoint does not fit its config {config_path}: {exc.problem}", checkpoint) \
            from None
    info = {"kind": "checkpoint", "checkpoint": os.path.abspath(checkpoint), "config_file": os.path.abspath(config_path),
            "config": cfg.name, "stage": stage, "levels": int(levels), "epoch": meta.get("epoch")}
    return keras_predictor(model, cfg, int(levels), info)


def find_run_checkpoint(run_dir: str) -> tuple[str, str, int | None]:
    """``(checkpoint, config.json, stage)`` of a run directory: the highest ``stageN`` that holds a
    checkpoint, its ``best.npz`` else ``latest.npz``. A single stage folder is accepted too.

    Raises:
        SpirsInputError: no stage with a checkpoint and a config.
    """
    stages = []
    for name in os.listdir(run_dir):
        if name.startswith("stage") and name[5:].isdigit():
            stages.append((int(name[5:]), os.path.join(run_dir, name)))
    candidates = sorted(stages, reverse=True) + [(None, run_dir)]
    for stage, folder in candidates:
        for ckpt in ("best.npz", "latest.npz"):
            path = os.path.join(folder, "checkpoints", ckpt)
            cfg = os.path.join(folder, "config.json")
            if os.path.isfile(path) and os.path.isfile(cfg):
                return path, cfg, stage
    raise SpirsInputError("not a run directory (no stageN/checkpoints/best.npz or latest.npz with "
                          "stageN/config.json) and not a SavedModel (no saved_model.pb)", run_dir)


def load_predictor(model: str | os.PathLike | None) -> Predictor:
    """A :class:`Predictor` from a run directory, a checkpoint ``.npz``, a SavedModel or the demo weights.

    Args:
        model: a run directory (highest stage; ``best.npz`` else ``latest.npz``; its ``config.json``),
            a checkpoint ``.npz`` (``config.json`` beside it or one folder up), a SavedModel folder
            written by ``spirs export``, or ``None`` for the shipped demo weights
            (``spirs_tf/weights/cpu-small.npz`` + ``cpu-small.json``).

    Raises:
        SpirsInputError: missing path, unrecognised folder, no config, checkpoint/config mismatch,
            ``None`` without shipped weights.
    """
    if model is None:
        ckpt = os.path.join(WEIGHTS_DIR, f"{DEMO_NAME}.npz")
        cfg = os.path.join(WEIGHTS_DIR, f"{DEMO_NAME}.json")
        if not (os.path.isfile(ckpt) and os.path.isfile(cfg)):
            raise SpirsInputError("no model given (use --model RUN_DIR, a checkpoint .npz or a SavedModel "
                                  "folder) and this spirs-tf ships no demo weights (spirs_tf/weights/)")
        predictor = _checkpoint_predictor(ckpt, cfg)
        predictor.info["kind"] = "demo weights"
        return predictor
    path = os.fspath(model)
    if not os.path.exists(path):
        raise SpirsInputError("model not found", path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            from spirs_tf.export import load_saved_model_predictor

            import_runtime()
            return load_saved_model_predictor(path)
        return _checkpoint_predictor(*find_run_checkpoint(path))
    if not path.endswith(".npz"):
        raise SpirsInputError("a model must be a run directory, a checkpoint .npz or a SavedModel folder", path)
    folder = os.path.dirname(os.path.abspath(path))
    for cfg in (os.path.join(folder, "config.json"), os.path.join(os.path.dirname(folder), "config.json")):
        if os.path.isfile(cfg):
            return _checkpoint_predictor(path, cfg)
    raise SpirsInputError("no config.json beside the checkpoint or one folder up", path)


# ---------------------------------------------------------------------------------------- case inputs
@dataclass(eq=False)
class CaseInputs:
    """Validated volumes of one case, their brain overlap and the reading time."""

    new: Volume
    prior: Volume
    prior_mask: Volume
    overlap: dict
    read_s: float = 0.0
    warnings: list = field(default_factory=list)


def brain_box(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS box (lo, hi) in mm around the non-zero voxels (voxel corners included)."""
    nonzero = np.asarray(volume.data) != 0
    lo, hi = np.zeros(3), np.zeros(3)
    for axis in range(3):  # projections instead of np.nonzero: no index arrays for millions of voxels
        hit = np.flatnonzero(np.any(nonzero, axis=tuple(a for a in range(3) if a != axis)))
        lo[axis], hi[axis] = hit[0] - 0.5, hit[-1] + 0.5
    corners = np.array([[(hi if b else lo)[a] for a, b in enumerate(bits)] + [1.0]
                        for bits in np.ndindex(2, 2, 2)]).T
    world = (np.asarray(volume.affine, float) @ corners)[:3]
    return world.min(axis=1), world.max(axis=1)


def brain_overlap(new: Volume, prior: Volume) -> dict:
    """Overlap of the two brain boxes (:func:`brain_box`): intersection volume / smaller box volume.

    Raises:
        SpirsInputError: (naming the prior) when the boxes do not intersect.
    """
    (lo_n, hi_n), (lo_p, hi_p) = brain_box(new), brain_box(prior)
    inter = np.minimum(hi_n, hi_p) - np.maximum(lo_n, lo_p)
    fmt = lambda lo, hi: "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi)) + "] mm"  # noqa: E731
    if np.any(inter <= 0):
        raise SpirsInputError(
            f"its brain does not overlap the brain of {new.path or 'the new scan'} in world coordinates "
            f"(RAS boxes {fmt(lo_p, hi_p)} vs {fmt(lo_n, hi_n)}); both scans must be of the same patient "
            "with real-world (scanner) geometry in their headers", prior.path or "<prior>")
    fraction = float(np.prod(inter) / min(np.prod(hi_n - lo_n), np.prod(hi_p - lo_p)))
    return {"box_overlap_fraction": fraction, "new_box_mm": [lo_n.tolist(), hi_n.tolist()],
            "prior_box_mm": [lo_p.tolist(), hi_p.tolist()], "low_overlap_warning": fraction < LOW_OVERLAP}


def read_case_inputs(new, prior, prior_mask) -> CaseInputs:
    """Read (paths) or accept (Volumes) the three inputs and validate them.

    Raises:
        SpirsInputError: unreadable/missing file, not 3-D, several volumes, NaN/inf, mask not
            binary, mask not on the prior's grid, brains that do not overlap (:func:`brain_overlap`),
            an image that is (effectively) constant (:func:`intensity_problems`).
    """
    t0 = time.perf_counter()
    new = new if isinstance(new, Volume) else read_volume(new, "image")
    prior = prior if isinstance(prior, Volume) else read_volume(prior, "image")
    prior_mask = prior_mask if isinstance(prior_mask, Volume) else read_volume(prior_mask, "mask")
    check_same_grid(prior_mask, prior)
    problems = intensity_problems(new) + intensity_problems(prior)
    overlap = brain_overlap(new, prior)
    if overlap["low_overlap_warning"]:
        problems.append(f"brains of {new.path} and {prior.path} overlap little "
                        f"({100 * overlap['box_overlap_fraction']:.0f} % of the smaller box)")
    return CaseInputs(new, prior, prior_mask, overlap, time.perf_counter() - t0, problems)


@dataclass(eq=False)
class PreparedCase:
    """Model inputs of one case on the model grid ``S`` and the mappings back to the originals."""

    inputs: CaseInputs
    new_image: np.ndarray
    prior_image: np.ndarray
    prior_mask: np.ndarray
    new_mapping: GridMapping
    prior_mapping: GridMapping
    preprocess_s: float


def _model_grid(image, mask, mapping: GridMapping, factor: int):
    """Strided subsample of the working grid to the model's input grid (corner aligned)."""
    if factor == 1:
        return image, mask, mapping
    affine = mapping.working_affine @ np.diag([factor, factor, factor, 1.0])
    shape = tuple(n // factor for n in mapping.working_shape)
    return (subsample(image, factor), None if mask is None else subsample(mask, factor),
            GridMapping(affine, shape, mapping.original_affine, mapping.original_shape))


def prepare_case(inputs: CaseInputs, predictor: Predictor) -> PreparedCase:
    """Preprocess the new scan and the prior (image + mask) onto their own working grids."""
    t0 = time.perf_counter()
    f = predictor.subsample_factor
    n = preprocess_scan(inputs.new, None, predictor.cfg.data)
    p = preprocess_scan(inputs.prior, inputs.prior_mask, predictor.cfg.data)
    new_img, _, new_map = _model_grid(n.image, None, n.mapping, f)
    prior_img, prior_mask, prior_map = _model_grid(p.image, p.mask, p.mapping, f)
    return PreparedCase(inputs, new_img, prior_img, prior_mask, new_map, prior_map, time.perf_counter() - t0)


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


def _json_safe(x):
    """Nested structure → JSON-safe (NumPy scalars to Python, NaN/inf to ``None``)."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    return x.item() if isinstance(x, np.generic) else x


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


def warp_working(volume: np.ndarray, matrix: np.ndarray, dvf: np.ndarray | None) -> np.ndarray:
    """The network's spatial transformer in NumPy: trilinear, zero padding, at
    ``p(x) = M(x − c) + t + u(x) + c`` (:func:`spirs_tf.geometry.sample_locations`) → float32."""
    from scipy import ndimage

    from spirs_tf.geometry import sample_locations

    coords = sample_locations(matrix, volume.shape, dvf) + 1.0  # zero-padded: = SciPy's "grid-constant"
    return ndimage.map_coordinates(np.pad(np.asarray(volume, np.float32), 1), coords, order=1, mode="constant",
                                   cval=0.0, prefilter=False).astype(np.float32)


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
    from spirs_tf import metrics
    from spirs_tf.refinement import P2_FALLBACK_WARNING

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
    if keep_p2 and not result.get("keep_network_p2"):
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
            "p2_from": "network registration" if keep_p2 else "refined registration",
            "warnings": [P2_FALLBACK_WARNING] if keep_p2 else [],
            "network_affine_voxel": np.asarray(outputs["affine"], float).reshape(3, 4).tolist()}
    return out, info


def _label_in_box(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`spirs_tf.metrics.label_lesions` computed inside the mask's bounding box (the same ids:
    C order is kept inside a box), for a 6-megavoxel grid whose lesions fill a few thousand voxels."""
    from spirs_tf import metrics

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
    from spirs_tf import metrics
    from spirs_tf.itk_export import (CaseTransform, compact_deformation, resample_to_new, write_displacement,
                                     write_itk_affine)
    from spirs_tf.lesions import change_counts, lesion_changes, write_lesions_csv
    from spirs_tf.qc import write_qc_png

    if transforms not in TRANSFORMS:
        raise ValueError(f"transforms must be one of {TRANSFORMS}, got {transforms!r}")
    inputs = case.inputs
    protect = _input_paths(inputs)
    out = check_out_dir(out_dir, protect, overwrite)
    case_id = case_id or os.path.basename(out)
    t0 = time.perf_counter()
    new = inputs.new
    factor = int(outputs.get("dvf_factor", 1))  # > 1: a refined field on a k-times finer grid
    dvf_shape = tuple(factor * n for n in case.new_image.shape) + (3,)
    transform = CaseTransform(case.new_mapping.working_affine, case.prior_mapping.working_affine,
                              np.asarray(outputs["affine"], np.float64).reshape(3, 4),
                              np.asarray(outputs["dvf"], np.float32).reshape(dvf_shape), factor)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.path.basename(out)}-", dir=os.path.dirname(out))
    # One writer thread: gzip (zlib releases the GIL) runs while the next outputs are computed.
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spirs-write")
    pending = []
    try:
        def vol(name, data, **kw):
            pending.append(writer.submit(write_volume, os.path.join(tmp, name), data, new.affine,
                                         protect=protect, **kw))

        probs = {k: np.clip(from_working(np.asarray(outputs[f"{k}_prob"]), case.new_mapping, order=1), 0, 1)
                 for k in ("p1", "p2")}
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
        qc_slices = write_qc_png(os.path.join(tmp, "qc.png"), case_id, new.data, res.prior_warped,
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
            "lncc_window": window,
            "lncc_identity": metrics.lncc(new_w, case.prior_image, window),
            "lncc": metrics.lncc(new_w, warped_w, window),
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
        warnings = (list(inputs.warnings) + list((refinement or {}).get("warnings", []))
                    + registration_warnings(registration, transform.world_affine()))
        if verbose:
            for text in warnings:
                print(f"spirs: warning: {case_id}: {text}", file=sys.stderr)
        timings = {"read": inputs.read_s, "preprocess": case.preprocess_s, "network": network_s}
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
                          json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
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
    from spirs_tf.refinement import resolve

    check_out_dir(out_dir, _input_paths(inputs), overwrite)
    refine_fn, mode = resolve(refine, verbose)
    case = prepare_case(inputs, predictor)
    (outputs,), network_s = run_network(predictor, [case])
    outputs, refinement = refine_case(predictor, case, outputs, refine_fn, mode)
    return write_case(predictor, case, outputs, out_dir, overwrite=overwrite, case_id=case_id,
                      network_s=network_s, transforms=transforms, refinement=refinement, verbose=verbose)


# -------------------------------------------------------------------------------------------- cohort
SUMMARY_COLUMNS = ("case_id", "patient_id", "prior_timepoint", "new_timepoint", "status", "lncc",
                   "lncc_identity", "folding_percent", "p2_lesions", "new_lesions", "seconds", "message",
                   "warnings", "refine", "lncc_network")


def case_name(pair) -> str:
    """``<patient>_<priorTP>_to_<newTP>`` with characters other than letters, digits, ``-._`` → ``_``."""
    text = f"{pair.patient_id}_{pair.prior.timepoint}_to_{pair.new.timepoint}"
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in text)


def clean_stale_temp(out_dir: str) -> list[str]:
    """Remove ``.tmp-spirs-*`` folders left in ``out_dir`` by a crashed run; return their names."""
    removed = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.startswith(TMP_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _summary_row(pair, cid, status, report=None, seconds=None, message="") -> dict:
    reg = (report or {}).get("registration", {})
    les = (report or {}).get("lesions", {})
    return {"case_id": cid, "patient_id": pair.patient_id, "prior_timepoint": str(pair.prior.timepoint),
            "new_timepoint": str(pair.new.timepoint), "status": status, "lncc": reg.get("lncc"),
            "lncc_identity": reg.get("lncc_identity"), "folding_percent": reg.get("folding_percent"),
            "p2_lesions": les.get("p2_lesions"), "new_lesions": les.get("changes", {}).get("new"),
            "seconds": seconds, "message": message, "warnings": len((report or {}).get("warnings", [])),
            "refine": (reg.get("refinement") or {}).get("mode"),
            "lncc_network": (reg.get("refinement") or {}).get("lncc_before", reg.get("lncc"))}


class _Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled and total > 0, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9) * 60
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {rate:5.1f} cases/min "
                  f"{label[:40]:<40}", end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)


def predict_cohort(predictor: Predictor, manifest, split: str | None, out_dir: str, *,
                   pairing: str = "consecutive", batch_size: int = 1, verbose: bool = True,
                   transforms: str = TRANSFORMS[0], refine: Refine | str | None = None) -> list[dict]:
    """Predict every (prior, new) pair of a manifest split into ``out_dir/<case_name>/``.

    Resumable: a pair whose ``report.json`` exists is skipped; ``.tmp-spirs-*`` folders left by a
    crash are removed first. A prefetch thread reads and preprocesses the next batch while the
    current one runs through the network and is written. A pair with bad input (e.g. a prior
    without a mask) is recorded as ``error`` and the cohort goes on.

    Args:
        predictor: from :func:`load_predictor`.
        manifest: a manifest path or :class:`spirs_tf.manifest.Manifest`.
        split: the split to predict (``None``: all).
        out_dir: cohort folder; also receives ``cohort_summary.csv`` (one row per pair).
        pairing: ``consecutive`` or ``all`` (:func:`spirs_tf.manifest.make_pairs`).
        batch_size: cases per forward pass.
        verbose: progress bar, warnings and the final cases-per-minute line.
        transforms: which transform files to write per case (:data:`TRANSFORMS`).
        refine: test-time refinement per case, as in :func:`predict_case` (no per-iteration
            progress here: the cohort's progress bar counts cases).

    Returns:
        the summary rows (:data:`SUMMARY_COLUMNS`).

    Raises:
        SpirsInputError: bad manifest, unknown split, no pairs.
    """
    import concurrent.futures
    import csv
    import io as _io

    from spirs_tf.manifest import Manifest, load_manifest, make_pairs

    from spirs_tf.refinement import resolve

    refine_fn, refine_mode = resolve(refine, verbose=False)
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    pairs = make_pairs(m, split, pairing)
    if not pairs:
        raise SpirsInputError(f"no (prior, new) pairs in split {split!r}", m.path)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    clean_stale_temp(out_dir)
    rows: dict[str, dict] = {}
    todo = []
    for pair in pairs:
        cid = case_name(pair)
        report_path = os.path.join(out_dir, cid, "report.json")
        if os.path.isfile(report_path):
            with open(report_path, encoding="utf-8") as fh:
                rows[cid] = _summary_row(pair, cid, "skipped", json.load(fh), message="already done")
        else:
            todo.append((pair, cid))
    batches = [todo[i:i + max(1, batch_size)] for i in range(0, len(todo), max(1, batch_size))]

    def load(batch):
        loaded = []
        for pair, cid in batch:
            try:
                if pair.prior.mask is None:
                    raise SpirsInputError("the prior scan has no lesion mask in the manifest", pair.prior.image)
                inputs = read_case_inputs(pair.new.image, pair.prior.image, pair.prior.mask)
                loaded.append((pair, cid, prepare_case(inputs, predictor)))
            except SpirsInputError as exc:
                loaded.append((pair, cid, exc))
        return loaded

    if len(todo) > 1 and hasattr(predictor.run_fn, "use_graph"):
        predictor.run_fn.use_graph()  # trace once and reuse, instead of one eager case first
    progress = _Progress(len(todo), verbose)
    t_start, n_done = time.perf_counter(), 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load, batches[0]) if batches else None
        for k in range(len(batches)):
            loaded = future.result()
            if k + 1 < len(batches):
                future = pool.submit(load, batches[k + 1])
            ready = [item for item in loaded if isinstance(item[2], PreparedCase)]
            outputs, network_s = run_network(predictor, [c for _, _, c in ready]) if ready else ([], 0.0)
            results = dict(zip([cid for _, cid, _ in ready], outputs))
            for pair, cid, case in loaded:
                t0 = time.perf_counter()
                if isinstance(case, SpirsInputError):
                    rows[cid] = _summary_row(pair, cid, "error", message=str(case))
                else:
                    try:
                        outputs, refinement = refine_case(predictor, case, results[cid], refine_fn,
                                                          refine_mode)
                        res = write_case(predictor, case, outputs, os.path.join(out_dir, cid),
                                         overwrite=True, case_id=cid, network_s=network_s / len(ready),
                                         transforms=transforms, refinement=refinement, verbose=verbose)
                        n_done += 1
                        rows[cid] = _summary_row(pair, cid, "done", res.report, time.perf_counter() - t0
                                                 + case.preprocess_s + case.inputs.read_s + network_s / len(ready))
                    except SpirsInputError as exc:
                        rows[cid] = _summary_row(pair, cid, "error", message=str(exc))
                progress.step(cid)
    ordered = [rows[case_name(p)] for p in pairs]
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in ordered])
    atomic_write_text(os.path.join(out_dir, "cohort_summary.csv"), buf.getvalue())
    minutes = (time.perf_counter() - t_start) / 60
    if verbose:
        counts = {s: sum(r["status"] == s for r in ordered) for s in ("done", "skipped", "error")}
        rate = f"{n_done / minutes:.1f} cases/min" if n_done and minutes > 0 else "no case predicted"
        print(f"spirs: {counts['done']} predicted, {counts['skipped']} skipped (already done), "
              f"{counts['error']} failed; {rate}; summary: {os.path.join(out_dir, 'cohort_summary.csv')}",
              file=sys.stderr)
    return ordered
