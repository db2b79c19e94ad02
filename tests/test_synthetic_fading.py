"""Synthetic cohort options that teach what the prior is for: faded and vessel-like lesions, new lesions.

Tiny grids (32³ at 6 mm, 48³ at 4 mm). The defaults must leave every scan as it was: the hashes below were
computed with the generator before these options existed (commit aca5301). The options are off by default.
"""
from __future__ import annotations

import csv
import hashlib
import os

import nibabel as nib
import numpy as np
import pytest

from spirs_tf.errors import SpirsInputError
from spirs_tf.synthetic import SynthConfig, generate_patient, synthesize_cohort
from spirs_tf.synthetic.lesions import sample_fading, sample_lesion
from spirs_tf.synthetic.vessels import tube_density

#: sha256 over every .nii.gz's (relative path, dtype, voxel bytes, affine) and manifest.csv's bytes, and over
#: lesions.csv's first 12 columns, of 3-patient cohorts with seed 7, computed with the package as of commit
#: aca5301 (before fading existed). Voxels rather than gzip bytes, so another zlib cannot change them.
OLD_HASHES = {
    "raw": ("4816e88eb72c5a5413b7fec30afeab91109b19356183a1d1a041cb5a3b9b0b9f",
            "aeca418bd79dac5c07c24feadde46493e8cc7ca5349fd661f443098dcd3a31dc"),
    "aligned": ("2e7cd13a34073f9a978f595872a127143b2686ab35dc99fc3353c88c99b2a795",
                "7a1ec82c6a0847b02322affeeeeb8bd16c7826bb4b039bd96dfeb74163b2fe86"),
}
OLD_CONFIGS = {
    "raw": SynthConfig(grid_size=32, spacing_mm=6.0, timepoints=(3, 4), lesions_per_patient=(4, 8)),
    "aligned": SynthConfig(grid_size=32, spacing_mm=6.0, timepoints=(2, 3), pose="aligned",
                           lesions_per_patient=(3, 8)),
}
OLD_LESION_COLUMNS = ("patient_id", "timepoint", "lesion_id", "volume_mm3", "size_bin", "centroid_x_mm",
                      "centroid_y_mm", "centroid_z_mm", "status", "trajectory", "target_volume_mm3", "faint")


def _cohort_hashes(folder: str) -> tuple[str, str]:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            path = os.path.join(root, f)
            if f.endswith(".nii.gz"):
                image = nib.load(path)
                data = np.asarray(image.dataobj)
                h.update(os.path.relpath(path, folder).encode())
                h.update(str(data.dtype).encode())
                h.update(np.ascontiguousarray(data).tobytes())
                h.update(np.asarray(image.affine, np.float64).tobytes())
            elif f == "manifest.csv":
                h.update(open(path, "rb").read())
    rows = list(csv.DictReader(open(os.path.join(folder, "lesions.csv"))))
    text = "\n".join(",".join(r[c] for c in OLD_LESION_COLUMNS) for r in rows)
    return h.hexdigest(), hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(OLD_HASHES))
def test_defaults_give_the_same_files_as_before_fading_existed(tmp_path, name):
    synthesize_cohort(str(tmp_path / name), 3, seed=7, cfg=OLD_CONFIGS[name], qc=False)
    assert _cohort_hashes(str(tmp_path / name)) == OLD_HASHES[name]


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def _lesions(rng, n, volume, n_tp, kind="stable"):
    return [sample_lesion(rng, i + 1, volume, n_tp, kind) for i in range(n)]


def test_fade_fraction_contrast_range_and_candidates(rng):
    small = _lesions(rng, 1000, 40.0, 4)
    big = _lesions(rng, 50, 5000.0, 4)
    out = sample_fading(np.random.default_rng(1), small + big, 0.4, (0.2, 0.3))
    factors = np.array([[les.contrast_at(t) for t in range(4)] for les in out])
    assert np.all(factors[:, 0] == 1.0)            # the first scan has no prior
    assert np.all(factors[1000:] == 1.0)           # larger than max_volume (125 mm³): never faded
    faded = factors[:1000, 1:] != 1.0
    assert faded.mean() == pytest.approx(0.4, abs=0.03)  # 3000 candidate (lesion, pair) instances
    assert factors[:1000, 1:][faded].min() >= 0.2 and factors[:1000, 1:][faded].max() <= 0.3
    assert all((les.contrast is None) == (not f.any()) for les, f in zip(out[:1000], faded))
    assert all(les.vessel is None for les in out)  # vessel_fraction 0
    # a lesion absent in the prior (appearing) or in the new scan (resolved) never fades there
    appearing = _lesions(rng, 300, 40.0, 3, "appear") + _lesions(rng, 300, 40.0, 3, "disappear")
    for les in sample_fading(np.random.default_rng(2), appearing, 1.0):
        for t in range(1, 3):
            assert les.faded(t) == bool(les.volumes[t - 1] > 0 and les.volumes[t] > 0)


def test_raising_the_fraction_only_adds_faded_instances(rng):
    lesions = _lesions(rng, 400, 15.0, 3)
    low = sample_fading(np.random.default_rng(5), lesions, 0.2, (0.1, 0.5))
    high = sample_fading(np.random.default_rng(5), lesions, 0.6, (0.1, 0.5))
    for a, b in zip(low, high):
        for t in range(3):
            if a.faded(t):
                assert b.contrast_at(t) == a.contrast_at(t)
    assert sum(b.faded(t) for b in high for t in range(3)) > sum(a.faded(t) for a in low for t in range(3))


def test_vessel_like_share_of_faded_lesions(rng):
    lesions = _lesions(rng, 1500, 10.0, 2)  # one candidate pair per lesion
    out = sample_fading(np.random.default_rng(3), lesions, 0.5, vessel_fraction=0.4)
    faded = [les for les in out if les.faded(1)]
    on_vessel = [les for les in faded if les.vessel is not None]
    assert len(faded) / len(out) == pytest.approx(0.5, abs=0.04)
    assert len(on_vessel) / len(faded) == pytest.approx(0.4, abs=0.05)
    assert all(les.vessel is None for les in out if not les.faded(1))
    direction, half_length, radius, strength = on_vessel[0].vessel
    assert np.linalg.norm(direction) == pytest.approx(1.0) and 4 <= half_length <= 10 and 0.35 <= radius <= 0.8


def test_tube_density_carries_the_vessel_line_density():
    """Across the axis the enhancement integrates to strength · π r² (the line density of vessel_map)."""
    n = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    u = np.cross(n, [0.0, 0.0, 1.0])
    u /= np.linalg.norm(u)
    w = np.cross(n, u)
    h = 0.05
    a, b = np.meshgrid(np.arange(-6, 6, h), np.arange(-6, 6, h), indexing="ij")
    for s, expected in ((0.0, 1.0), (2.0, 1.0), (6.0, 0.5), (7.5, 0.0)):  # along the axis, half length 6 mm
        pts = s * n + a.reshape(-1, 1) * u + b.reshape(-1, 1) * w
        e = tube_density(pts, n, 6.0, 0.6, 1.5, 1.0)
        assert e.min() >= 0
        assert e.sum() * h * h == pytest.approx(expected * 1.5 * np.pi * 0.6 ** 2, rel=1e-3, abs=1e-9)


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
FADE_BASE = SynthConfig(grid_size=48, spacing_mm=4.0, timepoints=(2, 2), pose="aligned", lesions_per_patient=(6, 6),
                        size_weights=(0, 1, 1, 0), trajectory_weights=(("stable", 1.0), ("grow", 1.0)),
                        fade_max_volume_mm3=1e5)


@pytest.fixture(scope="module")
def faded_renders():
    """One patient rendered noise-free with fading off, faded to c = 0.3 and faded to c = 0."""
    import dataclasses

    from spirs_tf.synthetic import render

    mp = pytest.MonkeyPatch()
    mp.setattr(render, "acquire", lambda rng, composite, brain: (composite * brain).astype(np.float32))
    try:
        off = generate_patient(0, 4, FADE_BASE)
        third = generate_patient(0, 4, dataclasses.replace(FADE_BASE, fade_fraction=1.0, fade_contrast=(0.3, 0.3)))
        zero = generate_patient(0, 4, dataclasses.replace(FADE_BASE, fade_fraction=1.0, fade_contrast=(0.0, 0.0)))
    finally:
        mp.undo()
    return off, third, zero


def test_faded_lesions_keep_their_masks_and_the_prior(faded_renders):
    off, third, zero = faded_renders
    assert len(off.lesions) >= 4
    for p in (third, zero):
        for t in range(2):
            assert np.array_equal(p.scans[t].lesions, off.scans[t].lesions)
            assert np.array_equal(p.scans[t].mask, off.scans[t].mask)
    assert np.array_equal(third.scans[0].image, off.scans[0].image)  # the prior scan is not faded
    faded_rows = [r for r in third.table if r["timepoint"] == 1]
    assert faded_rows and all(r["contrast"] == 0.3 and r["faint"] == 0 for r in faded_rows)
    assert all(r["contrast"] == 1.0 for r in off.table)


def test_faded_enhancement_is_the_relative_contrast(faded_renders):
    """Noise-free: composite = base + c α (s − base), so (x_c − x_0) / (x_1 − x_0) = c exactly."""
    off, third, zero = faded_renders
    lesion = off.scans[1].lesions > 0
    x1, xc, x0 = (p.scans[1].image[lesion].astype(np.float64) for p in (off, third, zero))
    enhanced = np.abs(x1 - x0) > 0.02
    assert enhanced.sum() >= 10
    np.testing.assert_allclose((xc - x0)[enhanced] / (x1 - x0)[enhanced], 0.3, atol=2e-3)
    for les in off.lesions:  # per lesion: its mean contrast against the tissue beneath (x_0) drops to c
        inside = off.scans[1].lesions == les.lesion_id
        gain = (off.scans[1].image[inside] - zero.scans[1].image[inside]).mean()
        assert gain > 0 and (third.scans[1].image[inside] - zero.scans[1].image[inside]).mean() == pytest.approx(
            0.3 * gain, rel=0.01)


def test_vessel_like_lesions_add_a_vessel_outside_their_mask():
    import dataclasses

    cfg = dataclasses.replace(FADE_BASE, fade_fraction=1.0, fade_contrast=(0.3, 0.3))
    plain = generate_patient(0, 4, cfg)
    vessel = generate_patient(0, 4, dataclasses.replace(cfg, vessel_like_fraction=1.0))
    assert all(les.vessel is not None for les in vessel.lesions)
    for t in range(2):
        assert np.array_equal(vessel.scans[t].lesions, plain.scans[t].lesions)
        outside = vessel.scans[t].brain & (vessel.scans[t].lesions == 0)
        assert np.any(vessel.scans[t].image[outside] > plain.scans[t].image[outside] * 1.05)
    assert all(r["on_vessel"] == 1 for r in vessel.table) and all(r["on_vessel"] == 0 for r in plain.table)


def test_new_lesions_have_no_prior():
    import dataclasses

    cfg = SynthConfig(grid_size=32, spacing_mm=6.0, timepoints=(3, 3), pose="aligned", lesions_per_patient=(5, 5),
                      size_weights=(0, 0, 1, 1), new_lesion_fraction=1.0)
    patient = generate_patient(0, 2, cfg)
    assert patient.lesions and all(les.trajectory == "appear" for les in patient.lesions)
    for les in patient.lesions:
        first = int(np.argmax(les.volumes > 0))
        assert first >= 1
        assert not np.any(patient.scans[first - 1].lesions == les.lesion_id)
        assert np.any(patient.scans[first].lesions == les.lesion_id)
    assert {r["status"] for r in patient.table if r["timepoint"] > 0} <= {"new", "growing", "stable", "shrinking"}
    none = generate_patient(0, 2, dataclasses.replace(cfg, new_lesion_fraction=0.0))
    assert all(les.trajectory != "appear" for les in none.lesions)


def test_new_lesion_fraction_reweights_the_trajectories():
    assert SynthConfig().trajectories() == SynthConfig().trajectory_weights
    mix = dict(SynthConfig(new_lesion_fraction=0.4).trajectories())
    assert mix["appear"] == 0.4 and sum(mix.values()) == pytest.approx(1.0)
    assert mix["grow"] / mix["stable"] == pytest.approx(0.2 / 0.3)
    only = dict(SynthConfig(trajectory_weights=(("stable", 2.0),), new_lesion_fraction=0.25).trajectories())
    assert only == {"stable": 0.75, "appear": 0.25}


@pytest.mark.parametrize("kwargs, message", [
    ({"fade_fraction": 1.5}, "fade fraction must be between 0 and 1"),
    ({"vessel_like_fraction": -0.1}, "vessel like fraction must be between 0 and 1"),
    ({"fade_contrast": (0.5, 0.2)}, "fade contrast must satisfy"),
    ({"fade_contrast": (0.2, 1.0)}, "fade contrast must satisfy"),
    ({"fade_max_volume_mm3": 0.0}, "fade max volume must be positive"),
    ({"new_lesion_fraction": 2.0}, "new-lesion fraction must be between 0 and 1"),
    ({"new_lesion_fraction": 0.5, "trajectory_weights": (("appear", 1.0),)}, "needs a trajectory other"),
])
def test_config_rejects_bad_fading_settings(kwargs, message):
    with pytest.raises(SpirsInputError, match=message):
        SynthConfig(**kwargs).validate()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_cli_fading_options(tmp_path, capsys):
    from spirs_tf.cli import main
    from spirs_tf.commands.synth import parse_contrast, parse_fraction

    assert parse_contrast("0.1,0.4") == (0.1, 0.4) and parse_contrast("0.2") == (0.2, 0.2)
    assert parse_fraction("0.25", "fade-fraction") == 0.25
    out = tmp_path / "fade"
    assert main(["synth", "--patients", "2", "--out", str(out), "--seed", "5", "--grid", "32", "--spacing", "6",
                 "--timepoints", "3", "--lesions", "6", "--lesion-sizes", "1,1,0,0", "--fade-fraction", "1",
                 "--fade-contrast", "0.2,0.25", "--vessel-like", "1", "--new-lesions", "0.3",
                 "--no-qc", "--quiet"]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(open(out / "lesions.csv")))
    persisting = [r for r in rows if r["status"] in ("stable", "growing", "shrinking")]
    fading = [r for r in persisting if float(r["target_volume_mm3"]) <= 125.0]  # --fade-max-volume default
    assert fading and all(0.2 <= float(r["contrast"]) <= 0.25 and r["on_vessel"] == "1" for r in fading)
    assert all(float(r["contrast"]) == 1.0 for r in persisting if float(r["target_volume_mm3"]) > 125.0)
    assert all(float(r["contrast"]) == 1.0 for r in rows if r["status"] in ("baseline", "new"))
    import json

    settings = json.load(open(out / "synth.json"))["config"]
    assert settings["fade_fraction"] == 1.0 and settings["new_lesion_fraction"] == 0.3


@pytest.mark.parametrize("option, value, message", [
    ("--fade-fraction", "1.5", "--fade-fraction must be a number between 0 and 1"),
    ("--fade-fraction", "x", "--fade-fraction must be a number between 0 and 1"),
    ("--fade-contrast", "0.5,0.2", "--fade-contrast must be LO,HI"),
    ("--fade-contrast", "0.1,0.2,0.3", "--fade-contrast must be LO,HI"),
    ("--fade-contrast", "0.1,1", "--fade-contrast must be LO,HI"),
    ("--fade-max-volume", "abc", "--fade-max-volume must be a positive number"),
    ("--fade-max-volume", "-5", "--fade-max-volume must be a positive number"),
    ("--vessel-like", "nan", "--vessel-like must be a number between 0 and 1"),
    ("--new-lesions", "-0.1", "--new-lesions must be a number between 0 and 1"),
])
def test_cli_rejects_bad_fading_values(tmp_path, capsys, option, value, message):
    from spirs_tf.cli import main

    out = tmp_path / "bad"
    assert main(["synth", "--patients", "1", "--out", str(out), "--grid", "32", "--spacing", "6",
                 option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_help_documents_the_fading_options(capsys):
    from spirs_tf.cli import main

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    for option in ("--fade-fraction", "--fade-contrast", "--fade-max-volume", "--vessel-like", "--new-lesions"):
        assert option in text


def test_workers_write_the_same_files(tmp_path, capsys):
    import filecmp

    from spirs_tf.cli import main

    cfg = SynthConfig(grid_size=32, spacing_mm=6.0, timepoints=(2, 3), lesions_per_patient=(2, 6), fade_fraction=0.5,
                      vessel_like_fraction=0.5)
    synthesize_cohort(str(tmp_path / "one"), 3, seed=9, cfg=cfg, qc=False)
    lines = []
    synthesize_cohort(str(tmp_path / "two"), 3, seed=9, cfg=cfg, qc=False, workers=2, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["patient_000", "patient_001", "patient_002"]
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "one")
                   for d, _, fs in os.walk(tmp_path / "one") for f in fs)
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two", files, shallow=False)
    assert len(match) == len(files) > 10 and mismatch == [] and errors == []
    assert main(["synth", "--patients", "1", "--out", str(tmp_path / "bad"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--workers must be at least 1" in err
    with pytest.raises(SpirsInputError, match="workers must be at least 1"):
        synthesize_cohort(str(tmp_path / "x"), 1, workers=0)
