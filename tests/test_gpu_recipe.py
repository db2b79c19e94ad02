"""The GPU recipe's --smoke mode (experiments/gpu/recipe.py): the whole recipe on a tiny cohort and config.

One run in a subprocess (its own Keras backend), then its outputs are checked: the device's file limits,
the run directory in run.tar (loadable weights, a history row per epoch), the earlier stages' weights,
and the provenance (the resolved config, the source digest, timings, every stage finished).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments", "gpu"))
import recipe  # noqa: E402

#: the backend the smoke run trains with: $SPIRS_SMOKE_BACKEND, else TensorFlow where installed (op by op,
#: --eager: the whole run takes about a minute on 2 cores, against about 5 compiled), else JAX (the GPU
#: machine's backend; 5-7 minutes on 2 cores, eager or not)
SMOKE_BACKEND = os.environ.get("SPIRS_SMOKE_BACKEND") or (
    "tensorflow" if importlib.util.find_spec("tensorflow") else "jax")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    env = dict(os.environ, KERAS_BACKEND=SMOKE_BACKEND, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    # a budget far above the smoke run's needs: every stage must finish, also on a slow machine
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "gpu", "recipe.py"), "--smoke",
                           "--eager", "--out", str(out), "--budget", "1200", "--workers", "1", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_outputs(smoke, tmp_path):
    from spirs_tf import config as config_lib, networks
    from spirs_tf.predictor import find_run_checkpoint
    from spirs_tf.train import load_checkpoint

    names = sorted(os.listdir(smoke))
    assert names == ["curves.png", "provenance.json", "recipe.log", "run.tar", "stage1_best.npz",
                     "stage2_best.npz"]
    sizes = [os.path.getsize(smoke / n) for n in names]
    assert len(names) <= 8 and max(sizes) <= recipe.FILE_LIMIT and sum(sizes) <= recipe.TOTAL_LIMIT

    prov = json.loads((smoke / "provenance.json").read_text())
    expected = config_lib.get_config("gpu-1p5mm", recipe.SMOKE_OVERRIDES)
    assert prov["config"] == json.loads(json.dumps(config_lib.to_dict(expected)))
    assert prov["mode"] == "smoke" and prov["device"]["backend"] == SMOKE_BACKEND and prov["eager"]
    assert prov["source_digest"] == recipe.source_digest()
    assert {"synth", "preprocess", "train", "affine_eval", "total"} <= set(prov["timings"])
    # issue 15's figures of the final weights, on the cohort's test patient (experiments/affine_accuracy.py)
    acc = prov["affine_accuracy"]
    assert acc["split"] == "test" and acc["samples"] == 2 and acc["grid"] == 32 and acc["levels"] == 3
    assert acc["fixed_pose_probability"] == 0.0 and acc["linear"]["n"] == 18 and acc["translation"]["n"] == 6
    assert np.isfinite(acc["rms_network_mm"]) and acc["rms_identity_mm"] > 0 and isinstance(acc["target_met"], bool)
    assert acc["summary"].startswith("SYNTHETIC, 2 augmented pairs of split 'test'")
    assert "affine evaluation in" in (smoke / "recipe.log").read_text()
    assert prov["cohort"]["train_pairs"] >= 1 and prov["cohort"]["val_pairs"] >= 1
    assert "--fade-fraction" in prov["cohort"]["command"]
    assert {n: v["bytes"] for n, v in prov["outputs"].items()} == {
        n: os.path.getsize(smoke / n) for n in ("run.tar", "stage1_best.npz", "stage2_best.npz", "curves.png")}

    with tarfile.open(smoke / "run.tar") as tar:
        tar.extractall(tmp_path)
    run = tmp_path / "gpu-1p5mm"
    checkpoint, config_path, stage = find_run_checkpoint(str(run))
    assert stage == 3 and checkpoint.endswith(os.path.join("stage3", "checkpoints", "best.npz"))
    cfg = config_lib.get_config(config_path)
    for s in (1, 2, 3):
        info = prov["stages"][str(s)]
        assert info["stop"] == "finished" and info["epochs_done"] == expected.train.stages[s - 1].epochs
        with open(run / f"stage{s}" / "history.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == info["epochs_done"]
        assert all(np.isfinite(float(r["registration"])) and np.isfinite(float(r["val_registration"]))
                   for r in rows)

    # the final weights (model only) load into the model of their config, under this process's backend;
    # the earlier stages' weights hold the same variables (every level shares them)
    state, optim_state, meta = load_checkpoint(checkpoint)
    assert optim_state == {} and meta["levels"] == 3 and meta["stage"] == 3
    model = networks.build_spirs(cfg, 3, bn_trainable=False)
    networks.load_model_state(model, state)
    loaded = networks.model_state(model)
    assert set(loaded) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value)
    for s in (1, 2):
        earlier, optim_state, meta = load_checkpoint(str(smoke / f"stage{s}_best.npz"))
        assert optim_state == {} and meta["stage"] == meta["levels"] == s
        assert {k: v.shape for k, v in earlier.items()} == {k: v.shape for k, v in state.items()}
    assert 4 * sum(v.size for v in state.values()) == prov["weights_bytes"]


@pytest.mark.slow
def test_a_later_call_goes_on_from_an_earlier_calls_weights(smoke, tmp_path):
    """``--stages 3 --init-from stage2_best.npz``: only stage 3 trains, from those weights (provenance
    names them by digest), and its run.tar holds stage 3 alone."""
    out = tmp_path / "again"
    init = smoke / "stage2_best.npz"
    env = dict(os.environ, KERAS_BACKEND=SMOKE_BACKEND, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "gpu", "recipe.py"), "--smoke",
                           "--eager", "--out", str(out), "--budget", "1200", "--workers", "1", "--quiet",
                           "--stages", "3", "--init-from", str(init)],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stages_run"] == [3] and set(prov["stages"]) == {"3"}
    assert prov["init_from"]["sha256"] == recipe._sha256(str(init)) and prov["init_from"]["stage"] == 2
    assert prov["stages"]["3"]["init_from"] == "stage2_best.npz" and prov["stages"]["3"]["stop"] == "finished"
    assert sorted(os.listdir(out)) == ["curves.png", "provenance.json", "recipe.log", "run.tar"]
    with tarfile.open(out / "run.tar") as tar:
        assert {os.path.dirname(n) for n in tar.getnames()} == {"gpu-1p5mm/stage3", "gpu-1p5mm/stage3/checkpoints"}


def test_stages_and_init_from_are_checked_before_any_work(tmp_path, capsys):
    assert recipe.parse_stages("1,2,3", 3) == [1, 2, 3] and recipe.parse_stages("3", 3) == [3]
    for bad in ("1,3", "3,2", "0", "4", "x", ""):
        with pytest.raises(recipe.SpirsInputError):
            recipe.parse_stages(bad, 3)
    out = tmp_path / "out"
    assert recipe.main(["--smoke", "--out", str(out), "--stages", "2,3"]) == 2
    assert "give --init-from" in capsys.readouterr().err
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a checkpoint")
    assert recipe.main(["--smoke", "--out", str(out), "--stages", "3", "--init-from", str(broken)]) == 2
    assert "broken.npz" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["recipe.log"]  # nothing synthesised, nothing trained


def test_affine_evaluation_without_held_out_pairs_says_so(tmp_path):
    """A cohort with training patients only: the evaluation is skipped with a reason, nothing raised."""
    import time

    from cohort import make_cohort, make_fake_run
    from spirs_tf.manifest import load_manifest

    manifest = make_cohort(str(tmp_path / "cohort"), n_patients=2, splits=("train", "train"))
    run = make_fake_run(tmp_path / "run")
    acc = recipe.affine_evaluation(run, load_manifest(manifest), 2, deadline=time.time() + 600)
    assert acc == {"skipped": "the cohort has no test or validation pairs"}
    # a measurement that fails (here: no weights at all) is reported, not raised
    failed = recipe.affine_evaluation(str(tmp_path / "nowhere"), load_manifest(manifest), 2, time.time() + 600)
    assert failed["skipped"].startswith("failed: ")


def test_stage_deadlines_pass_unused_time_on():
    # three stages sharing 100 s as 3:3:4; what stage 1 leaves over is shared by stages 2 and 3
    assert recipe.stage_deadlines(0.0, 100.0, [0.3, 0.3, 0.4], 1) == pytest.approx(30.0)
    assert recipe.stage_deadlines(20.0, 100.0, [0.3, 0.3, 0.4], 2) == pytest.approx(20.0 + 80.0 * 3 / 7)
    assert recipe.stage_deadlines(70.0, 100.0, [0.3, 0.3, 0.4], 3) == pytest.approx(100.0)
    assert recipe.stage_deadlines(120.0, 100.0, [0.3, 0.3, 0.4], 3) == pytest.approx(120.0)


def test_gpu_config_fits_the_device_limits():
    from spirs_tf import config as config_lib

    cfg = config_lib.get_config("gpu-1p5mm")
    assert (cfg.data.grid_size, cfg.data.spacing_mm) == (128, 1.5)  # micro lesions: several voxels
    assert [s.levels for s in cfg.train.stages] == [1, 2, 3]
    assert all(s.cycle_epochs == s.epochs for s in cfg.train.stages)
    # its final weights come back from the device in one file (float32, model only)
    from spirs_tf import networks

    model = networks.build_spirs(cfg, 1)
    assert 4 * sum(int(np.prod(v.shape)) for v in model.weights) < recipe.FILE_LIMIT - 2**20


def test_step_profile_reports_loader_and_step_times():
    """experiments/gpu/step_profile.py on the test config, stage 1: every timing is there and positive, and
    the verdict follows from them."""
    import step_profile

    from spirs_tf import config as config_lib

    cfg = config_lib.get_config("test")
    out = step_profile.profile_stage(cfg, 1, [1, 2], batches=2, repeats=1, end_to_end=2)
    assert out["stage"] == 1 and out["levels"] == 1 and out["input"] == cfg.level_grid(1)
    assert set(out["loader_s_per_batch"]) == {"1", "2"}
    assert all(v > 0 for v in out["loader_s_per_batch"].values())
    assert out["step_s"] > 0 and out["end_to_end_s"] > 0 and out["first_step_s"] > 0
    assert out["bound"] == ("loader" if min(out["loader_s_per_batch"].values()) > out["step_s"] else "model")
