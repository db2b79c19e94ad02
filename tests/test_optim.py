"""Tests of spirs_tf.optim: hand-computed SGDW updates, schedule values, state round trips."""
from __future__ import annotations

import math

import numpy as np
import pytest

from spirs_tf._compat import keras, ops, tf
from spirs_tf.config import OptimizerConfig
from spirs_tf.errors import SpirsInputError
from spirs_tf.optim import SGDW, CosineSchedule, load_optimizer_state, make_optimizer, optimizer_state

W0 = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
B0 = np.array([0.25, -1.0], np.float32)
GRADS = [(np.array([[0.1, 0.2], [-0.3, 0.4]], np.float32), np.array([1.0, -0.5], np.float32)),
         (np.array([[-0.2, 0.0], [0.6, 0.1]], np.float32), np.array([0.3, 0.2], np.float32))]


def make_layer(name="enc_conv"):
    layer = keras.layers.Dense(2, name=name)
    layer.build((None, 2))
    layer.kernel.assign(W0)
    layer.bias.assign(B0)
    return layer


def reference(lrs, wds, momentum=0.9, nesterov=False):
    """Hand-written TFA-SGDW: decay (kernel only, not × lr) first, then the momentum step."""
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for (gw, gb), lr, wd in zip(GRADS, lrs, wds):
        w = w - wd * w
        vw = momentum * vw - lr * gw
        vb = momentum * vb - lr * gb
        if nesterov:
            w = w + momentum * vw - lr * gw
            b = b + momentum * vb - lr * gb
        else:
            w, b = w + vw, b + vb
    return w, b


def run_two_steps(opt, layer):
    for gw, gb in GRADS:
        opt.apply([gw, gb], layer.trainable_variables)
    return np.asarray(layer.kernel.numpy()), np.asarray(layer.bias.numpy())


def test_sgdw_two_steps_constant_rates_by_hand():
    layer = make_layer()
    w, b = run_two_steps(SGDW(learning_rate=0.1, weight_decay=0.05, momentum=0.9), layer)
    # spelled out for step 1 of the kernel: (W0 − 0.05·W0) − 0.1·g1
    w_ref, b_ref = reference([0.1, 0.1], [0.05, 0.05])
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)
    np.testing.assert_allclose(b, b_ref, rtol=1e-6)   # bias: no decay at all
    np.testing.assert_allclose(b, B0 - 0.1 * GRADS[0][1] + (0.9 * -0.1 * GRADS[0][1] - 0.1 * GRADS[1][1]),
                               rtol=1e-6)


def test_sgdw_nesterov_by_hand():
    layer = make_layer()
    w, b = run_two_steps(SGDW(learning_rate=0.1, weight_decay=0.05, momentum=0.9, nesterov=True), layer)
    w_ref, b_ref = reference([0.1, 0.1], [0.05, 0.05], nesterov=True)
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)
    np.testing.assert_allclose(b, b_ref, rtol=1e-6)


def test_sgdw_decay_is_not_scaled_by_learning_rate():
    layer = make_layer()
    opt = SGDW(learning_rate=0.0, weight_decay=0.1, momentum=0.9)
    opt.apply([np.ones((2, 2), np.float32), np.ones(2, np.float32)], layer.trainable_variables)
    np.testing.assert_allclose(layer.kernel.numpy(), 0.9 * W0, rtol=1e-6)
    np.testing.assert_array_equal(layer.bias.numpy(), B0)


def test_sgdw_with_schedules_uses_values_at_iterations_before_update():
    lr = CosineSchedule(0.2, 0.02, steps_per_epoch=2, cycle_epochs=1)   # T = 2 steps
    wd = CosineSchedule(0.1, 0.01, steps_per_epoch=2, cycle_epochs=1)
    layer = make_layer()
    w, b = run_two_steps(SGDW(learning_rate=lr, weight_decay=wd), layer)
    # step 0: η_max; step 1 = T/2: (η_max + η_min)/2
    w_ref, b_ref = reference([0.2, 0.11], [0.1, 0.055])
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)
    np.testing.assert_allclose(b, b_ref, rtol=1e-6)


def test_sgdw_exclusion_patterns():
    opt = SGDW()
    paths = {"enc_conv1/kernel": True, "aff_dense/kernel": True, "def_up_conv/kernel": True,
             "aff_dense/bias": False, "enc_bn1/beta": False, "seg_block_bn/gamma": False,
             "enc_batch_normalization/moving_mean": False, "fuse_bn_3/kernel": False,
             "def_bnorm_free_conv/kernel": True}

    class Fake:
        def __init__(self, path):
            self.path = path

    assert {p: opt.decays(Fake(p)) for p in paths} == paths
    assert SGDW(exclude_from_weight_decay=()).decays(Fake("x/bias"))
    with pytest.raises(ValueError, match="exclude_from_weight_decay"):
        SGDW(exclude_from_weight_decay=["("])
    with pytest.raises(ValueError, match="momentum"):
        SGDW(momentum=1.5)


def test_sgdw_in_tf_function_matches_hand_values():
    expected = reference([0.1, 0.1], [0.05, 0.05])
    layer = make_layer()
    opt = SGDW(learning_rate=0.1, weight_decay=0.05)
    opt.build(layer.trainable_variables)

    @tf.function
    def step(gw, gb):
        opt.apply([gw, gb], layer.trainable_variables)

    for gw, gb in GRADS:
        step(tf.constant(gw), tf.constant(gb))
    np.testing.assert_allclose(layer.kernel.numpy(), expected[0], rtol=1e-6)
    np.testing.assert_allclose(layer.bias.numpy(), expected[1], rtol=1e-6)


DISTRIBUTED_SCRIPT = r"""
import json, sys
import numpy as np
from spirs_tf._compat import keras, tf
from spirs_tf.optim import SGDW
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
w0, b0, grads = json.loads(sys.argv[1])
with strategy.scope():
    layer = keras.layers.Dense(2, name="enc_conv")
    layer.build((None, 2))
    layer.kernel.assign(np.array(w0, np.float32))
    layer.bias.assign(np.array(b0, np.float32))
    opt = SGDW(learning_rate=0.1, weight_decay=0.05)
    opt.build(layer.trainable_variables)

@tf.function
def step(gw, gb):
    # each replica holds half of the global gradient; Keras all-reduces with SUM
    strategy.run(lambda a, b: opt.apply([a / 2, b / 2], layer.trainable_variables), args=(gw, gb))

for gw, gb in grads:
    step(tf.constant(gw, tf.float32), tf.constant(gb, tf.float32))
replicas = [v.numpy().tolist() for v in layer.kernel.value.values]
print("RESULT" + json.dumps({"kernel": replicas, "bias": layer.bias.numpy().tolist()}))
"""


def test_sgdw_under_mirrored_strategy_matches_hand_values():
    """Two logical CPU replicas (needs a fresh process: logical devices are fixed at TF start-up)."""
    import json
    import subprocess
    import sys

    args = json.dumps([W0.tolist(), B0.tolist(), [[g.tolist() for g in pair] for pair in GRADS]])
    proc = subprocess.run([sys.executable, "-c", DISTRIBUTED_SCRIPT, args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    w_ref, b_ref = reference([0.1, 0.1], [0.05, 0.05])
    assert len(result["kernel"]) == 2   # decay applied once per step on each replica, not twice
    for replica_kernel in result["kernel"]:
        np.testing.assert_allclose(replica_kernel, w_ref, rtol=1e-6)
    np.testing.assert_allclose(result["bias"], b_ref, rtol=1e-6)


def test_optimizer_state_round_trip_continues_identically():
    cfg = OptimizerConfig(learning_rate=0.2, learning_rate_min=0.01, weight_decay=0.05,
                          weight_decay_min=0.001, cycle_epochs=2, warmup_epochs=1)
    layer_a = make_layer()
    opt_a = make_optimizer(cfg, steps_per_epoch=2, name="registration")
    opt_a.apply(list(GRADS[0]), layer_a.trainable_variables)
    state = optimizer_state(opt_a)
    assert set(state) == {"iterations", "momentum/enc_conv/kernel", "momentum/enc_conv/bias"}
    assert int(state["iterations"]) == 1 and np.any(state["momentum/enc_conv/kernel"] != 0)

    layer_b = make_layer("enc_conv")            # same paths, new objects
    layer_b.kernel.assign(layer_a.kernel.numpy())
    layer_b.bias.assign(layer_a.bias.numpy())
    opt_b = make_optimizer(cfg, steps_per_epoch=2, name="registration")
    opt_b.build(list(reversed(layer_b.trainable_variables)))   # order does not matter
    load_optimizer_state(opt_b, state)

    opt_a.apply(list(GRADS[1]), layer_a.trainable_variables)
    opt_b.apply(list(reversed(GRADS[1])), list(reversed(layer_b.trainable_variables)))
    np.testing.assert_array_equal(layer_a.kernel.numpy(), layer_b.kernel.numpy())
    np.testing.assert_array_equal(layer_a.bias.numpy(), layer_b.bias.numpy())
    after_a, after_b = optimizer_state(opt_a), optimizer_state(opt_b)
    assert set(after_a) == set(after_b)
    for key in after_a:
        np.testing.assert_array_equal(after_a[key], after_b[key])


def test_load_optimizer_state_rejects_mismatches():
    layer = make_layer()
    opt = SGDW(learning_rate=0.1, weight_decay=0.01)
    opt.build(layer.trainable_variables)
    state = optimizer_state(opt)
    assert "learning_rate" in state   # constant lr lives in a variable
    bad = dict(state)
    bad["momentum/enc_conv/kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(SpirsInputError, match="shape"):
        load_optimizer_state(opt, bad)
    partial = {k: v for k, v in state.items() if k != "momentum/enc_conv/bias"}
    with pytest.raises(SpirsInputError, match="missing"):
        load_optimizer_state(opt, partial)
    load_optimizer_state(opt, partial, allow_missing=True)
    with pytest.raises(SpirsInputError, match="unexpected"):
        load_optimizer_state(opt, {**state, "momentum/other/kernel": np.zeros(2)})
    with pytest.raises(ValueError, match="not built"):
        optimizer_state(SGDW())


def test_restored_state_differs_from_fresh_optimizer():
    """Loading matters: without the saved iterations/momentum the next step is different."""
    layer_a, layer_b = make_layer(), make_layer()
    opt_a, opt_b = SGDW(0.1, 0.05), SGDW(0.1, 0.05)
    opt_a.apply(list(GRADS[0]), layer_a.trainable_variables)
    layer_b.kernel.assign(layer_a.kernel.numpy())
    layer_b.bias.assign(layer_a.bias.numpy())
    opt_b.build(layer_b.trainable_variables)
    opt_a.apply(list(GRADS[1]), layer_a.trainable_variables)
    opt_b.apply(list(GRADS[1]), layer_b.trainable_variables)
    assert not np.allclose(layer_a.kernel.numpy(), layer_b.kernel.numpy())


def test_sgdw_inside_loss_scale_optimizer_and_its_state():
    """Mixed precision: a non-finite step is skipped entirely (no decay either); state includes the scale."""
    layer = make_layer()
    opt = keras.optimizers.LossScaleOptimizer(SGDW(0.1, 0.05), initial_scale=8.0)
    opt.apply([8 * GRADS[0][0], 8 * GRADS[0][1]], layer.trainable_variables)
    w_ref, b_ref = reference([0.1], [0.05])
    np.testing.assert_allclose(layer.kernel.numpy(), w_ref, rtol=1e-6)
    opt.apply([np.full((2, 2), np.inf, np.float32), GRADS[1][1]], layer.trainable_variables)
    np.testing.assert_allclose(layer.kernel.numpy(), w_ref, rtol=1e-6)
    state = optimizer_state(opt)
    assert state["loss_scale/dynamic_scale"] == pytest.approx(4.0)
    assert int(state["iterations"]) == 1
    other = keras.optimizers.LossScaleOptimizer(SGDW(0.1, 0.05), initial_scale=8.0)
    other.build(make_layer().trainable_variables)
    load_optimizer_state(other, state)
    assert float(other.dynamic_scale.numpy()) == 4.0
    np.testing.assert_array_equal(other.inner_optimizer.momentums[0].numpy(),
                                  state["momentum/enc_conv/kernel"])


# ---------------------------------------------------------------------------------------- schedule
def value(schedule, step):
    return float(ops.convert_to_numpy(schedule(step)))


def test_cosine_schedule_key_points():
    s = CosineSchedule(1e-2, 4e-5, steps_per_epoch=10, cycle_epochs=250)
    t = 2500
    assert value(s, 0) == pytest.approx(1e-2, rel=1e-6)
    assert value(s, t // 2) == pytest.approx((1e-2 + 4e-5) / 2, rel=1e-5)
    assert value(s, t // 4) == pytest.approx(4e-5 + 0.5 * (1e-2 - 4e-5) * (1 + math.cos(math.pi / 4)),
                                             rel=1e-5)
    assert value(s, t) == pytest.approx(4e-5, rel=1e-5)
    assert value(s, 10 * t) == pytest.approx(4e-5, rel=1e-5)   # stays at η_min without restarts


def test_cosine_schedule_warmup():
    s = CosineSchedule(0.5, 0.002, steps_per_epoch=4, cycle_epochs=10, warmup_epochs=5)   # W = 20
    assert value(s, 0) == pytest.approx(0.5 / 1000, rel=1e-6)
    assert value(s, 10) == pytest.approx(0.0005 + 0.5 * (0.5 - 0.0005), rel=1e-6)
    assert value(s, 20) == pytest.approx(0.5, rel=1e-6)              # warm-up end = cosine start
    assert value(s, 20 + 20) == pytest.approx((0.5 + 0.002) / 2, rel=1e-5)
    assert value(s, 20 + 40) == pytest.approx(0.002, rel=1e-5)


def test_cosine_schedule_warm_restarts():
    t, top, bottom = 100, 1.0, 0.15
    s = CosineSchedule(top, bottom, steps_per_epoch=10, cycle_epochs=10, warm_restarts=True)
    assert value(s, 0) == pytest.approx(top)
    assert value(s, t - 1) == pytest.approx(bottom + 0.5 * (top - bottom) * (1 + math.cos(math.pi * 0.99)),
                                            rel=1e-5)
    # cycle 1 starts at T, lasts 1.5T, from top/10 to bottom/15
    assert value(s, t) == pytest.approx(top / 10, rel=1e-6)
    assert value(s, t + 75) == pytest.approx((top / 10 + bottom / 15) / 2, rel=1e-5)
    # cycle 2 starts at T + 1.5T = 250, lasts 2.25T, from top/100 to bottom/225
    assert value(s, 249) == pytest.approx(
        bottom / 15 + 0.5 * (top / 10 - bottom / 15) * (1 + math.cos(math.pi * 149 / 150)), rel=1e-5)
    assert value(s, 250) == pytest.approx(top / 100, rel=1e-6)
    assert value(s, 250 + 225) == pytest.approx(top / 1000, rel=1e-6)   # cycle 3 start
    no_growth = CosineSchedule(top, bottom, 10, 10, warm_restarts=True, restart_length_factor=1.0)
    assert value(no_growth, 200) == pytest.approx(top / 100, rel=1e-6)


def test_cosine_schedule_config_round_trip_and_validation():
    s = CosineSchedule(0.1, 0.001, 7, 3, warmup_epochs=2, warm_restarts=True)
    clone = CosineSchedule.from_config(s.get_config())
    for step in (0, 5, 14, 30, 40, 100):
        assert value(clone, step) == value(s, step)
    with pytest.raises(ValueError, match="must be > 0"):
        CosineSchedule(0.1, 0.01, 0, 10)
    with pytest.raises(ValueError, match="min_value <= max_value"):
        CosineSchedule(0.01, 0.1, 10, 10)


def test_make_optimizer_and_sgdw_config_round_trip():
    cfg = OptimizerConfig(learning_rate=0.3, learning_rate_min=0.003, weight_decay=0.02,
                          weight_decay_min=0.0002, momentum=0.8, nesterov=True, cycle_epochs=5,
                          warmup_epochs=1)
    opt = make_optimizer(cfg, steps_per_epoch=3, name="segmentation_p1")
    assert opt.name == "segmentation_p1" and opt.momentum == 0.8 and opt.nesterov
    lr, wd = opt._learning_rate, opt.decoupled_weight_decay
    assert value(lr, 3) == pytest.approx(0.3) and value(wd, 3) == pytest.approx(0.02)
    assert value(lr, 0) == pytest.approx(0.3e-3) and value(wd, 18) == pytest.approx(0.0002)
    clone = SGDW.from_config(opt.get_config())
    assert clone.nesterov and clone.exclude_patterns == opt.exclude_patterns
    for step in (0, 2, 7, 18):
        assert value(clone._learning_rate, step) == value(lr, step)
        assert value(clone.decoupled_weight_decay, step) == value(wd, step)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, SGDW) and restored.momentum == 0.8


def test_global_clipnorm_scales_the_gradient_to_the_norm_before_the_update():
    """``OptimizerConfig.global_clipnorm``: the update uses g · c / max(‖g‖, c) (global norm over all variables)."""
    from spirs_tf import config as config_lib

    cfg = OptimizerConfig(learning_rate=0.1, learning_rate_min=0.1, weight_decay=0.0, weight_decay_min=0.0,
                          momentum=0.0, global_clipnorm=0.5)
    layer = make_layer()
    w0, b0 = np.asarray(layer.kernel.numpy()), np.asarray(layer.bias.numpy())
    opt = make_optimizer(cfg, steps_per_epoch=10, name="clipped")
    opt.build(layer.trainable_variables)
    gw, gb = GRADS[0]
    norm = math.sqrt(float(np.sum(np.square(gw)) + np.sum(np.square(gb))))
    assert norm > 0.5  # the clip is active for this gradient
    opt.apply([gw, gb], layer.trainable_variables)
    np.testing.assert_allclose(layer.kernel.numpy(), w0 - 0.1 * gw * 0.5 / norm, rtol=1e-5)
    np.testing.assert_allclose(layer.bias.numpy(), b0 - 0.1 * gb * 0.5 / norm, rtol=1e-5)
    # a gradient below the norm is left as it is
    layer2 = make_layer()
    opt2 = make_optimizer(OptimizerConfig(**{**cfg.__dict__, "global_clipnorm": 10 * norm}), 10, name="loose")
    opt2.build(layer2.trainable_variables)
    opt2.apply([gw, gb], layer2.trainable_variables)
    np.testing.assert_allclose(layer2.kernel.numpy(), w0 - 0.1 * gw, rtol=1e-5)
    # the config refuses nonsense in one line
    bad = config_lib.get_config("test")
    bad.optim.registration.global_clipnorm = -1.0
    with pytest.raises(SpirsInputError, match="global_clipnorm"):
        bad.validate()
    ok = config_lib.apply_overrides(config_lib.get_config("test"), ["optim.registration.global_clipnorm=2.5"])
    assert ok.validate().optim.registration.global_clipnorm == 2.5
