"""Checkpoint format and run directories (spirs_tf.checkpoints): round trip, atomic writes, clear
errors, and resolving a run directory or a checkpoint file to its checkpoint and config."""
from __future__ import annotations

import os

import numpy as np
import pytest

from spirs_tf import checkpoints
from spirs_tf.errors import SpirsInputError


def test_checkpoint_round_trip_and_atomicity(tmp_path, monkeypatch):
    path = str(tmp_path / "c.npz")
    model_state = {"enc_conv/kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
    optim_state = {"registration": {"iterations": np.array(5), "momentum/enc_conv/kernel": np.ones((2, 3))}}
    checkpoints.save_checkpoint(path, model_state, optim_state, {"epoch": 3, "levels": 1})
    m, o, meta = checkpoints.load_checkpoint(path)
    np.testing.assert_array_equal(m["enc_conv/kernel"], model_state["enc_conv/kernel"])
    np.testing.assert_array_equal(o["registration"]["momentum/enc_conv/kernel"], np.ones((2, 3)))
    assert meta["epoch"] == 3 and meta["format"] == checkpoints.CHECKPOINT_FORMAT

    # A write that dies half-way leaves the previous checkpoint intact and no temporary file.
    def boom(fh, **arrays):
        fh.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, model_state, optim_state, {"epoch": 4, "levels": 1})
    assert checkpoints.load_checkpoint(path)[2]["epoch"] == 3
    assert os.listdir(tmp_path) == ["c.npz"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SpirsInputError, match="bad.npz: cannot read checkpoint"):
        checkpoints.load_checkpoint(str(bad))


def _stage(root, stage: int, names=("best.npz",), config=True):
    folder = root / f"stage{stage}"
    (folder / "checkpoints").mkdir(parents=True)
    for name in names:
        checkpoints.save_checkpoint(str(folder / "checkpoints" / name), {}, {}, {"stage": stage, "levels": stage})
    if config:
        (folder / "config.json").write_text("{}")
    return folder


def test_stage_paths_layout(tmp_path):
    paths = checkpoints.StagePaths(checkpoints.stage_dir(str(tmp_path), 2))
    assert paths.root == str(tmp_path / "stage2")
    assert paths.best == str(tmp_path / "stage2" / "checkpoints" / "best.npz")
    assert paths.latest == str(tmp_path / "stage2" / "checkpoints" / "latest.npz")
    assert (paths.config, paths.history) == (str(tmp_path / "stage2" / "config.json"),
                                             str(tmp_path / "stage2" / "history.csv"))


def test_resolve_run_directory_and_checkpoint_file(tmp_path):
    run = tmp_path / "run"
    _stage(run, 1)
    _stage(run, 2, names=("latest.npz",))
    _stage(run, 3, config=False)  # no config: not a usable stage
    assert checkpoints.resolve_run(run) == (str(run / "stage2" / "checkpoints" / "latest.npz"),
                                            str(run / "stage2" / "config.json"), 2)
    # a checkpoint file: config.json one folder up, or beside it (a copied checkpoint)
    ckpt = str(run / "stage1" / "checkpoints" / "best.npz")
    assert checkpoints.resolve_run(ckpt) == (ckpt, str(run / "stage1" / "config.json"), None)
    (run / "stage1" / "checkpoints" / "config.json").write_text("{}")
    assert checkpoints.resolve_run(ckpt)[1] == str(run / "stage1" / "checkpoints" / "config.json")
    with pytest.raises(SpirsInputError, match="nope: run not found"):
        checkpoints.resolve_run(tmp_path / "nope")
    with pytest.raises(SpirsInputError, match="no config.json beside the checkpoint or one folder up"):
        checkpoints.resolve_run(run / "stage3" / "checkpoints" / "best.npz")
    with pytest.raises(SpirsInputError, match="not a run directory"):
        checkpoints.resolve_run(run / "stage3")


def test_checkpoints_module_does_not_import_keras():
    import subprocess
    import sys

    code = ("import sys, spirs_tf.checkpoints; "
            "bad = [m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
