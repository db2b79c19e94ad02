"""Tests of spirs_tf.losses against analytic values, brute-force NumPy references and finite differences."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from scipy.spatial.distance import dice as scipy_dice

from spirs_tf import losses as L
from spirs_tf._compat import ops, tf
from spirs_tf.config import get_config
from spirs_tf.errors import SpirsInputError

sys.path.insert(0, os.path.dirname(__file__))


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def smooth_image(rng, shape, sigma=1.5):
    """A positive, smooth, non-constant test image (B, D, H, W, 1)."""
    from scipy.ndimage import gaussian_filter

    noise = rng.random(shape)
    return np.stack([gaussian_filter(n, sigma) for n in noise])[..., None] + 0.1


# ------------------------------------------------------------------------------------------ affine
def test_affine_mse_hand_value():
    true = np.zeros((2, 3, 4), np.float32)
    pred = np.zeros((2, 3, 4), np.float32)
    pred[0, 0, 3] = 2.0  # one translation entry off by 2 → 4/12
    pred[1] = 1.0        # every entry off by 1 → 1
    np.testing.assert_allclose(np_(L.affine_mse(true, pred)), [4.0 / 12.0, 1.0], rtol=1e-6)


def test_affine_mse_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, 4\)"):
        L.affine_mse(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))


def centred_coords(shape):
    """(N, 4) homogeneous centred voxel coordinates [x − N/2; 1] of every voxel of a grid, C order."""
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    return np.concatenate([idx - np.asarray(shape) / 2.0, np.ones((len(idx), 1))], axis=1)


def loop_displacement_mse(true, pred, shape, mask=None):
    """Brute force: mean over the (masked) voxels of ‖(T̂ − T)[x − c; 1]‖², one voxel at a time."""
    out = []
    for b in range(true.shape[0]):
        err = pred[b] - true[b]
        values = [np.sum((err @ h) ** 2) for h, keep in
                  zip(centred_coords(shape), np.ones(int(np.prod(shape)), bool) if mask is None
                      else mask[b].reshape(-1) > 0) if keep]
        out.append(np.mean(values))
    return np.array(out)


def rotation(axis, degrees):
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@pytest.mark.parametrize("shape", [(6, 6, 6), (5, 7, 4)])
def test_affine_displacement_mse_matches_a_voxel_loop(rng, shape):
    true = rng.normal(size=(3, 3, 4))
    pred = true + 0.1 * rng.normal(size=(3, 3, 4))
    got = np_(L.affine_displacement_mse(true, pred, L.grid_moments(shape, "float64")))
    np.testing.assert_allclose(got, loop_displacement_mse(true, pred, shape), rtol=1e-10)
    # over a mask (an off-centre blob, a random mask, and an empty one that falls back to the grid)
    mask = np.zeros((3,) + shape + (1,))
    mask[0, 1:4, 2:, :3] = 1.0
    mask[1] = rng.random(shape + (1,)) > 0.5
    got = np_(L.affine_displacement_mse(true, pred, L.mask_moments(mask)))
    expected = loop_displacement_mse(true[:2], pred[:2], shape, mask[:2])
    np.testing.assert_allclose(got, np.append(expected, loop_displacement_mse(true[2:], pred[2:], shape)),
                               rtol=1e-10)


def test_equal_mean_displacement_gives_equal_loss():
    """A 5° rotation and a translation of the same mean squared displacement cost the same.

    The matrix MSE of Eq. 1 rates the same rotation ~20× cheaper than that translation on 16³ (the
    ratio grows with N²: ~350× on 64³).
    """
    shape = (16, 16, 16)
    eye = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)[None]
    rotated = eye.copy()
    rotated[0, :, :3] = rotation(1, 5.0)
    msd = loop_displacement_mse(eye, rotated, shape)[0]            # mean ‖(R − I)(x − c)‖², voxel loop
    shifted = eye.copy()
    shifted[0, :, 3] = np.sqrt(msd / 3.0)                           # ‖t‖² = msd
    sheared = eye.copy()
    h = L.grid_moments(shape, "float64")
    sheared[0, 0, 2] = np.sqrt(msd / np_(h)[2, 2])                 # x0 += s·(x2 − c)
    losses = [np_(L.affine_displacement_mse(eye, m, h))[0] for m in (rotated, shifted, sheared)]
    np.testing.assert_allclose(losses, [msd, msd, msd], rtol=1e-9)
    matrix = [np_(L.affine_mse(eye, m))[0] for m in (rotated, shifted)]
    assert matrix[1] > 20 * matrix[0]
    # a pure translation error t costs ‖t‖² = 12 × the 12-entry matrix MSE, on any grid or mask
    assert losses[1] == pytest.approx(12 * matrix[1])


def test_affine_displacement_mse_gradient_matches_finite_differences(rng):
    shape = (7, 8, 6)
    true = rng.normal(size=(2, 3, 4))
    pred = tf.Variable(true + 0.2 * rng.normal(size=(2, 3, 4)))
    mask = (rng.random((2,) + shape + (1,)) > 0.4).astype(np.float64)
    moments = L.mask_moments(mask)
    with tf.GradientTape() as tape:
        value = ops.sum(L.affine_displacement_mse(true, pred, moments))
    grad = np_(tape.gradient(value, pred))
    base = pred.numpy()
    h = 1e-6
    for idx in [(0, 0, 0), (0, 1, 2), (1, 2, 3), (1, 0, 3), (0, 2, 1)]:
        plus, minus = base.copy(), base.copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (np_(L.affine_displacement_mse(true, plus, moments)).sum()
              - np_(L.affine_displacement_mse(true, minus, moments)).sum()) / (2 * h)
        assert grad[idx] == pytest.approx(fd, rel=1e-6, abs=1e-8), idx


def test_affine_displacement_mse_rejects_bad_shapes():
    h = L.grid_moments((4, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, 4\)"):
        L.affine_displacement_mse(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), h)
    with pytest.raises(ValueError, match="moments"):
        L.affine_displacement_mse(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), np.eye(3))
    with pytest.raises(ValueError, match="grid shape"):
        L.grid_moments((4, 4))


# -------------------------------------------------------------------------------------------- LNCC
def brute_force_cc(fixed, moving, index, window=9, eps=1e-7):
    """cc at one voxel from the explicit window (zero padding), covariance form, NumPy float64."""
    r = window // 2
    fi = np.pad(fixed.astype(np.float64), r)
    mi = np.pad(moving.astype(np.float64), r)
    a, b, c = index
    wi = fi[a:a + window, b:b + window, c:c + window]
    wj = mi[a:a + window, b:b + window, c:c + window]
    di, dj = wi - wi.mean(), wj - wj.mean()
    cross = max((di * dj).sum(), eps)
    var_i = max((di * di).sum(), eps)
    var_j = max((dj * dj).sum(), eps)
    return cross ** 2 / (var_i * var_j)


def test_lncc_identical_images_is_one(rng):
    x = smooth_image(rng, (2, 16, 16, 16))
    np.testing.assert_allclose(np_(L.lncc(x, x)), [1.0, 1.0], atol=1e-4)
    mask = np.zeros_like(x)
    mask[:, 4:12, 2:9, 5:14] = 1.0
    np.testing.assert_allclose(np_(L.lncc(x, x, mask=mask)), [1.0, 1.0], atol=1e-4)
    np.testing.assert_allclose(np_(L.lncc_loss(x, x, mask=mask)), [-1.0, -1.0], atol=1e-4)


def test_lncc_of_negated_image_is_clamped_to_zero(rng):
    """The authors clamp cross at eps *before* squaring, so perfect anti-correlation scores ≈ 0.

    cross²/(varI·varJ) without that clamp would be exactly 1 for J = −I (checked by brute force).
    """
    x = rng.random((1, 12, 12, 12, 1)).astype(np.float64)
    value = np_(L.lncc(x, -x))
    assert np.all(value >= 0) and np.all(value < 1e-12)
    r = 4
    wi = np.pad(x[0, ..., 0], r)[2:11, 3:12, 4:13]
    di = wi - wi.mean()
    unclamped = (di * -di).sum() ** 2 / ((di * di).sum() * (di * di).sum())
    assert unclamped == pytest.approx(1.0)


@pytest.mark.parametrize("box_sum", L.BOX_SUM_METHODS)
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-9), ("float32", 2e-3)])
def test_lncc_matches_brute_force_at_single_voxels(rng, dtype, rtol, box_sum):
    shape = (1, 14, 13, 12)
    fixed = rng.random(shape).astype(dtype)
    moving = (0.6 * fixed + 0.4 * rng.random(shape)).astype(dtype)
    for index in [(7, 6, 5), (0, 0, 0), (13, 2, 11), (3, 12, 9)]:
        mask = np.zeros(shape + (1,), dtype)
        mask[(0,) + index + (0,)] = 1.0
        got = np_(L.lncc(fixed[..., None], moving[..., None], mask=mask, box_sum=box_sum))[0]
        expected = brute_force_cc(fixed[0], moving[0], index)
        assert got == pytest.approx(expected, rel=rtol), index


@pytest.mark.parametrize("box_sum", L.BOX_SUM_METHODS)
def test_lncc_unmasked_mean_matches_brute_force(rng, box_sum):
    shape = (1, 10, 10, 10)
    fixed = rng.random(shape)
    moving = rng.random(shape)
    expected = np.mean([brute_force_cc(fixed[0], moving[0], idx, window=5)
                        for idx in np.ndindex(*shape[1:])])
    got = np_(L.lncc(fixed[..., None], moving[..., None], window=5, box_sum=box_sum))[0]
    assert got == pytest.approx(expected, rel=1e-9)


def test_box_sum_methods_agree_with_full_box_convolution(rng):
    """Both separable methods equal one 9³ all-ones Conv3D with zero 'same' padding (the authors')."""
    x = rng.random((2, 11, 12, 13, 1))
    full = np_(ops.conv(x, np.ones((9, 9, 9, 1, 1)), padding="same"))
    for method in L.BOX_SUM_METHODS:
        np.testing.assert_allclose(np_(L._box_sum(ops.convert_to_tensor(x), 9, method)), full,
                                   rtol=1e-12)
    with pytest.raises(ValueError, match="box-sum method"):
        L.lncc(x, x, box_sum="fft")


@pytest.mark.parametrize("zoom", [1.0, 1.03])
def test_lncc_exact_matches_a_per_voxel_loop_next_to_a_zero_background(zoom):
    """The logged LNCC (float64 box sums) equals the window-by-window definition, masked and not."""
    from lncc_reference import brute_force_cc_map, phantom

    from spirs_tf import metrics

    fixed, moving = phantom(16, zoom=zoom)
    cc = brute_force_cc_map(fixed, moving)
    mask = metrics.lncc_mask(fixed, moving)
    f, m = fixed[None, ..., None], moving[None, ..., None]
    assert np_(L.lncc_exact(f, m))[0] == pytest.approx(cc.mean(), abs=1e-6)
    assert np_(L.lncc_exact(f, m, mask=mask[None, ..., None]))[0] == pytest.approx(cc[mask].mean(), abs=1e-6)
    assert np_(L.lncc_exact(f, m)).dtype == np.float32


def test_float32_cumsum_is_off_next_to_the_background_and_lncc_exact_is_not():
    """On 32³ the float32 running sums put rounding residue into windows centred in the background: the
    unmasked mean drifts by > 1e-4 (by +1.9e-4 on 64³, +1.8e-2 on 128³ realistic pairs); float64 does not."""
    from lncc_reference import offset_loop_cc_map, phantom

    from spirs_tf import metrics

    fixed, moving = phantom(32, zoom=1.03)
    cc = offset_loop_cc_map(fixed, moving)
    f, m = fixed[None, ..., None], moving[None, ..., None]
    assert np_(L.lncc(f, m))[0] - cc.mean() > 1e-4                  # the legacy float32 logging path
    assert np_(L.lncc_exact(f, m))[0] == pytest.approx(cc.mean(), abs=1e-6)
    # masked to the brain (the training loss) the float32 path is fine
    mask = metrics.lncc_mask(fixed, moving)
    assert np_(L.lncc(f, m, mask=mask[None, ..., None]))[0] == pytest.approx(cc[mask].mean(), abs=1e-5)


def test_lncc_empty_mask_is_finite_zero_with_zero_gradient(rng):
    x = tf.constant(smooth_image(rng, (2, 12, 12, 12)), tf.float32)
    y = tf.constant(smooth_image(rng, (2, 12, 12, 12)), tf.float32)
    mask = np.zeros((2, 12, 12, 12, 1), np.float32)
    with tf.GradientTape() as tape:
        tape.watch(y)
        value = L.lncc(x, y, mask=mask)
    grad = tape.gradient(value, y)
    np.testing.assert_array_equal(np_(value), [0.0, 0.0])
    assert np.all(np.isfinite(np_(grad))) and np.all(np_(grad) == 0)


def test_lncc_rejects_even_window_and_multichannel():
    x = np.zeros((1, 8, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="odd"):
        L.lncc(x, x, window=4)
    with pytest.raises(ValueError, match="single-channel"):
        L.lncc(np.zeros((1, 8, 8, 8, 2)), np.zeros((1, 8, 8, 8, 2)))
    with pytest.raises(ValueError, match="same shape"):
        L.lncc(x, np.zeros((1, 8, 8, 9, 1), np.float32))


def test_lncc_mask_truth_table():
    # voxel:            0    1    2    3    4    5
    fixed = np.array([0.0, 0.5, 0.5, 0.0, 0.3, 0.0])
    moving = np.array([0.0, 0.0, 0.2, 0.7, 0.4, 0.9])
    fixed_mask = np.array([0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    moving_mask = np.array([0.0, 0.0, 0.0, 0.2, 0.01, 0.0])   # soft label ≠ 0 counts as tumour
    expected = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0])

    def vol(a):
        return a.reshape(1, 1, 1, 6, 1)

    got = np_(L.lncc_mask(vol(fixed), vol(moving), vol(fixed_mask), vol(moving_mask)))
    np.testing.assert_array_equal(got.ravel(), expected)


def test_lncc_gradient_matches_finite_differences(rng):
    shape = (1, 9, 9, 9, 1)
    fixed = smooth_image(rng, shape[:4], sigma=1.0)
    moving = 0.5 * fixed + 0.5 * smooth_image(rng, shape[:4], sigma=1.0)
    mask = (rng.random(shape) > 0.3).astype(np.float64)
    m = tf.Variable(moving)
    with tf.GradientTape() as tape:
        value = ops.sum(L.lncc(fixed, m, window=5, mask=mask))
    grad = np_(tape.gradient(value, m))
    h = 1e-6
    for idx in [(0, 4, 4, 4, 0), (0, 0, 3, 8, 0), (0, 2, 7, 1, 0), (0, 8, 8, 8, 0)]:
        plus, minus = moving.copy(), moving.copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (np_(L.lncc(fixed, plus, window=5, mask=mask))[0]
              - np_(L.lncc(fixed, minus, window=5, mask=mask))[0]) / (2 * h)
        assert grad[idx] == pytest.approx(fd, rel=1e-5, abs=1e-9), idx


# ------------------------------------------------------------------------------------- deformation
def grid(n=8):
    return np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")


def test_bending_energy_of_linear_field_is_zero(rng):
    x, y, z = grid()
    a = rng.normal(size=(3, 4))
    dvf = np.stack([a[c, 0] * x + a[c, 1] * y + a[c, 2] * z + a[c, 3] for c in range(3)], -1)[None]
    np.testing.assert_allclose(np_(L.bending_energy(dvf)), [0.0], atol=1e-20)


def test_bending_energy_of_quadratic_fields_is_analytic():
    x, y, _ = grid()
    zero = np.zeros_like(x)
    # u0 = x² → u_xx = 2 at every interior voxel: (2² = 4 in one of 3 channels) → 4/3
    square = np.stack([x ** 2, zero, zero], -1)[None]
    # u1 = x·y → u_xy = ((i−1)(j−1) − (i+1)(j−1) − (i−1)(j+1) + (i+1)(j+1))/4 = 1,
    # so 2·u_xy² = 2 in one of 3 channels → 2/3
    mixed = np.stack([zero, x * y, zero], -1)[None]
    both = np.stack([x ** 2, x * y, 3 * x ** 2], -1)[None]  # (4 + 2 + 36) / 3
    got = np_(L.bending_energy(np.concatenate([square, mixed, both])))
    np.testing.assert_allclose(got, [4.0 / 3.0, 2.0 / 3.0, 42.0 / 3.0], rtol=1e-12)


def test_bending_energy_matches_loop_reference(rng):
    u = rng.normal(size=(1, 5, 6, 7, 3))
    total, count = 0.0, 0
    for i in range(1, 4):
        for j in range(1, 5):
            for k in range(1, 6):
                for c in range(3):
                    v = u[0, ..., c]
                    uxx = v[i - 1, j, k] - 2 * v[i, j, k] + v[i + 1, j, k]
                    uyy = v[i, j - 1, k] - 2 * v[i, j, k] + v[i, j + 1, k]
                    uzz = v[i, j, k - 1] - 2 * v[i, j, k] + v[i, j, k + 1]
                    uxy = (v[i - 1, j - 1, k] - v[i + 1, j - 1, k] - v[i - 1, j + 1, k]
                           + v[i + 1, j + 1, k]) / 4
                    uxz = (v[i - 1, j, k - 1] - v[i + 1, j, k - 1] - v[i - 1, j, k + 1]
                           + v[i + 1, j, k + 1]) / 4
                    uyz = (v[i, j - 1, k - 1] - v[i, j + 1, k - 1] - v[i, j - 1, k + 1]
                           + v[i, j + 1, k + 1]) / 4
                    total += uxx ** 2 + uyy ** 2 + uzz ** 2 + 2 * (uxy ** 2 + uxz ** 2 + uyz ** 2)
                    count += 1
    assert np_(L.bending_energy(u))[0] == pytest.approx(total / count, rel=1e-12)


def test_bending_energy_gradient_matches_finite_differences(rng):
    u0 = rng.normal(size=(1, 5, 5, 5, 3))
    u = tf.Variable(u0)
    with tf.GradientTape() as tape:
        value = ops.sum(L.bending_energy(u))
    grad = np_(tape.gradient(value, u))
    h = 1e-6
    for idx in [(0, 2, 2, 2, 0), (0, 0, 1, 4, 2), (0, 4, 4, 4, 1), (0, 1, 3, 2, 2)]:
        plus, minus = u0.copy(), u0.copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (np_(L.bending_energy(plus))[0] - np_(L.bending_energy(minus))[0]) / (2 * h)
        assert grad[idx] == pytest.approx(fd, rel=1e-6, abs=1e-10), idx


def test_bending_energy_rejects_tiny_grid():
    with pytest.raises(ValueError, match="at least 3"):
        L.bending_energy(np.zeros((1, 2, 8, 8, 3)))


def test_background_displacement_and_smoothness():
    fixed = np.ones((1, 4, 4, 4, 1))
    warped = np.ones((1, 4, 4, 4, 1))
    fixed[0, 0] = 0.0     # 16 voxels with I_f = 0 …
    warped[0, 0, :2] = 0.0  # … of which 8 also have I_wA = 0
    dvf = np.full((1, 4, 4, 4, 3), 2.0)
    expected = 8 * 3 * 4.0 / (64 * 3)  # u² = 4 on 8 voxels × 3 channels, mean over the whole tensor
    np.testing.assert_allclose(np_(L.background_displacement(dvf, fixed, warped)), [expected])
    # constant field → zero bending, so smoothness is the weighted background term alone
    np.testing.assert_allclose(np_(L.smoothness_loss(dvf, fixed, warped, 0.01)), [0.01 * expected])


# ------------------------------------------------------------------------------------------- label
def test_soft_dice_hand_count():
    target = np.zeros((2, 2, 2, 2, 1))
    prob = np.zeros((2, 2, 2, 2, 1))
    target[0, 0, 0, :2] = 1.0                 # |q| = 2
    prob[0, 0, 0, 0] = 0.5
    prob[0, 1, 1, 1] = 1.0                    # Σp = 1.5, Σpq = 0.5
    np.testing.assert_allclose(np_(L.soft_dice(target, prob)),
                               [(2 * 0.5 + 1) / (1.5 + 2 + 1), 1.0])   # sample 1 empty/empty → 1
    np.testing.assert_allclose(np_(L.dice_loss(target, prob)), [1 - 2 / 4.5, 0.0])


def test_soft_dice_matches_scipy_on_binary(rng):
    target = (rng.random((3, 6, 6, 6, 1)) > 0.6).astype(np.float64)
    prob = (rng.random((3, 6, 6, 6, 1)) > 0.5).astype(np.float64)
    expected = [1.0 - scipy_dice(t.ravel().astype(bool), p.ravel().astype(bool))
                for t, p in zip(target, prob)]
    np.testing.assert_allclose(np_(L.soft_dice(target, prob, smooth=0.0)), expected, rtol=1e-12)
    np.testing.assert_allclose(np_(L.hard_dice(target, np.where(prob > 0, 5.0, -5.0))), expected,
                               rtol=1e-6)


def np_weighted_bce(t, p, w=3.0):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    weight = np.where(t == 1, w, 1.0)
    return (weight * bce).reshape(len(t), -1).mean(axis=1)


def test_weighted_bce_matches_numpy(rng):
    target = (rng.random((2, 4, 4, 4, 1)) > 0.7).astype(np.float64)
    prob = rng.random((2, 4, 4, 4, 1))
    prob[0, 0, 0, 0, 0] = 0.0   # clipped at 1e-7
    prob[1, 0, 0, 0, 0] = 1.0
    np.testing.assert_allclose(np_(L.weighted_bce(target, prob)), np_weighted_bce(target, prob),
                               rtol=1e-12)
    logits = rng.normal(scale=3.0, size=target.shape)
    np.testing.assert_allclose(np_(L.weighted_bce(target, logits, from_logits=True)),
                               np_weighted_bce(target, 1 / (1 + np.exp(-logits))), rtol=1e-9)


def test_weighted_bce_positive_scale_multiplies_the_positive_weight_voxel_by_voxel(rng):
    target = (rng.random((2, 4, 4, 4, 1)) > 0.6).astype(np.float64)
    logits = rng.normal(scale=2.0, size=target.shape)
    scale = rng.uniform(1.0, 20.0, size=target.shape)
    p = 1 / (1 + np.exp(-logits))
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    expected = (np.where(target == 1, 3.0 * scale, 1.0) * bce).reshape(2, -1).mean(axis=1)
    got = L.weighted_bce(target, logits, pos_weight=3.0, from_logits=True, positive_scale=scale)
    np.testing.assert_allclose(np_(got), expected, rtol=1e-9)
    # a scale of ones is the plain loss; the scale changes nothing on background voxels
    np.testing.assert_allclose(np_(L.weighted_bce(target, logits, 3.0, True, np.ones_like(scale))),
                               np_(L.weighted_bce(target, logits, 3.0, True)), rtol=1e-12)
    background = np.where(target == 1, 1.0, 50.0)
    np.testing.assert_allclose(np_(L.weighted_bce(target, logits, 3.0, True, background)),
                               np_(L.weighted_bce(target, logits, 3.0, True)), rtol=1e-12)
    # segmentation_loss passes it on: the Dice term is unchanged
    delta = np_(L.segmentation_loss(target, logits, 3.0, 1.0, scale)) - np_(L.segmentation_loss(target, logits, 3.0))
    np.testing.assert_allclose(delta, expected - np_weighted_bce(target, p), rtol=1e-6)


def test_segmentation_loss_with_positive_scale_gradient_matches_finite_differences(rng):
    target = (rng.random((2, 4, 4, 4, 1)) > 0.6).astype(np.float64)
    scale = rng.uniform(1.0, 12.0, size=target.shape)
    logits = tf.Variable(rng.normal(scale=2.0, size=target.shape))
    with tf.GradientTape() as tape:
        value = ops.sum(L.segmentation_loss(target, logits, 10.0, 1.0, scale))
    grad = np_(tape.gradient(value, logits))
    base = logits.numpy()
    h = 1e-6
    for idx in [(0, 0, 0, 0, 0), (0, 1, 2, 3, 0), (1, 3, 3, 1, 0), (1, 2, 0, 2, 0), (0, 3, 1, 1, 0)]:
        plus, minus = base.copy(), base.copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (np_(L.segmentation_loss(target, plus, 10.0, 1.0, scale)).sum()
              - np_(L.segmentation_loss(target, minus, 10.0, 1.0, scale)).sum()) / (2 * h)
        assert grad[idx] == pytest.approx(fd, rel=1e-5, abs=1e-8), idx


def test_weighted_bce_from_extreme_logits_is_finite():
    target = np.array([1.0, 0.0, 1.0, 0.0]).reshape(1, 4)
    logits = np.array([-200.0, 200.0, 200.0, -200.0]).reshape(1, 4)
    # wrong with margin 200: 3·200 + 200 over 4 voxels; right: ≈ 0
    np.testing.assert_allclose(np_(L.weighted_bce(target, logits, from_logits=True)), [200.0])


def test_segmentation_and_registration_losses_combine_terms(rng):
    target = (rng.random((2, 5, 5, 5, 1)) > 0.7).astype(np.float64)
    logits = rng.normal(size=target.shape)
    prob = 1 / (1 + np.exp(-logits))
    dice = (2 * (prob * target).sum((1, 2, 3, 4)) + 1) / (prob.sum((1, 2, 3, 4))
                                                         + target.sum((1, 2, 3, 4)) + 1)
    expected = 1 - dice + np_weighted_bce(target, prob)
    np.testing.assert_allclose(np_(L.segmentation_loss(target, logits)), expected, rtol=1e-9)
    np.testing.assert_allclose(np_(L.registration_dice_loss(target, prob)), expected, rtol=1e-9)


def test_hard_dice_edge_cases():
    target = np.zeros((3, 2, 2, 2, 1))
    logits = np.full((3, 2, 2, 2, 1), -1.0)
    target[1, 0, 0, 0] = 1.0          # sample 1: target only → 0
    logits[2, 0, 0, 0] = 1.0          # sample 2: prediction only → 0
    np.testing.assert_array_equal(np_(L.hard_dice(target, logits)), [1.0, 0.0, 0.0])


def test_hard_dice_of_a_soft_mask_thresholds_at_one_half(rng):
    """threshold=0.5 scores a warped (soft) mask: Dice of ``prob > 0.5`` = scipy's on the thresholded masks."""
    target = (rng.random((3, 6, 6, 6, 1)) > 0.6).astype(np.float32)
    prob = rng.random((3, 6, 6, 6, 1)).astype(np.float32)
    expected = [1.0 - scipy_dice(t.ravel() > 0.5, p.ravel() > 0.5) for t, p in zip(target, prob)]
    np.testing.assert_allclose(np_(L.hard_dice(target, prob, threshold=0.5)), expected, rtol=1e-6)
    empty = np.zeros((1, 2, 2, 2, 1), np.float32)
    np.testing.assert_array_equal(np_(L.hard_dice(empty, empty + 0.4, threshold=0.5)), [1.0])


# ----------------------------------------------------------------------------------------- pyramid
def fake_pyramid(rng, levels=2, size=16, batch=2):
    s = size
    vol = lambda n, c=1: rng.random((batch, n, n, n, c)).astype(np.float32)  # noqa: E731
    binary = lambda n: (rng.random((batch, n, n, n, 1)) > 0.8).astype(np.float32)  # noqa: E731
    fixed = vol(s)
    fixed[:, :2] = 0.0  # some background
    batch_d = {"fixed_image": fixed, "moving_image": vol(s), "moving_mask": binary(s),
               "fixed_mask": binary(s), "dice_target": binary(s), "ncc_mask": binary(s),
               "true_affine": rng.normal(size=(batch, 3, 4)).astype(np.float32)}
    outputs = {}
    for i in range(1, levels + 1):
        n = s // 2 ** (levels - i)
        outputs.update({f"affine_{i}": rng.normal(size=(batch, 3, 4)).astype(np.float32),
                        f"warped_affine_image_{i}": vol(n), f"warped_affine_mask_{i}": vol(n),
                        f"dvf_{i}": rng.normal(size=(batch, n, n, n, 3)).astype(np.float32),
                        f"warped_image_{i}": vol(n), f"warped_mask_{i}": vol(n)})
    outputs["p1_logits"] = rng.normal(size=(batch, s, s, s, 1)).astype(np.float32)
    outputs["p2_logits"] = rng.normal(size=(batch, s, s, s, 1)).astype(np.float32)
    return outputs, batch_d


def test_spirs_losses_keys_shapes_and_weighting(rng):
    cfg = get_config("test", ["loss.gamma=0.3", "loss.weight_mse=2.0", "loss.lambda_smooth=0.7",
                              "loss.lambda_dice=0.2", "loss.weight_lncc_affine=1.5",
                              "loss.weight_segmentation=0.5"])
    outputs, batch = fake_pyramid(rng)
    result = L.spirs_losses(outputs, batch, cfg, levels=2)
    terms = ["mse", "lncc_affine", "lncc_deformable", "smooth", "dice", "registration"]
    expected_keys = {f"{t}_{i}" for t in terms for i in (1, 2)} | {
        "registration", "segmentation_p1", "segmentation_p2", "total"}
    assert set(result) == expected_keys
    assert all(tuple(v.shape) == (2,) for v in result.values())
    r = {k: np_(v) for k, v in result.items()}
    lw = cfg.loss
    level_sum = 0
    for i in (1, 2):
        level = (2.0 * r[f"mse_{i}"] - 1.5 * r[f"lncc_affine_{i}"] - 1.0 * r[f"lncc_deformable_{i}"]
                 + 0.7 * r[f"smooth_{i}"] + 0.2 * r[f"dice_{i}"])
        np.testing.assert_allclose(r[f"registration_{i}"], 0.3 ** (2 - i) * level, rtol=1e-5)
        level_sum = level_sum + 0.3 ** (2 - i) * level
    np.testing.assert_allclose(r["registration"], level_sum, rtol=1e-5)
    np.testing.assert_allclose(r["total"], r["registration"] + r["segmentation_p1"]
                               + r["segmentation_p2"], rtol=1e-5)
    # the level-1 terms use strided subsamples of the batch targets
    f1 = batch["fixed_image"][:, ::2, ::2, ::2]
    mask = L.lncc_mask(f1, outputs["warped_affine_image_1"], batch["fixed_mask"][:, ::2, ::2, ::2],
                       outputs["warped_affine_mask_1"])
    np.testing.assert_allclose(r["lncc_affine_1"], np_(L.lncc(f1, outputs["warped_affine_image_1"],
                                                              mask=mask)), rtol=1e-6)
    np.testing.assert_allclose(r["dice_1"], np_(L.registration_dice_loss(
        batch["dice_target"][:, ::2, ::2, ::2], outputs["warped_mask_1"])), rtol=1e-6)
    np.testing.assert_allclose(r["segmentation_p2"], lw.weight_segmentation * np_(
        L.segmentation_loss(batch["fixed_mask"], outputs["p2_logits"])), rtol=1e-6)


def test_segmentation_positive_weight_is_separate_from_the_registration_bce(rng):
    outputs, batch = fake_pyramid(rng)
    base = L.spirs_losses(outputs, batch, get_config("test"), levels=2)
    heavy = L.spirs_losses(outputs, batch, get_config("test", ["loss.segmentation_bce_positive_weight=50"]),
                           levels=2)
    for key in ("segmentation_p1", "segmentation_p2"):
        logits = outputs[key.replace("segmentation_", "") + "_logits"]
        np.testing.assert_allclose(np_(heavy[key]), np_(L.segmentation_loss(batch["fixed_mask"], logits,
                                                                             pos_weight=50.0)), rtol=1e-6)
        assert np.all(np_(heavy[key]) > np_(base[key]))
    # the registration Dice/BCE keeps bce_positive_weight
    np.testing.assert_allclose(np_(heavy["registration"]), np_(base["registration"]), rtol=1e-6)
    # loss.p2_bce_positive_weight: P2's alone; P1 keeps the segmentation weight
    p2_heavy = L.spirs_losses(outputs, batch, get_config("test", ["loss.segmentation_bce_positive_weight=5",
                                                                  "loss.p2_bce_positive_weight=50"]), levels=2)
    np.testing.assert_allclose(np_(p2_heavy["segmentation_p2"]), np_(heavy["segmentation_p2"]), rtol=1e-6)
    np.testing.assert_allclose(np_(p2_heavy["segmentation_p1"]), np_(L.segmentation_loss(
        batch["fixed_mask"], outputs["p1_logits"], pos_weight=5.0)), rtol=1e-6)
    with pytest.raises(SpirsInputError, match="p2_bce_positive_weight"):
        get_config("test", ["loss.p2_bce_positive_weight=-1"])


@pytest.mark.parametrize("levels, factor", [(1, 1.0), (2, 1.5), (3, 1.75)])
def test_spirs_losses_gamma_weighting_with_equal_terms(rng, levels, factor):
    """With only the MSE weighted and the same affine at every level, registration = Σγ^(L−i)·mse."""
    cfg = get_config("test", ["loss.weight_lncc_affine=0", "loss.weight_lncc_deformable=0",
                              "loss.lambda_smooth=0", "loss.lambda_dice=0"])
    outputs, batch = fake_pyramid(rng, levels=levels, size=16)
    for i in range(2, levels + 1):
        outputs[f"affine_{i}"] = outputs["affine_1"]
    r = L.spirs_losses(outputs, batch, cfg, levels=levels)
    np.testing.assert_allclose(np_(r["registration"]), factor * np_(r["mse_1"]), rtol=1e-6)


def test_spirs_losses_reports_missing_keys_and_wrong_grids(rng):
    cfg = get_config("test")
    outputs, batch = fake_pyramid(rng)
    del outputs["dvf_1"]
    with pytest.raises(ValueError, match="dvf_1"):
        L.spirs_losses(outputs, batch, cfg, levels=2)
    outputs, batch = fake_pyramid(rng)
    outputs["warped_image_1"] = outputs["warped_image_2"]
    with pytest.raises(ValueError, match="warped_image_1.*8³"):
        L.spirs_losses(outputs, batch, cfg, levels=2)


def test_spirs_losses_displacement_supervision_per_level(rng):
    """affine_supervision = displacement: mse_i is the voxel-loop mean over the level's fixed brain, with
    the S-grid affines expressed in level voxels (translation / 2**(levels − i))."""
    cfg = get_config("test", ["loss.affine_supervision=displacement"])
    outputs, batch = fake_pyramid(rng, levels=2, size=16)
    batch["fixed_image"][1, 5:, :, :] = 0.0        # second sample: a smaller, off-centre brain
    result = L.spirs_losses(outputs, batch, cfg, levels=2)
    true = batch["true_affine"].astype(np.float64)
    for i, factor in ((1, 2), (2, 1)):
        n = 16 // factor
        brain = batch["fixed_image"][:, ::factor, ::factor, ::factor] != 0
        scale = np.array([1.0, 1.0, 1.0, 1.0 / factor])
        expected = loop_displacement_mse(true * scale, outputs[f"affine_{i}"].astype(np.float64) * scale,
                                         (n, n, n), brain)
        np.testing.assert_allclose(np_(result[f"mse_{i}"]), expected, rtol=1e-5)
    matrix = L.spirs_losses(outputs, batch, get_config("test"), levels=2)
    np.testing.assert_allclose(np_(matrix["mse_2"]), np_(L.affine_mse(true, outputs["affine_2"])), rtol=1e-6)
    cfg.loss.affine_supervision = "entries"
    with pytest.raises(ValueError, match="affine_supervision"):
        L.spirs_losses(outputs, batch, cfg, levels=2)


def test_spirs_losses_exact_lncc_uses_float64_box_sums(rng):
    outputs, batch = fake_pyramid(rng, levels=2, size=16)
    cfg = get_config("test")
    fast = L.spirs_losses(outputs, batch, cfg, levels=2)
    exact = L.spirs_losses(outputs, batch, cfg, levels=2, exact_lncc=True)
    f2 = batch["fixed_image"]
    mask = L.lncc_mask(f2, outputs["warped_affine_image_2"], batch["fixed_mask"], outputs["warped_affine_mask_2"])
    np.testing.assert_array_equal(np_(exact["lncc_affine_2"]),
                                  np_(L.lncc_exact(f2, outputs["warped_affine_image_2"], mask=mask)))
    for key in fast:
        assert exact[key].dtype == fast[key].dtype
        np.testing.assert_allclose(np_(exact[key]), np_(fast[key]), rtol=1e-5, atol=1e-6)


def test_spirs_losses_runs_in_tf_function_with_gradients(rng):
    cfg = get_config("test")
    outputs, batch = fake_pyramid(rng, levels=2)
    dvf = tf.Variable(outputs["dvf_2"])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            result = L.spirs_losses({**outputs, "dvf_2": dvf}, batch, cfg, levels=2)
            loss = tf.reduce_mean(result["total"])
        return loss, tape.gradient(loss, dvf)

    loss, grad = step()
    assert np.isfinite(np_(loss)) and np.all(np.isfinite(np_(grad))) and np.any(np_(grad) != 0)
