"""Test-time refinement wired into prediction: ``spirs predict/demo --refine``, the Python API's
``refine="off"|"affine"|"full"``, cohort mode, report.json fields, the SavedModel fallback and the
XLA compile-cache switch of the CLI. Tiny volumes (test config, 32³ model grid)."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from scipy import ndimage

from spirs_tf import cli, geometry, inference, metrics
from spirs_tf.io import write_volume

from test_inference import NEW_AFFINE, SHAPE, brain_and_lesions, fake_predictor, load, oblique_affine

#: A brain that fills the test config's 32³ 6 mm working grid (the 20×24×18 one of test_inference is a
#: few voxels wide there: too small to register).
BIG = (36, 40, 32)
BIG_AFFINE = oblique_affine((0.3, -0.2, 0.25), (4.5, 4.0, 5.0), (5.0, -3.0, 8.0), flip=(-1, 1, 1), perm=(1, 0, 2),
                            shape=BIG)

VOLUMES = ("prior_warped.nii.gz", "prior_mask_warped.nii.gz", "prior_labels_warped.nii.gz", "p1_prob.nii.gz",
           "p2_prob.nii.gz", "p1_mask.nii.gz", "p2_mask.nii.gz", "deformation.nii.gz")


def rotated(volume, degrees, order):
    """``volume`` rotated by ``degrees`` in the (0, 1) plane about its centre, scaled by 1.05 (same grid)."""
    a = np.deg2rad(degrees)
    m = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) / 1.05
    c = (np.asarray(volume.shape) - 1) / 2
    return ndimage.affine_transform(volume, m, offset=c - m @ c, order=order, mode="constant")


def write_moved(folder, shape, affine):
    """new = a brain; prior = the same brain rotated by 12° and zoomed (same grid), with its mask: the
    identity-initialised network leaves it misaligned. Returns the paths."""
    image, lesions = brain_and_lesions(shape)
    paths = {k: str(folder / f"{k}.nii.gz") for k in ("new", "new_mask", "prior", "mask")}
    write_volume(paths["new"], image, affine)
    write_volume(paths["new_mask"], lesions, affine)
    write_volume(paths["prior"], rotated(image, 12.0, 1).astype(np.float32), affine)
    write_volume(paths["mask"], (rotated(lesions.astype(np.float32), 12.0, 1) >= 0.5).astype(np.uint8), affine)
    return paths


@pytest.fixture
def moved(tmp_path):
    """:func:`write_moved` with a brain that fills the working grid: the refinement has work to do."""
    return write_moved(tmp_path, BIG, BIG_AFFINE)


def predict_args(paths, out, run_dir, *extra):
    return ["predict", "--new", paths["new"], "--prior", paths["prior"], "--prior-mask", paths["mask"],
            "--out", str(out), "--model", run_dir, *extra]


# -------------------------------------------------------------------------------- flags and modes
@pytest.mark.parametrize("command", ["predict", "demo"])
def test_bad_refine_value_is_one_line_exit_2(command, moved, run_dir, tmp_path, capsys):
    args = predict_args(moved, tmp_path / "o", run_dir, "--refine", "fast") if command == "predict" else \
        ["demo", "--out", str(tmp_path / "d"), "--model", run_dir, "--refine", "fast"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--refine must be one of off, affine, full, got 'fast'" in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()
    with pytest.raises(inference.SpirsInputError, match="--refine must be one of"):
        inference.predict_case(fake_predictor(np.eye(3, 4), np.zeros((32, 32, 32, 3))), moved["new"],
                               moved["prior"], moved["mask"], str(tmp_path / "api"), refine="ful")
    assert not (tmp_path / "api").exists()


def test_refine_off_gives_exactly_the_network_outputs(predictor, run_dir, moved, tmp_path, capsys):
    """``--refine off`` through the CLI = the Python API without refinement, file for file; the report
    only adds the mode."""
    plain = inference.predict_case(predictor, moved["new"], moved["prior"], moved["mask"], str(tmp_path / "plain"))
    assert cli.main(predict_args(moved, tmp_path / "off", run_dir, "--refine", "off", "--quiet")) == 0
    assert capsys.readouterr().out == ""
    for name in VOLUMES:
        a, aff_a = load(tmp_path / "plain" / name)
        b, aff_b = load(tmp_path / "off" / name)
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(aff_a, aff_b)
    assert (tmp_path / "plain" / "affine.tfm").read_text() == (tmp_path / "off" / "affine.tfm").read_text()
    off = json.loads((tmp_path / "off" / "report.json").read_text())
    assert off["registration"]["refinement"] == {"mode": "off", "applied": False, "seconds": 0.0}
    reg = {k: v for k, v in off["registration"].items() if k != "refinement"}
    assert reg == json.loads(json.dumps(plain.report["registration"]))
    assert off["warnings"] == plain.report["warnings"]


def test_full_writes_the_refined_transform(run_dir, predictor, moved, tmp_path, capsys):
    """``spirs predict`` (default: ``--refine full``) on a rotated + zoomed prior: the registration
    improves (LNCC and the warped-prior-mask Dice), the report records mode, per-stage seconds and
    LNCC before/after, and the written files ARE the refined transform: SimpleITK applying
    affine.tfm + deformation.nii.gz to the original prior reproduces prior_warped.nii.gz (< 1e-4) and
    prior_mask_warped.nii.gz (trilinear ≥ 0.5). Folding stays 0 %."""
    import SimpleITK as sitk

    out = tmp_path / "full"
    assert cli.main(predict_args(moved, out, run_dir)) == 0
    captured = capsys.readouterr()
    assert "refine affine" in captured.err and "refine deformable" in captured.err  # progress lines
    assert "spirs: refinement full: LNCC" in captured.out
    rep = json.loads((out / "report.json").read_text())
    ref = rep["registration"]["refinement"]
    assert ref["mode"] == "full" and ref["applied"] and ref["p2_from"] == "refined registration"
    assert ref["info"]["fixed_mask"] is None and ref["info"]["moving_mask"] == "prior lesion mask"
    assert set(ref["info"]["seconds"]) == {"affine", "deformable"}
    assert {"refine", "refine_affine", "refine_deformable"} <= set(rep["timings_s"])
    assert rep["timings_s"]["refine"] >= rep["timings_s"]["refine_affine"] + rep["timings_s"]["refine_deformable"]
    assert ref["lncc_after"] > ref["lncc_before"] + 0.02, ref
    assert ref["lncc_after"] == pytest.approx(rep["registration"]["lncc"], abs=1e-6)
    assert rep["registration"]["affine_voxel"] != ref["network_affine_voxel"]
    assert rep["registration"]["folding_percent"] == 0.0 and rep["warnings"] == []
    # the refined registration carries the prior mask better than the network's (identity here)
    plain = inference.predict_case(predictor, moved["new"], moved["prior"], moved["mask"], str(tmp_path / "net"))
    truth = load(moved["new_mask"])[0]
    dice_net = metrics.dice(load(tmp_path / "net" / "prior_mask_warped.nii.gz")[0], truth)
    dice_ref = metrics.dice(load(out / "prior_mask_warped.nii.gz")[0], truth)
    assert dice_ref > dice_net + 0.1, (dice_net, dice_ref)
    assert plain.report["registration"]["lncc"] == pytest.approx(ref["lncc_before"], abs=0.02)
    # the files written are the refined transform
    fixed = sitk.ReadImage(moved["new"])
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(out / "affine.tfm")))
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "deformation.nii.gz"),
                                                                          sitk.sitkVectorFloat64)))

    def warp(path):
        moving = sitk.ReadImage(path, sitk.sitkFloat64)
        return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, composite, sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat64))

    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "prior_warped.nii.gz")))
    assert np.abs(warp(moved["prior"]) - ours).max() < 1e-4
    soft = warp(moved["mask"])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "prior_mask_warped.nii.gz")))
    clear = np.abs(soft - 0.5) > 1e-4  # ties at exactly 0.5 may round either way
    np.testing.assert_array_equal(mask[clear], (soft >= 0.5)[clear])
    assert mask.sum() > 0


def test_affine_mode_api_and_savedmodel_fallback(moved, tmp_path):
    """``refine="affine"`` in the Python API with a predictor that cannot recompute P2 (as a SavedModel):
    the registration is refined (zero field), P2 stays the network's, and a warning says so."""
    predictor = fake_predictor(geometry.params_to_matrix(geometry.IDENTITY_PARAMS), np.zeros((32, 32, 32, 3)))
    assert predictor.p2_fn is None
    plain = inference.predict_case(predictor, moved["new"], moved["prior"], moved["mask"], str(tmp_path / "net"))
    result = inference.predict_case(predictor, moved["new"], moved["prior"], moved["mask"], str(tmp_path / "aff"),
                                    refine="affine", verbose=False)
    ref = result.report["registration"]["refinement"]
    assert ref["mode"] == "affine" and ref["info"]["seconds"]["deformable"] == 0.0
    assert ref["p2_from"] == "network registration"
    assert any("P2 uses the network's registration" in w for w in result.report["warnings"])
    assert result.report["registration"]["max_displacement_mm"] == 0.0  # zero field after the refined affine
    np.testing.assert_array_equal(load(tmp_path / "aff" / "p2_prob.nii.gz")[0],
                                  load(tmp_path / "net" / "p2_prob.nii.gz")[0])
    assert result.report["registration"]["lncc"] > plain.report["registration"]["lncc"] + 0.02


def test_a_refinement_that_lowers_the_lncc_is_not_used(predictor, tmp_path, monkeypatch):
    """A refinement that ends below the network's masked LNCC (planted: its affine shifted by 4 voxels
    after the optimisation; before keep-best in ``refine_affine`` the affine stage itself diverged on
    this brain only a few voxels wide on the model grid) is not used: the network's registration is
    kept, file for file, with a warning; the report still has the block."""
    from spirs_tf import refine as refine_lib

    original = refine_lib.refine

    def shifted(*args, **kwargs):
        matrix, dvf, info = original(*args, **kwargs)
        return matrix + np.array([[0, 0, 0, 4.0]] * 3, np.float32), dvf, info

    monkeypatch.setattr(refine_lib, "refine", shifted)
    paths = write_moved(tmp_path, SHAPE, NEW_AFFINE)
    # warm-up: the predictor's very first call may differ from later ones by float noise (1e-12)
    inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(tmp_path / "warm"))
    plain = inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(tmp_path / "net"))
    result = inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(tmp_path / "ref"),
                                    refine="full", verbose=False)
    ref = result.report["registration"]["refinement"]
    assert ref["mode"] == "full" and ref["applied"] is False
    lncc = ref["info"]["masked_lncc"]
    assert lncc["refined"] < lncc["network"], lncc
    assert any("lowered the masked LNCC" in w and "network's registration is kept" in w
               for w in result.report["warnings"])
    for name in VOLUMES:
        np.testing.assert_array_equal(load(tmp_path / "ref" / name)[0], load(tmp_path / "net" / name)[0], name)
    assert result.report["registration"]["lncc"] == plain.report["registration"]["lncc"]


def test_cohort_with_refinement(predictor, run_dir, tmp_path, capsys):
    """``spirs predict --manifest ... --refine full``: every case refined, the summary's ``refine`` and
    ``lncc_network`` columns filled, the masked LNCC not lowered by the refinement. (The unmasked LNCC
    of these small brains, mostly background windows, may drop: the QC warning then says so.)"""
    from cohort import make_cohort

    manifest = make_cohort(str(tmp_path / "data"), n_patients=2, n_timepoints=2, shape=(20, 20, 20),
                           spacing=5.0, splits=("test",))
    out = tmp_path / "pred"
    assert cli.main(["predict", "--manifest", manifest, "--split", "test", "--out", str(out), "--model", run_dir,
                     "--refine", "full", "--quiet"]) == 0
    with open(out / "cohort_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["done", "done"] and {r["refine"] for r in rows} == {"full"}
    for r in rows:
        rep = json.loads((out / r["case_id"] / "report.json").read_text())
        ref = rep["registration"]["refinement"]
        assert ref["mode"] == "full" and "refine_deformable" in rep["timings_s"]
        assert float(r["lncc_network"]) == pytest.approx(ref["lncc_before"])
        assert float(r["lncc"]) == pytest.approx(ref["lncc_after"] if ref["applied"] else ref["lncc_before"])
        assert ref["info"]["masked_lncc"]["refined"] >= ref["info"]["masked_lncc"]["network"] - 1e-3


# ---------------------------------------------------------------------------------- XLA cache switch
def test_cli_xla_cache_switch(monkeypatch, tmp_path):
    """``SPIRS_XLA_CACHE``: off turns the cache off, a folder relocates it (only before TensorFlow is
    imported; here TensorFlow is already loaded, so the flag is computed by xla_cache directly)."""
    from spirs_tf.xla_cache import enable_compile_cache

    monkeypatch.setenv("SPIRS_XLA_CACHE", "off")
    monkeypatch.setenv("TF_XLA_FLAGS", "")
    assert cli._enable_xla_cache() is None and os.environ["TF_XLA_FLAGS"] == ""
    monkeypatch.setenv("SPIRS_XLA_CACHE", str(tmp_path / "xla"))
    assert cli._enable_xla_cache() is None  # TensorFlow already imported: too late, nothing changes
    assert os.environ["TF_XLA_FLAGS"] == ""
    assert enable_compile_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
    assert f"--tf_xla_persistent_cache_directory={tmp_path / 'xla'}" in os.environ["TF_XLA_FLAGS"]
    assert (tmp_path / "xla").is_dir()
