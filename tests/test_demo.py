"""spirs demo end to end on a tiny synthetic patient with a randomly initialised tiny model."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from spirs_tf.cli import main
from spirs_tf.errors import SpirsInputError

sys.path.insert(0, os.path.dirname(__file__))
from cohort import make_fake_run  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("run"))


def test_demo_runs_end_to_end(tiny_run, tmp_path, capsys):
    from spirs_tf.commands.demo import NOT_CLINICAL

    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--model", tiny_run, "--grid", "48", "--spacing", "4"])
    assert code == 0
    text = capsys.readouterr().out
    assert "lesions in the new scan" in text and NOT_CLINICAL in text
    for name in ("p1_mask.nii.gz", "p2_mask.nii.gz", "prior_mask_warped.nii.gz", "qc.png", "report.json",
                 "lesions.csv", "affine.tfm", "deformation.nii.gz"):
        assert (out / "prediction" / name).is_file(), name
    # an identity-initialised network carries the prior mask as the centre alignment puts it: the Dice
    # after is a real number in [0, 1], and the summary line reports both values
    line = next(ln for ln in text.splitlines() if "Dice: before" in ln)
    before, after = (float(x.split()[-1].rstrip(",")) for x in line.split("registration")[1].split("after"))
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    # the lesions one segmentation found and the other missed, counted on the same truth lesions
    line = next(ln for ln in text.splitlines() if "missed by P1" in ln)
    table = {ln.split()[0]: [int(x) for x in ln.split()[1:]] for ln in text.splitlines()
             if ln.strip().startswith(("micro", "small", "medium", "large", "all"))}
    p2_only, p1_only = (int(part.split(":")[1].split()[0]) for part in line.split("; by P1"))
    assert table["all"][1] - p1_only + p2_only == table["all"][2]  # P1 − P1 only + P2 only = P2


def test_demo_refuses_to_overwrite(tiny_run, tmp_path):
    from spirs_tf.commands.demo import run_demo

    (tmp_path / "prediction").mkdir()
    (tmp_path / "prediction" / "old.txt").write_text("keep me")
    with pytest.raises(SpirsInputError, match="demo output exists"):
        run_demo(str(tmp_path), model=tiny_run, grid=48, spacing=4.0)
    assert (tmp_path / "prediction" / "old.txt").read_text() == "keep me"


def test_shipped_weights_carry_the_prior_mask_onto_the_new_scan(tmp_path):
    """The README's main job with the shipped demo weights and the default ``--refine full``, on the
    demo patients of seeds 1-4 (head repositioned between the scans): on average the warped prior mask
    overlaps the new mask much better than the unregistered prior mask does (measured: mean Dice 0.06
    before, 0.68 after, against 0.70 with the TRUE synthetic transform; the network alone 0.20), and on the
    default demo patient (seed 7) the Dice reaches 0.8 (measured 0.93; issue 15's bar). Guards a re-shipped model or a refinement that no
    longer registers. (One patient is too few: each set of weights so far has misplaced the prior
    lesion on some seed.)"""
    import io as _io

    from spirs_tf.commands.demo import run_demo

    summaries = [run_demo(str(tmp_path / f"demo{seed}"), seed=seed, stream=_io.StringIO(), verbose=False)
                 for seed in (1, 2, 3, 4)]
    assert all(s["lesions_truth"] > 0 and s["refine"] == "full" for s in summaries)
    before = np.mean([s["dice_prior_mask_before"] for s in summaries])
    after = np.mean([s["dice_prior_mask_after"] for s in summaries])
    assert after > before + 0.45 and after >= 0.6, summaries
    default = run_demo(str(tmp_path / "demo7"), stream=_io.StringIO(), verbose=False)
    assert default["dice_prior_mask_after"] >= 0.8, default
