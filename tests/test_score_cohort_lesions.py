"""experiments/score_cohort_lesions.py: P1/P2 lesion detection in spirs predict case folders, by hand-made masks."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from cohort import experiment_script

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _script():
    return experiment_script("score_cohort_lesions")


def _save(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), AFFINE), path)


def _cube(shape, corner, size):
    m = np.zeros(shape, np.float32)
    i, j, k = corner
    m[i:i + size, j:j + size, k:k + size] = 1
    return m


def test_counts_false_positives_and_mcnemar(tmp_path, capsys):
    """Truth: a small lesion (8 voxels × 8 mm³ = 64 mm³) and a medium one (64 voxels = 512 mm³); P1 finds
    both and adds one false positive, P2 finds the medium one only."""
    shape = (24, 24, 24)
    small, medium = _cube(shape, (3, 3, 3), 2), _cube(shape, (12, 12, 12), 4)
    _save(str(tmp_path / "d" / "p0" / "t0.nii.gz"), small + medium)
    _save(str(tmp_path / "d" / "p0" / "t0_mask.nii.gz"), small)
    _save(str(tmp_path / "d" / "p0" / "t1.nii.gz"), small + medium)
    _save(str(tmp_path / "d" / "p0" / "t1_mask.nii.gz"), small + medium)
    manifest = tmp_path / "d" / "manifest.csv"
    manifest.write_text("patient_id,timepoint,image,mask,split\n"
                        "p0,0,p0/t0.nii.gz,p0/t0_mask.nii.gz,test\np0,1,p0/t1.nii.gz,p0/t1_mask.nii.gz,test\n")
    case = tmp_path / "out" / "p0_0_to_1"
    _save(str(case / "p1_mask.nii.gz"), small + medium + _cube(shape, (20, 2, 2), 2))
    _save(str(case / "p2_mask.nii.gz"), medium)
    script = _script()
    result = script.score(str(manifest), str(tmp_path / "out"))
    assert (result["cases"], result["lesions"]) == (1, 2)
    assert result["bins"]["small"] == {"n": 1, "P1": 1, "P2": 0, "P1_only": 1, "P2_only": 0, "mcnemar_p": 1.0,
                                       "in_warped_prior": 0, "mcnemar_p_holm": 1.0}
    assert result["bins"]["medium"]["P1"] == result["bins"]["medium"]["P2"] == 1
    assert result["false_positives_per_scan"] == {"P1": 1.0, "P2": 0.0}
    # the exact McNemar p is the package's (spirs_tf.stats): 0 against 10 discordant lesions
    assert script._counts([{"P1": False, "P2": True}] * 10 + [{"P1": True, "P2": True}] * 3)["mcnemar_p"] == \
        pytest.approx(2 * 0.5 ** 10)
    assert result["p2_registration"] == {"unknown": 1}  # the hand-made case folder has no report.json
    out_json, out_md = tmp_path / "r.json", tmp_path / "t1.md"
    assert script.main(["--manifest", str(manifest), "--cases", str(tmp_path / "out"), "--json", str(out_json),
                        "--markdown", str(out_md), "--title", "#### T1", "--figure7", str(tmp_path / "f7.png")]) == 0
    assert (tmp_path / "f7.png").stat().st_size > 0 and "Figure 7: 0 lesion(s)" in capsys.readouterr().out
    # P1 and P2 swapped: the small lesion is found by P2 alone, and Figure 7 draws it at its centre
    swap = tmp_path / "swap" / "p0_0_to_1"
    _save(str(swap / "p1_mask.nii.gz"), medium)
    _save(str(swap / "p2_mask.nii.gz"), small + medium)
    swapped = script.score(str(manifest), str(tmp_path / "swap"))
    assert [(r["bin"], tuple(r["centre_voxel"])) for r in swapped["p2_only"]] == [("small", (4, 4, 4))]
    assert script.figure7(swapped, str(tmp_path / "swap"), str(tmp_path / "f7b.png")) == 1
    table = out_md.read_text(encoding="utf-8")
    # small: 1 lesion, P1 found it (100 %, exact interval 2.5–100 %, shown as 3–100), P2 did not (0 %, 0–97.5 %)
    assert table.startswith("#### T1") and "| small | 1 | 100 % (3–100) | 0 % (0–98) | 1 | 0 | 1 | 1 |" in table
    assert "P1 1.00, P2 0.00" in table and "unknown: 1" in table
    assert json.loads(out_json.read_text())["bins"]["all"]["P1_only"] == 1
    # a case whose new time point the manifest lacks: one line, exit 2
    _save(str(tmp_path / "out" / "p9_0_to_1" / "p1_mask.nii.gz"), medium)
    assert script.main(["--manifest", str(manifest), "--cases", str(tmp_path / "out")]) == 2
    assert "p9" in capsys.readouterr().err


def test_synthetic_lesion_groups_and_holm(tmp_path):
    """--synthetic-lesions: a lesion present in the prior and faded now (id 1) and a new one (id 2), named by
    the majority id of lesions.nii.gz; P1 finds both, P2 the faded one only. Holm-adjusted bin p ≥ raw p."""
    shape = (24, 24, 24)
    small, medium = _cube(shape, (3, 3, 3), 2), _cube(shape, (12, 12, 12), 4)
    d = tmp_path / "d"
    for t, mask in ((0, small), (1, small + medium)):
        _save(str(d / "p0" / f"t{t}" / "image.nii.gz"), small + medium + 0.5)
        _save(str(d / "p0" / f"t{t}" / "mask.nii.gz"), mask)
        ids = small * 1 + (medium * 2 if t == 1 else 0)
        ids[3, 3, 3] = 2 if t == 1 else 1  # one stray voxel of another id: the majority names the lesion
        _save(str(d / "p0" / f"t{t}" / "lesions.nii.gz"), ids)
    (d / "manifest.csv").write_text("patient_id,timepoint,image,mask,split\n"
                                    "p0,0,p0/t0/image.nii.gz,p0/t0/mask.nii.gz,test\n"
                                    "p0,1,p0/t1/image.nii.gz,p0/t1/mask.nii.gz,test\n")
    (d / "lesions.csv").write_text("patient_id,timepoint,lesion_id,volume_mm3,contrast\n"
                                   "p0,0,1,64,1.0\np0,1,1,64,0.3\np0,1,2,512,1.0\n")
    case = tmp_path / "out" / "p0_0_to_1"
    _save(str(case / "p1_mask.nii.gz"), small + medium)
    _save(str(case / "p2_mask.nii.gz"), small)
    _save(str(case / "prior_mask_warped.nii.gz"), _cube(shape, (4, 4, 4), 1))  # on the small lesion only
    script = _script()
    result = script.score(str(d / "manifest.csv"), str(tmp_path / "out"), str(d / "lesions.csv"))
    groups = result["prior_groups"]
    assert groups["with_prior"]["all"] == groups["faded"]["all"] == {
        "n": 1, "P1": 1, "P2": 1, "P1_only": 0, "P2_only": 0, "mcnemar_p": 1.0, "in_warped_prior": 1}
    assert groups["new"]["medium"] == {"n": 1, "P1": 1, "P2": 0, "P1_only": 1, "P2_only": 0, "mcnemar_p": 1.0,
                                       "in_warped_prior": 0}
    for b in ("small", "medium"):
        assert result["bins"][b]["mcnemar_p_holm"] >= result["bins"][b]["mcnemar_p"]
    assert "mcnemar_p_holm" not in result["bins"]["micro"]  # an empty bin is not tested
    assert "prior_groups" not in script.score(str(d / "manifest.csv"), str(tmp_path / "out"))
    os.remove(d / "p0" / "t1" / "lesions.nii.gz")
    assert script.main(["--manifest", str(d / "manifest.csv"), "--cases", str(tmp_path / "out"),
                        "--synthetic-lesions", str(d / "lesions.csv")]) == 2


@pytest.mark.parametrize("refinement, expected", [
    ({"mode": "full", "applied": True, "p2_from": "refined registration"}, "refined (full)"),
    ({"mode": "affine", "applied": True, "p2_from": "refined registration"}, "refined (affine)"),
    ({"mode": "off", "applied": False}, "network"),
    (None, "unknown"),
])
def test_p2_registration_read_from_the_report(tmp_path, refinement, expected):
    if refinement is not None:
        (tmp_path / "report.json").write_text(json.dumps({"registration": {"refinement": refinement}}))
    assert _script()._p2_registration(str(tmp_path)) == expected
