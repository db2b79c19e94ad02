"""Checkpoints and run directories: the file format, the layout of a run, and finding a run's checkpoint.

A checkpoint is one name-keyed ``.npz`` file (model variables and optimiser slots by variable path,
plus a JSON ``__meta__`` entry: stage, levels, epoch, best metric, history), written with
write-then-rename so that a killed write never leaves a half-written checkpoint under its name.

Run directory layout (``RUN`` holds all three stages)::

    RUN/stage1/config.json        resolved config
    RUN/stage1/history.csv        one row per epoch, every loss term and validation metric
    RUN/stage1/curves.png         learning curves
    RUN/stage1/checkpoints/{latest,best}.npz
    RUN/stage1/tensorboard/

A trained model is named by a run directory (:func:`find_run_checkpoint`: the highest stage, its
``best.npz`` else ``latest.npz``) or by a checkpoint ``.npz`` with ``config.json`` beside it or one
folder up (:func:`checkpoint_config`); :func:`resolve_run` accepts both. This module needs only NumPy.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from spirs_tf.atomic import atomic_path
from spirs_tf.errors import SpirsInputError

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------ the format
def save_checkpoint(path: str, model_state: dict, optimizer_states: dict, meta: dict) -> None:
    """Write one name-keyed checkpoint atomically (temporary file + rename)."""
    arrays = {f"model/{k}": v for k, v in model_state.items()}
    for opt_name, state in optimizer_states.items():
        arrays.update({f"optim/{opt_name}/{k}": v for k, v in state.items()})
    meta = dict(meta, format=CHECKPOINT_FORMAT)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """Read a checkpoint written by :func:`save_checkpoint` → (model_state, optimizer_states, meta).

    Raises:
        SpirsInputError: missing file, unreadable archive, no metadata.
    """
    if not os.path.isfile(path):
        raise SpirsInputError("checkpoint not found", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # corrupt zip, truncated file
        raise SpirsInputError(f"cannot read checkpoint ({exc.__class__.__name__}: {exc})", path) from None
    if "__meta__" not in arrays:
        raise SpirsInputError("not a spirs-tf checkpoint (no metadata)", path)
    meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optimizer_states: dict[str, dict] = {}
    for k, v in arrays.items():
        if k.startswith("optim/"):
            _, name, var = k.split("/", 2)
            optimizer_states.setdefault(name, {})[var] = v
    return model_state, optimizer_states, meta


# ----------------------------------------------------------------------------------- run layout
@dataclass
class StagePaths:
    """The files of one stage folder ``RUN/stageN`` (module docstring)."""

    root: str

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def latest(self) -> str:
        return os.path.join(self.checkpoints, "latest.npz")

    @property
    def best(self) -> str:
        return os.path.join(self.checkpoints, "best.npz")

    @property
    def history(self) -> str:
        return os.path.join(self.root, "history.csv")

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config.json")


def stage_dir(run_dir: str, stage: int) -> str:
    """``RUN/stageN``."""
    return os.path.join(run_dir, f"stage{stage}")


# ------------------------------------------------------------------------------- finding a run
def find_run_checkpoint(run_dir: str) -> tuple[str, str, int | None]:
    """``(checkpoint, config.json, stage)`` of a run directory: the highest ``stageN`` that holds a
    checkpoint, its ``best.npz`` else ``latest.npz``. A single stage folder is accepted too.

    Raises:
        SpirsInputError: no stage with a checkpoint and a config.
    """
    stages = []
    for name in os.listdir(run_dir):
        if name.startswith("stage") and name[5:].isdigit():
            stages.append((int(name[5:]), os.path.join(run_dir, name)))
    candidates = sorted(stages, reverse=True) + [(None, run_dir)]
    for stage, folder in candidates:
        for ckpt in ("best.npz", "latest.npz"):
            path = os.path.join(folder, "checkpoints", ckpt)
            cfg = os.path.join(folder, "config.json")
            if os.path.isfile(path) and os.path.isfile(cfg):
                return path, cfg, stage
    raise SpirsInputError("not a run directory (no stageN/checkpoints/best.npz or latest.npz with "
                          "stageN/config.json) and not a SavedModel (no saved_model.pb)", run_dir)


def checkpoint_config(checkpoint: str) -> str:
    """The ``config.json`` of a checkpoint file: beside it (a checkpoint copied with its config) or one
    folder up (``RUN/stageN/checkpoints/best.npz`` → ``RUN/stageN/config.json``).

    Raises:
        SpirsInputError: neither exists.
    """
    folder = os.path.dirname(os.path.abspath(checkpoint))
    for cfg in (os.path.join(folder, "config.json"), os.path.join(os.path.dirname(folder), "config.json")):
        if os.path.isfile(cfg):
            return cfg
    raise SpirsInputError("no config.json beside the checkpoint or one folder up", checkpoint)


def resolve_run(path: str | os.PathLike) -> tuple[str, str, int | None]:
    """``(checkpoint, config.json, stage)`` of a run directory (:func:`find_run_checkpoint`) or of a
    checkpoint file (:func:`checkpoint_config`; ``stage`` is then ``None``: read it from the
    checkpoint's metadata).

    Raises:
        SpirsInputError: missing path, no checkpoint, no config.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SpirsInputError("run not found", path)
    if os.path.isdir(path):
        return find_run_checkpoint(path)
    return path, checkpoint_config(path), None
