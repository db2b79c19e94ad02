"""The training and validation steps of :class:`spirs_tf.train.Trainer` under Keras' JAX backend.

The TensorFlow trainer runs one ``tf.function`` with a persistent ``GradientTape``; here one ``jax.jit``
does the same work on the variables' values:

* **forward** ``model.stateless_call(trainable, non_trainable, inputs, training=True)`` and the losses of
  :func:`spirs_tf.losses.spirs_losses` (batch means), under ``jax.vjp``: one forward pass, and the
  pullback gives the gradient of any loss with respect to every trainable value;
* **isolated** mode: three pullbacks with unit cotangents on the registration, P1 and P2 losses, each
  gradient restricted to its optimiser's variable group — what the authors' three tapes computed;
  **joint** mode: one pullback of Eq. 10's total;
* each optimiser's ``stateless_apply`` in the trainer's order, a variable shared by two optimisers
  (the encoder with ``p1_trains_encoder``) receiving the second update on top of the first, as the
  TensorFlow step's in-place updates do. A variable that a loss does not reach gets no update from that
  optimiser (TensorFlow's ``None`` gradient: no momentum, no weight decay); which ones those are is read
  once from the traced forward pass (:func:`reached_inputs`);
* BatchNorm moving statistics and dropout seed states come back as new non-trainable values.

After every step the new values are written back into the Keras variables (a reference swap under
JAX), so checkpoints (:func:`spirs_tf.networks.model_state`, :func:`spirs_tf.optim.optimizer_state`),
BatchNorm re-estimation and the epoch's dropout seeds work on the variables as under TensorFlow, and
checkpoints move between backends unchanged.

Validation runs the model jitted in float32, then the logged numbers (the loss terms with exact LNCC and
:meth:`spirs_tf.train.Trainer.validation_terms`) in a second jitted function with 64-bit types switched
on (``jax.enable_x64``): the LNCC columns use :func:`spirs_tf.losses.lncc_exact`'s float64 box sums, as
under TensorFlow (JAX drops float64 to float32 otherwise).
"""
from __future__ import annotations

import warnings

from spirs_tf.errors import SpirsInputError

__all__ = ["JaxSteps", "reached_inputs", "check_supported"]


def check_supported(cfg, strategy) -> None:
    """Refuse what the JAX trainer does not do, in one line each.

    Raises:
        SpirsInputError: a ``tf.distribute`` strategy, or ``train.mixed_precision``.
    """
    if strategy is not None:
        raise SpirsInputError("tf.distribute strategies need TensorFlow; under KERAS_BACKEND=jax train on one "
                              "device (--distribute none / train.distribute=none)")
    if cfg.train.mixed_precision:
        raise SpirsInputError("train.mixed_precision is not supported under KERAS_BACKEND=jax; set "
                              "train.mixed_precision=false or use KERAS_BACKEND=tensorflow")


def reached_inputs(fn, args: list):
    """For each output leaf of ``fn(args)`` (same structure as the output): the set of indices of the leaves
    of ``args`` (a list of arrays) that it depends on differentiably — TensorFlow's "the gradient is not None".

    Read from the forward jaxpr of ``fn``: an equation's outputs depend on the inputs any of its operands
    depends on, except through ``stop_gradient`` and outputs of integer or boolean type (comparisons,
    casts to int), which carry no gradient. A nested jaxpr (a jitted or custom-gradient function) counts
    as one equation.
    """
    import jax
    import numpy as np

    try:
        from jax.extend.core import Var
    except ImportError:  # pragma: no cover - jax < 0.4.36
        from jax.core import Var

    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(args)
    jaxpr = closed.jaxpr
    masks = {v: 1 << i for i, v in enumerate(jaxpr.invars)}
    for eqn in jaxpr.eqns:
        mask = 0
        if eqn.primitive.name != "stop_gradient":
            for v in eqn.invars:
                if isinstance(v, Var):
                    mask |= masks.get(v, 0)
        for out in eqn.outvars:
            try:  # PRNG keys (dropout) have an extended dtype that NumPy does not know: no gradient
                inexact = np.issubdtype(np.dtype(out.aval.dtype), np.inexact)
            except (TypeError, AttributeError):
                inexact = False
            masks[out] = mask if inexact else 0
    out = []
    for v in jaxpr.outvars:
        mask = masks.get(v, 0) if isinstance(v, Var) else 0
        out.append({i for i in range(len(jaxpr.invars)) if mask >> i & 1})
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


class JaxSteps:
    """:class:`spirs_tf.train_steps.Steps` under JAX: jitted ``train_step(batch)`` / ``eval_step(batch)``
    (module docstring).

    Reads from the trainer: ``model``, ``optimizers`` ({name: optimiser} in update order, each built on
    ``var_lists[name]``), ``var_lists``, ``loss_for(name)``, ``validation_terms(outputs, batch)``, ``cfg``,
    ``levels``, ``strategy``. Both steps take a batch dict of arrays (NumPy or JAX) and return
    ``{name: scalar}`` (JAX arrays).

    Raises:
        SpirsInputError: (on construction) what :func:`check_supported` refuses.
    """

    def __init__(self, trainer):
        import jax

        from spirs_tf import losses as losses_lib

        check_supported(trainer.cfg, trainer.strategy)
        self.trainer = trainer
        self.model, self.optimizers = trainer.model, dict(trainer.optimizers)
        self.cfg, self.levels = trainer.cfg, int(trainer.levels)
        self.loss_names = {name: trainer.loss_for(name) for name in self.optimizers}
        cfg, levels = self.cfg, self.levels
        # the plain loss terms (train.loss_function's XLA wrapper is TensorFlow's; the whole step is jitted here)
        self.loss_fn = lambda outputs, batch: losses_lib.spirs_losses(outputs, batch, cfg, levels)
        position = {id(v): i for i, v in enumerate(self.model.trainable_variables)}
        self.indices = {}
        for name, opt in self.optimizers.items():
            built = list(opt._trainable_variables)
            if [id(v) for v in built] != [id(v) for v in trainer.var_lists[name]] or \
                    any(id(v) not in position for v in built):
                raise ValueError(f"optimizer {name!r} must be built on trainable variables of the model, in "
                                 "the order of its variable list")
            self.indices[name] = [position[id(v)] for v in built]
        # train.p2_prior "truth": the fusion block runs again as trainer.p2_head, on the model's variables
        # (positions in the model's lists; its BatchNorm statistics are written back like the model's)
        self.p2_head = trainer.p2_head
        if self.p2_head is not None:
            fixed = {id(v): i for i, v in enumerate(self.model.non_trainable_variables)}
            self._head_trainable = [position[id(v)] for v in self.p2_head.trainable_variables]
            self._head_non_trainable = [fixed[id(v)] for v in self.p2_head.non_trainable_variables]
        self._reached = None  # {name: [bool per variable of the optimiser]}, from the first traced step
        self._train = jax.jit(self._train_fn)
        self._forward = jax.jit(self._forward_fn)
        self._metrics = jax.jit(self._metrics_fn)

    INPUT_KEYS = ("fixed_image", "moving_image", "moving_mask")

    # ------------------------------------------------------------------------------ pure functions
    def _inputs(self, batch):
        return {k: batch[k] for k in self.INPUT_KEYS}

    def _losses(self, trainable, non_trainable, batch):
        from spirs_tf._compat import ops

        outputs, non_trainable = self.model.stateless_call(trainable, non_trainable, self._inputs(batch),
                                                           training=True)
        outputs, non_trainable = self._truth_p2(trainable, non_trainable, outputs, batch, training=True)
        per_sample = self.loss_fn(outputs, batch)
        return {k: ops.mean(v) for k, v in per_sample.items()}, non_trainable

    def _truth_p2(self, trainable, non_trainable, outputs, batch, training: bool):
        """``outputs`` with P2 on the prior placed by the true affine (``train.p2_prior = "truth"``)."""
        if self.p2_head is None:
            return outputs, non_trainable
        p2, head_state = self.p2_head.stateless_call(
            [trainable[i] for i in self._head_trainable], [non_trainable[i] for i in self._head_non_trainable],
            self.trainer.truth_p2_inputs(outputs, batch), training=training)
        non_trainable = list(non_trainable)
        for i, value in zip(self._head_non_trainable, head_state):
            non_trainable[i] = value
        return dict(outputs, p2_logits=p2), non_trainable

    def _gradients(self, trainable, non_trainable, batch):
        """``(scalars, new non-trainable values, {optimiser: [gradient per variable of its list]})``."""
        import jax
        import jax.numpy as jnp

        scalars, pullback, non_trainable = jax.vjp(lambda t: self._losses(t, non_trainable, batch), trainable,
                                                   has_aux=True)
        grads = {}
        for name, idx in self.indices.items():
            key = self.loss_names[name]
            cotangent = {k: jnp.ones_like(v) if k == key else jnp.zeros_like(v) for k, v in scalars.items()}
            (full,) = pullback(cotangent)
            grads[name] = [full[i] for i in idx]
        return scalars, non_trainable, grads

    def _train_fn(self, trainable, non_trainable, opt_values, batch):
        scalars, non_trainable, grads = self._gradients(trainable, non_trainable, batch)
        trainable = list(trainable)
        opt_values = dict(opt_values)
        for name, opt in self.optimizers.items():
            idx, reached = self.indices[name], self._reached[name]
            if not any(reached):
                continue  # TensorFlow's apply of no gradients: a no-op
            g = [gi if r else None for gi, r in zip(grads[name], reached)]
            with warnings.catch_warnings():  # "Gradients do not exist for variables ...": intended
                warnings.simplefilter("ignore")
                new, opt_values[name] = opt.stateless_apply(opt_values[name], g, [trainable[i] for i in idx])
            for i, value in zip(idx, new):
                trainable[i] = value
        return scalars, trainable, non_trainable, opt_values

    def _forward_fn(self, trainable, non_trainable, batch):
        outputs, _ = self.model.stateless_call(trainable, non_trainable, self._inputs(batch), training=False)
        outputs, _ = self._truth_p2(trainable, non_trainable, outputs, batch, training=False)
        return outputs

    def _metrics_fn(self, outputs, batch):
        from spirs_tf import losses as losses_lib
        from spirs_tf._compat import ops

        per_sample = losses_lib.spirs_losses(outputs, batch, self.cfg, self.levels, exact_lncc=True)
        per_sample.update(self.trainer.validation_terms(outputs, batch))
        return {k: ops.mean(v) for k, v in per_sample.items()}

    # ------------------------------------------------------------------------------------- state
    def _values(self):
        return ([v.value for v in self.model.trainable_variables], [v.value for v in self.model.non_trainable_variables],
                {name: [v.value for v in opt.variables] for name, opt in self.optimizers.items()})

    def _find_reached(self, trainable, non_trainable, batch) -> None:
        """Which variables each optimiser's loss reaches (TensorFlow: the gradient is not None), from a
        trace of the forward pass (:func:`reached_inputs`)."""
        by_loss = reached_inputs(lambda t: self._losses(t, non_trainable, batch)[0], trainable)
        self._reached = {name: [i in by_loss[self.loss_names[name]] for i in idx]
                         for name, idx in self.indices.items()}

    # -------------------------------------------------------------------------------------- steps
    def train_step(self, batch) -> dict:
        """One optimisation step on ``batch``; the Keras variables hold the new values afterwards."""
        trainable, non_trainable, opt_values = self._values()
        batch = dict(batch)
        if self._reached is None:
            self._find_reached(trainable, non_trainable, batch)
        scalars, trainable, non_trainable, opt_values = self._train(trainable, non_trainable, opt_values, batch)
        for v, value in zip(self.model.trainable_variables, trainable):
            v.assign(value)
        for v, value in zip(self.model.non_trainable_variables, non_trainable):
            v.assign(value)
        for name, opt in self.optimizers.items():
            for v, value in zip(opt.variables, opt_values[name]):
                v.assign(value)
        return scalars

    def eval_step(self, batch) -> dict:
        """The loss terms (exact LNCC) and validation metrics of ``batch`` (batch means); nothing is updated."""
        trainable, non_trainable, _ = self._values()
        batch = dict(batch)
        outputs = self._forward(trainable, non_trainable, batch)
        with _x64():
            return self._metrics(outputs, batch)

    def unreached_variables(self) -> dict:
        """``{optimiser: [paths of variables its loss does not reach]}`` (after the first step)."""
        if self._reached is None:
            return {}
        return {name: [str(opt._trainable_variables[j].path) for j, r in enumerate(self._reached[name]) if not r]
                for name, opt in self.optimizers.items()}


def _x64():
    """A context with 64-bit types switched on (``jax.enable_x64``; ``jax.experimental`` in older JAX)."""
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pragma: no cover - older JAX

    return enable_x64()
