"""Train one coarse-to-fine stage of SPIRS.

    python experiments/run_stage.py --stage 1 --config cpu-small --manifest M.csv --out runs/cpu-small
    python experiments/run_stage.py --stage 2 --config cpu-small --manifest M.csv --out runs/cpu-small
    python experiments/run_stage.py --stage 3 --config cpu-small --manifest M.csv --out runs/cpu-small

Stage n > 1 starts from stage n−1's best checkpoint in the same run directory. A killed run resumes
from its last checkpoint when started again with the same arguments. This script only parses
arguments; the work is done by :func:`spirs_tf.train.run_stage`.
"""
from __future__ import annotations

import argparse
import sys

from spirs_tf.cli import main as spirs_main
from spirs_tf.commands.train import add_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.parse_args(argv)  # validate here so --help shows this script's usage
    return spirs_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
