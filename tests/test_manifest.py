"""Tests for spirs_tf.manifest and ``spirs manifest check``: every problem reported, with file and row."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from spirs_tf.cli import main
from spirs_tf.errors import SpirsInputError
from spirs_tf.io import write_volume
from spirs_tf.manifest import (Manifest, Pair, Scan, check_manifest, load_manifest, make_pairs,
                               parse_timepoint, validate_manifest)

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 14, 16)
AFFINE = np.array([[0.0, -1.2, 0, 10], [0.9, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
FIELDS = ("patient_id", "timepoint", "image", "mask", "split")


def make_scan(folder: Path, stem: str, image_ext=".nii.gz", mask_ext=".nii.gz", seed=0) -> tuple[str, str]:
    """A tiny image (random positive brain in a box, zero background) and its binary mask."""
    rng = np.random.default_rng(seed)
    image = np.zeros(SHAPE, np.float32)
    image[2:10, 3:11, 4:12] = rng.uniform(10, 100, (8, 8, 8))
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:6, 5:7, 6:8] = 1
    img_path, mask_path = folder / f"{stem}_image{image_ext}", folder / f"{stem}_mask{mask_ext}"
    img_path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(img_path, image, AFFINE)
    write_volume(mask_path, mask, AFFINE)
    return img_path.relative_to(folder).as_posix(), mask_path.relative_to(folder).as_posix()


def write_csv(path: Path, rows: list[dict], fields=FIELDS) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return os.fspath(path)


@pytest.fixture
def data(tmp_path):
    """Five scans of three patients; rows 2–6 of ``manifest.csv``."""
    rows = []
    for seed, (pid, tp, split) in enumerate([("p1", "0", "train"), ("p1", "2", "train"), ("p1", "1", "train"),
                                             ("p2", "2020-05-01", "val"), ("p3", "0", "test")]):
        image, mask = make_scan(tmp_path, f"{pid}/{tp}", seed=seed)
        rows.append(dict(patient_id=pid, timepoint=tp, image=image, mask=mask, split=split))
    return tmp_path, rows


def problems_for(tmp_path, rows, deep=True, fields=FIELDS):
    path = write_csv(tmp_path / "manifest.csv", rows, fields)
    return path, check_manifest(path, deep=deep)


# ---------------------------------------------------------------------------------- clean manifest
def test_clean_manifest_loads(data):
    folder, rows = data
    path, problems = problems_for(folder, rows)
    assert problems == []
    manifest = load_manifest(path)
    assert manifest.path == os.path.abspath(path) and len(manifest.scans) == 5
    first = manifest.scans[0]
    assert first == Scan("p1", 0, str(folder / "p1/0_image.nii.gz"), str(folder / "p1/0_mask.nii.gz"), "train", 2)
    assert os.path.isabs(first.image) and os.path.exists(first.mask)
    assert list(manifest.splits()) == ["train", "val", "test"]
    assert [s.row for s in manifest.splits()["train"]] == [2, 3, 4]
    assert [s.timepoint for s in manifest.patients()["p1"]] == [0, 1, 2]
    assert manifest.scans[3].timepoint == parse_timepoint("2020-05-01")


def test_parse_timepoint():
    import datetime as dt

    assert parse_timepoint(" 12 ") == 12 and parse_timepoint("-3") == -3
    assert parse_timepoint("2021-02-28") == dt.date(2021, 2, 28)
    for bad in ("1.5", "2021-02-30", "baseline", ""):
        with pytest.raises(ValueError, match="neither an integer nor an ISO date"):
            parse_timepoint(bad)


# ---------------------------------------------------------------------------------- each problem
def _missing_image(folder, rows):
    os.remove(folder / rows[1]["image"])
    return 3, "image not found"


def _missing_mask(folder, rows):
    rows[3]["mask"] = "nowhere/mask.nii.gz"
    return 5, "mask not found"


def _duplicate_timepoint(folder, rows):
    rows[2]["timepoint"] = "0"
    return "2, 4", "patient 'p1' has timepoint 0 more than once"


def _two_splits(folder, rows):
    rows[1]["split"] = "test"
    return "2, 3, 4", "patient 'p1' is in 2 splits: 'train' (row 2, 4), 'test' (row 3)"


def _empty_split(folder, rows):
    rows[4]["split"] = ""
    return 6, "empty split"


def _bad_timepoint(folder, rows):
    rows[4]["timepoint"] = "week 3"
    return 6, "timepoint 'week 3' is neither an integer nor an ISO date"


def _mixed_timepoints(folder, rows):
    rows[1]["timepoint"] = "2020-01-01"
    return "2, 3, 4", "patient 'p1' mixes integer and date timepoints"


def _empty_mask_in_train(folder, rows):
    rows[0]["mask"] = ""
    return 2, "empty mask in split 'train'"


def _grid_mismatch(folder, rows):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    write_volume(folder / rows[0]["mask"], np.zeros(SHAPE, np.uint8), shifted)
    return 2, "not on the same voxel grid as"


def _non_binary_mask(folder, rows):
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 1, 1] = 2
    write_volume(folder / rows[1]["mask"], mask, AFFINE)
    return 3, "mask is not binary: it holds value(s) 2"


def _empty_image(folder, rows):
    write_volume(folder / rows[2]["image"], np.zeros(SHAPE, np.float32), AFFINE)
    return 4, "image is all zero"


def _nan_image(folder, rows):
    image = np.ones(SHAPE, np.float32)
    image[3, 3, 3] = np.nan
    write_volume(folder / rows[3]["image"], image, AFFINE)
    return 5, "1 voxel(s) are NaN or infinite"


def _unreadable_image(folder, rows):
    (folder / rows[4]["image"]).write_bytes(b"\x1f\x8b garbage")
    return 6, "cannot read"


SHALLOW = [_missing_image, _missing_mask, _duplicate_timepoint, _two_splits, _empty_split, _bad_timepoint,
           _mixed_timepoints, _empty_mask_in_train]
DEEP = [_grid_mismatch, _non_binary_mask, _empty_image, _nan_image, _unreadable_image]


@pytest.mark.parametrize("inject", SHALLOW + DEEP, ids=lambda f: f.__name__.strip("_"))
def test_each_problem_is_reported_with_file_and_row(data, inject):
    folder, rows = data
    row, text = inject(folder, rows)
    path, problems = problems_for(folder, rows)
    assert len(problems) == 1, problems
    prefix = f"{path}: row{'s' if isinstance(row, str) else ''} {row}: "
    assert problems[0].startswith(prefix), problems[0]
    assert text in problems[0]
    if inject in DEEP:  # the message also names the scan file at fault
        assert str(folder) in problems[0][len(prefix):]
        assert check_manifest(path, deep=False) == []


def test_missing_columns(data):
    folder, rows = data
    path, problems = problems_for(folder, rows, fields=("patient_id", "image", "split"))
    assert problems == [f"{path}: row 1: missing column(s) timepoint, mask (header must contain "
                        "patient_id,timepoint,image,mask,split)"]


def test_missing_or_empty_manifest(tmp_path):
    assert check_manifest(tmp_path / "none.csv") == [f"{tmp_path / 'none.csv'}: manifest not found"]
    (tmp_path / "empty.csv").write_text("")
    assert "manifest is empty" in check_manifest(tmp_path / "empty.csv")[0]


def test_every_problem_is_reported_at_once(data):
    folder, rows = data
    injected = [f(folder, rows) for f in (_missing_image, _missing_mask, _empty_split, _non_binary_mask,
                                          _empty_image)]
    rows[2]["timepoint"] = "2"  # duplicates row 3, whose image is missing and whose mask is still opened
    path, problems = problems_for(folder, rows)
    assert len(problems) == len(injected) + 1, problems
    for row, text in injected:
        assert any(p.startswith(f"{path}: row {row}: ") and text in p for p in problems), (row, text)
    assert any("rows 3, 4: patient 'p1' has timepoint 2 more than once" in p for p in problems)
    with pytest.raises(SpirsInputError) as info:
        load_manifest(path)  # load does not open scans: only the shallow problems
    message = str(info.value)
    assert message.startswith(f"{path}: 4 problem(s) in the manifest:")
    for text in ("image not found", "mask not found", "empty split", "more than once"):
        assert text in message
    manifest, found = validate_manifest(path, deep=False)
    assert [s.row for s in manifest.scans] == [2, 4]  # rows 3, 5, 6 have row-level problems
    assert len(found) == 4


# ---------------------------------------------------------------------------------- pairs
def _manifest(entries) -> Manifest:
    scans = tuple(Scan(pid, tp, f"/{pid}/{tp}.nii.gz", None, split, row)
                  for row, (pid, tp, split) in enumerate(entries, start=2))
    return Manifest("/m.csv", scans)


def test_pairs_consecutive_all_and_both_directions():
    m = _manifest([("a", 2, "train"), ("a", 0, "train"), ("a", 1, "train"), ("b", 5, "train"),
                   ("c", 0, "test"), ("c", 3, "test")])

    def tps(pairs):
        return [(p.patient_id, p.prior.timepoint, p.new.timepoint) for p in pairs]

    assert tps(make_pairs(m)) == [("a", 0, 1), ("a", 1, 2), ("c", 0, 3)]
    assert tps(make_pairs(m, "train", mode="all")) == [("a", 0, 1), ("a", 0, 2), ("a", 1, 2)]
    assert tps(make_pairs(m, "test", both_directions=True)) == [("c", 0, 3), ("c", 3, 0)]
    n = 3
    assert len(make_pairs(m, "train", "all", both_directions=True)) == n * (n - 1)
    assert all(isinstance(p, Pair) and p.prior.split == p.new.split for p in make_pairs(m, mode="all"))
    with pytest.raises(SpirsInputError, match="no split 'val' \\(the manifest has train, test\\)"):
        make_pairs(m, "val")
    with pytest.raises(ValueError, match="mode"):
        make_pairs(m, mode="random")


def test_pairs_follow_dates_not_rows(data):
    folder, rows = data
    image, mask = make_scan(folder, "p2/b", seed=9)
    rows.insert(3, dict(patient_id="p2", timepoint="2019-12-31", image=image, mask=mask, split="val"))
    path = write_csv(folder / "manifest.csv", rows)
    pairs = make_pairs(load_manifest(path), "val")
    assert [(str(p.prior.timepoint), str(p.new.timepoint)) for p in pairs] == [("2019-12-31", "2020-05-01")]


# ---------------------------------------------------------------------------------- CLI
def test_cli_clean_manifest(data, capsys):
    folder, rows = data
    path = write_csv(folder / "manifest.csv", rows)
    assert main(["manifest", "check", path]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{path}: OK: 5 scan(s), 3 patient(s); consecutive pairs per split: train 2, val 0, test 0"]
    assert main(["manifest", "check", path, "--pairing", "all", "--both-directions"]) == 0
    assert "all pairs per split: train 6, val 0, test 0" in capsys.readouterr().out


def test_cli_reports_problems_one_per_line(data, capsys):
    folder, rows = data
    _unreadable_image(folder, rows)
    _missing_mask(folder, rows)
    path = write_csv(folder / "manifest.csv", rows)
    assert main(["manifest", "check", path]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}: row 5: mask not found:")
    assert lines[1].startswith(f"{path}: row 6: ") and "cannot read" in lines[1]
    assert lines[2] == (f"{path}: 2 problem(s); rows without problems: 3 scan(s), 1 patient(s); "
                        "consecutive pairs per split: train 2")
    assert main(["manifest", "check", path, "--no-deep"]) == 2  # the missing mask is still found
    assert "cannot read" not in capsys.readouterr().out
    assert main(["manifest", "check", os.fspath(folder / "absent.csv")]) == 2
    assert "manifest not found" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- the shipped example
def test_example_manifest_is_valid(tmp_path):
    shutil.copy(REPO / "data_manifests" / "example.csv", tmp_path / "example.csv")
    with open(tmp_path / "example.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for seed, row in enumerate(rows):
        image = np.zeros(SHAPE, np.float32)
        image[2:10, 3:11, 4:12] = seed + 1.0
        write_volume(tmp_path / row["image"], image, AFFINE)
        if row["mask"]:
            write_volume(tmp_path / row["mask"], np.zeros(SHAPE, np.uint8), AFFINE)
    assert check_manifest(tmp_path / "example.csv") == []
    manifest = load_manifest(tmp_path / "example.csv")
    assert {s: len(make_pairs(manifest, s)) for s in manifest.splits()} == {"train": 3, "val": 1, "test": 1}
    assert manifest.scans[-1].mask is None and manifest.scans[-1].split == "test"
