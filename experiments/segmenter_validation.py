"""Compare segmenters on validation pairs, not on a test cohort (issue 16; :mod:`spirs_tf.fine_seg`).

Each segmenter runs on whole pre-aligned pairs of a split (default ``val``) of its training cohort, the
prior placed as in training (the pair's own alignment with the segmenter's jitter, a fixed seed per
pair); the script prints, per segmenter, the lesions P1 and P2 find by size bin and their false-positive
components per scan. Choose what to ship from these numbers, then score the chosen one on test cohorts::

    python experiments/segmenter_validation.py --segmenter runs/seg2x_p2 --segmenter runs/seg2x_bal \
        --manifest runs/data/train128f/manifest.csv --cache runs/cache128 [--pairs 26] [--json OUT.json]

All segmenters must share one grid (the manifest is preprocessed onto it). Bad arguments exit with
code 2 and one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def validation_detection(segmenter, source, pairs: int | None = None, seed: int = 99) -> dict:
    """Lesion detection of P1 and P2 on whole pre-aligned pairs (``source``, e.g. a validation split): how
    segmenters are compared without touching a test cohort (this script).

    Each pair is placed as in training (:func:`spirs_tf.fine_seg.segmenter_sample` with the segmenter's
    prior jitter, no other augmentation, the whole grid, a fixed seed per pair), both masks thresholded at
    0.5; a lesion is found when a predicted voxel overlaps it (:func:`spirs_tf.metrics.lesion_table`).

    Returns:
        ``{"pairs": n, "bins": {bin: {"n", "P1", "P2"}}, "false_positives_per_scan": {"P1", "P2"}}``.
    """
    import dataclasses

    import numpy as np

    from spirs_tf import metrics
    from spirs_tf.fine_seg import SEGMENTER_INPUTS, segmenter_sample

    aug = dataclasses.replace(segmenter.cfg.augment, enabled=False)
    settings = dataclasses.replace(segmenter.settings, crop=0, lesion_balance_mm3=0.0, prior_lesion_scale=1.0)
    spacing = (float(segmenter.cfg.data.spacing_mm),) * 3
    n = len(source) if pairs is None else min(int(pairs), len(source))
    bins = {name: {"n": 0, "P1": 0, "P2": 0} for name, _ in metrics.SIZE_BINS}
    false_pos = {"P1": 0, "P2": 0}
    for i in range(n):
        pair = source[i]
        s = segmenter_sample(pair.fixed_image, pair.moving_image, pair.fixed_mask, pair.moving_mask,
                             np.random.default_rng([seed, i]), aug, settings)
        probs = segmenter(*(s[k][None, ..., None] for k in SEGMENTER_INPUTS))
        truth = s["fixed_mask"] > 0.5
        for name, prob in zip(("P1", "P2"), probs):
            pred = np.asarray(prob)[0, ..., 0] > 0.5
            for row in metrics.lesion_table(truth, pred, spacing):
                bins[row["size_bin"]]["n"] += int(name == "P1")
                bins[row["size_bin"]][name] += int(row["detected"])
            false_pos[name] += len(metrics.false_positive_components(truth, pred, spacing))
    return {"pairs": n, "bins": bins,
            "false_positives_per_scan": {k: v / max(n, 1) for k, v in false_pos.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segmenter", action="append", required=True, help="segmenter folder or .npz (repeatable)")
    p.add_argument("--manifest", required=True, help="the training cohort's manifest")
    p.add_argument("--split", default="val", help="manifest split to score (default val)")
    p.add_argument("--pairs", type=int, default=None, help="at most this many pairs (default all)")
    p.add_argument("--cache", default=None, help="preprocessing cache folder (as train_segmenter --cache)")
    p.add_argument("--config-set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a weightless config field of every segmenter (repeatable), e.g. "
                        "model.p2_gate_size=3")
    p.add_argument("--json", default=None, help="write the counts here")
    args = p.parse_args(argv)

    from spirs_tf import fine_seg_inference
    from spirs_tf.atomic import atomic_write_text
    from spirs_tf.data import PairSource
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.manifest import load_manifest

    try:
        segmenters = [fine_seg_inference.load_segmenter(path, args.config_set) for path in args.segmenter]
        grids = {(s.cfg.data.grid_size, s.cfg.data.spacing_mm) for s in segmenters}
        if len(grids) != 1:
            raise ValueError(f"the segmenters work on different grids: {sorted(grids)}")
        if args.pairs is not None and args.pairs < 1:
            raise ValueError(f"--pairs must be >= 1, got {args.pairs}")
        source = PairSource(load_manifest(args.manifest), args.split, segmenters[0].cfg.data, cache_dir=args.cache)
        if len(source) == 0:
            raise ValueError(f"the manifest has no pairs in split {args.split!r}")
    except (SpirsInputError, ValueError) as exc:
        print(f"segmenter_validation: error: {exc}", file=sys.stderr)
        return 2
    results = {}
    print("| segmenter | pairs | " + " | ".join(f"{b} P1 / P2 (n)" for b in ("micro", "small", "medium", "large"))
          + " | FP per scan P1 / P2 |")
    print("|---|---|---|---|---|---|---|")
    for path, seg in zip(args.segmenter, segmenters):
        r = validation_detection(seg, source, args.pairs)
        results[path] = r
        cells = [f"{c['P1']} / {c['P2']} ({c['n']})" for c in r["bins"].values()]
        fp = r["false_positives_per_scan"]
        print(f"| {path} | {r['pairs']} | " + " | ".join(cells) + f" | {fp['P1']:.2f} / {fp['P2']:.2f} |",
              flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
