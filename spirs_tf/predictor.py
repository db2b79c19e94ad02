"""Loading a trained SPIRS model: the one way, for inference, evaluation and export.

How do I load a trained model?
------------------------------
* For prediction (NumPy in, the six outputs of :data:`OUTPUT_NAMES` out)::

      from spirs_tf.predictor import load_predictor
      predictor = load_predictor("runs/cpu-small")      # or a checkpoint .npz, a SavedModel folder,
      out = predictor.predict(new, prior, prior_mask)   # or None for the shipped demo weights

  ``spirs predict``/``spirs demo``/``spirs export`` call :func:`load_predictor`;
  :func:`spirs_tf.inference.predict_case` takes its result.
* For evaluation (the raw model outputs of every pyramid level, weights and metadata)::

      from spirs_tf.predictor import load_run
      run = load_run("runs/cpu-small")                  # a run directory or a checkpoint .npz
      model = run.build_model()                          # Keras model, BatchNorm frozen, weights loaded
      outputs = run.predict_fn()(inputs)                 # compiled once per process and kind

  ``experiments/*.py`` and :mod:`spirs_tf.evaluation` use :func:`load_run`.

What names a model: a run directory (the highest ``stageN`` with a checkpoint, its ``best.npz``
else ``latest.npz``, and its ``config.json``; :func:`spirs_tf.checkpoints.find_run_checkpoint`), a
checkpoint ``.npz`` with ``config.json`` beside it or one folder up
(:func:`spirs_tf.checkpoints.checkpoint_config`), a SavedModel folder written by ``spirs export``
(:mod:`spirs_tf.export`; inference only), or ``None``: the shipped demo weights
``spirs_tf/weights/demo.npz`` + ``demo.json``. Every path builds the model with BatchNorm
frozen (inference mode) and loads the weights by variable path.

Keras and TensorFlow are imported only when a model is built (:func:`import_runtime`), so that
:mod:`spirs_tf.evaluation` and the command line start fast.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from spirs_tf import affine_passes
from spirs_tf import config as config_lib
from spirs_tf.checkpoints import (checkpoint_config, find_run_checkpoint,  # noqa: F401 (re-exported)
                                  load_checkpoint, resolve_run)
from spirs_tf.errors import SpirsInputError

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEMO_NAME = "demo"
#: the shipped segmenter (spirs_tf.fine_seg) that the demo weights use, if present: weights/<name>.{npz,json}
SEGMENTER_NAME = "demo_segmenter"

OUTPUT_NAMES = ("p1_prob", "p2_prob", "affine", "dvf", "prior_warped", "prior_mask_warped")
LOGIT_CLIP = config_lib.LOGIT_CLIP

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


def model_grid(cfg: config_lib.SpirsConfig, levels: int) -> tuple[int, int]:
    """``(S, factor)``: the finest input grid of a ``levels``-level model of ``cfg`` and the working-grid
    voxels per model voxel (``cfg.data.grid_size / S``); the one rule of :class:`Predictor` and :class:`Run`."""
    size = cfg.level_grid(levels)
    return size, cfg.data.grid_size // size


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
        affine_passes: network passes at inference (:meth:`predict`); ``None`` = the config's
            ``model.affine_passes`` (``spirs predict --affine-passes`` sets it).
        affine_symmetric: symmetric affine passes (:meth:`predict`); ``None`` = the config's
            ``model.affine_symmetric`` (``spirs predict --affine-symmetric`` sets it).
        segmenter: a :class:`spirs_tf.fine_seg_inference.FineSegmenter` (``spirs predict --segmenter``): P1 and P2
            come from it, on a grid finer than the model's, with the prior placed by the registration
            used (:func:`spirs_tf.inference.segment_case`); ``None`` = the model's own P1 and P2.
    """

    cfg: config_lib.SpirsConfig
    levels: int
    run_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], dict]
    info: dict = field(default_factory=dict)
    p2_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
    affine_passes: int | None = None
    segmenter: object | None = None
    affine_symmetric: bool | None = None

    @property
    def passes(self) -> int:
        """Network passes :meth:`predict` runs by default (``affine_passes``, else the config's)."""
        return int(self.affine_passes if self.affine_passes is not None else self.cfg.model.affine_passes)

    @property
    def symmetric(self) -> bool:
        """Whether :meth:`predict` estimates each pass's affine symmetrically by default."""
        return bool(self.affine_symmetric if self.affine_symmetric is not None else self.cfg.model.affine_symmetric)

    @property
    def size(self) -> int:
        """Finest input grid ``S`` of the model."""
        return model_grid(self.cfg, self.levels)[0]

    @property
    def subsample_factor(self) -> int:
        """Working grid (``cfg.data.grid_size``) voxels per model-input voxel."""
        return model_grid(self.cfg, self.levels)[1]

    def predict(self, new: np.ndarray, prior: np.ndarray, prior_mask: np.ndarray,
                passes: int | None = None, symmetric: bool | None = None) -> dict[str, np.ndarray]:
        """Run the model on a batch ``(B, S, S, S, 1)`` each → NumPy outputs (:data:`OUTPUT_NAMES`).

        ``passes`` (default :attr:`passes`; 1 = the paper's single pass): with k > 1 the
        network registers the prior k times, each pass on the ORIGINAL prior resampled once by the
        affine ``A`` found so far (trilinear, :func:`spirs_tf.geometry.warp_working`); its affine
        ``R`` composes as ``A ← A·R`` (``R`` applied first). The returned field is the last pass's
        ``u``, expressed in the prior's voxels (``M_A·u``), so that ``p(x) = A(x) + u(x)`` as for one
        pass; ``prior_warped``/``prior_mask_warped`` are the original prior and mask resampled once by
        that transform, and P2 is recomputed from them where the model can (else the last pass's).

        ``symmetric`` (default :attr:`symmetric`): each pass's affine is the log-Euclidean mean of the
        network's answer ``F`` for (new, prior) and the inverse of its answer ``B`` for (prior, new)
        (no mask on that side: the registration does not read the masks), which cancels a bias the
        network has in both directions; then one more run on the prior resampled by the affine ``A``
        found gives the field: its own affine ``F'`` and field ``u`` are folded into the returned field
        (``M_A·(F'(x) − x + u(x))``), so that the sample locations are that run's, composed onto ``A``,
        and ``affine`` is ``A``. ``2·passes + 1`` network runs.
        """
        arrays = [np.asarray(a, dtype=np.float32) for a in (new, prior, prior_mask)]
        s = self.size
        for a in arrays:
            if a.ndim != 5 or a.shape[1:] != (s, s, s, 1):
                raise ValueError(f"model inputs must be (B, {s}, {s}, {s}, 1), got {a.shape}")
        passes = self.passes if passes is None else int(passes)
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        run = self._run
        if self.symmetric if symmetric is None else symmetric:
            return affine_passes.symmetric_passes(run, self.p2_fn, *arrays, passes)
        if passes == 1:
            out = run(*arrays)
            return {k: out[k] for k in OUTPUT_NAMES}
        return affine_passes.recursive_passes(run, self.p2_fn, *arrays, passes)

    def _run(self, new, prior, mask) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.run_fn(new, prior, mask).items()}


def keras_predictor(model, cfg: config_lib.SpirsConfig, levels: int, info: dict | None = None) -> Predictor:
    """Wrap a SPIRS Keras model (``training=False``) in a predictor.

    Under TensorFlow the first call runs eagerly: for one case that is faster than tracing a graph
    (measured with cpu-small at 64³: eager 1.3 s against 4.9 s to trace + 0.3 s to run). Later calls
    go through one ``tf.function`` whose signature has a free batch axis, traced once for every batch
    size; ``run_fn.use_graph()`` (called by :func:`spirs_tf.cohort_predict.predict_cohort` for more
    than one case) skips the eager call. Under JAX every call is one ``jax.jit`` of
    ``model.stateless_call`` (compiled once per batch size), with the variables' current values passed
    in. All compute the same model.
    """
    from spirs_tf._compat import BACKEND, ops

    def forward(new, prior, mask):
        raw = model({"fixed_image": new, "moving_image": prior, "moving_mask": mask}, training=False)
        return serving_outputs(raw, levels)

    if BACKEND == "jax":
        run = _jax_run(model, levels)
    else:
        from spirs_tf._compat import tf

        s = cfg.level_grid(levels)
        spec = tf.TensorSpec((None, s, s, s, 1), tf.float32)
        infer = tf.function(forward, input_signature=[spec, spec, spec])
        calls = []

        def run(new, prior, mask):
            fn = infer if calls else forward
            calls.append(1)
            args = [tf.convert_to_tensor(a) for a in (new, prior, mask)]
            return {k: np.asarray(v) for k, v in fn(*args).items()}

        run.use_graph = lambda: calls.append(0)  # a cohort: trace from the first batch on
    run.model = model  # keep the model reachable for export and tests
    p2_parts = []

    def p2(new, warped, warped_mask):
        """P2 from the fixed image and a (replaced) warped prior: the model's own layers, from its
        ``fixed_image`` input and ``warped_image_{levels}``/``warped_mask_{levels}`` outputs."""
        from spirs_tf._compat import keras

        if not p2_parts:
            sub = keras.Model(
                [model.get_layer("fixed_image").output, model.get_layer(f"warped_image_{levels}").output,
                 model.get_layer(f"warped_mask_{levels}").output], model.get_layer("p2_logits").output)
            p2_parts.append(_jax_p2(sub) if BACKEND == "jax" else
                            lambda x: ops.sigmoid(ops.clip(ops.cast(sub(x, training=False), "float32"),
                                                           -LOGIT_CLIP, LOGIT_CLIP)))
        prob = p2_parts[0]([ops.convert_to_tensor(np.asarray(a, np.float32)) for a in (new, warped, warped_mask)])
        return np.asarray(ops.convert_to_numpy(prob))

    return Predictor(cfg, levels, run, dict(info or {}), p2)


def _jax_run(model, levels: int):
    """``run_fn`` under JAX: ``jax.jit`` of ``model.stateless_call(…, training=False)`` → :data:`OUTPUT_NAMES`."""
    import jax

    @jax.jit
    def infer(trainable, non_trainable, new, prior, mask):
        raw, _ = model.stateless_call(trainable, non_trainable,
                                      {"fixed_image": new, "moving_image": prior, "moving_mask": mask},
                                      training=False)
        return serving_outputs(raw, levels)

    def run(new, prior, mask):
        out = infer([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                    new, prior, mask)
        return {k: np.asarray(v) for k, v in out.items()}

    run.use_graph = lambda: None  # always compiled
    return run


def _jax_p2(sub):
    """``[new, warped, warped_mask] → σ(clip(p2_logits))`` of the P2 sub-model, one ``jax.jit``."""
    import jax
    from spirs_tf._compat import ops

    @jax.jit
    def infer(trainable, non_trainable, inputs):
        logits, _ = sub.stateless_call(trainable, non_trainable, inputs, training=False)
        return ops.sigmoid(ops.clip(ops.cast(logits, "float32"), -LOGIT_CLIP, LOGIT_CLIP))

    return lambda inputs: infer([v.value for v in sub.trainable_variables],
                                [v.value for v in sub.non_trainable_variables], inputs)


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


# ------------------------------------------------------------------------------------ a trained run
@dataclass(eq=False)
class Run:
    """A trained run: its config, checkpoint weights and metadata; models are built on demand with
    BatchNorm frozen (inference mode).

    Attributes:
        cfg: the run's config.
        levels: pyramid levels of the checkpoint's model (``S = cfg.level_grid(levels)``).
        state: the model's weights by variable path (:func:`spirs_tf.checkpoints.load_checkpoint`).
        checkpoint, config_path: the files read.
        meta: the checkpoint's metadata (stage, epoch, history, ...).
    """

    cfg: config_lib.SpirsConfig
    levels: int
    state: dict
    checkpoint: str
    config_path: str
    meta: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def stage(self) -> int | None:
        return self.meta.get("stage")

    @property
    def size(self) -> int:
        """Finest input grid ``S`` of the model."""
        return model_grid(self.cfg, self.levels)[0]

    @property
    def factor(self) -> int:
        """Working-grid voxels per model voxel at the finest level."""
        return model_grid(self.cfg, self.levels)[1]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the model's finest grid."""
        s = float(self.cfg.data.spacing_mm) * self.factor
        return (s, s, s)

    def describe(self) -> dict:
        return {"checkpoint": os.path.abspath(self.checkpoint), "config": self.cfg.name,
                "stage": self.meta.get("stage"), "epoch": self.meta.get("epoch"), "levels": self.levels,
                "grid": self.size, "spacing_mm": self.spacing[0]}

    def build_model(self, kind: str = "pyramid"):
        """A new Keras model with this run's weights: the full pyramid (``"pyramid"``,
        :func:`spirs_tf.networks.build_spirs`) or the finest level alone (``"finest-only"``,
        :func:`spirs_tf.networks.build_finest_only`, which loads the weights it has).

        Raises:
            SpirsInputError: the checkpoint's weights do not fit the model its config builds.
            ValueError: an unknown ``kind``.
        """
        import_runtime()
        from spirs_tf import networks

        if kind == "pyramid":
            model = networks.build_spirs(self.cfg, self.levels, bn_trainable=False)
        elif kind == "finest-only":
            model = networks.build_finest_only(self.cfg, self.levels)
        else:
            raise ValueError(f"unknown model kind {kind!r}")
        own = {v.path for v in model.weights}
        try:
            networks.load_model_state(model, {k: v for k, v in self.state.items() if k in own or kind == "pyramid"})
        except SpirsInputError as exc:
            raise SpirsInputError(f"checkpoint does not fit its config {self.config_path}: {exc.problem}",
                                  self.checkpoint) from None
        return model

    def predict_fn(self, kind: str = "pyramid") -> Callable[[dict], dict]:
        """``inputs → outputs`` (NumPy dicts, every output of the model) of :meth:`build_model`'s
        model, compiled once per kind and cached with the run."""
        if kind not in self._cache:
            from spirs_tf._compat import tf

            model = self.build_model(kind)
            compiled = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

            def run(inputs: dict) -> dict:
                out = compiled({k: tf.constant(v) for k, v in inputs.items()})
                return {k: np.asarray(v) for k, v in out.items()}

            run.model = model
            self._cache[kind] = run
        return self._cache[kind]

    def predictor(self) -> Predictor:
        """A :class:`Predictor` of a new pyramid model with this run's weights (:func:`keras_predictor`)."""
        info = {"kind": "checkpoint", "checkpoint": os.path.abspath(self.checkpoint),
                "config_file": os.path.abspath(self.config_path), "config": self.cfg.name, "stage": self.stage,
                "levels": self.levels, "epoch": self.meta.get("epoch")}
        return keras_predictor(self.build_model(), self.cfg, self.levels, info)


_RUNS: dict[tuple, Run] = {}


def open_run(checkpoint: str, config_path: str, stage: int | None = None) -> Run:
    """The :class:`Run` of a checkpoint file and its config file.

    Runs are cached per process, keyed by both files' path, size and modification time, so several
    experiments in one process read each checkpoint once and build and trace each model once.
    The levels are the checkpoint's (its metadata), else those of its stage (``stage`` when the
    metadata has none), else the config's ``model.num_levels``.

    Raises:
        SpirsInputError: unreadable checkpoint or config, levels outside ``1..model.num_levels``.
    """
    key = tuple((os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in (checkpoint, config_path))
    if key in _RUNS:
        return _RUNS[key]
    cfg = config_lib.get_config(config_path)
    state, _, meta = load_checkpoint(checkpoint)
    stage = meta.get("stage", stage)
    if stage is not None:
        meta.setdefault("stage", stage)
    levels = int(meta.get("levels") or (cfg.train.stages[stage - 1].levels if stage else cfg.model.num_levels))
    if not 1 <= levels <= cfg.model.num_levels:
        raise SpirsInputError(f"checkpoint has levels={levels}, outside 1..{cfg.model.num_levels}", checkpoint)
    _RUNS[key] = Run(cfg, levels, state, checkpoint, config_path, meta)
    return _RUNS[key]


def load_run(path: str | os.PathLike) -> Run:
    """A :class:`Run` from a run directory (highest stage, ``best.npz`` else ``latest.npz``) or a
    checkpoint ``.npz`` with ``config.json`` beside it or one folder up (cached: :func:`open_run`).

    Raises:
        SpirsInputError: missing path, no checkpoint/config, unreadable checkpoint.
    """
    return open_run(*resolve_run(path))


# ------------------------------------------------------------------------------------ the entry point
def load_predictor(model: str | os.PathLike | None) -> Predictor:
    """A :class:`Predictor` from a run directory, a checkpoint ``.npz``, a SavedModel or the demo weights.

    Args:
        model: a run directory (highest stage; ``best.npz`` else ``latest.npz``; its ``config.json``),
            a checkpoint ``.npz`` (``config.json`` beside it or one folder up), a SavedModel folder
            written by ``spirs export``, or ``None`` for the shipped demo weights
            (``spirs_tf/weights/demo.npz`` + ``demo.json``, with the shipped segmenter
            ``demo_segmenter.npz`` + ``.json`` when there is one).

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
        predictor = open_run(ckpt, cfg).predictor()
        predictor.info["kind"] = "demo weights"
        shipped = os.path.join(WEIGHTS_DIR, f"{SEGMENTER_NAME}.npz")
        if os.path.isfile(shipped):  # P1/P2 on the finer grid (spirs_tf.fine_seg); spirs predict --segmenter off
            from spirs_tf.fine_seg_inference import check_segmenter_fits, load_segmenter

            predictor.segmenter = load_segmenter(shipped)
            check_segmenter_fits(predictor.segmenter, predictor.cfg)
        return predictor
    path = os.fspath(model)
    if not os.path.exists(path):
        raise SpirsInputError("model not found", path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return load_saved_model_predictor(path)
        return open_run(*find_run_checkpoint(path)).predictor()
    if not path.endswith(".npz"):
        raise SpirsInputError("a model must be a run directory, a checkpoint .npz or a SavedModel folder", path)
    return open_run(path, checkpoint_config(path)).predictor()


# ---------------------------------------------------------------------------------------- SavedModel
def require_tensorflow(what: str, path: str | None = None) -> None:
    """SavedModels are TensorFlow's format: refuse under another Keras backend with one clear line.

    Raises:
        SpirsInputError: ``KERAS_BACKEND`` is not ``tensorflow``.
    """
    from spirs_tf._compat import BACKEND

    if BACKEND != "tensorflow":
        raise SpirsInputError(f"{what} needs TensorFlow (a SavedModel is TensorFlow's format), but Keras runs on "
                              f"{BACKEND}; run it with KERAS_BACKEND=tensorflow, or use a checkpoint (.npz) or "
                              "run directory", path)


def read_export_info(loaded) -> dict:
    """The description dict stored by :func:`spirs_tf.export.export_saved_model` in a loaded SavedModel.

    Raises:
        SpirsInputError: not a spirs-tf export.
    """
    var = getattr(loaded, "spirs_info", None)
    if var is None:
        raise SpirsInputError("SavedModel was not written by spirs export (no spirs_info)")
    return json.loads(var.numpy().decode("utf-8"))


def load_saved_model_predictor(path: str) -> Predictor:
    """A :class:`Predictor` running a SavedModel's ``serving_default`` (no ``p2_fn``: a SavedModel
    exposes only the whole model).

    Raises:
        SpirsInputError: the folder cannot be loaded or is not a spirs-tf export; Keras does not run
            on TensorFlow.
    """
    require_tensorflow("loading a SavedModel", path)
    import_runtime()
    from spirs_tf._compat import tf

    try:
        loaded = tf.saved_model.load(path)
    except Exception as exc:  # TF raises many types for a broken SavedModel
        raise SpirsInputError(f"cannot load SavedModel ({type(exc).__name__}: {exc})", path) from None
    try:
        info = read_export_info(loaded)
    except SpirsInputError as exc:
        raise SpirsInputError(exc.problem, path) from None
    cfg = config_lib.from_dict(info["config"])
    serve = loaded.signatures["serving_default"]

    def run(new, prior, mask):
        out = serve(new_image=tf.constant(new), prior_image=tf.constant(prior), prior_mask=tf.constant(mask))
        return {k: np.asarray(out[k]) for k in OUTPUT_NAMES}

    run.loaded = loaded  # keep the restored objects alive
    source = info.get("source", {})
    predictor = Predictor(cfg, int(info["levels"]), run,
                          {"kind": "SavedModel", "path": os.path.abspath(path), "config": cfg.name,
                           "stage": source.get("stage"), "checkpoint": source.get("checkpoint")})
    if "segmenter" in info:
        predictor.segmenter = _saved_segmenter(loaded, info["segmenter"], path)
    return predictor


def _saved_segmenter(loaded, info: dict, path: str):
    """The :class:`~spirs_tf.fine_seg_inference.FineSegmenter` of a SavedModel's ``segment`` signature."""
    from spirs_tf._compat import tf
    from spirs_tf.fine_seg import SegmenterSettings
    from spirs_tf.fine_seg_inference import FineSegmenter

    if "segment" not in loaded.signatures:
        raise SpirsInputError("SavedModel describes a segmenter but has no 'segment' signature", path)
    segment = loaded.signatures["segment"]
    try:
        settings = SegmenterSettings(**info["settings"]).validate()
    except (TypeError, ValueError) as exc:
        raise SpirsInputError(f"segmenter settings: {exc}", path) from None

    def run(fixed, warped, warped_mask):
        out = segment(**{k: tf.constant(np.asarray(v, np.float32)) for k, v in
                         zip(("fixed_image", "warped_image", "warped_mask"), (fixed, warped, warped_mask))})
        return np.asarray(out["p1_prob"]), np.asarray(out["p2_prob"])

    return FineSegmenter(config_lib.from_dict(info["config"]), settings, run, os.path.abspath(path))
