"""The SPIRS pyramid: :func:`build_spirs` wires the blocks of :mod:`spirs_tf.blocks` into one functional
Keras model; :func:`build_finest_only` runs the finest level's registration modules alone (the
non-pyramidal proxy of the ablation); plus name-keyed helpers for variable groups, checkpoints and
parameter counts.

Composition (FACTS section B "Pyramid composition", decision 5), for a model with ``n`` levels whose
finest grid is ``S`` (level ``i`` has grid ``S / 2**(n−i)`` and inputs ``x[:, ::f, ::f, ::f]``,
``f = 2**(n−i)``):

* **Affine pyramid** (all levels first). ``A_1 = F_A([f_1, m_1])``. For ``i > 1``:
  ``A'_{i−1} = A_{i−1}`` with translation × 2; ``R_i = F_A([f_i, warp(m_i, A'_{i−1})])``;
  ``A_i = A'_{i−1} · R_i`` (4×4 product). ``A_final = A_n``.
* **Deformable pyramid** with ``A_final``, expressed on level ``i`` by dividing its translation by
  ``2**(n−i)`` (written ``A^(i)``). ``u_1 = F_D([f_1, subsample(warp(m_S, A_final), 2**(n−1))])``.
  For ``i > 1``: ``Ũ = 2·up(u_{i−1})``; ``r_i = F_D([f_i, warp(m_i, A^(i), Ũ)])``;
  ``u_i(x) = Ũ(x) + r_i(x + Ũ(x))``.
* **Segmentation**, only at the finest level: ``P1 = F_S(f_S)``;
  ``P2 = fusion([f_S, σ(P1), I_wD, blur(S_wD)])`` with ``I_wD, S_wD`` the finest warped outputs.

Outputs (a dict, each also the name of its output layer):

==============================  ================  ==========================================
key                             shape             meaning
==============================  ================  ==========================================
``affine_{i}``                  (B, 3, 4)         ``A_i``, translation in voxels of the S grid
``warped_affine_image_{i}``     (B, g, g, g, 1)   ``warp(m_i, A_i)`` on the level-i grid g
``warped_affine_mask_{i}``      (B, g, g, g, 1)   same for the moving mask (soft, trilinear)
``dvf_{i}``                     (B, g, g, g, 3)   ``u_i`` in level-i voxels
``warped_image_{i}``            (B, g, g, g, 1)   ``warp(m_i, A^(i), u_i)``
``warped_mask_{i}``             (B, g, g, g, 1)   same for the moving mask
``p1_logits``, ``p2_logits``    (B, S, S, S, 1)   segmentation logits (finest level only)
==============================  ================  ==========================================

Trainable weights live in layers named ``enc_*``, ``aff_*``, ``def_*``, ``seg_*``, ``fuse_*``; the
1-, 2- and 3-level models have exactly the same variable paths, so checkpoints are keyed by
``variable.path`` and move freely between stages (:func:`model_state`, :func:`load_model_state`).
"""
from __future__ import annotations

import numpy as np

from spirs_tf._compat import keras
from spirs_tf.blocks import (
    MAX_EXTRA_POOLS,
    AffineHead,
    FusionBlock,
    SharedEncoder,
    deformable_decoder,
    opening_conv,
    segmentation_decoder,
    widths,
)
from spirs_tf.errors import SpirsInputError
from spirs_tf.layers import (
    ComposeAffines,
    ComposeDVF,
    ScaleTranslation,
    SpatialTransformer,
    Subsample,
    UpsampleDVF,
)

__all__ = [
    "GROUPS",
    "INPUT_NAMES",
    "MODULE_PREFIXES",
    "build_spirs",
    "count_parameters",
    "load_model_state",
    "model_state",
    "output_keys",
    "parameter_counts",
    "variable_groups",
]

INPUT_NAMES = ("fixed_image", "moving_image", "moving_mask")
#: module prefix → the variable groups it belongs to (the encoder is trained by both tapes that use it)
MODULE_PREFIXES = {
    "enc": ("registration", "segmentation_p1"),
    "aff": ("registration",),
    "def": ("registration",),
    "seg": ("segmentation_p1",),
    "fuse": ("segmentation_p2",),
}
GROUPS = ("registration", "segmentation_p1", "segmentation_p2")
_LEVEL_KEYS = ("affine", "warped_affine_image", "warped_affine_mask", "dvf", "warped_image", "warped_mask")


def output_keys(levels: int) -> list[str]:
    """Names of the outputs of a ``levels``-level model, level by level, then ``p1_logits, p2_logits``."""
    return [f"{k}_{i}" for i in range(1, levels + 1) for k in _LEVEL_KEYS] + ["p1_logits", "p2_logits"]


def _check_levels(cfg, levels: int) -> None:
    n_max = cfg.model.num_levels
    if int(levels) != levels or not 1 <= levels <= n_max:
        raise SpirsInputError(f"config {cfg.name!r}: a model has 1..{n_max} levels "
                              f"(model.num_levels = {n_max}), got levels={levels}")
    if n_max - 1 > MAX_EXTRA_POOLS:
        raise SpirsInputError(
            f"config {cfg.name!r}: model.num_levels={n_max} is not supported; the shared encoder "
            f"(FACTS section B) defines at most {MAX_EXTRA_POOLS + 1} pyramid levels")
    try:
        widths(cfg.model.base_filters)
    except ValueError as exc:
        raise SpirsInputError(f"config {cfg.name!r}: {exc}") from None


def _named(x, name: str):
    """Give an output a stable layer name (and float32 dtype under a mixed-precision policy)."""
    return keras.layers.Activation("linear", dtype="float32", name=name)(x)


def build_spirs(cfg, levels: int, bn_trainable: bool = True) -> keras.Model:
    """Build the ``levels``-level SPIRS model (functional, un-compiled).

    Args:
        cfg: a :class:`spirs_tf.config.SpirsConfig`; uses ``cfg.data.grid_size`` and ``cfg.model``.
        levels: pyramid levels of this model, ``1..cfg.model.num_levels``; the inputs have the
            grid of level ``levels``, ``S = grid_size / 2**(num_levels − levels)``.
        bn_trainable: ``False`` builds every BatchNorm non-trainable; Keras 3 then runs them in
            inference mode (frozen statistics and β), as in the authors' stages 2 and 3.

    Returns:
        ``keras.Model`` with inputs ``fixed_image, moving_image, moving_mask`` (each ``(B, S, S, S, 1)``
        float32) and the dict of outputs listed in the module docstring (:func:`output_keys`).

    Raises:
        SpirsInputError: for ``levels`` outside ``1..num_levels``, more than three pyramid levels, or a
            ``base_filters`` that is not even.
    """
    _check_levels(cfg, levels)
    m = cfg.model
    size = cfg.level_grid(levels)

    encoder = SharedEncoder(m, bn_trainable)
    aff_open = opening_conv("aff_open", m.opening_filters, m.registration_kernel)
    def_open = opening_conv("def_open", m.opening_filters, m.registration_kernel)
    seg_open = opening_conv("seg_open", m.opening_filters, m.segmentation_kernel)
    aff_head = AffineHead(m, bn_trainable)
    def_dec = deformable_decoder(m, bn_trainable)
    seg_dec = segmentation_decoder(m, bn_trainable)
    fusion = FusionBlock(m, bn_trainable)

    inputs = {name: keras.Input((size, size, size, 1), name=name, dtype="float32") for name in INPUT_NAMES}
    fixed, moving, mask = (inputs[name] for name in INPUT_NAMES)

    def pyramid(x, name):
        """{level: strided subsample of x on that level's grid}."""
        return {i: x if i == levels else Subsample(2 ** (levels - i), name=f"{name}_l{i}")(x)
                for i in range(1, levels + 1)}

    f, mv, ms = pyramid(fixed, "fixed_image"), pyramid(moving, "moving_image"), pyramid(mask, "moving_mask")
    out = {}

    # ---- affine pyramid: A_1 = F_A([f1, m1]); A_i = A'_{i-1} · F_A([f_i, warp(m_i, A'_{i-1})])
    affine = {}
    for i in range(1, levels + 1):
        if i == 1:
            moving_in = mv[1]
        else:
            coarse = ScaleTranslation(2.0, name=f"aff_l{i}_coarse")(affine[i - 1])
            moving_in = SpatialTransformer(name=f"aff_l{i}_prewarp")([mv[i], coarse])
        x = keras.layers.Concatenate(axis=-1, name=f"aff_l{i}_inputs")([f[i], moving_in])
        feats = encoder(aff_open(x), extra=i - 1)
        step = aff_head(feats.bottleneck)
        affine[i] = step if i == 1 else ComposeAffines(name=f"aff_l{i}_compose")([coarse, step])

    for i in range(1, levels + 1):
        out[f"affine_{i}"] = ScaleTranslation(2.0 ** (levels - i), name=f"affine_{i}")(affine[i])
        out[f"warped_affine_image_{i}"] = SpatialTransformer(name=f"warped_affine_image_{i}")(
            [mv[i], affine[i]])
        out[f"warped_affine_mask_{i}"] = SpatialTransformer(name=f"warped_affine_mask_{i}")(
            [ms[i], affine[i]])

    # ---- deformable pyramid with A_final: u_1 from the finest affine warp, subsampled;
    #      u_i = Ũ + r_i(x + Ũ), Ũ = 2·up(u_{i-1}), r_i = F_D([f_i, warp(m_i, A_final^(i), Ũ)])
    a_final = affine[levels]
    a_level = {i: a_final if i == levels else
               ScaleTranslation(0.5 ** (levels - i), name=f"def_l{i}_affine")(a_final)
               for i in range(1, levels + 1)}
    dvf = {}
    for i in range(1, levels + 1):
        if i == 1:
            moving_in = out[f"warped_affine_image_{levels}"]  # = warp(m_S, A_final)
            if levels > 1:
                moving_in = Subsample(2 ** (levels - 1), name="def_l1_moving")(moving_in)
        else:
            coarse_u = UpsampleDVF(name=f"def_l{i}_upsample")(dvf[i - 1])
            moving_in = SpatialTransformer(use_affine=True, use_dvf=True, name=f"def_l{i}_prewarp")(
                [mv[i], a_level[i], coarse_u])
        x = keras.layers.Concatenate(axis=-1, name=f"def_l{i}_inputs")([f[i], moving_in])
        step = def_dec(encoder(def_open(x), extra=i - 1), tag=f"l{i}")
        dvf[i] = step if i == 1 else ComposeDVF(name=f"def_l{i}_compose")([coarse_u, step])

    for i in range(1, levels + 1):
        out[f"dvf_{i}"] = _named(dvf[i], f"dvf_{i}")
        for key, source in (("warped_image", mv[i]), ("warped_mask", ms[i])):
            out[f"{key}_{i}"] = SpatialTransformer(use_affine=True, use_dvf=True, name=f"{key}_{i}")(
                [source, a_level[i], dvf[i]])

    # ---- segmentation at the finest level only
    # P2 reads the named P1 output, so that the fusion block alone is the sub-model
    # (fixed_image, p1_logits, warped_image_L, warped_mask_L) → p2_logits (p2_head)
    out["p1_logits"] = _named(seg_dec(encoder(seg_open(fixed), extra=levels - 1), tag=f"l{levels}"), "p1_logits")
    p2 = fusion(fixed, out["p1_logits"], out[f"warped_image_{levels}"], out[f"warped_mask_{levels}"])
    out["p2_logits"] = _named(p2, "p2_logits")

    ordered = {key: out[key] for key in output_keys(levels)}
    return keras.Model(inputs=inputs, outputs=ordered, name=f"spirs_{levels}level")


def p2_head(model: keras.Model, levels: int) -> keras.Model:
    """The fusion block of ``model`` alone, sharing its weights: ``[fixed_image, p1_logits, warped_image,
    warped_mask] → p2_logits`` on the finest grid (all ``(B, S, S, S, 1)``).

    It gives P2 for a prior placed by another registration than the network's (``train.p2_prior =
    "truth"``; the refined registration of :mod:`spirs_tf.inference`) without running the model again.
    """
    return keras.Model([model.get_layer("fixed_image").output, model.get_layer("p1_logits").output,
                        model.get_layer(f"warped_image_{levels}").output,
                        model.get_layer(f"warped_mask_{levels}").output],
                       model.get_layer("p2_logits").output, name=f"{model.name}_p2_head")


# ------------------------------------------------------------------------------ variables and state
def build_finest_only(cfg, levels: int) -> keras.Model:
    """The registration modules of the finest level run ONCE, without the coarse-to-fine pyramid.

    ``A = F_A([f_S, m_S])`` and ``u = F_D([f_S, warp(m_S, A)])`` with the same (shared) layers as
    :func:`build_spirs` at level ``levels`` (the encoder pools ``levels − 1`` extra
    times, as it does there), so a pyramid checkpoint loads by variable path. This is the cheap proxy
    for the paper's non-pyramidal network (Table 3): same weights, no coarse initialisation. It is NOT a
    network trained without the pyramid.

    Returns:
        ``keras.Model`` with the SPIRS inputs and outputs ``affine_L, warped_affine_image_L,
        warped_affine_mask_L, dvf_L, warped_image_L, warped_mask_L`` (``L = levels``) on the grid
        ``S = cfg.level_grid(levels)``.
    """
    m, n = cfg.model, int(levels)
    size = cfg.level_grid(n)
    encoder = SharedEncoder(m, False)
    aff_open = opening_conv("aff_open", m.opening_filters, m.registration_kernel)
    def_open = opening_conv("def_open", m.opening_filters, m.registration_kernel)
    aff_head, def_dec = AffineHead(m, False), deformable_decoder(m, False)
    inputs = {k: keras.Input((size, size, size, 1), name=k, dtype="float32") for k in INPUT_NAMES}
    fixed, moving, mask = (inputs[k] for k in INPUT_NAMES)
    x = keras.layers.Concatenate(axis=-1, name="single_aff_inputs")([fixed, moving])
    affine = aff_head(encoder(aff_open(x), extra=n - 1).bottleneck)
    out = {f"affine_{n}": keras.layers.Activation("linear", dtype="float32", name=f"affine_{n}")(affine)}
    out[f"warped_affine_image_{n}"] = SpatialTransformer(name=f"warped_affine_image_{n}")([moving, affine])
    out[f"warped_affine_mask_{n}"] = SpatialTransformer(name=f"warped_affine_mask_{n}")([mask, affine])
    x = keras.layers.Concatenate(axis=-1, name="single_def_inputs")([fixed, out[f"warped_affine_image_{n}"]])
    dvf = def_dec(encoder(def_open(x), extra=n - 1), tag=f"single{n}")
    out[f"dvf_{n}"] = keras.layers.Activation("linear", dtype="float32", name=f"dvf_{n}")(dvf)
    for key, src in ((f"warped_image_{n}", moving), (f"warped_mask_{n}", mask)):
        out[key] = SpatialTransformer(use_affine=True, use_dvf=True, name=key)([src, affine, dvf])
    return keras.Model(inputs=inputs, outputs=out, name="spirs_finest_only")


def _unique(variables):
    seen, result = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            result.append(v)
    return result


def _module_of(variable) -> str:
    """Module prefix (``enc``, ``aff``, …) of a variable, from its layer name (``<layer>/<weight>``)."""
    parts = variable.path.split("/")
    layer = parts[-2] if len(parts) >= 2 else parts[0]
    return layer.split("_", 1)[0]


def variable_groups(model, p1_trains_encoder: bool = True) -> dict[str, list]:
    """Trainable variables per optimiser: ``registration`` (enc + aff + def), ``segmentation_p1``
    (enc + seg; seg alone when not ``p1_trains_encoder``), ``segmentation_p2`` (fuse). Each variable
    appears once per group; by default the encoder is in the first two.

    Raises:
        ValueError: if a trainable variable's layer has no known module prefix.
    """
    groups = {g: [] for g in GROUPS}
    for v in _unique(model.trainable_variables):
        module = _module_of(v)
        if module not in MODULE_PREFIXES:
            raise ValueError(f"trainable variable {v.path!r} has no module prefix "
                             f"({', '.join(p + '_' for p in MODULE_PREFIXES)})")
        for g in MODULE_PREFIXES[module]:
            if g == "segmentation_p1" and module == "enc" and not p1_trains_encoder:
                continue
            groups[g].append(v)
    return groups


def batchnorm_layers(model, modules) -> list:
    """The BatchNormalization layers of ``model`` whose names start with one of the module prefixes
    ``modules`` (e.g. ``("seg",)``), in build order, each once (the pyramid levels share them)."""
    prefixes = tuple(f"{m}_" for m in modules)
    found = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):  # Keras walks nested layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.name.startswith(prefixes):
            found.setdefault(id(layer), layer)
    return list(found.values())


def count_parameters(model) -> int:
    """Number of unique trainable scalars (shared layers counted once)."""
    return int(sum(int(np.prod(v.shape)) for v in _unique(model.trainable_variables)))


def parameter_counts(model) -> dict[str, int]:
    """Unique trainable scalars per module prefix (``enc``, ``aff``, ``def``, ``seg``, ``fuse``)."""
    counts = {p: 0 for p in MODULE_PREFIXES}
    for v in _unique(model.trainable_variables):
        module = _module_of(v)
        counts[module] = counts.get(module, 0) + int(np.prod(v.shape))
    return counts


def _weights_by_path(model) -> dict:
    """Every weight (trainable and non-trainable, e.g. BatchNorm moving statistics) keyed by path."""
    result = {}
    for v in _unique(model.weights):
        if v.path in result:
            raise ValueError(f"two weights share the path {v.path!r}; layer names must be unique")
        result[v.path] = v
    return result


def model_state(model) -> dict[str, np.ndarray]:
    """``{variable.path: value}`` for every weight of ``model``, including BatchNorm moving statistics
    (random-generator states are not weights and are left out). Values are NumPy copies."""
    return {path: np.array(keras.ops.convert_to_numpy(v)) for path, v in _weights_by_path(model).items()}


def load_model_state(model, state: dict, allow_missing: bool = False) -> None:
    """Assign ``state`` (from :func:`model_state`) to ``model`` by variable path.

    Args:
        model: the model to fill in place.
        state: ``{path: array}``.
        allow_missing: if True, weights of ``model`` absent from ``state`` keep their values.

    Raises:
        SpirsInputError: listing every unexpected path (in ``state`` but not in ``model``), every
            shape mismatch and, unless ``allow_missing``, every missing path. Nothing is assigned then.
    """
    own = _weights_by_path(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{p}: model {tuple(own[p].shape)} vs state {tuple(np.shape(state[p]))}"
                  for p in sorted(set(own) & set(state)) if tuple(own[p].shape) != tuple(np.shape(state[p]))]
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {'; '.join(mismatched)}")
    if problems:
        raise SpirsInputError(f"model state does not fit model {model.name!r} — " + " | ".join(problems))
    for path, value in state.items():
        own[path].assign(np.asarray(value, dtype=own[path].dtype))
