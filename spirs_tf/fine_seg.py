"""P1 and P2 on a grid finer than the registration's (issue 16; beyond the paper).

The paper segments on the registration's finest grid (128³ at 1.5 mm). This CPU cannot train the whole
pyramid there, and at the 3 mm grid of the CPU configs a micro lesion (< 25 mm³) is under one voxel.
The segmentation path alone — the segmentation opening convolution, the shared encoder, P1's decoder
and P2's fusion block — is fully convolutional and cheap at a k-times finer grid when the encoder pools
``log2(k)`` more times before its first block (``extra``, :class:`spirs_tf.blocks.SharedEncoder`): every
block from SE1 on then runs on the same grid as in the registration model. The *segmenter* is that path,
with its own weights, started from a trained SPIRS checkpoint (same layer names, so the weights load by
variable path) and trained on its own:

* :func:`segmenter_config`: the registration run's config with the working grid k times finer
  (``grid_size·k`` voxels at ``spacing_mm/k``, the same field of view; fine voxel ``k·i`` = working voxel
  ``i``, the convention of the refined fields).
* :func:`build_segmenter`: ``[fixed_image, warped_image, warped_mask] → {p1_logits, p2_logits}``, any
  spatial size divisible by ``2**(3 + extra)``.
* :func:`segmenter_sample`: one training sample from a pre-aligned pair on the fine grid. All four
  volumes share one random flip / affine (:mod:`spirs_tf.augment`'s ranges) and gamma; the prior alone
  gets a small extra rigid move (``prior_jitter_voxels``), as a good registration leaves it; the sample
  is a cube cut around a lesion of either mask with probability ``lesion_probability`` (the authors'
  loader sampled lesion-centred patches), else anywhere in the brain. ``lesion_sampling = "lesion"``
  centres every lesion alike (else every lesion voxel alike: large lesions win), and
  ``lesion_balance_mm3`` > 0 makes the BCE lesion-balanced: a lesion smaller than that volume weighs as
  much as one of that volume (:func:`lesion_balance`; not the authors'), and ``prior_lesion_scale`` > 1
  weighs the lesions the prior marks more in P2's BCE (:func:`prior_lesion_scale`). All are off by default.
* :class:`SegmenterTrainer`: P1 (opening conv, encoder, P1 decoder) and P2 (the fusion block) with their
  own optimisers and losses (:func:`spirs_tf.losses.segmentation_loss`, as in the isolated mode of the
  pyramid), resumable from ``latest.npz``.

A segmenter folder holds ``config.json``, ``segmenter.json`` (training settings) and
``checkpoints/{latest,best}.npz``; :func:`spirs_tf.fine_seg_inference.load_segmenter` reads it for
``spirs predict --segmenter`` (:mod:`spirs_tf.inference`), which places the prior on the fine grid with
the registration it used (refined by default) and writes P1 and P2 from the segmenter.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from spirs_tf import augment, geometry, metrics
from spirs_tf import config as config_lib
from spirs_tf.atomic import atomic_write_text
from spirs_tf.config_checks import is_positive_int
from spirs_tf.errors import SpirsInputError

__all__ = ["SegmenterSettings", "SegmenterTrainer", "build_segmenter", "fine_extra", "segmenter_config",
           "segmenter_sample", "pyramid_segmentation_state", "lesion_balance", "prior_lesion_scale"]

SEGMENTER_INPUTS = ("fixed_image", "warped_image", "warped_mask")
#: module prefixes of the segmentation path (:data:`spirs_tf.networks.MODULE_PREFIXES`)
SEGMENTER_PREFIXES = ("seg_open", "enc", "seg", "fuse")


@dataclass
class SegmenterSettings:
    """How a segmenter is trained (saved as ``segmenter.json`` beside its ``config.json``)."""

    factor: int = 2  #: fine grid = registration working grid × factor
    extra: int = 2  #: encoder poolings before/after SE1 (registration levels − 1 + log2(factor))
    crop: int = 64  #: training cube (voxels of the fine grid); 0 = the whole grid
    lesion_probability: float = 0.7  #: a cube centred on a lesion voxel of either mask
    #: how that lesion voxel is drawn: ``voxel`` (every lesion voxel alike: large lesions dominate) or
    #: ``lesion`` (every lesion alike, then a voxel of it: micro lesions are centred as often as large ones)
    lesion_sampling: str = "voxel"
    #: > 0: lesion-balanced BCE (not the authors'). The positive weight of a fixed-mask lesion of volume V
    #: (its connected component in the cube) is multiplied by ``max(1, lesion_balance_mm3 / V)``, so every
    #: lesion smaller than that weighs like one of that volume; 0: off (every positive voxel alike)
    lesion_balance_mm3: float = 0.0
    #: P2's BCE only (not the authors'): the positive weight of a fixed-mask lesion that the prior marks
    #: (one the prior mask overlaps in the pair's own alignment, before the jitter) × this; 1: off. P2 is
    #: what carries a prior-marked lesion forward, so its loss can weigh those the most
    prior_lesion_scale: float = 1.0
    #: the prior mask as P2 sees it: False: trilinear, then ``>= 0.5`` (a lesion of a few voxels moved by
    #: part of a voxel can vanish); True (not the authors' segmenter): trilinear without the threshold, so
    #: every prior lesion reaches P2, a small one as a faint blob (the pyramid's own warped mask is soft)
    soft_prior: bool = False
    prior_jitter_voxels: float = 1.0  #: the prior's extra shift, U(±v) fine voxels per axis
    prior_jitter_degrees: float = 2.0  #: and rotation, U(±d) per axis
    image_order: int = 1  #: 1: linear (as the prior is placed at inference); 3: cubic
    batch_size: int = 2
    steps_per_epoch: int = 50
    epochs: int = 20
    validation_samples: int = 16
    seed: int = 1234
    learning_rate_p1: float = 5e-3
    learning_rate_p2: float = 2e-2
    init_from: str | None = None  #: the SPIRS checkpoint the weights started from

    def validate(self) -> "SegmenterSettings":
        problems = []
        if self.factor not in (1, 2, 4):
            problems.append(f"factor must be 1, 2 or 4, got {self.factor}")
        if not 0 <= self.extra <= 2:
            problems.append(f"extra must be 0..2, got {self.extra}")
        if self.crop < 0 or (self.crop and self.crop % 2 ** (3 + self.extra)):
            problems.append(f"crop must be 0 or a multiple of {2 ** (3 + self.extra)}, got {self.crop}")
        if not 0.0 <= self.lesion_probability <= 1.0:
            problems.append(f"lesion_probability must be in [0, 1], got {self.lesion_probability}")
        if self.lesion_sampling not in ("voxel", "lesion"):
            problems.append(f"lesion_sampling must be 'voxel' or 'lesion', got {self.lesion_sampling!r}")
        if not self.lesion_balance_mm3 >= 0:
            problems.append(f"lesion_balance_mm3 must be >= 0, got {self.lesion_balance_mm3}")
        if not isinstance(self.soft_prior, bool):
            problems.append(f"soft_prior must be true or false, got {self.soft_prior!r}")
        if not 1.0 <= self.prior_lesion_scale < math.inf:
            problems.append(f"prior_lesion_scale must be >= 1, got {self.prior_lesion_scale}")
        if self.prior_jitter_voxels < 0 or self.prior_jitter_degrees < 0:
            problems.append("prior jitter must be >= 0")
        if self.image_order not in (1, 3):
            problems.append(f"image_order must be 1 or 3, got {self.image_order}")
        for name in ("batch_size", "steps_per_epoch", "epochs", "validation_samples"):
            value = getattr(self, name)
            if not is_positive_int(value):
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("learning_rate_p1", "learning_rate_p2"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def fine_extra(cfg: config_lib.SpirsConfig, factor: int) -> int:
    """Encoder poolings that put SE1 of a ``factor``-times finer grid where the pyramid's finest level has it."""
    extra = cfg.model.num_levels - 1 + int(round(math.log2(factor)))
    if 2 ** int(round(math.log2(factor))) != factor or not 0 <= extra <= 2:
        raise ValueError(f"a {factor}x finer grid for a {cfg.model.num_levels}-level model needs "
                         f"{extra} encoder poolings (at most 2)")
    return extra


def segmenter_config(reg_cfg: config_lib.SpirsConfig, factor: int) -> config_lib.SpirsConfig:
    """The registration run's config on a ``factor``-times finer working grid (same field of view)."""
    cfg = dataclasses.replace(reg_cfg, data=dataclasses.replace(reg_cfg.data))
    cfg.data.grid_size = reg_cfg.data.grid_size * factor
    cfg.data.spacing_mm = reg_cfg.data.spacing_mm / factor
    cfg.name = f"{reg_cfg.name}-seg{factor}x"
    return cfg


def build_segmenter(cfg: config_lib.SpirsConfig, extra: int):
    """The segmentation path of :func:`spirs_tf.networks.build_spirs` alone, on any grid.

    ``P1 = F_S(f)`` with the encoder pooling ``extra`` times; ``P2 = fusion([f, σ(P1), I_w, blur(S_w)])``.
    Layer names are the pyramid's, so :func:`pyramid_segmentation_state` of a SPIRS checkpoint loads.

    Returns:
        ``keras.Model``: inputs :data:`SEGMENTER_INPUTS`, each ``(B, D, H, W, 1)`` float32 with D, H, W
        divisible by ``2**(3 + extra)``; outputs ``{"p1_logits", "p2_logits"}``.
    """
    from spirs_tf._compat import keras
    from spirs_tf.blocks import FusionBlock, SharedEncoder, opening_conv, segmentation_decoder

    m = cfg.model
    encoder = SharedEncoder(m, True)
    seg_open = opening_conv("seg_open", m.opening_filters, m.segmentation_kernel)
    seg_dec = segmentation_decoder(m, True)
    fusion = FusionBlock(m, True)
    inputs = {k: keras.Input((None, None, None, 1), name=k, dtype="float32") for k in SEGMENTER_INPUTS}
    p1 = seg_dec(encoder(seg_open(inputs["fixed_image"]), extra=extra), tag="fine")
    p1 = keras.layers.Activation("linear", dtype="float32", name="p1_logits")(p1)
    p2 = fusion(inputs["fixed_image"], p1, inputs["warped_image"], inputs["warped_mask"])
    p2 = keras.layers.Activation("linear", dtype="float32", name="p2_logits")(p2)
    return keras.Model(inputs, {"p1_logits": p1, "p2_logits": p2}, name="spirs_segmenter")


def pyramid_segmentation_state(state: dict, model) -> dict:
    """The entries of a SPIRS model state (:func:`spirs_tf.networks.model_state`) that ``model`` (a
    segmenter) has; raises :class:`SpirsInputError` if any segmenter weight is missing or mis-shaped."""
    from spirs_tf.networks import _weights_by_path

    own = _weights_by_path(model)
    missing = sorted(p for p in own if p not in state)
    bad = sorted(p for p in own if p in state and tuple(np.shape(state[p])) != tuple(own[p].shape))
    if missing or bad:
        raise SpirsInputError(f"the checkpoint does not hold this segmenter's weights (missing {missing[:4]}"
                              f"{'…' if len(missing) > 4 else ''}, shapes differ {bad[:4]})")
    return {p: state[p] for p in own}


# ------------------------------------------------------------------------------------------- data
def _window(matrix: np.ndarray, grid: int, origin: np.ndarray, size: int) -> np.ndarray:
    """Source coordinates ``M(y − c) + t + c`` (c = grid/2) of the output voxels ``y = origin + i``,
    ``i ∈ {0 … size−1}³`` → (3, size, size, size): :func:`spirs_tf.augment.strided_positions` on a
    ``size`` grid, its translation moved so that its centre ``size/2`` stands for ``origin + size/2``."""
    m = np.array(matrix, dtype=np.float64)
    m[:, 3] += m[:, :3] @ (np.asarray(origin, np.float64) + size / 2.0 - grid / 2.0) + (grid - size) / 2.0
    return augment.strided_positions(m, size, size)


def _small_rigid(rng: np.random.Generator, voxels: float, degrees: float) -> np.ndarray:
    params = geometry.IDENTITY_PARAMS.astype(np.float64)
    params[0:3] = rng.uniform(-voxels, voxels, 3)
    params[3:6] = np.deg2rad(rng.uniform(-degrees, degrees, 3))
    return geometry.params_to_matrix(params)


def segmenter_sample(fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray, moving_mask: np.ndarray,
                     rng: np.random.Generator, aug_cfg, settings: SegmenterSettings,
                     voxel_mm3: float = 1.0) -> dict[str, np.ndarray]:
    """One training sample (module docstring) from a pre-aligned pair on the fine grid (G³ each).

    With ``aug_cfg.enabled = False`` there is no flip, affine or gamma: only the prior's jitter and the cube.
    ``voxel_mm3``: the volume of a fine voxel (``settings.lesion_balance_mm3`` is in mm³).

    Returns:
        ``fixed_image``, ``warped_image``, ``warped_mask``, ``fixed_mask``: float32 (C, C, C) with
        C = ``settings.crop`` (G when 0). ``warped_*`` is the prior placed as a good registration places
        it: the pair's common affine composed with a small rigid jitter. With
        ``settings.lesion_balance_mm3 > 0`` also ``positive_scale``: per voxel ``max(1, ref / V)`` inside
        a fixed-mask lesion of V mm³ (its 26-connected component in the cube), 1 elsewhere. With
        ``settings.prior_lesion_scale != 1`` also ``p2_positive_scale`` (P2's): ``positive_scale`` (or 1)
        × :func:`prior_lesion_scale`.
    """
    grid = int(np.shape(fixed)[0])
    size = settings.crop or grid
    if size > grid:
        raise ValueError(f"crop {size} exceeds the grid {grid}")
    flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < aug_cfg.flip_probability)) \
        if aug_cfg.enabled else ()
    matrix = augment.random_affine_params(rng, aug_cfg, grid) if aug_cfg.enabled else geometry.IDENTITY_PARAMS
    matrix = geometry.params_to_matrix(np.asarray(matrix, np.float64))
    jitter = _small_rigid(rng, settings.prior_jitter_voxels, settings.prior_jitter_degrees)
    prior_matrix = (geometry.to_homogeneous(matrix) @ geometry.to_homogeneous(jitter))[:3]

    def flip(x):
        return np.flip(np.asarray(x), axis=flips) if flips else np.asarray(x)

    volumes = [flip(v) for v in (fixed, moving, fixed_mask, moving_mask)]
    origin = np.zeros(3)
    centre_on_lesion = rng.random() < settings.lesion_probability
    pick = rng.random()
    offset = rng.uniform(-0.25, 0.25, 3) * size
    if size < grid:
        union = (volumes[2] > 0.5) | (volumes[3] > 0.5)
        lesions = np.argwhere(union)
        brain = None
        if centre_on_lesion and len(lesions):
            if settings.lesion_sampling == "lesion":  # every lesion alike, then a voxel of it
                labels, _ = metrics.label_lesions(union)
                ids = labels[tuple(lesions.T)]
                odds = np.cumsum(1.0 / np.bincount(ids)[ids])
                target = lesions[min(int(np.searchsorted(odds, pick * odds[-1])), len(lesions) - 1)]
            else:
                target = lesions[int(pick * len(lesions))]
            target = target.astype(np.float64)
        else:
            brain = np.argwhere(volumes[0][::4, ::4, ::4] > 0) * 4
            target = (brain[int(pick * len(brain))].astype(np.float64) if len(brain)
                      else np.full(3, grid / 2.0))
        # output voxel y whose source is the target: y = M⁻¹(x − t − c) + c; the cube is centred near it
        inv = geometry.invert_affine(matrix)
        y = inv[:, :3] @ (target - grid / 2.0) + inv[:, 3] + grid / 2.0
        origin = np.clip(np.round(y - size / 2.0 + (offset if brain is None else 0.0)), 0, grid - size)
    out = {}
    at = _window(matrix, grid, origin, size)
    out["fixed_image"], out["fixed_mask"] = augment.resample_moving(volumes[0], volumes[2], at,
                                                                    settings.image_order, 0)
    at_prior = _window(prior_matrix, grid, origin, size)
    out["warped_image"] = augment.resample_image(volumes[1], at_prior, settings.image_order)
    out["warped_mask"] = augment.resample_mask(volumes[3], at_prior, 1, settings.soft_prior)
    if settings.lesion_balance_mm3 > 0:
        out["positive_scale"] = lesion_balance(out["fixed_mask"], settings.lesion_balance_mm3, voxel_mm3)
    if settings.prior_lesion_scale != 1.0:
        marked = augment.resample_mask(volumes[3], at, 1, settings.soft_prior) > 0  # in the pair's own alignment
        scale = prior_lesion_scale(out["fixed_mask"], marked, settings.prior_lesion_scale)
        out["p2_positive_scale"] = scale * out.get("positive_scale", 1.0)
    if aug_cfg.enabled:
        out["fixed_image"] = augment.random_gamma(out["fixed_image"], rng, aug_cfg)
        out["warped_image"] = augment.random_gamma(out["warped_image"], rng, aug_cfg)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def lesion_balance(mask: np.ndarray, reference_mm3: float, voxel_mm3: float) -> np.ndarray:
    """Per-voxel scale of the BCE's positive weight: ``max(1, reference_mm3 / V)`` inside a lesion of
    V mm³ (a 26-connected component of ``mask > 0.5``), 1 elsewhere (float32, the mask's shape)."""
    labels, _ = metrics.label_lesions(np.asarray(mask) > 0.5)
    volume = np.bincount(labels.ravel())[1:] * float(voxel_mm3)  # empty without lesions: all ones
    per_lesion = np.concatenate([[1.0], np.maximum(1.0, float(reference_mm3) / volume)])
    return per_lesion[labels].astype(np.float32)


def prior_lesion_scale(mask: np.ndarray, prior_mask: np.ndarray, scale: float) -> np.ndarray:
    """Per-voxel factor: ``scale`` inside a lesion of ``mask`` (a 26-connected component of ``mask > 0.5``)
    that ``prior_mask > 0.5`` overlaps, 1 elsewhere (float32, the mask's shape)."""
    labels, count = metrics.label_lesions(np.asarray(mask) > 0.5)
    marked = np.zeros(count + 1, bool)
    marked[np.unique(labels[np.asarray(prior_mask) > 0.5])] = True
    marked[0] = False
    return np.where(marked[labels], np.float32(scale), np.float32(1.0)).astype(np.float32)


# ---------------------------------------------------------------------------------------- training
#: settings a run may change when it resumes (more epochs; the same weights found by another path)
RESUMABLE_CHANGES = ("epochs", "init_from")


class SegmenterTrainer:
    """Train a segmenter (module docstring) on a :class:`spirs_tf.data.PairSource` at the fine grid.

    Two optimisers (:func:`spirs_tf.optim.make_optimizer`, cosine over all epochs): P1's updates the
    opening conv, the encoder and P1's decoder with P1's loss; P2's updates the fusion block with P2's
    loss (P1's logits enter P2 without a gradient into P1). A learning rate of 0 freezes that part
    (no optimiser, no weight decay). ``out_dir/checkpoints/latest.npz`` after every
    epoch (model, optimisers, epoch); ``best.npz`` by the validation P2 loss. A run resumes from
    ``latest.npz``.
    """

    def __init__(self, cfg: config_lib.SpirsConfig, settings: SegmenterSettings, train_source, val_source,
                 out_dir: str, init_state: dict | None = None, log=print):
        from spirs_tf import optim

        self.cfg, self.settings = cfg, settings.validate()
        self.train_source, self.val_source = train_source, val_source
        self.out_dir, self.log = out_dir, log
        self.model = build_segmenter(cfg, settings.extra)
        if init_state is not None:
            from spirs_tf.networks import load_model_state

            load_model_state(self.model, pyramid_segmentation_state(init_state, self.model))
        fuse = [v for v in self.model.trainable_variables if v.path.startswith("fuse_")]
        self.var_lists = {"segmentation_p1": [v for v in self.model.trainable_variables
                                             if not v.path.startswith("fuse_")],
                          "segmentation_p2": fuse}
        self.optimizers = {}
        for name, lr in (("segmentation_p1", settings.learning_rate_p1),
                         ("segmentation_p2", settings.learning_rate_p2)):
            if lr == 0:  # frozen (its weight decay too): e.g. P2 trained alone on a trained P1
                continue
            base = getattr(cfg.optim, name)
            opt_cfg = dataclasses.replace(base, learning_rate=lr, learning_rate_min=lr / 100.0,
                                          cycle_epochs=settings.epochs, warmup_epochs=0, warm_restarts=False)
            self.optimizers[name] = optim.make_optimizer(opt_cfg, settings.steps_per_epoch, name)
            self.optimizers[name].build(self.var_lists[name])
        self.epoch = 0
        self.best = math.inf
        self.history: list[dict] = []
        self._step = None

    # ---------------------------------------------------------------- losses
    def losses(self, batch: dict, training: bool) -> dict:
        from spirs_tf import losses as losses_lib
        from spirs_tf._compat import ops

        out = self.model({k: batch[k] for k in SEGMENTER_INPUTS}, training=training)
        lc = self.cfg.loss
        p1_w = lc.segmentation_bce_positive_weight or lc.bce_positive_weight
        p2_w = lc.p2_bce_positive_weight or p1_w
        target, scale = batch["fixed_mask"], batch.get("positive_scale")
        p2_scale = batch.get("p2_positive_scale", scale)
        return {"segmentation_p1": ops.mean(losses_lib.segmentation_loss(target, out["p1_logits"], p1_w,
                                                                         lc.dice_smooth, scale)),
                "segmentation_p2": ops.mean(losses_lib.segmentation_loss(target, out["p2_logits"], p2_w,
                                                                         lc.dice_smooth, p2_scale))}

    def _train_step_fn(self):
        import tensorflow as tf

        def step(batch):
            with tf.GradientTape(persistent=True) as tape:
                terms = self.losses(batch, training=True)
            for name, opt in self.optimizers.items():
                grads = tape.gradient(terms[name], self.var_lists[name])
                opt.apply(grads, self.var_lists[name])
            del tape
            return terms

        return tf.function(step)

    def train_step(self, batch: dict) -> dict:
        if self._step is None:
            self._step = self._train_step_fn()
        return {k: float(v) for k, v in self._step(batch).items()}

    # ---------------------------------------------------------------- data
    def _batch(self, source, rows: list[int], stream: int, epoch: int) -> dict:
        samples = []
        for pos, row in enumerate(rows):
            rng = np.random.default_rng([self.settings.seed, stream, epoch, pos, row])
            pair = source[row]
            samples.append(segmenter_sample(pair.fixed_image, pair.moving_image, pair.fixed_mask,
                                            pair.moving_mask, rng, self.cfg.augment, self.settings,
                                            self.cfg.data.spacing_mm ** 3))
        return {k: np.stack([s[k] for s in samples])[..., None] for k in samples[0]}

    def batches(self, epoch: int, workers: int = 2):
        """The epoch's training batches, loaded ahead in a thread pool."""
        import concurrent.futures

        s = self.settings
        rng = np.random.default_rng([s.seed, 2, epoch])
        n = s.steps_per_epoch * s.batch_size
        pairs = len(self.train_source)
        order = np.concatenate([rng.permutation(pairs) for _ in range(n // pairs + 1)])
        plan = [order[i * s.batch_size:(i + 1) * s.batch_size].tolist() for i in range(s.steps_per_epoch)]
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [pool.submit(self._batch, self.train_source, rows, 0, epoch * 100003 + i)
                       for i, rows in enumerate(plan[:workers + 1])]
            for i in range(len(plan)):
                batch = futures[i].result()
                if i + workers + 1 < len(plan):
                    j = i + workers + 1
                    futures.append(pool.submit(self._batch, self.train_source, plan[j], 0, epoch * 100003 + j))
                yield batch

    def validation(self) -> dict:
        """Mean P1/P2 losses over ``validation_samples`` fixed samples of the validation source."""
        n = min(self.settings.validation_samples, max(1, len(self.val_source)) * 4)
        totals = {"segmentation_p1": 0.0, "segmentation_p2": 0.0}
        for i in range(n):
            batch = self._batch(self.val_source, [i % len(self.val_source)], 1, i)
            for k, v in self.losses(batch, training=False).items():
                totals[k] += float(v) / n
        return {f"val_{k}": v for k, v in totals.items()}

    # ---------------------------------------------------------------- checkpoints
    def _paths(self):
        folder = os.path.join(self.out_dir, "checkpoints")
        return os.path.join(folder, "latest.npz"), os.path.join(folder, "best.npz")

    def save(self, path: str) -> None:
        from spirs_tf.checkpoints import save_checkpoint
        from spirs_tf.networks import model_state
        from spirs_tf.optim import optimizer_state

        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint(path, model_state(self.model),
                        {k: optimizer_state(o) for k, o in self.optimizers.items()},
                        {"kind": "segmenter", "epoch": self.epoch, "best": self.best, "history": self.history,
                         "settings": dataclasses.asdict(self.settings)})

    def restore(self, path: str) -> None:
        from spirs_tf.checkpoints import load_checkpoint
        from spirs_tf.networks import load_model_state
        from spirs_tf.optim import load_optimizer_state

        state, opt_states, meta = load_checkpoint(path)
        saved = dataclasses.asdict(SegmenterSettings(**meta.get("settings", {})))
        given = dataclasses.asdict(self.settings)
        changed = [f"{k}={saved[k]!r} (now {given[k]!r})" for k in given
                   if k not in RESUMABLE_CHANGES and saved[k] != given[k]]
        if changed:  # going on with other settings would train a mixture nobody asked for
            raise SpirsInputError("this run was trained with " + ", ".join(changed) +
                                  ": resume it with the same settings, or choose another output folder", path)
        load_model_state(self.model, state)
        for k, o in self.optimizers.items():
            load_optimizer_state(o, opt_states[k])
        self.epoch, self.best, self.history = int(meta["epoch"]), float(meta["best"]), list(meta["history"])

    def write_files(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        config_lib.save_config(self.cfg, os.path.join(self.out_dir, "config.json"))
        atomic_write_text(os.path.join(self.out_dir, "segmenter.json"),
                          json.dumps(dataclasses.asdict(self.settings), indent=2) + "\n")

    def fit(self, deadline: float | None = None) -> list[dict]:
        """Train until ``settings.epochs`` (resuming from ``latest.npz``) or the wall-clock ``deadline``
        (an epoch starts only if the last one's time fits)."""
        latest, best = self._paths()
        if os.path.isfile(latest):
            self.restore(latest)
            self.log(f"segmenter: resumed at epoch {self.epoch}")
        self.write_files()
        last = 0.0
        while self.epoch < self.settings.epochs:
            if deadline is not None and time.time() + last > deadline:
                self.log("segmenter: stopped at the deadline")
                break
            t0 = time.time()
            sums: dict = {}
            for batch in self.batches(self.epoch):
                for k, v in self.train_step(batch).items():
                    sums[k] = sums.get(k, 0.0) + v / self.settings.steps_per_epoch
            if not all(np.isfinite(v) for v in sums.values()):
                raise FloatingPointError(f"segmenter: non-finite loss at epoch {self.epoch + 1}: {sums}")
            logs = {"epoch": self.epoch + 1, **sums, **self.validation(), "seconds": time.time() - t0}
            self.epoch += 1
            self.history.append(logs)
            improved = logs["val_segmentation_p2"] < self.best
            if improved:
                self.best = logs["val_segmentation_p2"]
            self.save(latest)
            if improved:
                self.save(best)
            last = time.time() - t0
            self.log("segmenter: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in logs.items()))
        return self.history
