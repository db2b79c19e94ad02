"""Reliability, part 2 (issue 9): interrupted work, determinism, numerics, hostile paths end to end.

* **Hostile paths end to end**: ``python -m spirs_tf.cli predict`` in a real process with every input
  and the output in a folder whose name holds a space and non-UTF-8 bytes, an NRRD prior (SimpleITK
  used to abort the process there), an empty prior mask and a strict stdout; an output folder under
  a regular file is a one-line error (an OSError traceback before).
* **Checkpoints**: resuming ignores the temporary files a killed write leaves (``.tmp-*.npz``, a
  complete one that claims a later epoch and a truncated one); an unreadable ``latest.npz`` is a
  one-line error that says what to do, with nothing written (decision: never fall back to
  ``best.npz`` silently; it may be many epochs older), and following its advice works.
* **Numerics**: TF losses (LNCC, soft/hard Dice, BCE) and NumPy metrics stay finite, with finite
  gradients, on constant and all-zero images and empty masks; a training run on hard pairs (empty
  masks, all-background volumes, a half-field-of-view flipped misalignment) stays finite.
* **Slow** (``-m slow``): training SIGKILLed at a random time inside an epoch resumes from the last
  checkpoint, reaches the planned epoch and iteration counts and gives the same losses as an
  uninterrupted run; two runs with the same seed give the same ``history.csv`` (determinism on one
  machine, CPU: equal to 1e-6 relative, measured bit-identical); a cohort prediction SIGKILLed
  mid-way leaves only complete case folders, and its resume neither redoes nor touches them.

Elsewhere: SIGKILL at an epoch end (tests/test_train.py), a checkpoint write dying half-way
(tests/test_train.py), a simulated crashed cohort (tests/test_inference.py), byte-identical synthetic
cohorts for a seed (tests/test_synthetic.py::test_same_seed_gives_identical_bytes), LNCC of an empty
mask (tests/test_losses.py, tests/test_metrics.py).
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from spirs_tf import cli, config
from spirs_tf.io import write_volume

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
from cohort import make_cohort  # noqa: E402

#: A case folder written with the default ``--transforms itk`` (``all`` adds transform_total.nii.gz:
#: tests/test_inference.py).
CASE_FILES = ("affine.tfm", "deformation.nii.gz", "lesions.csv", "p1_mask.nii.gz", "p1_prob.nii.gz",
              "p2_mask.nii.gz", "p2_prob.nii.gz", "prior_labels_warped.nii.gz", "prior_mask_warped.nii.gz",
              "prior_warped.nii.gz", "qc.png", "report.json")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three patients × two time points, 32³ at 6 mm (the test config's grid), train/train/val."""
    return make_cohort(str(tmp_path_factory.mktemp("cohort")), n_patients=3)


def spirs_process(args, timeout=300, **env):
    """``python -m spirs_tf.cli ARGS`` (bytes arguments: any file name) → CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "spirs_tf.cli", *[os.fsencode(a) for a in args]],
                          capture_output=True, timeout=timeout, env={**os.environ, "PYTHONUTF8": "0", **env})


def assert_complete_case(folder) -> dict:
    """Every output of a case folder is there and fully readable; returns its report."""
    assert sorted(os.listdir(folder)) == sorted(CASE_FILES)
    for name in CASE_FILES:
        if name.endswith(".nii.gz"):
            assert np.all(np.isfinite(np.asarray(nib.load(os.path.join(folder, name)).dataobj))), name
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- hostile paths, end to end
def test_predict_process_with_non_utf8_space_paths_nrrd_and_empty_mask(run_dir, tmp_path):
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9 scans"))
    os.makedirs(folder)
    root = make_cohort(str(tmp_path / "src"), n_patients=1, shape=(20, 20, 20), spacing=5.0, splits=("test",))
    src = os.path.dirname(root)
    new, prior = (nib.load(os.path.join(src, "p0", t, "image.nii.gz")) for t in ("t1", "t0"))
    paths = {"new": os.path.join(folder, "new scan.nii.gz"), "prior": os.path.join(folder, "prior scan.nrrd"),
             "mask": os.path.join(folder, "empty mask.nrrd")}
    write_volume(paths["new"], np.asarray(new.dataobj), new.affine)
    write_volume(paths["prior"], np.asarray(prior.dataobj), prior.affine)
    write_volume(paths["mask"], np.zeros(prior.shape, np.uint8), prior.affine)  # no prior lesion
    out = os.path.join(folder, "case out")
    proc = spirs_process(["predict", "--new", paths["new"], "--prior", paths["prior"], "--prior-mask",
                          paths["mask"], "--out", out, "--model", run_dir], PYTHONIOENCODING="utf-8:strict")
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-3000:]
    assert b"Traceback" not in proc.stderr and os.fsencode(out) in proc.stdout
    report = assert_complete_case(out)
    assert report["lesions"]["prior_lesions"] == 0
    for key in ("lncc", "lncc_identity", "folding_percent", "max_displacement_mm"):
        assert np.isfinite(report["registration"][key]), key
    assert sorted(os.listdir(folder)) == ["case out", "empty mask.nrrd", "new scan.nii.gz", "prior scan.nrrd"]


def test_output_under_a_regular_file_is_one_line_not_a_traceback(run_dir, tmp_path, capsys):
    """What the file system refuses (here: a folder under a regular file) ends like bad input."""
    manifest = make_cohort(str(tmp_path / "data"), n_patients=1, shape=(20, 20, 20), spacing=5.0,
                           splits=("test",))
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    code = cli.main(["predict", "--manifest", manifest, "--split", "test", "--out", str(blocker / "cohort"),
                     "--model", run_dir, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err == f"spirs: error: {blocker / 'cohort'}: Not a directory\n"
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------------- checkpoints
def test_resume_ignores_killed_writes_and_refuses_a_corrupt_latest(cohort, tmp_path, capsys):
    """Restore-level checks (no training step: the full kill/resume cycle is the slow test below)."""
    from spirs_tf import data, networks, train

    cfg = config.get_config("test")
    source = data.PairSource.from_arrays(hard_pairs(cfg.data.grid_size, np.random.default_rng(0))[:1])
    run = tmp_path / "run"
    first = train.Trainer(cfg, 1, source, None, str(run), verbose=0)
    kernel = first.model.trainable_variables[0]
    kernel.assign(kernel + 1.0)  # make the saved weights differ from a fresh model's
    first.on_epoch_end(1, {"registration": 0.5, "total": 0.5})  # history.csv, best.npz, latest.npz
    saved = networks.model_state(first.model)
    ckpt = run / "stage1" / "checkpoints"
    latest = ckpt / "latest.npz"
    # What a kill during a write leaves: a complete file not yet renamed (it even claims a later
    # epoch) and a truncated one. Neither may be loaded.
    train.save_checkpoint(str(ckpt / ".tmp-killed1.npz"), {}, {}, {"epoch": 99, "levels": 1, "history": []})
    (ckpt / ".tmp-killed2.npz").write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    resumed = train.Trainer(cfg, 1, source, None, str(run), verbose=0)
    assert resumed.epoch == 1 and [row["epoch"] for row in resumed.history] == [1]
    state = networks.model_state(resumed.model)
    assert all(np.array_equal(state[k], saved[k]) for k in saved)

    # An unreadable latest.npz (disk or copy damage; atomic writes never produce one).
    latest.write_bytes(latest.read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in (run / "stage1").rglob("*") if p.is_file()}
    code = cli.main(["train", "--stage", "1", "--config", "test", "--manifest", cohort, "--out", str(run),
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"spirs: error: {latest}: cannot read checkpoint (")
    assert "cannot resume stage 1. Copy best.npz over it" in err
    after = {p.name: p.read_bytes() for p in (run / "stage1").rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing lost
    shutil.copyfile(ckpt / "best.npz", latest)  # the advice
    again = train.Trainer(cfg, 1, source, None, str(run), verbose=0)
    assert again.epoch == 1 and np.array_equal(networks.model_state(again.model)[kernel.path], saved[kernel.path])


# ---------------------------------------------------------------------------------------- numerics
def test_losses_and_metrics_stay_finite_on_constant_images():
    from spirs_tf import losses, metrics
    from spirs_tf._compat import ops, tf

    shape = (1, 12, 12, 12, 1)
    images = {"zeros": np.zeros(shape, np.float32), "constant": np.full(shape, 0.7, np.float32),
              "ramp": np.broadcast_to(np.linspace(0, 1, 12, dtype=np.float32)[:, None, None, None], shape).copy()}
    empty, full = np.zeros(shape, np.float32), np.ones(shape, np.float32)
    for fixed_name, fixed in images.items():
        for moving_name, moving in images.items():
            moving_var = tf.Variable(moving)
            with tf.GradientTape() as tape:
                values = [losses.lncc(fixed, moving_var), losses.lncc(fixed, moving_var, mask=empty),
                          losses.lncc(fixed, moving_var, mask=full),
                          losses.soft_dice(empty, moving_var), losses.dice_loss(full, moving_var),
                          losses.registration_dice_loss(empty, ops.clip(moving_var, 0, 1))]
                total = ops.sum(ops.stack([ops.sum(v) for v in values]))
            grad = tape.gradient(total, moving_var)
            what = f"{fixed_name} vs {moving_name}"
            assert all(np.all(np.isfinite(ops.convert_to_numpy(v))) for v in values), what
            assert np.all(np.isfinite(ops.convert_to_numpy(grad))), what
            assert 0.0 <= float(ops.convert_to_numpy(values[0])[0]) <= 1.0 + 1e-5, what
            for logits in (fixed * 0 - 50.0, fixed * 0 + 50.0, fixed):
                for target in (empty, full):
                    assert np.all(np.isfinite(ops.convert_to_numpy(losses.hard_dice(target, logits))))
                    assert np.all(np.isfinite(ops.convert_to_numpy(
                        losses.weighted_bce(target, logits, from_logits=True))))
            # NumPy metrics (reports, evaluation): whole-image LNCC and Dice
            lncc = metrics.lncc(fixed[0, ..., 0], moving[0, ..., 0])
            assert np.isfinite(lncc) and 0.0 <= lncc <= 1.0 + 1e-9, what
            assert np.isfinite(metrics.lncc(fixed[0, ..., 0], moving[0, ..., 0], mask=full[0, ..., 0])), what
    assert metrics.dice(empty, empty) == 1.0 and metrics.dice(empty, full) == 0.0
    assert np.all(np.isfinite(metrics.lncc_map(images["zeros"][0, ..., 0], images["constant"][0, ..., 0])))


def hard_pairs(grid: int, rng) -> list[tuple]:
    """(fixed, moving, fixed_mask, moving_mask) pairs that are hard on the losses (G³ arrays)."""
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, grid)] * 3, indexing="ij"))
    brain = (np.sqrt((g ** 2).sum(0)) < 0.8).astype(np.float32)
    image = brain * (0.5 + 0.3 * np.cos(3 * g[0]) + 0.1 * rng.random((grid,) * 3)).astype(np.float32)
    lesion = ((g[0] - 0.3) ** 2 + g[1] ** 2 + g[2] ** 2 < 0.04).astype(np.float32)
    nothing = np.zeros_like(image)
    return [
        (image, np.roll(image, 1, axis=0), nothing, nothing),  # empty masks on both sides
        (nothing, nothing, nothing, nothing),  # all background
        (image, np.flip(np.roll(image, grid // 2, axis=1), axis=2), lesion,  # half-FOV shift + flip
         np.flip(np.roll(lesion, grid // 2, axis=1), axis=2)),
        (image, image, lesion, nothing),  # a new lesion with no prior counterpart
    ]


def test_training_on_hard_pairs_stays_finite(tmp_path):
    from spirs_tf import data, losses, networks, train

    cfg = config.get_config("test", ["train.stages.0.epochs=2", "train.stages.0.steps_per_epoch=2"])
    source = data.PairSource.from_arrays(hard_pairs(cfg.data.grid_size, np.random.default_rng(3)))
    trainer = train.Trainer(cfg, 1, source, None, str(tmp_path / "run"), verbose=0)
    # each hard pair on its own through the model and every loss term
    for batch in data.make_dataset(source, cfg, 1, batch_size=1, training=False, seed=0):
        outputs = trainer.model({k: batch[k] for k in data.MODEL_INPUT_KEYS}, training=False)
        for name, value in losses.spirs_losses(outputs, batch, cfg, 1).items():
            assert np.all(np.isfinite(np.asarray(value))), name
    history = trainer.fit()
    assert len(history) == 2
    for row in history:
        assert all(np.isfinite(v) for v in row.values()), row
    for name, value in networks.model_state(trainer.model).items():
        assert np.all(np.isfinite(value)), name


# --------------------------------------------------------------------------- slow: killed training
TRAIN_SCRIPT = r"""
import sys
from spirs_tf import config, train
cfg = config.get_config("test", ["train.stages.0.epochs={epochs}", "train.stages.0.steps_per_epoch={steps}"])
original = train.Trainer.on_epoch_end
def on_epoch_end(self, epoch, logs):
    original(self, epoch, logs)
    print("epoch", epoch, flush=True)
train.Trainer.on_epoch_end = on_epoch_end
train.run_stage(cfg, 1, sys.argv[1], sys.argv[2], verbose=0)
print("FINISHED", flush=True)
"""
EPOCHS, STEPS = 8, 12


def train_child(script, manifest, run) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), manifest, str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_history(run) -> list[dict]:
    with open(run / "stage1" / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def loss_columns(rows) -> np.ndarray:
    keys = [k for k in rows[0] if k not in ("epoch", "seconds")]
    return np.array([[float(r[k]) for k in keys] for r in rows])


@pytest.mark.slow
def test_training_killed_at_a_random_time_resumes_and_matches_an_uninterrupted_run(cohort, tmp_path):
    """Also the determinism check: two uninterrupted runs with the same seed, same history.csv."""
    from spirs_tf import train

    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(epochs=EPOCHS, steps=STEPS))
    references = [train_child(script, cohort, tmp_path / f"reference{k}") for k in (0, 1)]
    victim = train_child(script, cohort, tmp_path / "killed")
    seen, stamps = [], []
    while len(seen) < 2:  # time two epochs, then kill at a random moment of the following ones
        line = victim.stdout.readline()
        assert line, victim.stderr.read()[-3000:]
        if line.startswith("epoch"):
            seen.append(int(line.split()[1]))
            stamps.append(time.monotonic())
    delay = random.Random(20240509).uniform(0.05, 2.5) * (stamps[1] - stamps[0])
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    ckpt = tmp_path / "killed" / "stage1" / "checkpoints"
    _, _, meta = train.load_checkpoint(str(ckpt / "latest.npz"))
    assert 2 <= meta["epoch"] < EPOCHS
    for name in os.listdir(ckpt):  # nothing half-written under a final name
        if not name.startswith(".tmp-"):
            train.load_checkpoint(str(ckpt / name))
    assert len(read_history(tmp_path / "killed")) in (meta["epoch"], meta["epoch"] + 1)

    resumed = subprocess.run([sys.executable, str(script), cohort, str(tmp_path / "killed")],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "FINISHED" in resumed.stdout, resumed.stderr[-3000:]
    epochs_run = [int(line.split()[1]) for line in resumed.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs_run == list(range(meta["epoch"] + 1, EPOCHS + 1))  # it went on, it did not restart
    _, opt_states, final = train.load_checkpoint(str(ckpt / "latest.npz"))
    assert final["epoch"] == EPOCHS and [r["epoch"] for r in final["history"]] == list(range(1, EPOCHS + 1))
    assert int(opt_states["registration"]["iterations"]) == EPOCHS * STEPS

    for ref in references:
        out, err = ref.communicate(timeout=600)
        assert ref.returncode == 0 and "FINISHED" in out, err[-3000:]
    a, b = (loss_columns(read_history(tmp_path / f"reference{k}")) for k in (0, 1))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg="same seed, different losses")
    np.testing.assert_allclose(loss_columns(read_history(tmp_path / "killed")), a, rtol=1e-6, atol=1e-7,
                               err_msg="killed and resumed run differs from the uninterrupted one")


# ------------------------------------------------------------------------ slow: killed cohort prediction
@pytest.mark.slow
def test_cohort_prediction_killed_midway_resumes_without_redoing_or_corrupting(run_dir, tmp_path):
    manifest = make_cohort(str(tmp_path / "data"), n_patients=6, n_timepoints=2, shape=(20, 20, 20),
                           spacing=5.0, splits=("test",))
    out = tmp_path / "cohort out"
    args = [sys.executable, "-m", "spirs_tf.cli", "predict", "--manifest", manifest, "--split", "test",
            "--out", str(out), "--model", run_dir, "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300

    def finished():
        return sorted(d for d in os.listdir(out) if not d.startswith(".") and (out / d / "report.json").exists()) \
            if out.exists() else []

    while not finished():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first = time.monotonic()
    while len(finished()) < 2 and proc.poll() is None:
        time.sleep(0.05)
    per_case = time.monotonic() - first
    time.sleep(random.Random(7).uniform(0.0, 1.5) * per_case)  # somewhere inside a later case
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the cohort finished before the kill; make it longer"
    done = finished()
    assert 2 <= len(done) < 6
    for name in os.listdir(out):  # only complete case folders and temporary ones
        if not name.startswith(".tmp-spirs-"):
            assert name in done, name
            assert_complete_case(out / name)
    stamps = {(d, f): (out / d / f).stat().st_mtime_ns for d in done for f in CASE_FILES}
    rerun = subprocess.run(args, capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    assert {(d, f): (out / d / f).stat().st_mtime_ns for d in done for f in CASE_FILES} == stamps
    with open(out / "cohort_summary.csv", newline="") as fh:
        summary = {r["case_id"]: r["status"] for r in csv.DictReader(fh)}
    assert len(summary) == 6 and all(summary[d] == "skipped" for d in done)
    assert sorted(s for c, s in summary.items() if c not in done) == ["done"] * (6 - len(done))
    assert sorted(os.listdir(out)) == sorted(["cohort_summary.csv", *summary])  # no leftovers
    for case in summary:
        assert_complete_case(out / case)

