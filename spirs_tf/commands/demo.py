"""``spirs demo``: synthesise a patient, run ``spirs predict`` on it with the shipped weights, summarise.

The shipped weights (``spirs_tf/weights/demo.*``) were trained on SYNTHETIC data only (the
``cpu-medium`` configuration; see README). They show that the package works end to end; they are not
a model of real patients and are not for clinical use.

``--refine`` (default ``full``) is ``spirs predict --refine``: the network's registration refined on
this pair (affine, then a dense field); ``off`` shows the network alone (the paper).
"""
from __future__ import annotations

import argparse
import os
import sys

NOT_CLINICAL = ("The demo weights were trained on synthetic data only: they are not a model of real "
                "patients and NOT for clinical use.")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="synthesise a patient and run SPIRS on it (no data needed)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="spirs_demo", help="output folder (default: ./spirs_demo)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic patient (default 7)")
    parser.add_argument("--model", default=None,
                        help="run directory, checkpoint or SavedModel (default: the shipped demo weights)")
    parser.add_argument("--grid", type=int, default=128, help="synthetic scanner grid (voxels, default 128)")
    parser.add_argument("--spacing", type=float, default=1.5, help="synthetic scanner spacing (mm, default 1.5)")
    parser.add_argument("--refine", default=None, metavar="{off,affine,full}",
                        help="test-time refinement of the registration (default full; off = the network alone)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo output folder")
    parser.set_defaults(func=run)


def run_demo(out: str, seed: int = 7, model: str | None = None, grid: int = 128, spacing: float = 1.5,
             overwrite: bool = False, stream=None, refine: str = "full", verbose: bool = True) -> dict:
    """Synthesise a two-time-point patient (head repositioned between scans), predict, return a summary.

    ``refine``: ``"off"``, ``"affine"`` or ``"full"`` (:mod:`spirs_tf.refinement`); ``verbose``: the
    refinement's progress line on stderr; ``stream``: where the summary goes (default: ``sys.stdout``
    at call time)."""
    import numpy as np

    from spirs_tf import inference, io, metrics
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.refinement import check_mode
    from spirs_tf.synthetic.cohort import SynthConfig, generate_patient, write_patient

    def say(text: str) -> None:
        print(text, file=stream if stream is not None else sys.stdout, flush=True)  # the current stdout

    check_mode(refine)
    prediction_dir = os.path.join(out, "prediction")
    if os.path.exists(prediction_dir) and os.listdir(prediction_dir) and not overwrite:
        raise SpirsInputError("demo output exists; pass --overwrite or choose another --out", prediction_dir)
    predictor = inference.load_predictor(model)
    say(f"spirs demo: model = {predictor.info.get('kind', 'model')} "
        f"({predictor.info.get('config_name', predictor.info.get('config', '?'))})")
    say(f"  1/3 synthesising patient (seed {seed}, {grid}^3 at {spacing} mm, head repositioned between scans)")
    cfg = SynthConfig(grid_size=grid, spacing_mm=spacing, timepoints=(2, 2), pose="raw", lesions_per_patient=(6, 12))
    patient = generate_patient(0, seed, cfg, patient_id="demo_patient")
    inputs_dir = os.path.join(out, "inputs")
    rows = write_patient(patient, inputs_dir, qc=False)
    prior_row, new_row = rows[0], rows[1]
    prior_img = os.path.join(inputs_dir, prior_row["image"])
    prior_mask = os.path.join(inputs_dir, prior_row["mask"])
    new_img = os.path.join(inputs_dir, new_row["image"])
    new_mask = os.path.join(inputs_dir, new_row["mask"])

    say(f"  2/3 spirs predict --prior tp0 --prior-mask tp0-mask --new tp1 --refine {refine}")
    result = inference.predict_case(predictor, new_img, prior_img, prior_mask, prediction_dir,
                                    overwrite=overwrite, case_id="demo_patient tp0 -> tp1", refine=refine,
                                    verbose=verbose)

    say("  3/3 scoring against the synthetic ground truth")
    truth = io.read_volume(new_mask, kind="mask")
    prior_on_scanner = io.read_volume(prior_mask, kind="mask")  # same scanner grid, head moved
    warped = io.read_volume(os.path.join(prediction_dir, "prior_mask_warped.nii.gz"), kind="mask")
    spacing_mm = truth.spacing
    found = {}
    for name in ("p1", "p2"):
        pred = io.read_volume(os.path.join(prediction_dir, f"{name}_mask.nii.gz"), kind="mask")
        table = metrics.lesion_table(truth.data, pred.data, spacing_mm)
        found[name] = table
    n_truth = len(found["p1"])
    summary = {
        "lesions_truth": n_truth,
        "lesions_found_p1": int(sum(r["detected"] for r in found["p1"])),
        "lesions_found_p2": int(sum(r["detected"] for r in found["p2"])),
        "dice_prior_mask_before": float(metrics.dice(prior_on_scanner.data, truth.data)),
        "dice_prior_mask_after": float(metrics.dice(warped.data, truth.data)),
        "lncc_after": result.report.get("registration", {}).get("lncc"),
        "refine": refine,
        "refine_seconds": result.report.get("timings_s", {}).get("refine", 0.0),
        "out": os.path.abspath(prediction_dir),
    }
    bins = ("micro", "small", "medium", "large")
    say("")
    say("  lesions in the new scan (synthetic truth) and how many each segmentation found:")
    say(f"    {'size bin':<8} {'truth':>6} {'P1':>6} {'P2':>6}")
    for b in bins:
        rows_b = [i for i, r in enumerate(found["p1"]) if r["size_bin"] == b]
        if not rows_b:
            continue
        p1 = sum(found["p1"][i]["detected"] for i in rows_b)
        p2 = sum(found["p2"][i]["detected"] for i in rows_b)
        say(f"    {b:<8} {len(rows_b):>6} {p1:>6} {p2:>6}")
    say(f"    {'all':<8} {n_truth:>6} {summary['lesions_found_p1']:>6} {summary['lesions_found_p2']:>6}")
    # what the prior changed: lesions one segmentation found and the other missed (same truth lesions)
    for key, a, b in (("lesions_p2_only", "p2", "p1"), ("lesions_p1_only", "p1", "p2")):
        rows = [r for r, other in zip(found[a], found[b]) if r["detected"] and not other["detected"]]
        summary[key] = [{"size_bin": r["size_bin"], "volume_mm3": float(r["volume_mm3"])} for r in rows]
    listed = {k: ", ".join(f"{r['size_bin']} {r['volume_mm3']:.0f} mm³" for r in summary[k]) or "none"
              for k in ("lesions_p2_only", "lesions_p1_only")}
    say(f"  found by P2 (with the prior) and missed by P1: {len(summary['lesions_p2_only'])} "
        f"({listed['lesions_p2_only']}); by P1 and missed by P2: {len(summary['lesions_p1_only'])} "
        f"({listed['lesions_p1_only']})")
    say(f"  prior mask vs new mask, Dice: before registration {summary['dice_prior_mask_before']:.3f}, "
        f"after {summary['dice_prior_mask_after']:.3f}")
    say(f"  registration: the network alone (--refine off)" if refine == "off" else
        f"  registration: the network, refined on this pair (--refine {refine}, {summary['refine_seconds']:.1f} s)")
    seg = result.report.get("segmentation", {})
    if seg.get("model") == "segmenter":
        say(f"  segmentation: P1 and P2 from the shipped segmenter on a {seg['factor']}x finer grid "
            f"({'x'.join(map(str, seg['grid']))}), the prior placed by the {seg['p2_prior_from']}")
    say(f"  outputs: {summary['out']} (QC picture: qc.png)")
    say(f"  {NOT_CLINICAL}")
    if not np.isfinite(summary["dice_prior_mask_after"]):
        raise SpirsInputError("demo produced a non-finite Dice; please report this")
    return summary


def run(args) -> int:
    from spirs_tf.refinement import DEFAULT_REFINE, check_mode

    run_demo(args.out, seed=args.seed, model=args.model, grid=args.grid, spacing=args.spacing,
             overwrite=args.overwrite, refine=check_mode(args.refine if args.refine is not None else DEFAULT_REFINE))
    return 0
