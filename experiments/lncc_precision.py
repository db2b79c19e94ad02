"""Precision and speed of the LNCC box sums, and the cost of the displacement affine supervision.

Synthetic data (one pre-aligned scan of ``spirs synth``'s generator, patient 0, seed 0, normalised as in
training), against itself moved by a 3 % zoom and a 3 % shrink with the network's own warp. For each grid:

1. the LNCC (window 9, unmasked and masked with the training mask) from the float32 running-sum box filter
   (``spirs_tf.losses.lncc``, the training loss and, before the fix, the logged validation numbers), from
   float64 box sums (``spirs_tf.losses.lncc_exact``, every logged LNCC now; ``spirs_tf.metrics.lncc``,
   every reported one) and from an exact reference (a loop over the window offsets in float64, covariance
   form; on grids above 64³ ``spirs_tf.metrics.lncc``, which that loop matches to ~1e-13 on 64³);
2. with ``--timing``: forward + backward time of the masked LNCC at batch 2 for the float32 running sums,
   the float64 ones and the float32 convolution path, back to back in one process; the NumPy box sums;
   and the closed-form displacement supervision (``mask_moments`` + ``affine_displacement_mse``) against
   the matrix MSE.

Usage::

    python experiments/lncc_precision.py --grids 64 128 --timing
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# the exact reference is the one the tests use (tests/lncc_reference.py), not a second copy
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from lncc_reference import offset_loop_cc_map  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def precision(grid: int) -> None:
    from spirs_tf import losses, metrics, transforms
    from spirs_tf.preprocess import normalize_intensity
    from spirs_tf.synthetic.cohort import SynthConfig, generate_patient

    patient = generate_patient(0, 0, SynthConfig(grid_size=grid, spacing_mm=192.0 / grid, pose="aligned",
                                                 timepoints=(2, 2)))
    fixed = normalize_intensity(np.asarray(patient.scans[0].image, np.float32))
    exact_loop = grid <= 64
    print(f"\n{grid}³ at {192.0 / grid:g} mm, brain {np.mean(fixed > 0):.1%} of the grid; reference: "
          + ("float64 offset loop" if exact_loop else "metrics.lncc (float64)"))
    print(f"{'pair':8s} {'mask':8s} {'reference':>10s} {'f32 cumsum':>11s} {'lncc_exact':>11s} {'metrics':>11s}")
    for name, zoom in (("zoom3", 1.03), ("shrink3", 0.97)):
        matrix = np.concatenate([np.eye(3) * zoom, np.zeros((3, 1))], 1).astype(np.float32)
        moving = np.asarray(transforms.warp(fixed[None, ..., None], matrix[None]))[0, ..., 0]
        cc = offset_loop_cc_map(fixed, moving) if exact_loop else metrics.lncc_map(fixed, moving)
        mask = metrics.lncc_mask(fixed, moving)
        f, m = fixed[None, ..., None], moving[None, ..., None]
        for label, sel, tf_mask in (("unmasked", None, None), ("masked", mask, mask[None, ..., None])):
            ref = cc.mean() if sel is None else cc[sel].mean()
            f32 = float(losses.lncc(f, m, mask=None if tf_mask is None else tf_mask.astype(np.float32))[0])
            ex = float(losses.lncc_exact(f, m, mask=tf_mask)[0])
            np64 = metrics.lncc(fixed, moving, mask=sel)
            print(f"{name:8s} {label:8s} {ref:10.6f} {f32 - ref:+11.1e} {ex - ref:+11.1e} {np64 - ref:+11.1e}")


def timing(grid: int, repeats: int) -> None:
    from spirs_tf import losses, metrics
    from spirs_tf._compat import tf

    rng = np.random.default_rng(0)
    shape = (2, grid, grid, grid, 1)
    fixed = tf.constant(rng.random(shape).astype(np.float32))
    moving = tf.constant(rng.random(shape).astype(np.float32))
    mask = tf.constant((rng.random(shape) > 0.5).astype(np.float32))
    print(f"\ntiming on {grid}³, batch 2, median of {repeats} (shared machine: compare rows, not runs)")

    def step(method, dtype):
        @tf.function
        def run():
            f, m, k = (tf.cast(x, dtype) for x in (fixed, moving, mask))
            with tf.GradientTape() as tape:
                tape.watch(m)
                value = tf.reduce_sum(losses.lncc(f, m, mask=k, box_sum=method))
            return tape.gradient(value, m)
        return lambda: run().numpy()

    for method, dtype in (("cumsum", tf.float32), ("cumsum", tf.float64), ("conv", tf.float32)):
        ms = _median_ms(step(method, dtype), repeats)
        print(f"  masked LNCC fwd+bwd, {method:6s} {dtype.name}: {ms:7.1f} ms")
    volume = rng.random((grid,) * 3)
    ms = _median_ms(lambda: metrics._box_sum(volume, 9), repeats)
    print(f"  NumPy box sum (metrics._box_sum, doubling):     {ms:7.1f} ms")

    def cumsum_box(x, w=9):
        out = np.pad(x, w // 2)
        for axis in range(3):
            pad = [(0, 0)] * 3
            pad[axis] = (1, 0)
            c = np.pad(np.cumsum(out, axis=axis), pad)
            hi, lo = [slice(None)] * 3, [slice(None)] * 3
            hi[axis], lo[axis] = slice(w, None), slice(0, c.shape[axis] - w)
            out = c[tuple(hi)] - c[tuple(lo)]
        return out
    ms = _median_ms(lambda: cumsum_box(volume), repeats)
    print(f"  NumPy box sum (float64 running sums, the old):  {ms:7.1f} ms")

    true = tf.constant(rng.normal(size=(2, 3, 4)).astype(np.float32))
    pred = tf.Variable(rng.normal(size=(2, 3, 4)).astype(np.float32))
    brain = tf.cast(tf.not_equal(fixed, 0), tf.float32)

    def affine(kind):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                if kind == "matrix":
                    value = tf.reduce_sum(losses.affine_mse(true, pred))
                else:
                    moments = losses.mask_moments(brain)
                    value = tf.reduce_sum(losses.affine_displacement_mse(true, pred, moments))
            return tape.gradient(value, pred)
        return lambda: run().numpy()

    for kind in ("matrix", "displacement"):
        print(f"  affine supervision fwd+bwd, {kind:12s}:       {_median_ms(affine(kind), repeats):7.1f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[64], help="grid sizes (default 64)")
    parser.add_argument("--timing", action="store_true", help="also time the box sums on the first grid")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for grid in args.grids:
        precision(grid)
    if args.timing:
        timing(args.grids[0], args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
