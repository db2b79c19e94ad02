"""Tests of the SPIRS network (spirs_tf.blocks, spirs_tf.networks) at the `test` width (base 2, grid 32)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from spirs_tf import networks
from spirs_tf._compat import keras, tf
from spirs_tf.blocks import SharedEncoder, deformable_decoder, opening_conv, prior_bias
from spirs_tf.config import MODULE_NAMES, get_config
from spirs_tf.errors import SpirsInputError
from spirs_tf.geometry import IDENTITY_PARAMS, sample_locations, scale_translation
from spirs_tf.transforms import upsample2x

IDENTITY = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1).astype(np.float32)


@pytest.fixture(autouse=True)
def seeded():
    """Deterministic weight initialisation in every test."""
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="module")
def cfg():
    return get_config("test")


def make_inputs(cfg, levels, rng, batch=1):
    s = cfg.level_grid(levels)
    shape = (batch, s, s, s, 1)
    return {
        "fixed_image": rng.random(shape, dtype=np.float32),
        "moving_image": rng.random(shape, dtype=np.float32),
        "moving_mask": (rng.random(shape) > 0.7).astype(np.float32),
    }


def coarser(inputs, factor=2):
    return {k: np.ascontiguousarray(v[:, ::factor, ::factor, ::factor]) for k, v in inputs.items()}


def run(model, inputs, training=False):
    return {k: keras.ops.convert_to_numpy(v) for k, v in model(inputs, training=training).items()}


def randomise(model, rng, affine=True):
    """Make a model non-trivial: random BatchNorm β and moving statistics, random DVF/seg heads and,
    if ``affine``, a random affine output layer (else it stays at the identity initialisation)."""
    for v in model.weights:
        name, shape = v.path, tuple(v.shape)
        if name.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 2.0, shape).astype(np.float32))
        elif name.endswith(("moving_mean", "bn/beta")):
            v.assign(rng.normal(0, 0.1, shape).astype(np.float32))
        elif "_head" in name and name.startswith(("def_", "seg_")) and name.endswith("conv/kernel"):
            v.assign(rng.normal(0, 0.3, shape).astype(np.float32))
        elif name.startswith("def_head") and name.endswith("conv/bias"):
            v.assign(rng.normal(0, 0.3, shape).astype(np.float32))
        elif name == "aff_params/kernel":
            v.assign(rng.normal(0, 0.02, shape).astype(np.float32) if affine else np.zeros(shape, np.float32))
        elif name == "aff_params/bias":  # identity, or a random affine (also when the ReLUs are dead)
            noise = np.concatenate([rng.normal(0, 0.5, 3), rng.normal(0, 0.03, 12)]) if affine else 0.0
            v.assign((IDENTITY_PARAMS + noise).astype(np.float32))
        elif name == "aff_dense/bias":
            v.assign(np.full(shape, 0.1, np.float32))


# ------------------------------------------------------------------------------------------ wiring
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_outputs_and_identity_at_initialisation(cfg, levels, rng):
    model = networks.build_spirs(cfg, levels)
    assert sorted(t.name for t in model.inputs) == sorted(networks.INPUT_NAMES)
    assert sorted(model.output_names) == sorted(networks.output_keys(levels))
    inputs = make_inputs(cfg, levels, rng, batch=2)
    s = cfg.level_grid(levels)
    for training in (False, True):
        out = run(model, inputs, training=training)
        assert list(out) == networks.output_keys(levels)
        for i in range(1, levels + 1):
            g = cfg.level_grid(i)
            f = 2 ** (levels - i)
            m_i = inputs["moving_image"][:, ::f, ::f, ::f]
            s_i = inputs["moving_mask"][:, ::f, ::f, ::f]
            assert out[f"affine_{i}"].shape == (2, 3, 4)
            np.testing.assert_allclose(out[f"affine_{i}"], np.broadcast_to(IDENTITY, (2, 3, 4)), atol=1e-6)
            assert out[f"dvf_{i}"].shape == (2, g, g, g, 3)
            np.testing.assert_array_equal(out[f"dvf_{i}"], 0.0)
            for key, ref in (("warped_affine_image", m_i), ("warped_affine_mask", s_i),
                             ("warped_image", m_i), ("warped_mask", s_i)):
                assert out[f"{key}_{i}"].shape == (2, g, g, g, 1)
                np.testing.assert_allclose(out[f"{key}_{i}"], ref, atol=1e-6, err_msg=f"{key}_{i}")
        for key in ("p1_logits", "p2_logits"):
            assert out[key].shape == (2, s, s, s, 1)
            assert np.isfinite(out[key]).all()
            assert out[key].dtype == np.float32


def test_prior_bias_and_head_initialisation(cfg):
    p = cfg.model.seg_prior_probability
    b = prior_bias(p)
    assert 1.0 / (1.0 + np.exp(-b)) == pytest.approx(p, rel=1e-12)
    assert b == pytest.approx(-4.59511985, abs=1e-7)
    with pytest.raises(ValueError, match="seg_prior_probability"):
        prior_bias(0.0)
    model = networks.build_spirs(cfg, 1)
    for name in ("seg_head1_conv", "seg_head2_conv", "seg_head3_conv", "fuse_head_conv"):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model.get_layer(name).bias), b, rtol=1e-6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("aff_params").kernel), 0.0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("aff_params").bias),
                                  [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    # opening convs, pre-activation blocks: no conv bias, BatchNorm without scale
    assert model.get_layer("aff_open").kernel.shape == (7, 7, 7, 2, cfg.model.opening_filters)
    assert model.get_layer("def_open").kernel.shape == (7, 7, 7, 2, cfg.model.opening_filters)
    assert model.get_layer("seg_open").kernel.shape == (3, 3, 3, 1, cfg.model.opening_filters)
    assert model.get_layer("fuse_open").kernel.shape == (3, 3, 3, 4, cfg.model.opening_filters)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv3D) and "_head" not in layer.name:
            assert not layer.use_bias, layer.name
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.center and not layer.scale and layer.epsilon == 1e-5 and layer.momentum == 0.99


def test_split_prior_makes_the_summed_p1_heads_start_at_the_prior(cfg):
    """seg_prior_split: each P1 head gets b/3, so P1 = head1 + head2 + head3 starts at p, not at σ(3b) ≈ 1e-6."""
    b = prior_bias(cfg.model.seg_prior_probability)
    split = copy.deepcopy(cfg)
    split.model.seg_prior_split = True
    model = networks.build_spirs(split, 1)
    biases = [float(keras.ops.convert_to_numpy(model.get_layer(f"seg_head{k}_conv").bias)[0]) for k in (1, 2, 3)]
    assert sum(biases) == pytest.approx(b, rel=1e-6)
    assert biases[0] == pytest.approx(b / 3, rel=1e-6)
    # P2 has one head: its bias is the prior either way
    assert float(keras.ops.convert_to_numpy(model.get_layer("fuse_head_conv").bias)[0]) == pytest.approx(b, rel=1e-6)
    # with zeroed head kernels the P1 logits are exactly the summed biases
    for k in (1, 2, 3):
        layer = model.get_layer(f"seg_head{k}_conv")
        layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    s = split.level_grid(1)
    x = np.random.default_rng(0).random((1, s, s, s, 1)).astype("float32")
    out = model({"fixed_image": x, "moving_image": x, "moving_mask": np.zeros_like(x)}, training=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["p1_logits"]), b, rtol=1e-5)


def _expected_parameters(b: int, o: int, dense: int, coarsest: int) -> int:
    """Unique trainable scalars from the FACTS section-B arithmetic (conv kernels + BN β + biases)."""
    def block(cin, cout, k, bias=False):  # BN(β on cin) + conv
        return cin + k ** 3 * cin * cout + (cout if bias else 0)

    enc = block(o, b, 3) + block(b, 2 * b, 3) + block(2 * b, 4 * b, 3) + block(4 * b, 8 * b, 3) \
        + block(8 * b, 16 * b, 3)
    aff = 7 ** 3 * 2 * o
    cin = 16 * b
    for cout in (8 * b, 4 * b, 2 * b, b, b // 2):
        aff += block(cin, cout, 1)
        cin = cout
    aff += (coarsest // 8) ** 3 * (b // 2) * dense + dense + dense * 15 + 15

    def decoder(open_k, open_cin, head):
        p = open_k ** 3 * open_cin * o
        p += block(16 * b, 8 * b, 1) + block(16 * b, 8 * b, 3) + block(8 * b, 4 * b, 1) + block(8 * b, 4 * b, 3)
        p += block(4 * b, 2 * b, 1) + block(4 * b, 2 * b, 3)
        p += block(2 * b, b, 1) + block(2 * b, b, 3) + block(b, b // 2, 1) + block(b // 2 + o, b // 2, 3)
        p += block(2 * b, head, 1, True) + block(b, head, 1, True) + block(b // 2, head, 1, True)
        return p

    fuse = 27 * 4 * o + 2 * block(o, o, 3) + block(o, 1, 1, True)
    return enc + aff + decoder(7, 2, 3) + decoder(3, 1, 1) + fuse


def test_parameters_identical_across_levels(cfg):
    models = [networks.build_spirs(cfg, n) for n in (1, 2, 3)]
    counts = [networks.count_parameters(m) for m in models]
    m = cfg.model
    expected = _expected_parameters(m.base_filters, m.opening_filters, m.affine_dense_units, cfg.level_grid(1))
    assert counts == [expected] * 3
    paths = [sorted(v.path for v in model.trainable_variables) for model in models]
    assert paths[0] == paths[1] == paths[2]
    assert len(set(paths[0])) == len(paths[0])
    all_paths = [sorted(v.path for v in model.weights) for model in models]
    assert all_paths[0] == all_paths[1] == all_paths[2]
    assert sum(networks.parameter_counts(models[0]).values()) == expected
    frozen = networks.build_spirs(cfg, 2, bn_trainable=False)
    assert not any("_bn/" in v.path for v in frozen.trainable_variables)
    assert sorted(v.path for v in frozen.weights) == all_paths[0]


def test_paper_width_parameter_count():
    """The paper model (base 64, 128³) has the authors' ≈ 59.0 M unique trainable parameters."""
    cfg = get_config("paper")
    model = networks.build_spirs(cfg, 1)
    count = networks.count_parameters(model)
    assert count == _expected_parameters(64, 32, 128, cfg.level_grid(1))
    assert abs(count - 59.0e6) < 0.05e6
    per_module = networks.parameter_counts(model)
    assert abs(per_module["enc"] - 18.86e6) < 0.01e6


def test_variable_groups_partition(cfg):
    model = networks.build_spirs(cfg, 2)
    groups = networks.variable_groups(model)
    assert set(groups) == {"registration", "segmentation_p1", "segmentation_p2"}
    prefixes = {g: {v.path.split("_", 1)[0] for v in vs} for g, vs in groups.items()}
    assert prefixes == {"registration": {"enc", "aff", "def"}, "segmentation_p1": {"enc", "seg"},
                        "segmentation_p2": {"fuse"}}
    for vs in groups.values():
        assert len({id(v) for v in vs}) == len(vs)
    grouped = {id(v) for vs in groups.values() for v in vs}
    assert grouped == {id(v) for v in model.trainable_variables}
    enc = [v for v in model.trainable_variables if v.path.startswith("enc_")]
    assert {id(v) for v in enc} == {id(v) for v in groups["registration"]} & {id(v) for v in groups["segmentation_p1"]}
    # the config validates module names against its own Keras-free copy of the prefixes
    assert set(networks.MODULE_PREFIXES) == set(MODULE_NAMES)
    # loss.p1_trains_encoder = False: the encoder stays with the registration optimiser only
    kept = networks.variable_groups(model, p1_trains_encoder=False)
    assert {id(v) for v in kept["segmentation_p1"]} == {id(v) for v in groups["segmentation_p1"]} - {id(v) for v in enc}
    assert {id(v) for v in kept["registration"]} == {id(v) for v in groups["registration"]}
    assert {id(v) for v in kept["segmentation_p2"]} == {id(v) for v in groups["segmentation_p2"]}


def test_p2_wiring_gradients(cfg, rng):
    model = networks.build_spirs(cfg, 2)
    inputs = {k: tf.convert_to_tensor(v) for k, v in make_inputs(cfg, 2, rng).items()}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(list(inputs.values()))
        out = model(inputs, training=False)
        p1, p2 = tf.reduce_sum(out["p1_logits"]), tf.reduce_sum(out["p2_logits"])
    for source in ("moving_image", "moving_mask", "fixed_image"):
        grad = tape.gradient(p2, inputs[source])
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0, source
    assert float(tf.reduce_max(tf.abs(tape.gradient(p1, inputs["fixed_image"])))) > 0
    for source in ("moving_image", "moving_mask"):
        grad = tape.gradient(p1, inputs[source])
        assert grad is None or float(tf.reduce_max(tf.abs(grad))) == 0.0, source


def test_decoder_heads_nested_sum(cfg):
    """At extra = 2 the DVF is up(up(h1) + h2) + h3; with zero head kernels h_k = bias_k."""
    m = cfg.model
    encoder, dec = SharedEncoder(m), deformable_decoder(m)
    g = cfg.level_grid(3)
    x = keras.Input((g, g, g, 2))
    feats = encoder(opening_conv("def_open", m.opening_filters, 7)(x), extra=2)
    model = keras.Model(x, dec(feats, tag="l3"))
    biases = [np.array([1.0, -2.0, 0.5]), np.array([0.25, 0.0, -1.0]), np.array([3.0, 1.0, 2.0])]
    for k, bias in enumerate(biases):
        model.get_layer(f"def_head{k + 1}_conv").bias.assign(bias.astype(np.float32))
    got = keras.ops.convert_to_numpy(model(np.random.default_rng(1).random((1, g, g, g, 2), np.float32)))
    c = cfg.level_grid(1)
    h = [np.broadcast_to(b.astype(np.float32), (1, n, n, n, 3)) for b, n in zip(biases, (c, 2 * c, 4 * c))]
    want = keras.ops.convert_to_numpy(upsample2x(upsample2x(h[0]) + h[1])) + h[2]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, sum(b for b in biases))  # the halved last planes are there


# ------------------------------------------------------------------------------------ state and I/O
@pytest.mark.parametrize("small", [1, 2])
def test_finer_model_loads_coarser_state(cfg, small, rng):
    """A (small+1)-level model with the small model's weights reproduces its levels 1..small."""
    a = networks.build_spirs(cfg, small, bn_trainable=False)
    b = networks.build_spirs(cfg, small + 1, bn_trainable=False)
    inputs_b = make_inputs(cfg, small + 1, rng)
    inputs_a = coarser(inputs_b)
    for affine in (True, False):
        randomise(a, rng, affine=affine)
        networks.load_model_state(b, networks.model_state(a))
        out_a, out_b = run(a, inputs_a), run(b, inputs_b)
        for i in range(1, small + 1):
            np.testing.assert_allclose(out_b[f"affine_{i}"], scale_translation(out_a[f"affine_{i}"], 2.0),
                                       atol=1e-5)
            for key in ("warped_affine_image", "warped_affine_mask"):
                np.testing.assert_allclose(out_b[f"{key}_{i}"], out_a[f"{key}_{i}"], atol=1e-5)
            if affine:
                assert np.abs(out_a[f"affine_{i}"] - IDENTITY).max() > 1e-3  # non-trivial check
            else:  # identity affine at every level: the deformable levels must match too
                assert np.abs(out_a[f"dvf_{i}"]).max() > 1e-2
                for key in ("dvf", "warped_image", "warped_mask"):
                    np.testing.assert_allclose(out_b[f"{key}_{i}"], out_a[f"{key}_{i}"], atol=1e-5,
                                               err_msg=f"{key}_{i}")


def test_load_model_state_errors(cfg):
    model = networks.build_spirs(cfg, 1)
    state = networks.model_state(model)
    assert any(p.endswith("moving_mean") for p in state)
    assert set(state) == {v.path for v in model.weights}
    bad = dict(state)
    del bad["aff_dense/bias"]
    bad["enc_se1_conv/kernel"] = np.zeros((1, 2, 3), np.float32)
    bad["nonsense/kernel"] = np.zeros(3, np.float32)
    with pytest.raises(SpirsInputError) as info:
        networks.load_model_state(model, bad)
    msg = str(info.value)
    assert "aff_dense/bias" in msg and "nonsense/kernel" in msg and "enc_se1_conv/kernel" in msg
    before = networks.model_state(model)
    partial = {"aff_dense/bias": np.full(cfg.model.affine_dense_units, 0.5, np.float32)}
    networks.load_model_state(model, partial, allow_missing=True)
    after = networks.model_state(model)
    np.testing.assert_array_equal(after["aff_dense/bias"], 0.5)
    np.testing.assert_array_equal(after["aff_dense/kernel"], before["aff_dense/kernel"])
    with pytest.raises(SpirsInputError, match="missing"):
        networks.load_model_state(model, partial)


def test_invalid_levels_and_width(cfg):
    with pytest.raises(SpirsInputError, match="levels"):
        networks.build_spirs(cfg, 4)
    with pytest.raises(SpirsInputError, match="levels"):
        networks.build_spirs(cfg, 0)
    odd = get_config("test", ["model.base_filters=3"])
    with pytest.raises(SpirsInputError, match="base_filters"):
        networks.build_spirs(odd, 1)


def test_frozen_batchnorm_keeps_statistics(cfg, rng):
    inputs = make_inputs(cfg, 1, rng, batch=2)
    frozen = networks.build_spirs(cfg, 1, bn_trainable=False)
    before = networks.model_state(frozen)
    run(frozen, inputs, training=True)
    after = networks.model_state(frozen)
    for path in before:
        np.testing.assert_array_equal(before[path], after[path], err_msg=path)
    live = networks.build_spirs(cfg, 1, bn_trainable=True)
    before = networks.model_state(live)["enc_se1_bn/moving_mean"]
    run(live, inputs, training=True)
    assert np.abs(networks.model_state(live)["enc_se1_bn/moving_mean"] - before).max() > 0


def test_save_and_load_roundtrip(cfg, rng, tmp_path):
    model = networks.build_spirs(cfg, 2, bn_trainable=False)
    randomise(model, rng)
    inputs = make_inputs(cfg, 2, rng)
    want = run(model, inputs)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    got = run(loaded, inputs)
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert sorted(networks.model_state(loaded)) == sorted(networks.model_state(model))
    assert networks.count_parameters(loaded) == networks.count_parameters(model)


def _reference_warp(volume, matrix, dvf=None):
    """scipy trilinear warp with zero padding at p(x) = M(x − c) + t + u(x) + c (geometry.sample_locations)."""
    from scipy.ndimage import map_coordinates

    coords = sample_locations(matrix, volume.shape, dvf)
    return map_coordinates(volume.astype(np.float64), coords, order=1, mode="grid-constant", cval=0.0)


def test_warped_outputs_follow_the_composition(cfg, rng):
    """Affine outputs use A_i; deformable outputs use A_final (rescaled to the level) plus dvf_i."""
    levels = 2
    model = networks.build_spirs(cfg, levels, bn_trainable=False)
    randomise(model, rng, affine=True)
    inputs = make_inputs(cfg, levels, rng)
    out = run(model, inputs)
    a_final = out[f"affine_{levels}"][0]
    assert np.abs(out["affine_1"][0] - a_final).max() > 1e-3  # A_1 and A_final differ
    for i in range(1, levels + 1):
        f = 2 ** (levels - i)
        for key, name in (("image", "moving_image"), ("mask", "moving_mask")):
            vol = inputs[name][0, ::f, ::f, ::f, 0]
            want = _reference_warp(vol, scale_translation(out[f"affine_{i}"][0], 1.0 / f))
            np.testing.assert_allclose(out[f"warped_affine_{key}_{i}"][0, ..., 0], want, atol=1e-4)
            want = _reference_warp(vol, scale_translation(a_final, 1.0 / f), out[f"dvf_{i}"][0])
            np.testing.assert_allclose(out[f"warped_{key}_{i}"][0, ..., 0], want, atol=1e-4)


# ------------------------------------------------------------------------ model.normalization
def test_instance_normalisation_is_per_sample_and_the_same_in_training(cfg, rng):
    """``model.normalization=instance``: no BatchNorm left; a sample's outputs do not depend on the
    other samples of its batch nor on the mode (the cpu-medium affine head failed on exactly that)."""
    inst = get_config("test")  # two levels: a 16³ coarsest grid, a 2³ bottleneck
    inst.model.num_levels, inst.train.stages, inst.model.normalization = 2, inst.train.stages[:2], "instance"
    inst.validate()
    model = networks.build_spirs(inst, 2, bn_trainable=True)
    assert not [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    norms = [l for l in model.layers if isinstance(l, keras.layers.GroupNormalization)]
    assert norms and all(l.name.endswith("_in") for l in norms)
    for v in model.weights:  # non-trivial β and affine output
        if v.path.endswith("_in/beta"):
            v.assign(rng.normal(0, 0.3, tuple(v.shape)).astype(np.float32))
        elif v.path == "aff_params/kernel":
            v.assign(rng.normal(0, 0.02, tuple(v.shape)).astype(np.float32))
    pair = make_inputs(inst, 2, rng, batch=2)
    both = run(model, pair, training=False)
    alone = run(model, {k: v[:1] for k, v in pair.items()}, training=False)
    for key in ("affine_2", "dvf_2", "p1_logits", "p2_logits"):
        np.testing.assert_allclose(both[key][:1], alone[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert np.abs(both["affine_2"][0] - both["affine_2"][1]).max() > 1e-4  # the samples differ
    trained = run(model, pair, training=True)  # P1 (no dropout on its path): batch statistics are not used
    np.testing.assert_allclose(trained["p1_logits"], both["p1_logits"], rtol=1e-4, atol=1e-5)


def test_instance_normalisation_matches_numpy(rng):
    """One block's normalisation = (x − mean) / sqrt(var + ε) + β per sample and channel, over space."""
    from spirs_tf.blocks import PreActBlock

    block = PreActBlock("t", 2, 1, epsilon=1e-5, momentum=0.99, normalization="instance")
    x = (rng.random((2, 5, 4, 3, 3)) * 4 + 1).astype(np.float32)
    block(keras.Input((5, 4, 3, 3)))
    beta = rng.normal(0, 1, 3).astype(np.float32)
    block.bn.beta.assign(beta)
    got = keras.ops.convert_to_numpy(block.bn(x))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5) + beta, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        PreActBlock("u", 2, 1, epsilon=1e-5, momentum=0.99, normalization="layer")
    with pytest.raises(SpirsInputError, match="model.normalization"):
        get_config("test", ["model.normalization=group"])
    with pytest.raises(SpirsInputError, match="bottleneck"):  # test: 8³ coarsest grid, 1³ bottleneck
        get_config("test", ["model.normalization=instance"])


def test_affine_radius_rescales_the_head_outputs(rng):
    """``model.affine_radius`` r: identity at initialisation; a raw output v gives the parameters
    identity + (v_t, v_rest / r), checked against geometry.params_to_matrix."""
    from spirs_tf.geometry import params_to_matrix

    cfg = get_config("test", ["model.affine_radius=4"])
    model = networks.build_spirs(cfg, 1, bn_trainable=False)
    inputs = make_inputs(cfg, 1, rng)
    np.testing.assert_allclose(run(model, inputs)["affine_1"][0], np.eye(3, 4), atol=1e-6)
    raw = np.concatenate([rng.normal(0, 2, 3), rng.normal(0, 0.5, 12)]).astype(np.float32)
    model.get_layer("aff_params").bias.assign(raw)
    expected = params_to_matrix(IDENTITY_PARAMS + raw * np.r_[np.ones(3), np.full(12, 0.25)])
    np.testing.assert_allclose(run(model, inputs)["affine_1"][0], expected, rtol=1e-5, atol=1e-5)
    assert not model.get_layer("aff_units").weights  # a fixed map: checkpoints keep their layout
    with pytest.raises(SpirsInputError, match="affine_radius"):
        get_config("test", ["model.affine_radius=-1"])
