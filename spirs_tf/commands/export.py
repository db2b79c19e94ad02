"""``spirs export --run RUN --out DIR``: write a trained model as a TensorFlow SavedModel.

RUN is a run directory (highest stage, best checkpoint) or a checkpoint .npz with its config.json;
without --run, the shipped demo weights with their segmenter. The SavedModel's ``serving_default``
signature takes preprocessed working-grid inputs ``new_image``, ``prior_image``, ``prior_mask`` and
returns ``p1_prob``, ``p2_prob``, ``affine``, ``dvf``, ``prior_warped``, ``prior_mask_warped``; with a
segmenter (--segmenter, or the shipped one) its ``segment`` signature gives P1 and P2 on the segmenter's
finer grid (see spirs_tf/export.py). ``spirs predict --model DIR`` uses both.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a trained model as a TensorFlow SavedModel",
                                   description=__doc__.replace("``", ""))
    parser.add_argument("--run", default=None, help="run directory or checkpoint .npz (default: the shipped "
                                                    "demo weights and their segmenter)")
    parser.add_argument("--segmenter", default=None, metavar="DIR",
                        help="also export this segmenter (folder of experiments/train_segmenter.py, or its .npz) "
                             "as the 'segment' signature; 'off' = none (default: the shipped segmenter without "
                             "--run, none with --run)")
    parser.add_argument("--out", required=True, help="SavedModel folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from spirs_tf.errors import SpirsInputError
    from spirs_tf.export import export_saved_model
    from spirs_tf.inference import load_predictor

    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.overwrite:
        raise SpirsInputError("output exists (use --overwrite to replace it)", out)  # before loading the model
    predictor = load_predictor(args.run)
    if args.segmenter == "off":
        predictor.segmenter = None
    elif args.segmenter:
        from spirs_tf.fine_seg_inference import check_segmenter_fits, load_segmenter

        predictor.segmenter = load_segmenter(args.segmenter)
        check_segmenter_fits(predictor.segmenter, predictor.cfg)
    out = export_saved_model(predictor, args.out, overwrite=args.overwrite)
    seg = predictor.segmenter
    extra = f"; segmenter on {seg.cfg.data.grid_size}^3" if seg is not None else ""
    print(f"spirs: SavedModel written to {out} (input grid {predictor.size}^3, {predictor.levels} level(s){extra})")
    return 0
