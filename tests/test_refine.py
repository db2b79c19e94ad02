"""Tests of spirs_tf.refine (test-time refinement) on tiny synthetic volumes with known transforms."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from spirs_tf import geometry as G
from spirs_tf import metrics
from spirs_tf import refine as R
from spirs_tf import refine_ops as O
from spirs_tf import transforms as T
from spirs_tf._compat import tf


def blob(n: int, seed: int = 0, radius: float | None = None) -> np.ndarray:
    """A smooth textured ball in [0, 1] with an exactly zero background (a toy skull-stripped head)."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 1.5)
    texture /= texture.std()
    r = np.linalg.norm(np.indices((n, n, n)) - n / 2 + 0.25, axis=0)
    radius = radius if radius is not None else 0.36 * n
    head = r < radius
    img = 0.6 + 0.1 * texture + 0.15 * np.cos(r / 3.0)  # textured everywhere inside (no flat window)
    return np.where(head, img, 0.0).astype(np.float32)


def warp(volume, matrix=None, dvf=None) -> np.ndarray:
    out = T.warp(volume[None, ..., None], None if matrix is None else np.asarray(matrix, np.float32)[None],
                 None if dvf is None else np.asarray(dvf, np.float32)[None])
    return np.array(out)[0, ..., 0]


def smooth_field(n: int, amplitude: float, seed: int = 1) -> np.ndarray:
    """A smooth displacement (voxels) without folding: low-frequency sines."""
    rng = np.random.default_rng(seed)
    x = np.indices((n, n, n)).astype(np.float64) / n
    u = np.zeros((n, n, n, 3))
    for a in range(3):
        phase = rng.uniform(0, 2 * np.pi, 3)
        u[..., a] = amplitude * np.sin(2 * np.pi * x[(a + 1) % 3] + phase[0]) * np.cos(2 * np.pi * x[(a + 2) % 3]
                                                                                   + phase[1])
    return u.astype(np.float32)


def lncc_exact_masked(fixed, warped) -> float:
    """The exact float64 masked LNCC of :mod:`spirs_tf.metrics` (non-zero voxels of either image)."""
    return metrics.lncc(fixed, warped, 9, mask=metrics.lncc_mask(fixed, warped))


# ---------------------------------------------------------------------------------------------- pieces
def test_masked_lncc_matches_exact_float64_reference_next_to_zero_background():
    """Where every window has texture the smooth objective equals the authors' LNCC (metrics.lncc)."""
    fixed, moving = blob(24, 0), blob(24, 1)
    mask = metrics.lncc_mask(fixed, moving)
    exact = metrics.lncc(fixed, moving, 9, mask=mask)
    fixed_t, mean_i, var_i, keep, moving_t = R._level_inputs(fixed, moving, None, None, 1, 9)
    ours = float(O.masked_lncc(fixed_t, mean_i, var_i, moving_t, O.lncc_mask(keep, moving_t), 9))
    assert ours == pytest.approx(exact, abs=1e-4)
    same = float(O.masked_lncc(fixed_t, mean_i, var_i, fixed_t, O.lncc_mask(keep, fixed_t), 9))
    assert same == pytest.approx(1.0, abs=1e-4)


def test_jacobian_determinant_matches_metrics(rng):
    u = (rng.normal(size=(7, 8, 9, 3)) * 0.4).astype(np.float32)
    ours = O.jacobian_det(tf.constant(u[None]))[0].numpy()
    np.testing.assert_allclose(ours, metrics.jacobian_determinant(u), atol=1e-5)


def test_interpolation_matrix_is_corner_aligned_linear_and_clamped():
    m = O.interpolation_matrix(8, 4, 2)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    x = np.arange(4.0)
    np.testing.assert_allclose(m @ x, [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])  # fine 2i = coarse i; flat at the end


def test_resample_field_of_a_linear_field_is_exact_and_stride_inverts_it():
    n, f = 8, 2
    x = np.indices((n, n, n)).astype(np.float32)
    u = np.stack([0.3 * x[1] + 0.1, -0.2 * x[0], 0.05 * x[2]], -1)
    fine = R.resample_field(u, (n * f,) * 3)
    xf = np.indices((n * f,) * 3).astype(np.float32) / f
    expected = f * np.stack([0.3 * xf[1] + 0.1, -0.2 * xf[0], 0.05 * xf[2]], -1)
    inner = (slice(0, (n - 1) * f + 1),) * 3  # beyond the last coarse voxel the field is flat
    np.testing.assert_allclose(fine[inner], expected[inner], atol=1e-5)
    np.testing.assert_allclose(R.resample_field(fine, (n,) * 3), u, atol=1e-5)
    assert R.resample_field(u, (n, n, n)) is not None


def test_matrix_to_grid_and_field_offset_map_points_consistently(rng):
    n, scale, offset = 8, 2.0, np.array([0.5, 0.5, 0.5])
    params = G.IDENTITY_PARAMS + np.r_[rng.normal(0, 1, 3), rng.normal(0, 0.1, 12)].astype(np.float32)
    coarse = G.params_to_matrix(params)
    fine = R.matrix_to_grid(coarse, scale, offset)
    x_fine = rng.uniform(0, 15, (3, 5))
    p_fine = fine[:, :3] @ (x_fine - n) + fine[:, 3:] + n  # centre 16/2
    x_coarse = (x_fine - offset[:, None]) / scale
    p_coarse = coarse[:, :3] @ (x_coarse - n / 2) + coarse[:, 3:] + n / 2
    np.testing.assert_allclose(p_fine, scale * p_coarse + offset[:, None], atol=1e-4)
    u = np.broadcast_to(np.indices((n, n, n)).astype(np.float32)[0][..., None] * 0.1, (n, n, n, 3))
    up = R.resample_field(u, (16, 16, 16), offset)
    np.testing.assert_allclose(up[5, 0, 0, 0], scale * 0.1 * (5 - 0.5) / scale, atol=1e-5)
    affine_c = np.diag([3.0, 3.0, 3.0, 1.0])
    affine_c[:3, 3] = [-102.75, -106.25, -77.5]
    affine_f = np.diag([1.5, 1.5, 1.5, 1.0])
    affine_f[:3, 3] = [-103.5, -107.0, -78.25]
    got_scale, got_offset = R.grid_relation(affine_c, affine_f)
    assert got_scale == pytest.approx(2.0) and np.allclose(got_offset, 0.5)
    with pytest.raises(ValueError, match="offset must be 0"):
        R.resample_field(np.zeros((16, 16, 16, 3)), (8, 8, 8), 0.5)


def test_default_levels_keep_the_optimised_grid_at_most_64():
    assert R.default_levels((64, 64, 48)) == (R.DEFAULT_AFFINE_LEVELS, R.DEFAULT_DEFORMABLE_LEVELS)
    affine, deformable = R.default_levels((128, 128, 128))
    assert affine == ((8, 40), (4, 30), (2, 10))
    assert deformable == tuple((2 * f, s, n) for f, s, n in R.DEFAULT_DEFORMABLE_LEVELS)
    assert R.default_levels((200, 160, 160))[0][-1][0] == 4


def test_downsample_keeps_zero_background_and_constant_head():
    head = (np.linalg.norm(np.indices((16,) * 3) - 8, axis=0) < 6).astype(np.float32) * 0.7
    small = R.downsample(head, 2)
    assert small.shape == (8, 8, 8)
    assert small[0, 0, 0] == 0 and small[4, 4, 4] == pytest.approx(0.7, abs=1e-5)
    assert set(np.unique(small)) <= {0.0} | set(np.unique(small[small > 0]))
    np.testing.assert_allclose(small[small > 0], 0.7, atol=1e-5)  # normalised inside the head
    mask = np.zeros((16,) * 3, np.float32)
    mask[5, 5, 5] = 1
    assert R.downsample(mask, 2, "mask").sum() >= 1  # a one-voxel lesion survives


def test_gradients_are_finite_and_match_finite_differences():
    fixed, moving = blob(16, 0), blob(16, 0)
    fixed_t, mean_i, var_i, keep, moving_t = R._level_inputs(fixed, moving, None, None, 1, 9)
    grid = T.identity_grid((16, 16, 16))
    args = (R._t(np.eye(3, 4)), grid, R._t(1.0), R._t(np.full(3, 8.0)), R._t(4.0), fixed_t, mean_i, var_i,
            keep, moving_t, 9)
    theta = tf.constant(np.random.default_rng(2).normal(0, 0.4, 12).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = O.affine_loss(theta, *args)
    grad = tape.gradient(loss, theta).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    direction = grad / np.linalg.norm(grad)
    h = 0.02
    plus = float(O.affine_loss(theta + h * direction, *args))
    minus = float(O.affine_loss(theta - h * direction, *args))
    assert (plus - minus) / (2 * h) == pytest.approx(np.dot(grad, direction), rel=0.1)

    u0 = tf.zeros((1, 16, 16, 16, 3))
    coords = O.affine_coordinates(tf.zeros(12), R._t(np.eye(3, 4)), grid, R._t(1.0), R._t(np.full(3, 8.0)),
                                  R._t(1.0))[None]
    ctrl = tf.constant(np.random.default_rng(3).normal(0, 0.3, (1, 8, 8, 8, 3)).astype(np.float32))
    mats = tuple(R._t(O.interpolation_matrix(16, 8, 2)) for _ in range(3))
    with tf.GradientTape() as tape:
        tape.watch(ctrl)
        loss, _ = O.deformable_loss(ctrl, u0, coords, mats, fixed_t, mean_i, var_i, keep, moving_t,
                                    R._t(3.0), R._t(100.0), 9)
    g = tape.gradient(loss, ctrl).numpy()
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


# ------------------------------------------------------------------------------------------ behaviour
def moved_blob(translation, angles_deg, n: int = 32):
    """A 32³ blob, the same blob moved by a known rigid affine (background exactly 0), and that affine."""
    moving = blob(n, 0)
    params = G.IDENTITY_PARAMS.copy()
    params[:3] = translation
    params[3:6] = np.deg2rad(angles_deg)
    true = G.params_to_matrix(params)
    fixed = warp(moving, true)
    fixed[np.abs(fixed) < 1e-6] = 0
    return moving, fixed, true


def test_refine_affine_recovers_a_known_rotation_and_translation():
    moving, fixed, true = moved_blob([1.5, -1.0, 0.8], [6.0, -4.0, 5.0])
    calls = []
    res = R.refine_affine(fixed, moving, np.eye(3, 4), levels=((2, 40), (1, 30)),
                          progress=lambda *a: calls.append(a))
    assert res.matrix.shape == (3, 4) and res.matrix.dtype == np.float32
    np.testing.assert_allclose(res.matrix[:, :3], true[:, :3], atol=0.02)
    np.testing.assert_allclose(res.matrix[:, 3], true[:, 3], atol=0.15)
    assert res.lncc_after > 0.99 > res.lncc_before + 0.3
    assert [f for f, _ in res.losses] == [2, 1] and len(res.losses[0][1]) == 40
    assert calls[-1][:3] == ("affine", 70, 70) and len(calls) == 70


def test_refine_affine_keeps_its_best_iterate_when_the_optimiser_overshoots():
    moving, fixed, true = moved_blob([1.0, -0.5, 0.5], [3.0, -2.0, 2.0])
    start = true.copy()
    start[:, 3] += [0.3, -0.2, 0.2]  # close to the truth: Adam's steps of 40 voxels throw it out of the basin
    res = R.refine_affine(fixed, moving, start, levels=((2, 6), (1, 6)), learning_rate=20.0)
    before = R.refine_affine(fixed, moving, start, levels=((1, 0),))  # 0 iterations: the start's LNCC
    assert res.lncc_before == pytest.approx(before.lncc_before, abs=1e-6)
    assert res.lncc_after >= res.lncc_before
    # the returned matrix really has that LNCC: recompute it from scratch with the exact float64 metric
    warped = warp(moving, res.matrix.astype(np.float64))
    lncc_ref = lncc_exact_masked(fixed, warped)
    assert lncc_ref >= lncc_exact_masked(fixed, warp(moving, start)) - 1e-3
    # the start, or a matrix at least as close to the truth (not one thrown tens of voxels away)
    assert np.abs(res.matrix[:, 3] - true[:, 3]).max() <= np.abs(start[:, 3] - true[:, 3]).max() + 0.2


def test_identity_in_identity_out_for_identical_images():
    img = blob(24, 4)
    res = R.refine_affine(img, img, np.eye(3, 4), levels=((2, 15), (1, 10)))
    moved = G.sample_locations(res.matrix, img.shape) - np.indices(img.shape)
    assert np.abs(moved[:, img != 0]).max() < 0.1  # voxels: Adam's last steps at the optimum
    assert res.lncc_after == pytest.approx(1.0, abs=1e-3)
    deform = R.refine_deformable(img, img, np.eye(3, 4), None, levels=((2, 1, 10), (1, 1, 5)))
    assert np.abs(deform.dvf).max() < 0.1
    assert deform.lncc_after == pytest.approx(1.0, abs=1e-3)
    assert deform.folding_percent == 0.0


def test_refine_deformable_reduces_the_loss_on_a_known_smooth_deformation_without_folding():
    n = 24
    moving = blob(n, 5)
    truth = smooth_field(n, 1.2)
    fixed = warp(moving, None, truth)
    res = R.refine_deformable(fixed, moving, np.eye(3, 4), None, levels=((2, 1, 30), (1, 1, 15)))
    assert res.dvf.shape == (n, n, n, 3) and res.dvf.dtype == np.float32
    assert res.lncc_after > res.lncc_before + 0.05
    for _, trace in res.losses:
        assert trace[-1] < trace[0]
    assert res.folding_percent == 0.0
    head = fixed != 0
    err_before = np.linalg.norm(truth[head], axis=-1).mean()
    err_after = np.linalg.norm((res.dvf - truth)[head], axis=-1).mean()
    assert err_after < 0.8 * err_before


def test_refine_deformable_starts_from_a_coarser_network_field():
    n = 16
    img = blob(n, 6)
    coarse = np.zeros((8, 8, 8, 3), np.float32)
    coarse[..., 0] = 0.25  # 0.25 voxels of the 8³ grid = 0.5 voxels of the 16³ grid
    res = R.refine_deformable(img, img, np.eye(3, 4), coarse, levels=((1, 1, 0),))
    np.testing.assert_allclose(res.dvf[..., 0], 0.5, atol=1e-6)  # zero iterations: the start field


def test_refine_modes():
    img = blob(16, 7)
    m, u, info = R.refine(img, img, np.eye(3, 4), None, mode="off")
    assert u is None and info["affine"] is None and np.allclose(m, np.eye(3, 4))
    m, u, info = R.refine(img, img, np.eye(3, 4), np.ones((8, 8, 8, 3)), mode="off")
    np.testing.assert_allclose(u, 2.0)  # the network's field, resampled to this grid
    m, u, info = R.refine(img, img, np.eye(3, 4), np.ones((16, 16, 16, 3)), mode="affine",
                          affine_options={"levels": ((1, 3),)})
    assert info["affine"] is not None and info["deformable"] is None and not u.any()  # zero field
    m, u, info = R.refine(img, img, np.eye(3, 4), np.zeros((16, 16, 16, 3)), mode="full",
                          affine_options={"levels": ((1, 3),)}, deformable_options={"levels": ((1, 1, 3),)})
    assert u.shape == (16, 16, 16, 3) and info["deformable"].folding_percent == 0.0


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, message", [
    (lambda img: R.refine_affine(img[0], img, np.eye(3, 4)), "must be a 3-D volume"),
    (lambda img: R.refine_affine(img, img[:-1], np.eye(3, 4)), "same grid"),
    (lambda img: R.refine_affine(img, img, np.eye(3)), "3×4 matrix"),
    (lambda img: R.refine_affine(img, img, np.zeros((3, 4))), "singular"),
    (lambda img: R.refine_affine(img * np.nan, img, np.eye(3, 4)), "NaN"),
    (lambda img: R.refine_affine(img, img, np.eye(3, 4), levels=((0, 5),)), "positive integer"),
    (lambda img: R.refine_affine(img, img, np.eye(3, 4), levels=((2,),)), "2-tuples"),
    (lambda img: R.refine_affine(img, img, np.eye(3, 4), levels=((2, -1),)), "non-negative integer"),
    (lambda img: R.refine_affine(img, img, np.eye(3, 4), learning_rate=-1), "learning_rate"),
    (lambda img: R.refine_affine(img, img, np.eye(3, 4), window=4), "odd"),
    (lambda img: R.refine_affine(img, img, np.eye(3, 4), moving_mask=img[:8]), "moving_mask"),
    (lambda img: R.refine_deformable(img, img, np.eye(3, 4), np.zeros((5, 5, 5, 3))), "integer multiples"),
    (lambda img: R.refine_deformable(img, img, np.eye(3, 4), None, bending_weight=-1), "bending_weight"),
    (lambda img: R.refine_deformable(img, img, np.eye(3, 4), None, levels=((4, 2, 5),)), "under 3 voxels"),
    (lambda img: R.refine(img, img, np.eye(3, 4), mode="fast"), "'off', 'affine' or 'full'"),
    (lambda img: R.refine(img, img, np.eye(3, 4), deformable_start="network"), "needs the network's field"),
])
def test_bad_arguments_raise_value_error_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call(blob(16, 8))


def test_enable_compile_cache_sets_the_xla_flag_once(tmp_path, monkeypatch):
    from spirs_tf.xla_cache import enable_compile_cache

    monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
    folder = str(tmp_path / "xla")
    assert enable_compile_cache(folder) == folder
    import os

    assert os.path.isdir(folder)
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_persistent_cache_directory={folder}"
    assert enable_compile_cache(str(tmp_path / "other")) == folder  # a flag already set is kept
    assert os.environ["TF_XLA_FLAGS"].count("persistent_cache") == 1


def test_terminal_progress_prints_one_updating_line_per_stage():
    import io

    out = io.StringIO()
    report = R.terminal_progress(out, every=2)
    for k in range(1, 4):
        report("affine", k, 3, -0.5)
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("3/3    loss -0.5000\n")
