"""A few level-1 registration steps with one affine supervision: is it stable, and how does the affine error move?

Builds the level-1 model of a config (default ``cpu-small``: 16³), trains the registration variables with the
stage-1 optimiser on augmented batches of a manifest (or on one fixed batch with ``--fixed-batch``) and prints,
every 10 steps (means over them): the registration loss, the affine term ``mse_1`` (matrix MSE or mean squared
displacement, per ``loss.affine_supervision``), the masked affine LNCC, the gradient norm, and the affine error
itself on the 16³ grid in level voxels: root mean squared displacement over the whole grid, Frobenius norm of
the linear part's error and length of the translation error.

Usage (synthetic data, labelled so)::

    spirs synth --patients 6 --out /tmp/synth64 --grid 64 --spacing 3 --pose aligned --timepoints 3 \\
        --lesion-sizes 0,1,1,1 --no-qc
    python experiments/affine_supervision_steps.py --manifest /tmp/synth64/manifest.csv \\
        --set loss.affine_supervision=displacement --set loss.weight_mse=0.0833 --steps 150
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--config", default="cpu-small")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--fixed-batch", action="store_true", help="repeat the first batch (an overfit test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from spirs_tf import config as config_lib
    from spirs_tf import data, losses, networks, optim
    from spirs_tf._compat import tf
    from spirs_tf.manifest import load_manifest

    cfg = config_lib.get_config(args.config, args.set)
    source = data.PairSource(load_manifest(args.manifest), None, cfg.data)
    batch_size = cfg.train.stages[0].batch_size
    tf.keras.utils.set_random_seed(args.seed)
    model = networks.build_spirs(cfg, 1, bn_trainable=True)
    opt = optim.make_optimizer(cfg.optim.registration, steps_per_epoch=max(1, len(source) // batch_size), name="reg")
    variables = [v for v in model.trainable_variables if not v.path.startswith(("seg", "fuse"))]
    opt.build(variables)
    size = data.input_size(cfg, 1)
    factor = cfg.data.grid_size // size
    moments = losses.grid_moments((size, size, size))

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            out = model({k: batch[k] for k in ("fixed_image", "moving_image", "moving_mask")}, training=True)
            terms = losses.spirs_losses(out, batch, cfg, 1)
            loss = tf.reduce_mean(terms["registration"])
        grads = tape.gradient(loss, variables)
        norm = tf.linalg.global_norm([g for g in grads if g is not None])
        opt.apply(grads, variables)
        err = losses.level_affine(out["affine_1"] - batch["true_affine"], factor)
        msd = losses.affine_displacement_mse(tf.zeros_like(err), err, moments)
        linear = tf.reduce_sum(tf.square(err[:, :, :3]), axis=[1, 2])
        shift = tf.reduce_sum(tf.square(err[:, :, 3]), axis=1)
        return [tf.reduce_mean(x) for x in (loss, terms["mse_1"], terms["lncc_affine_1"], norm,
                                            tf.sqrt(msd), tf.sqrt(linear), tf.sqrt(shift))]

    def batches():
        epoch = 0
        fixed = None
        while True:
            for batch in data.make_dataset(source, cfg, 1, batch_size=batch_size, training=True, seed=args.seed,
                                           epoch=epoch):
                if args.fixed_batch:
                    fixed = fixed or batch
                    batch = fixed
                yield batch
            epoch += 1

    supervision = cfg.loss.affine_supervision
    print(f"{cfg.name}, {supervision}, weight_mse {cfg.loss.weight_mse}, {len(source)} pairs, batch {batch_size}, "
          f"{size}³{', one fixed batch' if args.fixed_batch else ''} (synthetic data)")
    rows, start = [], time.time()
    for i, batch in zip(range(1, args.steps + 1), batches()):
        rows.append([float(x) for x in step(batch)])
        if i % 10 == 0 or i == 1:
            m = np.mean(rows[-10:], axis=0)
            print(f"step {i:4d}  loss {m[0]:9.3f}  mse_1 {m[1]:9.3f}  lncc_affine {m[2]:.3f}  |grad| {m[3]:8.2f}  "
                  f"rms displacement {m[4]:6.3f}  |M err| {m[5]:.3f}  |t err| {m[6]:.3f}  "
                  f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
