"""Tests for spirs_tf.stats and the two statistics scripts in experiments/ (no TensorFlow)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sst
from statsmodels.stats.multitest import multipletests

from spirs_tf import stats
from spirs_tf.errors import SpirsInputError

from cohort import experiment_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_load_script = experiment_script


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# --------------------------------------------------------------------------------------------------
# tests of spirs_tf.stats
# --------------------------------------------------------------------------------------------------
def test_wilcoxon_hand_computed_exact_p():
    # all six differences positive: W− = 0, exact two-sided p = 2 · (1/2)^6
    res = stats.wilcoxon_paired([2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1])
    assert res.statistic == 0.0 and res.n == 6 and res.n_nonzero == 6
    assert res.pvalue == pytest.approx(2 / 2 ** 6)
    assert res.median_difference == pytest.approx(3.5)


def test_wilcoxon_drops_nan_pairs_and_matches_scipy(rng):
    a = rng.normal(size=40)
    b = a + rng.normal(0.3, 1.0, size=40)
    a[3], b[7] = np.nan, np.nan
    res = stats.wilcoxon_paired(a, b)
    keep = ~(np.isnan(a) | np.isnan(b))
    ref = sst.wilcoxon(a[keep], b[keep])
    assert res.n == 38
    assert res.statistic == pytest.approx(ref.statistic) and res.pvalue == pytest.approx(ref.pvalue)
    assert res.median_difference == pytest.approx(np.median(a[keep] - b[keep]))


def test_wilcoxon_edge_cases():
    assert stats.wilcoxon_paired([1, 2], [1, 2]) == (0.0, 1.0, 2, 0, 0.0)
    res = stats.wilcoxon_paired([np.nan], [1.0])
    assert res.n == 0 and math.isnan(res.pvalue)
    with pytest.raises(ValueError, match="same length"):
        stats.wilcoxon_paired([1, 2], [1])


def test_mcnemar_exact_against_hand_binomial():
    # 3 lesions found by both, 1 only by A, 9 only by B, 2 by neither
    a = [True] * 3 + [True] * 1 + [False] * 9 + [False] * 2
    b = [True] * 3 + [False] * 1 + [True] * 9 + [False] * 2
    res = stats.mcnemar_exact(a, b)
    np.testing.assert_array_equal(res.table, [[3, 1], [9, 2]])
    assert res.statistic == 1.0 and res.n == 15
    assert res.pvalue == pytest.approx(2 * (1 + 10) / 2 ** 10)          # 2·P(X ≤ 1), X ~ Bin(10, ½)
    assert res.pvalue == pytest.approx(sst.binomtest(1, 10, 0.5).pvalue)
    assert stats.mcnemar_exact([True, False], [True, False]).pvalue == 1.0   # no discordant pair


def test_binomial_ci_known_values():
    assert stats.binomial_ci(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)
    assert stats.binomial_ci(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert stats.binomial_ci(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0))
    low, high = stats.binomial_ci(7, 20, level=0.9)
    assert low == pytest.approx(sst.beta.ppf(0.05, 7, 14)) and high == pytest.approx(sst.beta.ppf(0.95, 8, 13))
    # Table 1 of the paper: micro P1 27% of 637 lesions → (24–31); small P1 70% of 465 → (66–74)
    assert [round(100 * x) for x in stats.binomial_ci(172, 637)] == [24, 31]
    assert [round(100 * x) for x in stats.binomial_ci(326, 465)] == [66, 74]
    assert all(math.isnan(x) for x in stats.binomial_ci(0, 0))
    with pytest.raises(ValueError):
        stats.binomial_ci(3, 2)


def test_median_iqr_finite_matches_numpy_and_handles_inf(rng):
    x = rng.normal(size=17)
    assert stats.median_iqr(x) == pytest.approx(tuple(np.percentile(x, [50, 25, 75])))
    assert stats.median_iqr([1, 2, np.inf]) == (2.0, 1.5, np.inf)
    assert stats.median_iqr([1, 2, 3, np.inf, np.inf]) == (3.0, 2.0, np.inf)
    assert stats.median_iqr([np.inf, np.inf, np.inf, 1.0]) == (np.inf, np.inf, np.inf)
    assert stats.median_iqr([1.0, 2.0, 3.0, 4.0, np.nan]) == (2.5, 1.75, 3.25)   # NaN dropped
    assert all(math.isnan(v) for v in stats.median_iqr([]))


def test_holm_hand_computed():
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → max(0.04, 0.06) = 0.06
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = stats.holm([0.02, np.nan, 0.04])
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.04) and out[2] == pytest.approx(0.04)
    assert stats.holm([0.6, 0.7]).tolist() == [1.0, 1.0]


def test_read_lesion_csv_errors(tmp_path):
    header = ["pair_id", "lesion_id", "volume_mm3", "size_bin", "method", "detected", "dice", "hd95"]
    missing = _write_csv(tmp_path / "a.csv", header[:-1], [["p", "1", "10", "micro", "P1", "1", "0.5"]])
    with pytest.raises(SpirsInputError, match="missing column.*hd95") as exc:
        stats.read_lesion_csv(missing)
    assert exc.value.path == missing
    wrong_bin = _write_csv(tmp_path / "b.csv", header, [["p", "1", "30", "micro", "P1", "1", "0.5", "2"]])
    with pytest.raises(SpirsInputError, match="line 2: size_bin 'micro' does not match"):
        stats.read_lesion_csv(wrong_bin)
    bad_bool = _write_csv(tmp_path / "c.csv", header, [["p", "1", "3", "micro", "P1", "maybe", "0.5", "2"]])
    with pytest.raises(SpirsInputError, match="detected"):
        stats.read_lesion_csv(bad_bool)
    dup = _write_csv(tmp_path / "d.csv", header, [["p", "1", "3", "micro", "P1", "1", "0.5", "2"]] * 2)
    with pytest.raises(SpirsInputError, match="twice"):
        stats.read_lesion_csv(dup)
    with pytest.raises(SpirsInputError, match="not found"):
        stats.read_lesion_csv(tmp_path / "none.csv")


# --------------------------------------------------------------------------------------------------
# experiments/segmentation_table.py
# --------------------------------------------------------------------------------------------------
LESION_HEADER = ["pair_id", "lesion_id", "volume_mm3", "size_bin", "method", "detected", "dice", "hd95"]


def _lesion_rows():
    rows = []
    # four micro lesions in exam e1: P1 finds one, P2 finds three
    p1 = [(1, 0.5, 2.0), (0, 0.0, "inf"), (0, 0.0, "inf"), (0, 0.0, "inf")]
    p2 = [(1, 0.6, 2.0), (1, 0.4, 3.0), (1, 0.2, 4.0), (0, 0.0, "inf")]
    for lid in range(4):
        rows.append(["e1", lid + 1, 10.0, "micro", "P1", *p1[lid]])
        rows.append(["e1", lid + 1, 10.0, "micro", "P2", *p2[lid]])
    # one small lesion (50 mm³) in exam e2, found by both; bin column left empty → from the volume
    rows.append(["e2", 1, 50.0, "", "P1", "true", 0.7, 1.0])
    rows.append(["e2", 1, 50.0, "", "P2", "true", 0.8, 1.0])
    return rows


def test_segmentation_table_end_to_end(tmp_path, capsys):
    script = _load_script("segmentation_table")
    src = _write_csv(tmp_path / "lesions.csv", LESION_HEADER, _lesion_rows())
    out, md = tmp_path / "table1.csv", tmp_path / "table1.md"
    assert script.main([src, "--out", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    with open(out, encoding="utf-8") as fh:
        table = {(r["size_bin"], r["method"]): r for r in csv.DictReader(fh)}
    micro1, micro2 = table[("micro", "P1")], table[("micro", "P2")]
    assert int(micro1["n_lesions"]) == 4 and int(micro1["n_detected"]) == 1
    # P1 DSC [0, 0, 0, 0.5]: median 0, Q3 at h = 2.25 → 0.125; HD95 median inf (3 of 4 missed)
    assert float(micro1["dsc_median"]) == 0.0 and float(micro1["dsc_q3"]) == pytest.approx(0.125)
    assert float(micro1["hd95_median"]) == math.inf
    # P2 DSC [0, .2, .4, .6] → median 0.3; HD95 [2, 3, 4, inf] → median 3.5, Q1 2.75, Q3 inf
    assert float(micro2["dsc_median"]) == pytest.approx(0.3)
    assert (float(micro2["hd95_median"]), float(micro2["hd95_q1"]), float(micro2["hd95_q3"])) == \
        pytest.approx((3.5, 2.75, math.inf))
    assert float(micro1["sensitivity_pct"]) == 25.0 and float(micro2["sensitivity_pct"]) == 75.0
    assert float(micro1["sensitivity_ci_low_pct"]) == pytest.approx(100 * sst.beta.ppf(0.025, 1, 4))
    assert float(micro1["sensitivity_ci_high_pct"]) == pytest.approx(100 * sst.beta.ppf(0.975, 2, 3))
    # McNemar micro: 0 lesions found only by P1, 2 only by P2 → p = 2 · (1/2)^2 = 0.5
    assert (int(micro1["mcnemar_a_only"]), int(micro1["mcnemar_b_only"])) == (0, 2)
    assert float(micro1["mcnemar_p"]) == pytest.approx(0.5) == float(micro2["mcnemar_p"])
    assert float(table[("small", "P2")]["dsc_median"]) == pytest.approx(0.8)
    assert float(table[("small", "P1")]["mcnemar_p"]) == 1.0
    assert int(table[("large", "P1")]["n_lesions"]) == 0 and math.isnan(float(table[("large", "P1")]["mcnemar_p"]))
    assert int(table[("all", "P2")]["n_detected"]) == 4
    assert "| micro | P1 | 4 | 0.00 (0.00–0.12) | inf (inf–inf) | 25 (1–81) | 0.5000 |" in printed
    assert "| micro | P2 | 4 | 0.30 (0.15–0.45) | 3.50 (2.75–inf) | 75 (19–99) | 0.5000 |" in printed
    assert "| large | P1 | 0 | – | – | – | – |" in printed
    assert md.read_text(encoding="utf-8") == printed


def test_segmentation_table_reports_bad_input(tmp_path, capsys):
    script = _load_script("segmentation_table")
    src = _write_csv(tmp_path / "lesions.csv", LESION_HEADER, _lesion_rows())
    assert script.main([src, "--methods", "P1", "P3"]) == 2
    assert "P3" in capsys.readouterr().err
    assert script.main([str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# experiments/stats.py
# --------------------------------------------------------------------------------------------------
def test_stats_script_end_to_end(tmp_path, capsys):
    script = _load_script("stats")
    header = ["pair_id", "method", "fixed", "lncc_deformable", "dice_affine", "folding_percent"]
    rows = []
    vxm_diff = [0.5, -0.2, 0.3, 0.4, -0.1, 0.6]
    for i in range(6):
        spirs = 0.5 + 0.01 * i
        rows.append([f"p{i}", "SPIRS", f"f{i}.nii.gz", spirs, 0.6, 0.0])
        rows.append([f"p{i}", "ANTs", f"f{i}.nii.gz", spirs - 0.1 * (i + 1), 0.6, 0.0])
        rows.append([f"p{i}", "VXM", f"f{i}.nii.gz", spirs - vxm_diff[i], "", 0.1 * i])
    reg = _write_csv(tmp_path / "registration.csv", header, rows)
    les = _write_csv(tmp_path / "lesions.csv", LESION_HEADER, _lesion_rows())
    out = tmp_path / "stats.json"
    assert script.main(["--registration", reg, "--lesions", les, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text(encoding="utf-8"))
    tests = {(t["metric"], t["method"]): t for t in result["registration"]["tests"]}
    assert set(tests) == {(m, o) for m in ("lncc_deformable", "dice_affine", "folding_percent")
                          for o in ("ANTs", "VXM")}                          # "fixed" is not a metric
    ants = tests[("lncc_deformable", "ANTs")]
    assert ants["n"] == 6 and ants["statistic"] == 0.0 and ants["p"] == pytest.approx(2 / 2 ** 6)
    assert ants["median_difference"] == pytest.approx(0.35)
    ref = sst.wilcoxon(np.array(vxm_diff), np.zeros(6))
    assert tests[("lncc_deformable", "VXM")]["p"] == pytest.approx(ref.pvalue)
    assert tests[("dice_affine", "VXM")]["n"] == 0 and tests[("dice_affine", "VXM")]["p"] is None
    assert tests[("dice_affine", "ANTs")]["p"] == 1.0                        # all differences zero
    # Holm over the family of the tests that could be run (NaN p left out)
    keys = [k for k, t in tests.items() if t["p"] is not None]
    expected = multipletests([tests[k]["p"] for k in keys], method="holm")[1]
    assert [tests[k]["p_holm"] for k in keys] == pytest.approx(list(expected))
    assert "Holm" in result["registration"]["correction"]
    det = {t["size_bin"]: t for t in result["detection"]["tests"]}
    assert det["micro"]["table"] == [[1, 0], [2, 1]] and det["micro"]["p"] == pytest.approx(0.5)
    assert det["small"]["p"] == 1.0 and det["medium"]["p"] is None
    assert det["micro"]["p_holm"] == pytest.approx(1.0)                       # 2 tests: min(1, 2·0.5)
    assert "lncc_deformable" in printed and "P1 only=0" in printed


def test_stats_script_errors(tmp_path, capsys):
    script = _load_script("stats")
    reg = _write_csv(tmp_path / "r.csv", ["pair_id", "method", "lncc"], [["p0", "ANTs", 0.5]])
    assert script.main(["--registration", reg]) == 2
    assert "reference method 'SPIRS' not found" in capsys.readouterr().err
    assert script.main(["--registration", reg, "--reference", "ANTs", "--metrics", "dice"]) == 2
    assert "no metric column(s) dice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([])


def test_scripts_and_modules_do_not_import_tensorflow():
    code = ("import runpy, sys; "
            f"runpy.run_path({os.path.join(ROOT, 'experiments', 'stats.py')!r}); "
            f"runpy.run_path({os.path.join(ROOT, 'experiments', 'segmentation_table.py')!r}); "
            "import spirs_tf.metrics, spirs_tf.stats; "
            "bad = [m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
