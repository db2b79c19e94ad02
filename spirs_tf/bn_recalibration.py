"""Re-estimating BatchNorm moving statistics without training (``train.bn_recalibration_modules``).

Statistics frozen at an earlier stage describe other inputs (a coarser grid; for a module that did
not train there, other weights). :func:`recalibrate_batchnorm` runs batches through the model in
training mode with only the chosen BatchNorm layers switched to batch statistics; their moving mean
and variance become the plain average of the batch statistics over all their calls (momentum
``n/(n+1)`` at a layer's call ``n``; a layer shared by pyramid levels runs once per level). No
trainable weight changes.
"""
from __future__ import annotations

from typing import Iterable


def _averaging(layer, call):
    """``layer.call`` wrapped so that the layer's moving statistics average all its calls so far."""
    n = 0  # calls of this layer so far

    def wrapped(*args, **kwargs):
        nonlocal n
        layer.momentum = n / (n + 1.0)  # moving = plain average over its calls so far
        n += 1
        return call(*args, **kwargs)
    return wrapped


def recalibrate_batchnorm(model, layers: list, batches: Iterable[dict]) -> list[str]:
    """Re-estimate the moving statistics of ``layers`` (BatchNorm layers of ``model``) over ``batches``.

    Args:
        model: the Keras model; called as ``model(inputs, training=True)`` on every batch.
        layers: its BatchNorm layers to re-estimate (:func:`spirs_tf.networks.batchnorm_layers`);
            every other layer keeps its mode (a non-trainable BatchNorm stays in inference mode).
        batches: model input dicts (``fixed_image``, ``moving_image``, ``moving_mask``).

    Returns:
        The names of the layers re-estimated. Their ``trainable``, ``momentum`` and ``call`` are
        restored afterwards, also when a batch fails.
    """
    saved = [(layer, layer.trainable, layer.momentum, layer.call) for layer in layers]
    try:
        for layer in layers:
            layer.trainable = True  # Keras 3 runs a non-trainable BatchNorm in inference mode
            layer.call = _averaging(layer, layer.call)
        for inputs in batches:
            model(inputs, training=True)
    finally:
        for layer, trainable, momentum, call in saved:
            layer.trainable, layer.momentum, layer.call = trainable, momentum, call
    return [layer.name for layer in layers]
