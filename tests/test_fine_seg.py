"""The segmenter on a finer grid (spirs_tf.fine_seg): the same weights as the pyramid's segmentation path,
its training samples, training and resuming, and ``spirs predict --segmenter``. Test config (32³ grid)."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from spirs_tf import cli, config, fine_seg, fine_seg_inference, inference
from spirs_tf.checkpoints import save_checkpoint
from spirs_tf.data import PairSource
from spirs_tf.networks import build_spirs, model_state

from test_refine_predict import BIG, BIG_AFFINE, write_moved


def _cfg(normalization="batch"):
    cfg = config.get_config("test")
    cfg.model.normalization = normalization
    cfg.model.p2_residual = True
    return cfg


@pytest.mark.parametrize("normalization", ["batch", "instance"])
def test_segmenter_is_the_pyramids_segmentation_path(normalization, rng):
    """Loaded from a pyramid's state, the segmenter at ``extra = levels − 1`` gives the pyramid's P1, and its
    P2 from the pyramid's warped prior gives the pyramid's P2 (same layers, same weights)."""
    cfg = _cfg(normalization)
    levels = cfg.model.num_levels
    pyramid = build_spirs(cfg, levels)
    for v in pyramid.trainable_variables:  # move every weight off its initial value (P2's head starts at 0)
        v.assign(v.value + 0.05 * rng.standard_normal(v.shape).astype("float32"))
    seg = fine_seg.build_segmenter(cfg, levels - 1)
    from spirs_tf.networks import load_model_state

    load_model_state(seg, fine_seg.pyramid_segmentation_state(model_state(pyramid), seg))
    s = cfg.level_grid(levels)
    x = {k: rng.random((1, s, s, s, 1)).astype("float32") for k in ("fixed_image", "moving_image", "moving_mask")}
    out = {k: np.asarray(v) for k, v in pyramid(x, training=False).items()}
    mine = seg({"fixed_image": x["fixed_image"], "warped_image": out[f"warped_image_{levels}"],
                "warped_mask": out[f"warped_mask_{levels}"]}, training=False)
    np.testing.assert_allclose(np.asarray(mine["p1_logits"]), out["p1_logits"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(mine["p2_logits"]), out["p2_logits"], atol=1e-4)
    assert np.abs(out["p2_logits"] - out["p1_logits"]).max() > 1e-3  # P2 is not just P1 here


def test_a_gated_p2_raises_p1_only_near_the_prior(rng):
    """``model.p2_gate_size``: with the same weights, the gated P2 is P1 (clipped) + the ungated residual where
    it lowers, and where it raises only within the gate's window of the prior; far away P2 ≤ P1."""
    cfg = _cfg()
    cfg.model.p2_residual_clip = 2.0
    gated = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, p2_gate_size=5))
    models = [fine_seg.build_segmenter(c, 1) for c in (cfg, gated)]
    for v in models[0].trainable_variables:  # P2's head starts at 0: move every weight off its start
        v.assign(v.value + 0.05 * rng.standard_normal(v.shape).astype("float32"))
    from spirs_tf.networks import load_model_state

    load_model_state(models[1], model_state(models[0]))
    x = {k: rng.random((1, 32, 32, 32, 1)).astype("float32") for k in fine_seg.SEGMENTER_INPUTS}
    x["warped_mask"] = np.zeros_like(x["warped_mask"])
    x["warped_mask"][0, 9:11, 20, 6] = 1.0
    plain, mine = ({k: np.asarray(v) for k, v in m(x, training=False).items()} for m in models)
    np.testing.assert_array_equal(mine["p1_logits"], plain["p1_logits"])
    p1 = np.clip(plain["p1_logits"], -2.0, 2.0)
    r = plain["p2_logits"] - p1
    near = np.zeros_like(r)
    near[0, 7:13, 18:23, 4:9] = 1.0
    np.testing.assert_allclose(mine["p2_logits"], p1 + np.minimum(r, 0) + near * np.maximum(r, 0), atol=1e-5)
    assert (r[near == 0] > 0).any() and np.all(mine["p2_logits"][near == 0] <= p1[near == 0] + 1e-6)


def test_segmenter_runs_on_any_grid_divisible_by_its_pooling(rng):
    cfg = _cfg()
    seg = fine_seg.build_segmenter(cfg, 2)
    for shape in ((32, 32, 32), (64, 32, 96)):
        x = {k: rng.random((1, *shape, 1)).astype("float32") for k in fine_seg.SEGMENTER_INPUTS}
        out = seg(x, training=False)
        assert tuple(out["p1_logits"].shape) == (1, *shape, 1) == tuple(out["p2_logits"].shape)


def test_a_state_without_the_segmentation_path_is_refused():
    seg = fine_seg.build_segmenter(_cfg(), 2)
    state = {k: v for k, v in model_state(seg).items() if not k.startswith("fuse_")}
    with pytest.raises(inference.SpirsInputError, match="missing"):
        fine_seg.pyramid_segmentation_state(state, seg)


def _pair(rng, grid=32):
    """A pre-aligned pair: a textured cube 'brain' in [0, 1] and one lesion off-centre in both masks."""
    fixed = np.zeros((grid,) * 3, np.float32)
    fixed[4:-4, 4:-4, 4:-4] = 0.2 + 0.6 * rng.random((grid - 8,) * 3)
    moving = np.clip(fixed + 0.05 * rng.standard_normal(fixed.shape).astype(np.float32), 0, 1) * (fixed > 0)
    mask = np.zeros((grid,) * 3, np.uint8)
    mask[8:11, 9:12, 8:11] = 1
    return fixed, moving.astype(np.float32), mask, mask.copy()


def test_sample_without_augmentation_or_jitter_is_the_pair(rng):
    fixed, moving, fmask, mmask = _pair(rng)
    aug = dataclasses.replace(config.AugmentConfig(), enabled=False)
    st = fine_seg.SegmenterSettings(crop=0, prior_jitter_voxels=0.0, prior_jitter_degrees=0.0)
    s = fine_seg.segmenter_sample(fixed, moving, fmask, mmask, rng, aug, st)
    np.testing.assert_allclose(s["fixed_image"], fixed, atol=1e-6)
    np.testing.assert_allclose(s["warped_image"], moving, atol=1e-6)
    np.testing.assert_array_equal(s["fixed_mask"], fmask)
    np.testing.assert_array_equal(s["warped_mask"], mmask)


def test_sample_jitter_moves_only_the_prior(rng):
    fixed, moving, fmask, mmask = _pair(rng)
    aug = dataclasses.replace(config.AugmentConfig(), enabled=False)
    st = fine_seg.SegmenterSettings(crop=0, prior_jitter_voxels=2.0, prior_jitter_degrees=0.0)
    s = fine_seg.segmenter_sample(fixed, moving, fmask, mmask, np.random.default_rng(3), aug, st)
    np.testing.assert_allclose(s["fixed_image"], fixed, atol=1e-6)
    assert np.abs(s["warped_image"] - moving).max() > 0.1
    # a pure shift: the prior's lesion moved by at most 2 voxels per axis, its size about kept
    centre = lambda m: np.argwhere(m > 0.5).mean(0)  # noqa: E731
    shift = centre(s["warped_mask"]) - centre(mmask)
    assert abs(s["warped_mask"].sum() - mmask.sum()) <= 9
    assert np.all(np.abs(shift) <= 2.0 + 1e-6) and np.abs(shift).max() > 0


def test_a_soft_prior_keeps_a_one_voxel_lesion_that_the_threshold_loses():
    """``soft_prior``: a one-voxel prior lesion moved by part of a voxel keeps its whole mass (a pure shift
    of a trilinear sample), and the thresholded prior is the soft one ``>= 0.5`` (same jitter, same seed)."""
    fixed, moving, fmask, mmask = _two_lesion_pair()
    aug = dataclasses.replace(config.AugmentConfig(), enabled=False)
    lost = 0
    for seed in range(6):
        masks = {}
        for soft in (False, True):
            st = fine_seg.SegmenterSettings(crop=0, prior_jitter_voxels=0.5, prior_jitter_degrees=0.0,
                                            soft_prior=soft)
            masks[soft] = fine_seg.segmenter_sample(fixed, moving, fmask, mmask, np.random.default_rng(seed),
                                                    aug, st)["warped_mask"]
        tiny = (slice(3, 10),) * 3
        assert masks[True][tiny].sum() == pytest.approx(1.0, abs=1e-5) and masks[True].max() <= 1.0
        np.testing.assert_array_equal(masks[False], (masks[True] >= 0.5).astype(np.float32))
        lost += int(masks[False][tiny].sum() == 0)
    assert lost >= 3  # the threshold drops the moved one-voxel lesion most of the time


def test_lesion_centred_cubes_hold_the_lesion(rng):
    fixed, moving, fmask, mmask = _pair(rng)
    aug = config.AugmentConfig()  # flips, rotations, scales: the cube must still find the lesion
    hits = []
    for seed in range(12):
        st = fine_seg.SegmenterSettings(crop=16, extra=1, lesion_probability=1.0)
        s = fine_seg.segmenter_sample(fixed, moving, fmask, mmask, np.random.default_rng(seed), aug, st)
        assert s["fixed_image"].shape == (16, 16, 16)
        hits.append(s["fixed_mask"].sum() > 0)
    assert all(hits)
    st = fine_seg.SegmenterSettings(crop=16, extra=1, lesion_probability=0.0)
    far = [fine_seg.segmenter_sample(fixed, moving, fmask, mmask, np.random.default_rng(s), aug, st)["fixed_mask"].sum()
           for s in range(12)]
    assert sum(f > 0 for f in far) < 12


def test_lesion_balance_weighs_every_small_lesion_like_the_reference():
    mask = np.zeros((16, 16, 16), np.float32)
    mask[1:3, 1, 1] = 1  # 2 voxels
    mask[8:12, 8:12, 8:12] = 1  # 64 voxels
    mask[1, 12:14, 12] = 1  # 2 voxels, apart from the first
    scale = fine_seg.lesion_balance(mask, reference_mm3=16.0, voxel_mm3=0.5)  # 1 mm³ and 32 mm³ lesions
    np.testing.assert_allclose(scale[1:3, 1, 1], 16.0)
    np.testing.assert_allclose(scale[1, 12:14, 12], 16.0)
    np.testing.assert_allclose(scale[8:12, 8:12, 8:12], 1.0)  # larger than the reference: as before
    assert np.all(scale[mask == 0] == 1.0) and scale.dtype == np.float32
    # each small lesion's voxels together weigh reference / voxel volume = 32 voxels' worth
    assert scale[1:3, 1, 1].sum() == pytest.approx(32.0)
    np.testing.assert_array_equal(fine_seg.lesion_balance(np.zeros((4, 4, 4)), 16.0, 1.0), 1.0)


def test_prior_lesion_scale_weighs_only_the_lesions_the_prior_marks():
    mask = np.zeros((16, 16, 16), np.float32)
    mask[1:3, 1, 1] = 1  # marked: the prior touches one of its voxels
    mask[8:12, 8:12, 8:12] = 1  # new: the prior lies beside it, not on it
    prior = np.zeros_like(mask)
    prior[2, 1, 1] = 1
    prior[8:12, 8:12, 13] = 1
    scale = fine_seg.prior_lesion_scale(mask, prior, 4.0)
    np.testing.assert_array_equal(scale[1:3, 1, 1], 4.0)  # the whole lesion, not only where the prior is
    assert np.all(scale[mask == 0] == 1.0) and np.all(scale[8:12, 8:12, 8:12] == 1.0)
    assert scale.dtype == np.float32
    np.testing.assert_array_equal(fine_seg.prior_lesion_scale(mask, np.zeros_like(mask), 4.0), 1.0)


def test_prior_lesion_scale_reaches_p2s_loss_only(rng, tmp_path):
    """P2's batch scale is the lesion balance × the prior factor on a prior-marked lesion; P1's loss ignores it,
    P2's rises by exactly (factor − 1) × its lesion BCE share (from the model's logits)."""
    fixed, moving, fmask, mmask = _pair(rng)
    aug = dataclasses.replace(config.AugmentConfig(), enabled=False)
    st = fine_seg.SegmenterSettings(crop=0, extra=2, prior_jitter_voxels=2.0, prior_jitter_degrees=0.0,
                                    lesion_balance_mm3=54.0, prior_lesion_scale=3.0)
    s = fine_seg.segmenter_sample(fixed, moving, fmask, mmask, np.random.default_rng(0), aug, st, 1.0)
    np.testing.assert_allclose(s["p2_positive_scale"], s["positive_scale"] * np.where(fmask > 0, 3.0, 1.0))
    np.testing.assert_allclose(s["positive_scale"][fmask > 0], 2.0)  # 27 voxels against 54 mm³
    cfg = _cfg()
    trainer = fine_seg.SegmenterTrainer(cfg, st, _source(rng, 1), _source(rng, 1), str(tmp_path / "seg"))
    batch = {k: v[None, ..., None] for k, v in s.items()}
    plain = {k: v for k, v in batch.items() if k != "p2_positive_scale"}
    base = {k: float(v) for k, v in trainer.losses(plain, training=False).items()}
    both = {k: float(v) for k, v in trainer.losses(batch, training=False).items()}
    assert both["segmentation_p1"] == pytest.approx(base["segmentation_p1"], rel=1e-6)
    x = np.asarray(trainer.model({k: batch[k] for k in fine_seg.SEGMENTER_INPUTS}, training=False)["p2_logits"],
                   np.float64)
    q, lc = batch["fixed_mask"].astype(np.float64), cfg.loss
    weight = lc.p2_bce_positive_weight or lc.segmentation_bce_positive_weight or lc.bce_positive_weight
    bce = np.maximum(x, 0) - x * q + np.log1p(np.exp(-np.abs(x)))
    extra = np.mean(np.where(q == 1, 2.0 * (3.0 - 1.0) * weight * bce, 0.0))  # balance 2, factor 3
    assert both["segmentation_p2"] - base["segmentation_p2"] == pytest.approx(extra, rel=1e-4)


def _two_lesion_pair(grid=32):
    fixed = np.zeros((grid,) * 3, np.float32)
    fixed[2:-2, 2:-2, 2:-2] = 0.5
    mask = np.zeros((grid,) * 3, np.float32)
    mask[6, 6, 6] = 1  # one voxel
    mask[20:25, 20:25, 20:25] = 1  # 125 voxels
    return fixed, fixed.copy(), mask, mask.copy()


@pytest.mark.parametrize("mode, low, high", [("voxel", 0, 3), ("lesion", 12, 28)])
def test_lesion_sampling_centres_every_lesion_alike(mode, low, high):
    fixed, moving, fmask, mmask = _two_lesion_pair()
    aug = dataclasses.replace(config.AugmentConfig(), enabled=False)
    st = fine_seg.SegmenterSettings(crop=8, extra=0, lesion_probability=1.0, lesion_sampling=mode,
                                    prior_jitter_voxels=0.0, prior_jitter_degrees=0.0, lesion_balance_mm3=8.0)
    tiny = 0
    for seed in range(40):
        s = fine_seg.segmenter_sample(fixed, moving, fmask, mmask, np.random.default_rng(seed), aug, st, 1.0)
        assert s["fixed_mask"].sum() > 0  # the cube holds one of the two lesions (they are 14 voxels apart)
        tiny += int(s["fixed_mask"].sum() == 1)
        # the lesion-balanced scale comes with the sample: 8 mm³ / 1 mm³ on the one-voxel lesion
        np.testing.assert_array_equal(s["positive_scale"], fine_seg.lesion_balance(s["fixed_mask"], 8.0, 1.0))
    assert low <= tiny <= high


def test_trainer_losses_use_the_lesion_balanced_scale(rng, tmp_path):
    """The batch's ``positive_scale`` reaches both BCE terms: scaling the positives by s adds (s − 1) times
    their weighted BCE share; a scale of ones changes nothing."""
    cfg = _cfg()
    st = fine_seg.SegmenterSettings(extra=2, crop=0, batch_size=1, steps_per_epoch=1, epochs=1, validation_samples=1,
                                    lesion_balance_mm3=1000.0 * cfg.data.spacing_mm ** 3)  # 1000 voxels
    trainer = fine_seg.SegmenterTrainer(cfg, st, _source(rng, 1), _source(rng, 1), str(tmp_path / "seg"))
    batch = trainer._batch(trainer.train_source, [0], 0, 0)
    assert batch["positive_scale"].shape == batch["fixed_mask"].shape
    assert batch["positive_scale"].max() > 1.0  # the lesion is far under 1000 voxels
    plain = {k: v for k, v in batch.items() if k != "positive_scale"}
    base = {k: float(v) for k, v in trainer.losses(plain, training=False).items()}
    ones = {k: float(v) for k, v in trainer.losses({**plain, "positive_scale": np.ones_like(batch["fixed_mask"])},
                                                   training=False).items()}
    heavy = {k: float(v) for k, v in trainer.losses(batch, training=False).items()}
    # the difference, from the model's logits: mean over voxels of (s − 1)·w·BCE on the lesion's voxels, with
    # each part's own positive weight (independent of the random initial weights)
    out = trainer.model({k: batch[k] for k in fine_seg.SEGMENTER_INPUTS}, training=False)
    q, s = batch["fixed_mask"].astype(np.float64), batch["positive_scale"].astype(np.float64)
    lc = cfg.loss
    p1_w = lc.segmentation_bce_positive_weight or lc.bce_positive_weight
    weights = {"segmentation_p1": p1_w, "segmentation_p2": lc.p2_bce_positive_weight or p1_w}
    for k, logits_key in (("segmentation_p1", "p1_logits"), ("segmentation_p2", "p2_logits")):
        x = np.asarray(out[logits_key], np.float64)
        bce = np.maximum(x, 0) - x * q + np.log1p(np.exp(-np.abs(x)))
        extra = np.mean(np.where(q == 1, (s - 1.0) * weights[k] * bce, 0.0))
        assert extra > 0
        assert ones[k] == pytest.approx(base[k], rel=1e-6)
        assert heavy[k] - base[k] == pytest.approx(extra, rel=1e-4)


def test_validation_detection_counts_found_lesions_and_false_positives():
    """A stand-in segmenter whose P1 is the bright lesion and whose P2 is the prior plus one far blob: P1 and P2
    find every lesion, P2 has one false-positive component per scan (analytic counts)."""
    grid = 32
    pairs = []
    for k in range(3):
        fixed = np.zeros((grid,) * 3, np.float32)
        fixed[4:-4, 4:-4, 4:-4] = 0.5
        mask = np.zeros((grid,) * 3, np.float32)
        mask[8:8 + k + 1, 10, 10] = 1  # 1..3 voxels
        mask[18:22, 18:22, 18:22] = 1  # 64 voxels
        fixed[mask > 0] = 1.0
        pairs.append((fixed, fixed.copy(), mask, mask.copy()))
    source = PairSource.from_arrays(pairs)
    cfg = _cfg()
    cfg.data.spacing_mm = 2.0  # 8 mm³ voxels: 1..3 voxels are micro, 64 voxels (512 mm³) medium

    def run(fixed, warped, warped_mask):
        p2 = warped_mask.copy()
        p2[0, 28:30, 28:30, 28:30, 0] = 1.0  # outside every lesion
        return (fixed > 0.9).astype(np.float32), p2

    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    from segmenter_validation import validation_detection

    seg = fine_seg_inference.FineSegmenter(cfg, fine_seg.SegmenterSettings(crop=0, extra=1, prior_jitter_voxels=0.0,
                                                                 prior_jitter_degrees=0.0), run, "stand-in")
    r = validation_detection(seg, source)
    assert r["pairs"] == 3
    assert r["bins"]["micro"] == {"n": 3, "P1": 3, "P2": 3}
    assert r["bins"]["medium"] == {"n": 3, "P1": 3, "P2": 3}
    assert r["bins"]["small"]["n"] == r["bins"]["large"]["n"] == 0
    assert r["false_positives_per_scan"] == {"P1": 0.0, "P2": 1.0}
    assert validation_detection(seg, source, pairs=1)["pairs"] == 1


def test_segmenter_validation_script_refuses_bad_input_in_one_line(tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import segmenter_validation

    code = segmenter_validation.main(["--segmenter", str(tmp_path / "none"), "--manifest", str(tmp_path / "m.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("segmenter_validation: error:") and "\n" not in err
    assert str(tmp_path / "none") in err


@pytest.mark.parametrize("bad", [dict(crop=20), dict(lesion_probability=1.5), dict(batch_size=0),
                                 dict(image_order=2), dict(factor=3), dict(epochs=True),
                                 dict(lesion_sampling="size"), dict(lesion_balance_mm3=-1.0),
                                 dict(prior_lesion_scale=0.5), dict(prior_lesion_scale=float("nan")),
                                 dict(soft_prior="yes")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        fine_seg.SegmenterSettings(**bad).validate()


def _source(rng, n=3):
    return PairSource.from_arrays([_pair(np.random.default_rng(i)) for i in range(n)])


def test_training_runs_saves_and_resumes(rng, tmp_path, capsys):
    cfg = _cfg()
    st = fine_seg.SegmenterSettings(extra=2, crop=0, batch_size=1, steps_per_epoch=2, epochs=1, validation_samples=2)
    state = model_state(build_spirs(cfg, cfg.model.num_levels))
    logs = []
    first = fine_seg.SegmenterTrainer(cfg, st, _source(rng), _source(rng, 2), str(tmp_path / "seg"), init_state=state,
                                      log=logs.append)
    history = first.fit()
    assert len(history) == 1 and all(np.isfinite(v) for v in history[0].values())
    for name in ("config.json", "segmenter.json", "checkpoints/latest.npz", "checkpoints/best.npz"):
        assert (tmp_path / "seg" / name).is_file(), name
    before = first.optimizers["segmentation_p1"].iterations.numpy()
    assert before == 2
    again = fine_seg.SegmenterTrainer(cfg, dataclasses.replace(st, epochs=2), _source(rng), _source(rng, 2),
                                      str(tmp_path / "seg"), log=logs.append)
    history = again.fit()
    assert len(history) == 2 and again.epoch == 2 and any("resumed at epoch 1" in m for m in logs)
    assert again.optimizers["segmentation_p1"].iterations.numpy() == 4
    # going on with other settings is refused, naming what differs; the checkpoint is untouched
    other = fine_seg.SegmenterTrainer(cfg, dataclasses.replace(st, epochs=3, lesion_probability=0.2), _source(rng),
                                      _source(rng, 2), str(tmp_path / "seg"), log=logs.append)
    stamp = os.path.getmtime(tmp_path / "seg" / "checkpoints" / "latest.npz")
    with pytest.raises(inference.SpirsInputError, match=r"lesion_probability=0\.7 \(now 0\.2\)"):
        other.fit()
    assert os.path.getmtime(tmp_path / "seg" / "checkpoints" / "latest.npz") == stamp and other.epoch == 0
    seg = fine_seg_inference.load_segmenter(str(tmp_path / "seg"))
    x = np.random.default_rng(1).random((1, 32, 32, 32, 1)).astype("float32")
    p1, p2 = seg(x, x, (x > 0.9).astype("float32"))
    assert p1.shape == p2.shape == (1, 32, 32, 32, 1) and 0 <= p1.min() and p2.max() <= 1
    # shipped beside the demo weights (experiments/ship_weights.py --segmenter): the same segmenter
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import ship_weights

    assert ship_weights.main(["--segmenter", str(tmp_path / "seg"), "--out", str(tmp_path / "w")]) == 0
    shipped = fine_seg_inference.load_segmenter(str(tmp_path / "w" / "demo_segmenter.npz"))
    assert shipped.settings == seg.settings
    for a, b in zip(shipped(x, x, (x > 0.9).astype("float32")), (p1, p2)):
        np.testing.assert_array_equal(a, b)
    from spirs_tf.checkpoints import load_checkpoint

    best_epoch = load_checkpoint(str(tmp_path / "seg" / "checkpoints" / "best.npz"))[2]["epoch"]
    assert json.loads((tmp_path / "w" / "demo_segmenter.provenance.json").read_text())["epoch"] == best_epoch
    # shipped with a weightless config change (a prior gate chosen on validation pairs): same weights, the
    # gated P2; a change that alters the weights' shapes is refused before anything is written
    assert ship_weights.main(["--segmenter", str(tmp_path / "seg"), "--out", str(tmp_path / "g"),
                              "--segmenter-config-set", "model.p2_gate_size=3"]) == 0
    gated = fine_seg_inference.load_segmenter(str(tmp_path / "g" / "demo_segmenter.npz"))
    assert gated.cfg.model.p2_gate_size == 3 and seg.cfg.model.p2_gate_size == 0
    assert json.loads((tmp_path / "g" / "demo_segmenter.provenance.json").read_text())["config_overrides"] == [
        "model.p2_gate_size=3"]
    same = fine_seg_inference.load_segmenter(str(tmp_path / "seg"), ["model.p2_gate_size=3"])
    for a, b in zip(gated(x, x, (x > 0.9).astype("float32")), same(x, x, (x > 0.9).astype("float32"))):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    assert ship_weights.main(["--segmenter", str(tmp_path / "seg"), "--out", str(tmp_path / "bad"),
                              "--segmenter-config-set", "model.opening_filters=3"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_a_non_segmenter_folder_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(inference.SpirsInputError, match="no checkpoints"):
        fine_seg_inference.load_segmenter(str(tmp_path))


def _write_segmenter(folder, reg_cfg, factor, rng):
    """A segmenter folder with random weights for ``reg_cfg``'s grid × ``factor``."""
    cfg = fine_seg.segmenter_config(reg_cfg, factor)
    st = fine_seg.SegmenterSettings(factor=factor, extra=2)  # (the test config has 3 levels: at most 2 poolings)
    model = fine_seg.build_segmenter(cfg, st.extra)
    for v in model.trainable_variables:
        v.assign(v.value + 0.05 * rng.standard_normal(v.shape).astype("float32"))
    os.makedirs(folder / "checkpoints")
    config.save_config(cfg, str(folder / "config.json"))
    (folder / "segmenter.json").write_text(json.dumps(dataclasses.asdict(st)))
    save_checkpoint(str(folder / "checkpoints" / "best.npz"), model_state(model), {},
                    {"kind": "segmenter", "settings": dataclasses.asdict(st)})
    return str(folder)


def test_segment_fine_places_the_prior_on_the_fine_grid(predictor, tmp_path):
    """Prior = new scan, identity registration: the segmenter gets the same fine image twice, and the
    lesion mask on the fine grid (thresholded, or soft for a segmenter trained on a soft prior: the same
    mask at 0.5); P1/P2 come back with every k-th voxel on the model grid."""
    paths = write_moved(tmp_path, BIG, BIG_AFFINE)
    inputs = inference.read_case_inputs(paths["new"], paths["new"], paths["new_mask"])
    case = inference.prepare_case(inputs, predictor)
    s = case.new_image.shape[0]
    seen = []

    def run(fixed, warped, mask):
        seen.append((fixed, warped, mask))
        return fixed * 0.5, warped * 0.25

    seg = fine_seg_inference.FineSegmenter(fine_seg.segmenter_config(predictor.cfg, 2), fine_seg.SegmenterSettings(), run, "x")
    outputs = {"affine": np.eye(3, 4, dtype=np.float32), "dvf": np.zeros((s, s, s, 3), np.float32),
               "p1_prob": np.zeros((s, s, s, 1)), "p2_prob": np.zeros((s, s, s, 1))}
    out = fine_seg_inference.segment_fine(seg, case, outputs, predictor.cfg.data.clip_sigma)
    soft = dataclasses.replace(seg, settings=fine_seg.SegmenterSettings(soft_prior=True))
    fine_seg_inference.segment_fine(soft, case, outputs, predictor.cfg.data.clip_sigma)
    fixed, warped, mask = seen[0]
    soft_mask = seen[1][2]
    assert ((soft_mask > 0) & (soft_mask < 1)).any() and soft_mask.max() <= 1.0
    np.testing.assert_array_equal(mask, (soft_mask >= 0.5).astype(np.float32))
    assert fixed.shape == (1, 2 * s, 2 * s, 2 * s, 1)
    np.testing.assert_allclose(warped, fixed, atol=1e-5)
    # fine voxel 2i = model voxel i (the intensity normalisation's statistics differ a little between grids)
    np.testing.assert_allclose(fixed[0, ::2, ::2, ::2], case.new_image[..., None], atol=0.02)
    assert np.corrcoef(fixed[0, ::2, ::2, ::2].ravel(), case.new_image.ravel())[0, 1] > 0.999
    assert mask.sum() > 0 and set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_allclose(out["p1_prob"], 0.5 * fixed[0, ::2, ::2, ::2], atol=1e-6)
    assert out["p2_prob_fine"].shape == (2 * s, 2 * s, 2 * s, 1) and out["seg_factor"] == 2


def test_predict_with_a_segmenter(run_dir, predictor, tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = write_moved(tmp_path, BIG, BIG_AFFINE)
    seg = _write_segmenter(tmp_path / "seg", predictor.cfg, 2, rng)

    def args(out, *extra):
        return ["predict", "--new", paths["new"], "--prior", paths["prior"], "--prior-mask", paths["mask"],
                "--out", str(tmp_path / out), "--model", run_dir, "--refine", "off", "--quiet", *extra]

    assert cli.main(args("out", "--segmenter", seg)) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    s = predictor.size
    assert report["segmentation"] == {"model": "segmenter", "segmenter": seg, "grid": [2 * s] * 3, "factor": 2,
                                      "p2_prior_from": "network registration"}
    assert "segmenter" in report["timings_s"]
    from spirs_tf.io import read_volume

    p2 = read_volume(str(tmp_path / "out" / "p2_prob.nii.gz"))
    assert p2.shape == BIG and 0 <= p2.data.min() and p2.data.max() <= 1
    # its checkpoint alone (config.json one folder up) is the same segmenter
    assert cli.main(args("npz", "--segmenter", os.path.join(seg, "checkpoints", "best.npz"))) == 0
    np.testing.assert_array_equal(read_volume(str(tmp_path / "npz" / "p2_prob.nii.gz")).data, p2.data)
    # without the segmenter (or with --segmenter off): the model's own P1/P2
    assert cli.main(args("off", "--segmenter", "off")) == 0
    plain = json.loads((tmp_path / "off" / "report.json").read_text())
    assert plain["segmentation"] == {"model": "network", "grid": [s] * 3}
    assert not np.allclose(read_volume(str(tmp_path / "off" / "p2_prob.nii.gz")).data, p2.data)
    # a segmenter made for another model's grid: one line, exit 2, nothing written
    wide = dataclasses.replace(predictor.cfg, data=dataclasses.replace(predictor.cfg.data, grid_size=64))
    other = _write_segmenter(tmp_path / "seg64", wide, 2, rng)
    capsys.readouterr()
    assert cli.main(args("bad", "--segmenter", other)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not 2× the model's (32³ at 6 mm)" in err[0] and "seg64" in err[0], err
    assert not (tmp_path / "bad").exists()
