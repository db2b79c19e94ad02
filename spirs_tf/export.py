"""Export a trained SPIRS model as a TensorFlow SavedModel (``spirs export --run RUN --out DIR``).

The SavedModel holds one ``tf.Module`` with the model's weights and a ``serving_default`` signature:

=====================  ====================  ===================================================
input                  shape, dtype          meaning
=====================  ====================  ===================================================
``new_image``          (None, S, S, S, 1) f32  new scan on its working grid, preprocessed
``prior_image``        (None, S, S, S, 1) f32  prior scan on its own working grid, preprocessed
``prior_mask``         (None, S, S, S, 1) f32  prior lesion mask on the prior's working grid {0, 1}
=====================  ====================  ===================================================

"Preprocessed" = :func:`spirs_tf.preprocess.preprocess_scan` with the stored config (RAS grid of
``data.grid_size`` voxels at ``data.spacing_mm`` centred on the brain, clip at mean ± k·σ, [0, 1],
background 0), strided by ``grid_size / S`` when the model has fewer levels than the config.

=====================  ====================  ===================================================
output                 shape                 meaning
=====================  ====================  ===================================================
``p1_prob``            (B, S, S, S, 1)       P1 probability, σ(clip(logit, ±50))
``p2_prob``            (B, S, S, S, 1)       P2 probability
``affine``             (B, 3, 4)             ``[M | t]`` in voxels, p(y) = M(y − c) + t + c + u(y), c = S/2
``dvf``                (B, S, S, S, 3)       u in voxels, channels in array-axis order
``prior_warped``       (B, S, S, S, 1)       prior image warped onto the new working grid
``prior_mask_warped``  (B, S, S, S, 1)       prior mask warped (soft, trilinear)
=====================  ====================  ===================================================

With a segmenter (:mod:`spirs_tf.fine_seg`; ``spirs export`` keeps the one the model is used with, as
the shipped one with the demo weights), a second signature ``segment`` holds it:

=====================  ======================  =================================================
input / output         shape                   meaning
=====================  ======================  =================================================
``fixed_image``        (None, G, G, G, 1) f32  new scan on the segmenter's grid (k × the working
                                               grid, the same field of view), normalised
``warped_image``       (None, G, G, G, 1) f32  prior placed there by the registration, normalised
``warped_mask``        (None, G, G, G, 1) f32  prior mask placed there (soft for a soft-prior one)
``p1_prob``            (B, G, G, G, 1)         P1 probability, σ(clip(logit, ±50))
``p2_prob``            (B, G, G, G, 1)         P2 probability
=====================  ======================  =================================================

(:func:`spirs_tf.fine_seg_inference.segment_fine` prepares those inputs; ``spirs predict --model DIR``
uses the signature unless ``--segmenter off``.)

The resolved config and a description (levels, input size, source checkpoint, stage) are stored
twice: as the string variable ``spirs_info`` (JSON; read by :func:`spirs_tf.predictor.read_export_info`)
and as the asset file ``assets/spirs_info.json`` for people. :func:`spirs_tf.predictor.load_predictor`
accepts the folder (:func:`spirs_tf.predictor.load_saved_model_predictor`) and rebuilds the
preprocessing from it.

Loading elsewhere::

    m = tf.saved_model.load(DIR)
    out = m.signatures["serving_default"](new_image=x, prior_image=y, prior_mask=z)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from spirs_tf import config as config_lib
from spirs_tf.errors import SpirsInputError
from spirs_tf.predictor import (OUTPUT_NAMES, load_saved_model_predictor,  # noqa: F401 (re-exported)
                                read_export_info, require_tensorflow, serving_outputs)

INFO_FILE = "spirs_info.json"


SEGMENT_INPUTS = ("fixed_image", "warped_image", "warped_mask")


def _module(model, cfg, levels: int, info: dict, asset_path: str, segmenter=None):
    from spirs_tf._compat import tf

    s = cfg.level_grid(levels)

    class SpirsExport(tf.Module):
        def __init__(self):
            super().__init__(name="spirs")
            self.model = model
            self.spirs_info = tf.Variable(json.dumps(info), trainable=False, dtype=tf.string)
            self.info_asset = tf.saved_model.Asset(asset_path)

        @tf.function(input_signature=[tf.TensorSpec((None, s, s, s, 1), tf.float32, name=n)
                                      for n in ("new_image", "prior_image", "prior_mask")])
        def serve(self, new_image, prior_image, prior_mask):
            raw = self.model({"fixed_image": new_image, "moving_image": prior_image,
                              "moving_mask": prior_mask}, training=False)
            return serving_outputs(raw, levels)

    module = SpirsExport()
    if segmenter is not None:
        g = segmenter.cfg.data.grid_size
        module.segmenter = segmenter.model

        @tf.function(input_signature=[tf.TensorSpec((None, g, g, g, 1), tf.float32, name=n) for n in SEGMENT_INPUTS])
        def segment(fixed_image, warped_image, warped_mask):
            raw = module.segmenter({"fixed_image": fixed_image, "warped_image": warped_image,
                                    "warped_mask": warped_mask}, training=False)
            return {f"p{i}_prob": tf.sigmoid(tf.clip_by_value(tf.cast(raw[f"p{i}_logits"], tf.float32),
                                                              -config_lib.LOGIT_CLIP, config_lib.LOGIT_CLIP))
                    for i in (1, 2)}

        module.segment = segment
    return module


def export_saved_model(predictor, out_dir: str, *, overwrite: bool = False) -> str:
    """Write ``predictor``'s Keras model as a SavedModel folder ``out_dir`` (atomic: temporary folder
    beside it, renamed at the end).

    Args:
        predictor: a :class:`spirs_tf.predictor.Predictor` built from a checkpoint (``load_predictor``);
            its ``segmenter``, if any, becomes the ``segment`` signature.
        out_dir: destination folder.
        overwrite: replace an existing folder.

    Returns:
        the absolute output path.

    Raises:
        SpirsInputError: ``out_dir`` exists (without ``overwrite``) or the predictor has no Keras model
            (e.g. it was itself loaded from a SavedModel); Keras does not run on TensorFlow.
    """
    require_tensorflow("spirs export", out_dir)
    from spirs_tf._compat import tf

    model = getattr(predictor.run_fn, "model", None)
    if model is None:
        raise SpirsInputError("this model is not a Keras checkpoint (it is already a SavedModel?)")
    out = os.path.abspath(out_dir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise SpirsInputError("output exists (use --overwrite to replace it)", out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    info = {"config": config_lib.to_dict(predictor.cfg), "levels": predictor.levels,
            "input_size": predictor.size, "source": predictor.info,
            "inputs": ["new_image", "prior_image", "prior_mask"],
            "outputs": list(OUTPUT_NAMES)}
    segmenter = predictor.segmenter
    if segmenter is not None:
        if getattr(segmenter, "model", None) is None:
            raise SpirsInputError("the segmenter has no Keras model (it comes from a SavedModel?)", segmenter.path)
        info["segmenter"] = {"config": config_lib.to_dict(segmenter.cfg),
                             "settings": dataclasses.asdict(segmenter.settings),
                             "source": os.path.abspath(segmenter.path), "inputs": list(SEGMENT_INPUTS),
                             "outputs": ["p1_prob", "p2_prob"]}
    work = tempfile.mkdtemp(prefix=".tmp-spirs-export-", dir=parent)
    try:
        asset = os.path.join(work, INFO_FILE)
        with open(asset, "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2, default=str)
        module = _module(model, predictor.cfg, predictor.levels, json.loads(json.dumps(info, default=str)), asset,
                         segmenter)
        saved = os.path.join(work, "saved_model")
        signatures = {"serving_default": module.serve}
        if segmenter is not None:
            signatures["segment"] = module.segment
        tf.saved_model.save(module, saved, signatures=signatures)
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.replace(saved, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
