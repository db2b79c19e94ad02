"""Staged coarse-to-fine training of SPIRS (Appendix B; FACTS decisions 6–8).

The loop reads like the method::

    run_stage(cfg, stage, manifest, run_dir)
      └─ Trainer.fit()
           [recalibrate_batchnorm]  once, before the first epoch of a stage that asks for it
           for epoch:  on_epoch_start → train_epoch (train_step × steps)
                       → validate (eval_step × pairs) → on_epoch_end (log, checkpoint)

* ``Trainer.train_step(batch)`` is one compiled step: a forward pass of the whole pyramid, the losses
  of :func:`spirs_tf.losses.spirs_losses`, and either the authors' **isolated** update (three
  optimisers: registration loss → the registration variables; P1 loss → the P1 variables, plus the
  shared encoder with ``loss.p1_trains_encoder``; P2 loss → the fusion block only) or the paper's
  **joint** update (Eq. 10 with one optimiser). In isolated mode the gradient of each loss is taken
  only with respect to its own variable group, which is exactly what the authors' three tapes
  computed. The backend-specific part (tape, compilation, ``tf.distribute``) is
  :mod:`spirs_tf.train_steps`; everything else here is backend-neutral Keras.
* Checkpoints (:mod:`spirs_tf.checkpoints`) are name-keyed ``.npz`` files, written with
  write-then-rename: ``checkpoints/latest.npz`` every epoch, ``checkpoints/best.npz`` on improvement
  of ``train.keep_best_metric``. A run that was killed resumes from ``latest.npz``; the half-written
  temporary file of a killed write is never loaded. An unreadable ``latest.npz`` (which atomic writes
  cannot produce: disk or copy damage) stops the run with an error that says what to do; it never
  falls back to an older checkpoint.
* Stage ``n > 1`` starts from stage ``n − 1``'s ``best.npz`` (same variable names: the levels share
  every weight). Optimiser state is not carried across stages: each stage has its own step count and
  schedule (the authors restarted schedules per stage too; they carried momentum, which is
  negligible after the first hundred steps).
* Validation (``validate``) logs the loss terms with ``val_`` prefixes plus the finest level's
  unmasked ``val_lncc_{identity,affine,deformable}`` and hard Dice scores. Every validation LNCC,
  masked or not, is computed with float64 box sums (:func:`spirs_tf.losses.lncc_exact`); training
  keeps float32, whose error next to the zero background inflated the unmasked columns before.

The run directory layout is described in :mod:`spirs_tf.checkpoints`; learning curves are drawn by
:mod:`spirs_tf.curves`, BatchNorm statistics re-estimated by :mod:`spirs_tf.bn_recalibration`, and
``tf.distribute`` strategies made by :mod:`spirs_tf.distribute`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import time

import numpy as np

from spirs_tf import config as config_lib
from spirs_tf import data as data_lib
from spirs_tf import losses as losses_lib
from spirs_tf import networks, optim
from spirs_tf._compat import BACKEND, keras, tf
from spirs_tf.atomic import atomic_path
from spirs_tf.bn_recalibration import recalibrate_batchnorm
from spirs_tf.checkpoints import (CHECKPOINT_FORMAT, StagePaths, load_checkpoint,  # noqa: F401 (re-exported)
                                  save_checkpoint, stage_dir)
from spirs_tf.curves import CURVE_PANELS, plot_curves  # noqa: F401 (re-exported)
from spirs_tf.distribute import (LOGICAL_CPUS_ENV, distribute_dataset, make_strategy,  # noqa: F401 (re-exported)
                                 padded_batches)
from spirs_tf.errors import SpirsInputError
from spirs_tf.manifest import load_manifest
from spirs_tf.train_steps import make_steps


class Trainer:
    """Trains one stage. Hyper-parameters come from the config, never from attributes set here.

    Public steps (compiled by the backend's :mod:`spirs_tf.train_steps` on first use):
    :meth:`train_step` and :meth:`eval_step`. What a step implementation reads from the trainer:
    ``model``, ``optimizers``, ``var_lists``, :meth:`loss_for`, :meth:`compute_losses`,
    :meth:`validation_terms`, ``strategy``, ``stage``, ``stage_cfg``.
    """

    def __init__(self, cfg: config_lib.SpirsConfig, stage: int, train_source, val_source, run_dir: str,
                 init_from: str | None = None, verbose: int = 1, strategy=None, init_skip: tuple = ()):
        if not 1 <= stage <= len(cfg.train.stages):
            raise SpirsInputError(f"stage must be in 1..{len(cfg.train.stages)}, got {stage}")
        self.cfg = cfg
        self.stage = stage
        self.stage_cfg = cfg.train.stages[stage - 1]
        self.levels = self.stage_cfg.levels
        self.train_source = train_source
        self.val_source = val_source
        self.paths = StagePaths(stage_dir(run_dir, stage))
        self.verbose = verbose
        self.strategy = strategy
        os.makedirs(self.paths.checkpoints, exist_ok=True)
        config_lib.save_config(cfg, self.paths.config)

        keras.utils.set_random_seed(cfg.train.seed + stage)
        if cfg.train.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        n_pairs = len(train_source)
        if n_pairs == 0:
            raise SpirsInputError("no training pairs: the manifest's train split needs at least one patient "
                                  "with two time points")
        self.steps_per_epoch = self.stage_cfg.steps_per_epoch or math.ceil(n_pairs / self.stage_cfg.batch_size)

        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            self.model = networks.build_spirs(cfg, self.levels, bn_trainable=self.stage_cfg.bn_trainable)
            self.groups = networks.variable_groups(self.model, cfg.loss.p1_trains_encoder)
            self.optimizers = self._make_optimizers()
            #: P2 on the prior placed by the true affine (``train.p2_prior = "truth"``), else None
            self.p2_head = networks.p2_head(self.model, self.levels) if cfg.train.p2_prior == "truth" else None
        # Dropout draws: seed-generator states as built from the run's seed, re-derived per epoch in
        # on_epoch_start (they are not weights, so checkpoints do not hold them).
        self._seed_states = [(v, np.array(keras.ops.convert_to_numpy(v))) for v in self.model.variables
                             if v.path.endswith("seed_generator_state")]
        self.epoch = 0  # number of completed epochs
        self.best = math.inf
        self.history: list[dict] = []
        self._metrics: dict = {}
        self.step_seconds: float | None = None  #: the last epoch's steady seconds per step (train_epoch)
        self.stop_reason: str | None = None
        self._other_seconds = 0.0  # the last epoch's validation and checkpoint seconds (fit)

        if os.path.isfile(self.paths.latest):
            self._restore(self.paths.latest)
        elif init_from:
            state, _, meta = load_checkpoint(init_from)
            unknown = [m for m in init_skip if m not in config_lib.MODULE_NAMES]
            if unknown:
                raise SpirsInputError(f"init_skip: unknown module(s) {', '.join(unknown)}; "
                                      f"known: {', '.join(config_lib.MODULE_NAMES)}")
            # modules in init_skip keep their fresh initialisation (e.g. a fusion block of another design)
            skip = tuple(f"{m}_" for m in init_skip)
            state = {**{p: v for p, v in state.items() if not p.startswith(skip)},
                     **{p: v for p, v in networks.model_state(self.model).items() if skip and p.startswith(skip)}}
            networks.load_model_state(self.model, state)
            if verbose:
                skipped = f", {', '.join(init_skip)} freshly initialised" if init_skip else ""
                print(f"stage {stage}: initialised from {init_from} (stage {meta.get('stage')}, "
                      f"epoch {meta.get('epoch')}{skipped})")
        self._steps = None  # train_steps.make_steps(self), made on first use
        self._losses = None  # loss_function(cfg, levels), made on first use

    # --------------------------------------------------------------------------- optimisers
    def _make_optimizers(self) -> dict:
        o = self.cfg.optim
        st = self.stage_cfg

        def for_stage(opt_cfg, segmentation=False):
            k = st.lr_scale  # the stage's scale of learning rates and weight decays
            if segmentation and st.segmentation_lr_scale is not None:
                k = st.segmentation_lr_scale
            return dataclasses.replace(
                opt_cfg, learning_rate=k * opt_cfg.learning_rate, learning_rate_min=k * opt_cfg.learning_rate_min,
                weight_decay=k * opt_cfg.weight_decay, weight_decay_min=k * opt_cfg.weight_decay_min,
                cycle_epochs=opt_cfg.cycle_epochs if st.cycle_epochs is None else st.cycle_epochs)

        o = dataclasses.replace(o, **{name: for_stage(getattr(o, name), segmentation=name != "registration")
                                      for name in ("registration", "segmentation_p1", "segmentation_p2")})
        if self.cfg.loss.optimisation == "joint":
            opts = {"joint": optim.make_optimizer(o.registration, self.steps_per_epoch, name="joint")}
            self.var_lists = {"joint": list(self.model.trainable_variables)}
        else:
            opts = {
                "registration": optim.make_optimizer(o.registration, self.steps_per_epoch, name="registration"),
                "segmentation_p1": optim.make_optimizer(o.segmentation_p1, self.steps_per_epoch,
                                                        name="segmentation_p1"),
                "segmentation_p2": optim.make_optimizer(o.segmentation_p2, self.steps_per_epoch,
                                                        name="segmentation_p2"),
            }
            self.var_lists = {k: [v for v in self.groups[k] if v.trainable] for k in opts}
        for name, opt in opts.items():
            opt.build(self.var_lists[name])
        return opts

    @staticmethod
    def loss_for(optimizer_name: str) -> str:
        """The loss an optimiser minimises: Eq. 10's total in joint mode, else its own group's loss."""
        return "total" if optimizer_name == "joint" else optimizer_name

    # --------------------------------------------------------------------- backend-neutral parts
    @staticmethod
    def model_inputs(batch: dict) -> dict:
        """The model's inputs of a batch (:data:`spirs_tf.data.MODEL_INPUT_KEYS`)."""
        return {k: batch[k] for k in data_lib.MODEL_INPUT_KEYS}

    def compute_losses(self, batch: dict, training: bool) -> tuple[dict, dict]:
        """Forward pass and loss terms → ``(outputs, {term: (B,) per-sample loss})``.

        Training uses :func:`loss_function` (XLA-compiled with ``train.xla_losses``, float32 LNCC);
        validation numbers are logged (history, provenance, ``best.npz``), so their LNCC terms use
        exact float64 box sums, op by op.
        """
        outputs = self.model(self.model_inputs(batch), training=training)
        if self.p2_head is not None:
            outputs = dict(outputs, p2_logits=self.p2_head(self.truth_p2_inputs(outputs, batch), training=training))
        if not training:
            return outputs, losses_lib.spirs_losses(outputs, batch, self.cfg, self.levels, exact_lncc=True)
        if self._losses is None:  # not compiled under a strategy (XLA there is untested)
            self._losses = loss_function(self.cfg, self.levels, compile=self.strategy is None)
        return outputs, self._losses(outputs, batch)

    def truth_p2_inputs(self, outputs: dict, batch: dict) -> list:
        """Inputs of :attr:`p2_head` with the prior placed by the true affine: ``[fixed_image, p1_logits,
        warp(moving_image, T), warp(moving_mask, T)]``, ``T = true_affine`` (finest grid of the stage)."""
        from spirs_tf import transforms

        return [batch["fixed_image"], outputs["p1_logits"],
                transforms.warp(batch["moving_image"], batch["true_affine"]),
                transforms.warp(batch["moving_mask"], batch["true_affine"])]

    def validation_terms(self, outputs: dict, batch: dict) -> dict:
        """The finest level's validation metrics beyond the loss terms, per sample ``(B,)``.

        ``lncc_{identity,affine,deformable}``: unmasked LNCC of the fixed image with the moving image,
        its affine and its deformable warp, so windows centred in the zero background count: float64
        box sums (:func:`spirs_tf.losses.lncc_exact`), the float32 cumulative sums inflate these means
        next to the background. ``dice_{identity,affine,deformable}``: hard Dice of the (warped) moving
        mask ≥ 0.5 with the fixed mask; ``dice_p1``/``dice_p2``: hard Dice of the segmentations.
        """
        L = self.levels
        fixed, target = batch["fixed_image"], batch["fixed_mask"]
        window = self.cfg.loss.lncc_window
        return {
            "lncc_identity": losses_lib.lncc_exact(fixed, batch["moving_image"], window),
            "lncc_affine": losses_lib.lncc_exact(fixed, outputs[f"warped_affine_image_{L}"], window),
            "lncc_deformable": losses_lib.lncc_exact(fixed, outputs[f"warped_image_{L}"], window),
            "dice_identity": losses_lib.hard_dice(target, batch["moving_mask"], threshold=0.5),
            "dice_affine": losses_lib.hard_dice(target, outputs[f"warped_affine_mask_{L}"], threshold=0.5),
            "dice_deformable": losses_lib.hard_dice(target, outputs[f"warped_mask_{L}"], threshold=0.5),
            "dice_p1": losses_lib.hard_dice(target, outputs["p1_logits"]),
            "dice_p2": losses_lib.hard_dice(target, outputs["p2_logits"]),
        }

    # --------------------------------------------------------------------------------- steps
    def build_steps(self) -> None:
        """Make (compile lazily) the backend's steps now (:func:`spirs_tf.train_steps.make_steps`).

        Raises:
            SpirsInputError: under a strategy, a global batch that is not a multiple of the replicas.
        """
        self._steps = make_steps(self)

    def train_step(self, batch: dict) -> dict:
        """One optimisation step on ``batch`` → {loss term: scalar}; updates the model and optimisers."""
        if self._steps is None:
            self.build_steps()
        return self._steps.train_step(batch)

    def eval_step(self, batch: dict) -> dict:
        """Validation of ``batch`` → {loss term or metric: scalar} (``count`` too under a strategy)."""
        if self._steps is None:
            self.build_steps()
        return self._steps.eval_step(batch)

    # --------------------------------------------------------------------------------- hooks
    def on_epoch_start(self, epoch: int) -> None:
        for m in self._metrics.values():
            m.reset_state()
        # Random draws (dropout) of epoch e depend only on (seed, stage, e): a run resumed after a kill
        # replays exactly the epochs of an uninterrupted one (tests/test_reliability_runs.py).
        for variable, initial in self._seed_states:
            variable.assign(epoch_seed_state(initial, epoch))

    def _track(self, prefix: str, scalars: dict) -> None:
        for k, v in scalars.items():
            key = f"{prefix}{k}"
            if key not in self._metrics:
                self._metrics[key] = keras.metrics.Mean(name=key)
            self._metrics[key].update_state(v)

    def validate(self, epoch: int) -> dict:
        """The ``val_`` means over the validation pairs (one pair per batch; under a strategy global
        batches of one pair per replica, the last padded with weight-0 pairs)."""
        if self.val_source is None or len(self.val_source) == 0:
            return {}
        ds = data_lib.batches(self.val_source, self.cfg, self.levels, batch_size=1, training=False,
                              seed=self.cfg.train.seed)
        if self.strategy is None:
            for batch in ds:
                self._track("val_", self.eval_step(batch))
        else:
            for batch in distribute_dataset(self.strategy, padded_batches(ds, self.strategy.num_replicas_in_sync)):
                scalars = self.eval_step(batch)
                count = scalars.pop("count")
                for k, v in scalars.items():  # batch means weighted by their pairs: a pair-wise mean
                    metric = self._metrics.setdefault(f"val_{k}", keras.metrics.Mean(name=f"val_{k}"))
                    metric.update_state(v, sample_weight=count)
        return {k: float(m.result()) for k, m in self._metrics.items() if k.startswith("val_")}

    def recalibrate_batchnorm(self, batches: int) -> list[str]:
        """Re-estimate the moving statistics of the BatchNorm layers of ``train.bn_recalibration_modules``
        over ``batches`` augmented training batches (:func:`spirs_tf.bn_recalibration.recalibrate_batchnorm`:
        the plain average of the batch statistics over all calls). No trainable weight changes.
        Returns the names of the layers re-estimated.

        Raises:
            SpirsInputError: under a distribution strategy (not supported).
        """
        if self.strategy is not None:
            raise SpirsInputError("bn_recalibration_batches is not supported with a distribution strategy; "
                                  f"set train.stages.{self.stage - 1}.bn_recalibration_batches=0", self.paths.root)
        layers = networks.batchnorm_layers(self.model, self.cfg.train.recalibration_modules())
        ds = data_lib.batches(self.train_source, self.cfg, self.levels, batch_size=self.stage_cfg.batch_size,
                              training=True, seed=self.cfg.train.seed + 1, epoch=0, steps=batches)
        return recalibrate_batchnorm(self.model, layers, (self.model_inputs(batch) for batch in ds))

    def _monitor(self, logs: dict) -> float:
        """The value of ``train.keep_best_metric`` (the training ``registration`` loss without validation).

        Raises:
            SpirsInputError: the metric is not among this epoch's logs (a typo in the config).
        """
        name = self.cfg.train.keep_best_metric
        if name.startswith("val_") and self.val_source is None:
            name = "registration"
        if name not in logs:
            raise SpirsInputError(f"train.keep_best_metric {self.cfg.train.keep_best_metric!r} is not logged; "
                                  f"choose one of {sorted(logs)}", self.paths.root)
        return logs[name]

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        row = {"epoch": epoch, **logs}
        self.history.append(row)
        self._write_history()
        monitor = self._monitor(logs)
        improved = monitor < self.best
        if improved:
            self.best = float(monitor)
        meta = {"stage": self.stage, "levels": self.levels, "epoch": epoch, "best": self.best,
                "config_name": self.cfg.name, "steps_per_epoch": self.steps_per_epoch,
                "history": self.history}
        if improved:
            self._save(self.paths.best, meta)
        if epoch % self.cfg.train.checkpoint_every_epochs == 0 or epoch == self.stage_cfg.epochs:
            self._save(self.paths.latest, meta)
        self._log_tensorboard(epoch, logs)

    # ------------------------------------------------------------------------------- main loop
    def fit(self, epochs: int | None = None, deadline: float | None = None) -> list[dict]:
        """Train until ``epochs`` (default the stage's) epochs are complete → the history rows.

        ``deadline`` (a ``time.time()`` value) stops earlier. An epoch's length is estimated from the last
        one: its median step time after the first step (which holds the compilation) times the steps per
        epoch, plus its validation and checkpoint time. An epoch that fits starts; one of which at least
        half fits starts and is cut, so that its validation ends near the deadline; otherwise fit stops.
        An epoch still running at its deadline ends after its current step, validated and checkpointed
        like a full one (its history row has ``steps``; a resumed run goes on with the next epoch).
        ``stop_reason`` says why fit stopped early (None: it did not). (The first estimate used to be the
        whole first epoch, compilation included: on the H100 every stage of the GPU recipe stopped after
        one epoch with a third of its time unused, ``experiments/gpu/provenance/``.)
        """
        epochs = self.stage_cfg.epochs if epochs is None else epochs
        self.stop_reason = None
        if self._steps is None:
            if self.epoch == 0 and self.stage_cfg.bn_recalibration_batches > 0:
                names = self.recalibrate_batchnorm(self.stage_cfg.bn_recalibration_batches)
                if self.verbose:
                    print(f"stage {self.stage}: re-estimated the statistics of {len(names)} BatchNorm layers "
                          f"over {self.stage_cfg.bn_recalibration_batches} batches")
            self.build_steps()
        while self.epoch < epochs and self.stop_reason is None:
            cut_at = deadline
            if deadline is not None and self.step_seconds is not None:  # known after an epoch
                # seconds of the next epoch's steps, and of its validation and checkpoints
                train_estimate, other_estimate = self.step_seconds * self.steps_per_epoch, self._other_seconds
                left = deadline - time.time()
                if left < other_estimate + 0.5 * train_estimate:
                    self.stop_reason = f"deadline: epoch {self.epoch + 1} would end after it"
                    break
                if left < other_estimate + train_estimate:
                    cut_at = deadline - other_estimate  # leave the validation its time
            epoch = self.epoch + 1
            self.on_epoch_start(epoch)
            logs = self.train_epoch(epoch, cut_at)
            if "steps" in logs:
                self.stop_reason = f"deadline: epoch {epoch} cut after {logs['steps']} of {self.steps_per_epoch} steps"
            after_steps = time.time()
            logs.update(self.validate(epoch))
            if self.verbose:
                shown = {k: round(v, 4) for k, v in logs.items()
                         if k in ("registration", "val_registration", "val_dice_deformable", "val_dice_p1",
                                  "val_dice_p2", "val_lncc_deformable", "seconds")}
                print(f"stage {self.stage} epoch {epoch}/{epochs}: {shown}")
            self.epoch = epoch
            self.on_epoch_end(epoch, logs)
            self._other_seconds = time.time() - after_steps
        plot_curves(self.history, os.path.join(self.paths.root, "curves.png"), title=f"stage {self.stage}")
        return self.history

    def train_epoch(self, epoch: int, deadline: float | None = None) -> dict:
        """``steps_per_epoch`` training steps → the epoch's training logs (loss means, seconds, learning rate).

        Steps after ``deadline`` (``time.time()``; the first step always runs) are left out; the logs then
        hold ``steps``, the number that ran.

        Raises:
            SpirsInputError: a non-finite total loss (training diverged; the last good checkpoint is kept).
        """
        echo = self.cfg.train.data_echo
        ds = data_lib.batches(self.train_source, self.cfg, self.levels,
                              batch_size=self.stage_cfg.batch_size, training=True,
                              seed=self.cfg.train.seed, epoch=epoch, steps=-(-self.steps_per_epoch // echo))
        if self.strategy is not None:
            ds = distribute_dataset(self.strategy, ds)  # each replica gets batch / replicas pairs
        if echo > 1:
            ds = _echoed(ds, echo)
        bar = keras.utils.Progbar(self.steps_per_epoch, verbose=self.verbose,
                                  stateful_metrics=None) if self.verbose else None
        start, cut, durations = time.perf_counter(), None, []
        for step, batch in enumerate(ds):
            if step >= self.steps_per_epoch:
                break
            if deadline is not None and step > 0 and time.time() > deadline:
                cut = step
                break
            began = time.perf_counter()
            scalars = self.train_step(batch)
            if not math.isfinite(float(scalars["total"])):
                raise SpirsInputError(
                    f"training diverged at stage {self.stage}, epoch {epoch}, step {step + 1} (loss is "
                    f"{float(scalars['total'])}); the last good checkpoint is kept. Lower the learning rate, "
                    f"e.g. --set train.stages.{self.stage - 1}.lr_scale=0.01", self.paths.root)
            self._track("", scalars)
            durations.append(time.perf_counter() - began)
            if bar is not None:
                bar.update(step + 1, values=[(k, float(self._metrics[k].result()))
                                             for k in ("registration", "segmentation_p1", "segmentation_p2")
                                             if k in self._metrics])
        logs = {k: float(m.result()) for k, m in self._metrics.items() if not k.startswith("val_")}
        logs["seconds"] = time.perf_counter() - start
        # the steady step time (data wait included: the next batch is fetched before the clock starts
        # again, so add the epoch's unaccounted time per step); the first step holds the compilation
        if durations:
            wait = max(0.0, logs["seconds"] - sum(durations)) / len(durations)
            self.step_seconds = float(np.median(durations[1:] if len(durations) > 1 else durations)) + wait
        logs["learning_rate"] = float(_current_lr(next(iter(self.optimizers.values()))))
        if cut is not None:
            logs["steps"] = cut
        return logs

    # ------------------------------------------------------------------------------ persistence
    def _save(self, path: str, meta: dict) -> None:
        save_checkpoint(path, networks.model_state(self.model),
                        {k: optim.optimizer_state(o) for k, o in self.optimizers.items()}, meta)

    def _restore(self, path: str) -> None:
        try:
            state, opt_states, meta = load_checkpoint(path)
        except SpirsInputError as exc:  # never fall back silently: best.npz may be many epochs older
            raise SpirsInputError(
                f"{exc.problem}; cannot resume stage {self.stage}. Copy best.npz over it to resume from the best "
                "epoch, or move it away to restart the stage from its start", path) from None
        if meta.get("levels") != self.levels:
            raise SpirsInputError(f"checkpoint is for {meta.get('levels')} levels, this stage trains "
                                  f"{self.levels}", path)
        networks.load_model_state(self.model, state)
        for name, opt in self.optimizers.items():
            if name in opt_states:
                optim.load_optimizer_state(opt, opt_states[name])
        self.epoch = int(meta["epoch"])
        self.best = float(meta.get("best", math.inf))
        self.history = list(meta.get("history", []))
        if self.verbose:
            print(f"stage {self.stage}: resumed from {path} after epoch {self.epoch}")

    def _write_history(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys.extend(k for k in row if k not in keys)
        with atomic_path(self.paths.history) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.history)

    def _log_tensorboard(self, epoch: int, logs: dict) -> None:
        if tf is None or getattr(self, "_tb", False) is None:
            return
        if not hasattr(self, "_tb"):
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                print("note: tensorboard is not installed; TensorBoard logs are skipped")
                self._tb = None
                return
            self._tb = tf.summary.create_file_writer(os.path.join(self.paths.root, "tensorboard"))
        with self._tb.as_default():
            for k, v in logs.items():
                tf.summary.scalar(k, v, step=epoch)
        self._tb.flush()


def _echoed(batches, times: int):
    """Each batch of ``batches`` ``times`` times in a row (``train.data_echo``)."""
    for batch in batches:
        for _ in range(times):
            yield batch


def loss_function(cfg: config_lib.SpirsConfig, levels: int, compile: bool = True):
    """``(outputs, batch) → spirs_losses(outputs, batch, cfg, levels)``, XLA-compiled with ``train.xla_losses``.

    Under TensorFlow with ``cfg.train.xla_losses`` the loss terms run as one
    ``tf.function(jit_compile=True)`` (its gradient is compiled too): the same values to float
    rounding (``tests/test_train.py``), and on a CPU the LNCC box sums and the bending energy run
    about 4× faster than op by op. The network and its convolutions stay un-compiled (XLA makes
    3-D convolutions slower on a CPU). Only the batch keys the losses read are passed in.
    ``compile=False`` (the trainer under a ``tf.distribute`` strategy) always gives the plain losses.
    """
    def plain(outputs, batch):
        return losses_lib.spirs_losses(outputs, batch, cfg, levels)

    if BACKEND != "tensorflow" or not cfg.train.xla_losses or not compile:
        return plain
    compiled = tf.function(plain, jit_compile=True, autograph=False)

    def run(outputs, batch):
        return compiled(dict(outputs), {k: batch[k] for k in losses_lib.LOSS_BATCH_KEYS if k in batch})
    return run


def epoch_seed_state(initial: np.ndarray, epoch: int) -> np.ndarray:
    """A dropout seed-generator state for ``epoch``: ``epoch`` in the counter's high 32 bits of a 64-bit
    state (TensorFlow's int64), in the seed word of a 32-bit one (JAX's uint32)."""
    if initial.dtype.itemsize >= 8:
        return initial + np.array([0, epoch << 32], dtype=initial.dtype)
    return initial + np.array([epoch, 0], dtype=initial.dtype)


def _current_lr(opt) -> float:
    lr = opt.learning_rate
    return float(np.asarray(lr))


# --------------------------------------------------------------------------------------- entry
def run_stage(cfg: config_lib.SpirsConfig, stage: int, manifest_path: str, run_dir: str,
              init_from: str | None = None, epochs: int | None = None, verbose: int = 1,
              strategy=None, deadline: float | None = None, init_skip: tuple = ()) -> Trainer:
    """Train stage ``stage`` of ``cfg`` on a manifest; stage n > 1 starts from stage n−1's best checkpoint.

    ``deadline`` (``time.time()``) ends training early, resumably (:meth:`Trainer.fit`). ``init_skip``:
    module prefixes (:data:`spirs_tf.config.MODULE_NAMES`) whose weights are not taken from the initial
    checkpoint (a run that resumes from its own checkpoint restores everything)."""
    manifest = load_manifest(manifest_path)
    train_source = data_lib.PairSource(manifest, "train", cfg.data)
    if "val" in manifest.splits():
        val_source = data_lib.PairSource(manifest, "val", cfg.data, limit=cfg.train.validation_pairs)
    else:
        print(f"note: {manifest_path} has no 'val' split; training without validation (the best checkpoint "
              "then follows the training registration loss)")
        val_source = None
    if init_from is None and stage > 1 and not os.path.isfile(StagePaths(stage_dir(run_dir, stage)).latest):
        prev = StagePaths(stage_dir(run_dir, stage - 1))
        init_from = prev.best if os.path.isfile(prev.best) else prev.latest
        if not os.path.isfile(init_from):
            raise SpirsInputError(f"stage {stage} starts from stage {stage - 1}, but {run_dir} has no "
                                  f"stage-{stage - 1} checkpoint; run --stage {stage - 1} first (or pass "
                                  "--init-from)", run_dir)
    trainer = Trainer(cfg, stage, train_source, val_source, run_dir, init_from=init_from, verbose=verbose,
                      strategy=strategy, init_skip=tuple(init_skip))
    trainer.fit(epochs, deadline=deadline)
    return trainer
