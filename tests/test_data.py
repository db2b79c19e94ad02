"""Data pipeline: pair sources (in memory and from a manifest), epoch plans, tf.data batches, inference inputs."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from scipy import ndimage

from spirs_tf import augment, data
from spirs_tf import geometry as G
from spirs_tf.config import get_config
from spirs_tf.io import Volume

GRID = 32


def blob_pair(seed: int, grid: int = GRID):
    """A smooth 'brain' (zero outside a ball) with one lesion, and a shifted copy as the prior."""
    rng = np.random.default_rng(seed)
    x = G.sample_locations(None, (grid,) * 3)
    r = np.sqrt(((x - grid / 2) ** 2).sum(axis=0))
    img = ndimage.gaussian_filter(rng.random((grid,) * 3), 2)
    img = ((0.2 + 0.8 * (img - img.min()) / (img.max() - img.min())) * (r < grid * 0.4)).astype(np.float32)
    lesion = (np.sqrt(((x - np.array([12, 14, 16]).reshape(3, 1, 1, 1)) ** 2).sum(axis=0)) < 3).astype(np.float32)
    return img, np.roll(img, 1, axis=0), lesion, np.roll(lesion, 1, axis=0)


@pytest.fixture(scope="module")
def cfg():
    return get_config("test")


@pytest.fixture(scope="module")
def source():
    return data.PairSource.from_arrays([blob_pair(s) for s in range(3)])


def take_all(ds):
    return [{k: v.numpy() for k, v in batch.items()} for batch in ds]


# ------------------------------------------------------------------------------------ epoch plans
def test_training_plan_is_a_fresh_permutation_each_epoch():
    a = data.epoch_plan(6, 2, True, seed=5, epoch=1)
    b = data.epoch_plan(6, 2, True, seed=5, epoch=2)
    assert a.shape == (6, 4) and sorted(a[:, 0]) == list(range(6)) and sorted(b[:, 0]) == list(range(6))
    assert not np.array_equal(a[:, 0], b[:, 0])
    np.testing.assert_array_equal(a, data.epoch_plan(6, 2, True, seed=5, epoch=1))
    np.testing.assert_array_equal(a[:, 1:], [[data.TRAIN_STREAM, 1, k] for k in range(6)])


def test_training_plan_fills_every_batch():
    plan = data.epoch_plan(3, 2, True, seed=0, epoch=0)  # ceil(3/2) = 2 steps → 4 samples
    assert len(plan) == 4 and set(plan[:3, 0]) == {0, 1, 2}
    plan = data.epoch_plan(3, 4, True, seed=0, epoch=0, steps=3)  # 12 samples = 4 permutations
    np.testing.assert_array_equal(np.bincount(plan[:, 0]), [4, 4, 4])


def test_validation_plan_is_fixed_and_capped():
    plan = data.epoch_plan(10, 2, False, seed=0, epoch=7, validation_pairs=4)
    np.testing.assert_array_equal(plan[:, 0], [0, 3, 6, 9])
    np.testing.assert_array_equal(plan[:, 1:], [[data.VALIDATION_STREAM, 0, p] for p in (0, 3, 6, 9)])
    assert len(data.epoch_plan(10, 2, False, seed=0, steps=1)) == 2
    with pytest.raises(ValueError, match="no pairs"):
        data.epoch_plan(0, 2, True, seed=0)


def test_spread_indices():
    assert data.spread_indices(5, None) == [0, 1, 2, 3, 4]
    assert data.spread_indices(5, 9) == [0, 1, 2, 3, 4]
    assert data.spread_indices(9, 3) == [0, 4, 8]
    assert data.spread_indices(9, 0) == []


# --------------------------------------------------------------------------------- tf.data batches
@pytest.mark.parametrize("levels,size", [(1, 8), (2, 16)])
def test_dataset_yields_float32_batches_of_the_model_size(cfg, source, levels, size):
    ds = data.make_dataset(source, cfg, levels, batch_size=2, training=True, seed=3, epoch=1)
    spec = ds.element_spec
    assert set(spec) == set(data.BATCH_KEYS)
    for key in data.BATCH_KEYS:
        want = (2, 3, 4) if key == "true_affine" else (2, size, size, size, 1)
        assert tuple(spec[key].shape) == want and spec[key].dtype.name == "float32"
    batches = take_all(ds)
    assert len(batches) == 2  # ceil(3 / 2), every batch full
    for b in batches:
        for key in data.BATCH_KEYS:
            assert b[key].dtype == np.float32
            assert b[key].shape == tuple(spec[key].shape)
        assert 0.0 <= b["moving_image"].min() and b["moving_image"].max() <= 1.0
        assert set(np.unique(b["moving_mask"])) <= {0.0, 1.0}


def test_batches_are_augment_pair_of_the_planned_pairs(cfg, source):
    ds = data.make_dataset(source, cfg, 2, batch_size=2, training=True, seed=4, epoch=3)
    plan = data.epoch_plan(len(source), 2, True, seed=4, epoch=3)
    flat = [{k: b[k][i] for k in b} for b in take_all(ds) for i in range(2)]
    for row, got in zip(plan, flat):
        item = source[int(row[0])]
        want = augment.augment_pair(item.fixed_image, item.moving_image, item.fixed_mask, item.moving_mask,
                                    np.random.default_rng([4, *map(int, row[1:])]), cfg.augment, 16)
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(got[key].reshape(want[key].shape), want[key])


def test_training_stream_is_reproducible_and_changes_with_epoch(cfg, source):
    def run(epoch):
        return take_all(data.make_dataset(source, cfg, 1, batch_size=2, training=True, seed=9, epoch=epoch))

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b):
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.allclose(a[0]["true_affine"], c[0]["true_affine"])


def test_validation_batches_identical_across_epochs_and_augmented(cfg, source):
    a = take_all(data.make_dataset(source, cfg, 2, batch_size=2, training=False, seed=1, epoch=1))
    b = take_all(data.make_dataset(source, cfg, 2, batch_size=2, training=False, seed=1, epoch=2))
    assert [x["fixed_image"].shape[0] for x in a] == [2, 1]  # all 3 pairs, last batch partial
    for x, y in zip(a, b):
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    # augmentation is on for validation: the affines are not all identity
    affines = np.concatenate([x["true_affine"] for x in a])
    assert not np.allclose(affines, np.eye(3, 4))


def test_validation_cap_from_config(cfg, source):
    capped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, validation_pairs=2))
    batches = take_all(data.make_dataset(source, capped, 1, batch_size=1, training=False, seed=1))
    assert len(batches) == 2


def test_disabled_augmentation_gives_the_aligned_pair(cfg):
    img, _, lesion, _ = blob_pair(0)
    src = data.PairSource.from_arrays([(img, img, lesion, lesion)])
    off = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, enabled=False))
    (b,) = take_all(data.make_dataset(src, off, 2, batch_size=1, training=True, seed=0))
    np.testing.assert_array_equal(b["moving_image"], b["fixed_image"])
    np.testing.assert_array_equal(b["fixed_image"][0, ..., 0], img[::2, ::2, ::2])
    np.testing.assert_array_equal(b["true_affine"][0], np.eye(3, 4))
    np.testing.assert_array_equal(b["dice_target"], b["fixed_mask"])


def test_true_affine_realigns_batches_with_the_network_transformer(cfg):
    from spirs_tf import transforms

    img, _, lesion, _ = blob_pair(1)
    src = data.PairSource.from_arrays([(img, img, lesion, lesion)] * 2)
    no_gamma = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, gamma_probability=0.0,
                                                                    spatial_probability=1.0))
    (b,) = take_all(data.make_dataset(src, no_gamma, 3, batch_size=2, training=True, seed=2))
    back = np.asarray(transforms.warp(b["moving_image"], b["true_affine"]))
    c = slice(10, 22)
    err = np.abs(back - b["fixed_image"])[:, c, c, c].mean()
    before = np.abs(b["moving_image"] - b["fixed_image"])[:, c, c, c].mean()
    assert err < 0.2 * before


def test_source_grid_must_match_config(cfg):
    img, _, lesion, _ = blob_pair(0, grid=16)
    src = data.PairSource.from_arrays([(img, img, lesion, lesion)])
    with pytest.raises(ValueError, match="differs from cfg.data.grid_size"):
        data.make_dataset(src, cfg, 1, batch_size=1, training=True, seed=0)


# --------------------------------------------------------------------------------- inference inputs
def scan(data_array, spacing=4.0, origin=(-60.0, -70.0, -50.0), flip0=False):
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    arr = np.asarray(data_array)
    if flip0:  # same world content stored with the first axis reversed
        affine[0, 0] = -spacing
        affine[0, 3] = origin[0] + spacing * (arr.shape[0] - 1)
        arr = arr[::-1]
    return Volume(np.ascontiguousarray(arr), affine, None)


def test_prediction_inputs_put_a_differently_stored_prior_onto_the_new_grid(cfg):
    img, _, lesion, _ = blob_pair(5)
    new = scan(img)
    prior = scan(img, flip0=True)
    prior_mask = scan(lesion.astype(np.uint8), flip0=True)
    inputs, mapping = data.prediction_inputs(prior, prior_mask, new, cfg)
    assert set(inputs) == set(data.MODEL_INPUT_KEYS)
    for v in inputs.values():
        assert v.shape == (1, 32, 32, 32, 1) and v.dtype == np.float32
    np.testing.assert_allclose(inputs["moving_image"], inputs["fixed_image"], atol=1e-5)
    assert mapping.working_shape == (32, 32, 32)
    assert inputs["moving_mask"].sum() == pytest.approx(
        (ndimage.map_coordinates(lesion, _working_to_scan(mapping), order=0) > 0).sum())
    small, _ = data.prediction_inputs(prior, None, new, cfg, levels=1)
    assert small["fixed_image"].shape == (1, 8, 8, 8, 1)
    np.testing.assert_array_equal(small["fixed_image"], inputs["fixed_image"][:, ::4, ::4, ::4])
    assert not small["moving_mask"].any()


def _working_to_scan(mapping):
    m = mapping.working_to_original()
    w = G.sample_locations(None, mapping.working_shape).reshape(3, -1)
    return (m[:3, :3] @ w + m[:3, 3:]).reshape((3,) + tuple(mapping.working_shape))


def test_prediction_inputs_reject_a_mask_on_another_grid(cfg):
    img, _, lesion, _ = blob_pair(6)
    bad = Volume(lesion[:-1].astype(np.uint8), np.eye(4), os.path.join("x", "prior_mask.nii.gz"))
    from spirs_tf.errors import SpirsInputError

    with pytest.raises(SpirsInputError, match="prior_mask.nii.gz"):
        data.prediction_inputs(scan(img), bad, scan(img), cfg)


# ------------------------------------------------------------------------------ on-disk cohort
def _write_nifti(path, array, affine):
    import nibabel as nib

    nib.Nifti1Image(np.asarray(array), affine).to_filename(str(path))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 patients × 2 time points of 32³ NIfTI (p1, p2 train; p3 val) and a manifest CSV.

    Time point 1 holds the same world content as time point 0 but is stored with the first voxel axis
    reversed (a different voxel grid), so the pre-aligned pair is exactly aligned on the working grid.
    """
    root = tmp_path_factory.mktemp("cohort")
    rows = ["patient_id,timepoint,image,mask,split"]
    for p, split in (("p1", "train"), ("p2", "train"), ("p3", "val")):
        img, _, lesion, _ = blob_pair(int(p[1]))
        os.makedirs(root / p)
        for t in (0, 1):
            v, m = scan(img * 300.0, flip0=t == 1), scan(lesion.astype(np.uint8), flip0=t == 1)
            _write_nifti(root / p / f"t{t}.nii.gz", v.data, v.affine)
            _write_nifti(root / p / f"t{t}_mask.nii.gz", m.data, m.affine)
            rows.append(f"{p},{t},{p}/t{t}.nii.gz,{p}/t{t}_mask.nii.gz,{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_pair_source_from_manifest_gives_aligned_preprocessed_pairs(cfg, cohort):
    from spirs_tf.manifest import load_manifest

    src = data.PairSource(load_manifest(cohort / "manifest.csv"), "train", cfg.data)
    assert len(src) == 2 and src.grid_size == 32
    assert [p.patient_id for p in src.pairs] == ["p1", "p2"]
    for i in range(2):
        item = src[i]
        assert item.fixed_image.shape == (32,) * 3 and item.fixed_image.dtype == np.float32
        assert item.fixed_mask.dtype == item.moving_mask.dtype == np.uint8
        assert item.fixed_image.max() == pytest.approx(1.0) and item.fixed_image.min() == 0.0
        np.testing.assert_allclose(item.moving_image, item.fixed_image, atol=1e-5)
        np.testing.assert_array_equal(item.moving_mask, item.fixed_mask)
        assert item.fixed_mask.sum() > 0
    assert src.nbytes == 2 * 2 * (32 ** 3 * 4 + 32 ** 3)


@pytest.mark.parametrize("levels,size", [(1, 8), (2, 16)])
def test_dataset_from_on_disk_cohort(cfg, cohort, levels, size):
    from spirs_tf.manifest import load_manifest

    manifest = load_manifest(cohort / "manifest.csv")
    train = data.PairSource(manifest, "train", cfg.data)
    batches = take_all(data.make_dataset(train, cfg, levels, batch_size=2, training=True, seed=0, epoch=1))
    assert len(batches) == 1
    b = batches[0]
    assert b["fixed_image"].shape == (2, size, size, size, 1) and b["true_affine"].shape == (2, 3, 4)
    assert all(v.dtype == np.float32 for v in b.values())
    val = data.PairSource(manifest, "val", cfg.data)
    v1 = take_all(data.make_dataset(val, cfg, levels, batch_size=1, training=False, seed=0, epoch=1))
    v2 = take_all(data.make_dataset(val, cfg, levels, batch_size=1, training=False, seed=0, epoch=2))
    assert len(v1) == len(v2) == 1
    for key in data.BATCH_KEYS:
        np.testing.assert_array_equal(v1[0][key], v2[0][key])


def test_disk_cache_is_used_and_invalidated_by_mtime(cfg, cohort, tmp_path, monkeypatch):
    from spirs_tf.manifest import load_manifest

    manifest = load_manifest(cohort / "manifest.csv")
    first = data.PairSource(manifest, "train", cfg.data, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # 2 fixed + 2 moving entries
    assert not list((tmp_path / "cache").glob(".tmp-*"))

    def fail(*args, **kwargs):
        raise AssertionError("preprocessing ran although the cache holds the result")

    monkeypatch.setattr(data, "preprocess_scan", fail)
    monkeypatch.setattr(data, "prior_onto_new", fail)
    second = data.PairSource(manifest, "train", cfg.data, cache_dir=tmp_path / "cache")
    for a, b in zip(first._items, second._items):
        np.testing.assert_array_equal(a.moving_image, b.moving_image)
        np.testing.assert_array_equal(a.fixed_mask, b.fixed_mask)
    # a new modification time of one scan invalidates the entries that depend on it
    st = os.stat(cohort / "p1" / "t1.nii.gz")
    os.utime(cohort / "p1" / "t1.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    with pytest.raises(AssertionError, match="preprocessing ran"):
        data.PairSource(manifest, "train", cfg.data, cache_dir=tmp_path / "cache")
    # other settings are other entries
    monkeypatch.undo()
    other = dataclasses.replace(cfg.data, clip_sigma=3.0)
    data.PairSource(manifest, "train", other, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4 + 4  # the failed build above wrote nothing


def test_both_directions_and_all_pairs(cfg, cohort):
    from spirs_tf.manifest import load_manifest

    manifest = load_manifest(cohort / "manifest.csv")
    both = dataclasses.replace(cfg.data, both_directions=True)
    src = data.PairSource(manifest, "train", both)
    assert len(src) == 4
    assert src.pairs[1].prior.timepoint == 1 and src.pairs[1].new.timepoint == 0
    np.testing.assert_allclose(src[1].moving_image, src[1].fixed_image, atol=1e-5)
    assert len(data.PairSource(manifest, "train", cfg.data, limit=1)) == 1


def test_pairs_without_a_mask_are_refused(cfg, cohort, tmp_path):
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.manifest import load_manifest

    rel = os.path.relpath(cohort, tmp_path)
    (tmp_path / "m.csv").write_text("patient_id,timepoint,image,mask,split\n"
                                    f"p1,0,{rel}/p1/t0.nii.gz,,test\np1,1,{rel}/p1/t1.nii.gz,,test\n")
    with pytest.raises(SpirsInputError, match="has no lesion mask"):
        data.PairSource(load_manifest(tmp_path / "m.csv"), "test", cfg.data)


# ------------------------------------------------------------------------ NumPy batches (no tf.data)
@pytest.mark.parametrize("training, batch_size, workers", [(True, 2, 1), (True, 1, 3), (False, 2, 2)])
def test_numpy_batches_equal_the_tf_data_batches(cfg, source, training, batch_size, workers):
    """Same plan, seeds and batching (validation: 3 pairs in batches of 2 keep the partial last batch)."""
    kwargs = dict(batch_size=batch_size, training=training, seed=5, epoch=2, steps=3 if training else None)
    expected = take_all(data.make_dataset(source, cfg, 2, **kwargs))
    got = list(data.numpy_batches(source, cfg, 2, workers=workers, **kwargs))
    assert len(got) == len(expected) == (3 if training else 2)
    for a, b in zip(got, expected):
        assert sorted(a) == sorted(b)
        for k in b:
            assert a[k].dtype == np.float32 and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])


def test_numpy_batches_keep_every_worker_busy(cfg, source, monkeypatch):
    """Batch 1, no prefetch, 4 workers: 4 samples are in flight at once (it was (prefetch + 1) · batch = 1).
    The first four loads wait for each other at a barrier, which breaks (and fails the test) unless all
    four run concurrently."""
    import threading

    real, barrier, calls, lock = data.make_sample, threading.Barrier(4, timeout=20), [0], threading.Lock()

    def gated(*args, **kwargs):
        with lock:
            calls[0] += 1
            first_four = calls[0] <= 4
        if first_four:
            barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "make_sample", gated)
    got = list(data.numpy_batches(source, cfg, 1, batch_size=1, training=True, seed=0, steps=6, workers=4,
                                  prefetch=0))
    assert len(got) == 6 and calls[0] == 6 and not barrier.broken


def test_numpy_batches_stop_early_and_check_the_grid(cfg, source):
    it = data.numpy_batches(source, cfg, 1, batch_size=1, training=True, seed=0, steps=50, prefetch=1)
    first = next(it)
    it.close()  # cancels the queued samples
    s = cfg.level_grid(1)
    assert first["fixed_image"].shape == (1, s, s, s, 1)
    small = data.PairSource.from_arrays([blob_pair(0, grid=16)])
    with pytest.raises(ValueError, match="differs from cfg.data.grid_size"):
        next(data.numpy_batches(small, cfg, 1, batch_size=1, training=True, seed=0))
