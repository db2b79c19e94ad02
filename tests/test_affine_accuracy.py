"""experiments/affine_accuracy.py: its statistics against analytic truths, and one run end to end."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cohort import experiment_script, make_cohort


def _script():
    return experiment_script("affine_accuracy")


def test_slope_correlation_analytic(rng):
    acc = _script()
    x = rng.normal(size=50)
    r = acc.slope_correlation(x, 0.5 * x + 2.0)
    assert r["slope"] == pytest.approx(0.5) and r["correlation"] == pytest.approx(1.0) and r["n"] == 50
    r = acc.slope_correlation(x, -3.0 * x)
    assert r["slope"] == pytest.approx(-3.0) and r["correlation"] == pytest.approx(-1.0)
    noisy = acc.slope_correlation(x, x + rng.normal(size=50))
    assert 0.3 < noisy["correlation"] < 0.95
    assert np.isnan(acc.slope_correlation(np.ones(5), x[:5])["slope"])  # no spread in the truth
    assert np.isnan(acc.slope_correlation(x, np.zeros(50))["correlation"])  # a constant prediction


def test_polar_parts_recover_rotation_and_scale():
    from spirs_tf import geometry

    acc = _script()
    angle = np.deg2rad(12.0)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    vec, sv = acc.polar_parts(rot @ np.diag([1.1, 1.1, 1.1]))
    np.testing.assert_allclose(vec, [12.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(sv, [1.1, 1.1, 1.1], atol=1e-12)
    params = geometry.IDENTITY_PARAMS.astype(np.float64).copy()
    params[3:6] = np.deg2rad([3.0, -7.0, 5.0])
    matrix = geometry.params_to_matrix(params)[:, :3].astype(np.float64)  # float32 entries: orthogonal to ~1e-7
    vec, sv = acc.polar_parts(matrix)
    assert np.linalg.norm(vec) == pytest.approx(np.rad2deg(np.arccos((np.trace(matrix) - 1) / 2)), rel=1e-5)
    np.testing.assert_allclose(sv, 1.0, atol=1e-12)


def test_rms_displacement_analytic():
    acc = _script()
    mask = np.zeros((8, 8, 8))
    mask[2:6, 1:7, 3:5] = 1
    shift = np.zeros((3, 4))
    shift[:, 3] = [3.0, 4.0, 0.0]
    assert acc.rms_displacement(shift, mask) == pytest.approx(5.0)
    zoom = np.hstack([0.1 * np.eye(3), np.zeros((3, 1))])  # error 0.1·(x − c)
    x = np.argwhere(mask > 0) - 4.0
    assert acc.rms_displacement(zoom, mask) == pytest.approx(0.1 * np.sqrt(np.mean(np.sum(x * x, 1))))
    assert np.isnan(acc.rms_displacement(shift, np.zeros((4, 4, 4))))


def test_identity_network_end_to_end(tmp_path, capsys):
    """A fresh network predicts the identity: its displacement error is the augmentation's own, its
    warped image the moving one (same LNCC), its slopes 0; the JSON holds what the terminal says."""
    from cohort import make_fake_run

    manifest = make_cohort(str(tmp_path / "cohort"), n_patients=2, n_timepoints=2, seed=4, splits=("test", "test"))
    run = make_fake_run(tmp_path / "run")
    out = tmp_path / "acc.json"
    acc = _script()
    assert acc.main(["--model", run, "--manifest", manifest, "--pairs", "6", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == 6 and result["grid"] == 32 and result["target_met"] is False
    assert result["rms_network"]["median"] == pytest.approx(result["rms_identity"]["median"], rel=1e-5)
    assert result["rms_identity"]["median"] > 0.5  # the augmentation moved the pairs
    assert result["lncc_network"]["median"] == pytest.approx(result["lncc_identity"]["median"], abs=2e-3)
    assert result["translation"]["slope"] == pytest.approx(0.0, abs=1e-5)
    assert result["linear"]["slope"] == pytest.approx(0.0, abs=1e-5)
    assert "NOT met" in capsys.readouterr().out
    assert acc.main(["--model", run, "--manifest", manifest, "--split", "val"]) == 2


def test_measure_stops_at_its_deadline(tmp_path):
    """No pair starts after the deadline (the GPU recipe's budget): a past deadline gives no samples and
    NaN figures, a future one all of them."""
    import time

    from cohort import make_fake_run
    from spirs_tf import data
    from spirs_tf.manifest import load_manifest
    from spirs_tf.predictor import load_run

    manifest = make_cohort(str(tmp_path / "cohort"), n_patients=2, n_timepoints=2, seed=5, splits=("test", "test"))
    run = load_run(make_fake_run(tmp_path / "run"))
    source = data.PairSource(load_manifest(manifest), "test", run.cfg.data)
    acc = _script()
    late = acc.measure(run, source, 3, 2027, run.cfg.augment, deadline=time.time() - 1.0)
    assert late["samples"] == 0 and late["target_met"] is False
    assert np.isnan(late["linear"]["slope"]) and np.isnan(late["rms_network"]["median"])
    on_time = acc.measure(run, source, 3, 2027, run.cfg.augment, deadline=time.time() + 3600.0)
    assert on_time["samples"] == 3 and on_time["rms_identity"]["median"] > 0.5


def test_test_pairs_ignore_the_runs_near_identity_share(tmp_path):
    """A run trained with augment.near_identity_probability meets the same wide-range test pairs as one
    trained without it (otherwise its figures would be measured on easier pairs)."""
    from cohort import make_fake_run

    manifest = make_cohort(str(tmp_path / "cohort"), n_patients=2, n_timepoints=2, seed=6, splits=("test", "test"))
    plain = make_fake_run(tmp_path / "plain")
    near = make_fake_run(tmp_path / "near")
    config_path = tmp_path / "near" / "stage3" / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg["augment"]["near_identity_probability"], cfg["augment"]["near_identity_scale"] = 1.0, 0.05
    config_path.write_text(json.dumps(cfg))
    acc = _script()
    figures = []
    for run in (plain, near):
        out = tmp_path / f"{os.path.basename(run)}.json"
        assert acc.main(["--model", run, "--manifest", manifest, "--pairs", "4", "--json", str(out)]) == 0
        figures.append(json.loads(out.read_text())["rms_identity"]["median"])
    assert figures[0] > 0.5 and figures[1] == pytest.approx(figures[0], rel=1e-6)
