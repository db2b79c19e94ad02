"""Floating-point operations of one SPIRS forward pass, counted from the layer shapes.

Usage::

    python experiments/flops.py --config paper [--levels 3] [--json out.json]

Every node of the functional graph (a layer call; shared layers have one node per call) is
counted from its static input and output shapes, for one pair (batch 1):

==================  =========================================================================
layer               FLOPs (multiply and add counted separately)
==================  =========================================================================
Conv3D              ``2·k³·C_in·C_out·V_out`` (+ ``C_out·V_out`` with a bias)
Dense               ``2·n_in·n_out + n_out``
BatchNormalization  ``2`` per element (inference: one scale and one shift per channel)
ReLU, Add, sigmoid  ``1`` per element (sigmoid counted as 4)
MaxPooling3D(2)     ``7`` comparisons per output element
Upsample2x          ``8`` per output element (2×2×2 box mean of the nearest-upsampled field)
warps               ``30 + 16·C`` per output voxel: coordinates (affine 3×4 mat-vec, DVF
                    add, centring), 8 trilinear weights, 8 gathers × C channels × (mul + add)
GaussianBlur3D      ``2·k³`` per element (dense k³ kernel)
==================  =========================================================================

Convolutions and dense layers are exact; the element-wise terms are estimates (they are < 1 % of
the total at paper width). Nodes are attributed to a pass by their call order: the shared
encoder, affine head and deformable decoder are called level by level, affine pass first, then
the deformable pass, then segmentation (see :func:`spirs_tf.networks.build_spirs`).

No TensorFlow profiler is used (its FLOP counter lives in ``tf.compat.v1``); the count is
cross-checked in :func:`cross_check` against the closed form of one encoder call.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

WARP_BASE, WARP_PER_CHANNEL = 30, 16


def _numel(shape) -> int:
    return int(math.prod(int(d) for d in shape[1:]))  # batch axis dropped: per pair


def node_flops(layer, node) -> tuple[int, str]:
    """``(flops, kind)`` of one call of ``layer``; kind ``"conv"`` (Conv3D/Dense) or ``"other"``."""
    cls = type(layer).__name__
    ins = [t.shape for t in node.input_tensors]
    outs = [t.shape for t in node.output_tensors]
    out = _numel(outs[0]) if outs else 0
    if cls in ("Conv3D", "OpeningConv3D"):
        k = math.prod(layer.kernel_size)
        c_in, c_out = int(ins[0][-1]), int(outs[0][-1])
        voxels = out // c_out
        return 2 * k * c_in * c_out * voxels + (c_out * voxels if layer.use_bias else 0), "conv"
    if cls == "Dense":
        n_in, n_out = int(ins[0][-1]), int(outs[0][-1])
        return 2 * n_in * n_out + n_out, "conv"
    if cls == "BatchNormalization":
        return 2 * out, "other"
    if cls in ("ReLU", "Add"):
        return out * (len(ins) - 1 if cls == "Add" else 1), "other"
    if cls == "Activation":
        return (4 * out if "sigmoid" in layer.name else 0), "other"
    if cls == "MaxPooling3D":
        return 7 * out, "other"
    if cls in ("Upsample2x", "UpsampleDVF"):
        return 8 * out + (out if cls == "UpsampleDVF" else 0), "other"
    if cls == "SpatialTransformer":
        channels = int(outs[0][-1])
        return (WARP_BASE + WARP_PER_CHANNEL * channels) * (out // channels), "other"
    if cls == "ComposeDVF":  # u + resample(r, x + u): a 3-channel warp and an add
        return (WARP_BASE + WARP_PER_CHANNEL * 3) * (out // 3) + out, "other"
    if cls == "GaussianBlur3D":
        return 2 * layer.size ** 3 * out, "other"
    return 0, "other"  # Input, Concatenate, Subsample, Flatten, Dropout, affine algebra (tiny)


def _pass_of_call(prefix: str, index: int, levels: int) -> tuple[str, int]:
    """Pass and level of the ``index``-th call of a layer shared across levels/passes."""
    if prefix == "enc":  # affine l1..lL, deformable l1..lL, segmentation (finest)
        if index < levels:
            return "affine", index + 1
        if index < 2 * levels:
            return "deformable", index - levels + 1
        return "segmentation", levels
    if prefix in ("aff", "def"):
        return ("affine" if prefix == "aff" else "deformable"), index + 1
    return ("segmentation", levels)


def count_flops(model, levels: int) -> dict:
    """FLOPs per pair of ``model`` (a ``levels``-level SPIRS model) by pass and level.

    Returns:
        ``{"total", "conv", "other", "by_pass": {pass: flops}, "by_pass_level": {"pass/l<i>": flops},
        "by_layer_type": {class: flops}}``; passes ``affine``, ``deformable``, ``segmentation``
        (P1 and the P2 fusion block) and ``warps/other`` (layers outside the three networks).
    """
    by_pass, by_level, by_type = defaultdict(int), defaultdict(int), defaultdict(int)
    totals = {"conv": 0, "other": 0}
    for layer in model._operations:
        nodes = list(layer._inbound_nodes)
        prefix = layer.name.split("_", 1)[0]
        level_pool_calls = []
        if layer.name == "enc_level_pool":  # extra = level − 1 pools per encoder call
            calls = [("affine", i) for i in range(1, levels + 1)] + \
                    [("deformable", i) for i in range(1, levels + 1)] + [("segmentation", levels)]
            level_pool_calls = [c for c in calls for _ in range(c[1] - 1)]
        for index, node in enumerate(nodes):
            flops, kind = node_flops(layer, node)
            if not flops:
                continue
            if level_pool_calls:
                pas, lev = level_pool_calls[index]
            elif prefix in ("enc", "aff", "def") and len(nodes) > 1:
                pas, lev = _pass_of_call(prefix, index, levels)
            elif prefix in ("seg", "fuse"):
                pas, lev = "segmentation", levels
            elif prefix in ("aff", "def", "enc"):
                pas, lev = {"aff": "affine", "def": "deformable", "enc": "affine"}[prefix], levels
            else:
                pas, lev = "warps/other", 0
            by_pass[pas] += flops
            by_level[f"{pas}/l{lev}"] += flops
            by_type[type(layer).__name__] += flops
            totals[kind] += flops
    return {"total": totals["conv"] + totals["other"], "conv": totals["conv"], "other": totals["other"],
            "by_pass": dict(by_pass), "by_pass_level": dict(sorted(by_level.items())),
            "by_layer_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]))}


def encoder_closed_form(base_filters: int, opening_filters: int, coarsest: int, extra: int) -> int:
    """Conv FLOPs of one shared-encoder call (SE1 + SE2, opening conv excluded), from the widths:
    SE1 (3³, F → b) runs on the coarsest grid at ``extra = 0`` and on twice it otherwise (at
    ``extra = 2`` the input is pooled once before SE1); SE2 (3³, b → 2b → 4b → 8b → 16b) runs on
    the coarsest grid, halved after each of its first three blocks."""
    b = base_filters
    se1_grid = coarsest * (2 if extra >= 1 else 1)
    flops = 2 * 27 * opening_filters * b * se1_grid ** 3
    c_in, grid = b, coarsest
    for k, c_out in enumerate((2 * b, 4 * b, 8 * b, 16 * b)):
        flops += 2 * 27 * c_in * c_out * grid ** 3
        c_in, grid = c_out, grid // 2
    return flops


def cross_check(model, cfg, levels: int) -> dict:
    """Compare the graph count of the encoder's convolutions in every call with the closed form."""
    coarsest = cfg.level_grid(1)
    graph = 0
    for layer in model._operations:
        if layer.name.startswith("enc_") and type(layer).__name__ in ("Conv3D", "OpeningConv3D"):
            graph += sum(node_flops(layer, n)[0] for n in layer._inbound_nodes)
    extras = [i - 1 for i in range(1, levels + 1)] * 2 + [levels - 1]
    closed = sum(encoder_closed_form(cfg.model.base_filters, cfg.model.opening_filters, coarsest, e)
                 for e in extras)
    return {"encoder_conv_graph": graph, "encoder_conv_closed_form": closed, "equal": graph == closed}


def matmul_gflops(n: int = 3072, repeats: int = 3) -> dict:
    """Float32 rate of an ``n × n`` matmul (``2n³`` FLOPs), median of ``repeats`` after a warm-up,
    in NumPy and in TensorFlow, GFLOP/s."""
    import statistics
    import time

    import numpy as np

    from spirs_tf._compat import tf

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    ta, tb = tf.constant(a), tf.constant(b)
    mm = tf.function(lambda x, y: tf.linalg.matmul(x, y))
    rates = {}
    for name, fn in (("numpy_gflops", lambda: a @ b), ("tf_gflops", lambda: mm(ta, tb).numpy())):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rates[name] = 2.0 * n ** 3 / statistics.median(times) / 1e9
    return {"matmul_n": n, **rates}


def count_config(cfg, levels: int) -> dict:
    """:func:`count_flops` of a freshly built ``levels``-level model of ``cfg``, with its ``cross_check``."""
    from spirs_tf import networks

    model = networks.build_spirs(cfg, levels, bn_trainable=False)
    return dict(count_flops(model, levels), cross_check=cross_check(model, cfg, levels))


def measure(configs, matmul_n: int = 3072, repeats: int = 3) -> dict:
    """FLOP counts (full pyramid, with the encoder cross-check) of each named config and the matmul rates."""
    from spirs_tf.config import get_config

    counts = {}
    for name in configs:
        cfg = get_config(name)
        counts[name] = count_config(cfg, cfg.model.num_levels)
    return {"counts": counts, **matmul_gflops(matmul_n, repeats)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper", help="named config or JSON file (default: paper)")
    parser.add_argument("--levels", type=int, default=None, help="pyramid levels (default: num_levels)")
    parser.add_argument("--json", default=None, help="also write the counts to this JSON file")
    args = parser.parse_args(argv)

    from spirs_tf.config import get_config

    cfg = get_config(args.config)
    levels = args.levels or cfg.model.num_levels
    result = count_config(cfg, levels)
    result.update(config=cfg.name, levels=levels, input_size=cfg.level_grid(levels))
    print(f"config {cfg.name!r}, {levels} level(s), input {cfg.level_grid(levels)}³: "
          f"{result['total'] / 1e9:,.1f} GFLOP per pair ({result['conv'] / 1e9:,.1f} in Conv3D/Dense)")
    for name, value in result["by_pass_level"].items():
        print(f"  {name:22s} {value / 1e9:10.2f} GFLOP")
    print(f"  encoder cross-check (graph vs closed form): {result['cross_check']}")
    if args.json:
        from spirs_tf.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
