"""Synthetic longitudinal metastasis generator: sizes, shapes, trajectories, transforms, files, CLI.

Cohorts are generated on coarse grids (32³ at 6 mm, 48³ at 4 mm, 64³ at 3 mm) so the file stays fast.
"""
from __future__ import annotations

import filecmp
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from spirs_tf.errors import SpirsInputError
from spirs_tf.synthetic import SynthConfig, generate_patient, synthesize_cohort
from spirs_tf.synthetic.cohort import assign_splits
from spirs_tf.synthetic.lesions import (PAPER_TEST_COUNTS, SIZE_BINS, VOLUME_RANGES, _push, fibonacci_sphere,
                                        mass_effect,
                                        render_lesion, sample_lesion, sample_lesion_volumes,
                                        sample_trajectory, size_bin)
from spirs_tf.synthetic.scanner import sample_pose

SMALL = SynthConfig(grid_size=48, spacing_mm=4.0, timepoints=(2, 3), lesions_per_patient=(2, 5))


# --------------------------------------------------------------------------------------------
# sizes and shapes
# --------------------------------------------------------------------------------------------
def test_size_bin_edges():
    assert [size_bin(v) for v in (0.0, 3.0, 24.99, 25.0, 124.9, 125.0, 999.0, 1000.0, 5e4)] == [
        "", "micro", "micro", "small", "small", "medium", "medium", "large", "large"]


def test_size_sampler_follows_paper_table2(rng):
    volumes = sample_lesion_volumes(rng, 20000)
    bins = np.array([SIZE_BINS.index(size_bin(v)) for v in volumes])
    observed = np.bincount(bins, minlength=4) / bins.size
    expected = np.array(PAPER_TEST_COUNTS) / np.sum(PAPER_TEST_COUNTS)
    np.testing.assert_allclose(observed, expected, atol=0.015)
    assert volumes.min() >= VOLUME_RANGES[0][0] and volumes.max() <= VOLUME_RANGES[-1][1]
    micro = volumes[bins == 0]
    diameters = 2 * (3 * micro / (4 * np.pi)) ** (1 / 3)
    assert 1.9 < diameters.min() and diameters.max() < 3.7  # "micro ≈ 2–3.5 mm across"


@pytest.mark.parametrize("volume", [8.0, 60.0, 400.0, 5000.0])
def test_rasterised_lesion_volume_at_1mm(rng, volume):
    """Voxel count at 1 mm of the rendered lesion ≈ its target volume (irregular, non-spherical shape)."""
    errors = []
    for _ in range(6):
        les = sample_lesion(rng, 1, volume, 1, "stable")
        assert les.shape.profile(np.eye(3)).std() > 0 or les.shape.axes.std() > 0  # not a sphere
        h = int(np.ceil(les.radius(0) * les.shape.max_extent())) + 2
        grid = np.indices((2 * h + 1,) * 3).reshape(3, -1).T - h + rng.uniform(-0.5, 0.5, 3)
        out = render_lesion(les, 0, grid.astype(np.float64), 1.0)
        assert np.array_equal(out["inside"], out["alpha"] >= 0.5)
        errors.append(out["inside"].sum() / volume - 1)
        assert size_bin(out["inside"].sum()) == size_bin(volume)
    assert np.mean(np.abs(errors)) < (0.25 if volume < 25 else 0.06)


def test_large_lesions_ring_enhance_and_small_ones_are_solid(rng):
    big = sample_lesion(rng, 1, 8000.0, 1, "stable")
    small = sample_lesion(rng, 2, 60.0, 1, "stable")
    for les, ring in ((big, True), (small, False)):
        object.__setattr__(les, "faint", False)
        r = les.radius(0)
        centre = render_lesion(les, 0, np.zeros((1, 3)), 1.0)["intensity"][0]
        assert (centre < 0.6) == ring  # necrotic core vs solid enhancement
        if ring:
            rim = render_lesion(les, 0, les.shape.rotation @ np.diag(les.shape.axes) @ np.eye(3) * r * 0.95, 1.0)
            assert np.all(rim["intensity"] > 1.15)
        shell = fibonacci_sphere(200) * (r * les.shape.max_extent() + 1.0)  # just outside the lesion
        edema = render_lesion(les, 0, shell, 1.0)["edema"].max()
        assert (edema > 0.1) == ring


def test_trajectories(rng):
    v = 300.0
    assert np.all(sample_trajectory(rng, v, 4, "stable") == v)
    assert np.all(np.diff(sample_trajectory(rng, v, 5, "grow")) > 0)
    assert np.all(np.diff(sample_trajectory(rng, v, 5, "shrink")) < 0)
    appear = sample_trajectory(rng, v, 6, "appear")
    assert appear[0] == 0 and appear[-1] > 0 and np.all(np.diff((appear > 0).astype(int)) >= 0)
    gone = sample_trajectory(rng, v, 6, "disappear")
    assert gone[0] > 0 and gone[-1] == 0 and np.all(np.diff((gone > 0).astype(int)) <= 0)
    with pytest.raises(ValueError, match="unknown trajectory"):
        sample_trajectory(rng, v, 3, "explode")


def test_mass_effect_push_is_continuous_invertible_and_local(rng):
    r, amp = 8.0, 3.0
    rho = np.linspace(0, 60, 60001)
    s = _push(rho, r, amp)
    assert s[0] == 0 and abs(_push(np.array([r]), r, amp)[0] - amp) < 1e-9
    assert np.max(np.abs(np.diff(s))) < 1e-3                # continuous
    assert np.all(np.diff(rho - s) > 0)                      # q ↦ q + m(q) is monotone radially
    support = r + 3 * (0.8 * r + 4.0)
    assert np.all(s[rho >= support] == 0)
    les = sample_lesion(rng, 1, 4 / 3 * np.pi * r ** 3, 1, "stable")
    pts = rng.normal(size=(50, 3)) * 10
    m = mass_effect(pts, [les], 0)
    assert np.all(np.einsum("ij,ij->i", m, pts - les.centre) <= 1e-12)  # tissue came from nearer the centre


def test_pose_modes(rng):
    centre = np.array([0.0, -17.0, 5.0])
    assert np.array_equal(sample_pose(rng, centre, "aligned"), np.eye(4))
    for _ in range(20):
        p = sample_pose(rng, centre, "raw")
        u, sv, vt = np.linalg.svd(p[:3, :3])
        angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
        assert angle <= 10 * np.sqrt(3) + 1 and np.all(np.abs(sv - 1) < 0.08)
        assert np.all(np.abs(p[:3, :3] @ centre + p[:3, 3] - centre) <= 10 + 1e-9)  # translation of the centre
    with pytest.raises(ValueError):
        sample_pose(rng, centre, "wobbly")


def test_splits_deterministic_and_proportional():
    splits = assign_splits(20, 3)
    assert splits == assign_splits(20, 3)
    assert splits.count("train") == 14 and splits.count("val") == 3 and splits.count("test") == 3
    assert sorted(set(assign_splits(3, 0))) == ["test", "train", "val"]


# --------------------------------------------------------------------------------------------
# true transforms
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_patient():
    cfg = SynthConfig(grid_size=64, spacing_mm=3.0, timepoints=(3, 3), lesions_per_patient=(6, 6),
                      size_weights=(0, 0, 0, 1), trajectory_weights=(("stable", 1.0), ("grow", 1.0)))
    return generate_patient(0, 7, cfg)


def _warp_prior_labels(patient, tr, lesion_id):
    prior = (patient.scans[tr.prior].lesions == lesion_id).astype(np.float32)
    return ndimage.map_coordinates(prior, tr.prior_voxel_coords(), order=1) > 0.5


def test_stable_lesions_map_onto_themselves_with_dice_above_09(raw_patient):
    evaluated = 0
    for tr in raw_patient.transforms:
        new = raw_patient.scans[tr.new].lesions
        assert not np.allclose(tr.world_affine, np.eye(4), atol=1e-3)  # raw pose: a real repositioning
        for les in raw_patient.lesions:
            b = new == les.lesion_id
            if les.trajectory != "stable" or b.sum() < 200:
                continue
            a = _warp_prior_labels(raw_patient, tr, les.lesion_id)
            dice = 2 * np.sum(a & b) / (a.sum() + b.sum())
            assert dice > 0.9, (les.lesion_id, dice)
            evaluated += 1
    assert evaluated >= 2


def test_lesion_ids_consistent_across_time_points(raw_patient):
    for tr in raw_patient.transforms:
        new = raw_patient.scans[tr.new].lesions
        for les in raw_patient.lesions:
            if not (les.present(tr.prior) and les.present(tr.new)):
                continue
            warped = _warp_prior_labels(raw_patient, tr, les.lesion_id)
            labels, counts = np.unique(new[warped], return_counts=True)
            assert labels[np.argmax(counts)] == les.lesion_id


def test_displacement_matches_the_generative_model(raw_patient):
    """Same tissue: q + m(q) in the new scan equals q' + m'(q') at the stated prior position (analytic m)."""
    les = raw_patient.lesions
    for tr in raw_patient.transforms:
        g = tr.grid_affine
        d = tr.displacement
        moved = np.argwhere(np.linalg.norm(d, axis=-1) > 0.05)
        assert len(moved) > 100
        pick = moved[np.random.default_rng(1).choice(len(moved), 500, replace=False)].astype(np.float64)
        w = pick @ g[:3, :3].T + g[:3, 3]
        q_new = w @ raw_patient.poses[tr.new][:3, :3].T + raw_patient.poses[tr.new][:3, 3]
        tissue_new = q_new + mass_effect(q_new, les, tr.new)

        def tissue_prior(disp):
            w_prior = w @ tr.world_affine[:3, :3].T + tr.world_affine[:3, 3] + disp
            q = w_prior @ raw_patient.poses[tr.prior][:3, :3].T + raw_patient.poses[tr.prior][:3, 3]
            return q + mass_effect(q, les, tr.prior)

        disp = d[tuple(pick.astype(int).T)]
        err = np.linalg.norm(tissue_prior(disp) - tissue_new, axis=1)
        err_affine_only = np.linalg.norm(tissue_prior(0.0) - tissue_new, axis=1)
        # exact up to trilinear reading of the 3 mm field grid (< 1/30 voxel); without d it is not
        assert err.max() < 0.1 and np.median(err) < 0.02 and err_affine_only.max() > 0.3


def test_aligned_stable_patient_has_identity_transform():
    cfg = SynthConfig(grid_size=32, spacing_mm=6.0, timepoints=(3, 3), pose="aligned", lesions_per_patient=(3, 3),
                      size_weights=(0, 0, 1, 1), trajectory_weights=(("stable", 1.0),))
    p = generate_patient(1, 5, cfg)
    assert len(p.lesions) >= 1
    for tr in p.transforms:
        assert np.array_equal(tr.world_affine, np.eye(4))
        assert np.abs(tr.displacement).max() < 1e-2
        assert np.array_equal(p.scans[tr.prior].lesions, p.scans[tr.new].lesions)
        assert not np.array_equal(p.scans[tr.prior].image, p.scans[tr.new].image)  # new noise, bias, contrast


# --------------------------------------------------------------------------------------------
# files, determinism, manifest, CLI
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    summary = synthesize_cohort(str(out), 2, seed=11, cfg=SMALL, qc=True)
    return out, summary


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_same_seed_gives_identical_bytes(cohort, tmp_path):
    out, _ = cohort
    again = tmp_path / "b"
    synthesize_cohort(str(again), 2, seed=11, cfg=SMALL, qc=True)
    files = _files(out)
    assert files == _files(again) and any(f.endswith("qc.png") for f in files)
    match, mismatch, errors = filecmp.cmpfiles(out, again, files, shallow=False)
    assert mismatch == [] and errors == []
    one = tmp_path / "c"  # patient 0 does not depend on the cohort size
    synthesize_cohort(str(one), 1, seed=11, cfg=SMALL, qc=False)
    tp0 = os.path.join("patient_000", "tp0", "image.nii.gz")
    assert filecmp.cmp(out / tp0, one / tp0, shallow=False)
    other = tmp_path / "d"
    synthesize_cohort(str(other), 1, seed=12, cfg=SMALL, qc=False)
    assert not filecmp.cmp(out / tp0, other / tp0, shallow=False)


def test_written_volumes_and_tables(cohort):
    out, summary = cohort
    import csv

    rows = list(csv.DictReader(open(out / "lesions.csv")))
    assert summary.n_scans >= 4 and rows
    for folder in sorted((out / "patient_000").glob("tp*")):
        image = nib.load(folder / "image.nii.gz")
        mask = nib.load(folder / "mask.nii.gz")
        labels = nib.load(folder / "lesions.nii.gz")
        assert image.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
        assert labels.get_data_dtype() == np.int16 and image.shape == (48, 48, 48)
        np.testing.assert_allclose(image.affine, mask.affine)
        np.testing.assert_allclose(np.diag(image.affine)[:3], [4.0, 4.0, 4.0])
        img, lab = np.asarray(image.dataobj), np.asarray(labels.dataobj)
        assert np.array_equal(np.asarray(mask.dataobj), (lab > 0).astype(np.uint8))
        assert img.min() == 0 and np.all(img[lab > 0] > 0)
        t = int(folder.name[2:])
        for row in (r for r in rows if r["patient_id"] == "patient_000" and int(r["timepoint"]) == t):
            assert float(row["volume_mm3"]) == pytest.approx(np.sum(lab == int(row["lesion_id"])) * 64.0)
            assert row["size_bin"] == size_bin(float(row["volume_mm3"]))
    disp = nib.load(out / "patient_000" / "transforms" / "tp0_to_tp1_displacement.nii.gz")
    assert disp.shape == (48, 48, 48, 1, 3) and disp.header.get_intent()[0] == "vector"
    import json

    doc = json.load(open(out / "patient_000" / "transforms" / "tp0_to_tp1.json"))
    a = np.array(doc["world_affine_new_to_prior"])
    assert a.shape == (4, 4) and np.array_equal(a[3], [0, 0, 0, 1])
    assert open(out / "patient_000" / "qc.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_manifest_passes_check(cohort):
    manifest = pytest.importorskip("spirs_tf.manifest")
    out, summary = cohort
    assert manifest.check_manifest(summary.manifest, deep=True) == []
    loaded = manifest.load_manifest(summary.manifest)
    assert {s.patient_id for s in loaded.scans} == {"patient_000", "patient_001"}
    assert open(summary.manifest).readline().strip() == "patient_id,timepoint,image,mask,split"


def test_cli_synth(tmp_path, capsys):
    from spirs_tf.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "--patients", "1", "--out", str(out), "--seed", "3", "--grid", "32", "--spacing", "6",
                 "--timepoints", "2", "--pose", "aligned", "--no-qc", "--quiet"]) == 0
    assert (out / "manifest.csv").exists() and not (out / "patient_000" / "qc.png").exists()
    capsys.readouterr()
    assert main(["synth", "--patients", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--patients must be positive" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["synth", "--patients", "1", "--out", str(blocker / "sub"), "--grid", "32", "--spacing", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the output folder" in err and str(blocker) in err
    assert main(["synth", "--patients", "1", "--out", str(out), "--timepoints", "3-x"]) == 2
    assert "--timepoints must be" in capsys.readouterr().err
    assert main(["synth", "--patients", "1", "--out", str(out), "--lesion-sizes", "1,1,-1,1"]) == 2
    assert "--lesion-sizes must be" in capsys.readouterr().err


def test_cli_lesion_sizes_leave_out_a_bin(tmp_path):
    import csv

    from spirs_tf.cli import main
    from spirs_tf.commands.synth import parse_size_weights
    from spirs_tf.synthetic.lesions import PAPER_TEST_COUNTS

    assert parse_size_weights("paper") == tuple(PAPER_TEST_COUNTS)
    assert parse_size_weights("0,1,2,1") == (0.0, 1.0, 2.0, 1.0)
    out = tmp_path / "sizes"
    assert main(["synth", "--patients", "2", "--out", str(out), "--seed", "5", "--grid", "32", "--spacing", "6",
                 "--timepoints", "2", "--lesions", "6", "--lesion-sizes", "0,0,1,1", "--no-qc", "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "lesions.csv")))
    peak = {}
    for r in rows:
        key = (r["patient_id"], r["lesion_id"])
        peak[key] = max(peak.get(key, 0.0), float(r["target_volume_mm3"]))
    assert len(peak) == 12
    # every trajectory reaches its drawn volume at some time point, and that was medium or large (>= 125 mm³)
    assert min(peak.values()) >= 125.0


def test_api_rejects_bad_input(tmp_path):
    with pytest.raises(SpirsInputError, match="number of patients must be positive"):
        synthesize_cohort(str(tmp_path / "o"), 0)
    with pytest.raises(SpirsInputError, match="time points"):
        synthesize_cohort(str(tmp_path / "o"), 1, cfg=SynthConfig(timepoints=(4, 2)))
    with pytest.raises(SpirsInputError, match="pose"):
        SynthConfig(pose="sideways").validate()
