"""Where a SPIRS training step spends its time, and how far it is from the float32 matmul floor.

Usage::

    python experiments/train_profile.py [--config cpu-small] [--stage 3] [--repeats 3] [--compare]

Prints, measured in this one process:

* the float32 matmul rate (``experiments/flops.py``) and the compute floor of a training step,
  ``3 × forward FLOPs × batch / rate`` (forward, input gradient and kernel gradient of every
  convolution; FLOPs counted from the layer shapes);
* with ``--compare``: the forward + backward of the network alone (trivial loss: the mean of every
  output) and a whole training step (three optimisers, losses, warps), before and after the CPU
  speed-ups that can be switched in one process — the plain ``Conv3D`` opening convolutions and
  op-by-op losses (``old``) against :class:`spirs_tf.layers.OpeningConv3D` and ``train.xla_losses``
  (``new``; both share the other changes, e.g. the slice-based ×2 upsampler) — timed interleaved so
  that a shared machine's load hits both alike (wall and process CPU seconds, min and median);
* the op-by-op profile of one training step (``tf.profiler`` trace, read back from its XSpace
  protobuf): op time summed over threads, by part of the model and by op type.

:func:`profile_step` and :func:`format_profile` are also used by ``experiments/benchmark.py --profile``.
Inputs are smooth random volumes: the step's time does not depend on the images.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

#: (category, test on the layer name) in order; the first match wins
LAYER_CATEGORIES = (
    ("opening convs", lambda n: n.endswith("_open")),
    ("warps + compose", lambda n: any(s in n for s in ("prewarp", "warped_", "compose"))),
    ("upsampling", lambda n: "_up" in n or "upsample" in n),
)


def categorize(op_name: str) -> str:
    """The part of a training step an op belongs to, from its TensorFlow name (``[gradient_tape/]…``)."""
    if op_name.startswith(("registration/", "segmentation_p1/", "segmentation_p2/", "joint/")):
        return "optimiser updates"
    direction = "backward" if op_name.startswith("gradient_tape/") else "forward"
    match = re.search(r"spirs_\dlevel(?:_\d+)?/([^/]+)/", op_name)
    if not match:
        return f"other ({direction})"
    layer = re.sub(r"_\d+$", "", match.group(1))
    for category, test in LAYER_CATEGORIES:
        if test(layer):
            return f"{category} ({direction})"
    return f"{layer.split('_', 1)[0]} blocks ({direction})"


def profile_step(step, logdir: str | None = None) -> dict:
    """Trace one call of ``step()`` (a warm, traced ``tf.function`` call) with ``tf.profiler``.

    Returns ``{"wall_s", "by_part", "by_type", "op_total_s"}``: seconds of op execution summed over
    the threads that ran them (parallel ops overlap, so the sums exceed the wall time; on a shared
    machine they include time the threads waited for a core). XLA-compiled code (the losses with
    ``train.xla_losses``, forward and gradient) is counted as ``losses (XLA)``.
    """
    from spirs_tf._compat import tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # the trace's protobuf schema

    own = logdir is None
    logdir = logdir or tempfile.mkdtemp(prefix="spirs-profile-")
    try:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        tf.nest.map_structure(lambda v: np.asarray(v), step())
        wall = time.perf_counter() - start
        tf.profiler.experimental.stop()
        path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as fh:
            space.ParseFromString(fh.read())
    finally:
        if own:
            shutil.rmtree(logdir, ignore_errors=True)
    by_part, by_type = collections.Counter(), collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                seconds = event.duration_ps / 1e12
                if name == "CpuExecutable::ExecuteAsyncOnStream":
                    by_part["losses (XLA)"] += seconds
                    by_type["XLA executable"] += seconds
                elif ":" in name and "::" not in name and " " not in name:  # a TensorFlow op: "name:Type"
                    op, kind = name.rsplit(":", 1)
                    by_part[categorize(op)] += seconds
                    by_type[kind] += seconds
    return {"wall_s": wall, "by_part": dict(by_part.most_common()), "by_type": dict(by_type.most_common()),
            "op_total_s": sum(by_part.values())}


def format_profile(prof: dict, top: int = 12) -> list[str]:
    """Lines: the step's wall time, then op seconds and shares by part and by op type."""
    total = prof["op_total_s"] or float("nan")
    lines = [f"  one profiled step: wall {prof['wall_s']:.2f} s; op time summed over threads {total:.2f} s"]
    for title, table in (("by part", prof["by_part"]), ("by op type", prof["by_type"])):
        lines.append(f"  {title}:")
        for name, seconds in list(table.items())[:top]:
            lines.append(f"    {name:38s} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    return lines


def training_floor(cfg, levels: int, batch: int, rate_gflops: float) -> dict:
    """FLOPs of one training step (3 × forward, counted from the layer shapes) and their time at the rate."""
    sys.path.insert(0, HERE)
    import flops as flops_lib  # experiments/flops.py

    forward = flops_lib.count_config(cfg, levels)["total"]
    step = 3 * forward * batch
    return {"forward_gflop_per_pair": forward / 1e9, "step_gflop": step / 1e9, "rate_gflops": rate_gflops,
            "floor_s": step / (rate_gflops * 1e9)}


def smooth_source(cfg, pairs: int = 2, seed: int = 0):
    """A :class:`spirs_tf.data.PairSource` of smooth random volumes on the config's grid."""
    from scipy import ndimage

    from spirs_tf import data as data_lib

    rng = np.random.default_rng(seed)
    n = cfg.data.grid_size

    def vol():
        return ndimage.gaussian_filter(rng.random((n, n, n)), 3).astype(np.float32)
    return data_lib.PairSource.from_arrays(
        [(vol(), vol(), (vol() > 0.52).astype(np.float32), (vol() > 0.52).astype(np.float32))
         for _ in range(pairs)])


@contextlib.contextmanager
def speedups(enabled: bool):
    """Inside: ``OpeningConv3D`` plain (``stack_axis = None``) unless ``enabled``; restored after."""
    from spirs_tf.layers import OpeningConv3D

    saved = OpeningConv3D.stack_axis
    OpeningConv3D.stack_axis = saved if enabled else None
    try:
        yield
    finally:
        OpeningConv3D.stack_axis = saved


def _interleaved(fns: dict, repeats: int) -> dict:
    """Call each warm function ``repeats`` times, round-robin → {name: {wall_min, wall_median, cpu_…}}."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return {k: {"wall_min": min(wall[k]), "wall_median": float(np.median(wall[k])),
                "cpu_min": min(cpu[k]), "cpu_median": float(np.median(cpu[k]))} for k in fns}


def compare(config: str, stage: int, repeats: int) -> dict:
    """Old vs new, interleaved in this process: network forward + backward, and a whole training step."""
    from spirs_tf import config as config_lib, data as data_lib, networks, train
    from spirs_tf._compat import keras, tf

    results = {}
    cfg_new = config_lib.get_config(config)
    cfg_old = config_lib.get_config(config, ["train.xla_losses=false"])
    st = cfg_new.train.stages[stage - 1]
    source = smooth_source(cfg_new)
    batch = next(iter(data_lib.make_dataset(source, cfg_new, st.levels, batch_size=st.batch_size, training=True,
                                            seed=0, steps=1)))
    inputs = {k: batch[k] for k in ("fixed_image", "moving_image", "moving_mask")}

    keras.utils.set_random_seed(0)
    model = networks.build_spirs(cfg_new, st.levels, bn_trainable=False)

    def fwd_bwd():
        with tf.GradientTape() as tape:
            out = model(inputs, training=True)
            loss = tf.add_n([tf.reduce_mean(v) for v in out.values()])
        return tape.gradient(loss, model.trainable_variables)

    fns = {}
    for name, enabled in (("old", False), ("new", True)):
        with speedups(enabled):
            fn = tf.function(fwd_bwd)
            fn()  # trace under the setting
        fns[name] = lambda fn=fn: tf.nest.map_structure(np.asarray, fn())
    results["network_fwd_bwd"] = _interleaved(fns, repeats)

    fns, trainers = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, enabled in (("old", cfg_old, False), ("new", cfg_new, True)):
            with speedups(enabled):
                trainer = train.Trainer(cfg, stage, source, None, os.path.join(tmp, name), verbose=0)
                trainer.build_steps()
                trainer.train_step(batch)
            trainers.append(trainer)
            fns[name] = lambda t=trainer: float(t.train_step(batch)["total"])
        results["train_step"] = _interleaved(fns, repeats)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu-small", help="named config (default cpu-small)")
    parser.add_argument("--stage", type=int, default=3, help="training stage (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each variant (default 3)")
    parser.add_argument("--compare", action="store_true", help="also time old vs new (plain conv, op-by-op losses)")
    args = parser.parse_args(argv)

    sys.path.insert(0, HERE)
    import flops as flops_lib

    from spirs_tf import config as config_lib, data as data_lib, train

    cfg = config_lib.get_config(args.config)
    st = cfg.train.stages[args.stage - 1]
    rate = flops_lib.matmul_gflops(2048, 3)["tf_gflops"]
    floor = training_floor(cfg, st.levels, st.batch_size, rate)
    print(f"{args.config} stage {args.stage}: {st.levels} levels, {cfg.level_grid(st.levels)}³, batch "
          f"{st.batch_size}; load average {os.getloadavg()[0]:.1f}")
    print(f"  float32 matmul {rate:.0f} GFLOP/s; a training step is {floor['step_gflop']:.1f} GFLOP "
          f"(3 × {floor['forward_gflop_per_pair']:.2f} per pair × {st.batch_size}) → floor {floor['floor_s']:.2f} s")
    if args.compare:
        res = compare(args.config, args.stage, args.repeats)
        for part, rows in res.items():
            for name, r in rows.items():
                print(f"  {part:16s} {name}: wall min {r['wall_min']:.2f} s (median {r['wall_median']:.2f}) "
                      f"= {r['wall_min'] / floor['floor_s']:.1f}× the floor; CPU min {r['cpu_min']:.2f} s "
                      f"(median {r['cpu_median']:.2f})")
            print(f"  {part:16s} old / new: wall {rows['old']['wall_min'] / rows['new']['wall_min']:.2f}×, "
                  f"CPU {rows['old']['cpu_min'] / rows['new']['cpu_min']:.2f}×")
    with tempfile.TemporaryDirectory() as tmp:
        source = smooth_source(cfg)
        trainer = train.Trainer(cfg, args.stage, source, None, tmp, verbose=0)
        trainer.build_steps()
        batch = next(iter(data_lib.make_dataset(source, cfg, st.levels, batch_size=st.batch_size, training=True,
                                                seed=0, steps=1)))
        trainer.train_step(batch)
        prof = profile_step(lambda: trainer.train_step(batch))
    print("\n".join(format_profile(prof)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
