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
    assert result["bins"]["small"] == {"n": 1, "P1": 1, "P2": 0, "P1_only": 1, "P2_only": 0, "mcnemar_p": 1.0}
    assert result["bins"]["medium"]["P1"] == result["bins"]["medium"]["P2"] == 1
    assert result["false_positives_per_scan"] == {"P1": 1.0, "P2": 0.0}
    assert script.mcnemar_exact(0, 10) == pytest.approx(2 * 0.5 ** 10)
    out_json = tmp_path / "r.json"
    assert script.main(["--manifest", str(manifest), "--cases", str(tmp_path / "out"), "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["bins"]["all"]["P1_only"] == 1
    # a case whose new time point the manifest lacks: one line, exit 2
    _save(str(tmp_path / "out" / "p9_0_to_1" / "p1_mask.nii.gz"), medium)
    assert script.main(["--manifest", str(manifest), "--cases", str(tmp_path / "out")]) == 2
    assert "p9" in capsys.readouterr().err
