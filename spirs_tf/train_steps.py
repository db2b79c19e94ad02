"""The backend-specific half of training: the compiled train and eval steps of a :class:`~spirs_tf.train.Trainer`.

The trainer is backend-neutral: it builds the model, the optimisers and their variable lists, computes
the loss terms (:meth:`~spirs_tf.train.Trainer.compute_losses`) and the validation metrics
(:meth:`~spirs_tf.train.Trainer.validation_terms`), and runs stages, epochs and hooks. How a step is
compiled and how gradients are taken depends on the Keras backend and lives here, behind one
interface (:class:`Steps`)::

    steps = make_steps(trainer)
    steps.train_step(batch) → {name: scalar}   one optimisation step: updates the model's and the
                                               optimisers' variables in place; returns the loss
                                               terms (registration, segmentation_p1,
                                               segmentation_p2, total, ...) as batch means
    steps.eval_step(batch)  → {name: scalar}   no update: the loss terms (exact float64 LNCC) and
                                               the validation metrics (lncc_*, dice_*) as batch
                                               means; under a distribution strategy also ``count``
                                               (the real pairs of a padded batch)

``batch`` is a dict of the data pipeline (:func:`spirs_tf.data.make_dataset`; under a strategy the
per-replica batch of :func:`spirs_tf.distribute.distribute_dataset`). An implementation reads from
the trainer only: ``model``, ``optimizers`` ({name: optimiser}), ``var_lists`` ({name: the
variables that optimiser updates}), ``loss_for(name)`` (the loss term an optimiser minimises),
``compute_losses(batch, training)`` → ``(outputs, {term: (B,)})``, ``validation_terms(outputs,
batch)`` → ``{metric: (B,)}``, ``strategy``, ``stage`` and ``stage_cfg.batch_size``.

:class:`TensorFlowSteps` is the TensorFlow implementation (``tf.GradientTape``, ``tf.function``,
``tf.distribute`` via ``strategy.run``); :class:`spirs_tf.jax_steps.JaxSteps` the JAX one (``jax.jit`` of
``model.stateless_call``, ``jax.vjp``, the optimisers' ``stateless_apply``).
"""
from __future__ import annotations

from typing import Protocol

from spirs_tf._compat import BACKEND, tf
from spirs_tf.errors import SpirsInputError


class Steps(Protocol):
    """The interface of a backend's compiled steps (module docstring)."""

    def train_step(self, batch: dict) -> dict:
        """One optimisation step on ``batch`` → {loss term: scalar batch mean}; updates variables in place."""

    def eval_step(self, batch: dict) -> dict:
        """Validation of ``batch`` → {loss term or metric: scalar batch mean}; changes no variable."""


class TensorFlowSteps:
    """:class:`Steps` under TensorFlow: ``tf.function`` steps, gradients by ``tf.GradientTape``.

    ``train_step``: one forward pass of the whole pyramid under a persistent tape, the per-sample
    losses reduced to scalars, then for every optimiser the gradient of its loss term
    (``trainer.loss_for``) with respect to its own variables (``trainer.var_lists``), applied with
    ``optimizer.apply``. Without a strategy the reduction is the batch mean; under a strategy each
    replica sums its samples and divides by the GLOBAL batch, ``strategy.run`` runs the step on every
    replica and the optimiser all-reduces (sums) the gradients, so one step on N replicas equals one
    step of one replica on the whole batch (``tests/test_distribute.py``); the returned scalars are
    the replica sums.

    ``eval_step``: the loss terms and validation metrics, batch means; under a strategy
    weighted sums (``batch["weight"]``: 1 per pair, 0 for padding) summed over the replicas and
    divided by the global ``count``, which is returned too.

    Raises:
        SpirsInputError: (on construction) under a strategy, a global batch that is not a multiple of
            the replicas.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.strategy = trainer.strategy
        self.global_batch = trainer.stage_cfg.batch_size
        if self.strategy is not None:
            replicas = self.strategy.num_replicas_in_sync
            if self.global_batch % replicas:
                raise SpirsInputError(
                    f"stage {trainer.stage}: the global batch ({self.global_batch}) must be a multiple of the "
                    f"{replicas} replicas of the distribution strategy (set train.stages.{trainer.stage - 1}"
                    ".batch_size)")
            self.train_step = tf.function(self._distributed_train)
            self.eval_step = tf.function(self._distributed_eval)
        else:
            self.train_step = tf.function(self._train)
            self.eval_step = tf.function(self._eval)

    def _reduce(self, x):
        """Per-sample (B,) → scalar; under a strategy each replica sums and divides by the global batch."""
        if self.strategy is not None:
            return tf.reduce_sum(x) / self.global_batch
        return tf.reduce_mean(x)

    def _train(self, batch):
        t = self.trainer
        with tf.GradientTape(persistent=True) as tape:
            _, per_sample = t.compute_losses(batch, training=True)
            scalars = {k: self._reduce(v) for k, v in per_sample.items()}
        for name, opt in t.optimizers.items():
            variables = t.var_lists[name]
            grads = tape.gradient(scalars[t.loss_for(name)], variables)
            pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
            opt.apply([g for g, _ in pairs], [v for _, v in pairs])
        del tape
        return scalars

    def _eval(self, batch):
        t = self.trainer
        weight = batch.get("weight")  # under a strategy: 1 per pair, 0 for padding (Trainer.validate)

        def reduce(x):  # weighted sums under a strategy, divided by the count later
            return tf.reduce_mean(x) if weight is None else tf.reduce_sum(x * weight)

        outputs, per_sample = t.compute_losses(batch, training=False)
        per_sample = {**per_sample, **t.validation_terms(outputs, batch)}
        scalars = {k: reduce(v) for k, v in per_sample.items()}
        if weight is not None:
            scalars["count"] = tf.reduce_sum(weight)
        return scalars

    def _distributed_train(self, batch):
        per_replica = self.strategy.run(self._train, args=(batch,))
        return {k: self.strategy.reduce("SUM", v, axis=None) for k, v in per_replica.items()}

    def _distributed_eval(self, batch):
        # global sums / global count = batch means; "count" weights the batch in Trainer.validate
        per_replica = self.strategy.run(self._eval, args=(batch,))
        sums = {k: self.strategy.reduce("SUM", v, axis=None) for k, v in per_replica.items()}
        count = sums.pop("count")
        return {**{k: v / tf.maximum(count, 1.0) for k, v in sums.items()}, "count": count}


def make_steps(trainer) -> Steps:
    """The compiled steps of ``trainer`` for the active Keras backend.

    Raises:
        SpirsInputError: a backend without a step implementation; under JAX a ``tf.distribute`` strategy
            or mixed precision.
    """
    if BACKEND == "tensorflow":
        return TensorFlowSteps(trainer)
    if BACKEND == "jax":
        from spirs_tf.jax_steps import JaxSteps

        return JaxSteps(trainer)
    raise SpirsInputError(f"training under KERAS_BACKEND={BACKEND} has no step implementation yet "
                          "(spirs_tf.train_steps); use KERAS_BACKEND=tensorflow")
