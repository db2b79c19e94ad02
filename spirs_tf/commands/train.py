"""``spirs train``: train one coarse-to-fine stage (the same as ``experiments/run_stage.py``)."""
from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3),
                        help="1 = coarsest level only (batch 32, BatchNorm trainable); 2 = levels 1-2 from "
                             "stage 1; 3 = levels 1-3 from stage 2")
    parser.add_argument("--config", default="paper", help="named config (paper, cpu-small, test) or JSON file")
    parser.add_argument("--manifest", required=True, help="manifest CSV (see data_manifests/README.md)")
    parser.add_argument("--out", required=True, help="run directory (holds stage1/, stage2/, stage3/)")
    parser.add_argument("--init-from", default=None,
                        help="checkpoint to start from (default: the previous stage's best in --out)")
    parser.add_argument("--init-skip", default="", metavar="MODULES",
                        help="comma-separated modules (enc, aff, def, seg, fuse) NOT taken from the initial "
                             "checkpoint: they start freshly initialised, e.g. 'fuse' to train a P2 fusion block "
                             "of another design (model.p2_residual) on trained registration and P1")
    parser.add_argument("--epochs", type=int, default=None, help="override the stage's epoch count")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set model.base_filters=16 (repeatable)")
    parser.add_argument("--distribute", choices=("none", "mirrored", "multi_worker"), default=None,
                        help="tf.distribute strategy (default: the config's train.distribute)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after about this many minutes, at an epoch end or cutting the running epoch "
                             "short; checkpointed, and the same command resumes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train one stage of SPIRS on a manifest",
                                   description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from spirs_tf import config as config_lib
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.train import make_strategy, run_stage

    init_skip = tuple(m.strip() for m in args.init_skip.split(",") if m.strip())
    unknown = [m for m in init_skip if m not in config_lib.MODULE_NAMES]
    if unknown:
        raise SpirsInputError(f"--init-skip: unknown module(s) {', '.join(unknown)}; known: "
                              f"{', '.join(config_lib.MODULE_NAMES)}")
    if init_skip and not args.init_from:
        raise SpirsInputError("--init-skip needs --init-from (the checkpoint whose other modules are loaded)")

    overrides = list(args.overrides)
    if args.distribute:
        overrides.append(f"train.distribute={args.distribute}")
    cfg = config_lib.get_config(args.config, overrides)
    strategy = make_strategy(cfg.train.distribute)
    deadline = None if args.max_minutes is None else time.time() + 60.0 * args.max_minutes
    trainer = run_stage(cfg, args.stage, args.manifest, args.out, init_from=args.init_from, epochs=args.epochs,
                        verbose=0 if args.quiet else 1, strategy=strategy, deadline=deadline,
                        init_skip=init_skip)
    if trainer.stop_reason:
        print(f"stage {args.stage}: stopped at the time limit ({trainer.stop_reason}); run the same command to "
              "go on")
    return 0
