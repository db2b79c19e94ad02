"""Typed configuration of spirs-tf: one dataclass tree, saved (resolved) with every run.

Named experiments (:data:`NAMED_CONFIGS`):

``paper``
    The paper's network and hyper-parameters: 64 base filters, 128³ working grid at 1.5 mm, γ = 0.5,
    λ1 = 0.5, λ2 = 0.1, SGD with decoupled weight decay, lr 1e-2 → 4e-5 and wd 4e-5 → 2e-7 over
    250 epochs (Appendix B), stage batch sizes 32 / 2 / 2.
``cpu-small``
    8 base filters, 64³ at 3 mm, stages of 150 / 24 / 10 epochs (segmentation off in stage 1, P1
    without the shared encoder, stage 3 re-estimates P1's BatchNorm statistics first): trains on a
    2-core CPU in about an hour; registration and P1/P2 segmentation both learn. The demo weights
    shipped until 2026-11-26 (``experiments/RESULTS.md``).
``cpu-medium``
    cpu-small's widths on two pyramid levels (32³, 64³) with an affine head that learns: displacement
    supervision, outputs scaled to a radius, instance normalisation, posed fixed images
    (:func:`_cpu_medium`). The shipped demo weights (``spirs_tf/weights/demo.*``).
``gpu-1p5mm``
    The paper's 128³ grid at 1.5 mm (micro lesions span several voxels) at a quarter of the paper's width
    (16 base filters; the float32 weights, 14.5 MiB, come back from the GPU machine as one file), with
    cpu-small's training choices, sized for one H100 and about 8 minutes of training (``experiments/gpu/``,
    where the wall budget stops each stage). EXPERIMENTAL: not yet trained.
``test``
    Tiny: for unit tests only.

Every named config but ``cpu-medium`` and ``gpu-1p5mm`` keeps ``loss.affine_supervision = "matrix"`` (Eq. 1
as written; the cpu-small weights shipped until 2026-11-26 were trained with it); ``"displacement"`` supervises the affine by its mean squared displacement
error over the brain instead (:mod:`spirs_tf.affine_losses`).

A config is built with :func:`get_config` (a name or a JSON file, plus ``key.sub=value`` overrides)
and written with :func:`save_config`. Keys are checked: a typo is an error, not a silent default.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from spirs_tf.atomic import atomic_write_text
from spirs_tf.config_checks import (AFFINE_SUPERVISION, MODULE_NAMES, NORMALIZATIONS,  # noqa: F401 (re-exported)
                                    P2_PRIORS, check_config)
from spirs_tf.errors import SpirsInputError


CONFIG_VERSION = 1
#: segmentation logits are clipped to ±this before the sigmoid at inference (the model, the SavedModel and
#: the fine-grid segmenter alike)
LOGIT_CLIP = 50.0


@dataclass
class DataConfig:
    """Working grid and preprocessing (FACTS decision 1)."""

    grid_size: int = 128  #: voxels per axis of the finest pyramid level (must be divisible by 32)
    spacing_mm: float = 1.5  #: isotropic working spacing in mm
    clip_sigma: float = 5.0  #: intensities clipped at mean ± clip_sigma·std of non-zero voxels
    pairing: str = "consecutive"  #: "consecutive" or "all" ordered (prior, new) pairs per patient
    both_directions: bool = False  #: also train on (new, prior) pairs


@dataclass
class ModelConfig:
    """Network widths (FACTS section B). The paper uses ``base_filters = 64``."""

    base_filters: int = 64  #: SE1 width; SE2 uses 2×, 4×, 8×, 16× this
    opening_filters: int = 32  #: filters of the three opening convolutions
    num_levels: int = 3  #: L, pyramid depth of the full model
    affine_dense_units: int = 128
    affine_dropout: float = 0.15
    registration_kernel: int = 7  #: opening kernel of the affine and deformable modules
    segmentation_kernel: int = 3  #: opening kernel of the segmentation module
    blur_size: int = 5  #: Gaussian kernel applied to the warped prior mask before P2
    blur_sigma: float = 1.0
    seg_prior_probability: float = 0.01  #: RetinaNet prior for the segmentation head biases
    #: False (authors' code): each of P1's three summed heads starts at the prior bias (−4.595 each, so
    #: P1 starts at p ≈ 1e-6). True: each head gets a third, so that their sum starts at the prior.
    seg_prior_split: bool = False
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.99
    #: "batch" (authors): BatchNorm, batch statistics in training, moving ones in inference. "instance":
    #: per-sample statistics in both. At small batches the affine head trained with BatchNorm learns
    #: from batch statistics and fails on the moving ones (cpu-medium: displacement error 16 voxels² with
    #: batch statistics, 54 with the moving ones, also after re-estimating them; issue 15).
    normalization: str = "batch"
    #: 0 (authors): the affine head's Dense(15) outputs the raw parameters (translation in voxels,
    #: rotations in radians, scales, shears). r > 0: its outputs are displacements at radius r voxels of
    #: the coarsest grid (rotation, scale−1 and shear divided by r), which equalises their scale.
    affine_radius: float = 0.0
    #: 1 (authors): inference runs the network once. k > 1: the prior, warped by the affine found so
    #: far, is registered again k − 1 times (:meth:`spirs_tf.predictor.Predictor.predict`; the affines
    #: compose, the last pass's field and P2 are kept). Training and the checkpoint are unaffected.
    affine_passes: int = 1
    #: False (authors): each pass's affine is the network's answer for (new, prior). True: each pass also
    #: registers the new scan to the prior and takes the log-Euclidean mean of the first answer and the
    #: inverse of the second (:func:`spirs_tf.geometry.affine_log_mean`), which cancels the network's bias
    #: (a pair registered to itself gets the identity exactly); one more pass on the prior placed by
    #: that affine gives the field. 2k + 1 network runs for k passes; the checkpoint is unaffected.
    affine_symmetric: bool = False
    #: False (authors): P2's logits are the fusion block's output, its head starting at the prior bias.
    #: True: P2 = P1's logits + the fusion block's output, whose head starts at zero, so that P2 starts
    #: as P1 and learns only what the prior adds (issue 16: P2 trained the authors' way found fewer
    #: lesions than P1). A checkpoint trained one way does not fit the other's fusion block:
    #: re-initialise it (``experiments/run_stage.py --init-skip fuse``).
    p2_residual: bool = False
    #: with ``p2_residual``: P1's logits are clipped to ±this before the fusion output is added (0 = not
    #: clipped). P1 is confidently negative on faint lesions (logits −6 to −15 at 3 mm), which the
    #: fusion block would have to outweigh; clipped, P2 still starts with P1's mask (the sign is kept)
    p2_residual_clip: float = 0.0
    #: with ``p2_residual``, > 0 (odd): the fusion output may raise P1's logits only within
    #: ``p2_gate_size // 2`` voxels of the warped prior mask, lower them anywhere (0 = everywhere, the
    #: authors' reach). Without it a P2 trained to find micro lesions also marks specks far from any prior
    p2_gate_size: int = 0


@dataclass
class LossConfig:
    """Loss weights (Eq. 10 and FACTS decision 6)."""

    optimisation: str = "isolated"  #: "isolated" (authors: three tapes/optimisers) or "joint" (Eq. 10)
    #: isolated mode: the P1 optimiser also updates the shared encoder (authors: True); False keeps the
    #: encoder to the registration optimiser, so a fast P1 rate cannot disturb registration
    p1_trains_encoder: bool = True
    gamma: float = 0.5  #: pyramid weight γ^(L−i)
    lambda_smooth: float = 0.5  #: λ1
    lambda_dice: float = 0.1  #: λ2 (registration Dice and its BCE)
    #: affine supervision of every level: "matrix" = Eq. 1 as written, the MSE over the 12 entries of
    #: [M | t] (translation in voxels dominates: on 64³ a 5° rotation error costs as much as a
    #: 0.12-voxel shift); "displacement" = the mean squared displacement error ‖(T̂ − T)[x − c; 1]‖²
    #: over the fixed image's brain, in voxels of the level grid, so rotation, scale, shear and
    #: translation weigh by how far they move the brain (spirs_tf.affine_losses; for a pure translation
    #: error it is 12× the matrix MSE). The former cpu-small demo weights were trained with "matrix", the
    #: cpu-medium ones shipped now with "displacement".
    #: With "displacement" lower weight_mse: at weight 1 cpu-small's stage-1 training turned NaN within
    #: 10 steps; 1/12 (translation weighted as in Eq. 1) trained stably (spirs_tf.affine_losses).
    affine_supervision: str = "matrix"
    weight_mse: float = 1.0  #: weight of the affine term (either supervision)
    weight_lncc_affine: float = 1.0
    weight_lncc_deformable: float = 1.0
    weight_segmentation: float = 1.0
    lncc_window: int = 9
    background_displacement_weight: float = 0.01
    bce_positive_weight: float = 3.0
    #: positive-class weight of the P1/P2 BCE; None = ``bce_positive_weight`` (authors: 3 for both)
    segmentation_bce_positive_weight: float | None = None
    #: the same for P2 alone; None = P1's. A P2 that should mark the faint lesions its prior points at
    #: trades a few false positives for them (P2's false-positive components are counted in evaluations)
    p2_bce_positive_weight: float | None = None
    dice_smooth: float = 1.0


@dataclass
class OptimizerConfig:
    """One SGDW optimiser with cosine learning-rate and weight-decay schedules (Appendix B, Eq. 11)."""

    learning_rate: float = 1e-2
    learning_rate_min: float = 4e-5
    weight_decay: float = 4e-5
    weight_decay_min: float = 2e-7
    momentum: float = 0.9
    nesterov: bool = False
    cycle_epochs: int = 250  #: T of Eq. 11, in epochs
    warmup_epochs: int = 0  #: authors: 5 (linear from lr/1000)
    warm_restarts: bool = False  #: authors' cycle=True: each cycle 1.5× longer, max/10, min/15
    restart_length_factor: float = 1.5
    restart_max_divisor: float = 10.0
    restart_min_divisor: float = 15.0
    #: clip the global norm of this optimiser's gradients to this value before the update (Keras'
    #: ``global_clipnorm``); ``None`` = no clipping (the paper and the authors' code do not clip)
    global_clipnorm: float | None = None


@dataclass
class OptimConfig:
    """The three optimisers of ``isolated`` mode; ``joint`` mode uses ``registration`` alone."""

    registration: OptimizerConfig = field(default_factory=OptimizerConfig)
    segmentation_p1: OptimizerConfig = field(default_factory=OptimizerConfig)
    segmentation_p2: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class AugmentConfig:
    """On-the-fly augmentation (FACTS decision 9). The random affine is the ground-truth affine."""

    enabled: bool = True
    flip_probability: float = 0.5  #: per axis, applied to both images alike
    spatial_probability: float = 0.9  #: each of scale / rotation / shear / translation
    scale_range: tuple[float, float] = (0.9, 1.1)  #: anisotropic
    rotation_degrees: float = 20.0
    shear_range: float = 0.05
    translation_voxels_at_128: float = 20.0  #: scaled with the grid size
    gamma_probability: float = 0.5
    gamma_range: tuple[float, float] = (0.75, 1.25)
    image_order: int = 3  #: spline order for images (authors: cubic)
    mask_order: int = 0  #: 0 = nearest (authors), 1 = linear then threshold 0.5
    #: 0 (authors): only the moving image moves, the fixed one stays upright, and the network can learn
    #: to undo the moving image's tilt without looking at the fixed one (fails on raw-pose pairs). p > 0:
    #: with probability p the fixed image gets a rigid pose too (rotations U(±fixed_rotation_degrees),
    #: translation as the moving's); the target composes both (:func:`spirs_tf.augment.augment_pair`).
    fixed_pose_probability: float = 0.0
    fixed_rotation_degrees: float = 10.0
    #: 0 (authors): few training pairs lie near the identity, where a second affine pass works. q > 0: with
    #: probability q every deviation of the moving image's affine from the identity is multiplied by one
    #: factor ``f ~ U(0, near_identity_scale)`` (:func:`spirs_tf.augment.random_affine_params`)
    near_identity_probability: float = 0.0
    near_identity_scale: float = 0.25


@dataclass
class StageConfig:
    """One coarse-to-fine stage (FACTS decision 8)."""

    levels: int = 1
    batch_size: int = 32
    bn_trainable: bool = True
    epochs: int = 250
    steps_per_epoch: int | None = None  #: None = ceil(#pairs / batch)
    cycle_epochs: int | None = None  #: cosine length T for this stage; None = the optimisers' cycle_epochs
    lr_scale: float = 1.0  #: multiplies every optimiser's learning rates and weight decays in this stage
    segmentation_lr_scale: float | None = None  #: the same for the two segmentation optimisers (None = lr_scale)
    #: before the stage's first epoch, re-estimate the moving statistics of the BatchNorm layers of
    #: ``train.bn_recalibration_modules`` over this many training batches (0 = keep them as loaded)
    bn_recalibration_batches: int = 0


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig(levels=1, batch_size=32, bn_trainable=True),
        StageConfig(levels=2, batch_size=2, bn_trainable=False),
        # The authors' stage-3 script uses the earlier learning rates and weight decays divided by 100.
        StageConfig(levels=3, batch_size=2, bn_trainable=False, lr_scale=0.01),
    ]


@dataclass
class TrainConfig:
    stages: list[StageConfig] = field(default_factory=_default_stages)
    seed: int = 1234
    validation_pairs: int | None = None  #: None = every validation pair
    checkpoint_every_epochs: int = 1
    #: history column that selects best.npz (lower is better); authors: the validation registration loss.
    #: Without a validation split the training ``registration`` loss is used instead.
    keep_best_metric: str = "val_registration"
    #: comma-separated module prefixes (enc, aff, def, seg, fuse) whose BatchNorm statistics a stage's
    #: ``bn_recalibration_batches`` re-estimates
    bn_recalibration_modules: str = "seg"
    mixed_precision: bool = False
    #: compile the loss terms of a training/validation step with XLA (TensorFlow; same values to float
    #: rounding, ~4× faster LNCC and bending energy on a CPU); the network stays un-compiled
    xla_losses: bool = True
    distribute: str = "none"  #: "none", "mirrored" or "multi_worker"
    loader_workers: int = 2
    #: data echoing (Choi et al. 2019, arXiv:1907.05550): each loaded batch serves this many consecutive
    #: steps, for a loader-bound machine (the H100's 128³ augmentation); 1 = every step a new batch (authors)
    data_echo: int = 1
    #: the prior P2's fusion block is trained on. "network" (authors): the prior warped by the network's
    #: own registration, as the model outputs it. "truth": the prior warped by the augmentation's true
    #: affine (``true_affine``), as a good registration places it; spirs predict's default refined
    #: registration gives P2 such a prior at inference. Applies to P2's loss and to ``val_dice_p2``;
    #: the registration and P1 terms are unchanged.
    p2_prior: str = "network"

    def recalibration_modules(self) -> tuple[str, ...]:
        """``bn_recalibration_modules`` as a tuple of stripped names (validated against :data:`MODULE_NAMES`)."""
        return tuple(m.strip() for m in self.bn_recalibration_modules.split(","))


@dataclass
class SpirsConfig:
    name: str = "paper"
    version: int = CONFIG_VERSION
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def level_grid(self, level: int) -> int:
        """Grid size of pyramid ``level`` (1 = coarsest) of the full ``num_levels`` pyramid."""
        return self.data.grid_size // 2 ** (self.model.num_levels - level)

    def validate(self) -> "SpirsConfig":
        """Check every field's range and the fields' consistency (:func:`spirs_tf.config_checks.check_config`).

        Raises:
            SpirsInputError: naming the config and the first bad field.
        """
        check_config(self)
        return self


# --------------------------------------------------------------------------------------------- named
def _paper() -> SpirsConfig:
    return SpirsConfig(name="paper")


def _cpu_small() -> SpirsConfig:
    cfg = SpirsConfig(name="cpu-small")
    cfg.data.grid_size = 64
    cfg.data.spacing_mm = 3.0
    cfg.model.base_filters = 8
    cfg.model.opening_filters = 8
    cfg.model.affine_dense_units = 32
    # Three summed P1 heads at −4.595 each start P1 at p ≈ 1e-6, where neither Dice nor BCE moves them
    # within a CPU budget: split the prior so that P1, like P2, starts at p = 0.01. (This alone does
    # not make segmentation learn here: at 16³ the lesions vanish and the heads collapse to "none".)
    cfg.model.seg_prior_split = True
    # Each stage runs one cosine cycle over its own epochs (the paper's T = 250 epochs does not fit a CPU).
    # Stage 1 (16³, about 4 s per epoch) is cheap: it gets most of the epochs.
    cfg.train.stages = [
        StageConfig(levels=1, batch_size=8, bn_trainable=True, epochs=150, cycle_epochs=150),
        # At batch 2 with frozen BatchNorm the stage-1 rate diverges within two steps: fine-tune at 3/100
        # from stage 2 on (the authors' stage-3 factor is 1/100, which left registration under-trained
        # in a CPU budget).
        StageConfig(levels=2, batch_size=2, bn_trainable=False, epochs=24, cycle_epochs=24, lr_scale=0.03),
        StageConfig(levels=3, batch_size=2, bn_trainable=False, epochs=10, cycle_epochs=10, lr_scale=0.03),
    ]
    cfg.train.validation_pairs = 16
    # The authors' segmentation optimisers run at 10x the registration rate (1e-1 / 2e-5 in the early
    # stages, 1e-3 / 2e-7 at stage 3 after their /100).
    for opt in (cfg.optim.segmentation_p1, cfg.optim.segmentation_p2):
        opt.learning_rate, opt.learning_rate_min = 1e-1, 4e-4
        opt.weight_decay, opt.weight_decay_min = 2e-5, 1e-7
    # On 16³ the strided lesion masks are empty and the heads collapse to "no lesion": the segmentation
    # optimisers stay off in stage 1 and run at their full rate from stage 2 on (lesions of 125 mm³ and
    # more survive on 32³). P1 starts at p = 0.01 there; at that rate its updates of the shared encoder
    # disturb registration, so P1 trains its own decoder only (the encoder is registration's).
    # P1's fresh decoder (frozen BatchNorm) diverges within 20 steps at 1e-1: it gets 2e-2.
    cfg.optim.segmentation_p1.learning_rate, cfg.optim.segmentation_p1.learning_rate_min = 2e-2, 8e-5
    cfg.train.stages[0].segmentation_lr_scale = 0.0
    cfg.train.stages[1].segmentation_lr_scale = 1.0
    cfg.train.stages[2].segmentation_lr_scale = 1.0
    cfg.loss.p1_trains_encoder = False
    # P1's decoder did not train in stage 1, and its BatchNorm statistics, frozen there on 16³ inputs, are
    # far off at 64³ (variances of up to 460 against 0.5 at the heads): stage 3 re-estimates them first.
    cfg.train.stages[2].bn_recalibration_batches = 30
    return cfg


def _cpu_medium() -> SpirsConfig:
    """cpu-small's widths and 3 mm grid, two pyramid levels (32³, 64³), an affine head that can learn.

    Why (issue 15's audit of cpu-small's affine): at 64³ with three levels the coarsest level is 16³ and
    the affine head sees a 2³ × 4 bottleneck (32 numbers); Eq. 1's matrix MSE supervises translation
    only; and stage 3 gives the finest level few steps. Here the coarsest level is 32³ (a 4³ × 4
    bottleneck, 256 numbers), the finest level (64³) trains for the whole of stage 2, and, measured on
    the synthetic cohort ``--pose aligned --grid 64 --spacing 3 --seed 2026 --lesion-sizes 0,1,1,1``:

    * ``loss.affine_supervision = "displacement"`` (mean squared displacement error over the brain) at
      weight 1/12 with ``optim.registration.global_clipnorm`` (at 1/12 without clipping stage 1 diverged
      within 3 steps; at 1/48 without it the affine did not learn);
    * ``model.normalization = "instance"``: with BatchNorm (batch 4) the head learned from batch
      statistics: after 28 epochs its displacement error was 16 voxels² with batch statistics and 54 with
      the moving ones (identity: 32), also after re-estimating them; per-sample statistics have no gap;
    * ``model.affine_radius = 8`` (voxels of the 32³ grid, about the brain's RMS radius): 200 level-1
      steps took the displacement error from 30 to 12–15 voxels² (translation first) against no progress
      with the raw parameters, whose rotation outputs are ~r² times steeper than the translations;
    * clipping at 5 learned as far in 100 steps as clipping at 1 in 200 (``experiments/affine_supervision_steps.py``);
    * ``augment.fixed_pose_probability = 0.7``: with the fixed image always upright (the authors'
      augmentation) the network learned to undo the moving image's tilt without looking at the fixed
      one: after stage 1 its RMS displacement error on 32 held-out pairs was 11.6 mm with an upright
      fixed image and 25.6 mm with a posed one (``experiments/affine_accuracy.py --fixed-pose 1``); 15
      more stage-1 epochs with posed fixed images: 12.4 and 14.6 mm.

    The shipped demo weights (``spirs_tf/weights/demo.*``): ``runs/cm11``, 12 more stage-2 epochs at
    ``lr_scale`` 0.05 from ``runs/cm10p2`` (registration of ``runs/cm8``, P1 and P2 trained on it), all
    of it training, with ``model.p2_residual`` and ``train.p2_prior = "truth"`` set on the command line
    (see their provenance file). The linear part of the affine improved most at 64³ (stage 2).
    """
    cfg = _cpu_small()
    cfg.name = "cpu-medium"
    cfg.model.num_levels = 2
    cfg.model.affine_dense_units = 64
    cfg.model.normalization = "instance"
    cfg.model.affine_radius = 8.0
    cfg.loss.affine_supervision = "displacement"
    cfg.loss.weight_mse = 1.0 / 12.0
    cfg.optim.registration.global_clipnorm = 5.0
    cfg.optim.registration.warmup_epochs = 1
    cfg.augment.fixed_pose_probability = 0.7
    # stage 1: 32³, registration only (segmentation joins at 64³); instance normalisation has no moving
    # statistics, so nothing is re-estimated and "frozen" (bn_trainable False) freezes its β only
    cfg.train.stages = [
        StageConfig(levels=1, batch_size=4, bn_trainable=True, epochs=40, cycle_epochs=40,
                    segmentation_lr_scale=0.0),
        StageConfig(levels=2, batch_size=2, bn_trainable=False, epochs=12, cycle_epochs=12, lr_scale=0.03,
                    segmentation_lr_scale=1.0),
    ]
    return cfg


def _gpu_1p5mm() -> SpirsConfig:
    """The paper's grid (128³ at 1.5 mm) at a quarter of its width, for a short run on one GPU (``experiments/gpu/``).

    cpu-small's training choices (split P1 prior, segmentation optimisers at 10× the registration
    rate, segmentation off on the coarsest level, P1 off the encoder, per-stage cosine cycles, fine-tuning
    at 3/100, then 1/100), cpu-medium's affine choices (displacement supervision, ``affine_radius``,
    instance normalisation, posed fixed images) and P2 choices (``train.p2_prior = "truth"``,
    ``model.p2_residual``) on the paper's grid, so
    that a micro lesion (< 25 mm³, about 7 voxels of 3.4 mm³) is visible to the network. The width is
    16 base filters (304.5 GFLOP per 128³ pair forward; 3.79 M parameters, 14.5 MiB of float32 weights,
    under the GPU machine's 16 MiB per returned file; 32 filters would be 56 MiB), so that stage 3 runs
    hundreds of steps in a few minutes. Epochs and steps are a plan for about 2 + 2 + 4 minutes on an
    H100 (stage 3 counting its compilation); the recipe's wall budget (``experiments/gpu/recipe.py
    --budget``) ends a stage early at an epoch end when it runs slower.
    EXPERIMENTAL: not yet trained with these choices (the two H100 calls of 2026-11-26 ran the BatchNorm,
    matrix-supervised version).
    """
    cfg = _cpu_small()
    cfg.name = "gpu-1p5mm"
    paper = SpirsConfig()
    cfg.data.grid_size, cfg.data.spacing_mm = paper.data.grid_size, paper.data.spacing_mm
    cfg.model.base_filters = 16
    cfg.model.opening_filters = 16
    cfg.model.affine_dense_units = paper.model.affine_dense_units
    stages = cfg.train.stages
    # stage 1: 32³ (6 mm), batch 32 as in the paper; stage 2: 64³, batch 4; stage 3: 128³, batch 2 (paper)
    # Measured on one H100 (experiments/gpu/provenance/, 2026-11-26): stage 1 ~10 s per epoch after a
    # 37 s first one; stage 2 ~0.14 s per step plus ~30 s of compilation; stage 3's first step (compile
    # and BatchNorm re-estimation) ~2.5 min. Stage 3 diverged at step 21 at lr_scale 0.03: 0.01 there.
    # 2026-11-27 (instance norm., truth P2): stage 2 ~0.3 s and stage 3 ~0.8 s per step, loader-bound
    # (compiled steps 0.075 and 0.24 s; experiments/gpu/README.md), one epoch per stage in 540 s.
    stages[0].batch_size, stages[0].epochs, stages[0].steps_per_epoch = 32, 6, 25
    stages[1].batch_size, stages[1].epochs, stages[1].steps_per_epoch = 4, 3, 100
    stages[2].batch_size, stages[2].epochs, stages[2].steps_per_epoch = 2, 10, 60
    stages[2].lr_scale = 0.01
    for s in stages:
        s.cycle_epochs = s.epochs
    # cpu-medium's affine choices (measured there, on the same 32³ stage-1 grid): displacement supervision
    # at 1/12 with clipping at 5, outputs at radius 8 voxels of the 32³ grid, and instance normalisation
    # (the first H100 run's BatchNorm model scored −1.00 in training and −0.17 in validation after stage
    # 1); with no moving statistics, stage 3 has nothing to re-estimate (its first step was ~2.5 min).
    cfg.model.normalization = "instance"
    cfg.model.affine_radius = 8.0
    cfg.loss.affine_supervision = "displacement"
    cfg.loss.weight_mse = 1.0 / 12.0
    cfg.optim.registration.global_clipnorm = 5.0
    cfg.augment.fixed_pose_probability = 0.7  # cpu-medium: the fixed image not always upright
    stages[2].bn_recalibration_batches = 0
    # P2 learns from the prior as a good registration places it (the true affine), and starts as P1
    # (issue 16: trained on the network's own, early misplaced prior, P2 found fewer lesions than P1)
    cfg.train.p2_prior = "truth"
    cfg.model.p2_residual = True
    cfg.train.loader_workers = 14  # the GPU machine has 16 cores; 128³ augmentation is CPU work
    return cfg


def _test() -> SpirsConfig:
    cfg = SpirsConfig(name="test")
    cfg.data.grid_size = 32
    cfg.data.spacing_mm = 6.0
    cfg.model.base_filters = 2
    cfg.model.opening_filters = 2
    cfg.model.affine_dense_units = 8
    cfg.train.stages = [
        StageConfig(levels=1, batch_size=2, bn_trainable=True, epochs=2, steps_per_epoch=2),
        StageConfig(levels=2, batch_size=1, bn_trainable=False, epochs=1, steps_per_epoch=2),
        StageConfig(levels=3, batch_size=1, bn_trainable=False, epochs=1, steps_per_epoch=1),
    ]
    cfg.train.loader_workers = 1
    return cfg


#: Fields that existed and were removed: {section: keys}, dropped from older saved configs by :func:`migrate`.
#: ``train.xla_warp`` was never read.
REMOVED_KEYS = {"train": ("xla_warp",)}

NAMED_CONFIGS = {"paper": _paper, "cpu-small": _cpu_small, "cpu-medium": _cpu_medium, "gpu-1p5mm": _gpu_1p5mm,
                 "test": _test}


# ------------------------------------------------------------------------------------ (de)serialise
def to_dict(cfg: SpirsConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _from_dict(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise SpirsInputError(f"config: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpirsInputError(f"config: unknown key(s) {unknown} in {where or 'top level'}; "
                              f"known: {sorted(fields)}")
    kwargs = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        kwargs[name] = _coerce(default, value, f"{where}.{name}".lstrip("."))
    return cls(**kwargs)


def _coerce(default, value, where: str):
    if dataclasses.is_dataclass(default):
        return _from_dict(type(default), value, where)
    if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
        if not isinstance(value, list):
            raise SpirsInputError(f"config: {where} must be a list")
        return [_from_dict(type(default[0]), v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(default, tuple):
        return tuple(value)
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SpirsInputError(f"config: {where} must be true/false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if isinstance(default, int) and not isinstance(default, bool) and value is not None:
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise SpirsInputError(f"config: {where} must be an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise SpirsInputError(f"config: {where} must be an integer, got {value!r}")
        return int(as_float)
    if isinstance(default, float) and value is not None:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SpirsInputError(f"config: {where} must be a number, got {value!r}") from None
    return value


def from_dict(data: dict[str, Any]) -> SpirsConfig:
    data = migrate(copy.deepcopy(data))
    return _from_dict(SpirsConfig, data, "").validate()


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older saved config up to :data:`CONFIG_VERSION` (version 1 is the first).

    Keys of removed fields (:data:`REMOVED_KEYS`) are dropped, so that the ``config.json`` of an older
    run still loads; any other unknown key stays an error.
    """
    version = data.get("version", CONFIG_VERSION)
    if version > CONFIG_VERSION:
        raise SpirsInputError(f"config: version {version} is newer than this spirs-tf ({CONFIG_VERSION})")
    data["version"] = CONFIG_VERSION
    for section, keys in REMOVED_KEYS.items():
        if isinstance(data.get(section), dict):
            for key in keys:
                data[section].pop(key, None)
    return data


def apply_overrides(cfg: SpirsConfig, overrides: list[str] | None) -> SpirsConfig:
    """Apply ``section.key=value`` strings, e.g. ``model.base_filters=16`` or ``train.stages.0.epochs=3``."""
    data = to_dict(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise SpirsInputError(f"config override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)]
            elif part in node:
                node = node[part]
            else:
                raise SpirsInputError(f"config override {item!r}: unknown key {part!r}")
        last = parts[-1]
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(node, list):
            node[int(last)] = value
        elif last in node:
            node[last] = value
        else:
            raise SpirsInputError(f"config override {item!r}: unknown key {last!r}")
    return from_dict(data)


def get_config(name_or_path: str | os.PathLike = "paper", overrides: list[str] | None = None) -> SpirsConfig:
    """A named config (``paper``, ``cpu-small``, ``test``) or a JSON file, with overrides applied."""
    key = os.fspath(name_or_path)
    if key in NAMED_CONFIGS:
        cfg = NAMED_CONFIGS[key]()
    elif os.path.isfile(key):
        try:
            with open(key, encoding="utf-8") as fh:
                cfg = from_dict(json.load(fh))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpirsInputError(f"not a valid JSON config ({exc})", key) from None
    else:
        raise SpirsInputError(f"config {key!r} is neither a named config {sorted(NAMED_CONFIGS)} "
                              "nor an existing JSON file")
    return apply_overrides(cfg, overrides).validate()


def save_config(cfg: SpirsConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically."""
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2) + "\n")
