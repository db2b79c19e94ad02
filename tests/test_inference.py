"""Inference end to end: case folders on the new grid, identity and translation truths, ITK/SimpleITK
reproduction of the written transforms, model loading, cohort resume, bad inputs and atomicity."""
from __future__ import annotations

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from spirs_tf import cli, cohort_predict, config, geometry, inference
from spirs_tf import predictor as predictor_lib
from spirs_tf.io import write_volume

SHAPE = (20, 24, 18)
SPACING = (2.5, 3.0, 3.5)
VOLUMES = ("prior_warped.nii.gz", "prior_mask_warped.nii.gz", "prior_labels_warped.nii.gz", "p1_prob.nii.gz",
           "p2_prob.nii.gz", "p1_mask.nii.gz", "p2_mask.nii.gz")
FIELDS = ("deformation.nii.gz", "transform_total.nii.gz")
OTHER = ("affine.tfm", "lesions.csv", "qc.png", "report.json")


def oblique_affine(angles, spacing, centre, flip=(1, 1, 1), perm=(0, 1, 2), shape=SHAPE) -> np.ndarray:
    """Rotation × axis permutation/flip × spacing: an oblique, non-RAS-stored voxel → RAS affine
    whose array centre lies at world ``centre``."""
    rx, ry, rz = geometry.rotation_matrices(np.asarray(angles, float))
    p = np.eye(3)[:, list(perm)] * np.asarray(flip, float)
    a = np.eye(4)
    a[:3, :3] = rx @ ry @ rz @ p @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre, float) - a[:3, :3] @ (np.asarray(shape) / 2)
    return a


def brain_and_lesions(shape, seed=0):
    """Zero-bordered textured ellipsoid 'brain' and two spherical lesions (binary uint8)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = np.sqrt(((g / np.array([0.75, 0.8, 0.7]).reshape(3, 1, 1, 1)) ** 2).sum(0)) < 1
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
    image = (brain * (0.6 + 0.3 * g[0] + 2.0 * texture)).clip(0, None).astype(np.float32)
    lesions = (((g[0] - 0.25) ** 2 + (g[1] - 0.1) ** 2 + g[2] ** 2 < 0.05)
               | ((g[0] + 0.3) ** 2 + (g[1] + 0.3) ** 2 + (g[2] - 0.2) ** 2 < 0.03)) & brain
    image[lesions] += 1.0
    return image, lesions.astype(np.uint8)


NEW_AFFINE = oblique_affine((0.3, -0.2, 0.25), SPACING, (5.0, -3.0, 8.0), flip=(-1, 1, 1), perm=(1, 0, 2))


@pytest.fixture
def scans(tmp_path):
    """new.nii.gz (oblique, anisotropic, permuted/flipped storage) with the prior = the same scan as
    NRRD, plus the lesion mask (NIfTI and NRRD)."""
    image, lesions = brain_and_lesions(SHAPE)
    paths = {"new": str(tmp_path / "new.nii.gz"), "prior": str(tmp_path / "prior.nrrd"),
             "mask": str(tmp_path / "mask.nrrd"), "new_mask": str(tmp_path / "new_mask.nii.gz")}
    write_volume(paths["new"], image, NEW_AFFINE)
    write_volume(paths["prior"], image, NEW_AFFINE)
    write_volume(paths["mask"], lesions, NEW_AFFINE)
    write_volume(paths["new_mask"], lesions, NEW_AFFINE)
    return paths, image, lesions


def load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


# ------------------------------------------------------------------------------------ end to end
def test_case_folder_complete_on_new_grid(predictor, scans, tmp_path):
    """``transforms="all"``: every output, both fields on the new grid."""
    paths, image, _ = scans
    out = tmp_path / "out" / "case"
    result = inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(out),
                                    transforms="all")
    assert sorted(os.listdir(out)) == sorted(VOLUMES + FIELDS + OTHER) == sorted(result.files)
    for name in VOLUMES:
        data, affine = load(out / name)
        assert data.shape == SHAPE, name
        np.testing.assert_allclose(affine, NEW_AFFINE, atol=1e-4)
    for name in ("p1_mask.nii.gz", "p2_mask.nii.gz", "prior_mask_warped.nii.gz"):
        data, _ = load(out / name)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    for name in ("p1_prob.nii.gz", "p2_prob.nii.gz"):
        prob, _ = load(out / name)
        mask, _ = load(out / name.replace("prob", "mask"))
        assert prob.min() >= 0 and prob.max() <= 1
        np.testing.assert_array_equal(mask, prob >= 0.5)
    for name in FIELDS:
        img = nib.load(out / name)
        assert img.shape == SHAPE + (1, 3) and img.header.get_intent()[0] == "vector"
        np.testing.assert_allclose(img.affine, NEW_AFFINE, atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert "not for clinical use" in report["note"]
    assert set(report["timings_s"]) == {"read", "preprocess", "network", "resample_write"}
    assert set(report["versions"]) >= {"spirs-tf", "tensorflow", "keras", "numpy"}
    assert report["model"]["stage"] == 3 and report["model"]["config"] == "test"
    assert report["inputs"]["prior"] == paths["prior"]
    assert report["outputs"] == result.files
    assert [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")] == []
    assert report["transforms"]["written"] == "all" and report["warnings"] == []


def test_default_transforms_itk_writes_compact_field_and_none_writes_none(predictor, scans, tmp_path):
    """Default ``itk``: affine.tfm + deformation.nii.gz on its compact field grid (the working grid's
    spacing, covering the new scan), no transform_total; ``none``: no transform file at all."""
    paths, image, _ = scans
    out = tmp_path / "itk"
    result = inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(out))
    assert sorted(os.listdir(out)) == sorted(VOLUMES + ("deformation.nii.gz",) + OTHER) == sorted(result.files)
    img = nib.load(out / "deformation.nii.gz")
    assert img.shape[3:] == (1, 3) and img.header.get_intent()[0] == "vector"
    assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), 6.0, atol=1e-4)  # test config: 6 mm
    corners = np.array([[(n - 1) * b for n, b in zip(SHAPE, bits)] + [1] for bits in np.ndindex(2, 2, 2)]).T
    inside = (np.linalg.inv(img.affine) @ NEW_AFFINE @ corners)[:3]
    assert np.all(inside >= 0) and np.all(inside <= np.array(img.shape[:3])[:, None] - 1)
    assert result.report["transforms"]["written"] == "itk"
    out = tmp_path / "none"
    result = inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(out),
                                    transforms="none")
    no_transform = tuple(n for n in OTHER if n != "affine.tfm")
    assert sorted(os.listdir(out)) == sorted(VOLUMES + no_transform) == sorted(result.files)
    assert result.report["registration"]["max_displacement_mm"] == pytest.approx(0.0, abs=1e-5)


def test_identity_model_same_scan_carries_prior_exactly(predictor, scans, tmp_path):
    """Identity affine + zero DVF + prior == new (same grid): the warped prior is the new scan."""
    paths, image, lesions = scans
    out = tmp_path / "case"
    result = inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(out),
                                    transforms="all")
    warped, _ = load(out / "prior_warped.nii.gz")
    np.testing.assert_allclose(warped, image, atol=1e-5)
    np.testing.assert_array_equal(load(out / "prior_mask_warped.nii.gz")[0], lesions)
    labels, n = ndimage.label(lesions, structure=np.ones((3, 3, 3)))
    np.testing.assert_array_equal(load(out / "prior_labels_warped.nii.gz")[0], labels)
    assert n == 2 and result.report["lesions"]["prior_lesions"] == 2
    # NIfTI stores the affine in float32, NRRD in text: the two headers agree to ~1e-6 mm
    np.testing.assert_allclose(load(out / "transform_total.nii.gz")[0], 0, atol=1e-5)
    assert result.report["registration"]["lncc"] == pytest.approx(1.0)
    assert result.report["registration"]["folding_percent"] == 0.0


def test_pure_translation_is_absorbed_by_centring(predictor, scans, tmp_path):
    """Prior = new data with its world affine shifted by s: the brain-centred working grids absorb s,
    so the identity model carries the mask exactly onto the new mask and affine.tfm is x ↦ x + F·s."""
    import SimpleITK as sitk

    paths, image, lesions = scans
    shift = np.array([12.0, -7.0, 5.0])
    moved = NEW_AFFINE.copy()
    moved[:3, 3] += shift
    write_volume(tmp_path / "prior_shifted.nii.gz", image, moved)
    write_volume(tmp_path / "mask_shifted.nii.gz", lesions, moved)
    out = tmp_path / "case"
    result = inference.predict_case(predictor, paths["new"], str(tmp_path / "prior_shifted.nii.gz"),
                                    str(tmp_path / "mask_shifted.nii.gz"), str(out))
    np.testing.assert_array_equal(load(out / "prior_mask_warped.nii.gz")[0], load(paths["new_mask"])[0])
    np.testing.assert_allclose(load(out / "prior_warped.nii.gz")[0], image, atol=1e-5)
    expected = np.eye(4)
    expected[:3, 3] = shift
    np.testing.assert_allclose(result.report["registration"]["affine_world_ras"], expected, atol=1e-6)
    tx = sitk.ReadTransform(str(out / "affine.tfm"))
    np.testing.assert_allclose(tx.TransformPoint((1.0, 2.0, 3.0)), np.array([1, 2, 3]) + shift * [-1, -1, 1],
                               atol=1e-6)


def test_model_with_fewer_levels_uses_strided_working_grid(run_dir, scans, tmp_path):
    """A 2-level model takes S = 16 (every 2nd working voxel); the identity still carries exactly."""
    from spirs_tf import networks

    cfg = config.get_config("test")
    predictor = inference.keras_predictor(networks.build_spirs(cfg, 2, bn_trainable=False), cfg, 2)
    assert (predictor.size, predictor.subsample_factor) == (16, 2)
    paths, image, lesions = scans
    inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(tmp_path / "c"))
    np.testing.assert_allclose(load(tmp_path / "c" / "prior_warped.nii.gz")[0], image, atol=1e-5)
    np.testing.assert_array_equal(load(tmp_path / "c" / "prior_mask_warped.nii.gz")[0], lesions)


# -------------------------------------------------------------------------- ITK / SimpleITK proof
def fake_predictor(matrix, dvf):
    """A Predictor whose 'network' returns a fixed non-trivial affine and DVF (test config, S = 32)."""
    cfg = config.get_config("test")

    def run(new, prior, mask):
        p = geometry.sample_locations(matrix, new.shape[1:4], dvf)
        warp = lambda v: ndimage.map_coordinates(v[0, ..., 0], p, order=1, mode="grid-constant",  # noqa: E731
                                                 prefilter=False)[None, ..., None]
        return {"p1_prob": (new > 0.8).astype(np.float32), "p2_prob": warp(mask),
                "affine": np.asarray(matrix, np.float32)[None], "dvf": np.asarray(dvf, np.float32)[None],
                "prior_warped": warp(prior), "prior_mask_warped": warp(mask)}

    return inference.Predictor(cfg, 3, run, {"kind": "test"})


def oblique_case(tmp_path, transforms="all"):
    """Predict a case with a non-trivial affine + DVF between two different oblique, anisotropic,
    non-RAS-stored grids (new: NIfTI, prior: NRRD); return the case folder."""
    image, _ = brain_and_lesions(SHAPE, seed=1)
    prior_shape = (22, 20, 24)
    prior_img, prior_mask = brain_and_lesions(prior_shape, seed=1)
    prior_affine = oblique_affine((-0.15, 0.1, 0.4), (3.0, 2.5, 3.0), (2.0, 4.0, -3.0), flip=(1, -1, 1),
                                  perm=(2, 0, 1), shape=prior_shape)
    write_volume(tmp_path / "new.nii.gz", image, NEW_AFFINE)
    write_volume(tmp_path / "prior.nrrd", prior_img, prior_affine)
    write_volume(tmp_path / "mask.nrrd", prior_mask, prior_affine)
    matrix = geometry.params_to_matrix([0.6, -0.4, 0.3, 0.08, -0.05, 0.1, 1.05, 0.97, 1.02,
                                        0.02, 0, 0, 0.01, 0, -0.02])
    g = np.stack(np.meshgrid(*[np.linspace(0, np.pi, 32)] * 3, indexing="ij"), -1)
    dvf = 0.8 * np.sin(g[..., [1, 2, 0]]) * np.cos(g[..., [2, 0, 1]])
    out = tmp_path / f"case_{transforms}"
    inference.predict_case(fake_predictor(matrix, dvf), str(tmp_path / "new.nii.gz"), str(tmp_path / "prior.nrrd"),
                           str(tmp_path / "mask.nrrd"), str(out), transforms=transforms)
    return out


def test_simpleitk_reproduces_prior_warped(tmp_path):
    """SimpleITK resampling the ORIGINAL prior with (a) DisplacementFieldTransform(transform_total)
    and (b) CompositeTransform[affine.tfm, deformation] (added last = applied first) reproduces
    prior_warped.nii.gz to < 1e-4 (intensities 0–1.7; measured ~8e-7, float32 field storage). New
    and prior have different oblique, anisotropic, non-RAS-stored grids. Reading the vectors as RAS
    instead of LPS breaks it (error > 0.1), so the test pins the component convention."""
    import SimpleITK as sitk

    out = oblique_case(tmp_path)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "prior_warped.nii.gz")))
    fixed = sitk.ReadImage(str(tmp_path / "new.nii.gz"))
    moving = sitk.ReadImage(str(tmp_path / "prior.nrrd"), sitk.sitkFloat64)

    def field(name, flip=False):
        f = sitk.ReadImage(str(out / name), sitk.sitkVectorFloat64)
        assert f.GetNumberOfComponentsPerPixel() == 3 and f.GetSize() == fixed.GetSize()
        if flip:  # reinterpret the components as RAS: wrong on purpose
            arr = sitk.GetArrayFromImage(f) * [-1, -1, 1]
            f2 = sitk.GetImageFromArray(arr, isVector=True)
            f2.CopyInformation(f)
            f = f2
        return sitk.DisplacementFieldTransform(f)

    def resample(tx):
        return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat64))

    total_err = np.abs(resample(field("transform_total.nii.gz")) - ours).max()
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(out / "affine.tfm")))
    composite.AddTransform(field("deformation.nii.gz"))
    composite_err = np.abs(resample(composite) - ours).max()
    assert ours.max() > 1.0  # the prior landed on the new grid
    print(f"SimpleITK vs ours: total field {total_err:.2e}, composite {composite_err:.2e}")
    assert total_err < 1e-4 and composite_err < 1e-4, (total_err, composite_err)
    assert np.abs(resample(field("transform_total.nii.gz", flip=True)) - ours).max() > 0.1
    # the affine alone differs: the DVF matters
    assert np.abs(resample(sitk.ReadTransform(str(out / "affine.tfm"))) - ours).max() > 0.1


def test_simpleitk_reproduces_prior_warped_with_compact_field(tmp_path):
    """The default ``itk`` files: CompositeTransform[affine.tfm, deformation.nii.gz] with the
    deformation on its compact field grid (not the new grid) reproduces prior_warped.nii.gz to < 1e-4
    (ITK interpolates the field linearly, as spirs did), and the same case written with ``all`` gives
    the same prior_warped."""
    import SimpleITK as sitk

    out = oblique_case(tmp_path, transforms="itk")
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "prior_warped.nii.gz")))
    fixed = sitk.ReadImage(str(tmp_path / "new.nii.gz"))
    moving = sitk.ReadImage(str(tmp_path / "prior.nrrd"), sitk.sitkFloat64)
    f = sitk.ReadImage(str(out / "deformation.nii.gz"), sitk.sitkVectorFloat64)
    assert f.GetSize() != fixed.GetSize()
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(out / "affine.tfm")))
    composite.AddTransform(sitk.DisplacementFieldTransform(f))
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat64))
    err = np.abs(warped - ours).max()
    print(f"SimpleITK (compact field) vs ours: {err:.2e}")
    assert ours.max() > 1.0 and err < 1e-4, err
    full = oblique_case(tmp_path, transforms="all")
    np.testing.assert_array_equal(load(full / "prior_warped.nii.gz")[0], load(out / "prior_warped.nii.gz")[0])


def test_ants_apply_transforms_reproduces_prior_warped(tmp_path):
    """Optional (antspyx): ``antsApplyTransforms -t deformation.nii.gz -t affine.tfm`` and
    ``-t transform_total.nii.gz`` reproduce prior_warped.nii.gz (< 1e-4; measured ~1e-6); the other
    order does not (> 0.1). Runs where the ``baselines`` extra is installed."""
    ants = pytest.importorskip("ants")
    out = oblique_case(tmp_path)
    ours = nib.load(out / "prior_warped.nii.gz").get_fdata()
    fixed, moving = ants.image_read(str(tmp_path / "new.nii.gz")), ants.image_read(str(tmp_path / "prior.nrrd"))

    def apply(*names):
        warped = ants.apply_transforms(fixed, moving, transformlist=[str(out / n) for n in names],
                                       interpolator="linear")
        return np.abs(warped.numpy() - ours).max()

    assert apply("deformation.nii.gz", "affine.tfm") < 1e-4
    assert apply("transform_total.nii.gz") < 1e-4
    assert apply("affine.tfm", "deformation.nii.gz") > 0.1
    out = oblique_case(tmp_path, transforms="itk")  # the default: compact field grid
    assert apply("deformation.nii.gz", "affine.tfm") < 1e-4


# ------------------------------------------------------------------------------------ model loading
def test_find_run_checkpoint_prefers_highest_stage_and_best(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.copytree(run / "stage3", run / "stage1")
    ckpt, cfg, stage = inference.find_run_checkpoint(str(run))
    assert (ckpt, stage) == (str(run / "stage3" / "checkpoints" / "best.npz"), 3)
    os.replace(run / "stage3" / "checkpoints" / "best.npz", run / "stage3" / "checkpoints" / "latest.npz")
    assert inference.find_run_checkpoint(str(run))[0].endswith(os.path.join("stage3", "checkpoints", "latest.npz"))
    with pytest.raises(inference.SpirsInputError, match="not a run directory"):
        inference.find_run_checkpoint(str(tmp_path / "run" / "stage1" / "checkpoints"))


def test_load_predictor_from_checkpoint_file_and_errors(run_dir, tmp_path, monkeypatch):
    p = inference.load_predictor(os.path.join(run_dir, "stage3", "checkpoints", "best.npz"))
    assert (p.levels, p.size, p.info["stage"]) == (3, 32, 3)
    monkeypatch.setattr(predictor_lib, "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(inference.SpirsInputError, match="no model given"):
        inference.load_predictor(None)
    with pytest.raises(inference.SpirsInputError, match="model not found"):
        inference.load_predictor(str(tmp_path / "nope"))
    (tmp_path / "lonely.npz").write_bytes(b"")
    with pytest.raises(inference.SpirsInputError, match="no config.json"):
        inference.load_predictor(str(tmp_path / "lonely.npz"))


# ------------------------------------------------------------------------------------------ cohort
def test_cohort_resume_skips_done_and_cleans_crash_leftovers(predictor, run_dir, tmp_path, capsys):
    from cohort import make_cohort

    manifest = make_cohort(str(tmp_path / "data"), n_patients=3, n_timepoints=2, shape=(20, 20, 20),
                           spacing=5.0, splits=("test",))
    with open(manifest) as fh:
        table = list(csv.DictReader(fh))
    table[4]["mask"] = ""  # p2's prior has no lesion mask: that pair fails, the others go on
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    out = tmp_path / "pred"
    rows = cohort_predict.predict_cohort(predictor, manifest, "test", str(out), batch_size=2)  # batches of 2, 1
    assert [r["case_id"] for r in rows] == ["p0_0_to_1", "p1_0_to_1", "p2_0_to_1"]
    assert [r["status"] for r in rows] == ["done", "done", "error"] and "no lesion mask" in rows[2]["message"]
    assert "cases/min" in capsys.readouterr().err
    done_report = out / "p0_0_to_1" / "report.json"
    stamp = done_report.stat().st_mtime_ns
    shutil.rmtree(out / "p1_0_to_1")  # as if the run was killed before this case...
    crash = out / ".tmp-spirs-p1_0_to_1-abc123"  # ...while writing it
    crash.mkdir()
    (crash / "prior_warped.nii.gz").write_bytes(b"half")
    code = cli.main(["predict", "--manifest", manifest, "--split", "test", "--out", str(out), "--model", run_dir,
                     "--quiet"])
    assert code == 2 and "1 of 3 case(s) failed" in capsys.readouterr().err
    assert done_report.stat().st_mtime_ns == stamp
    assert not crash.exists()
    assert sorted(os.listdir(out)) == ["cohort_summary.csv", "p0_0_to_1", "p1_0_to_1"]
    with open(out / "cohort_summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert [r["status"] for r in summary] == ["skipped", "done", "error"] and float(summary[0]["lncc"]) > 0


def test_cli_predict_split_all_takes_every_patient(run_dir, tmp_path, capsys):
    """``--split all`` (as the experiment scripts read it): every patient of the manifest, whatever its split."""
    from cohort import make_cohort

    manifest = make_cohort(str(tmp_path / "data"), n_patients=2, n_timepoints=2, shape=(20, 20, 20),
                           spacing=5.0, splits=("train", "test"))
    out = tmp_path / "pred"
    assert cli.main(["predict", "--manifest", manifest, "--split", "all", "--out", str(out), "--model", run_dir,
                     "--refine", "off", "--transforms", "none", "--quiet"]) == 0
    assert sorted(p for p in os.listdir(out) if p != "cohort_summary.csv") == ["p0_0_to_1", "p1_0_to_1"]
    assert cli.main(["predict", "--manifest", manifest, "--split", "val", "--out", str(tmp_path / "none"),
                     "--model", run_dir, "--quiet"]) == 2
    assert "no split 'val'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- CLI and bad input
def test_cli_predict_one_case_and_overwrite(run_dir, predictor, scans, tmp_path, capsys):
    paths, _, _ = scans
    out = str(tmp_path / "cli")
    args = ["predict", "--new", paths["new"], "--prior", paths["prior"], "--prior-mask", paths["mask"],
            "--out", out, "--model", run_dir]
    assert cli.main(args) == 0
    assert os.path.isfile(os.path.join(out, "report.json")) and "LNCC" in capsys.readouterr().out
    assert cli.main(args) == 2
    assert "use --overwrite" in capsys.readouterr().err
    open(os.path.join(out, "stale.txt"), "w").close()
    inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], out, overwrite=True)
    assert "stale.txt" not in os.listdir(out) and "report.json" in os.listdir(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []
    # an output folder holding an input is refused, even with --overwrite
    inside = ["predict", "--new", paths["new"], "--prior", paths["prior"], "--prior-mask", paths["mask"],
              "--out", os.path.dirname(paths["new"]), "--overwrite", "--model", run_dir]
    assert cli.main(inside) == 2
    assert "contains the input" in capsys.readouterr().err


def _bad_inputs(tmp_path, paths):
    image, lesions = brain_and_lesions(SHAPE)
    nan = image.copy()
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(image[:, :, 5], NEW_AFFINE), tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(nan, NEW_AFFINE), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(lesions * 2.0, NEW_AFFINE), tmp_path / "twos.nii.gz")
    other = NEW_AFFINE.copy()
    other[:3, 3] += 2.0
    nib.save(nib.Nifti1Image(lesions, other), tmp_path / "moved_mask.nii.gz")
    far = NEW_AFFINE.copy()
    far[:3, 3] += [400.0, 0.0, 0.0]
    nib.save(nib.Nifti1Image(image, far), tmp_path / "far.nii.gz")
    nib.save(nib.Nifti1Image(lesions, far), tmp_path / "far_mask.nii.gz")
    t = lambda name: str(tmp_path / name)  # noqa: E731
    return [  # (new, prior, mask, offending file, message part)
        (t("flat.nii.gz"), paths["prior"], paths["mask"], t("flat.nii.gz"), "not a 3-D image"),
        (paths["new"], t("nan.nii.gz"), paths["mask"], t("nan.nii.gz"), "NaN"),
        (paths["new"], paths["prior"], t("twos.nii.gz"), t("twos.nii.gz"), "not binary"),
        (paths["new"], paths["prior"], t("moved_mask.nii.gz"), t("moved_mask.nii.gz"), "same voxel grid"),
        (t("missing.nii.gz"), paths["prior"], paths["mask"], t("missing.nii.gz"), "not found"),
        (paths["new"], t("far.nii.gz"), t("far_mask.nii.gz"), t("far.nii.gz"), "does not overlap"),
    ]


def test_bad_inputs_exit_2_naming_the_file_without_output(scans, tmp_path, capsys, run_dir):
    paths, _, _ = scans
    for k, (new, prior, mask, culprit, problem) in enumerate(_bad_inputs(tmp_path, paths)):
        out = tmp_path / f"out{k}"
        code = cli.main(["predict", "--new", new, "--prior", prior, "--prior-mask", mask, "--out", str(out),
                         "--model", run_dir])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.startswith(f"spirs: error: {culprit}: ") and problem in err and "\n" not in err
        assert not out.exists()


def test_failure_while_writing_leaves_no_case_folder(predictor, scans, tmp_path, monkeypatch):
    import spirs_tf.qc

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(spirs_tf.qc, "write_qc_png", boom)
    paths, _, _ = scans
    with pytest.raises(RuntimeError, match="disk full"):
        inference.predict_case(predictor, paths["new"], paths["prior"], paths["mask"], str(tmp_path / "o" / "c"))
    assert os.listdir(tmp_path / "o") == []


# ---------------------------------------------------------------------------------------------- QC
def test_qc_slices_go_through_largest_lesions_and_png_is_written(tmp_path):
    from matplotlib.image import imread

    from spirs_tf import qc

    image, _ = brain_and_lesions((20, 20, 20))
    big, small = np.zeros((20, 20, 20), np.uint8), np.zeros((20, 20, 20), np.uint8)
    big[5:9, 5:9, 11:15] = 1  # centroid k = 12.5 → slice 12 (Python rounds half to even)
    small[12:14, 12:14, 4:6] = 1  # centroid k = 4.5
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    assert qc.axial_axis(affine) == 2 and qc.axial_axis(NEW_AFFINE) == 2
    assert qc.pick_slices(2, [small, big], image) == [12, 4]  # largest first
    assert qc.pick_slices(2, [np.zeros_like(big)], image) == [int((np.nonzero(image)[2].min()
                                                                   + np.nonzero(image)[2].max()) // 2)]
    shown = qc.write_qc_png(str(tmp_path / "qc.png"), "case-x", image, image, big, big, small, affine)
    png = imread(tmp_path / "qc.png")
    assert shown == [12, 4] and png.shape[0] > png.shape[1] * 0.5 and png.shape[2] in (3, 4)


def test_cli_affine_passes_recorded_and_checked(run_dir, scans, tmp_path, capsys):
    """--affine-passes K: the identity network stays the identity after K passes (the prior is carried
    exactly), report.json records K; K < 1 is refused with exit 2 and no output."""
    paths, image, lesions = scans
    out = str(tmp_path / "passes")
    base = ["predict", "--new", paths["new"], "--prior", paths["prior"], "--prior-mask", paths["mask"],
            "--model", run_dir, "--refine", "off", "--quiet"]
    assert cli.main(base + ["--out", out, "--affine-passes", "3"]) == 0
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["registration"]["network_passes"] == 3
    np.testing.assert_array_equal(load(os.path.join(out, "prior_mask_warped.nii.gz"))[0], lesions)
    assert cli.main(base + ["--out", str(tmp_path / "zero"), "--affine-passes", "0"]) == 2
    assert "--affine-passes must be >= 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "zero")
    # --affine-symmetric on: the identity network answers the identity both ways, so the prior is still
    # carried exactly; report.json records the setting
    sym = str(tmp_path / "symmetric")
    assert cli.main(base + ["--out", sym, "--affine-passes", "2", "--affine-symmetric", "on"]) == 0
    with open(os.path.join(sym, "report.json")) as f:
        registration = json.load(f)["registration"]
    assert registration["network_passes"] == 2 and registration["network_affine_symmetric"] is True
    np.testing.assert_array_equal(load(os.path.join(sym, "prior_mask_warped.nii.gz"))[0], lesions)
