"""Reliability, part 1 (issue 9): hostile inputs fail loudly and cleanly.

Every bad input must end in ONE line ``spirs: error: <file>: <problem>`` on stderr (``spirs manifest
check`` lists its problems on stdout, one line each, starting with the manifest and the row), exit
code 2, no Python traceback, and no output: no case folder, no run folder, no temporary leftovers.
Covered here, through ``spirs_tf.cli.main`` and, where only a real process can show it, through
``python -m spirs_tf.cli`` / ``experiments/run_stage.py`` in a subprocess:

* ``spirs predict`` and ``spirs manifest check`` on each bad file of :func:`bad_files` (missing,
  truncated/garbage/empty .nii.gz, 2-D, 4-D with several volumes, NaN, inf, all-zero image,
  non-binary mask, mask on another grid or shape, spacing 0 / negative / 50 mm, a 1000³ header
  without data (refused before allocating: checked with tracemalloc), a folder that is not a DICOM
  series, an unknown extension);
* manifests with a missing column, a duplicated time point or a patient in two splits, for
  ``manifest check``, ``predict --manifest`` and ``train``; a bad scan in a training manifest for
  ``spirs train`` and ``experiments/run_stage.py``;
* ``spirs synth`` settings that used to run out of memory or for minutes (``--grid 600``);
* paths with spaces and with bytes that are not UTF-8 (SimpleITK used to *abort* the process on
  them), including stdout in a strict (non-UTF-8-mode) encoding;
* a seeded fuzz test: 240 corruptions of a small valid NIfTI (header fields, random bytes,
  truncation, insertion, gzip stream damage), each through ``io.read_volume`` and ``spirs manifest
  check`` under a per-case time limit.

Already covered elsewhere and not repeated: function-level ``read_volume`` checks
(tests/test_io.py), every manifest rule with file and row (tests/test_manifest.py), ``spirs predict``
with a 2-D/NaN/non-binary/other-grid/missing/non-overlapping input and atomic case folders
(tests/test_inference.py), ``spirs synth`` with ``--patients 0``, an unwritable ``--out`` and a bad
``--timepoints`` (tests/test_synthetic.py). Interrupted runs, determinism and numerics are in
tests/test_reliability_runs.py.
"""
from __future__ import annotations

import csv
import gzip
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from spirs_tf import cli
from spirs_tf.errors import SpirsInputError
from spirs_tf.io import read_volume, write_volume
from spirs_tf.manifest import check_manifest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
from cohort import make_cohort  # noqa: E402

SHAPE = (20, 20, 20)
SPACING = 5.0
NON_UTF8 = b"caf\xe9 dir"  # Latin-1 'café dir': not valid UTF-8, with a space


# ------------------------------------------------------------------------------------------ helpers
class _Hang(Exception):
    """Raised by SIGALRM: a case ran past its time limit."""


def _alarm(signum, frame):
    raise _Hang()


def run_cli(argv, capsys):
    """``spirs_tf.cli.main(argv)`` → (exit code, stdout, stderr); a traceback never reaches the user."""
    code = cli.main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return code, out, err


def assert_one_line_error(err: str, culprit, problem: str) -> None:
    """stderr is exactly ``spirs: error: <culprit>: ...<problem>...`` on one line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"spirs: error: {os.fspath(culprit)}: "), err
    assert problem in lines[0], err


def non_utf8_dir(tmp_path) -> str:
    """A folder named with Latin-1 bytes and a space (Python holds the name with lone surrogates)."""
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), NON_UTF8))
    os.makedirs(folder)
    with pytest.raises(UnicodeEncodeError):
        folder.encode("utf-8")
    return folder


def write_manifest(path, rows, columns=("patient_id", "timepoint", "image", "mask", "split")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return os.fspath(path)


def header_only_nifti(path, shape, pixdim=None) -> str:
    """A NIfTI header (352 bytes) that announces ``shape`` float32 voxels but stores none."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    if pixdim is not None:
        hdr["pixdim"][1:4] = pixdim
    raw = hdr.binaryblock + b"\0" * 4
    with open(path, "wb") as fh:
        fh.write(gzip.compress(raw) if os.fspath(path).endswith(".gz") else raw)
    return os.fspath(path)


def raw_pixdim_nifti(path, data, pixdim) -> str:
    """An uncompressed NIfTI whose geometry comes from ``pixdim`` only (sform and qform codes 0),
    written byte by byte so that nibabel cannot repair the stored voxel size."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr["pixdim"][1:4] = pixdim
    hdr["qform_code"] = hdr["sform_code"] = 0
    hdr["vox_offset"] = 352
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + np.asarray(data, "<f4").tobytes(order="F"))
    return os.fspath(path)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two clean patients × two time points (20³, 5 mm) with their manifest and one case's files."""
    root = tmp_path_factory.mktemp("clean")
    manifest = make_cohort(str(root), n_patients=2, n_timepoints=2, shape=SHAPE, spacing=SPACING,
                           splits=("test",))
    img = nib.load(root / "p0" / "t0" / "image.nii.gz")
    return SimpleNamespace(
        root=root, manifest=manifest, new=str(root / "p0" / "t1" / "image.nii.gz"),
        prior=str(root / "p0" / "t0" / "image.nii.gz"), mask=str(root / "p0" / "t0" / "mask.nii.gz"),
        image=np.asarray(img.dataobj, np.float32), affine=img.affine,
        lesion=np.asarray(nib.load(root / "p0" / "t0" / "mask.nii.gz").dataobj))


@dataclass(frozen=True)
class Bad:
    name: str
    slot: str  # which input of a case it replaces: "new", "prior" or "prior_mask"
    path: str
    problem: str  # part of the expected message


BAD_NAMES = ("missing", "truncated_gz", "garbage_gz", "empty_file", "two_d", "four_d", "nan", "inf",
             "all_zero", "mask_values", "mask_other_grid", "mask_other_shape", "spacing_zero",
             "spacing_negative", "spacing_50mm", "huge_header", "huge_header_gz", "not_dicom_dir",
             "unsupported")


def bad_files(folder, s) -> dict[str, Bad]:
    """Write one file per problem into ``folder`` (``s``: the :func:`scans` fixture)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    rng = np.random.default_rng(7)
    image, lesion, affine = s.image, s.lesion, s.affine
    raw = open(s.prior, "rb").read()
    open(p("truncated.nii.gz"), "wb").write(raw[: len(raw) * 2 // 3])
    open(p("garbage.nii.gz"), "wb").write(gzip.compress(rng.integers(0, 256, 4000, np.uint8).tobytes()))
    open(p("empty.nii.gz"), "wb").close()
    nib.save(nib.Nifti1Image(image[:, :, 10], affine), p("flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([image] * 3, -1), affine), p("series.nii.gz"))
    nan, inf = image.copy(), image.copy()
    nan[3, 4, 5] = np.nan
    inf[6, 7, 8] = -np.inf
    nib.save(nib.Nifti1Image(nan, affine), p("nan.nii.gz"))
    nib.save(nib.Nifti1Image(inf, affine), p("inf.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros_like(image), affine), p("zeros.nii.gz"))
    nib.save(nib.Nifti1Image(lesion * 2.0 + 0.5 * (lesion == 0), affine), p("mask_values.nii.gz"))
    moved = affine.copy()
    moved[:3, 3] += 2.0
    nib.save(nib.Nifti1Image(lesion, moved), p("mask_moved.nii.gz"))
    nib.save(nib.Nifti1Image(lesion[:-2], affine), p("mask_cropped.nii.gz"))
    raw_pixdim_nifti(p("spacing0.nii"), image, (0.0, SPACING, SPACING))
    raw_pixdim_nifti(p("spacing_neg.nii"), image, (-SPACING, SPACING, SPACING))
    nib.save(nib.Nifti1Image(image, np.diag([50.0, SPACING, SPACING, 1.0])), p("spacing50.nii.gz"))
    header_only_nifti(p("huge.nii"), (1000, 1000, 1000))
    header_only_nifti(p("huge.nii.gz"), (1000, 1000, 1000))
    os.makedirs(p("not dicom"), exist_ok=True)
    open(p("not dicom/readme.txt"), "w").write("no images here")
    open(p("scan.png"), "wb").write(b"\x89PNG\r\n\x1a\n")
    cases = [
        Bad("missing", "new", p("missing.nii.gz"), "file not found"),
        Bad("truncated_gz", "prior", p("truncated.nii.gz"), "cannot read"),
        Bad("garbage_gz", "new", p("garbage.nii.gz"), "cannot read"),
        Bad("empty_file", "prior_mask", p("empty.nii.gz"), "cannot read"),
        Bad("two_d", "new", p("flat.nii.gz"), "not a 3-D image"),
        Bad("four_d", "prior", p("series.nii.gz"), "4-D image with 3 volumes"),
        Bad("nan", "new", p("nan.nii.gz"), "1 voxel(s) are NaN or infinite"),
        Bad("inf", "prior", p("inf.nii.gz"), "1 voxel(s) are NaN or infinite"),
        Bad("all_zero", "new", p("zeros.nii.gz"), "image is all zero"),
        Bad("mask_values", "prior_mask", p("mask_values.nii.gz"), "mask is not binary"),
        Bad("mask_other_grid", "prior_mask", p("mask_moved.nii.gz"), "not on the same voxel grid"),
        Bad("mask_other_shape", "prior_mask", p("mask_cropped.nii.gz"), "not on the same voxel grid"),
        Bad("spacing_zero", "prior", p("spacing0.nii"), "implausible voxel spacing (0, 5, 5) mm"),
        Bad("spacing_negative", "new", p("spacing_neg.nii"), "implausible voxel spacing (-5, 5, 5) mm"),
        Bad("spacing_50mm", "prior", p("spacing50.nii.gz"), "implausible voxel spacing (50, 5, 5) mm"),
        Bad("huge_header", "new", p("huge.nii"), "image too large: shape (1000, 1000, 1000)"),
        Bad("huge_header_gz", "prior", p("huge.nii.gz"), "image too large: shape (1000, 1000, 1000)"),
        Bad("not_dicom_dir", "new", p("not dicom"), "folder holds no DICOM series"),
        Bad("unsupported", "prior", p("scan.png"), "unsupported file type '.png'"),
    ]
    assert tuple(c.name for c in cases) == BAD_NAMES
    return {c.name: c for c in cases}


@pytest.fixture(scope="module")
def bad(scans, tmp_path_factory):
    return bad_files(tmp_path_factory.mktemp("bad files"), scans)


# --------------------------------------------------------------------------------- spirs predict
@pytest.mark.parametrize("name", BAD_NAMES)
def test_predict_refuses_bad_input_in_one_line_without_output(scans, bad, name, tmp_path, capsys):
    case = bad[name]
    inputs = {"new": scans.new, "prior": scans.prior, "prior_mask": scans.mask, case.slot: case.path}
    out = tmp_path / "predictions" / "case one"
    # Inputs are validated before the model is touched: this --model does not exist, and saying so
    # instead of naming the bad input would fail the test.
    code, _, err = run_cli(["predict", "--new", inputs["new"], "--prior", inputs["prior"], "--prior-mask",
                            inputs["prior_mask"], "--out", out, "--model", tmp_path / "never-loaded"], capsys)
    assert code == 2
    assert_one_line_error(err, case.path, case.problem)
    assert not (tmp_path / "predictions").exists()


def test_huge_header_is_refused_before_allocating(bad, tmp_path, capsys):
    """A 1000³ float32 image needs 4 GB; the refusal must come from the header alone."""
    manifest = write_manifest(tmp_path / "m.csv", [
        {"patient_id": "a", "timepoint": 0, "image": bad["huge_header"].path, "split": "test"},
        {"patient_id": "b", "timepoint": 0, "image": bad["huge_header_gz"].path, "split": "test"}])
    tracemalloc.start()
    try:
        code, out, _ = run_cli(["manifest", "check", manifest], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and out.count("image too large") == 2
    assert peak < 20e6, f"peak {peak / 1e6:.1f} MB while refusing a 1000^3 header"


# ------------------------------------------------------------------------------ manifest check
def test_manifest_check_names_row_file_and_problem_for_every_bad_file(scans, bad, tmp_path, capsys):
    rows = []
    for k, case in enumerate(bad.values()):
        image = case.path if case.slot != "prior_mask" else scans.prior
        mask = case.path if case.slot == "prior_mask" else scans.mask
        rows.append({"patient_id": f"p{k}", "timepoint": 0, "image": image, "mask": mask, "split": "test"})
    manifest = write_manifest(tmp_path / "bad manifest.csv", rows)
    code, out, _ = run_cli(["manifest", "check", manifest], capsys)
    lines = out.strip().splitlines()
    assert code == 2
    assert len(lines) == len(bad) + 1 and lines[-1].startswith(f"{manifest}: {len(bad)} problem(s)")
    for k, (case, line) in enumerate(zip(bad.values(), lines)):
        assert line.startswith(f"{manifest}: row {k + 2}: "), line
        assert case.path in line and case.problem.replace("file not found", "not found") in line, line


def test_manifest_check_accepts_an_empty_mask(scans, tmp_path, capsys):
    """An all-zero lesion mask is valid (a patient without lesions); only a 0-byte file is not."""
    empty = tmp_path / "empty mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), scans.affine), empty)
    manifest = write_manifest(tmp_path / "m.csv", [
        {"patient_id": "p", "timepoint": t, "image": scans.prior, "mask": str(empty), "split": "train"}
        for t in (0, 1)])
    code, out, _ = run_cli(["manifest", "check", manifest], capsys)
    assert code == 0 and out.startswith(f"{manifest}: OK: 2 scan(s), 1 patient(s)")


MANIFEST_PROBLEMS = {
    "missing_column": "row 1: missing column(s) mask",
    "duplicate": "rows 2, 3: patient 'p0' has timepoint 0 more than once",
    "two_splits": "rows 2, 3: patient 'p0' is in 2 splits",
}


def broken_manifest(kind: str, folder, s) -> str:
    rows = [{"patient_id": "p0", "timepoint": 0, "image": s.prior, "mask": s.mask, "split": "train"},
            {"patient_id": "p0", "timepoint": 1, "image": s.new, "mask": s.mask, "split": "train"}]
    if kind == "missing_column":
        return write_manifest(folder / "m.csv", rows, columns=("patient_id", "timepoint", "image", "split"))
    if kind == "duplicate":
        rows[1]["timepoint"] = 0
    else:
        rows[1]["split"] = "test"
    return write_manifest(folder / "m.csv", rows)


@pytest.mark.parametrize("kind", sorted(MANIFEST_PROBLEMS))
def test_broken_manifest_stops_every_command_in_one_line(scans, kind, tmp_path, capsys):
    manifest = broken_manifest(kind, tmp_path, scans)
    problem = MANIFEST_PROBLEMS[kind]
    code, out, _ = run_cli(["manifest", "check", manifest, "--no-deep"], capsys)
    assert code == 2 and f"{manifest}: {problem}" in out
    code, _, err = run_cli(["predict", "--manifest", manifest, "--split", "train", "--out", tmp_path / "pred",
                            "--model", tmp_path / "never-loaded"], capsys)
    assert code == 2
    assert_one_line_error(err, manifest, problem)
    code, _, err = run_cli(["train", "--stage", "1", "--config", "test", "--manifest", manifest, "--out",
                            tmp_path / "run", "--quiet"], capsys)
    assert code == 2
    assert_one_line_error(err, manifest, problem)
    assert sorted(os.listdir(tmp_path)) == ["m.csv"]


def training_manifest_with(bad_image: str, folder, s) -> str:
    return write_manifest(folder / "train.csv", [
        {"patient_id": "p0", "timepoint": 0, "image": s.prior, "mask": s.mask, "split": "train"},
        {"patient_id": "p0", "timepoint": 1, "image": bad_image, "mask": s.mask, "split": "train"}])


def test_train_refuses_a_bad_scan_before_creating_the_run(scans, bad, tmp_path, capsys):
    manifest = training_manifest_with(bad["nan"].path, tmp_path, scans)
    code, _, err = run_cli(["train", "--stage", "1", "--config", "test", "--manifest", manifest, "--out",
                            tmp_path / "run", "--quiet"], capsys)
    assert code == 2
    assert_one_line_error(err, bad["nan"].path, "NaN or infinite")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- real processes, no traceback
def run_process(args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *[os.fsencode(a) for a in args]], capture_output=True, cwd=REPO,
                          env={**os.environ, "PYTHONUTF8": "0", **env}, timeout=120)


def test_run_stage_script_refuses_bad_scan_without_traceback(scans, bad, tmp_path):
    manifest = training_manifest_with(bad["truncated_gz"].path, tmp_path, scans)
    proc = run_process([os.path.join(REPO, "experiments", "run_stage.py"), "--stage", "1", "--config", "test",
                        "--manifest", manifest, "--out", tmp_path / "run"])
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err
    assert_one_line_error(err, bad["truncated_gz"].path, "cannot read")
    assert not (tmp_path / "run").exists()


def test_spirs_process_with_corrupt_input_and_strict_stdout(scans, bad, tmp_path):
    """``python -m spirs_tf.cli`` with stdout in a strict encoding (outside Python's UTF-8 mode) and
    a manifest in a folder whose name is not UTF-8: one line per problem, no traceback."""
    proc = run_process(["-m", "spirs_tf.cli", "predict", "--new", bad["garbage_gz"].path, "--prior", scans.prior,
                        "--prior-mask", scans.mask, "--out", tmp_path / "out"])
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err
    assert_one_line_error(err, bad["garbage_gz"].path, "cannot read")
    folder = non_utf8_dir(tmp_path)
    manifest = write_manifest(os.path.join(folder, "manifest 1.csv"), [
        {"patient_id": "p0", "timepoint": 0, "image": "missing scan.nii.gz", "split": "test"}])
    proc = run_process(["-m", "spirs_tf.cli", "manifest", "check", manifest], PYTHONIOENCODING="utf-8:strict")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr, proc.stderr.decode("utf-8", "replace")
    first = proc.stdout.splitlines()[0]
    assert first == os.fsencode(manifest) + b": row 2: image not found: " + os.fsencode(
        os.path.join(folder, "missing scan.nii.gz"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- spaces and non-UTF-8 bytes
def test_spaces_and_non_utf8_bytes_in_paths_read_write_and_check(scans, tmp_path):
    folder = non_utf8_dir(tmp_path)
    image, lesion, affine = scans.image, scans.lesion, scans.affine
    names = ["scan one.nii.gz", "scan one.nii", "scan one.nrrd", "scan one.mha",
             os.fsdecode(b"scan \xe9.nrrd")]  # the last file name itself is not UTF-8
    for name in names:
        write_volume(os.path.join(folder, name), image, affine)
        vol = read_volume(os.path.join(folder, name))
        np.testing.assert_array_equal(vol.data, image, err_msg=name)
        np.testing.assert_allclose(vol.affine, affine, atol=1e-4, err_msg=name)
    write_volume(os.path.join(folder, "lesion mask.seg.nrrd"), lesion, affine)
    np.testing.assert_array_equal(read_volume(os.path.join(folder, "lesion mask.seg.nrrd"), "mask").data, lesion)
    # a DICOM series in the non-UTF-8 folder
    series = os.path.join(folder, "dicom série")
    os.makedirs(series)
    counts = np.round(image * 1000).astype(np.int16)
    img = sitk.GetImageFromArray(counts.transpose(2, 1, 0))
    img.SetSpacing((SPACING,) * 3)
    ascii_series = tmp_path / "series"
    ascii_series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(SHAPE[2]):
        sl = img[:, :, k]
        for tag, value in [("0020|000e", "1.2.826.0.1.3680043.2.1125.9.2"), ("0008|0060", "MR"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k)),
                           ("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(ascii_series / f"{k}.dcm"))
        writer.Execute(sl)
    for f in os.listdir(ascii_series):
        os.rename(ascii_series / f, os.path.join(series, f))
    np.testing.assert_array_equal(read_volume(series).data, counts)
    assert sorted(os.listdir(folder)) == sorted(names + ["lesion mask.seg.nrrd", "dicom série"])
    # a manifest in that folder (the CSV is UTF-8 text, so it names UTF-8 files), checked deeply
    manifest = write_manifest(os.path.join(folder, "manifest.csv"), [
        {"patient_id": "p0", "timepoint": 0, "image": "scan one.nrrd", "mask": "lesion mask.seg.nrrd",
         "split": "train"},
        {"patient_id": "p0", "timepoint": 1, "image": "dicom série", "mask": "", "split": "test"}])
    problems = check_manifest(manifest)  # (the CLI printing such names: test_spirs_process_...)
    assert problems == [f"{manifest}: rows 2, 3: patient 'p0' is in 2 splits: 'train' (row 2), 'test' (row 3); "
                        "a patient must be in one split only"]
    with pytest.raises(SpirsInputError) as info:
        read_volume(os.path.join(folder, "absent.nrrd"))
    assert info.value.path == os.path.join(folder, "absent.nrrd") and info.value.problem == "file not found"


# ------------------------------------------------------------------------------------- spirs synth
@pytest.mark.parametrize("option, value, problem", [
    ("--grid", "8", "grid size must be at least 16 voxels"),
    ("--grid", "600", "grid size must be at most 512 voxels"),  # ran for minutes before
    ("--grid", "100000", "grid size must be at most 512 voxels"),  # ran out of memory before
    ("--spacing", "0", "spacing must be between 0.5 and 10 mm"),
    ("--spacing", "-1.5", "spacing must be between 0.5 and 10 mm"),
    ("--spacing", "50", "spacing must be between 0.5 and 10 mm"),
    ("--timepoints", "5-2", "time points must satisfy"),
    ("--timepoints", "0", "time points must satisfy"),
    ("--lesions", "200", "lesions per patient must satisfy"),
    ("--patients", "-3", "--patients must be positive"),
])
def test_synth_refuses_bad_settings_before_writing(option, value, problem, tmp_path, capsys):
    args = {"--patients": "1", "--grid": "32", "--spacing": "6", option: value}
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 20.0)  # a 600³ cohort used to run for minutes
    try:
        code, _, err = run_cli(["synth", "--out", tmp_path / "synth out", "--quiet",
                                *[x for kv in args.items() for x in kv]], capsys)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 2 and time.perf_counter() - start < 5
    assert err.startswith("spirs: error: ") and err.count("\n") == 1 and problem in err
    assert not (tmp_path / "synth out").exists()


# ------------------------------------------------------------------------------------------- fuzz
FIELDS = [  # (offset, struct format, name) of the NIfTI-1 header fields worth breaking
    (0, "<i", "sizeof_hdr"), (40, "<8h", "dim"), (70, "<h", "datatype"), (72, "<h", "bitpix"),
    (76, "<8f", "pixdim"), (108, "<f", "vox_offset"), (112, "<f", "scl_slope"), (116, "<f", "scl_inter"),
    (252, "<h", "qform_code"), (254, "<h", "sform_code"), (256, "<6f", "quatern"), (280, "<12f", "srow"),
    (344, "<4s", "magic")]
EXTREME_INT = (0, -1, 1, 2, 3, 4, 7, 8, 16, 255, 511, 512, 513, 1000, 32767, -32768)
EXTREME_FLOAT = (0.0, -1.0, 1e-30, 1e30, 3.4e38, -3.4e38, 50.0, float("nan"), float("inf"), -float("inf"))


def corrupt(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random corruption of an uncompressed NIfTI file → (bytes, description)."""
    b = bytearray(raw)
    kind = int(rng.integers(6))
    if kind == 0:
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(348))] = int(rng.integers(256))
        return bytes(b), "random header bytes"
    if kind == 1:
        off, fmt, name = FIELDS[int(rng.integers(len(FIELDS)))]
        size = struct.calcsize(fmt)
        if fmt.endswith("s"):
            b[off:off + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            return bytes(b), f"{name} random"
        values = list(struct.unpack(fmt, bytes(b[off:off + size])))
        i = int(rng.integers(len(values)))
        values[i] = int(rng.choice(EXTREME_INT)) if fmt[-1] in "hi" else float(rng.choice(EXTREME_FLOAT))
        b[off:off + size] = struct.pack(fmt, *values)
        return bytes(b), f"{name}[{i}] = {values[i]}"
    if kind == 2:
        n = int(rng.integers(len(b)))
        return bytes(b[:n]), f"truncated to {n} bytes"
    if kind == 3:
        for _ in range(int(rng.integers(1, 20))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        return bytes(b), "random bytes anywhere"
    if kind == 4:
        at = int(rng.integers(len(b)))
        b[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        return bytes(b), f"bytes inserted at {at}"
    dims = [int(rng.integers(1, 8))] + [int(rng.choice([1, 2, 6, 400, 512, 600])) for _ in range(7)]
    b[40:56] = struct.pack("<8h", *dims)
    return bytes(b), f"dim = {dims}"


def test_fuzzed_nifti_never_escapes_as_traceback_or_hangs(tmp_path, capsys):
    rng = np.random.default_rng(20240509)
    data = (rng.random((6, 7, 5)) * 100 + 1).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([1.5, 2.0, 2.5, 1.0]))
    img.set_qform(img.affine, code=1)
    valid = img.to_bytes()
    outcomes, slowest, start = {"loaded": 0, "refused": 0}, 0.0, time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(240):
            gz = case % 2 == 1
            blob, what = corrupt(valid, rng)
            if gz and case % 4 == 3:  # damage the compressed stream itself
                blob = bytearray(gzip.compress(valid, mtime=0))
                for _ in range(int(rng.integers(1, 6))):
                    blob[int(rng.integers(len(blob)))] = int(rng.integers(256))
                blob, what = bytes(blob), "gzip stream bytes"
            elif gz:
                blob = gzip.compress(blob, mtime=0)
            path = str(tmp_path / f"case{case:03d}.nii{'.gz' if gz else ''}")
            with open(path, "wb") as fh:
                fh.write(blob)
            manifest = write_manifest(tmp_path / "m.csv", [
                {"patient_id": "p", "timepoint": 0, "image": path, "split": "test"}])
            kind = "mask" if case % 3 == 0 else "image"
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        vol = read_volume(path, kind)
                        error = None
                    except SpirsInputError as exc:
                        vol, error = None, exc
                    code = cli.main(["manifest", "check", manifest])
            except _Hang:
                pytest.fail(f"case {case} ({what}) ran for more than 5 s")
            except Exception as exc:  # noqa: BLE001 - anything else is the bug this test looks for
                pytest.fail(f"case {case} ({what}): {type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - t0)
            out, err = capsys.readouterr()
            assert "Traceback" not in err
            if error is None:
                outcomes["loaded"] += 1
                assert vol.data.ndim == 3 and np.all(np.isfinite(vol.data)), what
                assert vol.data.dtype == (np.uint8 if kind == "mask" else np.float32)
                assert np.all(np.isfinite(vol.affine)) and np.all(vol.spacing > 0), what
                if kind == "image":
                    assert code == 0, (what, out)
            else:
                outcomes["refused"] += 1
                assert error.path == path and "\n" not in str(error), (what, str(error))
                if kind == "image":
                    assert code == 2 and f"row 2: {error}" in out, (what, out)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["loaded"] > 20 and outcomes["refused"] > 20, outcomes  # both paths exercised
    assert slowest < 2.0, f"slowest case took {slowest:.2f} s"
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("env, expected", [({}, "3"), ({"SPIRS_DEBUG": "1"}, "2"),
                                           ({"TF_CPP_MIN_LOG_LEVEL": "0"}, "0")])
def test_cli_hides_tensorflow_cpp_errors_unless_asked(env, expected):
    """The CLI's default C++ log level: 3 (XLA's harmless cache-loader lines, docs/troubleshooting.md),
    2 with SPIRS_DEBUG, and the user's own value when set."""
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "SPIRS_DEBUG")}
    out = subprocess.run([sys.executable, "-c", "import os, spirs_tf.cli; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"],
                         env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
