"""Casts, shape checks and per-sample reductions shared by :mod:`spirs_tf.losses` and
:mod:`spirs_tf.affine_losses` (private)."""
from __future__ import annotations

from spirs_tf._compat import ops


def float_tensor(x):
    """``x`` as a float tensor: float64 stays float64, everything else becomes float32."""
    x = ops.convert_to_tensor(x)
    if x.dtype == "float64":
        return x
    return ops.cast(x, "float32")


def check_rank(x, rank: int, name: str, what: str) -> None:
    if len(x.shape) != rank:
        raise ValueError(f"{name} must have shape {what} (rank {rank}), got shape {tuple(x.shape)}")


def check_same(a, b, name_a: str, name_b: str) -> None:
    if len(a.shape) != len(b.shape) or any(
            da is not None and db is not None and da != db for da, db in zip(a.shape, b.shape)):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def per_sample_mean(x):
    """Mean over every axis except the batch axis: (B, ...) -> (B,)."""
    return ops.mean(x, axis=tuple(range(1, len(x.shape))))


def per_sample_sum(x):
    return ops.sum(x, axis=tuple(range(1, len(x.shape))))
