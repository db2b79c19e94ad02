"""Range and consistency checks of a :class:`spirs_tf.config.SpirsConfig`
(:meth:`~spirs_tf.config.SpirsConfig.validate`), and the value sets of its enumerated fields. Needs neither
Keras nor the config module itself."""
from __future__ import annotations

from spirs_tf.errors import SpirsInputError

#: the network's module prefixes (the keys of ``spirs_tf.networks.MODULE_PREFIXES``, which needs Keras)
MODULE_NAMES = ("enc", "aff", "def", "seg", "fuse")
#: values of ``loss.affine_supervision`` (``spirs_tf.losses.AFFINE_SUPERVISION``, which needs Keras)
AFFINE_SUPERVISION = ("matrix", "displacement")
#: ``model.normalization``: the authors' BatchNorm, or per-sample instance normalisation
NORMALIZATIONS = ("batch", "instance")
#: ``train.p2_prior``: which registration places the prior that P2's fusion block learns from
P2_PRIORS = ("network", "truth")


def is_positive_int(value) -> bool:
    """Whether ``value`` is an integer >= 1 (a bool is not one: True would pass as 1)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _positive_int(cfg, name: str, value) -> None:
    """Raise :class:`SpirsInputError` unless ``value`` is an integer >= 1 (:func:`is_positive_int`)."""
    if not is_positive_int(value):
        raise SpirsInputError(f"config {cfg.name!r}: {name} must be an integer >= 1, got {value!r}")


def check_config(cfg) -> None:
    """Raise :class:`SpirsInputError` naming ``cfg.name`` and the first field out of range or inconsistent."""
    d, m = cfg.data, cfg.model
    coarsest = d.grid_size // 2 ** (m.num_levels - 1)
    if d.grid_size <= 0 or coarsest % 8:
        raise SpirsInputError(
            f"config {cfg.name!r}: data.grid_size={d.grid_size} must make the coarsest level "
            f"({coarsest}) divisible by 8 (three poolings in the shared encoder)")
    if d.spacing_mm <= 0:
        raise SpirsInputError(f"config {cfg.name!r}: data.spacing_mm must be > 0, got {d.spacing_mm}")
    if d.pairing not in ("consecutive", "all"):
        raise SpirsInputError(f"config {cfg.name!r}: data.pairing must be 'consecutive' or 'all'")
    if cfg.loss.optimisation not in ("isolated", "joint"):
        raise SpirsInputError(f"config {cfg.name!r}: loss.optimisation must be 'isolated' or 'joint'")
    if cfg.model.normalization not in NORMALIZATIONS:
        raise SpirsInputError(f"config {cfg.name!r}: model.normalization must be one of "
                              f"{', '.join(NORMALIZATIONS)}, got {cfg.model.normalization!r}")
    _positive_int(cfg, "model.affine_passes", cfg.model.affine_passes)
    if not isinstance(cfg.model.affine_symmetric, bool):
        raise SpirsInputError(f"config {cfg.name!r}: model.affine_symmetric must be true or false, "
                              f"got {cfg.model.affine_symmetric!r}")
    if not 0.0 <= cfg.augment.fixed_pose_probability <= 1.0 or not cfg.augment.fixed_rotation_degrees >= 0:
        raise SpirsInputError(f"config {cfg.name!r}: augment.fixed_pose_probability must be in [0, 1] and "
                              f"augment.fixed_rotation_degrees >= 0, got {cfg.augment.fixed_pose_probability!r}, "
                              f"{cfg.augment.fixed_rotation_degrees!r}")
    if not 0.0 <= cfg.augment.near_identity_probability <= 1.0 or not 0.0 < cfg.augment.near_identity_scale <= 1.0:
        raise SpirsInputError(f"config {cfg.name!r}: augment.near_identity_probability must be in [0, 1] and "
                              f"augment.near_identity_scale in (0, 1], got {cfg.augment.near_identity_probability!r}, "
                              f"{cfg.augment.near_identity_scale!r}")
    if not cfg.model.affine_radius >= 0:
        raise SpirsInputError(f"config {cfg.name!r}: model.affine_radius must be >= 0, "
                              f"got {cfg.model.affine_radius!r}")
    bottleneck = coarsest // 8
    if cfg.model.normalization == "instance" and bottleneck < 2:
        raise SpirsInputError(f"config {cfg.name!r}: model.normalization 'instance' needs a bottleneck of at "
                              f"least 2³ voxels (one voxel normalises to a constant and the affine head "
                              f"sees nothing); this grid gives {bottleneck}³")
    if cfg.loss.affine_supervision not in AFFINE_SUPERVISION:
        raise SpirsInputError(f"config {cfg.name!r}: loss.affine_supervision must be one of "
                              f"{', '.join(AFFINE_SUPERVISION)}, got {cfg.loss.affine_supervision!r}")
    for key in ("segmentation_bce_positive_weight", "p2_bce_positive_weight"):
        w = getattr(cfg.loss, key)
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0):
            raise SpirsInputError(f"config {cfg.name!r}: loss.{key} must be a positive number or null, "
                                  f"got {w!r}")
    if cfg.train.p2_prior not in P2_PRIORS:
        raise SpirsInputError(f"config {cfg.name!r}: train.p2_prior must be one of {', '.join(P2_PRIORS)}, "
                              f"got {cfg.train.p2_prior!r}")
    clip = cfg.model.p2_residual_clip
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
        raise SpirsInputError(f"config {cfg.name!r}: model.p2_residual_clip must be a number >= 0, got {clip!r}")
    if not isinstance(cfg.model.p2_residual, bool):
        raise SpirsInputError(f"config {cfg.name!r}: model.p2_residual must be true or false, "
                              f"got {cfg.model.p2_residual!r}")
    gate = cfg.model.p2_gate_size
    if isinstance(gate, bool) or not isinstance(gate, int) or gate < 0 or (gate and gate % 2 == 0):
        raise SpirsInputError(f"config {cfg.name!r}: model.p2_gate_size must be 0 or an odd integer >= 1, "
                              f"got {gate!r}")
    if gate and not cfg.model.p2_residual:
        raise SpirsInputError(f"config {cfg.name!r}: model.p2_gate_size needs model.p2_residual = true")
    _positive_int(cfg, "train.data_echo", cfg.train.data_echo)
    if cfg.train.distribute not in ("none", "mirrored", "multi_worker"):
        raise SpirsInputError(
            f"config {cfg.name!r}: train.distribute must be 'none', 'mirrored' or 'multi_worker'")
    for s in cfg.train.stages:
        if not 1 <= s.levels <= m.num_levels:
            raise SpirsInputError(f"config {cfg.name!r}: stage levels must be in 1..{m.num_levels}")
        if s.bn_recalibration_batches < 0:
            raise SpirsInputError(f"config {cfg.name!r}: bn_recalibration_batches must be >= 0")
    for name in ("registration", "segmentation_p1", "segmentation_p2"):
        clip = getattr(cfg.optim, name).global_clipnorm
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or
                                 not clip > 0):
            raise SpirsInputError(f"config {cfg.name!r}: optim.{name}.global_clipnorm must be a positive "
                                  f"number or null, got {clip!r}")
    unknown = [m for m in cfg.train.recalibration_modules() if m not in MODULE_NAMES]
    if unknown:
        raise SpirsInputError(f"config {cfg.name!r}: train.bn_recalibration_modules: unknown module(s) "
                              f"{unknown}; known: {', '.join(MODULE_NAMES)}")
