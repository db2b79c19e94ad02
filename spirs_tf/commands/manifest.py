"""``spirs manifest check FILE``: list every problem of a data manifest, then a summary.

Each problem is printed on its own line, starting with the manifest path and row. The summary gives
the number of scans and patients and the number of (prior, new) pairs per split. Exit code 0 when the
manifest is clean, 2 when it has problems.
"""
from __future__ import annotations

import argparse
import os


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("manifest", help="check a data manifest (CSV)",
                                   description=__doc__.replace("``", ""))
    verbs = parser.add_subparsers(dest="manifest_command", metavar="ACTION")
    verbs.required = True
    check = verbs.add_parser("check", help="report every problem of a manifest and summarise it",
                             description=__doc__.replace("``", ""))
    check.add_argument("file", metavar="FILE", help="manifest CSV (see data_manifests/README.md)")
    check.add_argument("--no-deep", dest="deep", action="store_false",
                       help="do not open the scans (only the CSV, the paths and the pairing rules)")
    check.add_argument("--pairing", choices=("consecutive", "all"), default="consecutive",
                       help="pairing rule used to count pairs (default: consecutive time points)")
    check.add_argument("--both-directions", action="store_true", help="count reversed pairs too")
    check.set_defaults(func=run)


def summarize(manifest, pairing: str = "consecutive", both_directions: bool = False) -> str:
    """``"N scans, N patients; consecutive pairs per split: train 4, test 2"``."""
    from spirs_tf.manifest import make_pairs

    n_patients = len(manifest.patients())
    per_split = ", ".join(
        f"{split} {len(make_pairs(manifest, split, pairing, both_directions))}" for split in manifest.splits())
    return (f"{len(manifest.scans)} scan(s), {n_patients} patient(s); {pairing} pairs per split: "
            f"{per_split or 'none'}")


def run(args: argparse.Namespace) -> int:
    from spirs_tf.manifest import validate_manifest

    path = os.fspath(args.file)
    manifest, problems = validate_manifest(path, deep=args.deep)
    for line in problems:
        print(line)
    summary = summarize(manifest, args.pairing, args.both_directions)
    if problems:
        print(f"{path}: {len(problems)} problem(s); rows without problems: {summary}")
        return 2
    print(f"{path}: OK: {summary}")
    return 0
