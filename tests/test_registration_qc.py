"""Registration QC (``report.json`` warnings + one stderr line each) on planted bad cases, the intensity
checks of the inputs, and the test-time refinement hook of the prediction flow."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from spirs_tf import cli, config, geometry, inference, qc
from spirs_tf.errors import SpirsInputError
from spirs_tf.io import Volume, write_volume

from test_inference import NEW_AFFINE, SHAPE, brain_and_lesions, fake_predictor, load


@pytest.fixture
def scans(tmp_path):
    """new = prior (same scan, same grid) with its lesion mask: the identity is the right answer."""
    image, lesions = brain_and_lesions(SHAPE)
    paths = {"new": str(tmp_path / "new.nii.gz"), "prior": str(tmp_path / "prior.nii.gz"),
             "mask": str(tmp_path / "mask.nii.gz")}
    write_volume(paths["new"], image, NEW_AFFINE)
    write_volume(paths["prior"], image, NEW_AFFINE)
    write_volume(paths["mask"], lesions, NEW_AFFINE)
    return paths


def predict(predictor, paths, out, **kw):
    return inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(out), **kw)


ZERO_DVF = np.zeros((32, 32, 32, 3))


# ------------------------------------------------------------------------------ decomposition
@pytest.mark.parametrize("angles,scales", [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                                           ((0.3, -0.2, 0.5), (0.8, 1.1, 1.3)),
                                           ((np.pi / 3, 0.0, 0.0), (1.0, 1.0, 1.0))])
def test_affine_scales_rotation_recovers_planted_values(angles, scales):
    """L = R·diag(s) (scales along the axes, then a rotation): the polar decomposition gives back s and
    the rotation angle arccos((tr R − 1)/2) of R = Rx·Ry·Rz."""
    rx, ry, rz = geometry.rotation_matrices(np.asarray(angles))
    r = rx @ ry @ rz
    got_scales, got_angle = inference.affine_scales_rotation(r @ np.diag(scales))
    np.testing.assert_allclose(got_scales, np.sort(scales), atol=1e-9)
    assert got_angle == pytest.approx(math.degrees(math.acos((np.trace(r) - 1) / 2)), abs=1e-6)


def test_registration_warnings_thresholds():
    good = {"lncc_identity": 0.5, "lncc": 0.8, "folding_percent": 0.0}
    assert inference.registration_warnings(good, np.eye(4)) == []
    lowered = inference.registration_warnings({**good, "lncc": 0.4}, np.eye(4))
    assert len(lowered) == 1 and "LNCC 0.400 after, 0.500 before" in lowered[0]
    # a drop within the tolerance (a pair registered to itself) is not suspect
    tol = qc.LNCC_DROP_TOLERANCE
    assert inference.registration_warnings({**good, "lncc": 0.5 - 0.8 * tol}, np.eye(4)) == []
    assert len(inference.registration_warnings({**good, "lncc": 0.5 - 1.2 * tol}, np.eye(4))) == 1
    # the brain-masked pair, when present, decides (not the background-dominated unmasked one)
    masked = {**good, "lncc": 0.4, "lncc_identity_masked": 0.3, "lncc_masked": 0.9}
    assert inference.registration_warnings(masked, np.eye(4)) == []
    worse = inference.registration_warnings({**masked, "lncc_masked": 0.2}, np.eye(4))
    assert len(worse) == 1 and "masked LNCC 0.200 after, 0.300 before" in worse[0]
    folded = inference.registration_warnings({**good, "folding_percent": 0.6}, np.eye(4))
    assert len(folded) == 1 and "folds 0.60 %" in folded[0]
    assert inference.registration_warnings({**good, "folding_percent": 0.5}, np.eye(4)) == []
    for s, n in ((0.69, 1), (0.71, 0), (1.39, 0), (1.41, 1)):
        assert len(inference.registration_warnings(good, np.diag([1.0, s, 1.0, 1.0]))) == n, s
    rot = np.eye(4)
    for deg, n in ((44.0, 0), (46.0, 1)):
        rot[:3, :3] = geometry.rotation_matrices(np.array([0.0, 0.0, np.radians(deg)]))[2]
        warnings = inference.registration_warnings(good, rot)
        assert len(warnings) == n and (n == 0 or f"rotates by {deg:.0f}°" in warnings[0]), deg


# ------------------------------------------------------------------------- planted bad cases
def test_good_case_has_no_warning(scans, tmp_path, capsys):
    result = predict(fake_predictor(geometry.params_to_matrix(geometry.IDENTITY_PARAMS), ZERO_DVF), scans,
                     tmp_path / "good")
    assert result.report["warnings"] == []
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "good" / "report.json").read_text())["warnings"] == []


@pytest.mark.parametrize("kind", ["lncc", "folding", "scale", "rotation"])
def test_planted_bad_registration_warns(kind, scans, tmp_path, capsys):
    """Each planted failure gives its warning in report.json and one ``spirs: warning: <case>:`` line."""
    params = np.array(geometry.IDENTITY_PARAMS, np.float64)
    dvf = ZERO_DVF.copy()
    if kind == "lncc":
        params[0] = 4.0  # a 4-voxel shift of the same scan: similarity drops
    elif kind == "folding":
        dvf = np.random.default_rng(0).normal(scale=1.5, size=dvf.shape)
    elif kind == "scale":
        params[6] = 1.6
    else:
        params[5] = np.radians(60)
    result = predict(fake_predictor(geometry.params_to_matrix(params), dvf), scans, tmp_path / kind,
                     case_id=f"case_{kind}")
    warnings = result.report["warnings"]
    key = {"lncc": "lowered the similarity", "folding": "folds", "scale": "scales by",
           "rotation": "rotates by"}[kind]
    assert any(key in w for w in warnings), warnings
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"spirs: warning: case_{kind}: ")]
    assert len(lines) == len(warnings) and any(key in ln for ln in lines)
    if kind == "folding":
        assert result.report["registration"]["folding_percent"] > inference.FOLDING_WARN_PERCENT
    if kind == "scale":
        assert max(result.report["registration"]["affine_scales"]) == pytest.approx(1.6, abs=1e-3)
    if kind == "rotation":
        assert result.report["registration"]["affine_rotation_deg"] == pytest.approx(60, abs=1e-3)


# ------------------------------------------------------------------------------ input intensities
def scaled_nifti(path, data, inter, slope=1.0):
    """A gzipped NIfTI-1 whose header stores ``scl_slope``/``scl_inter`` over raw float32 ``data``
    (patched into bytes 112–119 of the header: nibabel would bake a scaling of float data into it)."""
    import gzip

    raw = path.with_suffix("")  # .nii
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), NEW_AFFINE), raw)
    blob = bytearray(raw.read_bytes())
    blob[112:120] = np.array([slope, inter], "<f4").tobytes()
    path.write_bytes(gzip.compress(bytes(blob)))
    raw.unlink()
    return str(path)


def test_huge_scl_inter_warns_then_refuses(scans, tmp_path, capsys):
    """scl_inter = 1e7 on float32 data: intensities 0..1000 keep ~1000 float32 steps → a warning naming
    the stored scaling; intensities 0..3 collapse to 4 values → refused as effectively constant (exit 2,
    one line, nothing written)."""
    image, _ = brain_and_lesions(SHAPE)
    wide = scaled_nifti(tmp_path / "wide.nii.gz", image * 600, 1e7)
    vol = inference.read_case_inputs(wide, scans["prior"], scans["mask"])
    assert len(vol.warnings) == 1 and "scl_inter 1e+07" in vol.warnings[0] and "dynamic range" in vol.warnings[0]
    result = inference.predict_case(fake_predictor(geometry.params_to_matrix(geometry.IDENTITY_PARAMS), ZERO_DVF),
                                    wide, scans["prior"], scans["mask"], str(tmp_path / "wide_case"),
                                    case_id="wide")
    assert any("dynamic range" in w for w in result.report["warnings"])
    assert any(ln.startswith("spirs: warning: wide: ") and "dynamic range" in ln
               for ln in capsys.readouterr().err.splitlines())

    flat = scaled_nifti(tmp_path / "flat.nii.gz", image, 1e7)
    with pytest.raises(SpirsInputError, match="effectively constant"):
        inference.read_case_inputs(flat, scans["prior"], scans["mask"])
    code = cli.main(["predict", "--new", flat, "--prior", scans["prior"], "--prior-mask", scans["mask"],
                     "--out", str(tmp_path / "flat_case")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "flat.nii.gz" in err[0] and "scl_inter" in err[0]
    assert not (tmp_path / "flat_case").exists()


def test_constant_and_mask_like_images(scans, tmp_path):
    constant = Volume(np.full(SHAPE, 3.0, np.float32), NEW_AFFINE, "constant.nii.gz")
    with pytest.raises(SpirsInputError, match="constant"):
        inference.intensity_problems(constant)
    _, lesions = brain_and_lesions(SHAPE)
    mask_like = Volume(lesions.astype(np.float32), NEW_AFFINE, "mask_as_scan.nii.gz")
    problems = inference.intensity_problems(mask_like)
    assert len(problems) == 1 and "2 distinct intensity values" in problems[0]
    image, _ = brain_and_lesions(SHAPE)
    assert inference.intensity_problems(Volume(image, NEW_AFFINE, "ok.nii.gz")) == []


# ---------------------------------------------------------------------------- refinement hook
@pytest.fixture(scope="module")
def model_predictor(tmp_path_factory):
    from cohort import make_fake_run

    return inference.load_predictor(make_fake_run(tmp_path_factory.mktemp("run"), perturb=0.05))


def test_refine_returning_network_registration_changes_nothing(model_predictor, scans, tmp_path):
    """A refinement that hands back the network's own affine and DVF: the prior re-warped in NumPy
    and P2 recomputed by the model's fusion block equal the network's outputs (so the hook's warp and
    P2 path are the model's)."""
    seen = {}

    def same(predictor, case, outputs):
        seen.update(outputs)
        return {"affine": outputs["affine"], "dvf": outputs["dvf"], "info": {"method": "echo"}}

    plain = predict(model_predictor, scans, tmp_path / "plain")
    refined = predict(model_predictor, scans, tmp_path / "refined", refine=same)
    case = inference.prepare_case(inference.read_case_inputs(scans["new"], scans["prior"], scans["mask"]),
                                  model_predictor)
    (outputs,), _ = inference.run_network(model_predictor, [case])
    again, info = inference.apply_refinement(model_predictor, case, outputs, same)
    assert info["applied"] and info["info"] == {"method": "echo"}
    for name in ("prior_warped", "prior_mask_warped", "p2_prob"):
        np.testing.assert_allclose(again[name], outputs[name], atol=2e-5, err_msg=name)
    for name in ("prior_warped.nii.gz", "p2_prob.nii.gz", "p2_mask.nii.gz"):
        np.testing.assert_allclose(load(tmp_path / "refined" / name)[0], load(tmp_path / "plain" / name)[0],
                                   atol=2e-5, err_msg=name)
    rep = refined.report
    assert rep["registration"]["refinement"]["applied"] and "refine" in rep["timings_s"]
    assert "refinement" not in plain.report["registration"] and "refine" not in plain.report["timings_s"]


def test_refine_replaces_the_registration_everywhere(model_predictor, scans, tmp_path):
    """A refinement that returns a pure 3-voxel translation (zero DVF): the report, the written affine
    and the warped prior all follow it; P2 is recomputed from the new warped prior."""
    shift = geometry.params_to_matrix(np.r_[3.0, 0, 0, 0, 0, 0, 1, 1, 1, np.zeros(6)])
    calls = []

    def translate(predictor, case, outputs):
        calls.append(case)
        return {"affine": shift, "dvf": np.zeros_like(outputs["dvf"])}

    result = predict(model_predictor, scans, tmp_path / "t", refine=translate)
    assert len(calls) == 1
    np.testing.assert_allclose(result.report["registration"]["affine_voxel"], shift, atol=1e-6)
    want = inference.predict_case(fake_predictor(shift, ZERO_DVF), scans["new"], scans["prior"], scans["mask"],
                                  str(tmp_path / "fake"))
    np.testing.assert_allclose(load(tmp_path / "t" / "prior_warped.nii.gz")[0],
                               load(tmp_path / "fake" / "prior_warped.nii.gz")[0], atol=1e-5)
    assert want.report["registration"]["lncc"] == pytest.approx(result.report["registration"]["lncc"], abs=1e-5)
    case = inference.prepare_case(inference.read_case_inputs(scans["new"], scans["prior"], scans["mask"]),
                                  model_predictor)
    (outputs,), _ = inference.run_network(model_predictor, [case])
    refined, _ = inference.apply_refinement(model_predictor, case, outputs, translate)
    p2 = model_predictor.p2_fn(case.new_image[None, ..., None], refined["prior_warped"][None],
                               refined["prior_mask_warped"][None])[0]
    np.testing.assert_allclose(refined["p2_prob"], p2, atol=1e-6)
    np.testing.assert_allclose(refined["p1_prob"], outputs["p1_prob"])


def test_refine_none_and_savedmodel_limits(scans, tmp_path):
    predictor = fake_predictor(geometry.params_to_matrix(geometry.IDENTITY_PARAMS), ZERO_DVF)
    result = predict(predictor, scans, tmp_path / "none", refine=lambda p, c, o: None)
    assert result.report["registration"]["refinement"]["applied"] is False
    with pytest.raises(ValueError, match="cannot recompute P2"):
        predict(predictor, scans, tmp_path / "x", refine=lambda p, c, o: {"affine": o["affine"]})
    assert not (tmp_path / "x").exists()
    cfg = config.get_config("test")
    assert cfg.level_grid(3) == 32


def test_refine_with_a_finer_dvf_equals_the_same_field_on_the_working_grid(model_predictor, scans, tmp_path):
    """A refined field handed back on the 2× finer grid (fine voxel 2i = working voxel i, vectors in
    fine voxels) that is the exact trilinear refinement of a working-grid field gives the same case as
    that working-grid field: the native-grid resampling and the compact ITK field (on the fine grid)
    interpolate it exactly. The compact field is reproduced by SimpleITK."""
    import SimpleITK as sitk
    from scipy import ndimage

    g = np.stack(np.meshgrid(*[np.linspace(0, np.pi, 32)] * 3, indexing="ij"), -1)
    coarse = 0.8 * np.sin(g[..., [1, 2, 0]]) * np.cos(g[..., [2, 0, 1]])
    j = np.stack(np.meshgrid(*[np.arange(64) / 2.0] * 3, indexing="ij"))
    fine = 2 * np.stack([ndimage.map_coordinates(coarse[..., a], j, order=1, mode="nearest") for a in range(3)], -1)
    affine = geometry.params_to_matrix(np.r_[1.0, -0.5, 0.3, 0.05, 0, -0.04, 1.02, 0.98, 1, np.zeros(6)])
    cases = {}
    for name, dvf in (("coarse", coarse), ("fine", fine)):
        out = tmp_path / name
        cases[name] = predict(model_predictor, scans, out,
                              refine=lambda p, c, o, dvf=dvf: {"affine": affine, "dvf": dvf})
    for name in ("prior_warped.nii.gz", "prior_mask_warped.nii.gz", "p2_prob.nii.gz"):
        np.testing.assert_allclose(load(tmp_path / "fine" / name)[0], load(tmp_path / "coarse" / name)[0],
                                   atol=1e-5, err_msg=name)
    f_img = nib.load(tmp_path / "fine" / "deformation.nii.gz")
    c_img = nib.load(tmp_path / "coarse" / "deformation.nii.gz")
    np.testing.assert_allclose(np.linalg.norm(f_img.affine[:3, :3], axis=0),
                               np.linalg.norm(c_img.affine[:3, :3], axis=0) / 2, rtol=1e-5)
    fixed = sitk.ReadImage(scans["new"])
    moving = sitk.ReadImage(scans["prior"], sitk.sitkFloat64)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(tmp_path / "fine" / "affine.tfm")))
    composite.AddTransform(sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(tmp_path / "fine" / "deformation.nii.gz"), sitk.sitkVectorFloat64)))
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat64))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "fine" / "prior_warped.nii.gz")))
    assert np.abs(warped - ours).max() < 1e-4
    assert cases["fine"].report["registration"]["lncc"] == pytest.approx(cases["coarse"].report["registration"]["lncc"],
                                                                       abs=1e-6)


def test_warp_working_is_the_zero_padded_trilinear_warp():
    """The hook's NumPy warp = SciPy's ``grid-constant`` trilinear warp at p(x) = M(x − c) + t + u(x) + c
    (the reference the network's spatial transformer is tested against), also across a non-zero border."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    volume = rng.random((12, 10, 14)).astype(np.float32) + 1.0  # non-zero up to the border
    matrix = geometry.params_to_matrix(np.r_[1.5, -2.0, 0.7, 0.2, -0.1, 0.15, 1.1, 0.9, 1.0, np.zeros(6)])
    dvf = rng.normal(scale=0.7, size=(12, 10, 14, 3))
    want = ndimage.map_coordinates(volume.astype(np.float64), geometry.sample_locations(matrix, volume.shape, dvf),
                                   order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(inference.warp_working(volume, matrix, dvf), want, atol=1e-5)
