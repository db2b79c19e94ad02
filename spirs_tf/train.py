"""Staged coarse-to-fine training of SPIRS (Appendix B; FACTS decisions 6–8).

The loop reads like the method::

    run_stage(cfg, stage, manifest, run_dir)
      └─ Trainer.fit()
           for epoch:  on_epoch_start → train_step × steps → validate → on_epoch_end (log, checkpoint)

* ``train_step`` is one ``tf.function``: a forward pass of the whole pyramid, the losses of
  :func:`spirs_tf.losses.spirs_losses`, and either the authors' **isolated** update (three
  optimisers: registration loss → registration variables incl. the shared encoder; P1 loss → P1
  variables incl. the shared encoder; P2 loss → the fusion block only) or the paper's **joint**
  update (Eq. 10 with one optimiser). In isolated mode the gradient of each loss is taken only with
  respect to its own variable group, which is exactly what the authors' three tapes computed.
* Checkpoints are name-keyed ``.npz`` files (model variables and optimiser slots by variable path,
  plus epoch, step and best metric), written with write-then-rename: ``checkpoints/latest.npz``
  every epoch, ``checkpoints/best.npz`` on improvement of ``train.keep_best_metric``. A run that was
  killed resumes from ``latest.npz``; the half-written temporary file of a killed write is never
  loaded. An unreadable ``latest.npz`` (which atomic writes cannot produce: disk or copy damage)
  stops the run with an error that says what to do; it never falls back to an older checkpoint.
* Stage ``n > 1`` starts from stage ``n − 1``'s ``best.npz`` (same variable names: the levels share
  every weight). Optimiser state is not carried across stages: each stage has its own step count and
  schedule (the authors restarted schedules per stage too; they carried momentum, which is
  negligible after the first hundred steps).
* Validation (``validate``) logs the loss terms with ``val_`` prefixes plus the finest level's
  unmasked ``val_lncc_{identity,affine,deformable}`` and hard Dice scores. Every validation LNCC,
  masked or not, is computed with float64 box sums (:func:`spirs_tf.losses.lncc_exact`); training
  keeps float32, whose error next to the zero background inflated the unmasked columns before.

Run directory layout (``RUN`` holds all three stages)::

    RUN/stage1/config.json        resolved config
    RUN/stage1/history.csv        one row per epoch, every loss term and validation metric
    RUN/stage1/curves.png         learning curves
    RUN/stage1/checkpoints/{latest,best}.npz
    RUN/stage1/tensorboard/
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from spirs_tf import config as config_lib
from spirs_tf.atomic import atomic_path
from spirs_tf.errors import SpirsInputError

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------ checkpoints
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
    """Read a checkpoint written by :func:`save_checkpoint` → (model_state, optimizer_states, meta)."""
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


# ------------------------------------------------------------------------------------------ trainer
@dataclass
class StagePaths:
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
    return os.path.join(run_dir, f"stage{stage}")


class Trainer:
    """Trains one stage. Hyper-parameters come from the config, never from attributes set here."""

    def __init__(self, cfg: config_lib.SpirsConfig, stage: int, train_source, val_source, run_dir: str,
                 init_from: str | None = None, verbose: int = 1, strategy=None):
        from spirs_tf._compat import keras
        from spirs_tf import networks

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
        # Dropout draws: seed-generator states as built from the run's seed, re-derived per epoch in
        # on_epoch_start (they are not weights, so checkpoints do not hold them).
        self._seed_states = [(v, np.array(keras.ops.convert_to_numpy(v))) for v in self.model.variables
                             if v.path.endswith("seed_generator_state")]
        self.epoch = 0  # number of completed epochs
        self.best = math.inf
        self.history: list[dict] = []
        self._metrics: dict = {}

        if os.path.isfile(self.paths.latest):
            self._restore(self.paths.latest)
        elif init_from:
            state, _, meta = load_checkpoint(init_from)
            networks.load_model_state(self.model, state)
            if verbose:
                print(f"stage {stage}: initialised from {init_from} (stage {meta.get('stage')}, "
                      f"epoch {meta.get('epoch')})")
        self._train_step = None
        self._eval_step = None
        self._losses = None  # loss_function(cfg, levels), made on first use

    # --------------------------------------------------------------------------- optimisers
    def _make_optimizers(self) -> dict:
        from spirs_tf import optim

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
            self._var_lists = {"joint": list(self.model.trainable_variables)}
        else:
            opts = {
                "registration": optim.make_optimizer(o.registration, self.steps_per_epoch, name="registration"),
                "segmentation_p1": optim.make_optimizer(o.segmentation_p1, self.steps_per_epoch,
                                                        name="segmentation_p1"),
                "segmentation_p2": optim.make_optimizer(o.segmentation_p2, self.steps_per_epoch,
                                                        name="segmentation_p2"),
            }
            self._var_lists = {k: [v for v in self.groups[k] if v.trainable] for k in opts}
        for name, opt in opts.items():
            opt.build(self._var_lists[name])
        return opts

    @staticmethod
    def _loss_for(optimizer_name: str) -> str:
        """The loss an optimiser minimises: Eq. 10's total in joint mode, else its own group's loss."""
        return "total" if optimizer_name == "joint" else optimizer_name

    # --------------------------------------------------------------------------------- steps
    def _inputs(self, batch):
        return {k: batch[k] for k in ("fixed_image", "moving_image", "moving_mask")}

    def _compute_losses(self, batch, training: bool):
        outputs = self.model(self._inputs(batch), training=training)
        if not training:
            from spirs_tf import losses as losses_lib

            # validation numbers are logged (history, provenance, best.npz): their LNCC terms use exact
            # float64 box sums, op by op; training keeps the compiled float32 ones (masked, ~1e-7 off)
            return outputs, losses_lib.spirs_losses(outputs, batch, self.cfg, self.levels, exact_lncc=True)
        if self._losses is None:  # not compiled under a strategy (XLA there is untested)
            self._losses = loss_function(self.cfg, self.levels, compile=self.strategy is None)
        return outputs, self._losses(outputs, batch)

    def _build_steps(self):
        from spirs_tf._compat import tf

        global_batch = self.stage_cfg.batch_size

        def reduce(x):
            # per-sample (B,) → scalar; under a strategy each replica sums and divides by the global batch
            if self.strategy is not None:
                return tf.reduce_sum(x) / global_batch
            return tf.reduce_mean(x)

        if self.strategy is not None:
            replicas = self.strategy.num_replicas_in_sync
            if global_batch % replicas:
                raise SpirsInputError(
                    f"stage {self.stage}: the global batch ({global_batch}) must be a multiple of the "
                    f"{replicas} replicas of the distribution strategy (set train.stages.{self.stage - 1}"
                    ".batch_size)")

        def train_step(batch):
            with tf.GradientTape(persistent=True) as tape:
                outputs, per_sample = self._compute_losses(batch, training=True)
                scalars = {k: reduce(v) for k, v in per_sample.items()}
            for name, opt in self.optimizers.items():
                variables = self._var_lists[name]
                grads = tape.gradient(scalars[self._loss_for(name)], variables)
                pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
                opt.apply([g for g, _ in pairs], [v for _, v in pairs])
            del tape
            return scalars

        def eval_step(batch):
            from spirs_tf import losses as losses_lib

            weight = batch.get("weight")  # under a strategy: 1 per pair, 0 for padding (validate())

            def reduce(x):  # noqa: F811 - weighted sums under a strategy, divided by the count later
                return tf.reduce_mean(x) if weight is None else tf.reduce_sum(x * weight)

            outputs, per_sample = self._compute_losses(batch, training=False)
            scalars = {k: reduce(v) for k, v in per_sample.items()}
            L = self.levels
            fixed = batch["fixed_image"]
            # unmasked, so windows centred in the zero background count: float64 box sums (lncc_exact),
            # the float32 cumulative sums inflate these means next to the background
            window = self.cfg.loss.lncc_window
            scalars["lncc_identity"] = reduce(losses_lib.lncc_exact(fixed, batch["moving_image"], window))
            scalars["lncc_affine"] = reduce(losses_lib.lncc_exact(fixed, outputs[f"warped_affine_image_{L}"],
                                                                  window))
            scalars["lncc_deformable"] = reduce(losses_lib.lncc_exact(fixed, outputs[f"warped_image_{L}"],
                                                                      window))
            target = batch["fixed_mask"]
            scalars["dice_identity"] = reduce(_hard_dice_prob(target, batch["moving_mask"]))
            scalars["dice_affine"] = reduce(_hard_dice_prob(target, outputs[f"warped_affine_mask_{L}"]))
            scalars["dice_deformable"] = reduce(_hard_dice_prob(target, outputs[f"warped_mask_{L}"]))
            scalars["dice_p1"] = reduce(losses_lib.hard_dice(target, outputs["p1_logits"]))
            scalars["dice_p2"] = reduce(losses_lib.hard_dice(target, outputs["p2_logits"]))
            if weight is not None:
                scalars["count"] = tf.reduce_sum(weight)
            return scalars

        if self.strategy is not None:
            strategy = self.strategy

            def dist_train(batch):
                per_replica = strategy.run(train_step, args=(batch,))
                return {k: strategy.reduce("SUM", v, axis=None) for k, v in per_replica.items()}

            def dist_eval(batch):
                # global sums / global count = batch means; "count" weights the batch in validate()
                per_replica = strategy.run(eval_step, args=(batch,))
                sums = {k: strategy.reduce("SUM", v, axis=None) for k, v in per_replica.items()}
                count = sums.pop("count")
                return {**{k: v / tf.maximum(count, 1.0) for k, v in sums.items()}, "count": count}

            self._train_step = tf.function(dist_train)
            self._eval_step = tf.function(dist_eval)
        else:
            self._train_step = tf.function(train_step)
            self._eval_step = tf.function(eval_step)

    # --------------------------------------------------------------------------------- hooks
    def on_epoch_start(self, epoch: int) -> None:
        for m in self._metrics.values():
            m.reset_state()
        # Random draws (dropout) of epoch e depend only on (seed, stage, e): a run resumed after a kill
        # replays exactly the epochs of an uninterrupted one (tests/test_reliability_runs.py).
        for variable, initial in self._seed_states:
            variable.assign(initial + np.array([0, epoch << 32], dtype=initial.dtype))

    def _track(self, prefix: str, scalars: dict) -> None:
        from spirs_tf._compat import keras

        for k, v in scalars.items():
            key = f"{prefix}{k}"
            if key not in self._metrics:
                self._metrics[key] = keras.metrics.Mean(name=key)
            self._metrics[key].update_state(v)

    def validate(self, epoch: int) -> dict:
        if self.val_source is None or len(self.val_source) == 0:
            return {}
        from spirs_tf import data as data_lib

        if self._eval_step is None:
            self._build_steps()
        ds = data_lib.make_dataset(self.val_source, self.cfg, self.levels, batch_size=1, training=False,
                                   seed=self.cfg.train.seed)
        if self.strategy is None:
            for batch in ds:
                self._track("val_", self._eval_step(batch))
        else:
            from spirs_tf._compat import keras

            for batch in distribute_dataset(self.strategy, _padded_batches(ds, self.strategy.num_replicas_in_sync)):
                scalars = self._eval_step(batch)
                count = scalars.pop("count")
                for k, v in scalars.items():  # batch means weighted by their pairs: a pair-wise mean
                    metric = self._metrics.setdefault(f"val_{k}", keras.metrics.Mean(name=f"val_{k}"))
                    metric.update_state(v, sample_weight=count)
        return {k: float(m.result()) for k, m in self._metrics.items() if k.startswith("val_")}

    def recalibrate_batchnorm(self, batches: int) -> list[str]:
        """Re-estimate the moving statistics of the BatchNorm layers of ``train.bn_recalibration_modules``.

        Statistics frozen at an earlier stage describe other inputs (a coarser grid; for a module that did
        not train there, other weights). This runs ``batches`` augmented training batches through the model
        in training mode with only those layers switched to batch statistics; their moving mean and
        variance become the plain average of the batch statistics over all their calls (momentum
        ``n/(n+1)`` at a layer's call ``n``).
        No trainable weight changes. Returns the names of the layers re-estimated.

        Raises:
            SpirsInputError: under a distribution strategy (not supported).
        """
        from spirs_tf import data as data_lib, networks

        if self.strategy is not None:
            raise SpirsInputError("bn_recalibration_batches is not supported with a distribution strategy; "
                                  f"set train.stages.{self.stage - 1}.bn_recalibration_batches=0", self.paths.root)
        layers = networks.batchnorm_layers(self.model, self.cfg.train.recalibration_modules())
        saved = [(layer, layer.trainable, layer.momentum, layer.call) for layer in layers]
        ds = data_lib.make_dataset(self.train_source, self.cfg, self.levels, batch_size=self.stage_cfg.batch_size,
                                   training=True, seed=self.cfg.train.seed + 1, epoch=0, steps=batches)

        def averaging(layer, call):
            n = 0  # calls of this layer so far

            def wrapped(*args, **kwargs):
                nonlocal n
                layer.momentum = n / (n + 1.0)  # moving = plain average over its calls so far
                n += 1
                return call(*args, **kwargs)
            return wrapped

        try:
            for layer in layers:
                layer.trainable = True  # Keras 3 runs a non-trainable BatchNorm in inference mode
                layer.call = averaging(layer, layer.call)  # a layer shared by pyramid levels runs once per level
            for batch in ds:
                self.model(self._inputs(batch), training=True)
        finally:
            for layer, trainable, momentum, call in saved:
                layer.trainable, layer.momentum, layer.call = trainable, momentum, call
        return [layer.name for layer in layers]

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
    def fit(self, epochs: int | None = None) -> list[dict]:
        from spirs_tf._compat import keras
        from spirs_tf import data as data_lib

        epochs = self.stage_cfg.epochs if epochs is None else epochs
        if self._train_step is None:
            if self.epoch == 0 and self.stage_cfg.bn_recalibration_batches > 0:
                names = self.recalibrate_batchnorm(self.stage_cfg.bn_recalibration_batches)
                if self.verbose:
                    print(f"stage {self.stage}: re-estimated the statistics of {len(names)} BatchNorm layers "
                          f"over {self.stage_cfg.bn_recalibration_batches} batches")
            self._build_steps()
        while self.epoch < epochs:
            epoch = self.epoch + 1
            self.on_epoch_start(epoch)
            ds = data_lib.make_dataset(self.train_source, self.cfg, self.levels,
                                       batch_size=self.stage_cfg.batch_size, training=True,
                                       seed=self.cfg.train.seed, epoch=epoch, steps=self.steps_per_epoch)
            if self.strategy is not None:
                ds = distribute_dataset(self.strategy, ds)  # each replica gets batch / replicas pairs
            bar = keras.utils.Progbar(self.steps_per_epoch, verbose=self.verbose,
                                      stateful_metrics=None) if self.verbose else None
            start = time.perf_counter()
            for step, batch in enumerate(ds):
                if step >= self.steps_per_epoch:
                    break
                scalars = self._train_step(batch)
                if not math.isfinite(float(scalars["total"])):
                    raise SpirsInputError(
                        f"training diverged at stage {self.stage}, epoch {epoch}, step {step + 1} (loss is "
                        f"{float(scalars['total'])}); the last good checkpoint is kept. Lower the learning rate, "
                        f"e.g. --set train.stages.{self.stage - 1}.lr_scale=0.01", self.paths.root)
                self._track("", scalars)
                if bar is not None:
                    bar.update(step + 1, values=[(k, float(self._metrics[k].result()))
                                                 for k in ("registration", "segmentation_p1", "segmentation_p2")
                                                 if k in self._metrics])
            logs = {k: float(m.result()) for k, m in self._metrics.items() if not k.startswith("val_")}
            logs["seconds"] = time.perf_counter() - start
            logs["learning_rate"] = float(_current_lr(next(iter(self.optimizers.values()))))
            logs.update(self.validate(epoch))
            if self.verbose:
                shown = {k: round(v, 4) for k, v in logs.items()
                         if k in ("registration", "val_registration", "val_dice_deformable", "val_dice_p1",
                                  "val_dice_p2", "val_lncc_deformable", "seconds")}
                print(f"stage {self.stage} epoch {epoch}/{epochs}: {shown}")
            self.epoch = epoch
            self.on_epoch_end(epoch, logs)
        plot_curves(self.history, os.path.join(self.paths.root, "curves.png"), title=f"stage {self.stage}")
        return self.history

    # ------------------------------------------------------------------------------ persistence
    def _save(self, path: str, meta: dict) -> None:
        from spirs_tf import networks, optim

        save_checkpoint(path, networks.model_state(self.model),
                        {k: optim.optimizer_state(o) for k, o in self.optimizers.items()}, meta)

    def _restore(self, path: str) -> None:
        from spirs_tf import networks, optim

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
        from spirs_tf._compat import tf

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


def loss_function(cfg: config_lib.SpirsConfig, levels: int, compile: bool = True):
    """``(outputs, batch) → spirs_losses(outputs, batch, cfg, levels)``, XLA-compiled with ``train.xla_losses``.

    Under TensorFlow with ``cfg.train.xla_losses`` the loss terms run as one
    ``tf.function(jit_compile=True)`` (its gradient is compiled too): the same values to float
    rounding (``tests/test_train.py``), and on a CPU the LNCC box sums and the bending energy run
    about 4× faster than op by op. The network and its convolutions stay un-compiled (XLA makes
    3-D convolutions slower on a CPU). Only the batch keys the losses read are passed in.
    ``compile=False`` (the trainer under a ``tf.distribute`` strategy) always gives the plain losses.
    """
    from spirs_tf import losses as losses_lib
    from spirs_tf._compat import BACKEND, tf

    def plain(outputs, batch):
        return losses_lib.spirs_losses(outputs, batch, cfg, levels)

    if BACKEND != "tensorflow" or not cfg.train.xla_losses or not compile:
        return plain
    compiled = tf.function(plain, jit_compile=True, autograph=False)

    def run(outputs, batch):
        return compiled(dict(outputs), {k: batch[k] for k in losses_lib.BATCH_KEYS if k in batch})
    return run


def _hard_dice_prob(target, prob):
    """Hard Dice of a soft (warped) mask thresholded at 0.5; empty vs empty = 1."""
    from spirs_tf._compat import ops

    axes = tuple(range(1, len(target.shape)))
    t = ops.cast(target > 0.5, "float32")
    p = ops.cast(prob > 0.5, "float32")
    inter = ops.sum(t * p, axis=axes)
    denom = ops.sum(t, axis=axes) + ops.sum(p, axis=axes)
    return ops.where(denom > 0, 2.0 * inter / ops.maximum(denom, 1e-7), ops.ones_like(denom))


def _current_lr(opt) -> float:
    lr = opt.learning_rate
    return float(np.asarray(lr))


#: (title, history keys) of the learning-curve panels
CURVE_PANELS = (
    ("losses", ("registration", "segmentation_p1", "segmentation_p2", "val_registration")),
    ("validation LNCC (finest level)", ("val_lncc_identity", "val_lncc_affine", "val_lncc_deformable")),
    ("validation Dice", ("val_dice_identity", "val_dice_affine", "val_dice_deformable", "val_dice_p1",
                         "val_dice_p2")),
)


def plot_curves(history: list[dict], path: str, title: str = "") -> None:
    """Learning curves: training losses and validation metrics per epoch (PNG, written atomically)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(15, 4))
    for ax, (panel_title, keys) in zip(axes, CURVE_PANELS):
        for key in keys:
            if key in history[0]:
                ax.plot(epochs, [r.get(key, np.nan) for r in history], label=key)
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        if ax.get_lines():
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------- entry
def run_stage(cfg: config_lib.SpirsConfig, stage: int, manifest_path: str, run_dir: str,
              init_from: str | None = None, epochs: int | None = None, verbose: int = 1,
              strategy=None) -> Trainer:
    """Train stage ``stage`` of ``cfg`` on a manifest; stage n > 1 starts from stage n−1's best checkpoint."""
    from spirs_tf import data as data_lib
    from spirs_tf.manifest import load_manifest

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
                      strategy=strategy)
    trainer.fit(epochs)
    return trainer


LOGICAL_CPUS_ENV = "SPIRS_LOGICAL_CPUS"


def _split_cpu(n_text: str) -> list[str]:
    """Split the first physical CPU into ``n`` logical devices (before TensorFlow initialises)."""
    from spirs_tf._compat import tf

    try:
        n = int(n_text)
    except ValueError:
        n = 0
    if n < 1:
        raise SpirsInputError(f"{LOGICAL_CPUS_ENV} must be a positive integer, got {n_text!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * n
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:  # runtime already initialised: fine if it already has the same split
        if len(tf.config.list_logical_devices("CPU")) != n:
            raise SpirsInputError(f"{LOGICAL_CPUS_ENV}={n}: TensorFlow was initialised before the CPU "
                                  "could be split; set the variable before the process starts") from None
    return [f"/cpu:{k}" for k in range(n)]


def make_strategy(kind: str):
    """The ``tf.distribute`` strategy of ``train.distribute`` / ``spirs train --distribute``.

    * ``none`` → ``None`` (plain single-device training).
    * ``mirrored`` → ``MirroredStrategy``: one replica per local GPU (all of them), else the CPU.
      With the environment variable ``SPIRS_LOGICAL_CPUS=n`` the first CPU is split into ``n``
      logical devices and the strategy mirrors over them (tests and CPU-only trials of the
      distributed code path; it does not make a CPU faster). The variable must be set before
      TensorFlow initialises its devices, i.e. before the process runs any TensorFlow op.
    * ``multi_worker`` → ``MultiWorkerMirroredStrategy``; the cluster and this process's role
      come from the ``TF_CONFIG`` environment variable (``docs/distributed.md``). Construction
      blocks until every worker of the cluster has started.

    Under a strategy the trainer builds the model in ``strategy.scope()`` (trainable BatchNorm
    layers are then synchronized: global-batch moments), splits each global batch of
    ``train.stages[i].batch_size`` pairs across the replicas (the batch must be a multiple of
    ``num_replicas_in_sync``), sums per-sample losses divided by the global batch on each replica,
    and lets the optimiser all-reduce (sum) the gradients: one step on N replicas equals one step
    of one replica on the whole batch (``tests/test_distribute.py``).

    Raises:
        SpirsInputError: an unknown kind; ``multi_worker`` without a usable ``TF_CONFIG`` (missing,
            not JSON, no ``cluster.worker`` list, no ``task``/index outside it); a bad
            ``SPIRS_LOGICAL_CPUS``.
    """
    if kind == "none":
        return None
    if kind not in ("mirrored", "multi_worker"):
        raise SpirsInputError(f"unknown distribute strategy {kind!r}; choose none, mirrored or multi_worker")
    if kind == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG"))
    from spirs_tf._compat import tf

    if kind == "mirrored":
        devices = _split_cpu(os.environ[LOGICAL_CPUS_ENV]) if os.environ.get(LOGICAL_CPUS_ENV) else None
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    print(f"spirs: {kind} training on {strategy.num_replicas_in_sync} replica(s)")
    return strategy


def _check_tf_config(text: str | None) -> dict:
    """Parse and check ``TF_CONFIG`` for a multi-worker run; returns the parsed dict."""
    hint = ("multi_worker training needs the TF_CONFIG environment variable, e.g. TF_CONFIG='{\"cluster\": "
            "{\"worker\": [\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": \"worker\", "
            "\"index\": 0}}' (see docs/distributed.md)")
    if not text:
        raise SpirsInputError(hint)
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpirsInputError(f"TF_CONFIG is not valid JSON ({exc}); {hint}") from None
    cluster = conf.get("cluster") if isinstance(conf, dict) else None
    task = conf.get("task") if isinstance(conf, dict) else None
    if not isinstance(cluster, dict) or not isinstance(cluster.get("worker"), list) or not isinstance(task, dict):
        raise SpirsInputError(f"TF_CONFIG needs cluster.worker (a list of host:port) and task; {hint}")
    members, index = cluster.get(task.get("type")), task.get("index")
    if task.get("type") not in ("worker", "chief") or not isinstance(members, list) or \
            not isinstance(index, int) or not 0 <= index < len(members):
        raise SpirsInputError(f"TF_CONFIG task {task} is not a member of its cluster {cluster}; {hint}")
    return conf


def _padded_batches(ds, replicas: int):
    """Batches of 1 → batches of ``replicas`` pairs with a per-pair ``weight`` (1 = real, 0 = padding).

    The last batch is filled up with weight-0 copies of the first pair, so that no replica ever gets
    an empty batch (TensorFlow's BatchNorm kernels fail on a zero-sized batch).
    """
    from spirs_tf._compat import tf

    def weighted(value):
        return lambda b: {**b, "weight": tf.fill([tf.shape(b["fixed_image"])[0]], value)}

    n = int(ds.cardinality())
    ds = ds.map(weighted(1.0))
    if n > 0 and n % replicas:
        ds = ds.concatenate(ds.take(1).map(weighted(0.0)).repeat(replicas - n % replicas))
    return ds.unbatch().batch(replicas, drop_remainder=True)


def distribute_dataset(strategy, ds):
    """``strategy.experimental_distribute_dataset`` of a dataset that yields GLOBAL batches.

    Each replica receives ``global / num_replicas_in_sync`` pairs of every batch (a partial last
    validation batch leaves some replicas fewer, possibly none). Across workers the dataset is
    sharded by element (``AutoShardPolicy.DATA``): the pairs live in memory, not in files, so every
    worker builds the same batch plan and keeps its own share.
    """
    from spirs_tf._compat import tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(ds.with_options(options))
