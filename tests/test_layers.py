"""Tests of spirs_tf.layers: wiring to the transform functions, dtype policy and serialization."""
from __future__ import annotations

import numpy as np
import pytest

from spirs_tf import geometry as G
from spirs_tf import layers as L
from spirs_tf import transforms as T
from spirs_tf._compat import keras

N = 8


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture
def data(rng):
    params = G.IDENTITY_PARAMS[None] + rng.normal(0, 0.1, (2, 15)).astype(np.float32)
    return {
        "moving": rng.normal(size=(2, N, N, N, 2)).astype(np.float32),
        "params": params,
        "matrix": G.params_to_matrix(params),
        "matrix2": G.params_to_matrix(G.IDENTITY_PARAMS[None] + rng.normal(0, 0.1, (2, 15)).astype(np.float32)),
        "dvf": rng.normal(0, 1, (2, N, N, N, 3)).astype(np.float32),
        "dvf2": rng.normal(0, 1, (2, N, N, N, 3)).astype(np.float32),
        "coarse_dvf": rng.normal(0, 1, (2, N // 2, N // 2, N // 2, 3)).astype(np.float32),
    }


# (layer factory, names of inputs in `data`, reference function of those inputs, expected config extras)
CASES = {
    "warp_affine": (lambda: L.SpatialTransformer(use_affine=True, use_dvf=False), ["moving", "matrix"],
                    lambda m, a: T.warp(m, a), {"use_affine": True, "use_dvf": False}),
    "warp_dvf": (lambda: L.SpatialTransformer(use_affine=False, use_dvf=True), ["moving", "dvf"],
                 lambda m, u: T.warp(m, dvf=u), {"use_affine": False, "use_dvf": True}),
    "warp_both": (lambda: L.SpatialTransformer(use_affine=True, use_dvf=True), ["moving", "matrix", "dvf"],
                  T.warp, {"use_affine": True, "use_dvf": True}),
    "affine_matrix": (L.AffineMatrix, ["params"], T.affine_params_to_matrix, {}),
    "scale_translation": (lambda: L.ScaleTranslation(factor=4.0), ["matrix"],
                          lambda a: T.scale_translation(a, 4.0), {"factor": 4.0}),
    "compose_affines": (L.ComposeAffines, ["matrix", "matrix2"], T.compose_affines, {}),
    "upsample_dvf": (L.UpsampleDVF, ["coarse_dvf"], T.upsample_dvf, {}),
    "compose_dvf": (L.ComposeDVF, ["dvf", "dvf2"], T.compose_dvf, {}),
    "upsample2x": (L.Upsample2x, ["moving"], T.upsample2x, {}),
    "blur": (lambda: L.GaussianBlur3D(size=3, sigma=0.7), ["moving"],
             lambda x: T.gaussian_blur(x, 3, 0.7), {"size": 3, "sigma": 0.7}),
    "subsample": (lambda: L.Subsample(factor=2), ["moving"], lambda x: T.subsample(x, 2), {"factor": 2}),
}


def call(layer, inputs):
    return layer(inputs if len(inputs) > 1 else inputs[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_is_its_function_and_round_trips_config(case, data):
    factory, names, fn, extras = CASES[case]
    layer = factory()
    inputs = [data[n] for n in names]
    out = np_(call(layer, inputs))
    np.testing.assert_array_equal(out, np_(fn(*inputs)))

    config = layer.get_config()
    for key, value in extras.items():
        assert config[key] == value
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    np.testing.assert_array_equal(np_(call(clone, inputs)), out)
    assert not layer.trainable_weights and not layer.weights


def test_spatial_transformer_exact_config():
    config = L.SpatialTransformer(use_affine=False, use_dvf=True, name="def_transformer").get_config()
    assert {k: config[k] for k in ("name", "use_affine", "use_dvf", "trainable")} == {
        "name": "def_transformer", "use_affine": False, "use_dvf": True, "trainable": True}
    assert keras.saving.get_registered_name(L.SpatialTransformer) == "spirs_tf>SpatialTransformer"


def test_spatial_transformer_input_errors(data):
    with pytest.raises(ValueError, match="use_affine=True and/or use_dvf=True"):
        L.SpatialTransformer(use_affine=False, use_dvf=False)
    with pytest.raises(ValueError, match=r"\['moving', 'matrix', 'dvf'\], got 2"):
        L.SpatialTransformer(use_affine=True, use_dvf=True)([data["moving"], data["matrix"]])
    with pytest.raises(ValueError, match="must equal the moving grid"):
        L.SpatialTransformer(use_affine=False, use_dvf=True)([data["moving"], data["coarse_dvf"]])


@pytest.mark.parametrize("bad", [{"size": 4}, {"sigma": -1.0}])
def test_gaussian_blur_layer_validates(bad):
    with pytest.raises(ValueError):
        L.GaussianBlur3D(**bad)
    assert L.GaussianBlur3D().trainable is False


def test_float32_under_mixed_precision(data):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        moving = keras.Input((N, N, N, 2), name="moving_image")
        matrix = keras.Input((3, 4), name="matrix")
        dvf = keras.Input((N, N, N, 3), name="dvf")
        half = keras.layers.Activation("linear")(moving)  # float16 under the policy
        warped = L.SpatialTransformer(use_affine=True, use_dvf=True)([half, matrix, dvf])
        upsampled = L.Upsample2x()(half)
        assert half.dtype == "float16"
        assert warped.dtype == "float32"
        assert upsampled.dtype == "float16"  # decoder operator follows the policy
        model = keras.Model([moving, matrix, dvf], warped)
        out = np_(model([data["moving"], data["matrix"], data["dvf"]]))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert out.dtype == np.float32
    expected = np_(T.warp(data["moving"].astype(np.float16), data["matrix"], data["dvf"]))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_tiny_functional_model_saves_and_loads(tmp_path, data):
    moving = keras.Input((N, N, N, 2), name="moving_image")
    params = keras.Input((15,), name="params")
    coarse = keras.Input((N // 2, N // 2, N // 2, 3), name="coarse_dvf")
    residual = keras.Input((N, N, N, 3), name="residual_dvf")
    matrix = L.AffineMatrix(name="aff_matrix")(params)
    composed = L.ComposeAffines(name="aff_compose")([L.ScaleTranslation(0.5, name="aff_scale")(matrix), matrix])
    u = L.ComposeDVF(name="def_compose")([L.UpsampleDVF(name="def_up")(coarse), residual])
    warped = L.SpatialTransformer(use_affine=True, use_dvf=True, name="warp")([moving, composed, u])
    affine_only = L.SpatialTransformer(name="warp_affine")([moving, matrix])
    blurred = L.GaussianBlur3D(5, 1.0, name="blur")(warped)
    smooth = L.Upsample2x(name="up")(L.Subsample(2, name="down")(blurred))
    model = keras.Model(
        {"moving_image": moving, "params": params, "coarse_dvf": coarse, "residual_dvf": residual},
        {"warped": warped, "affine_only": affine_only, "smooth": smooth, "dvf": u},
    )
    feed = {"moving_image": data["moving"], "params": data["params"],
            "coarse_dvf": data["coarse_dvf"], "residual_dvf": data["dvf"]}
    before = {k: np_(v) for k, v in model(feed).items()}

    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = {k: np_(v) for k, v in loaded(feed).items()}
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert isinstance(loaded.get_layer("warp"), L.SpatialTransformer)
    assert loaded.get_layer("blur").get_config()["size"] == 5
    assert loaded.get_layer("aff_scale").factor == 0.5

    # independent check of the wiring: the composed warp equals a direct reference computation
    a = G.params_to_matrix(data["params"])
    a_composed = np_(T.compose_affines(G.scale_translation(a, 0.5), a))
    u_ref = np_(T.compose_dvf(T.upsample_dvf(data["coarse_dvf"]), data["dvf"]))
    np.testing.assert_allclose(before["warped"], np_(T.warp(data["moving"], a_composed, u_ref)), atol=1e-5)
