"""Training under tf.distribute, for real on CPU (issue 8).

Two replicas come from splitting the one physical CPU into two logical devices, which has to happen
before TensorFlow initialises; every check that needs them therefore runs in a fresh subprocess.

The central claim: one training step of MirroredStrategy over 2 replicas (1 pair each) changes every
weight as one step of a single replica on the whole batch of 2 (isolated updates, three SGDW
optimisers, weight decay, BatchNorm statistics included).

Tolerance (float32). Summing the same numbers in another order changes a float32 result, and some
weights of this network amplify that: swapping the two pairs of the batch on ONE device moves the
update of ``enc_se2_1_bn/beta`` by 6 % (BatchNorm over 16 values per channel at the 2³ bottleneck,
whose input gradient ``(g − mean g − x̂·mean(g·x̂))/σ`` is a small residual of large terms).
So every run also measures that "noise": the single-replica step on the batch in reversed order.
For each weight ``w`` with single-replica update ``Δ = w₁ − w₀``, the 2-replica weight must satisfy
``max|w₂ − w₁| ≤ 4·max|w_swapped − w₁| + 1e-3·max|Δ| + 1e-7`` (1e-7 ≈ one float32 ulp of weights of
order 1), and the median of ``max|w₂ − w₁| / max|Δ|`` over all weights must stay below 1e-3
(measured ~1e-5). A control run with per-replica (unsynchronized) BatchNorm violates the bound.

Dropout would draw different masks on each replica, so the equality tests set
``model.affine_dropout=0``; the end-to-end runs keep it. The trainable-BatchNorm case uses
``data.grid_size=64``: at grid 32 the level-1 bottleneck is 1³ and BatchNorm normalises 2 values
per channel (x̂ = ±1), where the whole input gradient is round-off.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from spirs_tf.errors import SpirsInputError

sys.path.insert(0, os.path.dirname(__file__))
from cohort import make_cohort  # noqa: E402

RTOL, ATOL, NOISE_FACTOR = 1e-3, 1e-7, 4.0


def _within(v: dict) -> bool:
    """The tolerance of the module docstring for one weight's ``update``, ``error`` and ``noise``."""
    return v["error"] <= NOISE_FACTOR * v["noise"] + RTOL * v["update"] + ATOL

STEP_SCRIPT = r"""
import dataclasses, json, sys
import numpy as np
from scipy import ndimage
from spirs_tf._compat import keras, tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from spirs_tf import blocks, config as config_lib, data as data_lib, distribute, networks, train
from spirs_tf.errors import SpirsInputError

case, grid, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
bn_trainable = "true" if case == "synced" else "false"
cfg = config_lib.get_config("test", ["model.affine_dropout=0", f"data.grid_size={grid}",
                                     "train.stages.0.batch_size=2", f"train.stages.0.bn_trainable={bn_trainable}"])
rng = np.random.default_rng(0)

def volume():
    x = ndimage.gaussian_filter(rng.random((grid,) * 3), 2)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)

pairs = []
for _ in range(3):
    f, m = volume(), volume()
    pairs.append((f, m, f > 0.6, m > 0.6))
source = data_lib.PairSource.from_arrays(pairs)
batch = next(iter(data_lib.make_dataset(source, cfg, 1, batch_size=2, training=True, seed=0)))

single = train.Trainer(cfg, 1, source, source, root + "/single", verbose=0)
swapped = train.Trainer(cfg, 1, source, None, root + "/swapped", verbose=0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
dist = train.Trainer(cfg, 1, source, source, root + "/dist", verbose=0, strategy=strategy)
control = None
if case == "synced":  # control, same process and batch: trainable BatchNorm with per-replica statistics
    blocks._distributed = lambda: False
    control = train.Trainer(cfg, 1, source, None, root + "/unsynced", verbose=0, strategy=strategy)
before = networks.model_state(single.model)
for t in (dist, swapped, control):
    if t is not None:
        networks.load_model_state(t.model, before)
bn = lambda m: [l.synchronized for l in m.layers if isinstance(l, keras.layers.BatchNormalization)]
out = {"replicas": strategy.num_replicas_in_sync, "sync_single": bn(single.model), "sync_dist": bn(dist.model)}

if case == "frozen":
    # 3 validation pairs on 2 replicas: the last global batch is padded with a weight-0 pair
    out["val_single"], out["val_dist"] = single.validate(0), dist.validate(0)
    full = dist.stage_cfg
    dist.stage_cfg = dataclasses.replace(full, batch_size=3)
    try:
        dist.build_steps()
        out["odd_batch_error"] = None
    except SpirsInputError as exc:
        out["odd_batch_error"] = str(exc)
    dist.stage_cfg = full

single.build_steps()
swapped.build_steps()
dist.build_steps()
loss_single = single.train_step(batch)
swapped.train_step({k: tf.reverse(v, [0]) for k, v in batch.items()})  # same pairs, other order
per_replica = next(iter(distribute.distribute_dataset(strategy, tf.data.Dataset.from_tensors(batch))))
loss_dist = dist.train_step(per_replica)
out["loss"] = {k: [float(loss_single[k]), float(loss_dist[k])] for k in loss_single}
a, b, c = (networks.model_state(t.model) for t in (single, dist, swapped))
trainable = {v.path for v in single.model.trainable_variables}
out["vars"] = {k: {"update": float(np.abs(a[k] - before[k]).max()), "error": float(np.abs(b[k] - a[k]).max()),
                   "noise": float(np.abs(c[k] - a[k]).max()), "trainable": k in trainable} for k in before}
if control is not None:
    control.train_step(per_replica)
    d = networks.model_state(control.model)
    out["control"] = {"sync_dist": bn(control.model),
                      "vars": {k: {"update": out["vars"][k]["update"], "error": float(np.abs(d[k] - a[k]).max()),
                                   "noise": out["vars"][k]["noise"]} for k in before}}
print("RESULT " + json.dumps(out))
"""


def _run_step_case(case: str, grid: int, tmp_path) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT, case, str(grid), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _assert_same_update(result: dict) -> None:
    assert result["replicas"] == 2
    for k, (single, dist) in result["loss"].items():
        assert dist == pytest.approx(single, rel=1e-5, abs=1e-6), k
    bad = {k: v for k, v in result["vars"].items() if not _within(v)}
    assert not bad, bad
    ratios = [v["error"] / v["update"] for v in result["vars"].values() if v["update"] > 0]
    assert np.median(ratios) < RTOL, np.median(ratios)
    # the step really updated: every encoder, P1 and P2 weight moves (the affine head and the
    # deformable decoder sit behind zero-initialised output kernels, so some of their weights
    # only see weight decay in the first step)
    still = [k for k, v in result["vars"].items()
             if v["trainable"] and v["update"] == 0 and k.split("_", 1)[0] in ("enc", "seg", "fuse")]
    assert not still, still


@pytest.mark.slow
def test_two_replicas_equal_one_replica_frozen_batchnorm(tmp_path):
    """Stage-2-like: BatchNorm frozen (inference mode); isolated updates with three optimisers."""
    result = _run_step_case("frozen", 32, tmp_path)
    _assert_same_update(result)
    assert not any(result["sync_dist"])  # frozen BatchNorm computes no batch moments
    assert not any(v["update"] for k, v in result["vars"].items() if "moving_" in k)
    # validation over 3 pairs: 1 pair per batch alone vs 2 per batch on 2 replicas (last one padded)
    val_single, val_dist = result["val_single"], result["val_dist"]
    assert set(val_single) == set(val_dist) and "val_registration" in val_single
    for k in val_single:
        assert val_dist[k] == pytest.approx(val_single[k], rel=1e-5, abs=1e-6), k
    assert "multiple of the 2 replicas" in result["odd_batch_error"]


@pytest.mark.slow
def test_two_replicas_equal_one_replica_synchronized_batchnorm(tmp_path):
    """Stage-1-like: trainable BatchNorm, synchronized across replicas (global-batch moments); the
    moving statistics are compared too. Control: per-replica statistics give a different update."""
    result = _run_step_case("synced", 64, tmp_path)
    assert all(result["sync_dist"]) and not any(result["sync_single"])
    _assert_same_update(result)
    assert all(v["update"] > 0 for k, v in result["vars"].items() if "moving_" in k)

    control = result["control"]  # run in the same process, on the same batch (one model build less)
    assert not any(control["sync_dist"])
    violations = [k for k, v in control["vars"].items() if not _within(v)]
    # per-replica statistics break the bound for most weights: the check above can tell
    assert len(violations) > 0.5 * len(control["vars"]), len(violations)


# --------------------------------------------------------------------------------- strategy choice
def test_make_strategy_checks_its_inputs(monkeypatch):
    from spirs_tf.distribute import make_strategy

    assert make_strategy("none") is None
    with pytest.raises(SpirsInputError, match="unknown distribute strategy 'ring'"):
        make_strategy("ring")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(SpirsInputError, match="needs the TF_CONFIG environment variable"):
        make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(SpirsInputError, match="TF_CONFIG is not valid JSON"):
        make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 2}}))
    with pytest.raises(SpirsInputError, match="is not a member of its cluster"):
        make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"task": {"type": "worker", "index": 0}}))
    with pytest.raises(SpirsInputError, match="needs cluster.worker"):
        make_strategy("multi_worker")
    monkeypatch.setenv("SPIRS_LOGICAL_CPUS", "two")
    with pytest.raises(SpirsInputError, match="SPIRS_LOGICAL_CPUS must be a positive integer"):
        make_strategy("mirrored")


def test_cli_rejects_multi_worker_without_tf_config(tmp_path):
    manifest = make_cohort(str(tmp_path / "cohort"), n_patients=2, splits=("train",))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    proc = subprocess.run([sys.executable, "-m", "spirs_tf.cli", "train", "--stage", "1", "--config", "test",
                           "--manifest", manifest, "--out", str(tmp_path / "run"), "--distribute", "multi_worker"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "TF_CONFIG" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------ end to end
def _train_cmd(manifest, out, *extra):
    return [sys.executable, "-m", "spirs_tf.cli", "train", "--stage", "1", "--config", "test", "--manifest",
            manifest, "--out", out, "--epochs", "1", "--quiet", "--set", "train.stages.0.steps_per_epoch=1",
            "--set", "data.grid_size=64", "--set", "data.spacing_mm=3", *extra]


def _checkpoint(run):
    from spirs_tf.checkpoints import load_checkpoint

    return load_checkpoint(os.path.join(run, "stage1", "checkpoints", "latest.npz"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(str(tmp_path_factory.mktemp("cohort")), n_patients=3)


@pytest.mark.slow
def test_spirs_train_mirrored_end_to_end(cohort, tmp_path):
    """``SPIRS_LOGICAL_CPUS=2 spirs train --distribute mirrored``: runs, validates, checkpoints."""
    env = dict(os.environ, SPIRS_LOGICAL_CPUS="2")
    run = str(tmp_path / "run")
    proc = subprocess.run(_train_cmd(cohort, run, "--distribute", "mirrored"), capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "mirrored training on 2 replica(s)" in proc.stdout
    state, _, meta = _checkpoint(run)
    assert meta["epoch"] == 1 and all(np.all(np.isfinite(v)) for v in state.values())
    history = meta["history"][0]
    assert np.isfinite(history["total"]) and np.isfinite(history["val_registration"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_localhost_equal_one_process(cohort, tmp_path):
    """MultiWorkerMirroredStrategy: two ``spirs train`` processes on loopback ports, one step of a global
    batch of 2; both workers end with identical weights, equal to one process on the whole batch
    (dropout off; absolute tolerance 1e-5 on every weight, updates are up to ~1e-2)."""
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if k != "SPIRS_LOGICAL_CPUS"}
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen(_train_cmd(cohort, str(tmp_path / f"w{i}"), "--distribute", "multi_worker",
                                                 "--set", "model.affine_dropout=0"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.time() + 900
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.time())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
        assert "multi_worker training on 2 replica(s)" in out
    single = subprocess.run(_train_cmd(cohort, str(tmp_path / "single"), "--set", "model.affine_dropout=0"),
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-4000:]
    (w0, _, m0), (w1, _, _), (ws, _, ms) = (_checkpoint(str(tmp_path / d)) for d in ("w0", "w1", "single"))
    assert set(w0) == set(ws)
    for k in w0:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
        np.testing.assert_allclose(w0[k], ws[k], rtol=0, atol=1e-5, err_msg=k)
    assert m0["history"][0]["total"] == pytest.approx(ms["history"][0]["total"], rel=1e-5)
