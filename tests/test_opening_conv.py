"""spirs_tf.layers.OpeningConv3D: the shifted-copies convolution equals a plain Conv3D.

Forward values and both gradients (input and kernel) are compared with ``tf.nn.conv3d`` /
``keras.layers.Conv3D`` on odd and even sizes, odd and even kernels, both paddings and every
stacking axis, so the 'same' borders are covered. The layer shares Conv3D's variable and config.
"""
from __future__ import annotations

import numpy as np
import pytest

from spirs_tf import layers as L
from spirs_tf._compat import keras, tf

pytestmark = pytest.mark.skipif(tf is None, reason="the fast path is TensorFlow-only")


def _plain_and_fast(x, kernel, padding, axis):
    x, kernel = tf.constant(x), tf.constant(kernel)
    results = []
    for fn in (lambda a, k: tf.nn.conv3d(a, k, [1] * 5, padding.upper()),
               lambda a, k: L._shift_stacked(a, k, axis, padding),
               lambda a, k: L._fast_conv(a, k, axis, padding)):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = fn(x, kernel)
            loss = tf.reduce_sum(tf.sin(y))
        gx, gk = tape.gradient(loss, [x, kernel])
        results.append([y.numpy(), gx.numpy(), gk.numpy()])
    return results


@pytest.mark.parametrize("shape,ksize,padding,axis", [
    ((2, 9, 10, 11, 2), (7, 7, 7), "same", 2),
    ((2, 9, 10, 11, 2), (7, 7, 7), "same", 0),
    ((1, 8, 8, 8, 3), (7, 5, 3), "same", 1),
    ((1, 8, 9, 10, 2), (4, 4, 4), "same", 2),   # even kernel: TF puts the extra pad after
    ((1, 8, 9, 10, 2), (6, 3, 2), "same", 0),
    ((1, 12, 11, 10, 2), (7, 7, 7), "valid", 2),
    ((1, 12, 11, 10, 1), (3, 3, 3), "valid", 1),
])
def test_shift_stacked_equals_conv3d_forward_and_gradients(rng, shape, ksize, padding, axis):
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(0, 0.1, ksize + (shape[-1], 5)).astype(np.float32)
    reference, *fast = _plain_and_fast(x, kernel, padding, axis)
    for result in fast:  # the stacked convolution, and the hybrid the layer runs
        assert result[0].shape == reference[0].shape
        for a, b in zip(result, reference):  # output, input gradient, kernel gradient
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def _layers(filters, kernel, padding):
    fast = L.OpeningConv3D(filters, kernel, padding=padding, use_bias=True, bias_initializer="random_normal",
                           name="aff_open")
    plain = keras.layers.Conv3D(filters, kernel, padding=padding, use_bias=True, bias_initializer="random_normal",
                                name="aff_open")
    return fast, plain


@pytest.mark.parametrize("axis", [0, 1, 2, None])
def test_layer_equals_keras_conv3d(rng, axis, monkeypatch):
    monkeypatch.setattr(L.OpeningConv3D, "stack_axis", axis)
    x = tf.constant(rng.normal(size=(2, 7, 8, 9, 2)).astype(np.float32))
    fast, plain = _layers(4, 7, "same")
    fast.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(fast.get_weights())
    assert [w.path for w in fast.weights] == [w.path for w in plain.weights] == ["aff_open/kernel", "aff_open/bias"]
    assert fast.kernel.shape == (7, 7, 7, 2, 4)
    grads = []
    for layer in (fast, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.sin(y))
        grads.append([y] + tape.gradient(loss, [x] + layer.trainable_weights))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5 * np.abs(b.numpy()).max())


def test_layer_config_round_trips():
    fast, plain = _layers(4, 7, "same")
    config = fast.get_config()
    assert config == plain.get_config()
    clone = L.OpeningConv3D.from_config(config)
    assert isinstance(clone, L.OpeningConv3D) and clone.kernel_size == (7, 7, 7)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(fast))
    assert type(restored) is L.OpeningConv3D


def test_plain_path_for_strides_and_one_tap_axis(rng):
    """Strided convolutions and kernels of size 1 along the stacking axis fall back to Conv3D."""
    strided = L.OpeningConv3D(3, 3, strides=2, padding="same")
    one_tap = [3, 3, 3]
    one_tap[L.OpeningConv3D.stack_axis] = 1
    flat = L.OpeningConv3D(3, tuple(one_tap), padding="same")
    x = tf.constant(rng.normal(size=(1, 6, 6, 6, 2)).astype(np.float32))
    for layer in (strided, flat):
        layer(x)
        assert not layer._fast()
    assert L.OpeningConv3D(3, 7)._fast() == (not tf.config.list_logical_devices("GPU"))
