"""P2's fusion block: the sub-model that runs it alone, the residual design (P2 starts as P1), training it on
the prior placed by the true affine (``train.p2_prior = "truth"``) and re-initialising it (``init_skip``)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from spirs_tf import config as config_lib
from spirs_tf.errors import SpirsInputError

sys.path.insert(0, os.path.dirname(__file__))
from test_data import blob_pair  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(seed: int = 0):
    from spirs_tf._compat import ops

    rng = np.random.default_rng(seed)
    return {k: ops.convert_to_tensor(rng.random((1, 32, 32, 32, 1)).astype(np.float32))
            for k in ("fixed_image", "moving_image", "moving_mask")}


@pytest.mark.parametrize("residual", [False, True])
def test_p2_head_is_the_models_fusion_block_and_the_residual_design_starts_as_p1(residual):
    """The sub-model on the model's own P1 and warped prior gives the model's P2 exactly; it holds the
    fusion block's variables only. A fresh residual block adds exactly 0 to P1; the authors' does not."""
    from spirs_tf import networks

    cfg = config_lib.get_config("test", [f"model.p2_residual={str(residual).lower()}"])
    model = networks.build_spirs(cfg, 3)
    head = networks.p2_head(model, 3)
    assert head.trainable_variables and all(v.path.startswith("fuse_") for v in head.trainable_variables)
    x = _inputs()
    out = model(x)
    p2 = head([x["fixed_image"], out["p1_logits"], out["warped_image_3"], out["warped_mask_3"]])
    np.testing.assert_array_equal(np.asarray(p2), np.asarray(out["p2_logits"]))
    gap = float(np.abs(np.asarray(out["p2_logits"]) - np.asarray(out["p1_logits"])).max())
    assert (gap == 0.0) if residual else (gap > 1.0), gap


def test_residual_clip_keeps_p1s_mask_and_bounds_the_start():
    """``model.p2_residual_clip``: a fresh residual P2 is P1's logits clipped to ±c — the same mask
    (sign), |P2| ≤ c, and P1 unclipped where |P1| < c; a negative clip is a config error."""
    from spirs_tf import networks

    cfg = config_lib.get_config("test", ["model.p2_residual=true", "model.p2_residual_clip=0.5"])
    out = networks.build_spirs(cfg, 3)(_inputs(1))
    p1, p2 = np.asarray(out["p1_logits"]), np.asarray(out["p2_logits"])
    assert np.abs(p1).max() > 0.5  # the clip is exercised
    np.testing.assert_array_equal(p2, np.clip(p1, -0.5, 0.5))
    np.testing.assert_array_equal(p2 > 0, p1 > 0)
    with pytest.raises(SpirsInputError, match="p2_residual_clip"):
        config_lib.get_config("test", ["model.p2_residual_clip=-1"])


def test_prior_gate_layer_is_a_windowed_maximum_then_one_sided(rng):
    """``PriorGate``: ``min(r, 0) + near · max(r, 0)`` with ``near`` where scipy's maximum filter of the prior
    (zero outside the grid) is positive, a faint voxel included; its config round-trips."""
    from scipy import ndimage

    from spirs_tf.layers import PriorGate

    r = rng.standard_normal((2, 12, 12, 12, 1)).astype(np.float32)
    prior = (rng.random((2, 12, 12, 12, 1)) > 0.995).astype(np.float32)
    prior[1] = 0.0
    prior[1, 0, 5, 11, 0] = 0.1  # a faint, edge voxel
    near = (ndimage.maximum_filter(prior, size=(1, 5, 5, 5, 1), mode="constant", cval=0.0) > 0).astype(np.float32)
    assert 0 < (near[0] > 0).mean() < 0.5
    layer = PriorGate(5)
    out = np.asarray(layer([r, prior]))
    np.testing.assert_allclose(out, np.minimum(r, 0) + near * np.maximum(r, 0), atol=1e-7)
    assert np.all(out[1][near[1] == 0] <= 0)  # nothing is raised away from the prior
    clone = PriorGate.from_config(layer.get_config())
    assert clone.size == 5 and clone.get_config() == layer.get_config()


@pytest.mark.parametrize("bad, match", [(["model.p2_residual=true", "model.p2_gate_size=4"], "odd"),
                                        (["model.p2_residual=true", "model.p2_gate_size=-1"], "odd"),
                                        (["model.p2_gate_size=5"], "p2_residual")])
def test_a_bad_prior_gate_is_a_config_error(bad, match):
    with pytest.raises(SpirsInputError, match=match):
        config_lib.get_config("test", bad)


def _trainer(tmp_path, overrides, stage: int = 3, pairs=None):
    from spirs_tf import data
    from spirs_tf.train import Trainer

    cfg = config_lib.get_config("test", ["model.affine_dropout=0", *overrides])
    # fixed = prior (the same scan): the true affine is the augmentation's own, which must realign the prior
    source = data.PairSource.from_arrays(pairs or [(img, img, les, les) for img, _, les, _ in
                                                   (blob_pair(s) for s in range(2))])
    return Trainer(cfg, stage, source, None, str(tmp_path / "run"), verbose=0)


def _batch(trainer, seed: int = 3):
    from spirs_tf import data
    from spirs_tf._compat import tf

    batch = next(iter(data.numpy_batches(trainer.train_source, trainer.cfg, trainer.levels, 1, True, seed=seed)))
    return {k: tf.constant(v) for k, v in batch.items()}


def test_truth_prior_is_the_prior_realigned_by_the_true_affine(tmp_path):
    """With fixed = prior scan, the prior warped by ``true_affine`` lies on the fixed lesion and image (the
    augmentation moved it away), unlike the untrained network's; P2 and its loss use it, P1 is untouched."""
    from spirs_tf import losses, networks

    trainer = _trainer(tmp_path, ["train.p2_prior=truth", "model.p2_residual=true",
                                  "augment.spatial_probability=1", "augment.translation_voxels_at_128=40"])
    assert trainer.p2_head is not None
    batch = _batch(trainer)
    outputs, per_sample = trainer.compute_losses(batch, training=False)
    fixed, fixed_mask = np.asarray(batch["fixed_image"]), np.asarray(batch["fixed_mask"]) > 0.5
    inputs = trainer.truth_p2_inputs(outputs, batch)
    image, mask = np.asarray(inputs[2]), np.asarray(inputs[3]) > 0.5

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(np.asarray(batch["moving_mask"]) > 0.5, fixed_mask) < 0.3  # the augmentation moved the prior
    assert dice(mask, fixed_mask) > 0.8
    inside = fixed > 0.05
    assert np.abs(image - fixed)[inside].mean() < 0.5 * np.abs(np.asarray(batch["moving_image"]) - fixed)[inside].mean()
    plain = trainer.model(trainer.model_inputs(batch), training=False)
    np.testing.assert_array_equal(np.asarray(outputs["p1_logits"]), np.asarray(plain["p1_logits"]))
    want = networks.p2_head(trainer.model, trainer.levels)(inputs)
    np.testing.assert_allclose(np.asarray(outputs["p2_logits"]), np.asarray(want), atol=1e-6)
    assert not np.allclose(np.asarray(plain[f"warped_mask_{trainer.levels}"]) > 0.5, mask)
    np.testing.assert_allclose(np.asarray(per_sample["segmentation_p2"]),
                               np.asarray(losses.segmentation_loss(batch["fixed_mask"], want)), rtol=1e-5)


def test_truth_prior_training_moves_the_fusion_block_only(tmp_path):
    """Registration and P1 optimisers at rate 0: a step on P2's truth-prior loss moves ``fuse_`` variables
    (the zero-initialised residual head first) and nothing else."""
    from spirs_tf import networks

    zero = [f"optim.{g}.{k}=0" for g in ("registration", "segmentation_p1")
            for k in ("learning_rate", "learning_rate_min", "weight_decay", "weight_decay_min")]
    trainer = _trainer(tmp_path, ["train.p2_prior=truth", "model.p2_residual=true", *zero])
    before = networks.model_state(trainer.model)
    for seed in (1, 2):
        trainer.train_step(_batch(trainer, seed))
    after = networks.model_state(trainer.model)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert "fuse_head_conv/kernel" in moved
    assert moved and all(k.startswith("fuse_") for k in moved), sorted(moved)


def test_init_skip_reinitialises_the_named_modules_only(tmp_path):
    """A stage started from a checkpoint with ``init_skip=("fuse",)`` takes every other weight from it and
    keeps the fresh fusion block (the residual head at zero); an unknown module is refused."""
    from spirs_tf import networks
    from spirs_tf.checkpoints import save_checkpoint
    from spirs_tf.data import PairSource
    from spirs_tf.train import Trainer

    donor = _trainer(tmp_path / "donor", [])  # the authors' fusion block
    state = networks.model_state(donor.model)
    path = str(tmp_path / "donor.npz")
    save_checkpoint(path, state, {}, {"stage": 3, "levels": 3, "epoch": 1, "best": 1.0, "history": []})
    cfg = config_lib.get_config("test", ["model.p2_residual=true"])
    source = PairSource.from_arrays([blob_pair(0)])
    trainer = Trainer(cfg, 3, source, None, str(tmp_path / "run"), init_from=path, init_skip=("fuse",), verbose=0)
    got = networks.model_state(trainer.model)
    assert sorted(got) == sorted(state)
    for k, v in got.items():
        if k.startswith("fuse_"):
            continue
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    assert not np.any(got["fuse_head_conv/kernel"]) and np.any(state["fuse_head_conv/kernel"])
    with pytest.raises(SpirsInputError, match="unknown module"):
        Trainer(cfg, 3, source, None, str(tmp_path / "run2"), init_from=path, init_skip=("fusion",), verbose=0)


def test_config_and_cli_refuse_bad_p2_settings(tmp_path):
    """A bad ``train.p2_prior`` or ``model.p2_residual`` is a config error; ``--init-skip`` with an unknown
    module or without ``--init-from`` exits 2 in one line, before any run folder is made."""
    with pytest.raises(SpirsInputError, match="p2_prior"):
        config_lib.get_config("test", ["train.p2_prior=refined"])
    cfg = config_lib.get_config("test")
    cfg.model.p2_residual = 1  # e.g. from a JSON config file
    with pytest.raises(SpirsInputError, match="p2_residual"):
        cfg.validate()
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,timepoint,image,mask,split\n")
    for extra in (["--init-skip", "fuse"], ["--init-skip", "fusion", "--init-from", str(manifest)]):
        out = tmp_path / "run"
        proc = subprocess.run([sys.executable, "-m", "spirs_tf.cli", "train", "--stage", "2", "--config", "test",
                               "--manifest", str(manifest), "--out", str(out), *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "init-skip" in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()


def test_p2_prior_probe_counts_lesions_and_a_fresh_residual_p2_equals_p1(tmp_path):
    """experiments/p2_prior_probe.py on a tiny run whose residual P2 never trained (its optimiser at rate 0):
    P2 is P1, so it reaches exactly the lesions P1 reaches; the counts add up to the lesions probed."""
    from cohort import experiment_script, make_cohort
    from spirs_tf import train

    manifest = make_cohort(str(tmp_path / "cohort"), n_patients=3)
    frozen = [f"optim.segmentation_p2.{k}=0" for k in ("learning_rate", "learning_rate_min", "weight_decay",
                                                        "weight_decay_min")]
    cfg = config_lib.get_config("test", ["model.p2_residual=true", "train.stages.0.epochs=1", *frozen])
    train.run_stage(cfg, 1, manifest, str(tmp_path / "run"), verbose=0)
    result = experiment_script("p2_prior_probe").probe(str(tmp_path / "run"), manifest, split="val", pairs=2)
    counted = [part for entry in result["bins"].values() for part in entry.values()]
    assert result["lesions"] > 0 and sum(p["n"] for p in counted) == result["lesions"]
    for part in counted:
        assert part["P1"] == part["P2"] <= part["n"]
