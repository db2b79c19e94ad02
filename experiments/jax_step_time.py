"""Training-step time under Keras' JAX backend against TensorFlow, on this machine (issue 17).

Usage::

    python experiments/jax_step_time.py [--config cpu-small] [--stage 3] [--mode isolated] [--repeats 3]
                                        [--backends tensorflow,jax] [--json OUT.json]

Each backend runs in its own subprocess (one Keras backend per process), back to back, with the same
Python: a :class:`spirs_tf.train.Trainer` of the stage on in-memory synthetic pairs, one fixed batch
(augmentation excluded), one warm-up step (TensorFlow: trace; JAX: trace + XLA compile), then the median
of ``--repeats`` steps (:meth:`~spirs_tf.train.Trainer.train_step`, the step's scalars fetched).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixed_batch_step_times(trainer, source, repeats: int) -> list[float]:
    """Seconds of ``repeats + 1`` training steps on one fixed batch of ``source`` (the first one traces and
    compiles), each with its scalars fetched; under TensorFlow the batch is made a tensor first."""
    from spirs_tf import data
    from spirs_tf._compat import BACKEND

    batch = next(iter(data.numpy_batches(source, trainer.cfg, trainer.levels, trainer.stage_cfg.batch_size,
                                         True, 0, steps=1)))
    if BACKEND == "tensorflow":
        from spirs_tf._compat import tf

        batch = {k: tf.constant(v) for k, v in batch.items()}
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        float(trainer.train_step(batch)["total"])
        times.append(time.perf_counter() - t)
    return times


def worker(config: str, stage: int, mode: str, repeats: int) -> dict:
    import numpy as np
    from scipy import ndimage

    from spirs_tf import config as config_lib, data
    from spirs_tf._compat import BACKEND
    from spirs_tf.train import Trainer

    cfg = config_lib.apply_overrides(config_lib.get_config(config), [f"loss.optimisation={mode}"])
    g = cfg.data.grid_size
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(2):
        img = ndimage.gaussian_filter(rng.random((g,) * 3), 3).astype(np.float32)
        mask = (img > np.quantile(img, 0.97)).astype(np.float32)
        pairs.append((img, np.roll(img, 2, 0), mask, np.roll(mask, 2, 0)))
    source = data.PairSource.from_arrays(pairs)
    t = time.perf_counter()
    trainer = Trainer(cfg, stage, source, None, tempfile.mkdtemp(prefix="spirs-steptime-"), verbose=0)
    build = time.perf_counter() - t
    times = fixed_batch_step_times(trainer, source, repeats)
    return {"backend": BACKEND, "config": config, "stage": stage, "mode": mode, "batch": trainer.stage_cfg.batch_size,
            "input": trainer.cfg.level_grid(trainer.levels), "build_s": round(build, 2),
            "first_step_s": round(times[0], 2), "steps_s": [round(x, 3) for x in times[1:]],
            "median_step_s": round(float(np.median(times[1:])), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-small")
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--mode", default="isolated", choices=("isolated", "joint"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.config, args.stage, args.mode, args.repeats)), flush=True)
        return 0
    results = []
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--config", args.config,
                               "--stage", str(args.stage), "--mode", args.mode, "--repeats", str(args.repeats)],
                              capture_output=True, text=True, env=env)
        lines = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{backend}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
