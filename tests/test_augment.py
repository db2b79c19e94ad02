"""Augmentation: the ground-truth affine convention, flips, ranges, strided sampling, gamma, targets."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from spirs_tf import augment as A
from spirs_tf import geometry as G
from spirs_tf.config import AugmentConfig

GRID = 32


def smooth_volume(seed: int, grid: int = GRID, sigma: float = 3.0) -> np.ndarray:
    """A smooth random image with values in [0.1, 0.9] everywhere (no background)."""
    v = ndimage.gaussian_filter(np.random.default_rng(seed).random((grid,) * 3), sigma)
    return (0.1 + 0.8 * (v - v.min()) / (v.max() - v.min())).astype(np.float32)


def ramp_volume(grid: int = GRID) -> np.ndarray:
    """I(x) = 0.3 + 0.005·(x0 + 2·x1 − x2) + 0.15: linear, so trilinear and cubic sampling are exact."""
    x = G.sample_locations(None, (grid,) * 3)
    return (0.45 + 0.005 * (x[0] + 2 * x[1] - x[2])).astype(np.float32)


def sphere(grid: int, centre, radius: float) -> np.ndarray:
    x = G.sample_locations(None, (grid,) * 3)
    d2 = sum((x[a] - centre[a]) ** 2 for a in range(3))
    return (d2 <= radius ** 2).astype(np.float32)


def scipy_warp(volume: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The transformer's definition out(x) = volume(M(x − c) + t + c), trilinear, zeros outside."""
    return ndimage.map_coordinates(volume, G.sample_locations(matrix, volume.shape), order=1,
                                   mode="constant", cval=0.0)


def no_intensity(**kw) -> AugmentConfig:
    return dataclasses.replace(AugmentConfig(), gamma_probability=0.0, **kw)


ZEROS = np.zeros((GRID,) * 3, np.float32)


# ------------------------------------------------------------------------ ground-truth convention
@pytest.mark.parametrize("out_size", [32, 16])
@pytest.mark.parametrize("order", [1, 3])
def test_warping_augmented_moving_with_true_affine_recovers_prealigned_ramp(out_size, order):
    """warp(moving_aug, T_true) = pre-aligned moving, exactly for a linear image (central region)."""
    vol = ramp_volume()
    cfg = no_intensity(spatial_probability=1.0, image_order=order)
    for seed in range(4):
        out = A.augment_pair(vol, vol, ZEROS, ZEROS, np.random.default_rng(seed), cfg, out_size)
        back = scipy_warp(out["moving_image"], out["true_affine"])
        # out["fixed_image"] is the (possibly flipped) pre-aligned image at S, same flips as moving.
        c = slice(out_size // 4, 3 * out_size // 4)
        np.testing.assert_allclose(back[c, c, c], out["fixed_image"][c, c, c], atol=2e-3)
        assert not np.allclose(out["moving_image"], out["fixed_image"], atol=0.02)  # it did move


@pytest.mark.parametrize("out_size,tol", [(32, 0.01), (16, 0.03)])
def test_transforms_warp_undoes_augmentation_of_smooth_volume(out_size, tol):
    """Same with spirs_tf.transforms.warp (the network's transformer) on a smooth random volume.

    Tolerance: trilinear re-interpolation of the augmented S-grid image; measured max 0.005 (S=32) and
    0.018 (S=16) on the central half.
    """
    from spirs_tf import transforms

    vol = smooth_volume(0)
    cfg = no_intensity(spatial_probability=1.0)
    out = A.augment_pair(vol, vol, ZEROS, ZEROS, np.random.default_rng(3), cfg, out_size)
    back = np.asarray(transforms.warp(out["moving_image"][None, ..., None], out["true_affine"][None]))[0, ..., 0]
    c = slice(out_size // 4, 3 * out_size // 4)
    err = np.abs(back[c, c, c] - out["fixed_image"][c, c, c]).max()
    assert err < tol
    before = np.abs(out["moving_image"][c, c, c] - out["fixed_image"][c, c, c]).max()
    assert before > 5 * err  # the augmentation misaligned the pair, the true affine realigns it


def test_true_affine_is_params_matrix_with_translation_per_output_voxel():
    vol = smooth_volume(1)
    cfg = no_intensity(spatial_probability=1.0, flip_probability=0.0)
    rng = np.random.default_rng(7)
    out = A.augment_pair(vol, vol, ZEROS, ZEROS, rng, cfg, 8)
    rng = np.random.default_rng(7)
    rng.random(3)  # the flip draws
    expected = G.params_to_matrix(A.random_affine_params(rng, cfg, GRID))
    np.testing.assert_allclose(out["true_affine"][:, :3], expected[:, :3], rtol=1e-6)
    np.testing.assert_allclose(out["true_affine"][:, 3], expected[:, 3] / 4, rtol=1e-6)


# ---------------------------------------------------------------------------- identity and flips
@pytest.mark.parametrize("out_size", [32, 8])
def test_disabled_augmentation_is_strided_identity(out_size):
    fixed, moving = smooth_volume(2), smooth_volume(3)
    fm, mm = sphere(GRID, (10, 10, 10), 3), sphere(GRID, (20, 20, 20), 4)
    cfg = dataclasses.replace(AugmentConfig(), enabled=False)
    out = A.augment_pair(fixed, moving, fm, mm, np.random.default_rng(0), cfg, out_size)
    f = GRID // out_size
    np.testing.assert_array_equal(out["moving_image"], moving[::f, ::f, ::f])
    np.testing.assert_array_equal(out["fixed_image"], fixed[::f, ::f, ::f])
    np.testing.assert_array_equal(out["moving_mask"], mm[::f, ::f, ::f])
    np.testing.assert_array_equal(out["fixed_mask"], fm[::f, ::f, ::f])
    np.testing.assert_array_equal(out["true_affine"], np.eye(3, 4))
    for k in A.OUTPUT_KEYS:
        assert out[k].dtype == np.float32
        assert out[k].shape == ((3, 4) if k == "true_affine" else (out_size,) * 3)


def test_flips_are_applied_to_all_volumes_alike():
    fixed, moving = smooth_volume(4), smooth_volume(5)
    fm, mm = sphere(GRID, (8, 9, 20), 3), sphere(GRID, (8, 10, 21), 3)
    cfg = no_intensity(spatial_probability=0.0, flip_probability=1.0)
    out = A.augment_pair(fixed, moving, fm, mm, np.random.default_rng(0), cfg, 16)
    flip = (slice(None, None, -1),) * 3
    np.testing.assert_array_equal(out["true_affine"], np.eye(3, 4))
    np.testing.assert_array_equal(out["fixed_image"], fixed[flip][::2, ::2, ::2])
    np.testing.assert_array_equal(out["fixed_mask"], fm[flip][::2, ::2, ::2])
    # identity affine: cubic spline interpolation at the nodes reproduces the flipped volume
    np.testing.assert_allclose(out["moving_image"], moving[flip][::2, ::2, ::2], atol=1e-5)
    np.testing.assert_array_equal(out["moving_mask"], mm[flip][::2, ::2, ::2])
    np.testing.assert_array_equal(out["ncc_mask"], np.maximum(fm, mm)[flip][::2, ::2, ::2])


def test_random_flips_keep_the_pair_aligned():
    vol = smooth_volume(6)
    cfg = no_intensity(spatial_probability=0.0)
    flipped = 0
    for seed in range(12):
        out = A.augment_pair(vol, vol, ZEROS, ZEROS, np.random.default_rng(seed), cfg, 16)
        np.testing.assert_allclose(out["moving_image"], out["fixed_image"], atol=1e-5)
        flipped += not np.array_equal(out["fixed_image"], vol[::2, ::2, ::2])
    assert 6 <= flipped <= 12  # P(no flip) = 1/8 per draw


# ------------------------------------------------------------------------------ parameter ranges
def test_affine_parameter_ranges_and_probabilities():
    cfg = AugmentConfig()
    n, grid = 4000, 64
    rng = np.random.default_rng(11)
    p = np.stack([A.random_affine_params(rng, cfg, grid) for _ in range(n)])
    t_max = 20.0 * grid / 128
    assert np.all(np.abs(p[:, 0:3]) <= t_max) and np.abs(p[:, 0:3]).max() > 0.95 * t_max
    r_max = np.deg2rad(20.0)
    assert np.all(np.abs(p[:, 3:6]) <= r_max) and np.abs(p[:, 3:6]).max() > 0.95 * r_max
    assert np.all((p[:, 6:9] >= 0.9) & (p[:, 6:9] <= 1.1))
    assert np.all(np.abs(p[:, 9:15]) <= 0.05)
    sigma = np.sqrt(0.9 * 0.1 / n)
    for lo, hi in ((0, 3), (3, 6), (6, 9), (9, 15)):
        changed = np.any(p[:, lo:hi] != G.IDENTITY_PARAMS[lo:hi], axis=1)
        assert abs(changed.mean() - 0.9) < 4 * sigma
    # the groups are drawn independently: P(all four identity) = 0.1^4, P(translation only off) etc.
    both = np.any(p[:, 0:3] != 0, axis=1) & np.any(p[:, 3:6] != 0, axis=1)
    assert abs(both.mean() - 0.81) < 4 * np.sqrt(0.81 * 0.19 / n)


def test_flip_probability_per_axis():
    vol = np.zeros((4, 4, 4), np.float32)
    vol[0, 0, 0] = 1.0
    cfg = dataclasses.replace(AugmentConfig(), spatial_probability=0.0, gamma_probability=0.0, image_order=1)
    n = 800
    hits = np.zeros(3)
    for seed in range(n):
        out = A.augment_pair(vol, vol, vol, vol, np.random.default_rng(seed), cfg, 4)
        hits += np.array(np.unravel_index(np.argmax(out["fixed_image"]), (4, 4, 4))) == 3
    assert np.all(np.abs(hits / n - 0.5) < 4 * np.sqrt(0.25 / n))


def test_gamma_range_probability_and_background():
    cfg = AugmentConfig()
    n = 4000
    rng = np.random.default_rng(5)
    x = np.array([0.0, 0.5, 1.0], np.float32)
    gammas = []
    for _ in range(n):
        y = A.random_gamma(x, rng, cfg)
        assert y[0] == 0.0 and y[2] == 1.0
        gammas.append(np.log(y[1]) / np.log(0.5))
    gammas = np.array(gammas)
    applied = np.abs(gammas - 1) > 1e-6
    assert abs(applied.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
    assert gammas.min() >= 0.75 - 1e-5 and gammas.max() <= 1.25 + 1e-5
    brighten = (gammas[applied] < 1).mean()
    assert abs(brighten - 0.5) < 4 * np.sqrt(0.25 / applied.sum())


def test_gamma_in_augment_pair_keeps_background_zero_and_range():
    img = smooth_volume(8) * sphere(GRID, (16, 16, 16), 10)
    cfg = dataclasses.replace(AugmentConfig(), gamma_probability=1.0, flip_probability=0.0)
    for seed in range(4):
        out = A.augment_pair(img, img, ZEROS, ZEROS, np.random.default_rng(seed), cfg, 16)
        for k in ("fixed_image", "moving_image"):
            assert out[k].min() >= 0.0 and out[k].max() <= 1.0
        # gamma maps non-zero voxels to non-zero values and zeros to zero
        assert (out["fixed_image"] > 0).sum() == (img[::2, ::2, ::2] > 0).sum()


# ----------------------------------------------------------------------- strided sampling and edges
@pytest.mark.parametrize("order", [1, 3])
def test_strided_output_equals_full_resolution_then_subsample(order):
    fixed, moving = smooth_volume(9), smooth_volume(10) * sphere(GRID, (15, 16, 17), 12)
    fm, mm = sphere(GRID, (12, 12, 12), 4), sphere(GRID, (13, 12, 12), 4)
    cfg = dataclasses.replace(AugmentConfig(), spatial_probability=1.0, gamma_probability=1.0,
                              image_order=order, mask_order=order % 2)
    full = A.augment_pair(fixed, moving, fm, mm, np.random.default_rng(21), cfg, GRID)
    for out_size in (16, 8):
        f = GRID // out_size
        sub = A.augment_pair(fixed, moving, fm, mm, np.random.default_rng(21), cfg, out_size)
        for k in A.OUTPUT_KEYS[:-1]:
            np.testing.assert_allclose(sub[k], full[k][::f, ::f, ::f], atol=1e-5, err_msg=k)
        np.testing.assert_allclose(sub["true_affine"], G.scale_translation(full["true_affine"], 1 / f),
                                   rtol=1e-6, atol=1e-6)


def test_cubic_resampling_keeps_background_exactly_zero():
    ball = sphere(GRID, (16, 16, 16), 8)  # a hard edge: cubic splines ring around it
    cfg = no_intensity(spatial_probability=1.0, flip_probability=0.0)
    out = A.augment_pair(ball, ball, ZEROS, ZEROS, np.random.default_rng(1), cfg, GRID)
    m = out["moving_image"]
    assert m.min() >= 0.0 and m.max() <= 1.0
    src = G.sample_locations(G.invert_affine(out["true_affine"]), m.shape)
    dist = np.sqrt(((src - 16) ** 2).sum(axis=0))
    assert np.all(m[dist > 8 + 1.0] == 0.0)  # nearest source voxel is background
    assert np.all(m[dist < 8 - 1.0] > 0.5)
    raw = ndimage.map_coordinates(ball, src, order=3, mode="constant")
    assert (raw[dist > 9] != 0).any()  # without the rule the background would not be 0


def test_mask_orders():
    mask = sphere(GRID, (16, 16, 16), 6)
    shift = np.eye(3, 4)
    shift[:, 3] = [0.5, 0.0, 0.0]
    coords = G.sample_locations(shift, mask.shape)
    near = A.resample_mask(mask, coords, 0)
    lin = A.resample_mask(mask, coords, 1)
    assert set(np.unique(near)) == {0.0, 1.0} and set(np.unique(lin)) == {0.0, 1.0}
    expected_lin = ndimage.map_coordinates(mask, coords, order=1, mode="constant") >= 0.5
    np.testing.assert_array_equal(lin, expected_lin)
    with pytest.raises(ValueError, match="mask_order"):
        A.resample_mask(mask, coords, 3)


# ------------------------------------------------------------------------------- extra label maps
def test_dice_target_and_ncc_mask_on_hand_made_masks():
    fixed = np.zeros((12, 12, 12), np.float32)
    moving = np.zeros_like(fixed)
    fixed[1:3, 1:3, 1:3] = 1  # A: overlaps a prior lesion
    moving[2:4, 2:4, 2:4] = 1
    fixed[6, 6, 6] = 1  # B: prior lesion touches it diagonally (within the one-voxel 26-dilation)
    moving[7, 7, 7] = 1
    fixed[9:11, 1, 1] = 1  # C: no prior lesion within one voxel (two voxels away)
    moving[9:11, 1, 3] = 1
    fixed[10, 8, 8] = 1
    fixed[11, 9, 9] = 1  # D: 26-connected to the voxel above, one component, touched by the prior at E
    moving[11, 10, 10] = 1
    dice, ncc = A.lesion_targets(fixed, moving)
    expected = np.zeros_like(fixed)
    expected[1:3, 1:3, 1:3] = 1
    expected[6, 6, 6] = 1
    expected[10, 8, 8] = 1
    expected[11, 9, 9] = 1
    np.testing.assert_array_equal(dice, expected)
    np.testing.assert_array_equal(ncc, np.maximum(fixed, moving))
    assert dice.dtype == ncc.dtype == np.float32
    none, _ = A.lesion_targets(fixed, np.zeros_like(fixed))
    assert not none.any()


# --------------------------------------------------------------------------- determinism, errors
def test_same_seed_same_result_and_different_seed_different():
    fixed, moving = smooth_volume(11), smooth_volume(12)
    fm = sphere(GRID, (10, 12, 14), 3)
    cfg = AugmentConfig()
    a = A.augment_pair(fixed, moving, fm, fm, np.random.default_rng(99), cfg, 16)
    b = A.augment_pair(fixed, moving, fm, fm, np.random.default_rng(99), cfg, 16)
    c = A.augment_pair(fixed, moving, fm, fm, np.random.default_rng(100), cfg, 16)
    for k in A.OUTPUT_KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["true_affine"], c["true_affine"])


def test_inputs_are_not_modified():
    fixed, moving = smooth_volume(13), smooth_volume(14)
    fm = sphere(GRID, (10, 12, 14), 3)
    copies = [x.copy() for x in (fixed, moving, fm)]
    A.augment_pair(fixed, moving, fm, fm, np.random.default_rng(0),
                   dataclasses.replace(AugmentConfig(), gamma_probability=1.0), 16)
    for x, y in zip((fixed, moving, fm), copies):
        np.testing.assert_array_equal(x, y)


def test_bad_shapes_raise_with_shapes_in_message():
    vol = smooth_volume(0)
    with pytest.raises(ValueError, match=r"\(32, 32, 16\)"):
        A.augment_pair(vol, vol[:, :, :16], ZEROS, ZEROS, np.random.default_rng(0), AugmentConfig(), 16)
    with pytest.raises(ValueError, match="must divide"):
        A.augment_pair(vol, vol, ZEROS, ZEROS, np.random.default_rng(0), AugmentConfig(), 12)


def test_strided_positions_match_geometry_sample_locations():
    m = G.params_to_matrix(G.IDENTITY_PARAMS + np.random.default_rng(2).normal(0, 0.1, 15))
    for out_size in (32, 8):
        f = GRID // out_size
        full = G.sample_locations(m, (GRID,) * 3)[:, ::f, ::f, ::f]
        np.testing.assert_allclose(A.strided_positions(m, GRID, out_size), full, atol=1e-5)


@pytest.mark.parametrize("order", [1, 3])
def test_packed_moving_resampling_equals_separate_passes(order):
    img = smooth_volume(15) * sphere(GRID, (16, 15, 17), 11)
    mask = sphere(GRID, (12, 13, 14), 4)
    coords = G.sample_locations(G.params_to_matrix(G.IDENTITY_PARAMS + 0.05), (GRID,) * 3)
    image, lesion = A.resample_moving(img, mask, coords, order, 0)
    np.testing.assert_array_equal(image, A.resample_image(img, coords, order))
    np.testing.assert_array_equal(lesion, A.resample_mask(mask, coords, 0))
    expected = ndimage.map_coordinates(mask, coords, order=0, mode="constant") > 0.5
    np.testing.assert_array_equal(lesion, expected)


# ---------------------------------------------------------------------------- the fixed image's pose
def test_fixed_pose_moves_the_fixed_image_and_the_true_affine_still_realigns():
    """fixed_pose_probability = 1: the fixed image is no longer the pre-aligned one, and warping the
    augmented moving image by the (composed) true affine lands on the posed fixed image."""
    vol = ramp_volume()
    cfg = no_intensity(spatial_probability=1.0, fixed_pose_probability=1.0, flip_probability=0.0)
    for seed in range(4):
        out = A.augment_pair(vol, vol, ZEROS, ZEROS, np.random.default_rng(seed), cfg, GRID)
        c = slice(10, 22)  # both poses together may sample outside the volume nearer the border
        assert not np.allclose(out["fixed_image"][c, c, c], vol[c, c, c], atol=0.02)  # posed
        back = scipy_warp(out["moving_image"], out["true_affine"])[c, c, c]
        inside = back > 0  # a corner may map outside the moving volume (zeros there)
        assert inside.mean() > 0.95
        np.testing.assert_allclose(back[inside], out["fixed_image"][c, c, c][inside], atol=2e-3)


def test_fixed_pose_is_rigid_within_range_and_label_channels_follow():
    cfg = no_intensity(spatial_probability=0.0, fixed_pose_probability=1.0, flip_probability=0.0,
                       fixed_rotation_degrees=10.0)
    vol = smooth_volume(2)
    lesion = sphere(GRID, (16, 16, 16), 5.0)
    for seed in range(6):
        pose = A.random_fixed_pose(np.random.default_rng(seed), cfg, GRID)
        linear = pose[:, :3]
        np.testing.assert_allclose(linear @ linear.T, np.eye(3), atol=1e-6)  # a rotation (float32)
        assert np.linalg.det(linear) > 0
        rng = np.random.default_rng(seed)
        out = A.augment_pair(vol, vol, lesion, lesion, rng, cfg, GRID)
        # no moving transform was applied (spatial_probability 0): the target is the pose itself
        rng = np.random.default_rng(seed)
        rng.random(3), A.random_affine_params(rng, cfg, GRID)
        np.testing.assert_allclose(out["true_affine"], A.random_fixed_pose(rng, cfg, GRID), atol=1e-6)
        # the fixed mask is the lesion sphere at the posed positions (nearest neighbour)
        expected = ndimage.map_coordinates(lesion, G.sample_locations(out["true_affine"], lesion.shape), order=0,
                                           mode="constant")
        np.testing.assert_array_equal(out["fixed_mask"], expected)
        np.testing.assert_array_equal(out["ncc_mask"], np.maximum(out["fixed_mask"], out["ncc_mask"]))
    angles = [np.degrees(np.arccos((np.trace(A.random_fixed_pose(np.random.default_rng(s), cfg, GRID)[:, :3]) - 1)
                                   / 2)) for s in range(200)]
    assert max(angles) <= 10.0 * np.sqrt(3) + 1e-3 and np.median(angles) > 3.0


def test_near_identity_mixture_shrinks_every_deviation_by_one_factor():
    """near_identity_probability q: the same 15 draws as q = 0, then, with probability q, every deviation
    from the identity scaled by one factor f ≤ near_identity_scale; q = 0 leaves the stream as it was."""
    base, mixed = AugmentConfig(), AugmentConfig(near_identity_probability=1.0, near_identity_scale=0.25)
    for seed in range(50):
        wide = A.random_affine_params(np.random.default_rng(seed), base, 64)
        rng = np.random.default_rng(seed)
        near = A.random_affine_params(rng, mixed, 64)
        dev_wide, dev_near = wide - G.IDENTITY_PARAMS, near - G.IDENTITY_PARAMS
        changed = np.abs(dev_wide) > 1e-9
        if changed.any():
            ratios = dev_near[changed] / dev_wide[changed]
            np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
            assert 0.0 <= ratios[0] <= 0.25
        np.testing.assert_array_equal(dev_near[~changed], 0.0)
        check = np.random.default_rng(seed)
        check.random(4), check.uniform(size=15), check.random(), check.uniform()
        assert rng.random() == check.random()              # 4 + 15 + 2 draws
    # q = 0.5: about half the draws shrunk (rotation magnitude ≤ 5° for those with the group applied)
    half = AugmentConfig(near_identity_probability=0.5, near_identity_scale=0.25, spatial_probability=1.0)
    rot = np.degrees(np.abs(np.stack([A.random_affine_params(np.random.default_rng(s), half, 64)[3:6]
                                      for s in range(400)])).max(axis=1))
    assert 150 < (rot <= 5.0).sum() < 260 and rot.max() > 15.0
    rng = np.random.default_rng(3)
    A.random_affine_params(rng, base, 64)
    check = np.random.default_rng(3)
    check.random(4), check.uniform(size=15)
    assert rng.random() == check.random()                  # q = 0: 4 + 15 draws only


def test_near_identity_settings_are_checked():
    from spirs_tf.config import get_config
    from spirs_tf.config_checks import check_config
    from spirs_tf.errors import SpirsInputError
    for q, f in ((1.5, 0.25), (0.5, 0.0), (0.5, 1.5)):
        cfg = get_config("cpu-medium")
        cfg.augment.near_identity_probability, cfg.augment.near_identity_scale = q, f
        with pytest.raises(SpirsInputError, match="near_identity"):
            check_config(cfg)


def test_fixed_pose_probability_zero_draws_nothing():
    """Probability 0 (authors) leaves the random stream untouched: the same output as before."""
    rng = np.random.default_rng(5)
    assert A.random_fixed_pose(rng, AugmentConfig(), GRID) is None
    assert rng.random() == np.random.default_rng(5).random()
    half = no_intensity(fixed_pose_probability=0.5)
    posed = sum(A.random_fixed_pose(np.random.default_rng(s), half, GRID) is not None for s in range(400))
    assert 150 < posed < 250
