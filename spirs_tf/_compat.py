"""The one place that imports Keras and TensorFlow and checks their versions.

Everything in spirs-tf that needs Keras does ``from spirs_tf._compat import keras, ops``; code that
needs raw TensorFlow (tf.data, SavedModel, tf.distribute) does ``from spirs_tf._compat import tf``.
We never import ``tensorflow.python.*`` and never use ``tf.compat.v1``.
"""
from __future__ import annotations

import os

# Quiet the C++ start-up chatter (CUDA probing on CPU machines) unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402


@contextlib.contextmanager
def _quiet_native_stderr():
    """Hide the C++ start-up lines TensorFlow prints before its logging is configured (CUDA probing,
    oneDNN notes) — they ignore TF_CPP_MIN_LOG_LEVEL in recent releases. ``SPIRS_DEBUG=1`` shows them."""
    if os.environ.get("SPIRS_DEBUG"):
        yield
        return
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # pragma: no cover - no usable fd 2
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _quiet_native_stderr():
    import keras  # noqa: E402
    from keras import ops  # noqa: E402

    if keras.backend.backend() == "tensorflow":
        import tensorflow as _tf  # noqa: E402

        _tf.config.list_physical_devices()  # device probing happens here, silently

KERAS_MIN = (3, 0)
TF_MIN = (2, 16)


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


if _version_tuple(keras.__version__) < KERAS_MIN:  # pragma: no cover - guarded by setup.cfg
    raise ImportError(f"spirs-tf needs Keras >= 3.0, found {keras.__version__}")

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    import tensorflow as tf  # noqa: E402

    if _version_tuple(tf.__version__) < TF_MIN:  # pragma: no cover
        raise ImportError(f"spirs-tf needs TensorFlow >= 2.16 (Keras 3), found {tf.__version__}")
else:  # pragma: no cover - only for timing the network under JAX on a GPU without TensorFlow
    tf = None

__all__ = ["keras", "ops", "tf", "BACKEND"]
