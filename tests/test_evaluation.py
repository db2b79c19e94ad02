"""End-to-end tests of spirs_tf.evaluation and the experiment scripts (evaluate, compare_registration,
ablation_pyramid, pyramid_levels, examples) on a tiny on-disk cohort with a randomly initialised
``test``-config model saved as a fake run.

Analytic truths used: a freshly built SPIRS model has an identity affine head (zero kernel, identity
bias) and zero DVF heads, so every SPIRS row must equal the identity row; with the affine bias set to a
one-voxel translation the pyramid composes it to 4 + 2 + 1 = 7 finest voxels (A_i = 2·A_{i−1} + 1), and
the finest level alone gives 1 voxel — integer shifts whose warps and Dice are checked against NumPy.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

from cohort import experiment_script, make_cohort
from spirs_tf import config, evaluation, metrics, networks
from spirs_tf.data import PairSource
from spirs_tf.manifest import load_manifest
from spirs_tf.checkpoints import save_checkpoint

_script = experiment_script


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def _f(x):
    return float(x) if x != "" else math.nan


def _save_run(run_dir, cfg, state):
    save_checkpoint(os.path.join(run_dir, "stage3", "checkpoints", "best.npz"), state, {},
                    {"stage": 3, "levels": 3, "epoch": 1})
    config.save_config(cfg, os.path.join(run_dir, "stage3", "config.json"))
    return str(run_dir)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    manifest = make_cohort(str(root / "cohort"), n_patients=4, n_timepoints=2, seed=3,
                           splits=("train", "test", "train", "test"))
    cfg = config.get_config("test")
    state = networks.model_state(networks.build_spirs(cfg, 3))
    shifted = dict(state)
    bias = np.array(state["aff_params/bias"], copy=True)
    bias[0] = 1.0                                     # translation of one voxel along array axis 0
    shifted["aff_params/bias"] = bias
    return {"root": root, "manifest": manifest, "cfg": cfg, "run": _save_run(root / "run", cfg, state),
            "shifted": _save_run(root / "shifted", cfg, shifted), "out": {}}


def _inputs(setup):
    """Pre-aligned test pairs straight from PairSource (the independent reference)."""
    source = PairSource(load_manifest(setup["manifest"]), "test", setup["cfg"].data)
    return {f"{p.patient_id}/{p.prior.timepoint}->{p.new.timepoint}": source[k] for k, p in enumerate(source.pairs)}


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_writes_per_case_tables(setup, capsys):
    out = str(setup["root"] / "eval")
    assert _script("evaluate").main(["--run", setup["run"], "--manifest", setup["manifest"], "--out", out]) == 0
    setup["out"]["eval"] = out
    header, rows = _read(os.path.join(out, "per_pair.csv"))
    assert header == evaluation.registration_columns([1, 2, 3])
    assert sorted({r["method"] for r in rows}) == ["SPIRS", "identity"] and len(rows) == 4
    ref = _inputs(setup)
    for r in rows:
        item = ref[r["pair_id"]]
        for level, f in ((1, 4), (2, 2), (3, 1)):
            fm, mm = item.fixed_mask[::f, ::f, ::f], item.moving_mask[::f, ::f, ::f]
            expected = metrics.dice(fm, mm) if fm.any() or mm.any() else math.nan   # both empty: NaN
            assert _f(r[f"dice_affine_l{level}"]) == pytest.approx(expected, abs=1e-12, nan_ok=True)
            lncc = metrics.lncc(item.fixed_image[::f, ::f, ::f], item.moving_image[::f, ::f, ::f], 9)
            assert _f(r[f"lncc_deformable_l{level}"]) == pytest.approx(lncc, abs=1e-5)
        for c in header[5:]:
            v = _f(r[c])
            assert math.isfinite(v) or (c.startswith("dice") and math.isnan(v)), c
            if c.startswith(("dice", "lncc")):
                assert -1e-9 <= v <= 1 + 1e-9, c
        assert _f(r["folding_percent"]) == 0.0
    by = {(r["pair_id"], r["method"]): r for r in rows}
    for pid in ref:   # identity-initialised affine head and zero DVF heads: SPIRS = identity
        for c in header[5:]:
            assert _f(by[(pid, "SPIRS")][c]) == pytest.approx(_f(by[(pid, "identity")][c]), abs=1e-5, nan_ok=True), c

    header, lesions = _read(os.path.join(out, "per_lesion.csv"))
    assert tuple(header) == evaluation.LESION_COLUMNS
    assert {r["method"] for r in lesions} == {"P1", "P2"}
    n_gt = sum(metrics.label_lesions(ref[p].fixed_mask)[1] for p in ref)
    assert len(lesions) == 2 * n_gt
    for r in lesions:
        assert 0 <= _f(r["dice"]) <= 1
        assert (r["detected"] == "true") == math.isfinite(_f(r["hd95"]))
        assert _f(r["volume_mm3"]) == pytest.approx(int(r["n_voxels"]) * 6.0 ** 3)
    _, seg = _read(os.path.join(out, "per_pair_segmentation.csv"))
    assert len(seg) == 4 and all(0 <= _f(r["brats_dice"]) <= 1 for r in seg)
    info = json.load(open(os.path.join(out, "evaluation.json")))
    assert info["data"] == "real" and info["pairs"] == 2 and info["levels"] == [1, 2, 3]
    assert "Evaluation" in open(os.path.join(out, "results.md"), encoding="utf-8").read()

    # the statistics scripts read these files as they are
    table = str(setup["root"] / "table1.csv")
    assert _script("segmentation_table").main([os.path.join(out, "per_lesion.csv"), "--out", table]) == 0
    assert _script("stats").main(["--registration", os.path.join(out, "per_pair.csv"), "--metrics", "dice_affine",
                                  "--lesions", os.path.join(out, "per_lesion.csv")]) == 0
    assert "SPIRS vs identity" in capsys.readouterr().out


def test_shifted_affine_composes_through_the_pyramid(setup):
    run = evaluation.load_run(setup["shifted"])
    source = evaluation.pair_source(run, setup["manifest"], "test")
    ref = _inputs(setup)
    for kind, shift in (("pyramid", 7), ("finest-only", 1)):
        for result in evaluation.iterate_pairs(run, source, kind):
            out, item = result.outputs, ref[result.pair_id]
            expected_affine = np.concatenate([np.eye(3), [[shift], [0], [0]]], axis=1)
            np.testing.assert_allclose(out["affine_3"], expected_affine, atol=1e-5)

            def moved(x):                                  # out(x) = in(x + shift e0), zeros outside
                y = np.zeros_like(x)
                y[:-shift] = x[shift:]
                return y

            np.testing.assert_allclose(out["warped_affine_image_3"][..., 0], moved(item.moving_image),
                                       atol=1e-5)
            np.testing.assert_allclose(out["warped_image_3"][..., 0], moved(item.moving_image), atol=1e-5)
            spirs = evaluation.registration_rows(result, 9)[1]
            assert spirs["dice_affine"] == pytest.approx(metrics.dice(item.fixed_mask, moved(item.moving_mask)))
            assert spirs["lncc_deformable"] == pytest.approx(metrics.lncc(item.fixed_image, moved(item.moving_image)),
                                                             abs=1e-5)
            assert spirs["folding_percent"] == 0.0 and spirs["log_jacobian_std"] == pytest.approx(0.0, abs=1e-6)
            if kind == "pyramid":                          # coarser levels: 1 then 3 voxels of their own grid
                np.testing.assert_allclose(out["affine_1"][0, 3], 4.0, atol=1e-5)
                np.testing.assert_allclose(out["affine_2"][0, 3], 6.0, atol=1e-5)
            else:
                assert result.levels == (3,)


def test_total_displacement_matches_geometry():
    rng = np.random.default_rng(1)
    matrix = np.concatenate([np.eye(3) + 0.05 * rng.normal(size=(3, 3)), rng.normal(size=(3, 1))], axis=1)
    dvf = rng.normal(size=(5, 6, 7, 3)).astype(np.float32)
    d = evaluation.total_displacement(matrix, dvf, (5, 6, 7))
    x = np.array([2, 3, 4])
    c = np.array([2.5, 3.0, 3.5])
    np.testing.assert_allclose(d[2, 3, 4], matrix[:, :3] @ (x - c) + matrix[:, 3] + c + dvf[2, 3, 4] - x, atol=1e-5)
    assert evaluation.total_displacement(None, None, (4, 4, 4)).max() == 0


def test_synthetic_label_and_split(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,timepoint,image,mask,split\n")
    assert evaluation.data_label(str(manifest)) == "real"
    assert evaluation.data_label(str(manifest), "yes") == "synthetic"
    (tmp_path / "synth.json").write_text(json.dumps({"generator": "spirs_tf.synthetic", "seed": 5, "patients": 3,
                                                      "config": {"pose": "raw", "grid_size": 32, "spacing_mm": 6}}))
    label = evaluation.data_label(str(manifest))
    assert label.startswith("synthetic") and "seed 5" in label and "pose raw" in label
    assert evaluation.data_label(str(manifest), "no") == "real"
    assert evaluation.split_arg("all") is None and evaluation.split_arg("test") == "test"


# -------------------------------------------------------------------------------- the other scripts
def test_compare_registration(setup, capsys):
    module = _script("compare_registration")
    out = str(setup["root"] / "compare")
    python = module.find_ants_python()
    args = ["--run", setup["run"], "--manifest", setup["manifest"], "--out", out, "--vxm-steps", "2"]
    args += ["--ants", "default"] if python else ["--ants", "none"]
    assert module.main(args) == 0
    setup["out"]["compare"] = out
    header, rows = _read(os.path.join(out, "registration.csv"))
    assert tuple(header) == module.COLUMNS
    methods = {r["method"] for r in rows}
    assert methods == {"identity", "SPIRS", "VXM"} | ({"ANTs"} if python else set())
    assert os.path.getsize(os.path.join(out, "figure5.png")) > 0
    assert os.path.isfile(os.path.join(out, "vxm.weights.h5"))
    ref = _inputs(setup)
    for r in rows:
        for c in ("lncc_deformable", "dice_deformable", "folding_percent"):
            assert math.isfinite(_f(r[c])), (r["method"], c)
        assert 0 <= _f(r["dice_deformable"]) <= 1 and 0 <= _f(r["lncc_deformable"]) <= 1 + 1e-9
        if r["method"] == "identity":
            item = ref[r["pair_id"]]
            assert _f(r["dice_affine"]) == pytest.approx(metrics.dice(item.fixed_mask, item.moving_mask))
        if r["method"] == "VXM":
            assert r["dice_affine"] == "" and r["lncc_affine"] == ""

    # --vxm-weights re-uses the trained VoxelMorph: the same VXM metrics, and results.md says so
    out3 = str(setup["root"] / "compare_vxm_reuse")
    weights = os.path.join(out, "vxm.weights.h5")
    assert module.main(["--run", setup["run"], "--manifest", setup["manifest"], "--out", out3, "--ants", "none",
                        "--vxm-weights", weights]) == 0
    _, rows3 = _read(os.path.join(out3, "registration.csv"))
    first = {r["pair_id"]: r for r in rows if r["method"] == "VXM"}
    again = {r["pair_id"]: r for r in rows3 if r["method"] == "VXM"}
    assert again.keys() == first.keys() and again
    for pair, r in again.items():
        assert _f(r["lncc_deformable"]) == pytest.approx(_f(first[pair]["lncc_deformable"]), abs=1e-5)
    md = open(os.path.join(out3, "results.md"), encoding="utf-8").read()
    assert "weights loaded from" in md and os.path.abspath(weights) in md and "Adam steps" not in md

    # antspyx absent (this interpreter has none): ANTs skipped with a message, no crash
    out2 = str(setup["root"] / "compare_no_ants")
    capsys.readouterr()
    assert module.main(["--run", setup["run"], "--manifest", setup["manifest"], "--out", out2, "--vxm-steps", "0",
                        "--ants-python", sys.executable if not _has_ants() else "/nonexistent/python"]) == 0
    assert "ANTs baselines skipped" in capsys.readouterr().out
    _, rows = _read(os.path.join(out2, "registration.csv"))
    assert {r["method"] for r in rows} == {"identity", "SPIRS"}
    md = open(os.path.join(out2, "results.md"), encoding="utf-8").read()
    assert "ANTs baselines skipped" in md and "VXM skipped" in md


def test_compare_registration_symmetric_row(setup):
    """--affine-symmetric on the shifted run: its affine head answers the same 7-voxel shift whichever scan
    is the prior, so the symmetric affine is the identity (affine metrics = the identity row's) and the
    field run composes the shift again (deformable metrics = the SPIRS row's)."""
    module = _script("compare_registration")
    out = str(setup["root"] / "compare_symmetric")
    assert module.main(["--run", setup["shifted"], "--manifest", setup["manifest"], "--out", out, "--ants", "none",
                        "--vxm-steps", "0", "--affine-symmetric"]) == 0
    _, rows = _read(os.path.join(out, "registration.csv"))
    by = {(r["pair_id"], r["method"]): r for r in rows}
    pairs = {r["pair_id"] for r in rows}
    assert {r["method"] for r in rows} == {"identity", "SPIRS", "SPIRS ×1 symmetric"} and pairs
    for pid in pairs:
        sym = by[(pid, "SPIRS ×1 symmetric")]
        for c in ("lncc_affine", "dice_affine"):
            assert _f(sym[c]) == pytest.approx(_f(by[(pid, "identity")][c]), abs=1e-5, nan_ok=True), c
        for c in ("lncc_deformable", "dice_deformable"):
            assert _f(sym[c]) == pytest.approx(_f(by[(pid, "SPIRS")][c]), abs=1e-4, nan_ok=True), c
        assert _f(by[(pid, "SPIRS")]["lncc_affine"]) != pytest.approx(_f(sym["lncc_affine"]), abs=1e-3)
    assert "SPIRS ×1 symmetric" in open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert module.main(["--run", setup["shifted"], "--manifest", setup["manifest"], "--out", out + "_bad",
                        "--ants", "none", "--vxm-steps", "0", "--affine-passes", "0"]) == 2


def _has_ants():
    return importlib.util.find_spec("ants") is not None


def test_ablation_pyramid(setup):
    out = str(setup["root"] / "ablation")
    assert _script("ablation_pyramid").main(["--run", setup["shifted"], "--manifest", setup["manifest"],
                                             "--out", out]) == 0
    _, table = _read(os.path.join(out, "table3.csv"))
    assert [(r["pyramidal"], r["transformation"]) for r in table] == [
        ("no", "affine"), ("yes", "affine"), ("no", "deformable"), ("yes", "deformable")]
    assert table[0]["variant"].startswith("proxy")
    _, rows = _read(os.path.join(out, "ablation.csv"))
    ref = _inputs(setup)
    for r in rows:   # shifted run: the pyramid moves the prior by 7 voxels, the finest level alone by 1
        shift = 7 if r["method"] == "pyramid" else 1
        m = ref[r["pair_id"]].moving_mask
        moved = np.zeros_like(m)
        moved[:-shift] = m[shift:]
        assert _f(r["dice_affine"]) == pytest.approx(metrics.dice(ref[r["pair_id"]].fixed_mask, moved))
    assert "proxy" in open(os.path.join(out, "results.md"), encoding="utf-8").read()
    # a second run instead of the proxy
    assert _script("ablation_pyramid").main(["--run", setup["shifted"], "--manifest", setup["manifest"],
                                             "--out", out, "--no-pyramid-run", setup["run"]]) == 0
    _, table = _read(os.path.join(out, "table3.csv"))
    assert table[0]["variant"].startswith("separately trained run")


def test_pyramid_levels(setup):
    module = _script("pyramid_levels")
    out = str(setup["root"] / "levels")
    assert module.main(["--run", setup["run"], "--manifest", setup["manifest"], "--out", out]) == 0
    header, rows = _read(os.path.join(out, "levels.csv"))
    assert tuple(header) == module.COLUMNS
    assert len(rows) == 2 * 3 * 3 and {r["grid"] for r in rows} == {"8", "16", "32"}
    assert all(math.isfinite(_f(r["lncc"])) for r in rows)
    assert os.path.getsize(os.path.join(out, "figure4ij.png")) > 0
    for r in rows:    # at the finest level the two LNCC measures are one
        if r["level"] == "3":
            assert _f(r["lncc_finest_grid"]) == pytest.approx(_f(r["lncc"]), abs=1e-5)
    # shifted run: the level-i affine at the finest grid moves the prior by 4, 6, 7 voxels; the deformable
    # map (A_final, zero u) by 7 at every level
    out_s = str(setup["root"] / "levels_shifted")
    assert module.main(["--run", setup["shifted"], "--manifest", setup["manifest"], "--out", out_s]) == 0
    _, rows_s = _read(os.path.join(out_s, "levels.csv"))
    ref = _inputs(setup)
    for r in rows_s:
        shift = {"identity": 0, "affine": {"1": 4, "2": 6, "3": 7}[r["level"]], "deformable": 7}[r["transform"]]
        item = ref[r["pair_id"]]
        moved = np.zeros_like(item.moving_image)
        moved[:moved.shape[0] - shift] = item.moving_image[shift:]
        assert _f(r["lncc_finest_grid"]) == pytest.approx(metrics.lncc(item.fixed_image, moved), abs=1e-5)
    if "eval" in setup["out"]:   # from evaluate.py's CSV: the same numbers
        out2 = str(setup["root"] / "levels_csv")
        assert module.main(["--run", setup["run"], "--manifest", setup["manifest"], "--out", out2,
                            "--from-csv", os.path.join(setup["out"]["eval"], "per_pair.csv")]) == 0
        _, rows2 = _read(os.path.join(out2, "levels.csv"))
        assert [(r["pair_id"], r["level"], r["transform"], r["lncc"]) for r in rows] == \
            [(r["pair_id"], r["level"], r["transform"], r["lncc"]) for r in rows2]


def test_examples(setup):
    out = str(setup["root"] / "examples")
    args = ["--run", setup["run"], "--manifest", setup["manifest"], "--out", out, "--synthetic", "yes"]
    if "compare" in setup["out"]:
        args += ["--compare", setup["out"]["compare"]]
    assert _script("examples").main(args) == 0
    info = json.load(open(os.path.join(out, "examples.json")))
    assert info["data"] == "synthetic" and len(info["figure6_pairs"]) == 2
    assert "SPIRS" in info["figure6_methods"] and ("VXM" in info["figure6_methods"]) == ("compare" in setup["out"])
    for name in ("figure6.png", "figure7.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_bad_inputs_give_clear_errors(setup, tmp_path, capsys):
    assert _script("evaluate").main(["--run", str(tmp_path / "nope"), "--manifest", setup["manifest"],
                                     "--out", str(tmp_path / "o")]) == 2
    assert "run not found" in capsys.readouterr().err
    assert _script("pyramid_levels").main(["--run", setup["run"], "--manifest", setup["manifest"], "--split", "valid",
                                           "--out", str(tmp_path / "o")]) == 2
    assert "no split 'valid'" in capsys.readouterr().err
