"""Tests for spirs_tf.metrics: analytic values, brute-force and SimpleITK references."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from scipy.spatial.distance import dice as scipy_dice_dissimilarity

from spirs_tf import metrics

sys.path.insert(0, os.path.dirname(__file__))
from lncc_reference import offset_loop_cc_map  # noqa: E402


# --------------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------------
def _surface_reference(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with at least one face neighbour outside it (outside the array = outside)."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    boundary = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            boundary |= ~np.roll(padded, step, axis=axis)[inner]
    return mask & boundary


def _hd95_bruteforce(a, b, spacing):
    pa = np.argwhere(_surface_reference(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface_reference(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def _hd95_simpleitk(a, b, spacing):
    """Surfaces by sitk.BinaryContour (face connectivity), exact distances by sitk's Maurer map."""
    def contour_and_distance(m):
        # ITK does not count voxels on the image edge as contour; pad one background layer so that
        # outside the array counts as background (the convention of spirs_tf.metrics.surface).
        img = sitk.GetImageFromArray(np.pad(m, 1).astype(np.uint8))
        img.SetSpacing([float(s) for s in spacing[::-1]])   # SimpleITK spacing is (x, y, z)
        contour = sitk.BinaryContour(img, fullyConnected=False, backgroundValue=0, foregroundValue=1)
        dist = sitk.SignedMaurerDistanceMap(contour, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
        inner = (slice(1, -1),) * m.ndim
        c = sitk.GetArrayFromImage(contour).astype(bool)[inner]
        return c, np.where(c, 0.0, sitk.GetArrayFromImage(dist)[inner])   # 0 on the contour itself
    ca, da = contour_and_distance(a)
    cb, db = contour_and_distance(b)
    return max(np.percentile(db[ca], 95), np.percentile(da[cb], 95))


def _random_blob(rng, shape, threshold=0.55, smooth=1.5):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
    return field > np.quantile(field, threshold)


# --------------------------------------------------------------------------------------------------
# LNCC
# --------------------------------------------------------------------------------------------------
def test_lncc_identical_images_is_one(rng):
    x = ndimage.gaussian_filter(rng.random((16, 16, 16)), 1.0)
    assert metrics.lncc(x, x) == pytest.approx(1.0, abs=1e-9)
    assert metrics.lncc(x, 3 * x, window=5) == pytest.approx(1.0, abs=1e-9)   # zero padding: scale only


def test_lncc_constant_image_is_finite_and_zero(rng):
    x = rng.random((16, 16, 16))
    value = metrics.lncc(np.zeros_like(x), x)
    assert np.isfinite(value) and 0 <= value < 1e-6
    # two flat images: every clamped term is 1e-7, so cc = 1 (documented consequence of the clamp)
    flat = metrics.lncc_map(np.full((8, 8, 8), 2.0), np.full((8, 8, 8), 5.0))
    assert np.all(np.isfinite(flat)) and np.allclose(flat, 1.0)


def test_lncc_map_matches_pearson_squared_in_window(rng):
    i = rng.random((14, 15, 16))
    j = 0.5 * i + rng.random((14, 15, 16))        # positively correlated
    cc = metrics.lncc_map(i, j, window=5)
    for centre in [(7, 7, 8), (2, 2, 2), (0, 14, 15)]:  # interior and two border voxels
        # zero-padded 5³ window around the centre, computed directly
        pi, pj = np.pad(i, 2), np.pad(j, 2)
        sl = tuple(slice(c, c + 5) for c in centre)
        wi, wj = pi[sl].ravel(), pj[sl].ravel()
        cross = np.sum((wi - wi.mean()) * (wj - wj.mean()))
        expected = cross ** 2 / (np.sum((wi - wi.mean()) ** 2) * np.sum((wj - wj.mean()) ** 2))
        assert cross > 0
        assert cc[centre] == pytest.approx(expected, rel=1e-9)


def test_lncc_anticorrelation_is_clamped_to_zero(rng):
    x = rng.random((20, 20, 20))
    cc = metrics.lncc_map(x, 1.0 - x, window=3)
    assert np.all(cc[1:-1, 1:-1, 1:-1] < 1e-6)       # interior windows: cross < 0 → clamped


def test_lncc_masked_mean_and_empty_mask(rng):
    x = rng.random((12, 12, 12))
    y = rng.random((12, 12, 12))
    mask = np.zeros(x.shape, bool)
    mask[3:9, 2:7, 4:10] = True
    cc = metrics.lncc_map(x, y)
    assert metrics.lncc(x, y, mask=mask) == pytest.approx(cc[mask].mean())
    assert metrics.lncc(x, y) == pytest.approx(cc.mean())
    assert np.isnan(metrics.lncc(x, y, mask=np.zeros_like(mask)))


@pytest.mark.parametrize("zoom", [1.0, 1.03])
def test_lncc_matches_a_per_voxel_loop_next_to_a_zero_background(zoom):
    """The reported LNCC (inference's report.json, evaluation) equals the window-by-window definition on a
    bright brain in an exact-zero background, against itself and against a 3 % zoom; masked and not."""
    from lncc_reference import brute_force_cc_map, phantom

    fixed, moving = phantom(16, zoom=zoom)
    cc = brute_force_cc_map(fixed, moving)
    mask = metrics.lncc_mask(fixed, moving)
    assert metrics.lncc(fixed, moving) == pytest.approx(cc.mean(), abs=1e-10)
    assert metrics.lncc(fixed, moving, mask=mask) == pytest.approx(cc[mask].mean(), abs=1e-10)
    np.testing.assert_allclose(metrics.lncc_map(fixed, moving), cc, atol=1e-9)
    # on 32³, where float32 running sums drift by > 1e-4, and at raw-scanner intensity scales
    fixed, moving = phantom(32, zoom=zoom)
    for scale in (1.0, 1e4):
        cc = offset_loop_cc_map(fixed * scale, moving * scale)
        assert metrics.lncc(fixed * scale, moving * scale) == pytest.approx(cc.mean(), abs=1e-10)


@pytest.mark.parametrize("window", [1, 2, 4, 5, 9])
def test_box_sum_matches_a_loop_over_offsets(rng, window):
    """Any window (even ones keep TF 'same' alignment: i − (w−1)//2 … i + w//2) and any dimension."""
    for shape in ((7,), (6, 9), (5, 6, 7)):
        x = rng.random(shape)
        before = (window - 1) // 2
        padded = np.pad(x, [(before, window // 2)] * x.ndim)
        expected = sum(padded[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
                       for offset in np.ndindex(*(window,) * x.ndim))
        np.testing.assert_allclose(metrics._box_sum(x, window), expected, rtol=1e-12, atol=1e-12)
    zero = np.zeros((12, 12, 12))
    zero[:3] = rng.random((3, 12, 12)) * 1e6
    assert np.all(metrics._box_sum(zero, 9)[8:] == 0.0)   # windows of zeros are exactly 0


def test_lncc_mask_excludes_background_and_lesions():
    fixed = np.array([[0.0, 1.0, 1.0, 0.0]])
    moving = np.array([[0.0, 0.0, 1.0, 1.0]])
    fl = np.array([[0, 1, 0, 0]])
    ml = np.array([[0, 0, 0, 0.3]])                  # soft lesion value ≠ 0 counts as tumour
    expected = np.array([[False, False, True, False]])
    np.testing.assert_array_equal(metrics.lncc_mask(fixed, moving, fl, ml), expected)


def test_lncc_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        metrics.lncc(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="window"):
        metrics.lncc(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), window=0)


# --------------------------------------------------------------------------------------------------
# Dice, Jacobian
# --------------------------------------------------------------------------------------------------
def test_dice_matches_scipy_and_empty_convention(rng):
    a = rng.random((10, 10, 10)) > 0.6
    b = rng.random((10, 10, 10)) > 0.4
    assert metrics.dice(a, b) == pytest.approx(1 - scipy_dice_dissimilarity(a.ravel(), b.ravel()))
    assert metrics.dice(a.astype(np.float32), b.astype(np.uint8)) == pytest.approx(metrics.dice(a, b))
    empty = np.zeros((4, 4, 4))
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.dice(empty, np.ones((4, 4, 4))) == 0.0


def test_jacobian_identity_and_linear_fields():
    shape = (8, 9, 10)
    assert np.allclose(metrics.jacobian_determinant(np.zeros(shape + (3,))), 1.0)
    a = np.array([[0.1, 0.2, 0.0], [0.0, -0.3, 0.1], [0.05, 0.0, 0.2]])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    u = grid @ a.T                                   # u_a(x) = Σ_b A[a, b] x_b → J = I + A
    det = metrics.jacobian_determinant(u)
    assert np.allclose(det, np.linalg.det(np.eye(3) + a))
    assert metrics.folding_percent(u) == 0.0
    assert metrics.log_jacobian_std(u) == pytest.approx(0.0, abs=1e-12)


def test_jacobian_detects_folding_slab():
    d = 16
    u = np.zeros((d, 6, 6, 3))
    i = np.arange(d)
    u[..., 0] = (-3.0 * np.clip(i - 4, 0, 4))[:, None, None]   # du0/dx0 = −3 for 4 < i < 8
    det = metrics.jacobian_determinant(u)
    expected_1d = np.ones(d)
    expected_1d[[4, 8]] = 1 - 1.5                    # central differences straddling the slab edges
    expected_1d[5:8] = 1 - 3.0
    np.testing.assert_allclose(det, np.broadcast_to(expected_1d[:, None, None], det.shape))
    assert np.all(det[4:9] < 0) and np.all(det[:4] > 0) and np.all(det[9:] > 0)
    assert metrics.folding_percent(u) == pytest.approx(100 * 5 / 16)
    mask = np.zeros(det.shape, bool)
    mask[:8] = True
    assert metrics.folding_percent(u, mask=mask) == pytest.approx(100 * 4 / 8)
    logs = np.log(np.clip(expected_1d, 1e-9, 1e9))   # folded voxels clipped to 1e-9
    assert metrics.log_jacobian_std(u) == pytest.approx(np.std(logs))
    assert np.isnan(metrics.folding_percent(u, mask=np.zeros_like(mask)))


def test_jacobian_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        metrics.jacobian_determinant(np.zeros((4, 4, 4, 2)))


# --------------------------------------------------------------------------------------------------
# surfaces and HD95
# --------------------------------------------------------------------------------------------------
def _cube(shape, start, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


@pytest.mark.parametrize("spacing, expected", [((1, 1, 1), 1.0), ((2, 1, 1), 2.0), ((0.5, 1, 1), 0.5)])
def test_two_cubes_known_dice_and_hd95(spacing, expected):
    # 4³ cubes shifted by one voxel along axis 0: overlap 3·4·4 = 48 → Dice 2·48/128 = 0.75.
    # Surface voxels (56 each): the leading face (16) is one voxel (spacing[0] mm) from the other
    # surface, the 4 inner voxels of the far face are min(spacing[0], 1) away, the other 36 lie on
    # the other surface → 95th percentile = spacing[0] for these spacings.
    a = _cube((10, 10, 10), (2, 2, 2), 4)
    b = _cube((10, 10, 10), (3, 2, 2), 4)
    assert metrics.dice(a, b) == pytest.approx(0.75)
    assert metrics.hd95(a, b, spacing) == pytest.approx(expected)
    assert metrics.hd95(b, a, spacing) == pytest.approx(expected)
    assert _hd95_bruteforce(a, b, spacing) == pytest.approx(expected)


def test_hd95_matches_bruteforce_and_simpleitk(rng):
    for trial in range(4):
        shape = (14, 16, 12)
        a = _random_blob(rng, shape)
        b = np.roll(_random_blob(rng, shape, threshold=0.6), trial, axis=trial % 3)
        spacing = (1.0, 0.8, 2.5) if trial % 2 else (1.2, 1.2, 1.2)
        got = metrics.hd95(a, b, spacing)
        assert got == pytest.approx(_hd95_bruteforce(a, b, spacing), rel=1e-9)
        assert got == pytest.approx(_hd95_simpleitk(a, b, spacing), rel=1e-5)


def test_surface_distances_match_kdtree(rng):
    a = _random_blob(rng, (12, 12, 12))
    b = _random_blob(rng, (12, 12, 12), threshold=0.7)
    spacing = (0.7, 1.0, 1.9)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    pa = np.argwhere(_surface_reference(a)) * spacing
    pb = np.argwhere(_surface_reference(b)) * spacing
    np.testing.assert_allclose(np.sort(d_ab), np.sort(cKDTree(pb).query(pa)[0]), rtol=1e-9)
    np.testing.assert_allclose(np.sort(d_ba), np.sort(cKDTree(pa).query(pb)[0]), rtol=1e-9)


def test_surface_matches_reference_including_array_edge(rng):
    m = _random_blob(rng, (9, 10, 11), threshold=0.3)
    assert m[0].any()                                # touches the array edge
    np.testing.assert_array_equal(metrics.surface(m), _surface_reference(m))


def test_hd95_empty_conventions():
    empty = np.zeros((5, 5, 5), bool)
    one = _cube((5, 5, 5), (1, 1, 1), 2)
    assert metrics.hd95(empty, empty) == 0.0
    assert metrics.hd95(one, empty) == np.inf
    assert metrics.hd95(one, one, (1, 2, 3)) == 0.0
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(one, one, (1, 0, 1))


# --------------------------------------------------------------------------------------------------
# lesion-wise metrics
# --------------------------------------------------------------------------------------------------
def test_size_bin_boundaries():
    assert metrics.size_bin(0) == "micro"
    assert metrics.size_bin(24.999) == "micro"
    assert metrics.size_bin(25.0) == "small"
    assert metrics.size_bin(25.0 - 1e-9) == "small"          # float error at the boundary
    assert metrics.size_bin(124.9) == "small"
    assert metrics.size_bin(125) == "medium"
    assert metrics.size_bin(999.99) == "medium"
    assert metrics.size_bin(1000) == "large"
    with pytest.raises(ValueError):
        metrics.size_bin(-1)


def test_lesion_on_bin_boundary_with_anisotropic_spacing():
    gt = np.zeros((12, 12, 12), bool)
    gt[2:7, 2:7, 2:4] = True                          # 5·5·2 = 50 voxels × 0.5 mm³ = 25 mm³
    gt[9:11, 9:11, 5:11] = True                       # 2·2·6 = 24 voxels × 0.5 = 12 mm³
    rows = metrics.lesion_table(gt, gt, spacing=(1.0, 1.0, 0.5))
    assert [r["n_voxels"] for r in rows] == [50, 24]
    assert [r["volume_mm3"] for r in rows] == [25.0, 12.0]
    assert [r["size_bin"] for r in rows] == ["small", "micro"]
    assert all(r["detected"] and r["dice"] == 1.0 and r["hd95"] == 0.0 for r in rows)
    assert rows[0]["centroid"] == pytest.approx((4.0, 4.0, 2.5))


def test_missed_lesion_has_zero_dice_and_infinite_hd95():
    gt = _cube((10, 10, 10), (2, 2, 2), 3)
    pred = _cube((10, 10, 10), (7, 7, 7), 2)          # far away: a false positive, not a hit
    rows = metrics.lesion_table(gt, pred, (1, 1, 1))
    assert len(rows) == 1
    assert rows[0]["detected"] is False
    assert rows[0]["dice"] == 0.0 and rows[0]["hd95"] == np.inf
    sensitivity = np.mean([r["detected"] for r in rows])
    assert sensitivity == 0.0
    fps = metrics.false_positive_components(gt, pred, (1, 1, 1))
    assert len(fps) == 1 and fps[0]["n_voxels"] == 8 and fps[0]["centroid"] == pytest.approx((7.5,) * 3)


def test_diagonal_touch_is_one_lesion():
    gt = np.zeros((8, 8, 8), bool)
    gt[2, 2, 2] = True
    gt[3, 3, 3] = True                                # shares only a corner with (2, 2, 2)
    rows = metrics.lesion_table(gt, gt, (1, 1, 1))
    assert len(rows) == 1 and rows[0]["n_voxels"] == 2
    assert ndimage.label(gt)[1] == 2                  # 6-connectivity would split it


def test_lesion_dice_and_hd95_against_union_of_overlapping_components(rng):
    gt = _cube((16, 16, 16), (3, 3, 3), 6)
    pred = np.zeros_like(gt)
    pred[2:6, 3:9, 3:9] = True                        # component 1 overlaps
    pred[7:10, 4:8, 4:8] = True                       # component 2 overlaps (gap at i = 6)
    pred[13:15, 13:15, 13:15] = True                  # false positive
    spacing = (1.0, 1.5, 0.7)
    (row,) = metrics.lesion_table(gt, pred, spacing)
    union = pred.copy()
    union[13:15, 13:15, 13:15] = False
    assert row["detected"] and row["n_pred_components"] == 2
    assert row["dice"] == pytest.approx(metrics.dice(gt, union))
    assert row["hd95"] == pytest.approx(_hd95_bruteforce(gt, union, spacing))
    assert row["volume_mm3"] == pytest.approx(216 * 1.05)
    assert len(metrics.false_positive_components(gt, pred, spacing)) == 1


def test_lesion_table_empty_ground_truth():
    empty = np.zeros((6, 6, 6), bool)
    assert metrics.lesion_table(empty, empty, (1, 1, 1)) == []
    assert metrics.false_positive_components(empty, empty, (1, 1, 1)) == []


# --------------------------------------------------------------------------------------------------
# BraTS-2023 lesion-wise
# --------------------------------------------------------------------------------------------------
def test_brats_lesionwise_tp_fn_fp():
    shape = (20, 20, 20)
    gt = _cube(shape, (2, 2, 2), 3) | _cube(shape, (12, 12, 12), 3)
    pred = _cube(shape, (2, 2, 2), 3) | _cube(shape, (2, 14, 14), 2)   # exact hit + false positive
    res = metrics.brats_lesionwise(gt, pred, (1, 1, 1))
    assert (res["num_tp"], res["num_fn"], res["num_fp"]) == (1, 1, 1)
    assert res["dice"] == pytest.approx((1 + 0 + 0) / 3)
    assert res["hd95"] == pytest.approx((0 + 374 + 374) / 3)


def test_brats_lesionwise_dilation_matching_and_threshold():
    shape = (16, 16, 16)
    gt = _cube(shape, (4, 4, 4), 3)
    pred = _cube(shape, (7, 4, 4), 2)                 # touches the lesion face, no overlap
    res = metrics.brats_lesionwise(gt, pred, (1, 1, 1))
    assert res["num_fp"] == 0 and res["num_tp"] == 1
    assert res["dice"] == 0.0
    assert res["hd95"] == pytest.approx(_hd95_bruteforce(gt, pred, (1, 1, 1)))
    assert metrics.lesion_table(gt, pred, (1, 1, 1))[0]["detected"] is False   # primary: no overlap
    # without dilation the same prediction is a false positive and the lesion a miss
    res0 = metrics.brats_lesionwise(gt, pred, (1, 1, 1), dilation=0)
    assert (res0["num_tp"], res0["num_fn"], res0["num_fp"]) == (0, 1, 1)
    # a 1-voxel lesion (1 mm³ ≤ 2 mm³) is left out of the mean; its match is not a false positive
    tiny = np.zeros(shape, bool)
    tiny[1, 1, 1] = True
    res_t = metrics.brats_lesionwise(gt | tiny, pred | tiny, (1, 1, 1))
    assert res_t["num_fp"] == 0 and res_t["dice"] == pytest.approx(res["dice"])
    # GT lesions two voxels apart merge after dilation
    two = np.zeros(shape, bool)
    two[5, 5, 5] = two[5, 5, 7] = True
    assert len(metrics.brats_lesionwise(two, two, (1, 1, 1), volume_threshold_mm3=0)["lesions"]) == 1


def test_brats_lesionwise_empty_cases():
    empty = np.zeros((8, 8, 8), bool)
    assert metrics.brats_lesionwise(empty, empty, (1, 1, 1))[("dice")] == 1.0
    assert metrics.brats_lesionwise(empty, empty, (1, 1, 1))["hd95"] == 0.0
    fp = metrics.brats_lesionwise(empty, _cube((8, 8, 8), (2, 2, 2), 2), (1, 1, 1))
    assert fp["dice"] == 0.0 and fp["hd95"] == 374.0


# --------------------------------------------------------------------------------------------------
def test_metrics_and_stats_do_not_import_tensorflow():
    code = ("import sys, spirs_tf.metrics, spirs_tf.stats; "
            "bad = [m for m in ('tensorflow', 'keras', 'tf_keras', 'jax', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
