"""Tests of spirs_tf.transforms against analytic truths, SciPy references and finite differences."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from spirs_tf import geometry as G
from spirs_tf import transforms as T
from spirs_tf._compat import keras, tf


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def random_matrix(rng, batch, sigma=0.08):
    params = G.IDENTITY_PARAMS[None] + rng.normal(0, sigma, (batch, 15)).astype(np.float32)
    params[:, :3] = rng.normal(0, 1.5, (batch, 3))
    return G.params_to_matrix(params)


def reference_warp(volume, matrix=None, dvf=None):
    """Exact definition of the zero-padded trilinear warp, in float64 with SciPy.

    Zero padding = pad the volume with one voxel of zeros on each side and sample the padded copy
    at ``p + 1``; locations further out than that are 0 as well (``mode='constant'``, cval 0).
    """
    volume = np.asarray(volume, dtype=np.float64)
    out = np.zeros(volume.shape)
    for b in range(volume.shape[0]):
        p = G.sample_locations(None if matrix is None else matrix[b], volume.shape[1:4],
                               None if dvf is None else dvf[b])
        for c in range(volume.shape[-1]):
            padded = np.pad(volume[b, ..., c], 1)
            out[b, ..., c] = ndimage.map_coordinates(padded, p + 1, order=1, mode="constant", cval=0.0)
    return out


# ------------------------------------------------------------------------ identity and shifts
def test_identity_affine_and_zero_dvf_return_moving_exactly(rng):
    moving = rng.normal(size=(2, 8, 10, 12, 3)).astype(np.float32)
    eye = np.tile(np.eye(3, 4, dtype=np.float32), (2, 1, 1))
    zero = np.zeros((2, 8, 10, 12, 3), np.float32)
    np.testing.assert_array_equal(np_(T.warp(moving, eye, zero)), moving)
    np.testing.assert_array_equal(np_(T.warp(moving, eye)), moving)
    np.testing.assert_array_equal(np_(T.warp(moving, dvf=zero)), moving)
    np.testing.assert_array_equal(np_(T.warp(moving)), moving)


def shifted(volume, shift):
    """out[x] = volume[x + shift] (zeros where x + shift leaves the volume), numpy reference."""
    out = np.zeros_like(volume)
    src, dst = [slice(None)], [slice(None)]
    for s, n in zip(shift, volume.shape[1:4]):
        src.append(slice(max(s, 0), n + min(s, 0)))
        dst.append(slice(max(-s, 0), n - max(s, 0)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


@pytest.mark.parametrize("shift", [(2, -1, 0), (-3, 0, 1), (0, 4, -2)])
def test_integer_shift_via_translation_and_via_dvf(rng, shift):
    moving = rng.random((1, 10, 8, 12, 2)).astype(np.float32) + 1.0  # strictly positive
    expected = shifted(moving, shift)
    assert (expected == 0).any()  # zeros entered at the border
    matrix = np.eye(3, 4, dtype=np.float32)[None].copy()
    matrix[0, :, 3] = shift
    dvf = np.broadcast_to(np.asarray(shift, np.float32), (1, 10, 8, 12, 3))
    np.testing.assert_array_equal(np_(T.warp(moving, matrix)), expected)
    np.testing.assert_array_equal(np_(T.warp(moving, dvf=dvf)), expected)


# --------------------------------------------------------------------- SciPy reference
def test_warp_matches_scipy_on_zero_padded_volume(rng):
    shape = (2, 12, 10, 14, 2)
    moving = rng.normal(size=shape).astype(np.float32)
    matrix = random_matrix(rng, 2)
    dvf = rng.normal(0, 1.5, shape[:4] + (3,)).astype(np.float32)
    for args in ((matrix, None), (None, dvf), (matrix, dvf)):
        out = np_(T.warp(moving, *args))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, reference_warp(moving, *args), atol=1e-5)


def test_warp_matches_plain_map_coordinates_inside_volume(rng):
    """Where every sample lies in [0, N−1] both zero conventions agree with plain map_coordinates."""
    moving = rng.normal(size=(1, 12, 12, 12, 1)).astype(np.float32)
    dvf = rng.uniform(-0.9, 0.9, (1, 12, 12, 12, 3)).astype(np.float32)
    out = np_(T.warp(moving, dvf=dvf))[0, ..., 0]
    p = G.sample_locations(None, (12, 12, 12), dvf[0])
    ref = ndimage.map_coordinates(moving[0, ..., 0].astype(np.float64), p, order=1, mode="constant", cval=0.0)
    inside = np.all((p >= 0) & (p <= 11), axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out[inside], ref[inside], atol=1e-5)


def test_zero_padding_convention_at_the_border():
    """A sample a fraction f outside the volume gets (1 − f) of the border voxel; ≥ 1 voxel out gives 0."""
    volume = np.ones((1, 4, 4, 4, 1), np.float32)
    coords = np.zeros((1, 1, 1, 6, 3), np.float32) + 1.5
    coords[0, 0, 0, :, 0] = [-0.25, -0.5, -1.0, 3.25, 3.75, 5.0]
    out = np_(T.resample(volume, coords))[0, 0, 0, :, 0]
    np.testing.assert_allclose(out, [0.75, 0.5, 0.0, 0.75, 0.25, 0.0], atol=1e-6)


@pytest.mark.parametrize("channels", [1, 4])
def test_linear_field_is_interpolated_exactly_inside(rng, channels):
    n = 10
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij")
    field = np.stack([3 * i + j + c * k for c in range(channels)], axis=-1)[None]
    coords = rng.uniform(0, n - 1, (2, 6, 5, 4, 3)).astype(np.float32)
    volume = np.concatenate([field, 2 * field])
    out = np_(T.resample(volume, coords))
    expected = np.stack([3 * coords[..., 0] + coords[..., 1] + c * coords[..., 2] for c in range(channels)], -1)
    expected[1] *= 2
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_resample_output_grid_follows_coords(rng):
    volume = rng.normal(size=(1, 8, 8, 8, 2)).astype(np.float32)
    coords = rng.uniform(-1, 9, (1, 3, 4, 5, 3)).astype(np.float32)
    out = np_(T.resample(volume, coords))
    assert out.shape == (1, 3, 4, 5, 2)
    padded = np.pad(volume[0].astype(np.float64), ((1, 1), (1, 1), (1, 1), (0, 0)))
    for c in range(2):
        ref = ndimage.map_coordinates(padded[..., c], np.moveaxis(coords[0], -1, 0) + 1, order=1, cval=0.0)
        np.testing.assert_allclose(out[0, ..., c], ref, atol=1e-5)


# ------------------------------------------------------------------------------ gradients
def smooth_volume(shape):
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return np.sin(0.5 * i) * np.cos(0.4 * j) + 0.3 * np.sin(0.3 * k + 0.2 * i)


def test_warp_gradient_wrt_dvf_matches_finite_differences(rng):
    """∂L/∂u for L = Σ w·warp(v, A, u); each output voxel depends only on its own u, so one central
    difference per channel (float64 reference, ε = 1e-6) gives every derivative. Tolerance 1e-4."""
    n = 10
    volume = smooth_volume((n, n, n))[None, ..., None]
    matrix = random_matrix(rng, 1)
    dvf = rng.normal(0, 1.0, (1, n, n, n, 3))
    weights = rng.normal(size=(1, n, n, n, 1))
    dvf_t = tf.Variable(dvf.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(T.warp(volume.astype(np.float32), matrix, dvf_t) * weights.astype(np.float32))
    grad = tape.gradient(loss, dvf_t).numpy()

    eps = 1e-6
    fd = np.zeros_like(dvf)
    for a in range(3):
        step = np.zeros(3)
        step[a] = eps
        diff = reference_warp(volume, matrix, dvf + step) - reference_warp(volume, matrix, dvf - step)
        fd[..., a] = (diff * weights)[..., 0] / (2 * eps)
    assert np.abs(fd).max() > 0.1
    np.testing.assert_allclose(grad, fd, atol=1e-4)


def test_warp_gradient_wrt_affine_matches_finite_differences(rng):
    """∂L/∂T for the 12 matrix entries (with a DVF present), float64 central differences, ε = 1e-6;
    relative tolerance 1e-3 (float32 sums over 1,000 voxels)."""
    n = 10
    volume = smooth_volume((n, n, n))[None, ..., None]
    matrix = random_matrix(rng, 1).astype(np.float64)
    dvf = rng.normal(0, 0.5, (1, n, n, n, 3))
    weights = rng.normal(size=(1, n, n, n, 1))
    m_t = tf.Variable(matrix.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(T.warp(volume.astype(np.float32), m_t, dvf.astype(np.float32)) * weights)
    grad = tape.gradient(loss, m_t).numpy()

    eps = 1e-6
    fd = np.zeros((3, 4))
    for r in range(3):
        for c in range(4):
            plus, minus = matrix.copy(), matrix.copy()
            plus[0, r, c] += eps
            minus[0, r, c] -= eps
            lp = np.sum(reference_warp(volume, plus, dvf) * weights)
            lm = np.sum(reference_warp(volume, minus, dvf) * weights)
            fd[r, c] = (lp - lm) / (2 * eps)
    np.testing.assert_allclose(grad[0], fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())


def test_warp_gradient_wrt_volume_is_the_adjoint(rng):
    """warp is linear in the volume, so ∇_v⟨w, warp(v)⟩ = warpᵀw and ⟨warpᵀw, v⟩ = ⟨w, warp(v)⟩."""
    v = rng.normal(size=(1, 8, 8, 8, 2)).astype(np.float32)
    w = rng.normal(size=(1, 8, 8, 8, 2)).astype(np.float32)
    matrix, dvf = random_matrix(rng, 1), rng.normal(0, 1, (1, 8, 8, 8, 3)).astype(np.float32)
    v_t = tf.Variable(v)
    with tf.GradientTape() as tape:
        inner = tf.reduce_sum(T.warp(v_t, matrix, dvf) * w)
    adjoint = tape.gradient(inner, v_t).numpy()
    np.testing.assert_allclose(np.sum(adjoint * v), inner.numpy(), rtol=1e-4)


# ------------------------------------------------------------------------------- affines
def test_affine_params_identity_and_known_rotation():
    identity = T.affine_params_to_matrix(G.IDENTITY_PARAMS[None])
    np.testing.assert_allclose(np_(identity)[0], np.eye(3, 4), atol=1e-7)
    params = np.tile(G.IDENTITY_PARAMS, (3, 1))
    params[0, 3] = np.pi / 2  # about axis 0
    params[1, 5] = np.pi / 2  # about axis 2
    params[2, :3] = [1, -2, 3]
    params[2, 6:9] = [2, 3, 4]
    m = np_(T.affine_params_to_matrix(params))
    np.testing.assert_allclose(m[0, :, :3], [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-6)
    np.testing.assert_allclose(m[1, :, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(m[2], [[2, 0, 0, 1], [0, 3, 0, -2], [0, 0, 4, 3]], atol=1e-6)


def test_affine_params_agree_with_geometry(rng):
    params = G.IDENTITY_PARAMS[None] + rng.normal(0, 0.3, (6, 15)).astype(np.float32)
    np.testing.assert_allclose(np_(T.affine_params_to_matrix(params)), G.params_to_matrix(params), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 15\)|last axis 15"):
        T.affine_params_to_matrix(np.zeros((2, 12), np.float32))


def test_scale_translation_and_compose_affines(rng):
    a, b = random_matrix(rng, 3), random_matrix(rng, 3)
    scaled = np_(T.scale_translation(a, 2.0))
    np.testing.assert_allclose(scaled, G.scale_translation(a, 2.0), atol=1e-6)
    composed = np_(T.compose_affines(a, b))
    expected = (G.to_homogeneous(a).astype(np.float64) @ G.to_homogeneous(b))[:, :3]
    np.testing.assert_allclose(composed, expected, atol=1e-5)
    # Warping with the composition = sampling p = A(B(x)) (coarse applied last), at the coordinate level.
    shape = (6, 6, 6)
    pb = G.sample_locations(b[0], shape)
    m_a, t_a = a[0, :, :3].astype(np.float64), a[0, :, 3, None, None, None]
    pa_of_pb = np.einsum("ab,bijk->aijk", m_a, pb - 3.0) + t_a + 3.0
    np.testing.assert_allclose(G.sample_locations(composed[0], shape), pa_of_pb, atol=1e-4)


# ------------------------------------------------------------------------ pyramid operators
def brute_force_upsample(x):
    """Authors' definition literally: nearest ×2, zero-pad 1 at the end of each axis, 2×2×2 mean."""
    y = x.repeat(2, 1).repeat(2, 2).repeat(2, 3)
    y = np.pad(y, ((0, 0), (0, 1), (0, 1), (0, 1), (0, 0)))
    out = np.zeros((x.shape[0], y.shape[1] - 1, y.shape[2] - 1, y.shape[3] - 1, x.shape[4]))
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                out += 0.125 * y[:, di:di + out.shape[1], dj:dj + out.shape[2], dk:dk + out.shape[3]]
    return out


def test_upsample2x_exact_values_on_a_ramp():
    ramp = np.arange(1, 5, dtype=np.float32)  # 1, 2, 3, 4
    x = np.broadcast_to(ramp[:, None, None], (4, 3, 3)).copy()[None, ..., None]
    up = np_(T.upsample2x(x))
    assert up.shape == (1, 8, 6, 6, 1)
    line = up[0, :, 0, 0, 0]  # interior of axes 1, 2 (not their halved last plane)
    np.testing.assert_array_equal(line, [1, 1.5, 2, 2.5, 3, 3.5, 4, 2])  # even = coarse, odd = mean, last halved
    np.testing.assert_array_equal(up[0, :, 5, 0, 0], line / 2)  # last plane of axis 1 halved
    np.testing.assert_array_equal(up[0, :, 5, 5, 0], line / 4)


def test_upsample2x_equals_the_authors_operator(rng):
    x = rng.normal(size=(2, 3, 4, 5, 2)).astype(np.float32)
    np.testing.assert_allclose(np_(T.upsample2x(x)), brute_force_upsample(x), atol=1e-6)
    np.testing.assert_allclose(np_(T.upsample_dvf(x[..., :2])), 2 * brute_force_upsample(x[..., :2]), atol=1e-6)


def test_compose_dvf_limits_and_integer_shift(rng):
    u = rng.normal(0, 1, (1, 8, 8, 8, 3)).astype(np.float32)
    r = rng.normal(0, 1, (1, 8, 8, 8, 3)).astype(np.float32)
    zero = np.zeros_like(u)
    np.testing.assert_allclose(np_(T.compose_dvf(u, zero)), u, atol=0)
    np.testing.assert_array_equal(np_(T.compose_dvf(zero, r)), r)
    shift = np.broadcast_to(np.float32([1, 0, -2]), u.shape)
    np.testing.assert_array_equal(np_(T.compose_dvf(shift, r)), shift + shifted(r, (1, 0, -2)))
    with pytest.raises(ValueError, match=r"\(1, 8, 8, 8, 3\).*\(1, 4, 4, 4, 3\)"):
        T.compose_dvf(u, r[:, :4, :4, :4])


def test_subsample_is_strided_and_corner_aligned(rng):
    x = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(np_(T.subsample(x, 2)), x[:, ::2, ::2, ::2])
    np.testing.assert_array_equal(np_(T.subsample(x, 4)), x[:, ::4, ::4, ::4])
    with pytest.raises(ValueError, match="positive integer"):
        T.subsample(x, 0)


# ---------------------------------------------------------------------------------- Gaussian
def test_gaussian_kernel_normalised_and_gaussian():
    k = T.gaussian_kernel3d(5, 1.0)
    assert k.shape == (5, 5, 5)
    assert abs(k.sum() - 1) < 1e-6
    r2 = np.sum(np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij")) ** 2, axis=0)
    expected = np.exp(-r2 / 2.0)
    np.testing.assert_allclose(k, expected / expected.sum(), rtol=1e-6)
    for bad in ((4, 1.0), (0, 1.0), (5, 0.0)):
        with pytest.raises(ValueError):
            T.gaussian_kernel3d(*bad)


def test_gaussian_blur_matches_scipy_and_keeps_constant_interior(rng):
    x = rng.normal(size=(2, 12, 10, 11, 2)).astype(np.float32)
    out = np_(T.gaussian_blur(x, 5, 1.0))
    k = T.gaussian_kernel3d(5, 1.0).astype(np.float64)
    for b in range(2):
        for c in range(2):
            ref = ndimage.convolve(x[b, ..., c].astype(np.float64), k, mode="constant", cval=0.0)
            np.testing.assert_allclose(out[b, ..., c], ref, atol=1e-5)
    const = np_(T.gaussian_blur(np.full((1, 12, 12, 12, 1), 3.0, np.float32), 5, 1.0))
    np.testing.assert_allclose(const[0, 2:-2, 2:-2, 2:-2], 3.0, rtol=1e-6)
    assert const[0, 0, 0, 0, 0] < 3.0  # zero padding darkens the border


# ------------------------------------------------------------------------ dtypes, graphs, errors
def test_warp_is_float32_for_float16_inputs(rng):
    moving = rng.random((1, 8, 8, 8, 1)).astype(np.float16)
    dvf = rng.normal(0, 1, (1, 8, 8, 8, 3)).astype(np.float16)
    out = T.warp(moving, np.eye(3, 4, dtype=np.float16)[None], dvf)
    assert np_(out).dtype == np.float32
    assert np_(T.resample(moving, dvf.astype(np.float32) + 2)).dtype == np.float32


def test_dvf_grid_mismatch_raises_with_shapes():
    moving = np.zeros((1, 8, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(8, 8, 8\)"):
        T.warp(moving, dvf=np.zeros((1, 4, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="last axis 3"):
        T.warp(moving, dvf=np.zeros((1, 8, 8, 8, 2), np.float32))
    with pytest.raises(ValueError, match="last axis 4"):
        T.warp(moving, matrix=np.zeros((1, 3, 3), np.float32))


def test_warp_in_graph_with_unknown_batch_and_compiled_warp(rng):
    moving = rng.normal(size=(3, 8, 8, 8, 2)).astype(np.float32)
    matrix, dvf = random_matrix(rng, 3), rng.normal(0, 1, (3, 8, 8, 8, 3)).astype(np.float32)
    graph_warp = tf.function(T.warp, input_signature=[
        tf.TensorSpec((None, 8, 8, 8, 2)), tf.TensorSpec((None, 3, 4)), tf.TensorSpec((None, 8, 8, 8, 3))])
    expected = reference_warp(moving, matrix, dvf)
    np.testing.assert_allclose(graph_warp(moving, matrix, dvf).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(np_(T.compiled_warp(moving, matrix, dvf)), expected, atol=1e-5)
    np.testing.assert_allclose(np_(T.compiled_warp(moving, matrix)), reference_warp(moving, matrix), atol=1e-5)


@pytest.mark.slow
def test_timing_eager_vs_compiled_warp_128(capsys):
    """Prints eager vs XLA-compiled warp time of a (1, 128³, 1) volume with affine + DVF (CPU)."""
    rng = np.random.default_rng(0)
    moving = rng.random((1, 128, 128, 128, 1), dtype=np.float32)
    matrix, dvf = random_matrix(rng, 1), rng.normal(0, 2, (1, 128, 128, 128, 3)).astype(np.float32)

    def seconds(fn, repeats=5):
        np_(fn(moving, matrix, dvf))  # warm-up / compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            np_(fn(moving, matrix, dvf))
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    eager, compiled = seconds(T.warp), seconds(T.compiled_warp)
    with capsys.disabled():
        print(f"\nwarp 128^3 affine+dvf: eager {eager:.3f} s, compiled {compiled:.3f} s, x{eager / compiled:.1f}")
    compiled_out = np_(T.compiled_warp(moving, matrix, dvf))
    np.testing.assert_allclose(compiled_out, np_(T.warp(moving, matrix, dvf)), atol=1e-5)
