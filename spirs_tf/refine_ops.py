"""Tensor pieces of :mod:`spirs_tf.refine`: box-mean LNCC, Jacobian, Adam and the XLA-compiled steps.

Written with ``keras.ops``; only the gradient and the compilation of the two steps are backend-specific
(:func:`_value_and_grad`, :func:`compiled`: ``tf.GradientTape`` + ``tf.function(jit_compile=True)`` under
TensorFlow, ``jax.value_and_grad`` + ``jax.jit`` under JAX).

Shapes: volumes ``(1, n0, n1, n2, C)`` float32 on one level grid; ``theta`` the 12 affine offsets
(``ΔM·R`` row-major, then ``Δt``, voxels of the input grid); ``ctrl`` a control field ``(1, c0, c1, c2, 3)``
in level voxels. See :mod:`spirs_tf.refine` for the conventions and the measured choices.
"""
from __future__ import annotations

import math

import numpy as np

from spirs_tf import transforms
from spirs_tf._compat import BACKEND, ops, tf
from spirs_tf.losses import bending_energy

LNCC_EPS = 1e-6
#: Adam's ε for the affine: gradients of the mean LNCC below it (float noise at the optimum) are damped
#: instead of normalised to full steps, so identical images keep the identity.
AFFINE_ADAM_EPS = 1e-3
#: Adam's ε for the control field, whose gradients are scaled by the number of level voxels (median
#: about 0.3 in misaligned tissue, 1e-7 for identical images). Per-voxel LNCC modes are stiff (a
#: 1e-5-voxel jitter raises the gradient 100-fold), so with a small ε Adam's normalised steps from
#: an aligned start grow tenfold per iteration (identical images drifted by 0.2–1 voxel); with
#: ε = 0.3 the small-gradient regime is gradient descent with a stable step.
DEFORMABLE_ADAM_EPS = 0.3
WARMUP = 5


# -------------------------------------------------------------------------------- tensor pieces
def box_mean(x, window: int):
    """Mean over a ``window``³ box centred on each voxel, zero padding, ``n = window³`` always."""
    r = window // 2
    x = ops.pad(x, [[0, 0], [r, r], [r, r], [r, r], [0, 0]])
    for ksize in ((window, 1, 1), (1, window, 1), (1, 1, window)):
        x = ops.average_pool(x, ksize, strides=1, padding="valid")
    return x


def fixed_stats(fixed, window: int):
    """Box mean and variance of the fixed image ``(1, D, H, W, 1)`` each (computed once per level)."""
    m = box_mean(ops.concatenate([fixed, fixed * fixed], -1), window)
    return m[..., :1], m[..., 1:] - m[..., :1] * m[..., :1]


def masked_lncc(fixed, mean_i, var_i, warped, mask, window: int):
    """Masked mean of the authors' ``cc = cross² / (varI·varJ)`` (each clamped at ε) from box means."""
    m = box_mean(ops.concatenate([warped, warped * warped, fixed * warped], -1), window)
    mean_j = m[..., 0:1]
    cross = ops.maximum(m[..., 2:3] - mean_i * mean_j, LNCC_EPS)
    var_j = ops.maximum(m[..., 1:2] - mean_j * mean_j, LNCC_EPS)
    cc = (cross / ops.maximum(var_i, LNCC_EPS)) * (cross / var_j)
    return ops.sum(cc * mask) / ops.maximum(ops.sum(mask), 1.0)


def lncc_mask(fixed_keep, warped):
    """The project's LNCC mask from the precomputed fixed part and the warped (image, lesion) channels."""
    moving_keep = ops.cast(ops.not_equal(warped[..., :1], 0.0), "float32")
    if warped.shape[-1] > 1:
        moving_keep = moving_keep * ops.cast(ops.equal(warped[..., 1:2], 0.0), "float32")
    return ops.stop_gradient(ops.maximum(fixed_keep, moving_keep))


def gradient(u, axis: int):
    """``np.gradient`` along a spatial ``axis``: central differences inside, one-sided at the two ends."""
    n = u.shape[axis]

    def take(start, stop):
        index = [slice(None)] * 5
        index[axis] = slice(start, stop)
        return u[tuple(index)]

    inner = (take(2, n) - take(0, n - 2)) * 0.5
    return ops.concatenate([take(1, 2) - take(0, 1), inner, take(n - 1, n) - take(n - 2, n - 1)], axis=axis)


def jacobian_det(u):
    """det(I + ∇u) at every voxel as :func:`spirs_tf.metrics.jacobian_determinant`.

    ``(1, D, H, W, 3) → (1, D, H, W)``.
    """
    grads = [gradient(u, axis) for axis in (1, 2, 3)]
    # j[a][b] = δ_ab + ∂u_a/∂x_b
    j = [[grads[b][..., a] + (1.0 if a == b else 0.0) for b in range(3)] for a in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def adam(params, grad, m, v, step, lr, eps=1e-8):
    """One Adam update (β = 0.9, 0.999). A large ``eps`` turns it into plain gradient descent with step
    ``lr/eps`` where gradients are small: near the optimum that keeps stiff modes stable."""
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad * grad
    m_hat = m / (1.0 - ops.power(0.9, step))
    v_hat = v / (1.0 - ops.power(0.999, step))
    return params - lr * m_hat / (ops.sqrt(v_hat) + eps), m, v


def schedule(lr: float, k: int, n: int, warmup: int = 0) -> float:
    """Learning rate of iteration ``k`` of ``n``: a linear warm-up over ``warmup`` iterations (Adam's first
    steps move every parameter by about ``lr`` whatever its gradient), then cosine decay to ``0.05·lr``."""
    ramp = min(1.0, (k + 1) / warmup) if warmup else 1.0
    return ramp * lr * (0.05 + 0.475 * (1.0 + math.cos(math.pi * k / max(n - 1, 1))))


def interpolation_matrix(n_out: int, n_in: int, ratio: float) -> np.ndarray:
    """``(n_out, n_in)`` linear interpolation along one axis: output ``j`` reads input position ``j/ratio``.

    Corner aligned (output ``ratio·i`` = input ``i``), clamped to ``[0, n_in − 1]`` beyond the ends. float32.
    """
    pos = np.minimum(np.arange(n_out) / float(ratio), n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    out = np.zeros((n_out, n_in), np.float32)
    out[np.arange(n_out), lo] += 1.0 - w
    out[np.arange(n_out), hi] += w
    return out


def upsample(v, mats):
    """Separable linear upsampling of ``(1, d, h, w, C)`` by three interpolation matrices (matmuls)."""
    v = ops.einsum("Ii,bijkc->bIjkc", mats[0], v)
    v = ops.einsum("Jj,bijkc->biJkc", mats[1], v)
    return ops.einsum("Kk,bijkc->bijKc", mats[2], v)


# ----------------------------------------------------------------------------- compiled steps
def affine_coordinates(theta, base, grid, factor, centre, radius):
    """Level coordinates of ``p = (M0 + ΔM/R)(f·x − c) + t0 + Δt + c``, divided by ``f``."""
    m = base[:, :3] + ops.reshape(theta[:9], (3, 3)) / radius
    t = base[:, 3] + theta[9:]
    p = ops.einsum("ij,dhwj->dhwi", m, grid * factor - centre) + t + centre
    return p / factor


def affine_loss(theta, base, grid, factor, centre, radius, fixed, mean_i, var_i, fixed_keep, moving, window):
    coords = affine_coordinates(theta, base, grid, factor, centre, radius)
    warped = transforms.resample(moving, coords[None])
    mask = lncc_mask(fixed_keep, warped)
    return -masked_lncc(fixed, mean_i, var_i, warped[..., :1], mask, window)


def _value_and_grad(loss_fn, x):
    """``(loss, ∂loss/∂x)`` of a scalar ``loss_fn(x)`` (tape under TensorFlow, ``jax.value_and_grad`` else)."""
    if BACKEND == "tensorflow":
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(x)
        return loss, tape.gradient(loss, x)
    import jax

    return jax.value_and_grad(loss_fn)(x)


def affine_step(theta, m, v, step, lr, base, grid, factor, centre, radius, fixed, mean_i, var_i, fixed_keep,
                 moving, window):
    loss, grad = _value_and_grad(lambda t: affine_loss(t, base, grid, factor, centre, radius, fixed, mean_i, var_i,
                                                        fixed_keep, moving, window), theta)
    theta, m, v = adam(theta, grad, m, v, step, lr, AFFINE_ADAM_EPS)
    return theta, m, v, loss


def deformable_loss(ctrl, u_init, coords_affine, up_mats, fixed, mean_i, var_i, fixed_keep, moving, lam, mu,
                     window):
    u = u_init + (upsample(ctrl, up_mats) if up_mats is not None else ctrl)
    warped = transforms.resample(moving, coords_affine + u)
    mask = lncc_mask(fixed_keep, warped)
    sim = masked_lncc(fixed, mean_i, var_i, warped[..., :1], mask, window)
    fold = ops.mean(ops.relu(0.2 - jacobian_det(u)) ** 2)
    return -sim + lam * bending_energy(u)[0] + mu * fold, sim


def deformable_step(ctrl, m, v, step, lr, u_init, coords_affine, up_mats, fixed, mean_i, var_i, fixed_keep,
                     moving, lam, mu, window):
    loss, grad = _value_and_grad(lambda c: deformable_loss(c, u_init, coords_affine, up_mats, fixed, mean_i, var_i,
                                                            fixed_keep, moving, lam, mu, window)[0], ctrl)
    # Per-voxel gradients of a mean are O(1/voxels): scale them to O(1) so that Adam's ε damps the float
    # noise of well-aligned (or empty) regions instead of normalising it to full steps.
    grad = grad * float(np.prod(u_init.shape[1:4]))
    ctrl, m, v = adam(ctrl, grad, m, v, step, lr, DEFORMABLE_ADAM_EPS)
    return ctrl, m, v, loss


_COMPILED: dict = {}


def compiled(name: str):
    """XLA-compiled step functions, one trace per shape (under JAX ``jax.jit`` with the int ``window``,
    the last argument, static)."""
    if name not in _COMPILED:
        fn = {"affine": affine_step, "deformable": deformable_step}[name]
        if BACKEND == "tensorflow":
            _COMPILED[name] = tf.function(fn, jit_compile=True, autograph=False)
        else:
            import jax

            _COMPILED[name] = jax.jit(fn, static_argnums=(15,))
    return _COMPILED[name]
