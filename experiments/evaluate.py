"""Evaluate a trained SPIRS run on a manifest split: per-case CSV files first, then a results snippet.

Writes into ``--out`` (all atomically):

* ``per_pair.csv`` -- one row per pair and method (``identity``: the pair as it enters the network;
  ``SPIRS``): LNCC (unmasked, masked), Dice of the warped prior mask, for affine and deformable
  registration, % folding and std log-Jacobian of the whole deformable map; unsuffixed columns for the
  finest level, ``_l1``, ``_l2``, ``_l3`` per pyramid level (:mod:`spirs_tf.evaluation`). Read by
  ``experiments/stats.py --registration``.
* ``per_lesion.csv`` -- one row per ground-truth lesion of the new scan and method (``P1`` without,
  ``P2`` with the prior): volume, size bin, detected, Dice, HD95 (mm, ``inf`` when missed). Read by
  ``experiments/segmentation_table.py`` and ``experiments/stats.py --lesions``.
* ``per_pair_segmentation.csv`` -- per pair and method: lesion counts, false positives, global Dice and
  the BraTS-2023 lesion-wise Dice/HD95 (``experiments/stats.py --registration FILE --reference P2``).
* ``evaluation.json`` (run, data, counts) and ``results.md`` (medians with IQR, to paste into
  ``experiments/RESULTS.md``; labelled synthetic when the manifest comes from ``spirs synth``).

Usage::

    python experiments/evaluate.py --run runs/cpu-small --manifest test/manifest.csv --split all --out results/eval
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from spirs_tf import evaluation as ev  # noqa: E402
from spirs_tf.atomic import atomic_write_text  # noqa: E402
from spirs_tf.errors import SpirsInputError  # noqa: E402
from spirs_tf.metrics import SIZE_BINS  # noqa: E402


def evaluate(run_path: str, manifest: str, split: str | None, out_dir: str, pairing: str | None = None,
             limit: int | None = None, synthetic: str = "auto", log=print) -> dict:
    """Run the evaluation and write the files listed in the module docstring; returns the summary dict."""
    run = ev.load_run(run_path)
    source = ev.pair_source(run, manifest, split, pairing, limit)
    window = run.cfg.loss.lncc_window
    reg_rows, lesion_rows, seg_rows = [], [], []
    levels = ()
    start = time.perf_counter()
    for k, result in enumerate(ev.iterate_pairs(run, source)):
        levels = result.levels
        reg_rows.extend(ev.registration_rows(result, window))
        lesions, seg = ev.segmentation_rows(result)
        lesion_rows.extend(lesions)
        seg_rows.extend(seg)
        log(f"[{k + 1}/{len(source)}] {result.pair_id}")
    os.makedirs(out_dir, exist_ok=True)
    ev.write_csv(os.path.join(out_dir, "per_pair.csv"), reg_rows, ev.registration_columns(levels))
    ev.write_csv(os.path.join(out_dir, "per_lesion.csv"), lesion_rows, ev.LESION_COLUMNS)
    ev.write_csv(os.path.join(out_dir, "per_pair_segmentation.csv"), seg_rows, ev.SEGMENTATION_COLUMNS)
    label = ev.data_label(manifest, synthetic)
    info = {"data": label, "manifest": os.path.abspath(manifest), "split": split or "all",
            "pairing": source.data_cfg.pairing, "pairs": len(source), "levels": list(levels),
            "lesions": sum(1 for r in lesion_rows if r["method"] == "P1"), "run": run.describe(),
            "seconds": time.perf_counter() - start}
    ev.write_info(out_dir, "evaluation", info)
    atomic_write_text(os.path.join(out_dir, "results.md"), markdown(reg_rows, lesion_rows, seg_rows, info))
    return info


def markdown(reg_rows, lesion_rows, seg_rows, info) -> str:
    """Results snippet: registration medians per level and lesion detection per size bin."""
    lines = [f"#### Evaluation — data: **{info['data']}**", "",
             f"Run `{info['run']['checkpoint']}` (config {info['run']['config']}, stage {info['run']['stage']}, "
             f"grid {info['run']['grid']}³ at {info['run']['spacing_mm']:g} mm); split `{info['split']}`, "
             f"{info['pairs']} pairs ({info['pairing']}), {info['lesions']} lesions. Median (IQR).", "",
             "| level | method | LNCC affine | LNCC deformable | LNCC masked deformable | DSC affine "
             "| DSC deformable | % folding |", "|---|---|---|---|---|---|---|---|"]
    for level in info["levels"]:
        for method in ("identity", "SPIRS"):
            rows = [r for r in reg_rows if r["method"] == method]
            cells = [ev.median_iqr_text([r.get(f"{c}_l{level}") for r in rows], 3) for c in
                     ("lncc_affine", "lncc_deformable", "lncc_masked_deformable", "dice_affine",
                      "dice_deformable", "folding_percent")]
            lines.append(f"| {level} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "| size bin | lesions | P1 detected | P2 detected | P1 DSC | P2 DSC |", "|---|---|---|---|---|---|"]
    for name, _ in SIZE_BINS:
        p1 = [r for r in lesion_rows if r["method"] == "P1" and r["size_bin"] == name]
        p2 = [r for r in lesion_rows if r["method"] == "P2" and r["size_bin"] == name]
        lines.append(f"| {name} | {len(p1)} | {sum(r['detected'] for r in p1)} | {sum(r['detected'] for r in p2)} "
                     f"| {ev.median_iqr_text([r['dice'] for r in p1])} "
                     f"| {ev.median_iqr_text([r['dice'] for r in p2])} |")
    for method in ev.SEGMENTATION_METHODS:
        rows = [r for r in seg_rows if r["method"] == method]
        lines.append(f"\n{method}: BraTS-2023 lesion-wise Dice {ev.median_iqr_text([r['brats_dice'] for r in rows])}, "
                     f"HD95 {ev.median_iqr_text([r['brats_hd95'] for r in rows], 1)} mm (median over pairs).")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ev.add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = evaluate(args.run, args.manifest, ev.split_arg(args.split), args.out, args.pairing, args.limit,
                        args.synthetic)
    except SpirsInputError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"evaluate: {info['pairs']} pairs, {info['lesions']} lesions ({info['data']}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
