"""``spirs export --run RUN --out DIR``: write a trained model as a TensorFlow SavedModel.

RUN is a run directory (highest stage, best checkpoint) or a checkpoint .npz with its config.json.
The SavedModel's ``serving_default`` signature takes preprocessed working-grid inputs ``new_image``,
``prior_image``, ``prior_mask`` and returns ``p1_prob``, ``p2_prob``, ``affine``, ``dvf``,
``prior_warped``, ``prior_mask_warped`` (see spirs_tf/export.py); ``spirs predict --model DIR`` uses it.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a trained model as a TensorFlow SavedModel",
                                   description=__doc__.replace("``", ""))
    parser.add_argument("--run", required=True, help="run directory or checkpoint .npz")
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
    out = export_saved_model(predictor, args.out, overwrite=args.overwrite)
    print(f"spirs: SavedModel written to {out} (input grid {predictor.size}^3, {predictor.levels} level(s))")
    return 0
