"""Keras' JAX backend against TensorFlow: the same optimiser updates, predictions and training steps.

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
print("RESULT " + json.dumps({"ok": True}))
"""


def test_sgdw_stateless_apply_under_jax_equals_apply_under_tensorflow(tmp_path, rng):
    """Four SGDW steps (scheduled lr and decoupled decay, momentum): JAX's ``stateless_apply`` in a jitted
    function gives TensorFlow's ``apply``'s weights and name-keyed optimiser state."""
    from spirs_tf import optim
    from spirs_tf._compat import keras
    from spirs_tf.config import get_config

    arrays = {"kernel": rng.normal(size=(2, 3)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32)}
    for k in range(4):
        arrays[f"g{k}_kernel"] = rng.normal(size=(2, 3)).astype(np.float32)
        arrays[f"g{k}_bias"] = rng.normal(size=3).astype(np.float32)
    np.savez(tmp_path / "in.npz", **arrays)
    run_jax(SGDW_SCRIPT, tmp_path / "in.npz", tmp_path / "out.npz")

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


# ------------------------------------------------------------------------------------------- predictor
PREDICT_SCRIPT = r"""
import json, sys
import numpy as np
from spirs_tf import inference
from spirs_tf.errors import SpirsInputError
from spirs_tf.export import export_saved_model

predictor = inference.load_predictor(sys.argv[1])
z = np.load(sys.argv[2])
out = predictor.predict(z["new"], z["prior"], z["mask"])
p2 = predictor.p2_fn(z["new"], out["prior_warped"], out["prior_mask_warped"])
np.savez(sys.argv[3], p2_again=p2, **out)
try:
    export_saved_model(predictor, sys.argv[3] + ".savedmodel")
    refused = ""
except SpirsInputError as exc:
    refused = str(exc)
print("RESULT " + json.dumps({"refused": refused}))
"""


@pytest.fixture(scope="module")
def perturbed_run(tmp_path_factory):
    """A test-config run (stage 3, 32³) with perturbed weights, so that every output is non-trivial."""
    from cohort import make_fake_run

    return make_fake_run(tmp_path_factory.mktemp("jax_run"), perturb=0.05, seed=3)


def _inputs(rng, n: int = 32) -> dict:
    from scipy import ndimage

    new = ndimage.gaussian_filter(rng.random((2, n, n, n)), (0, 2, 2, 2)).astype(np.float32)
    prior = np.roll(new, 1, axis=1)
    mask = (prior > np.quantile(prior, 0.9)).astype(np.float32)
    return {k: v[..., None] for k, v in {"new": new, "prior": prior, "mask": mask}.items()}


def test_predictor_under_jax_gives_tensorflow_outputs(perturbed_run, tmp_path, rng):
    """The same checkpoint and batch: the jitted JAX predictor's outputs (and P2 from a replaced warped prior)
    equal TensorFlow's to float rounding, with the same masks (Dice ≥ 0.99); a SavedModel export is refused
    in one line."""
    from spirs_tf import inference

    inputs = _inputs(rng)
    np.savez(tmp_path / "in.npz", **inputs)
    result = run_jax(PREDICT_SCRIPT, perturbed_run, tmp_path / "in.npz", tmp_path / "out.npz")
    assert "needs TensorFlow" in result["refused"] and "\n" not in result["refused"]

    predictor = inference.load_predictor(perturbed_run)
    want = predictor.predict(inputs["new"], inputs["prior"], inputs["mask"])
    got = np.load(tmp_path / "out.npz")
    for k in inference.OUTPUT_NAMES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)
    for k in ("p1_prob", "p2_prob", "prior_mask_warped"):
        # the untrained heads stay below 0.5: masks at the 90th percentile of TensorFlow's map
        cut = np.quantile(want[k], 0.9)
        a, b = got[k] > cut, want[k] > cut
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, k
    np.testing.assert_allclose(got["p2_again"], got["p2_prob"], atol=1e-5)
