"""Keras' JAX backend against TensorFlow: the same optimiser updates, training steps, checkpoints and predictions.

This process runs Keras on TensorFlow; every JAX part runs in a subprocess with ``KERAS_BACKEND=jax``
(a Keras process has one backend), reading its inputs from and writing its results to ``.npz`` files in
``tmp_path``. Skipped when JAX is not installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def run_jax(code: str, *args, timeout: int = 600) -> dict:
    """Run ``code`` (``sys.argv[1:]`` = ``args``) under ``KERAS_BACKEND=jax``; its last ``RESULT {json}`` line."""
    path = os.pathsep.join([ROOT, TESTS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------- optimiser
SGDW_SCRIPT = r"""
import json, sys
import jax, numpy as np
from spirs_tf._compat import BACKEND, keras
from spirs_tf import optim
from spirs_tf.config import get_config

assert BACKEND == "jax"
z = np.load(sys.argv[1])
v = [keras.Variable(z["kernel"], name="kernel"), keras.Variable(z["bias"], name="bias")]
opt = optim.make_optimizer(get_config("test").optim.registration, 3, "registration")
opt.build(v)
step = jax.jit(opt.stateless_apply)
tv, ov = [x.value for x in v], [x.value for x in opt.variables]
for k in range(4):
    tv, ov = step(ov, [z[f"g{k}_kernel"], z[f"g{k}_bias"]], tv)
for x, value in zip(v, tv):
    x.assign(value)
for x, value in zip(opt.variables, ov):
    x.assign(value)
np.savez(sys.argv[2], kernel=np.asarray(v[0].value), bias=np.asarray(v[1].value),
         **{"optim/" + k: a for k, a in optim.optimizer_state(opt).items()})

# what needs TensorFlow is refused in one line
from spirs_tf.distribute import make_strategy
from spirs_tf.errors import SpirsInputError
from spirs_tf.export import export_saved_model, load_saved_model_predictor
refused = []
for call in (lambda: export_saved_model(None, sys.argv[2] + ".saved"), lambda: load_saved_model_predictor(sys.argv[1]),
             lambda: make_strategy("mirrored")):
    try:
        call()
        refused.append("")
    except SpirsInputError as exc:
        refused.append(str(exc))

# which inputs reach which output differentiably (TensorFlow's None gradients)
from spirs_tf.jax_steps import reached_inputs
import jax.numpy as jnp
noise = lambda: jax.random.uniform(jax.random.fold_in(jax.random.key(0), 1), (3,))  # a PRNG key inside (dropout)
reached = reached_inputs(lambda p: {"a": jnp.sum(jnp.tanh(p[0]) * noise()) + jnp.sum(jax.lax.stop_gradient(p[2])),
                                    "b": jnp.sum((p[1] > 0) * 1.0) + 0.0 * jnp.sum(p[2])},
                         [jnp.ones(3), jnp.ones(2), jnp.ones(3)])
print("RESULT " + json.dumps({"refused": refused, "reached": {k: sorted(v) for k, v in reached.items()}}))
"""


def test_sgdw_stateless_apply_under_jax_equals_apply_under_tensorflow(tmp_path, rng):
    """Four SGDW steps (scheduled lr and decoupled decay, momentum): JAX's ``stateless_apply`` in a jitted
    function gives TensorFlow's ``apply``'s weights and name-keyed optimiser state. Also in that process:
    what needs TensorFlow is refused in one line; :func:`spirs_tf.jax_steps.reached_inputs`."""
    from spirs_tf import optim
    from spirs_tf._compat import keras
    from spirs_tf.config import get_config

    arrays = {"kernel": rng.normal(size=(2, 3)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32)}
    for k in range(4):
        arrays[f"g{k}_kernel"] = rng.normal(size=(2, 3)).astype(np.float32)
        arrays[f"g{k}_bias"] = rng.normal(size=3).astype(np.float32)
    np.savez(tmp_path / "in.npz", **arrays)
    result = run_jax(SGDW_SCRIPT, tmp_path / "in.npz", tmp_path / "out.npz")
    for line in result["refused"]:  # SavedModel export and load, tf.distribute
        assert "TensorFlow" in line and "jax" in line and "\n" not in line, line
    assert result["reached"] == {"a": [0], "b": [2]}  # stop_gradient and comparisons cut, 0·x does not

    v = [keras.Variable(arrays["kernel"], name="kernel"), keras.Variable(arrays["bias"], name="bias")]
    opt = optim.make_optimizer(get_config("test").optim.registration, 3, "registration")
    opt.build(v)
    for k in range(4):
        opt.apply([arrays[f"g{k}_kernel"], arrays[f"g{k}_bias"]], v)
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["kernel"], v[0].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["bias"], v[1].numpy(), rtol=1e-6, atol=1e-7)
    state = optim.optimizer_state(opt)
    assert sorted(k[len("optim/"):] for k in got.files if k.startswith("optim/")) == sorted(state)
    for k, value in state.items():
        np.testing.assert_allclose(got[f"optim/{k}"], value, rtol=1e-6, atol=1e-7)
    assert int(state["iterations"]) == 4


# -------------------------------------------------------------------------------------- training step
STEP_SCRIPT = r"""
import json, sys
import numpy as np
from spirs_tf import config, networks, optim
from spirs_tf.checkpoints import save_checkpoint
from spirs_tf.data import PairSource
from spirs_tf.train import Trainer

EVALUATED = ("isolated", "truth")
tmp = sys.argv[1]
report = {"eval": {}}
for mode, (stage, overrides) in json.load(open(f"{tmp}/modes.json")).items():
    cfg = config.apply_overrides(config.get_config("test"), overrides + ["model.affine_dropout=0"])
    batch = dict(np.load(f"{tmp}/batch_{mode}.npz"))
    source = PairSource.from_arrays([(batch["fixed_image"][0, ..., 0],) * 2 + (batch["fixed_mask"][0, ..., 0],) * 2])
    trainer = Trainer(cfg, stage, source, None, f"{tmp}/jax_{mode}", verbose=0)
    networks.load_model_state(trainer.model, dict(np.load(f"{tmp}/init_{mode}.npz")))
    if mode in EVALUATED:  # the validation numbers of the initial weights
        report["eval"][mode] = {k: float(v) for k, v in trainer.eval_step(batch).items()}
    scalars = trainer.train_step(batch)
    report[mode] = trainer._steps.unreached_variables()
    state = {f"model/{k}": v for k, v in networks.model_state(trainer.model).items()}
    for name, opt in trainer.optimizers.items():
        state.update({f"optim/{name}/{k}": v for k, v in optim.optimizer_state(opt).items()})
    state.update({f"loss/{k}": np.asarray(v) for k, v in scalars.items()})
    np.savez(f"{tmp}/jax_{mode}.npz", **state)
    save_checkpoint(trainer.paths.latest, networks.model_state(trainer.model),
                    {k: optim.optimizer_state(o) for k, o in trainer.optimizers.items()},
                    {"stage": stage, "levels": trainer.levels, "epoch": 1, "best": 1.0, "history": []})

# the jitted JAX predictor from the checkpoint just written (joint, stage 2: 16^3 inputs)
from spirs_tf import inference
predictor = inference.load_predictor(f"{tmp}/jax_joint")
z = np.load(f"{tmp}/predict_in.npz")
out = predictor.predict(z["new"], z["prior"], z["mask"])
p2 = predictor.p2_fn(z["new"], out["prior_warped"], out["prior_mask_warped"])
np.savez(f"{tmp}/predict_out.npz", p2_again=p2, **out)
print("RESULT " + json.dumps(report))
"""


#: mode → (stage, config overrides) of the step comparisons: ``isolated`` at stage 1 (BatchNorm training),
#: ``joint`` at stage 2 (BatchNorm frozen), ``truth`` = isolated at stage 2 with P2 trained on the prior
#: placed by the true affine through a residual fusion block (``train.p2_prior``, ``model.p2_residual``)
MODES = {"isolated": (1, ["loss.optimisation=isolated"]), "joint": (2, ["loss.optimisation=joint"]),
         "truth": (2, ["loss.optimisation=isolated", "train.p2_prior=truth", "model.p2_residual=true"])}


def _tf_trainer(mode: str, batch: dict, run_dir):
    from spirs_tf import config
    from spirs_tf.data import PairSource
    from spirs_tf.train import Trainer

    stage, overrides = MODES[mode]
    cfg = config.apply_overrides(config.get_config("test"), overrides + ["model.affine_dropout=0"])
    source = PairSource.from_arrays([(batch["fixed_image"][0, ..., 0],) * 2 + (batch["fixed_mask"][0, ..., 0],) * 2])
    return Trainer(cfg, stage, source, None, str(run_dir), verbose=0)


def _state(trainer) -> dict:
    from spirs_tf import networks, optim

    state = {f"model/{k}": v for k, v in networks.model_state(trainer.model).items()}
    for name, opt in trainer.optimizers.items():
        state.update({f"optim/{name}/{k}": v for k, v in optim.optimizer_state(opt).items()})
    return state


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    """One TensorFlow and one JAX training step from the same weights and batch in each of :data:`MODES`;
    the JAX trainers' checkpoints, and the JAX predictor's outputs from the joint one."""
    from spirs_tf import data, networks
    from spirs_tf._compat import tf
    from test_data import blob_pair

    tmp = tmp_path_factory.mktemp("jax_step")
    source = data.PairSource.from_arrays([blob_pair(s) for s in range(3)])
    results = {"eval": {}}
    with open(tmp / "modes.json", "w") as f:
        json.dump(MODES, f)
    for mode, (stage, _) in MODES.items():
        trainer = _tf_trainer(mode, {"fixed_image": np.zeros((1, 32, 32, 32, 1), np.float32),
                                     "fixed_mask": np.zeros((1, 32, 32, 32, 1), np.float32)}, tmp / f"tf_{mode}")
        batch = next(iter(data.numpy_batches(source, trainer.cfg, trainer.levels, trainer.stage_cfg.batch_size,
                                             True, seed=stage)))
        np.savez(tmp / f"batch_{mode}.npz", **batch)
        if mode == "joint":  # inputs for the predictors (16³)
            np.savez(tmp / "predict_in.npz", new=batch["fixed_image"], prior=batch["moving_image"],
                     mask=batch["moving_mask"])
        init = networks.model_state(trainer.model)
        np.savez(tmp / f"init_{mode}.npz", **init)
        if mode in ("isolated", "truth"):
            results["eval"][mode] = {k: float(v) for k, v in trainer.eval_step(
                {k: tf.constant(v) for k, v in batch.items()}).items()}
        scalars = trainer.train_step({k: tf.constant(v) for k, v in batch.items()})
        results[mode] = {"init": init, "tf": _state(trainer), "batch": batch,
                         "tf_loss": {k: float(v) for k, v in scalars.items()}}
    unreached = run_jax(STEP_SCRIPT, tmp)
    results["eval"] = (results["eval"], unreached.pop("eval"))
    for mode in MODES:
        got = dict(np.load(tmp / f"jax_{mode}.npz"))
        results[mode]["jax_loss"] = {k[len("loss/"):]: float(v) for k, v in got.items() if k.startswith("loss/")}
        results[mode]["jax"] = {k: v for k, v in got.items() if not k.startswith("loss/")}
        results[mode]["unreached"] = unreached[mode]
        results[mode]["jax_run"] = tmp / f"jax_{mode}"
    results["predict"] = (dict(np.load(tmp / "predict_in.npz")), dict(np.load(tmp / "predict_out.npz")))
    return results


@pytest.mark.parametrize("mode", list(MODES))
def test_jax_training_step_equals_tensorflow_step(step_results, mode):
    """Same weights and batch: the same loss terms, and the same updated weights, BatchNorm statistics and
    optimiser slots up to float rounding (|JAX − TF| ≤ 1e-3 of each tensor's update + 1e-7)."""
    r = step_results[mode]
    assert sorted(r["jax_loss"]) == sorted(r["tf_loss"])
    for k, v in r["tf_loss"].items():
        assert r["jax_loss"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert sorted(r["jax"]) == sorted(r["tf"])
    assert not any(r["unreached"].values()), r["unreached"]  # every variable gets its loss's gradient
    updates = {}
    for k, want in r["tf"].items():
        before = r["init"].get(k[len("model/"):], np.zeros_like(want)) if k.startswith("model/") else 0 * want
        updates[k] = float(np.abs(want.astype(np.float64) - before).max())
        error = float(np.abs(r["jax"][k].astype(np.float64) - want).max())
        assert error <= 1e-3 * updates[k] + 1e-7, (k, error, updates[k])
    optimised = {k.split("/momentum/", 1)[1] for k in r["tf"] if "/momentum/" in k}
    assert sum(updates[f"model/{path}"] > 0 for path in optimised) > len(optimised) // 2  # the step did move
    stage = MODES[mode][0]
    means = {k: v for k, v in r["tf"].items() if k.endswith("moving_mean")}
    changed = [k for k, v in means.items() if not np.array_equal(v, r["init"][k[len("model/"):]])]
    assert (len(changed) > 0) == (stage == 1)  # BatchNorm trains in stage 1, frozen from stage 2


@pytest.mark.parametrize("mode", list(MODES))
def test_jax_checkpoint_resumes_under_tensorflow(step_results, mode):
    """The JAX trainer's ``latest.npz`` resumes a TensorFlow trainer: every model variable and optimiser
    slot (name-keyed) is the JAX one, and the epoch count carries over."""
    r = step_results[mode]
    trainer = _tf_trainer(mode, r["batch"], r["jax_run"])
    assert trainer.epoch == 1
    state = _state(trainer)
    assert sorted(state) == sorted(r["jax"])
    for k, v in state.items():
        np.testing.assert_array_equal(v, r["jax"][k], err_msg=k)


def test_jax_checkpoint_predicts_the_same_under_tensorflow(step_results):
    """The JAX trainer's checkpoint, loaded by the TensorFlow predictor, gives the jitted JAX predictor's
    outputs (and P2 from a replaced warped prior) to float rounding, and the same masks (Dice ≥ 0.99)."""
    from spirs_tf import inference

    inputs, got = step_results["predict"]
    predictor = inference.load_predictor(step_results["joint"]["jax_run"])
    assert predictor.levels == 2 and predictor.size == 16
    want = predictor.predict(inputs["new"], inputs["prior"], inputs["mask"])
    for k in inference.OUTPUT_NAMES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)
    for k in ("p1_prob", "p2_prob", "prior_mask_warped"):
        # the barely trained heads stay below 0.5: masks at the 90th percentile of TensorFlow's map
        cut = np.quantile(want[k], 0.9)
        a, b = got[k] > cut, want[k] > cut
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, k
    np.testing.assert_allclose(got["p2_again"], got["p2_prob"], atol=1e-5)


def test_jax_validation_numbers_equal_tensorflow(step_results):
    """The logged validation numbers (loss terms with exact LNCC, unmasked float64-box-sum LNCC, Dice) of the
    same weights and batch agree to float32 rounding: the JAX eval step switches 64-bit types on."""
    wants, gots = step_results["eval"]
    assert sorted(gots) == sorted(wants) == ["isolated", "truth"]
    for mode, want in wants.items():  # "truth": P2 and its loss on the prior placed by the true affine
        got = gots[mode]
        assert sorted(got) == sorted(want) and "lncc_identity" in want
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-6), (mode, k)


# ------------------------------------------------------------------------------------------- segmenter
SEGMENTER_SCRIPT = r"""
import json, sys
import numpy as np
from spirs_tf._compat import BACKEND
from spirs_tf import config, fine_seg
from spirs_tf.networks import load_model_state
assert BACKEND == "jax", BACKEND
data = np.load(sys.argv[1])
cfg = config.get_config("test", ["model.p2_residual=true", "model.p2_residual_clip=2", "model.p2_gate_size=3"])
model = fine_seg.build_segmenter(cfg, 1)
load_model_state(model, {k[len("w/"):]: data[k] for k in data.files if k.startswith("w/")})
out = model({k: data["x/" + k] for k in fine_seg.SEGMENTER_INPUTS}, training=False)
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in out.items()})
print("RESULT " + json.dumps({"ok": True}))
"""


def test_gated_segmenter_on_a_soft_prior_is_the_same_under_jax(tmp_path, rng):
    """The fine-grid segmenter with a residual, clipped, prior-gated P2 (the shipped design) gives the same P1
    and P2 logits under JAX as under TensorFlow, for the same weights and a soft prior mask."""
    from spirs_tf import config, fine_seg
    from spirs_tf.networks import model_state

    cfg = config.get_config("test", ["model.p2_residual=true", "model.p2_residual_clip=2", "model.p2_gate_size=3"])
    model = fine_seg.build_segmenter(cfg, 1)
    for v in model.trainable_variables:  # P2's head starts at 0: move every weight off its start
        v.assign(v.value + 0.05 * rng.standard_normal(v.shape).astype("float32"))
    x = {k: rng.random((1, 32, 32, 32, 1)).astype("float32") for k in fine_seg.SEGMENTER_INPUTS}
    x["warped_mask"] = np.zeros_like(x["warped_mask"])
    x["warped_mask"][0, 9:11, 20, 6, 0] = [0.3, 0.05]  # a faint soft blob opens the gate
    want = {k: np.asarray(v) for k, v in model(x, training=False).items()}
    np.savez(tmp_path / "in.npz", **{f"w/{k}": v for k, v in model_state(model).items()},
             **{f"x/{k}": v for k, v in x.items()})
    run_jax(SEGMENTER_SCRIPT, tmp_path / "in.npz", tmp_path / "out.npz")
    got = np.load(tmp_path / "out.npz")
    assert np.abs(want["p2_logits"] - np.clip(want["p1_logits"], -2, 2)).max() > 1e-3  # P2 is not P1 here
    for k in ("p1_logits", "p2_logits"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)
