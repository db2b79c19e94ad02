"""Train P1 and P2 on a grid finer than the registration's (issue 16; :mod:`spirs_tf.fine_seg`).

The segmenter starts from a trained SPIRS run's segmentation weights (opening conv, encoder, P1 decoder,
P2 fusion block) and trains on cubes cut from a pre-aligned cohort on the k-times finer grid, mostly
around lesions. The run resumes from ``OUT/checkpoints/latest.npz``; ``--minutes`` stops it at an epoch
end (a 3-hour session can run it in parts). Then::

    spirs predict --model RUN --segmenter OUT ...      # P1/P2 from the segmenter on the fine grid

Usage::

    python experiments/train_segmenter.py --run runs/cm10p2_e8 --manifest runs/data/train128f/manifest.csv \
        --out runs/seg2x [--factor 2] [--epochs 40] [--steps 100] [--crop 64] [--minutes 60] \
        [--set lesion_probability=0.7 ...] [--config-set model.p2_residual_clip=4 ...]
    # micro lesions: every lesion centred alike, and a lesion-balanced BCE (each lesion < 125 mm³ weighs as one
    # of 125 mm³): --set lesion_sampling=lesion --set lesion_balance_mm3=125
    # go on from a segmenter (its weights, grid and poolings), e.g. P2 alone:
    python experiments/train_segmenter.py --run runs/seg2x --from-segmenter --out runs/seg2x_b \
        --set learning_rate_p1=0 ...

The manifest's scans are preprocessed onto the fine grid (``grid_size·k`` at ``spacing/k``): make the
cohort at that resolution (e.g. ``spirs synth --grid 128 --spacing 1.5`` for the 3 mm CPU configs).
Bad arguments exit with code 2 and one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_set(items, settings):
    """``key=value`` pairs onto :class:`SegmenterSettings`, typed from the current values as config fields are."""
    from spirs_tf.config import _coerce

    for item in items or []:
        key, sep, value = item.partition("=")
        fields = {f.name: f for f in dataclasses.fields(settings)}
        if not sep or key not in fields or key == "init_from":
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(k for k in fields if k != 'init_from')}")
        setattr(settings, key, _coerce(getattr(settings, key), value, f"--set {key}"))
    return settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="trained SPIRS run folder or checkpoint (weights to start from)")
    p.add_argument("--manifest", required=True, help="cohort manifest with train/val splits")
    p.add_argument("--out", required=True, help="segmenter folder (created; resumed if it has checkpoints)")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--steps", type=int, default=100, help="steps per epoch")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--minutes", type=float, default=None, help="stop at the first epoch end past this")
    p.add_argument("--cache", default=None, help="folder for preprocessed fine-grid arrays")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training setting")
    p.add_argument("--config-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field of the segmenter, e.g. model.p2_residual_clip=4")
    p.add_argument("--from-segmenter", action="store_true",
                   help="--run is a segmenter (folder or .npz): go on from its weights, grid and poolings")
    args = p.parse_args(argv)

    from spirs_tf import config as config_lib
    from spirs_tf import fine_seg, fine_seg_inference
    from spirs_tf.checkpoints import load_checkpoint, resolve_run
    from spirs_tf.data import PairSource
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.manifest import load_manifest

    try:
        if args.from_segmenter:
            checkpoint, cfg, earlier, state = fine_seg_inference.read_segmenter(args.run)
            factor, extra = earlier.factor, earlier.extra
        else:
            checkpoint, config_path, _ = resolve_run(args.run)
            reg_cfg = config_lib.get_config(config_path)
            factor, extra = args.factor, fine_seg.fine_extra(reg_cfg, args.factor)
            cfg = fine_seg.segmenter_config(reg_cfg, args.factor)
            state, _, _ = load_checkpoint(checkpoint)
        settings = fine_seg.SegmenterSettings(factor=factor, extra=extra, crop=args.crop, epochs=args.epochs,
                                              steps_per_epoch=args.steps, init_from=os.path.abspath(checkpoint))
        _parse_set(args.set, settings).validate()
        cfg = config_lib.apply_overrides(cfg, args.config_set)
        manifest = load_manifest(args.manifest)
        t0 = time.time()
        train = PairSource(manifest, "train", cfg.data, cache_dir=args.cache)
        val = PairSource(manifest, "val", cfg.data, cache_dir=args.cache)
        print(f"segmenter: {len(train)} training and {len(val)} validation pairs on {cfg.data.grid_size}³ at "
              f"{cfg.data.spacing_mm:g} mm ({time.time() - t0:.0f} s)", flush=True)
    except (SpirsInputError, ValueError) as exc:
        print(f"train_segmenter: error: {exc}", file=sys.stderr)
        return 2
    trainer = fine_seg.SegmenterTrainer(cfg, settings, train, val, args.out, init_state=state,
                                        log=lambda s: print(s, flush=True))
    deadline = None if args.minutes is None else time.time() + 60.0 * args.minutes
    try:
        trainer.fit(deadline=deadline)
    except SpirsInputError as exc:  # resuming with other settings
        print(f"train_segmenter: error: {exc}", file=sys.stderr)
        return 2
    print(f"segmenter: {trainer.epoch} of {settings.epochs} epochs in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
