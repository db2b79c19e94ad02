"""Training under ``tf.distribute``: choosing the strategy and feeding it global batches.

:func:`make_strategy` turns ``train.distribute`` (``none``/``mirrored``/``multi_worker``) into a
strategy; :func:`distribute_dataset` hands each replica its share of every global batch;
:func:`padded_batches` pads the last validation batch so that no replica gets an empty one. The
trainer (:mod:`spirs_tf.train`, :class:`spirs_tf.train_steps.TensorFlowSteps`) does the rest: it
builds the model in ``strategy.scope()``, runs the step with ``strategy.run`` and sums per-sample
losses divided by the global batch on each replica.
"""
from __future__ import annotations

import json
import os

from spirs_tf._compat import BACKEND, tf
from spirs_tf.errors import SpirsInputError

LOGICAL_CPUS_ENV = "SPIRS_LOGICAL_CPUS"


def _split_cpu(n_text: str) -> list[str]:
    """Split the first physical CPU into ``n`` logical devices (before TensorFlow initialises)."""
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
            ``SPIRS_LOGICAL_CPUS``; any strategy under a Keras backend other than TensorFlow.
    """
    if kind == "none":
        return None
    if kind not in ("mirrored", "multi_worker"):
        raise SpirsInputError(f"unknown distribute strategy {kind!r}; choose none, mirrored or multi_worker")
    if BACKEND != "tensorflow":
        raise SpirsInputError(f"--distribute {kind} needs TensorFlow (tf.distribute), but Keras runs on {BACKEND}; "
                              "use --distribute none or KERAS_BACKEND=tensorflow")
    if kind == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG"))
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


def padded_batches(ds, replicas: int):
    """Batches of 1 → batches of ``replicas`` pairs with a per-pair ``weight`` (1 = real, 0 = padding).

    The last batch is filled up with weight-0 copies of the first pair, so that no replica ever gets
    an empty batch (TensorFlow's BatchNorm kernels fail on a zero-sized batch).
    """
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
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(ds.with_options(options))
