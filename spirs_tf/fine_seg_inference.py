"""Inference with a segmenter (:mod:`spirs_tf.fine_seg`): read a segmenter folder or the shipped
checkpoint, check that it fits a registration model's grid, and segment a prepared case on the fine grid
(``spirs predict --segmenter``, :mod:`spirs_tf.inference`)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from spirs_tf import config as config_lib
from spirs_tf.errors import SpirsInputError
from spirs_tf.fine_seg import SegmenterSettings, build_segmenter

__all__ = ["FineSegmenter", "read_segmenter", "load_segmenter", "check_segmenter_fits", "segment_fine",
           "segmenter_files"]

@dataclass
class FineSegmenter:
    """A trained segmenter for inference: its config (fine grid), settings and a
    ``(fixed, warped, warped_mask) → (p1_prob, p2_prob)`` function on ``(B, G, G, G, 1)`` arrays."""

    cfg: config_lib.SpirsConfig
    settings: SegmenterSettings
    run_fn: object
    path: str
    #: its Keras model (``spirs export`` saves it); ``None`` for one loaded from a SavedModel
    model: object | None = None

    @property
    def factor(self) -> int:
        return int(self.settings.factor)

    def __call__(self, fixed: np.ndarray, warped: np.ndarray, warped_mask: np.ndarray):
        return self.run_fn(fixed, warped, warped_mask)


def segmenter_files(path: str) -> tuple[str, str]:
    """(checkpoint, config) of a segmenter folder (``checkpoints/best.npz`` else ``latest.npz``, and
    ``config.json``) or of a checkpoint ``.npz`` (``NAME.json`` beside it, else ``config.json`` beside
    it or one folder up, as the shipped ``weights/demo_segmenter.{npz,json}``)."""
    if os.path.isdir(path):
        ckpt = next((os.path.join(path, "checkpoints", n) for n in ("best.npz", "latest.npz")
                     if os.path.isfile(os.path.join(path, "checkpoints", n))), None)
        if ckpt is None:
            raise SpirsInputError("segmenter folder has no checkpoints/best.npz or latest.npz", path)
        config = os.path.join(path, "config.json")
    elif os.path.isfile(path) and path.endswith(".npz"):
        ckpt, here = path, os.path.dirname(os.path.abspath(path))
        candidates = [path[:-4] + ".json", os.path.join(here, "config.json"),
                      os.path.join(os.path.dirname(here), "config.json")]
        config = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    else:
        raise SpirsInputError("a segmenter must be a segmenter folder or its checkpoint .npz", path)
    if not os.path.isfile(config):
        raise SpirsInputError(f"not a segmenter ({os.path.basename(config)} missing)", path)
    return ckpt, config


def read_segmenter(path: str) -> tuple[str, config_lib.SpirsConfig, SegmenterSettings, dict]:
    """``(checkpoint, config, settings, weights)`` of a segmenter folder or checkpoint ``.npz``
    (:func:`segmenter_files`), without building its model; the settings come from the checkpoint
    (else ``segmenter.json``). Raises :class:`SpirsInputError` naming the path when something is missing
    or does not fit."""
    from spirs_tf.checkpoints import load_checkpoint

    path = os.fspath(path)
    if not os.path.exists(path):
        raise SpirsInputError("segmenter not found", path)
    ckpt, config_path = segmenter_files(path)
    cfg = config_lib.get_config(config_path)
    state, _, meta = load_checkpoint(ckpt)
    raw = meta.get("settings")
    side = os.path.join(os.path.dirname(config_path), "segmenter.json")
    try:
        if raw is None:
            if not os.path.isfile(side):
                raise SpirsInputError("not a segmenter (no settings in its checkpoint, no segmenter.json)", path)
            with open(side, encoding="utf-8") as fh:
                raw = json.load(fh)
        settings = SegmenterSettings(**raw).validate()
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise SpirsInputError(f"segmenter settings: {exc}", path) from None
    return ckpt, cfg, settings, state


def load_segmenter(path: str, overrides: list[str] | None = None) -> FineSegmenter:
    """A segmenter (:func:`read_segmenter`) ready for inference. ``overrides`` (``key=value``, as
    ``--config-set``) change fields of its config that hold no weights, e.g. ``model.p2_gate_size=3``;
    one that changes the weights' shapes is refused (:class:`SpirsInputError` naming the path)."""
    from spirs_tf.networks import load_model_state

    _, cfg, settings, state = read_segmenter(path)
    if overrides:
        try:
            cfg = config_lib.apply_overrides(cfg, overrides).validate()
        except SpirsInputError as exc:
            raise SpirsInputError(f"segmenter config: {exc.problem}", path) from None
    model = build_segmenter(cfg, settings.extra)
    try:
        load_model_state(model, state)
    except SpirsInputError as exc:
        raise SpirsInputError(exc.problem, path) from None

    def run(fixed, warped, warped_mask):
        from spirs_tf._compat import ops

        out = model({"fixed_image": np.asarray(fixed, np.float32), "warped_image": np.asarray(warped, np.float32),
                     "warped_mask": np.asarray(warped_mask, np.float32)}, training=False)
        return tuple(np.asarray(ops.convert_to_numpy(ops.sigmoid(ops.clip(out[k], -config_lib.LOGIT_CLIP,
                                                                            config_lib.LOGIT_CLIP))))
                     for k in ("p1_logits", "p2_logits"))

    return FineSegmenter(cfg, settings, run, os.fspath(path), model)


def check_segmenter_fits(segmenter: FineSegmenter, cfg: config_lib.SpirsConfig) -> None:
    """Raise :class:`SpirsInputError` unless the segmenter's grid is its factor × the model's working grid
    (same field of view), the grid it was trained for."""
    k = segmenter.factor
    want = (cfg.data.grid_size * k, cfg.data.spacing_mm / k)
    have = (segmenter.cfg.data.grid_size, segmenter.cfg.data.spacing_mm)
    if have[0] != want[0] or not math.isclose(have[1], want[1], rel_tol=1e-6):
        raise SpirsInputError(f"the segmenter's grid ({have[0]}³ at {have[1]:g} mm) is not {k}× the model's "
                              f"({cfg.data.grid_size}³ at {cfg.data.spacing_mm:g} mm)", segmenter.path)


def segment_fine(segmenter: FineSegmenter, case, outputs: dict, clip_sigma: float) -> dict:
    """P1 and P2 of one prepared case from the segmenter, on the k-times finer grid of the new scan.

    The new scan is resampled onto the fine grid (fine voxel ``k·i`` = model voxel ``i``) straight from
    its own voxels; the prior image and mask are carried there by the case's registration (``outputs``:
    affine, field and ``dvf_factor``, refined or not) with one resampling, as :mod:`spirs_tf.itk_export`
    writes them on the native grid (the mask soft when the segmenter was trained on a soft prior,
    ``settings.soft_prior``); both images are normalised as in training (:func:`normalize_intensity`).

    Returns:
        ``outputs`` plus ``p1_prob_fine``, ``p2_prob_fine`` ``(kS, kS, kS, 1)``, ``seg_mapping`` (the fine
        grid's :class:`~spirs_tf.preprocess.GridMapping`), ``seg_factor``; ``p1_prob``/``p2_prob`` become
        their every k-th voxel (the model grid, for the metrics computed there).
    """
    from spirs_tf.io import Volume
    from spirs_tf.itk_export import case_transform, resample_to_new
    from spirs_tf.preprocess import GridMapping, normalize_intensity, to_working

    k = segmenter.factor
    s = int(case.new_image.shape[0])
    n = k * s
    new = case.inputs.new
    fine_affine = np.asarray(case.new_mapping.working_affine, np.float64) @ np.diag([1.0 / k] * 3 + [1.0])
    mapping = GridMapping(fine_affine, (n, n, n), np.asarray(new.affine, np.float64), new.shape)
    fixed = normalize_intensity(to_working(new, mapping, order=1), clip_sigma)
    res = resample_to_new(case_transform(case, outputs), Volume(np.zeros((n, n, n), np.uint8), fine_affine),
                          case.inputs.prior, case.inputs.prior_mask, None, native_fields=False,
                          soft_mask=segmenter.settings.soft_prior)
    prior = normalize_intensity(res.prior_warped, clip_sigma)
    mask = np.clip(res.prior_mask_warped.astype(np.float32), 0.0, 1.0)
    p1, p2 = segmenter(fixed[None, ..., None], prior[None, ..., None], mask[None, ..., None])
    p1, p2 = np.asarray(p1, np.float32)[0], np.asarray(p2, np.float32)[0]
    return dict(outputs, p1_prob_fine=p1, p2_prob_fine=p2, seg_mapping=mapping, seg_factor=k,
                p1_prob=p1[::k, ::k, ::k], p2_prob=p2[::k, ::k, ::k])
