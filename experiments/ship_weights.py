"""Copy a trained run's final weights into the package as the shipped demo weights.

    python experiments/ship_weights.py --run runs/cpu-small [--segmenter runs/seg2x]

Writes ``spirs_tf/weights/demo.npz`` (model variables only, no optimiser state, float32),
``demo.json`` (the resolved config) and ``demo.provenance.json`` (where they came from: the
run, stage, epoch, validation metrics of the checkpoint, and the commands that trained them).
The weights were trained on SYNTHETIC data: they demonstrate the package and are not for clinical use.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from spirs_tf import __version__
from spirs_tf.atomic import atomic_write_text
from spirs_tf.inference import DEMO_NAME, WEIGHTS_DIR, find_run_checkpoint
from spirs_tf.checkpoints import load_checkpoint, save_checkpoint


def ship_segmenter(folder: str, out: str, commands: str, overrides: list[str] | None = None) -> None:
    """``weights/demo_segmenter.npz`` (model variables and the segmenter settings, no optimiser state),
    ``.json`` (its config, with ``overrides`` of fields that hold no weights, e.g. ``model.p2_gate_size=3``
    chosen on validation pairs) and ``.provenance.json``, from a segmenter folder's best (else latest)
    checkpoint."""
    from spirs_tf.config import save_config
    from spirs_tf.fine_seg_inference import load_segmenter, segmenter_files
    from spirs_tf.predictor import SEGMENTER_NAME

    cfg = load_segmenter(folder, overrides).cfg  # refuses a broken folder or override before anything is written
    checkpoint, config_path = segmenter_files(folder)
    state, _, meta = load_checkpoint(checkpoint)
    os.makedirs(out, exist_ok=True)
    history = meta.get("history", [])
    save_checkpoint(os.path.join(out, f"{SEGMENTER_NAME}.npz"), state, {},
                    {"kind": "segmenter", "epoch": meta.get("epoch"), "settings": meta["settings"]})
    if overrides:
        save_config(cfg, os.path.join(out, f"{SEGMENTER_NAME}.json"))
    else:
        shutil.copyfile(config_path, os.path.join(out, f"{SEGMENTER_NAME}.json"))
    last = next((r for r in history if r.get("epoch") == meta.get("epoch")), history[-1] if history else {})
    provenance = {
        "trained_on": "SYNTHETIC data (spirs synth); not a model of real patients; not for clinical use",
        "source_checkpoint": os.path.relpath(checkpoint, folder), "epoch": meta.get("epoch"),
        "settings": meta["settings"], "config_overrides": list(overrides or []),
        "validation_at_checkpoint": {k: v for k, v in last.items() if k.startswith("val_")},
        "commands": commands, "spirs_tf_version": __version__, "parameters": int(sum(v.size for v in state.values())),
    }
    atomic_write_text(os.path.join(out, f"{SEGMENTER_NAME}.provenance.json"),
                      json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    print(f"shipped segmenter {checkpoint} (epoch {meta.get('epoch')}) → {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="trained run directory")
    parser.add_argument("--segmenter", help="a segmenter folder (experiments/train_segmenter.py) to ship beside "
                                            "the demo weights: demo_segmenter.{npz,json,provenance.json}")
    parser.add_argument("--segmenter-config-set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a field of the segmenter's config that holds no weights when shipping it "
                             "(repeatable), e.g. model.p2_gate_size=3")
    parser.add_argument("--commands", default="", help="text recording how the run was trained")
    parser.add_argument("--out", default=WEIGHTS_DIR, help="destination folder (default: the package)")
    args = parser.parse_args(argv)
    if not (args.run or args.segmenter):
        parser.error("give --run, --segmenter or both")
    if args.segmenter:
        from spirs_tf.errors import SpirsInputError

        try:
            ship_segmenter(args.segmenter, args.out, args.commands, args.segmenter_config_set)
        except SpirsInputError as exc:
            print(f"ship_weights: error: {exc}", file=sys.stderr)
            return 2
    if not args.run:
        return 0
    checkpoint, config_path, stage = find_run_checkpoint(args.run)
    state, _, meta = load_checkpoint(checkpoint)
    history = meta.pop("history", [])
    last = next((row for row in history if row.get("epoch") == meta.get("epoch")), history[-1] if history else {})
    os.makedirs(args.out, exist_ok=True)
    keep = {k: v for k, v in meta.items() if k in ("stage", "levels", "epoch", "best", "config_name")}
    save_checkpoint(os.path.join(args.out, f"{DEMO_NAME}.npz"), state, {}, keep)
    shutil.copyfile(config_path, os.path.join(args.out, f"{DEMO_NAME}.json"))
    provenance = {
        "trained_on": "SYNTHETIC data (spirs synth); not a model of real patients; not for clinical use",
        "source_checkpoint": os.path.relpath(checkpoint, args.run), "stage": stage, "epoch": meta.get("epoch"),
        "validation_at_checkpoint": {k: v for k, v in last.items() if k.startswith("val_")},
        "commands": args.commands, "spirs_tf_version": __version__,
        "parameters": int(sum(v.size for v in state.values())),
    }
    atomic_write_text(os.path.join(args.out, f"{DEMO_NAME}.provenance.json"),
                      json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    print(f"shipped {checkpoint} (stage {stage}, epoch {meta.get('epoch')}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
