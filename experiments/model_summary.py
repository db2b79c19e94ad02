"""Parameter counts per module and the forward time of the SPIRS network.

Usage::

    python experiments/model_summary.py --config paper --levels 3 [--repeats 1] [--json out.json]

Prints the unique trainable parameters per module (``enc``, ``aff``, ``def``, ``seg``, ``fuse``) and in
total, the authors' figure for comparison (FACTS section B: ≈ 59.0 M at base 64), and the wall time of
one forward pass (batch 1, ``training=False``) after one warm-up pass, through ``tf.function``
(``--eager`` also times a plain ``model(x)`` call). Inputs are random; the timing depends on the
machine and on what else runs on it, so the script also prints the CPU count and the 1-minute load
average.

Memory: a plain (eager) call of a Keras functional model keeps every intermediate tensor until the
call returns; at 128³ and base 64 that exceeds 21 GB. Inside ``tf.function`` (also what
``model.predict`` uses) TensorFlow frees each tensor after its last use, so inference must go through
a compiled function.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

AUTHORS_TOTAL = 59.0e6  #: FACTS section B, "Total unique trainable ≈ 59.0 M"


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        for value in out.values():  # make sure the work is done
            np.asarray(value)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper", help="named config or JSON file (default: paper)")
    parser.add_argument("--levels", type=int, default=None, help="pyramid levels (default: num_levels)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward passes after the warm-up")
    parser.add_argument("--no-timing", action="store_true", help="only count parameters")
    parser.add_argument("--eager", action="store_true",
                        help="also time an eager model(x) call (needs > 21 GB at 128³, base 64)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    from spirs_tf import networks
    from spirs_tf._compat import keras, tf
    from spirs_tf.config import get_config

    cfg = get_config(args.config)
    levels = args.levels or cfg.model.num_levels
    size = cfg.level_grid(levels)
    model = networks.build_spirs(cfg, levels, bn_trainable=True)  # count BatchNorm β as trainable
    per_module = networks.parameter_counts(model)
    total = networks.count_parameters(model)
    beta = sum(int(np.prod(v.shape)) for v in model.trainable_variables if v.path.endswith("_bn/beta"))
    result = {"config": cfg.name, "levels": levels, "input_size": size,
              "base_filters": cfg.model.base_filters, "parameters": per_module, "total_parameters": total,
              "batchnorm_beta_parameters": beta,
              "keras": keras.__version__, "backend": keras.backend.backend()}

    print(f"config {cfg.name!r}: base_filters {cfg.model.base_filters}, {levels} level(s), input {size}³")
    for module, count in per_module.items():
        print(f"  {module:5s} {count:>12,d}")
    print(f"  total {total:>12,d} unique trainable parameters ({beta:,d} of them BatchNorm β)")
    if cfg.model.base_filters == 64 and cfg.model.opening_filters == 32:
        print(f"  authors (FACTS B): ≈ {AUTHORS_TOTAL / 1e6:.1f} M; difference {total - AUTHORS_TOTAL:+,.0f}")

    if not args.no_timing:
        rng = np.random.default_rng(0)
        shape = (1, size, size, size, 1)
        inputs = {"fixed_image": rng.random(shape, dtype=np.float32),
                  "moving_image": rng.random(shape, dtype=np.float32),
                  "moving_mask": (rng.random(shape) > 0.99).astype(np.float32)}
        eager = _time(lambda: model(inputs, training=False), 1 + args.repeats) if args.eager else []
        graph_fn = tf.function(lambda x: model(x, training=False)) if tf is not None else None
        graph = _time(lambda: graph_fn(inputs), 1 + args.repeats) if graph_fn is not None else []
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        result.update({"cpu_count": os.cpu_count(), "load_average_1min": load,
                       "devices": [d.name for d in tf.config.list_logical_devices()] if tf is not None else [],
                       "eager_warmup_s": eager[0] if eager else None, "eager_forward_s": eager[1:],
                       "graph_warmup_s": graph[0] if graph else None, "graph_forward_s": graph[1:]})
        print(f"forward, batch 1, {size}³, training=False ({os.cpu_count()} CPUs, load {load:.2f}, "
              f"devices {result['devices']}):")
        if eager:
            print(f"  eager       warm-up {eager[0]:.2f} s, then " + ", ".join(f"{t:.2f} s" for t in eager[1:]))
        if graph:
            print(f"  tf.function warm-up {graph[0]:.2f} s, then " + ", ".join(f"{t:.2f} s" for t in graph[1:]))

    if args.json:
        from spirs_tf.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
