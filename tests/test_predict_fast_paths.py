"""The fast paths of ``spirs predict`` equal their plain references: the one-map resampling with
box-restricted mask/label sampling (against per-point ``CaseTransform.map_points`` + SciPy's
``grid-constant`` sampling everywhere), the compact ITK field (against ``d`` at every new voxel),
labelling and lesion rows inside bounding boxes, and the QC slice choice."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from spirs_tf import geometry, inference, metrics
from spirs_tf.io import Volume
from spirs_tf.itk_export import CaseTransform, compact_deformation, resample_to_new
from spirs_tf.lesions import lesion_changes
from spirs_tf.qc import pick_slices

from test_inference import NEW_AFFINE, SHAPE, brain_and_lesions, oblique_affine


@pytest.fixture(scope="module")
def case():
    """A non-trivial transform (affine + smooth DVF, S = 16) between two oblique grids."""
    image, lesions = brain_and_lesions((22, 20, 24), seed=2)
    prior_affine = oblique_affine((-0.15, 0.1, 0.4), (3.0, 2.5, 3.0), (2.0, 4.0, -3.0), flip=(1, -1, 1),
                                  perm=(2, 0, 1), shape=(22, 20, 24))
    prior, mask = Volume(image, prior_affine), Volume(lesions, prior_affine)
    new = Volume(np.ones(SHAPE, np.float32), NEW_AFFINE)
    s = 16
    g = np.stack(np.meshgrid(*[np.linspace(0, np.pi, s)] * 3, indexing="ij"), -1)
    dvf = 0.6 * np.sin(g[..., [1, 2, 0]]) * np.cos(g[..., [2, 0, 1]])
    wn = np.diag([4.5, 4.5, 4.5, 1.0])
    wn[:3, 3] = [-30.0, -28.0, -25.0]
    wp = wn.copy()
    wp[:3, 3] += [3.0, -2.0, 1.0]
    matrix = geometry.params_to_matrix([0.6, -0.4, 0.3, 0.08, -0.05, 0.1, 1.05, 0.97, 1.02, 0.02, 0, 0, 0.01, 0, -0.02])
    labels, _ = metrics.label_lesions(lesions)
    return CaseTransform(wn, wp, matrix, dvf), new, prior, mask, labels


def reference(transform, new, prior, mask, labels):
    """Every new voxel through ``map_points`` (q, d), then SciPy ``grid-constant`` sampling everywhere."""
    idx = np.indices(new.shape).reshape(3, -1).astype(float)
    world = new.affine[:3, :3] @ idx + new.affine[:3, 3:4]
    q, d = transform.map_points(world)
    inv = np.linalg.inv(prior.affine)
    xp = inv[:3, :3] @ q + inv[:3, 3:4]
    kw = dict(mode="grid-constant", cval=0.0, prefilter=False)
    img = ndimage.map_coordinates(prior.data.astype(np.float32), xp, order=1, **kw).reshape(new.shape)
    soft = ndimage.map_coordinates(mask.data.astype(np.float32), xp, order=1, **kw).reshape(new.shape)
    lab = ndimage.map_coordinates(labels.astype(np.int32), xp, order=0, **kw).reshape(new.shape)
    return img, soft, lab, d.T.reshape(new.shape + (3,)), (q - world).T.reshape(new.shape + (3,))


def test_resample_to_new_equals_the_per_point_reference(case):
    transform, new, prior, mask, labels = case
    img, soft, lab, d, total = reference(transform, new, prior, mask, labels)
    msk = soft >= 0.5
    res = resample_to_new(transform, new, prior, mask, labels, native_fields=True)
    assert msk.sum() > 20 and len(np.unique(lab)) == 3  # the lesions land on the new grid
    np.testing.assert_allclose(res.prior_warped, img, atol=1e-6)
    np.testing.assert_array_equal(res.prior_mask_warped, msk)
    np.testing.assert_array_equal(res.prior_labels_warped, lab)
    np.testing.assert_allclose(res.deformation, d, atol=1e-9)
    np.testing.assert_allclose(res.total, total, atol=1e-9)
    lean = resample_to_new(transform, new, prior, mask, labels, native_fields=False)
    assert lean.deformation is None and lean.total is None
    np.testing.assert_array_equal(lean.prior_warped, res.prior_warped)
    # the soft mask (a segmenter trained on a soft prior): the trilinear value itself
    smooth = resample_to_new(transform, new, prior, mask, labels, native_fields=False, soft_mask=True)
    assert smooth.prior_mask_warped.dtype == np.float32 and ((soft > 0) & (soft < 0.5)).sum() > 20
    np.testing.assert_allclose(smooth.prior_mask_warped, soft, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_compact_field_interpolates_to_d_at_every_new_voxel(case, k):
    """Trilinear interpolation of the compact field (in its own voxels) at every new voxel = ``d``."""
    transform, new, *_ = case
    if k > 1:  # the same field handed over on the 2x finer grid (exact refinement)
        j = np.stack(np.meshgrid(*[np.arange(2 * transform.size) / 2.0] * 3, indexing="ij"))
        fine = 2 * np.stack([ndimage.map_coordinates(transform.dvf[..., a], j, order=1, mode="nearest")
                             for a in range(3)], -1)
        transform = CaseTransform(transform.new_working_affine, transform.prior_working_affine, transform.matrix,
                                  fine, 2)
    field, affine = compact_deformation(transform, new)
    idx = np.indices(new.shape).reshape(3, -1).astype(float)
    z = (np.linalg.inv(affine) @ new.affine)[:3] @ np.vstack([idx, np.ones(idx.shape[1])])
    assert z.min() >= 0 and np.all(z.max(axis=1) <= np.array(field.shape[:3]) - 1)
    got = np.stack([ndimage.map_coordinates(field[..., a], z, order=1) for a in range(3)], -1)
    world = new.affine[:3, :3] @ idx + new.affine[:3, 3:4]
    _, d = case[0].map_points(world)
    np.testing.assert_allclose(got, d.T, atol=1e-9)


def test_label_in_box_and_lesion_rows_ignore_empty_space():
    rng = np.random.default_rng(0)
    small = (rng.random((12, 10, 11)) > 0.8).astype(np.uint8)
    big = np.zeros((40, 35, 30), np.uint8)
    big[20:32, 5:15, 9:20] = small
    labels, n = metrics.label_lesions(big)
    fast, m = inference._label_in_box(big)
    assert n == m > 3
    np.testing.assert_array_equal(fast, labels)
    prior = np.roll(labels, 1, axis=0)
    affine = oblique_affine((0.2, 0.1, -0.3), (1.0, 1.2, 0.9), (0.0, 0.0, 0.0), shape=big.shape)
    rows = lesion_changes(big, prior, (1.0, 1.2, 0.9), affine)
    # the same content in a smaller array, its affine shifted to keep world positions
    shift = np.eye(4)
    shift[:3, 3] = [15, 0, 5]
    cropped = lesion_changes(big[15:, :, 5:], prior[15:, :, 5:], (1.0, 1.2, 0.9), affine @ shift)
    assert len(rows) == len(cropped) >= n
    for a, b in zip(rows, cropped):
        assert a == pytest.approx(b, abs=1e-9)  # centroids: float round-off only


def test_pick_slices_matches_center_of_mass_reference():
    rng = np.random.default_rng(1)
    masks = [(ndimage.gaussian_filter(rng.random((30, 28, 26)), 2) > 0.56).astype(np.uint8) for _ in range(2)]
    image = np.ones((30, 28, 26))
    for axis in range(3):
        want = []
        for m in masks:
            lab, count = ndimage.label(m, structure=np.ones((3, 3, 3)))
            sizes = np.bincount(lab.ravel())[1:]
            coms = ndimage.center_of_mass(np.ones(lab.shape), lab, list(range(1, count + 1)))
            want += [(int(sizes[i]), int(round(coms[i][axis]))) for i in range(count)]
        order = []
        for _, s in sorted(want, key=lambda c: -c[0]):
            if s not in order:
                order.append(s)
        assert pick_slices(axis, masks, image) == order[:3]


def test_resample_with_an_empty_prior_mask(case):
    transform, new, prior, mask, _ = case
    empty = Volume(np.zeros_like(mask.data), mask.affine)
    res = resample_to_new(transform, new, prior, empty, native_fields=False)
    assert not res.prior_mask_warped.any() and not res.prior_labels_warped.any() and res.prior_warped.max() > 1
