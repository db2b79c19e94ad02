"""Where a training step's time goes: the data loader's batch rate against the model step on a fixed batch.

Usage (on the GPU machine, after ``run.sh``'s set-up; ``experiments/gpu/README.md``)::

    python experiments/gpu/step_profile.py [--config gpu-1p5mm] [--stages 2,3] [--workers 1,4,14]
                                           [--batches 6] [--repeats 5] [--end-to-end N] [--json OUT.json]

Per stage, on in-memory smooth random pairs on the config's grid (augmentation costs the same whatever the
content): seconds per batch of :func:`spirs_tf.data.numpy_batches` with each ``--workers`` count (the first
batch, which waits for a whole pool to fill, left out), and the median of ``--repeats`` model steps
(:meth:`spirs_tf.train.Trainer.train_step`, scalars fetched) on one fixed batch after a warm-up step
(trace and compile, timed apart). A stage whose loader is slower than its step is loader-bound.
``--end-to-end N`` also times N steps fed by the loader with ``cfg.train.loader_workers`` threads, as
:meth:`spirs_tf.train.Trainer.train_epoch` runs them (median seconds per step, the first left out).

Measured on the H100 machine (16 cores; ``experiments/gpu/provenance/2026-11-27_h100_step_profile.json``):
stage 3 (128³, batch 2) loader 3.29 / 0.60 / 0.42 s per batch with 1 / 4 / 14 workers against a 0.24 s
step; stage 2 (64³, batch 4) 2.07 / 0.39 / 0.20 s against 0.075 s: both loader-bound.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _path in (ROOT, os.path.join(ROOT, "experiments")):  # the package, and jax_step_time's step timing
    if _path not in sys.path:
        sys.path.insert(0, _path)


def smooth_pairs(grid: int, n: int, seed: int = 0):
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        img = ndimage.gaussian_filter(rng.random((grid,) * 3, dtype=np.float32), 3)
        mask = (img > np.quantile(img, 0.97)).astype(np.float32)
        pairs.append((img, np.roll(img, 2, 0), mask, np.roll(mask, 2, 0)))
    return pairs


def loader_seconds(source, cfg, levels: int, batch: int, workers: int, batches: int) -> float:
    """Seconds per batch of ``numpy_batches`` after its first batch."""
    from spirs_tf import data

    it = data.numpy_batches(source, cfg, levels, batch, True, 0, steps=batches + 1, workers=workers)
    next(it)
    t = time.perf_counter()
    n = sum(1 for _ in it)
    return (time.perf_counter() - t) / max(n, 1)


def profile_stage(cfg, stage: int, workers: list[int], batches: int, repeats: int, end_to_end: int = 0) -> dict:
    import numpy as np

    from jax_step_time import fixed_batch_step_times
    from spirs_tf import data
    from spirs_tf.train import Trainer

    source = data.PairSource.from_arrays(smooth_pairs(cfg.data.grid_size, 4))
    t = time.perf_counter()
    trainer = Trainer(cfg, stage, source, None, tempfile.mkdtemp(prefix="spirs-profile-"), verbose=0)
    trainer.build_steps()
    build = time.perf_counter() - t
    levels, bsz = trainer.levels, trainer.stage_cfg.batch_size
    out = {"stage": stage, "levels": levels, "batch": bsz, "input": cfg.level_grid(levels), "build_s": round(build, 2),
           "loader_s_per_batch": {str(w): round(loader_seconds(source, cfg, levels, bsz, w, batches), 3)
                                  for w in workers}}
    times = fixed_batch_step_times(trainer, source, repeats)
    out.update(first_step_s=round(times[0], 2), step_s=round(float(np.median(times[1:])), 4))
    if end_to_end:  # what Trainer.train_epoch does: the loader's next batch, then the step, in turn
        times, t = [], time.perf_counter()
        for batch in data.numpy_batches(source, cfg, levels, bsz, True, 0, steps=end_to_end + 1):
            float(trainer.train_step(batch)["total"])
            now = time.perf_counter()
            times.append(now - t)
            t = now
        out["end_to_end_s"] = round(float(np.median(times[1:])), 4)
    fastest = min(out["loader_s_per_batch"].values())
    out["bound"] = "loader" if fastest > out["step_s"] else "model"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpu-1p5mm")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--workers", default="1,4,14")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--end-to-end", type=int, default=0, metavar="N",
                        help="also time N steps fed by the loader (cfg.train.loader_workers), as in training")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from spirs_tf import config as config_lib
    from spirs_tf._compat import BACKEND

    cfg = config_lib.apply_overrides(config_lib.get_config(args.config), args.set)
    workers = [int(w) for w in args.workers.split(",")]
    results = {"config": args.config, "overrides": args.set, "backend": BACKEND, "cpus": os.cpu_count(), "stages": []}
    for stage in (int(s) for s in args.stages.split(",")):
        results["stages"].append(profile_stage(cfg, stage, workers, args.batches, args.repeats, args.end_to_end))
        print(json.dumps(results["stages"][-1]), flush=True)
    if args.json:
        from spirs_tf.atomic import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
