"""Optimiser and schedules of SPIRS (paper Appendix B, Eq. 11; FACTS section D, decision 7).

* :class:`SGDW` — SGD with momentum and *decoupled* weight decay in the tensorflow-addons sense:
  ``w ← w − wd_t·w`` before the gradient step, **not** multiplied by the learning rate (which is why
  the weight decay has its own schedule). Keras 3's built-in ``weight_decay`` multiplies by the
  learning rate and is therefore not used.
* :class:`CosineSchedule` — Eq. 11 with the authors' optional linear warm-up and warm restarts.
* :func:`make_optimizer` — one SGDW with learning-rate and weight-decay schedules from an
  :class:`spirs_tf.config.OptimizerConfig`.
* :func:`optimizer_state` / :func:`load_optimizer_state` — name-keyed optimiser checkpoints.
"""
from __future__ import annotations

import math
import re

import numpy as np

from spirs_tf._compat import keras, ops
from spirs_tf.errors import SpirsInputError

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule

#: Regular expressions (searched in ``variable.path``, case-insensitive) of variables that are NOT
#: weight-decayed: biases and every normalisation variable. ``bn`` only matches as a whole
#: ``/``- or ``_``-separated token, so a kernel path that merely contains the letters is still decayed.
DEFAULT_EXCLUDE = ("bias", "beta", "gamma", "moving_mean", "moving_variance", "normalization",
                   "batch_norm", r"(?:^|[/_])bn(?:[/_0-9]|$)")

__all__ = ["SGDW", "CosineSchedule", "make_optimizer", "optimizer_state", "load_optimizer_state",
           "DEFAULT_EXCLUDE"]


def _variable_path(variable) -> str:
    return str(getattr(variable, "path", None) or variable.name)


# ---------------------------------------------------------------------------------------- schedule
@keras.saving.register_keras_serializable(package="spirs_tf")
class CosineSchedule(LearningRateSchedule):
    """Cosine decay of Eq. 11 with optional linear warm-up and warm restarts (authors' callback).

    With ``T = steps_per_epoch · cycle_epochs`` and ``W = steps_per_epoch · warmup_epochs``:

    * warm-up, step s < W: linear from ``max_value/1000`` (s = 0) to ``max_value`` (s = W);
    * then, with s' = s − W, ``η = η_min + ½(η_max − η_min)(1 + cos(π·s'/T))``: η_max at s' = 0,
      (η_max + η_min)/2 at s' = T/2, η_min at s' = T;
    * without restarts η stays at ``min_value`` for s' ≥ T;
    * with ``warm_restarts`` cycle k = 0, 1, … starts at ``B_k = T·(f^k − 1)/(f − 1)``
      (f = ``restart_length_factor``, 1.5), lasts ``T·f^k`` and runs from ``max_value/10^k`` to
      ``min_value/15^k`` (the divisors are configurable).

    Where the warm-up ends and the cosine begins is not visible in the authors' script; here the
    cosine starts after the warm-up, so η_max is reached exactly once at s = W.

    Args:
        max_value, min_value: η_max and η_min (learning rate or weight decay).
        steps_per_epoch: optimiser steps per epoch (> 0).
        cycle_epochs: T in epochs (> 0).
        warmup_epochs: warm-up length in epochs (0 = none).
        warm_restarts, restart_length_factor, restart_max_divisor, restart_min_divisor: see above.

    Raises:
        ValueError: on non-positive steps_per_epoch / cycle_epochs, negative warm-up or values,
            min_value > max_value, or a restart factor/divisor below 1.
    """

    def __init__(self, max_value: float, min_value: float, steps_per_epoch: int, cycle_epochs: float,
                 warmup_epochs: float = 0, warm_restarts: bool = False,
                 restart_length_factor: float = 1.5, restart_max_divisor: float = 10.0,
                 restart_min_divisor: float = 15.0):
        if steps_per_epoch <= 0 or cycle_epochs <= 0:
            raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and cycle_epochs ({cycle_epochs}) "
                             "must be > 0")
        if warmup_epochs < 0 or min_value < 0 or max_value < min_value:
            raise ValueError(f"need warmup_epochs >= 0 and 0 <= min_value <= max_value, got "
                             f"warmup_epochs={warmup_epochs}, min={min_value}, max={max_value}")
        if min(restart_length_factor, restart_max_divisor, restart_min_divisor) < 1:
            raise ValueError("restart_length_factor and the restart divisors must be >= 1")
        self.max_value = float(max_value)
        self.min_value = float(min_value)
        self.steps_per_epoch = int(steps_per_epoch)
        self.cycle_epochs = float(cycle_epochs)
        self.warmup_epochs = float(warmup_epochs)
        self.warm_restarts = bool(warm_restarts)
        self.restart_length_factor = float(restart_length_factor)
        self.restart_max_divisor = float(restart_max_divisor)
        self.restart_min_divisor = float(restart_min_divisor)

    @property
    def cycle_steps(self) -> float:
        return self.steps_per_epoch * self.cycle_epochs

    @property
    def warmup_steps(self) -> float:
        return self.steps_per_epoch * self.warmup_epochs

    def _cycle(self, s):
        """(cycle index k as float, start B_k, length T_k) of step ``s`` (float, after warm-up)."""
        t, f = self.cycle_steps, self.restart_length_factor
        if f == 1.0:
            k = ops.floor(s / t)
            return k, k * t, ops.ones_like(s) * t
        k = ops.floor(ops.log(1.0 + s * (f - 1.0) / t) / math.log(f))

        def start(k_):
            return t * (ops.power(f, k_) - 1.0) / (f - 1.0)

        # Correct float rounding of the logarithm at cycle boundaries.
        k = ops.where(s < start(k), k - 1.0, k)
        k = ops.where(s >= start(k + 1.0), k + 1.0, k)
        return k, start(k), t * ops.power(f, k)

    def __call__(self, step):
        s = ops.cast(step, "float32")
        w = self.warmup_steps
        after = ops.maximum(s - w, 0.0)
        if self.warm_restarts:
            k, begin, length = self._cycle(after)
            top = self.max_value / ops.power(self.restart_max_divisor, k)
            bottom = self.min_value / ops.power(self.restart_min_divisor, k)
            phase = (after - begin) / length
        else:
            top, bottom = self.max_value, self.min_value
            phase = ops.minimum(after / self.cycle_steps, 1.0)
        value = bottom + 0.5 * (top - bottom) * (1.0 + ops.cos(math.pi * phase))
        if w > 0:
            start = self.max_value / 1000.0
            ramp = start + (self.max_value - start) * s / w
            value = ops.where(s < w, ramp, value)
        return value

    def get_config(self) -> dict:
        return {
            "max_value": self.max_value, "min_value": self.min_value,
            "steps_per_epoch": self.steps_per_epoch, "cycle_epochs": self.cycle_epochs,
            "warmup_epochs": self.warmup_epochs, "warm_restarts": self.warm_restarts,
            "restart_length_factor": self.restart_length_factor,
            "restart_max_divisor": self.restart_max_divisor,
            "restart_min_divisor": self.restart_min_divisor,
        }


# -------------------------------------------------------------------------------------------- SGDW
@keras.saving.register_keras_serializable(package="spirs_tf")
class SGDW(keras.optimizers.Optimizer):
    """SGD with momentum and decoupled weight decay (tensorflow-addons ``SGDW`` semantics).

    For every variable w with gradient g, at step t (``iterations`` before the update)::

        w ← w − wd_t · w                 only if w is decayed (path matches no exclusion pattern)
        v ← momentum · v − lr_t · g
        w ← w + v                        (Nesterov: w ← w + momentum · v − lr_t · g)

    The decay is **not** multiplied by the learning rate and comes before the gradient step, as in
    tensorflow-addons (FACTS D). The gradient was computed at the undecayed w.

    Args:
        learning_rate: float or ``LearningRateSchedule`` (called with ``iterations``).
        weight_decay: float or ``LearningRateSchedule``; 0 disables decay.
        momentum: in [0, 1] (authors 0.9).
        nesterov: Nesterov momentum (authors: off).
        exclude_from_weight_decay: regular expressions searched (case-insensitive) in each variable's
            ``path``; matching variables are not decayed. Default :data:`DEFAULT_EXCLUDE`.
        name: optimiser name (prefix of its variables).
        **kwargs: other ``keras.optimizers.Optimizer`` arguments (clipping, ``loss_scale_factor``).
            ``weight_decay`` here is the decoupled one; Keras' lr-scaled decay is never used.

    Works inside ``tf.function`` and under ``tf.distribute`` (all updates go through
    ``self.assign``/``assign_sub`` inside ``update_step``, which the Keras TF optimiser runs per
    replica variable).

    Raises:
        ValueError: on a momentum outside [0, 1], a negative constant weight decay, or an invalid
            exclusion regular expression.
    """

    def __init__(self, learning_rate=0.01, weight_decay=0.0, momentum: float = 0.9,
                 nesterov: bool = False, exclude_from_weight_decay=DEFAULT_EXCLUDE,
                 name: str = "SGDW", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        momentum = float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if not isinstance(weight_decay, LearningRateSchedule):
            weight_decay = float(weight_decay)
            if weight_decay < 0:
                raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        patterns = tuple(exclude_from_weight_decay or ())
        try:
            self._exclude_regex = re.compile("|".join(f"(?:{p})" for p in patterns),
                                             re.IGNORECASE) if patterns else None
        except re.error as exc:
            raise ValueError(f"invalid exclude_from_weight_decay pattern: {exc}") from None
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.decoupled_weight_decay = weight_decay
        self.exclude_patterns = patterns

    # -- helpers
    def decays(self, variable) -> bool:
        """Whether ``variable`` is weight-decayed (its path matches no exclusion pattern)."""
        return self._exclude_regex is None or not self._exclude_regex.search(_variable_path(variable))

    @property
    def current_weight_decay(self):
        """wd_t at the current ``iterations`` (a scalar tensor)."""
        wd = self.decoupled_weight_decay
        if isinstance(wd, LearningRateSchedule):
            return wd(self.iterations)
        return ops.convert_to_tensor(wd, dtype="float32")

    # -- Keras optimiser API
    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._decay_flags = [self.decays(v) for v in variables]
        self._variable_paths = [_variable_path(v) for v in variables]
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        wd = self.decoupled_weight_decay
        if self._decay_flags[index] and (isinstance(wd, LearningRateSchedule) or wd > 0):
            self.assign_sub(variable, ops.multiply(ops.cast(self.current_weight_decay, dtype), variable))
        if self.momentum == 0:
            self.assign_sub(variable, ops.multiply(gradient, lr))
            return
        m = self.momentums[index]
        mom = ops.cast(self.momentum, dtype)
        self.assign(m, ops.subtract(ops.multiply(m, mom), ops.multiply(gradient, lr)))
        if self.nesterov:
            self.assign_add(variable, ops.subtract(ops.multiply(m, mom), ops.multiply(gradient, lr)))
        else:
            self.assign_add(variable, m)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("weight_decay", None)
        wd = self.decoupled_weight_decay
        if isinstance(wd, LearningRateSchedule):
            wd = keras.optimizers.schedules.serialize(wd)
        config.update({"weight_decay": wd, "momentum": self.momentum, "nesterov": self.nesterov,
                       "exclude_from_weight_decay": list(self.exclude_patterns)})
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("weight_decay"), dict):
            config["weight_decay"] = keras.optimizers.schedules.deserialize(
                config["weight_decay"], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)


def make_optimizer(opt_cfg, steps_per_epoch: int, name: str) -> SGDW:
    """An :class:`SGDW` whose learning rate and weight decay follow :class:`CosineSchedule`.

    Args:
        opt_cfg: :class:`spirs_tf.config.OptimizerConfig` (lr/wd max and min, momentum, Nesterov,
            cycle, warm-up and restart settings; the same curve shape for lr and wd; ``global_clipnorm``).
        steps_per_epoch: optimiser steps per epoch.
        name: optimiser name, e.g. ``"registration"``.

    Raises:
        ValueError: as :class:`CosineSchedule` for inconsistent values.
    """
    def schedule(top, bottom):
        return CosineSchedule(top, bottom, steps_per_epoch, opt_cfg.cycle_epochs,
                              warmup_epochs=opt_cfg.warmup_epochs, warm_restarts=opt_cfg.warm_restarts,
                              restart_length_factor=opt_cfg.restart_length_factor,
                              restart_max_divisor=opt_cfg.restart_max_divisor,
                              restart_min_divisor=opt_cfg.restart_min_divisor)

    return SGDW(learning_rate=schedule(opt_cfg.learning_rate, opt_cfg.learning_rate_min),
                weight_decay=schedule(opt_cfg.weight_decay, opt_cfg.weight_decay_min),
                momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov, name=name,
                global_clipnorm=opt_cfg.global_clipnorm)


# ----------------------------------------------------------------------------------- checkpointing
def _state_variables(opt) -> dict:
    """Name → optimiser variable: ``iterations``, ``learning_rate`` (constant lr only),
    ``momentum/<model variable path>`` for every momentum slot and, for a Keras
    ``LossScaleOptimizer`` wrapping the SGDW (mixed precision), ``loss_scale/dynamic_scale`` and
    ``loss_scale/step_counter``."""
    named = {}
    if isinstance(opt, keras.optimizers.LossScaleOptimizer):
        named["loss_scale/dynamic_scale"] = opt.dynamic_scale
        named["loss_scale/step_counter"] = opt.step_counter
        opt = opt.inner_optimizer
    if not opt.built:
        raise ValueError(f"optimizer {opt.name!r} is not built; call opt.build(variables) first")
    named["iterations"] = opt._iterations
    if isinstance(opt._learning_rate, keras.Variable):
        named["learning_rate"] = opt._learning_rate
    for path, slot in zip(getattr(opt, "_variable_paths", []), getattr(opt, "momentums", [])):
        if slot is not None:
            if f"momentum/{path}" in named:
                raise ValueError(f"two optimised variables share the path {path!r}")
            named[f"momentum/{path}"] = slot
    return named


def optimizer_state(opt) -> dict[str, np.ndarray]:
    """The optimiser's state as ``{name: array}`` keyed by variable path (see :func:`_state_variables`).

    Raises:
        ValueError: if the optimiser is not built or two variables share a path.
    """
    return {name: np.array(ops.convert_to_numpy(v)) for name, v in _state_variables(opt).items()}


def load_optimizer_state(opt, state: dict, allow_missing: bool = False) -> None:
    """Restore :func:`optimizer_state` output into ``opt`` (an SGDW, or a ``LossScaleOptimizer``
    wrapping one), built on the same variables first.

    Entries are matched by name, so the order of variables does not matter. With ``allow_missing``
    momentum slots absent from ``state`` keep their current value (zero for a fresh optimiser).

    Raises:
        SpirsInputError: on missing entries (unless ``allow_missing``), unexpected entries, or a
            shape mismatch; nothing is assigned in that case.
        ValueError: if the optimiser is not built.
    """
    named = _state_variables(opt)
    missing = sorted(set(named) - set(state))
    unexpected = sorted(set(state) - set(named))
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    for name in sorted(set(named) & set(state)):
        if tuple(np.shape(state[name])) != tuple(named[name].shape):
            problems.append(f"{name}: shape {tuple(np.shape(state[name]))} != {tuple(named[name].shape)}")
    if problems:
        raise SpirsInputError(f"optimizer state for {opt.name!r} does not match: " + "; ".join(problems))
    for name in sorted(set(named) & set(state)):
        named[name].assign(np.asarray(state[name]).astype(named[name].dtype))
