"""``spirs synth``: write a synthetic longitudinal brain-metastasis cohort with exact ground truth.

Example: ``spirs synth --patients 10 --out data/synth --seed 0`` writes ``data/synth/manifest.csv`` (ready for
``spirs train``), ``lesions.csv``, and per patient the scans, lesion masks, instance maps, true transforms and a
QC picture (see :mod:`spirs_tf.synthetic`).

A cohort that teaches what the registered prior is for: ``--fade-fraction 0.3`` renders 30 % of the micro
and small lesions that were already in the prior scan faded in the new one (their contrast against the
tissue around them scaled by ``--fade-contrast``, default 0.15-0.45), still marked in both masks, as in a
clinician-edited prior; ``--vessel-like 0.5`` puts half of those on a small vessel, so that they look like
one; ``--new-lesions`` sets the share of lesions that appear at a later time point (no prior). The
defaults change nothing: the same seed gives the same scans as before these options existed.
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


def parse_fraction(text: str, name: str) -> float:
    """``"0.3"`` → 0.3, a number in [0, 1].

    Raises:
        SpirsInputError: not a number between 0 and 1.
    """
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise SpirsInputError(f"--{name} must be a number between 0 and 1, got {text!r}")
    return value


def parse_positive(text: str, name: str) -> float:
    """``"125"`` → 125.0, a finite positive number.

    Raises:
        SpirsInputError: not a finite positive number.
    """
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < float("inf"):
        raise SpirsInputError(f"--{name} must be a positive number, got {text!r}")
    return value


def parse_contrast(text: str) -> tuple[float, float]:
    """``"0.15,0.45"`` → (0.15, 0.45); ``"0.2"`` → (0.2, 0.2).

    Raises:
        SpirsInputError: not one or two numbers with ``0 <= LO <= HI < 1``.
    """
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not 0.0 <= values[0] <= values[-1] < 1.0:
        raise SpirsInputError(f"--fade-contrast must be LO,HI with 0 <= LO <= HI < 1 (relative contrast, "
                              f"e.g. 0.15,0.45), got {text!r}")
    return (values[0], values[-1])


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
    parser.add_argument("--fade-fraction", default="0", metavar="F",
                        help="probability that a lesion present in the prior scan is rendered faded in the new "
                             "scan (per consecutive pair; micro and small lesions, see --fade-max-volume); it "
                             "stays in both masks, as in a clinician-edited prior (default 0: off)")
    parser.add_argument("--fade-contrast", default="0.15,0.45", metavar="LO,HI",
                        help="relative contrast of a faded lesion against the tissue around it, drawn uniformly in "
                             "[LO, HI], 0 <= LO <= HI < 1 (1 = its usual contrast; default 0.15,0.45)")
    parser.add_argument("--fade-max-volume", default="125", metavar="MM3",
                        help="only lesions of at most this volume (mm³) in the new scan fade (default 125: micro "
                             "and small)")
    parser.add_argument("--vessel-like", default="0", metavar="F",
                        help="share of the faded lesions that sit on a small enhancing vessel, so that in the new "
                             "scan they look like a vessel (default 0)")
    parser.add_argument("--new-lesions", default=None, metavar="P",
                        help="probability that a lesion is new: absent (and unmarked) before a later time point, "
                             "so it has no prior (default: 0.15, the generator's trajectory mix unchanged)")
    parser.add_argument("--grid", type=int, default=128, help="voxels per axis of the working grid (default 128)")
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic voxel size in mm (default 1.5)")
    parser.add_argument("--pose", choices=("raw", "aligned"), default="raw",
                        help="raw: random head position per time point (default); aligned: co-registered")
    parser.add_argument("--qc", action=argparse.BooleanOptionalAction, default=None,
                        help="write patient_*/qc.png (default: on for at most 20 patients)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="patients generated at once, one process each (default 1); the files are the same "
                             "for any N")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=run)


def run(args) -> int:
    from spirs_tf.synthetic import SynthConfig, synthesize_cohort

    if args.patients <= 0:
        raise SpirsInputError(f"--patients must be positive, got {args.patients}")
    if args.workers < 1:
        raise SpirsInputError(f"--workers must be at least 1, got {args.workers}")
    cfg = SynthConfig(grid_size=args.grid, spacing_mm=args.spacing,
                      timepoints=parse_range(args.timepoints, "timepoints"), pose=args.pose,
                      lesions_per_patient=parse_range(args.lesions, "lesions"),
                      size_weights=parse_size_weights(args.lesion_sizes),
                      fade_fraction=parse_fraction(args.fade_fraction, "fade-fraction"),
                      fade_contrast=parse_contrast(args.fade_contrast),
                      fade_max_volume_mm3=parse_positive(args.fade_max_volume, "fade-max-volume"),
                      vessel_like_fraction=parse_fraction(args.vessel_like, "vessel-like"),
                      new_lesion_fraction=(None if args.new_lesions is None
                                           else parse_fraction(args.new_lesions, "new-lesions")))

    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    summary = synthesize_cohort(args.out, args.patients, seed=args.seed, cfg=cfg, qc=args.qc, log=log,
                                workers=args.workers)
    print(f"wrote {summary.n_patients} patients, {summary.n_scans} scans to {args.out} "
          f"({summary.seconds:.1f} s, {summary.seconds_per_timepoint:.2f} s per time point); "
          f"manifest: {summary.manifest}")
    return 0
