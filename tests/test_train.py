"""Training loop: checkpoints, loss decrease, stage hand-off, resume after a kill (tiny volumes, 2 filters)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from spirs_tf import config as config_lib
from spirs_tf.errors import SpirsInputError

sys.path.insert(0, os.path.dirname(__file__))
from cohort import make_cohort  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(str(tmp_path_factory.mktemp("cohort")), n_patients=3)


def test_total_loss_decreases_on_a_fixed_batch(cohort):
    """Joint mode, level 1, one fixed batch: 15 SGDW steps lower Eq. 10's total."""
    from spirs_tf import data, networks, losses, optim
    from spirs_tf._compat import tf
    from spirs_tf.manifest import load_manifest

    cfg = config_lib.get_config("test", ["optim.registration.learning_rate=0.003"])
    source = data.PairSource(load_manifest(cohort), "train", cfg.data)
    batch = next(iter(data.make_dataset(source, cfg, 1, batch_size=2, training=True, seed=0)))
    model = networks.build_spirs(cfg, 1, bn_trainable=False)
    opt = optim.make_optimizer(cfg.optim.registration, steps_per_epoch=100, name="joint")
    variables = model.trainable_variables
    opt.build(variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = model({k: batch[k] for k in ("fixed_image", "moving_image", "moving_mask")}, training=True)
            loss = tf.reduce_mean(losses.spirs_losses(out, batch, cfg, 1)["total"])
        grads = tape.gradient(loss, variables)
        opt.apply(grads, variables)
        return loss

    history = [float(step()) for _ in range(15)]
    assert np.all(np.isfinite(history))
    assert history[-1] < history[0] - 0.05, history


def test_compiled_losses_equal_plain_losses_and_gradients(cohort):
    """train.xla_losses: the XLA-compiled loss terms of a 3-level model on a fixed batch equal the
    op-by-op ones (every term, and the gradient of each optimiser's loss w.r.t. its variables)."""
    from spirs_tf import data, networks, train
    from spirs_tf._compat import tf
    from spirs_tf.manifest import load_manifest

    cfg = config_lib.get_config("test")
    plain_cfg = config_lib.get_config("test", ["train.xla_losses=false"])
    source = data.PairSource(load_manifest(cohort), "train", cfg.data)
    batch = next(iter(data.make_dataset(source, cfg, 3, batch_size=2, training=True, seed=0)))
    model = networks.build_spirs(cfg, 3, bn_trainable=False)
    groups = networks.variable_groups(model)
    results = []
    for c in (cfg, plain_cfg):
        losses = train.loss_function(c, 3)
        with tf.GradientTape(persistent=True) as tape:
            out = model({k: batch[k] for k in ("fixed_image", "moving_image", "moving_mask")}, training=False)
            terms = {k: tf.reduce_mean(v) for k, v in losses(out, batch).items()}
        grads = {g: tape.gradient(terms[g], groups[g]) for g in ("registration", "segmentation_p1", "segmentation_p2")}
        results.append((terms, grads))
    (terms, grads), (plain_terms, plain_grads) = results
    assert sorted(terms) == sorted(plain_terms)
    for k in terms:
        np.testing.assert_allclose(float(terms[k]), float(plain_terms[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    for g in grads:
        for a, b, v in zip(grads[g], plain_grads[g], groups[g]):
            if b is None:
                assert a is None, v.path
                continue
            scale = float(tf.reduce_max(tf.abs(b))) + 1e-12
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4 * scale, err_msg=v.path)


def test_three_stages_hand_off_weights(cohort, tmp_path):
    from spirs_tf import networks, train

    cfg = config_lib.get_config("test")
    run = str(tmp_path / "run")
    t1 = train.run_stage(cfg, 1, cohort, run, verbose=0)
    assert len(t1.history) == cfg.train.stages[0].epochs
    assert os.path.isfile(os.path.join(run, "stage1", "config.json"))
    assert os.path.isfile(os.path.join(run, "stage1", "history.csv"))
    assert os.path.isfile(os.path.join(run, "stage1", "curves.png"))
    state1, _, meta1 = train.load_checkpoint(os.path.join(run, "stage1", "checkpoints", "best.npz"))

    # Stage 2 starts exactly from stage 1's best weights (checked before any stage-2 step).
    trainer2 = train.Trainer(cfg, 2, t1.train_source, t1.val_source, run,
                             init_from=os.path.join(run, "stage1", "checkpoints", "best.npz"), verbose=0)
    state2 = networks.model_state(trainer2.model)
    assert set(state2) == set(state1)
    for k in state1:
        np.testing.assert_array_equal(state2[k], state1[k], err_msg=k)
    assert not trainer2.model.get_layer("enc_se1_bn").trainable  # BatchNorm frozen from stage 2 on
    trainer2.fit()
    t3 = train.run_stage(cfg, 3, cohort, run, verbose=0)
    assert t3.levels == 3 and len(t3.history) == 1
    for row in t3.history:
        assert np.isfinite(row["total"]) and np.isfinite(row["val_total"])


@pytest.mark.parametrize("p1_trains_encoder", [True, False])
def test_p1_optimiser_updates_the_encoder_only_when_asked(cohort, tmp_path, p1_trains_encoder):
    """Registration optimiser at rate and decay 0: the encoder can only move through P1's optimiser."""
    from spirs_tf import data, networks, train
    from spirs_tf.manifest import load_manifest

    cfg = config_lib.get_config("test", [
        "train.stages.0.epochs=1", "train.stages.0.steps_per_epoch=2", "train.stages.0.bn_trainable=false",
        "optim.registration.learning_rate=0", "optim.registration.learning_rate_min=0",
        "optim.registration.weight_decay=0", "optim.registration.weight_decay_min=0",
        f"loss.p1_trains_encoder={p1_trains_encoder}"])
    source = data.PairSource(load_manifest(cohort), "train", cfg.data)
    trainer = train.Trainer(cfg, 1, source, None, str(tmp_path / "run"), verbose=0)
    before = networks.model_state(trainer.model)
    trainer.fit()
    after = networks.model_state(trainer.model)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert any(k.startswith("seg_") for k in moved)  # P1 trained in both cases
    assert not any(k.startswith(("aff_", "def_")) for k in moved)
    assert any(k.startswith("enc_") for k in moved) == p1_trains_encoder


def test_best_checkpoint_follows_the_validation_registration_loss(cohort, tmp_path):
    from spirs_tf import train

    cfg = config_lib.get_config("test", ["train.stages.0.epochs=3", "train.stages.0.steps_per_epoch=1"])
    run = str(tmp_path / "run")
    trainer = train.run_stage(cfg, 1, cohort, run, verbose=0)
    history = trainer.history
    assert len(history) == 3 and all("val_registration" in r for r in history)
    _, _, meta = train.load_checkpoint(os.path.join(run, "stage1", "checkpoints", "best.npz"))
    best = min(history, key=lambda r: r["val_registration"])
    assert meta["epoch"] == best["epoch"] and meta["best"] == pytest.approx(best["val_registration"])

    bad = config_lib.get_config("test", ["train.stages.0.epochs=1", "train.stages.0.steps_per_epoch=1",
                                         "train.keep_best_metric=val_registration_loss"])
    with pytest.raises(SpirsInputError, match="keep_best_metric 'val_registration_loss' is not logged"):
        train.run_stage(bad, 1, cohort, str(tmp_path / "bad"), verbose=0)


def test_logged_validation_lncc_is_exact_and_displacement_supervision_trains(cohort, tmp_path):
    """val_lncc_* (unmasked, next to a zero background) equal the float64 NumPy metric on the same pairs;
    a stage runs with loss.affine_supervision = displacement and logs a finite affine term."""
    from spirs_tf import data, metrics, train
    from spirs_tf._compat import ops

    cfg = config_lib.get_config("test", ["train.stages.0.epochs=1", "train.stages.0.steps_per_epoch=1",
                                         "loss.affine_supervision=displacement"])
    trainer = train.run_stage(cfg, 1, cohort, str(tmp_path / "run"), verbose=0)
    row = trainer.history[-1]
    assert np.isfinite(row["mse_1"]) and np.isfinite(row["val_mse_1"])
    window = cfg.loss.lncc_window
    values = {"identity": [], "affine": [], "deformable": []}
    for batch in data.make_dataset(trainer.val_source, cfg, 1, batch_size=1, training=False, seed=cfg.train.seed):
        out = trainer.model(trainer.model_inputs(batch), training=False)
        fixed = ops.convert_to_numpy(batch["fixed_image"])[0, ..., 0]
        for key, moving in (("identity", batch["moving_image"]), ("affine", out["warped_affine_image_1"]),
                            ("deformable", out["warped_image_1"])):
            values[key].append(metrics.lncc(fixed, ops.convert_to_numpy(moving)[0, ..., 0], window))
    assert len(values["identity"]) > 0
    for key, v in values.items():
        assert row[f"val_lncc_{key}"] == pytest.approx(np.mean(v), abs=1e-5), key


def test_batchnorm_recalibration_averages_batch_statistics(cohort, tmp_path):
    """Frozen-BatchNorm stage: the re-estimated moving mean/variance of every ``seg`` BatchNorm layer is
    the average of the statistics of its inputs over the batches; nothing else changes."""
    from spirs_tf import data, networks, train
    from spirs_tf.manifest import load_manifest

    cfg = config_lib.get_config("test", ["train.stages.1.bn_recalibration_batches=2",
                                         "train.stages.1.epochs=1", "train.stages.1.steps_per_epoch=1", "train.xla_losses=false"])
    source = data.PairSource(load_manifest(cohort), "train", cfg.data)
    trainer = train.Trainer(cfg, 2, source, None, str(tmp_path / "a"), verbose=0)
    layers = networks.batchnorm_layers(trainer.model, ["seg"])
    assert layers and all(layer.name.startswith("seg_") and not layer.trainable for layer in layers)
    seen = {id(layer): [] for layer in layers}
    for layer in layers:
        def spy(x, *args, _call=layer.call, _key=id(layer), **kwargs):
            seen[_key].append(np.asarray(x, dtype=np.float64))
            return _call(x, *args, **kwargs)
        layer.call = spy
    before = networks.model_state(trainer.model)
    names = trainer.recalibrate_batchnorm(2)
    after = networks.model_state(trainer.model)
    assert sorted(names) == sorted(layer.name for layer in layers)
    for layer in layers:
        xs = seen[id(layer)]
        assert len(xs) == 2  # the segmentation decoder runs once per forward pass
        mean = np.mean([x.mean(axis=(0, 1, 2, 3)) for x in xs], axis=0)
        var = np.mean([x.var(axis=(0, 1, 2, 3)) for x in xs], axis=0)
        np.testing.assert_allclose(np.asarray(layer.moving_mean), mean, rtol=1e-4, atol=1e-6, err_msg=layer.name)
        np.testing.assert_allclose(np.asarray(layer.moving_variance), var, rtol=1e-3, atol=1e-6, err_msg=layer.name)
        assert not layer.trainable
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith("seg_") and "/moving_" in k for k in changed)

    # fit() re-estimates before the first epoch: stage 2 freezes BatchNorm, so only that moves the statistics
    fitted = train.Trainer(cfg, 2, source, None, str(tmp_path / "b"), verbose=0)
    fresh = networks.model_state(fitted.model)
    fitted.fit()
    state = networks.model_state(fitted.model)
    moved = {k for k in fresh if "/moving_" in k and not np.array_equal(fresh[k], state[k])}
    assert moved and all(k.startswith("seg_") for k in moved)

    with pytest.raises(SpirsInputError, match="bn_recalibration_modules: unknown module"):
        config_lib.get_config("test", ["train.bn_recalibration_modules=seg,decoder"])


def test_stage_two_without_stage_one_is_a_clear_error(cohort, tmp_path):
    from spirs_tf import train

    with pytest.raises(SpirsInputError, match="run --stage 1 first"):
        train.run_stage(config_lib.get_config("test"), 2, cohort, str(tmp_path / "empty"), verbose=0)


KILL_SCRIPT = r"""
import os, sys
sys.path.insert(0, {tests!r})
from spirs_tf import config, train
cfg = config.get_config("test", ["train.stages.0.epochs=4", "train.stages.0.steps_per_epoch=3"])
orig = train.Trainer.on_epoch_end
def on_epoch_end(self, epoch, logs):
    orig(self, epoch, logs)
    if epoch == int(os.environ.get("KILL_AFTER", "0")):
        os.kill(os.getpid(), 9)  # SIGKILL right after the epoch-2 checkpoint
train.Trainer.on_epoch_end = on_epoch_end
train.run_stage(cfg, 1, {manifest!r}, {run!r}, verbose=0)
print("FINISHED")
"""


@pytest.mark.slow
def test_killed_run_resumes_and_finishes(cohort, tmp_path):
    from spirs_tf import train

    run = str(tmp_path / "run")
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=os.path.dirname(__file__), manifest=cohort, run=run))
    env = dict(os.environ, KILL_AFTER="2")
    first = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    _, _, meta = train.load_checkpoint(os.path.join(run, "stage1", "checkpoints", "latest.npz"))
    assert meta["epoch"] == 2
    second = subprocess.run([sys.executable, str(script)], env=dict(os.environ, KILL_AFTER="0"),
                            capture_output=True, text=True)
    assert second.returncode == 0 and "FINISHED" in second.stdout, second.stderr[-2000:]
    _, opt_states, meta = train.load_checkpoint(os.path.join(run, "stage1", "checkpoints", "latest.npz"))
    assert meta["epoch"] == 4
    assert [r["epoch"] for r in meta["history"]] == [1, 2, 3, 4]
    assert int(opt_states["registration"]["iterations"]) == 4 * 3


def test_deadline_cuts_an_epoch_short_stops_before_the_next_and_resumes(cohort, tmp_path, monkeypatch):
    """A fake step that takes 10 s of a fake clock: the deadline logic alone (no model is compiled)."""
    import types

    from spirs_tf import data, train
    from spirs_tf.manifest import load_manifest

    cfg = config_lib.get_config("test", ["train.stages.0.epochs=4", "train.stages.0.steps_per_epoch=3"])
    source = data.PairSource(load_manifest(cohort), "train", cfg.data)
    run = str(tmp_path / "run")
    clock = [1000.0]

    def fake_step(batch):
        clock[0] += 10.0
        return {"total": 1.0, "registration": 1.0}

    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0]))

    def trainer():
        t = train.Trainer(cfg, 1, source, None, run, verbose=0)
        t._steps = types.SimpleNamespace(train_step=fake_step, eval_step=None)
        return t

    # deadline 15 s ahead: steps at 0 s and 10 s run, the third (at 20 s) does not; the cut epoch is kept
    t = trainer()
    t.fit(deadline=clock[0] + 15.0)
    assert t.epoch == 1 and [r.get("steps") for r in t.history] == [2]
    assert t.stop_reason == "deadline: epoch 1 cut after 2 of 3 steps"
    _, _, meta = train.load_checkpoint(os.path.join(run, "stage1", "checkpoints", "latest.npz"))
    assert meta["epoch"] == 1

    # resumed with 35 s: epoch 2 runs whole (30 s); epoch 3 would end 25 s after the deadline, so never starts
    t = trainer()
    t.fit(deadline=clock[0] + 35.0)
    assert t.epoch == 2 and "steps" not in t.history[-1] and t.stop_reason == "deadline: epoch 3 would end after it"

    # without a deadline the remaining epochs run
    t = trainer()
    t.fit()
    assert t.epoch == 4 and t.stop_reason is None and len(t.history) == 4


def test_deadline_estimate_leaves_out_the_compiled_first_step(cohort, tmp_path, monkeypatch):
    """First step 100 s (compilation), the others 10 s: the next epoch is estimated at 3 × 10 s, not at
    the first epoch's 120 s; an epoch of which half fits starts and is cut; less than half: none starts."""
    import types

    from spirs_tf import data, train
    from spirs_tf.manifest import load_manifest

    cfg = config_lib.get_config("test", ["train.stages.0.epochs=5", "train.stages.0.steps_per_epoch=3"])
    source = data.PairSource(load_manifest(cohort), "train", cfg.data)
    clock, calls = [1000.0], [0]

    def fake_step(batch):
        calls[0] += 1
        clock[0] += 100.0 if calls[0] == 1 else 10.0
        return {"total": 1.0, "registration": 1.0}

    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0]))
    t = train.Trainer(cfg, 1, source, None, str(tmp_path / "run"), verbose=0)
    t._steps = types.SimpleNamespace(train_step=fake_step, eval_step=None)
    # epoch 1 ends at +120 s; 45 s left: epoch 2 (30 s) fits; 15 s left at +150: half of epoch 3 fits,
    # it starts and is cut at the deadline (+165 s) after 2 steps; then nothing is left
    t.fit(deadline=clock[0] + 165.0)
    assert t.step_seconds == pytest.approx(10.0)
    assert [r.get("steps") for r in t.history] == [None, None, 2]
    assert t.stop_reason == "deadline: epoch 3 cut after 2 of 3 steps"
    # 14 s left: less than half an epoch, so epoch 4 does not start
    t.stop_reason = None
    t.fit(deadline=clock[0] + 14.0)
    assert t.epoch == 3 and t.stop_reason == "deadline: epoch 4 would end after it"


def test_data_echo_steps_twice_on_each_loaded_batch(cohort, tmp_path, monkeypatch):
    """``train.data_echo=2``, 3 steps per epoch: two batches are loaded, the steps see A, A, B."""
    import types

    from spirs_tf import data, train
    from spirs_tf.manifest import load_manifest

    cfg = config_lib.get_config("test", ["train.stages.0.epochs=1", "train.stages.0.steps_per_epoch=3",
                                         "train.data_echo=2"])
    source = data.PairSource(load_manifest(cohort), "train", cfg.data)
    seen, loaded = [], []
    real_batches = data.batches

    def counting_batches(*args, **kwargs):
        loaded.append(kwargs["steps"])
        return real_batches(*args, **kwargs)

    def fake_step(batch):
        seen.append(float(np.sum(np.asarray(batch["true_affine"]))))
        return {"total": 1.0, "registration": 1.0}

    monkeypatch.setattr(train.data_lib, "batches", counting_batches)
    t = train.Trainer(cfg, 1, source, None, str(tmp_path / "run"), verbose=0)
    t._steps = types.SimpleNamespace(train_step=fake_step, eval_step=None)
    t.train_epoch(1)
    assert loaded == [2] and len(seen) == 3
    assert seen[0] == seen[1] != seen[2]
    with pytest.raises(SpirsInputError, match="data_echo"):
        config_lib.get_config("test", ["train.data_echo=0"])
    from spirs_tf.config_checks import check_config

    flagged = config_lib.get_config("test")
    flagged.train.data_echo = True  # e.g. "data_echo": true in a config file: not an echo count
    with pytest.raises(SpirsInputError, match="train.data_echo must be an integer >= 1, got True"):
        check_config(flagged)


def test_instance_normalisation_and_affine_radius_train_two_stages(cohort, tmp_path):
    """cpu-medium's choices on the test cohort: stage 1 trains β of the instance normalisations, stage 2
    (``bn_trainable=False``) keeps them while the convolutions move; re-estimation finds no BatchNorm."""
    from spirs_tf import networks, train

    cfg = config_lib.get_config("test", ["loss.affine_supervision=displacement", "model.affine_radius=4",
                                         "optim.registration.global_clipnorm=5.0", "train.validation_pairs=1",
                                         "train.stages.0.epochs=1", "train.stages.0.steps_per_epoch=1",
                                         "train.stages.1.steps_per_epoch=1", "train.xla_losses=false"])
    cfg.model.num_levels, cfg.train.stages, cfg.model.normalization = 2, cfg.train.stages[:2], "instance"
    cfg.train.stages[1].bn_recalibration_batches = 1
    cfg.validate()
    run = str(tmp_path / "run")
    t1 = train.run_stage(cfg, 1, cohort, run, verbose=0)
    best1 = os.path.join(run, "stage1", "checkpoints", "best.npz")
    state1, _, _ = train.load_checkpoint(best1)
    assert not [k for k in state1 if "moving_" in k]  # no BatchNorm statistics anywhere
    assert t1.recalibrate_batchnorm(1) == []
    t2 = train.run_stage(cfg, 2, cohort, run, verbose=0)
    for row in t1.history + t2.history:
        assert np.isfinite(row["total"]) and np.isfinite(row["val_mse_1"])
    state2 = networks.model_state(t2.model)
    betas = [k for k in state1 if k.endswith("_in/beta")]
    assert betas and all(np.array_equal(state1[k], state2[k]) for k in betas)
    assert np.abs(state2["def_head3_conv/kernel"] - state1["def_head3_conv/kernel"]).max() > 0 or \
        np.abs(state2["enc_se1_conv/kernel"] - state1["enc_se1_conv/kernel"]).max() > 0
