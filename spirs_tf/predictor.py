"""The model side of inference: a :class:`Predictor` (Keras model or SavedModel behind one call),
its outputs (:data:`OUTPUT_NAMES`), and loading a checkpoint or a run directory.

Split out of :mod:`spirs_tf.inference`, which re-exports every name here (and holds
:func:`spirs_tf.inference.load_predictor`, the entry point that also knows the shipped demo weights).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from spirs_tf import config as config_lib
from spirs_tf.checkpoints import find_run_checkpoint, load_checkpoint  # noqa: F401 (re-exported)
from spirs_tf.errors import SpirsInputError

OUTPUT_NAMES = ("p1_prob", "p2_prob", "affine", "dvf", "prior_warped", "prior_mask_warped")
LOGIT_CLIP = 50.0

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

    Under TensorFlow the first call runs eagerly: for one case that is faster than tracing a graph
    (measured with cpu-small at 64³: eager 1.3 s against 4.9 s to trace + 0.3 s to run). Later calls
    go through one ``tf.function`` whose signature has a free batch axis, traced once for every batch
    size; ``run_fn.use_graph()`` (called by :func:`predict_cohort` for more than one case) skips the
    eager call. Under JAX every call is one ``jax.jit`` of ``model.stateless_call`` (compiled once per
    batch size), with the variables' current values passed in. All compute the same model.
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


def _checkpoint_predictor(checkpoint: str, config_path: str, stage: int | None = None) -> Predictor:
    import_runtime()
    from spirs_tf import networks

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
