"""Building blocks of the SPIRS network: pre-activation blocks, the shared encoder, the affine head,
the U-Net decoders with summed multi-resolution heads, and the P2 fusion block (FACTS section B).

Every object here is a plain Python container of Keras layers with fixed, explicit names. Calling an
object adds nodes to a functional graph; calling it again (another module, another pyramid level)
re-uses the same layers, hence the same weights. Names carry a module prefix so that a variable's
``path`` (``"<layer name>/<weight>"``) is the same in the 1-, 2- and 3-level models, whatever order
they are built in:

========  ==================================================================
``enc_``  shared encoder SE1 + SE2 (affine, deformable and P1 paths, all levels)
``aff_``  affine opening conv + affine head
``def_``  deformable opening conv + deformable decoder + DVF heads
``seg_``  P1 opening conv + P1 decoder + segmentation heads
``fuse_`` P2 fusion block
========  ==================================================================

Widths scale with ``b = cfg.model.base_filters`` (paper 64): SE1 ``b``; SE2 ``2b, 4b, 8b, 16b``;
Dec1 ``8b, 8b, 4b, 4b, 2b, 2b``; Dec2_1 ``b``; Dec2_2 and the last affine block ``b/2``.

Pyramid levels (global index ``level``, 1 = coarsest, grid ``coarsest · 2**(level−1)``): SE2 always
runs on the coarsest grid. ``extra = level − 1`` non-trainable max-poolings bring a finer input down:
at ``extra = 1`` one after SE1, at ``extra = 2`` one after the opening conv and one after SE1.
The decoders mirror this with the authors' fixed ×2 upsampler
(:class:`spirs_tf.layers.Upsample2x`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from spirs_tf._compat import keras, tf
from spirs_tf.config import NORMALIZATIONS
from spirs_tf.geometry import IDENTITY_PARAMS
from spirs_tf.layers import AffineMatrix, ClipValues, GaussianBlur3D, OpeningConv3D, PriorGate, Upsample2x

MAX_EXTRA_POOLS = 2  #: the FACTS describe levels whose grid is at most 4× the coarsest grid


def prior_bias(probability: float) -> float:
    """RetinaNet prior bias ``b = −log((1 − p) / p)`` so that ``sigmoid(b) = p`` (p = 0.01 → −4.595).

    Raises:
        ValueError: unless ``0 < p < 1``.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"seg_prior_probability must be in (0, 1), got {probability}")
    return -math.log((1.0 - probability) / probability)


def _distributed() -> bool:
    """True while a ``tf.distribute`` strategy is active (a model built inside ``strategy.scope()``).

    Trainable BatchNorm layers are then built with ``synchronized=True``: each replica's batch
    moments are all-reduced (sums of x, x² and counts), so the statistics are those of the global
    batch and N replicas give the update of one replica on the whole batch (tested in
    ``tests/test_distribute.py``). Frozen BatchNorm computes no moments and needs nothing. Only the
    TensorFlow backend has strategies; elsewhere this is always False.
    """
    if keras.backend.backend() != "tensorflow":
        return False
    return tf.distribute.has_strategy()


class PreActBlock:
    """``BatchNorm(center, no scale) → ReLU → Conv3D(stride 1, 'same')``, the authors' norm_act_conv.

    ``normalization="instance"`` (``model.normalization``, not the authors') replaces the BatchNorm by an
    instance normalisation (``{name}_in``: per sample and channel over space, ``center``, no scale, same
    ε), which computes the same thing in training and inference; ``bn_trainable=False`` then freezes
    its β only.

    Layers ``{name}_bn``, ``{name}_relu``, ``{name}_conv``. The convolution has no bias unless
    ``use_bias`` (heads only). BatchNorm: ``center=True, scale=False``, ε and momentum from the config;
    ``bn_trainable=False`` builds it non-trainable, and Keras 3 then always runs it in inference mode
    (moving statistics and β frozen), as the authors do from stage 2 on. A trainable BatchNorm built
    under a ``tf.distribute`` strategy is synchronized (global-batch moments, :func:`_distributed`).

    ``(B, D, H, W, C_in) → (B, D, H, W, filters)``.
    """

    def __init__(self, name: str, filters: int, kernel: int, *, epsilon: float, momentum: float,
                 bn_trainable: bool = True, use_bias: bool = False,
                 kernel_initializer="he_normal", bias_initializer="zeros", normalization: str = "batch"):
        if filters < 1:
            raise ValueError(f"block {name!r}: filters must be >= 1, got {filters}")
        self.name = name
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"block {name!r}: normalization must be one of {', '.join(NORMALIZATIONS)}, "
                             f"got {normalization!r}")
        if normalization == "batch":
            self.bn = keras.layers.BatchNormalization(
                center=True, scale=False, epsilon=epsilon, momentum=momentum,
                trainable=bn_trainable, synchronized=bn_trainable and _distributed(), name=f"{name}_bn")
        else:  # "instance": per sample and channel over space, the same in training and inference
            self.bn = keras.layers.GroupNormalization(groups=-1, center=True, scale=False, epsilon=epsilon,
                                                      trainable=bn_trainable, name=f"{name}_in")
        self.relu = keras.layers.ReLU(name=f"{name}_relu")
        self.conv = keras.layers.Conv3D(
            filters, kernel, strides=1, padding="same", use_bias=use_bias,
            kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
            name=f"{name}_conv")

    def __call__(self, x):
        return self.conv(self.relu(self.bn(x)))


class _BlockMaker:
    """Binds the BatchNorm settings of a config so that blocks read ``make(name, filters, kernel)``."""

    def __init__(self, model_cfg, bn_trainable: bool):
        self.epsilon = model_cfg.bn_epsilon
        self.momentum = model_cfg.bn_momentum
        self.bn_trainable = bn_trainable
        self.normalization = model_cfg.normalization

    def __call__(self, name: str, filters: int, kernel: int, **kwargs) -> PreActBlock:
        return PreActBlock(name, filters, kernel, epsilon=self.epsilon, momentum=self.momentum,
                           bn_trainable=self.bn_trainable, normalization=self.normalization, **kwargs)


def opening_conv(name: str, filters: int, kernel: int):
    """A task's opening convolution: a Conv3D (no BN/ReLU before it, no bias, he_normal, 'same').

    It is an :class:`spirs_tf.layers.OpeningConv3D`: the same layer, variable and result as
    ``keras.layers.Conv3D``, evaluated fast on a CPU (large kernel, few input channels).
    """
    return OpeningConv3D(filters, kernel, strides=1, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=name)


def widths(base_filters: int) -> dict[str, int]:
    """Channel widths derived from ``base_filters`` (see the module docstring).

    Raises:
        ValueError: if ``base_filters`` is not an even integer >= 2 (``b/2`` must be a whole number).
    """
    b = int(base_filters)
    if b != base_filters or b < 2 or b % 2:
        raise ValueError(f"model.base_filters must be an even integer >= 2, got {base_filters}")
    return {"se1": b, "se2": [2 * b, 4 * b, 8 * b, 16 * b], "dec1": [8 * b, 8 * b, 4 * b, 4 * b, 2 * b, 2 * b],
            "dec2_1": b, "dec2_2": b // 2, "affine": [8 * b, 4 * b, 2 * b, b, b // 2]}


@dataclass
class EncoderFeatures:
    """Skip tensors of one encoder call. ``skip_a``: opening conv (level grid); ``skip_b``: SE1 output;
    ``skips``: the four SE2 outputs (coarsest grid, /2, /4, /8); ``extra``: pools added for the level."""

    skip_a: object
    skip_b: object
    skips: list
    extra: int

    @property
    def bottleneck(self):
        return self.skips[-1]


class SharedEncoder:
    """SE1 (one block, ``b`` filters) + SE2 (``2b, 4b, 8b, 16b``, MaxPool(2) after the first three).

    One set of layers shared by the affine, deformable and P1 paths at every level. The input is the
    output of a task's opening conv on a grid ``2**extra`` times the coarsest one; ``extra`` max-pools
    (``enc_level_pool``, no weights) make SE2 always run on the coarsest grid.
    """

    def __init__(self, model_cfg, bn_trainable: bool = True):
        w = widths(model_cfg.base_filters)
        make = _BlockMaker(model_cfg, bn_trainable)
        self.se1 = make("enc_se1", w["se1"], 3)
        self.se2 = [make(f"enc_se2_{k + 1}", f, 3) for k, f in enumerate(w["se2"])]
        self.pools = [keras.layers.MaxPooling3D(2, name=f"enc_se2_pool{k + 1}") for k in range(3)]
        self.level_pool = keras.layers.MaxPooling3D(2, name="enc_level_pool")

    def __call__(self, opening, extra: int) -> EncoderFeatures:
        if not 0 <= extra <= MAX_EXTRA_POOLS:
            raise ValueError(f"encoder: a level may be 1 to {2 ** MAX_EXTRA_POOLS}× the coarsest grid "
                             f"(extra poolings 0..{MAX_EXTRA_POOLS}), got extra={extra}")
        x = opening
        if extra >= 2:
            x = self.level_pool(x)
        skip_b = x = self.se1(x)
        if extra >= 1:
            x = self.level_pool(x)
        skips = []
        for k, block in enumerate(self.se2):
            x = block(x)
            skips.append(x)
            if k < 3:
                x = self.pools[k](x)
        return EncoderFeatures(skip_a=opening, skip_b=skip_b, skips=skips, extra=extra)


class AffineHead:
    """Bottleneck → 15 affine parameters → (B, 3, 4) matrix, identity at initialisation.

    Five BN-ReLU-Conv1³ blocks (``8b, 4b, 2b, b, b/2``) → Flatten → Dense(units, ReLU, he_normal) →
    Dropout → Dense(15, kernel zeros, bias = identity parameters ``[0,0,0, 0,0,0, 1,1,1, 0×6]``) →
    :class:`spirs_tf.layers.AffineMatrix` (translation, rotation, scale, shear → ``[M | t]``).
    With ``model.affine_radius`` r > 0 (not the authors'), Dense(15) starts at zero and a fixed
    ``aff_units`` rescaling maps its outputs to ``identity + (t, θ/r, (s−1)/r, h/r)`` (no weights).
    The Flatten size is ``(coarsest/8)³ · b/2``, the same at every level because SE2 always runs on
    the coarsest grid.
    """

    def __init__(self, model_cfg, bn_trainable: bool = True):
        w = widths(model_cfg.base_filters)
        make = _BlockMaker(model_cfg, bn_trainable)
        self.blocks = [make(f"aff_head{k + 1}", f, 1) for k, f in enumerate(w["affine"])]
        self.flatten = keras.layers.Flatten(name="aff_flatten")
        self.dense = keras.layers.Dense(model_cfg.affine_dense_units, activation="relu",
                                        kernel_initializer="he_normal", name="aff_dense")
        self.dropout = keras.layers.Dropout(model_cfg.affine_dropout, name="aff_dropout")
        radius = float(model_cfg.affine_radius)
        self.params = keras.layers.Dense(
            15, kernel_initializer="zeros",
            bias_initializer=keras.initializers.Constant([0.0 if radius > 0 else float(v) for v in IDENTITY_PARAMS]),
            name="aff_params")
        # affine_radius r > 0: the dense layer's outputs are "voxels of displacement at radius r" for every
        # parameter (translation 1, rotation/scale/shear 1/r), so that one unit of any output moves the
        # image about one voxel: the displacement loss is then about equally steep in all 15 directions
        # (with r = 0, the authors' raw parameters, a rotation output is ~r² times steeper than a translation)
        self.units = None if radius <= 0 else keras.layers.Rescaling(
            scale=[1.0] * 3 + [1.0 / radius] * 12, offset=[float(v) for v in IDENTITY_PARAMS],
            name="aff_units", dtype="float32")
        self.matrix = AffineMatrix(name="aff_matrix", dtype="float32")

    def __call__(self, bottleneck):
        """``(B, d, d, d, 16b)`` bottleneck → ``(B, 3, 4)`` float32 matrix in voxels of the level grid."""
        x = bottleneck
        for block in self.blocks:
            x = block(x)
        x = self.params(self.dropout(self.dense(self.flatten(x))))
        return self.matrix(x if self.units is None else self.units(x))


class Decoder:
    """U-Net decoder (Dec1, Dec2_1, Dec2_2) with three summed 1³ heads; ``prefix`` ``def`` or ``seg``.

    Dec1 on the coarsest grid: Conv1(8b) on skip4 → up → ⊕skip3 → Conv3(8b) → up → Conv1(4b) → ⊕skip2 →
    Conv3(4b) → up → Conv1(2b) → ⊕skip1 → Conv3(2b) = out1. Dec2_1: [up if extra ≥ 1] → Conv1(b) →
    ⊕skip_b → Conv3(b) = out2. Dec2_2: [up if extra ≥ 2] → Conv1(b/2) → ⊕skip_a → Conv3(b/2) = out3.
    (Every ConvN is a BN-ReLU-Conv block, ⊕ is channel concatenation, up the fixed ×2 upsampler.)

    Heads: BN-ReLU-Conv1³(``head_filters``, with bias) on out1, out2, out3, summed coarse to fine
    with the upsampler whenever the grid changes: ``up(up(h1) + h2) + h3`` at extra = 2,
    ``up(h1) + h2 + h3`` at extra = 1, ``h1 + h2 + h3`` at extra = 0.
    """

    def __init__(self, prefix: str, model_cfg, bn_trainable: bool, head_filters: int,
                 head_kernel_initializer, head_bias_initializer):
        w = widths(model_cfg.base_filters)
        make = _BlockMaker(model_cfg, bn_trainable)
        p = prefix
        d1 = w["dec1"]
        self.dec1 = [make(f"{p}_dec1_{k + 1}", f, 1 if k % 2 == 0 else 3) for k, f in enumerate(d1)]
        self.dec2_1 = [make(f"{p}_dec2_1_1", w["dec2_1"], 1), make(f"{p}_dec2_1_2", w["dec2_1"], 3)]
        self.dec2_2 = [make(f"{p}_dec2_2_1", w["dec2_2"], 1), make(f"{p}_dec2_2_2", w["dec2_2"], 3)]
        self.heads = [make(f"{p}_head{k + 1}", head_filters, 1, use_bias=True,
                           kernel_initializer=head_kernel_initializer,
                           bias_initializer=head_bias_initializer) for k in range(3)]
        self.prefix = p

    def __call__(self, feats: EncoderFeatures, tag: str):
        """``tag`` (e.g. ``"l2"``) makes the names of the per-call weightless layers unique."""
        p = f"{self.prefix}_{tag}"
        n_up = [0]

        def up(x):
            n_up[0] += 1
            return Upsample2x(name=f"{p}_up{n_up[0]}")(x)

        def cat(a, b, k):
            return keras.layers.Concatenate(axis=-1, name=f"{p}_cat{k}")([a, b])

        s1, s2, s3, s4 = feats.skips
        c1, c2, c3, c4, c5, c6 = self.dec1
        x = cat(up(c1(s4)), s3, 1)
        x = cat(c3(up(c2(x))), s2, 2)
        x = cat(c5(up(c4(x))), s1, 3)
        out1 = c6(x)
        x = up(out1) if feats.extra >= 1 else out1
        out2 = self.dec2_1[1](cat(self.dec2_1[0](x), feats.skip_b, 4))
        x = up(out2) if feats.extra >= 2 else out2
        out3 = self.dec2_2[1](cat(self.dec2_2[0](x), feats.skip_a, 5))

        h1, h2, h3 = (head(o) for head, o in zip(self.heads, (out1, out2, out3)))
        total = h1
        for k, (h, finer) in enumerate(((h2, feats.extra >= 1), (h3, feats.extra >= 2))):
            if finer:
                total = up(total)
            total = keras.layers.Add(name=f"{p}_headsum{k + 1}")([total, h])
        return total


def deformable_decoder(model_cfg, bn_trainable: bool = True) -> Decoder:
    """Decoder with three zero-initialised DVF heads (3 channels, kernel and bias zeros)."""
    return Decoder("def", model_cfg, bn_trainable, 3, "zeros", "zeros")


def segmentation_decoder(model_cfg, bn_trainable: bool = True) -> Decoder:
    """P1 decoder with three 1-channel heads (he_normal kernel, RetinaNet prior bias each).

    With ``model_cfg.seg_prior_split`` each head's bias is a third of the prior bias, so that the summed
    logits, not each head, start at ``seg_prior_probability``.
    """
    bias = prior_bias(model_cfg.seg_prior_probability)
    if model_cfg.seg_prior_split:
        bias /= 3.0
    return Decoder("seg", model_cfg, bn_trainable, 1, "he_normal", keras.initializers.Constant(bias))


class FusionBlock:
    """P2 residual fusion block (``fuse_``), at the full resolution of the model's finest level.

    Inputs ``[I_f, sigmoid(P1 logits), I_wD, GaussianBlur(S_wD, size, σ)]`` (4 channels) → plain
    Conv3³(``opening_filters``, no norm, no bias) = skip → BN-ReLU-Conv3³ → BN-ReLU-Conv3³ → + skip →
    BN-ReLU-Conv1³(1, bias = RetinaNet prior) → P2 logits ``(B, D, H, W, 1)``.

    With ``model_cfg.p2_residual`` (not the authors'): the head's kernel and bias start at zero and its
    output is added to P1's logits (``fuse_residual``; clipped to ±``p2_residual_clip`` first when > 0), so
    P2 starts with P1's mask and learns what the prior adds. With ``model_cfg.p2_gate_size`` > 0 as well
    (not the authors'), the fusion output may raise P1's logits only within ``p2_gate_size // 2`` voxels of
    the prior mask (``fuse_gate``, :class:`~spirs_tf.layers.PriorGate`) and lower them anywhere: P2 adds
    the lesions the prior marks and nothing elsewhere.
    """

    def __init__(self, model_cfg, bn_trainable: bool = True):
        f = model_cfg.opening_filters
        make = _BlockMaker(model_cfg, bn_trainable)
        self.residual = bool(getattr(model_cfg, "p2_residual", False))
        self.sigmoid = keras.layers.Activation("sigmoid", name="fuse_p1_sigmoid")
        self.blur = GaussianBlur3D(size=model_cfg.blur_size, sigma=model_cfg.blur_sigma, name="fuse_blur")
        self.concat = keras.layers.Concatenate(axis=-1, name="fuse_inputs")
        self.open = opening_conv("fuse_open", f, 3)
        self.block1 = make("fuse_block1", f, 3)
        self.block2 = make("fuse_block2", f, 3)
        self.add = keras.layers.Add(name="fuse_add")
        if self.residual:
            self.head = make("fuse_head", 1, 1, use_bias=True, kernel_initializer="zeros",
                             bias_initializer="zeros")
            self.to_p2 = keras.layers.Add(name="fuse_residual", dtype="float32")
            limit = float(getattr(model_cfg, "p2_residual_clip", 0.0))
            self.clip = ClipValues(limit, name="fuse_p1_clip") if limit > 0 else None
            gate = int(getattr(model_cfg, "p2_gate_size", 0))
            self.gate = PriorGate(gate, name="fuse_gate") if gate > 0 else None
        else:
            self.head = make("fuse_head", 1, 1, use_bias=True, kernel_initializer="he_normal",
                             bias_initializer=keras.initializers.Constant(
                                 prior_bias(model_cfg.seg_prior_probability)))

    def __call__(self, fixed_image, p1_logits, warped_image, warped_mask):
        x = self.concat([fixed_image, self.sigmoid(p1_logits), warped_image, self.blur(warped_mask)])
        skip = self.open(x)
        x = self.block2(self.block1(skip))
        out = self.head(self.add([x, skip]))
        if not self.residual:
            return out
        if self.gate is not None:
            out = self.gate([out, warped_mask])
        return self.to_p2([p1_logits if self.clip is None else self.clip(p1_logits), out])
