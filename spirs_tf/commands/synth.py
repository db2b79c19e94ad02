"""``spirs synth``: write a synthetic longitudinal brain-metastasis cohort with exact ground truth.

Example: ``spirs synth --patients 10 --out data/synth --seed 0`` writes ``data/synth/manifest.csv`` (ready for
``spirs train``), ``lesions.csv``, and per patient the scans, lesion masks, instance maps, true transforms and a
QC picture (see :mod:`spirs_tf.synthetic`).
"""
from __future__ import annotations

import argparse
import sys

from spirs_tf.errors import SpirsInputError


def parse_range(text: str, name: str) -> tuple[int, int]:
    """``"3-6"`` → (3, 6); ``"4"`` → (4, 4).

    Raises:
        SpirsInputError: not one integer or two integers joined by ``-``.
    """
    parts = str(text).split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise SpirsInputError(f"--{name} must be N or MIN-MAX (e.g. 3-6), got {text!r}")
    return (values[0], values[-1])


def parse_size_weights(text: str) -> tuple[float, float, float, float]:
    """``"paper"`` → the paper's test-set counts; ``"0,1,1,1"`` → (0.0, 1.0, 1.0, 1.0).

    Raises:
        SpirsInputError: not four non-negative numbers with a positive sum.
    """
    from spirs_tf.synthetic.lesions import PAPER_TEST_COUNTS

    if str(text).strip().lower() == "paper":
        return tuple(PAPER_TEST_COUNTS)
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or any(not v >= 0 for v in values) or sum(values) <= 0:
        raise SpirsInputError("--lesion-sizes must be 'paper' or four non-negative numbers with a positive sum "
                              f"(micro,small,medium,large), got {text!r}")
    return values


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("synth", help="generate a synthetic longitudinal metastasis cohort",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, required=True, help="number of patients (> 0)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (patient k is the same for any N)")
    parser.add_argument("--timepoints", default="3-6", help="time points per patient, N or MIN-MAX (default 3-6)")
    parser.add_argument("--lesions", default="1-20", help="metastases per patient, N or MIN-MAX (default 1-20)")
    parser.add_argument("--lesion-sizes", default="paper", metavar="W,W,W,W",
                        help="relative frequency of micro, small, medium and large lesions (<25, <125, <1000, "
                             ">=1000 mm³), or 'paper' for the paper's test set, 637,465,156,72 (default). "
                             "On coarse grids, e.g. 0,1,1,1 leaves out micro lesions smaller than a 3 mm voxel")
    parser.add_argument("--grid", type=int, default=128, help="voxels per axis of the working grid (default 128)")
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic voxel size in mm (default 1.5)")
    parser.add_argument("--pose", choices=("raw", "aligned"), default="raw",
                        help="raw: random head position per time point (default); aligned: co-registered")
    parser.add_argument("--qc", action=argparse.BooleanOptionalAction, default=None,
                        help="write patient_*/qc.png (default: on for at most 20 patients)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=run)


def run(args) -> int:
    from spirs_tf.synthetic import SynthConfig, synthesize_cohort

    if args.patients <= 0:
        raise SpirsInputError(f"--patients must be positive, got {args.patients}")
    cfg = SynthConfig(grid_size=args.grid, spacing_mm=args.spacing,
                      timepoints=parse_range(args.timepoints, "timepoints"), pose=args.pose,
                      lesions_per_patient=parse_range(args.lesions, "lesions"),
                      size_weights=parse_size_weights(args.lesion_sizes))
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    summary = synthesize_cohort(args.out, args.patients, seed=args.seed, cfg=cfg, qc=args.qc, log=log)
    print(f"wrote {summary.n_patients} patients, {summary.n_scans} scans to {args.out} "
          f"({summary.seconds:.1f} s, {summary.seconds_per_timepoint:.2f} s per time point); "
          f"manifest: {summary.manifest}")
    return 0
