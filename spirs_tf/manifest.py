"""The data manifest: one CSV row per scan, grouped into patients, time points and splits.

Format (documented for users in ``data_manifests/README.md``)::

    patient_id,timepoint,image,mask,split
    p01,0,p01/t0_t1c.nii.gz,p01/t0_mask.nii.gz,train

* ``patient_id`` — any non-empty text.
* ``timepoint`` — an integer (visit number, days, …) or an ISO date ``YYYY-MM-DD``; one kind per
  patient; unique within a patient. Scans are ordered by it.
* ``image``, ``mask`` — paths relative to the manifest's folder (absolute paths are kept). ``mask``
  may be empty only outside the ``train`` and ``val`` splits (rows used for prediction only).
* ``split`` — any non-empty text (``train``, ``val`` and ``test`` by convention); each patient is in
  exactly one split.

Extra columns are ignored. Row numbers in messages count like a spreadsheet: the header is row 1, the
first scan row 2. Validation collects **every** problem before reporting; each message starts with the
manifest path and the row(s).
"""
from __future__ import annotations

import csv
import datetime as dt
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Union

from spirs_tf.errors import SpirsInputError
from spirs_tf.io import check_same_grid, read_volume

COLUMNS = ("patient_id", "timepoint", "image", "mask", "split")
#: Splits whose rows feed the losses and therefore need a lesion mask.
LABELLED_SPLITS = ("train", "val")
PAIR_MODES = ("consecutive", "all")

Timepoint = Union[int, dt.date]


@dataclass(frozen=True)
class Scan:
    """One manifest row. ``image``/``mask`` are absolute paths (``mask`` is ``None`` when empty)."""

    patient_id: str
    timepoint: Timepoint
    image: str
    mask: str | None
    split: str
    row: int


@dataclass(frozen=True)
class Pair:
    """An intra-patient pair: ``prior`` is registered to ``new`` (prior earlier unless reversed)."""

    patient_id: str
    prior: Scan
    new: Scan


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: ``scans`` in file order, ``path`` the CSV file."""

    path: str
    scans: tuple[Scan, ...]

    def splits(self) -> dict[str, list[Scan]]:
        """Split name → its scans, in order of first appearance in the file."""
        out: dict[str, list[Scan]] = {}
        for scan in self.scans:
            out.setdefault(scan.split, []).append(scan)
        return out

    def patients(self, split: str | None = None) -> dict[str, list[Scan]]:
        """Patient id → scans sorted by time point (optionally of one split only)."""
        out: dict[str, list[Scan]] = {}
        for scan in self.scans:
            if split is None or scan.split == split:
                out.setdefault(scan.patient_id, []).append(scan)
        return {p: sorted(s, key=lambda scan: scan.timepoint) for p, s in out.items()}


def parse_timepoint(text: str) -> Timepoint:
    """``"3"`` → 3, ``"2021-04-30"`` → ``date(2021, 4, 30)``.

    Raises:
        ValueError: anything else.
    """
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"timepoint {text!r} is neither an integer nor an ISO date (YYYY-MM-DD)") from None


def _resolve(folder: str, value: str) -> str:
    return os.path.normpath(os.path.join(folder, os.path.expanduser(value)))


def _parse(path: str) -> tuple[list[Scan], list[str], list[tuple[int, str | None, str | None]]]:
    """Read and check the CSV without opening any scan.

    Returns (scans of the rows without problems, problems, (row, image, mask) for every row with the
    paths that exist — the deep check opens those even when the row has other problems).
    """
    problems: list[str] = []
    if not os.path.isfile(path):
        return [], [f"{path}: manifest not found" if not os.path.exists(path) else f"{path}: not a file"], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [], [f"{path}: cannot read manifest: {exc}"], []
    if not rows:
        return [], [f"{path}: manifest is empty (expected the header {','.join(COLUMNS)})"], []
    header = [h.strip() for h in rows[0]]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        return [], [f"{path}: row 1: missing column(s) {', '.join(missing)} (header must contain "
                    f"{','.join(COLUMNS)})"], []
    col = {c: header.index(c) for c in COLUMNS}
    folder = os.path.dirname(os.path.abspath(path))
    scans: list[Scan] = []
    files: list[tuple[int, str | None, str | None]] = []
    keys: list[tuple[str, Timepoint, str, int]] = []  # (patient, timepoint, split, row) for cross-row checks
    for row_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        where = f"{path}: row {row_no}"
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        cell = {c: row[col[c]].strip() for c in COLUMNS}
        bad = False
        for c in ("patient_id", "timepoint", "image", "split"):
            if not cell[c]:
                problems.append(f"{where}: empty {c}")
                bad = True
        timepoint = None
        if cell["timepoint"]:
            try:
                timepoint = parse_timepoint(cell["timepoint"])
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                bad = True
        image = _resolve(folder, cell["image"]) if cell["image"] else None
        mask = _resolve(folder, cell["mask"]) if cell["mask"] else None
        if image is not None and not os.path.exists(image):
            problems.append(f"{where}: image not found: {image}")
            bad = True
        if mask is not None and not os.path.exists(mask):
            problems.append(f"{where}: mask not found: {mask}")
            bad = True
        if mask is None and cell["split"] in LABELLED_SPLITS:
            problems.append(f"{where}: empty mask in split {cell['split']!r} (only prediction-only rows, "
                            f"outside {' and '.join(LABELLED_SPLITS)}, may omit the mask)")
            bad = True
        files.append((row_no, image if image and os.path.exists(image) else None,
                      mask if mask and os.path.exists(mask) else None))
        if cell["patient_id"] and cell["split"] and timepoint is not None:
            keys.append((cell["patient_id"], timepoint, cell["split"], row_no))
        if not bad:
            scans.append(Scan(cell["patient_id"], timepoint, image, mask, cell["split"], row_no))
    problems += _cross_row_problems(path, keys)
    return scans, problems, files


def _cross_row_problems(path: str, keys: list[tuple[str, Timepoint, str, int]]) -> list[str]:
    """Patients in several splits, mixed timepoint kinds, repeated timepoints."""
    problems = []
    by_patient: dict[str, list[tuple[Timepoint, str, int]]] = defaultdict(list)
    for patient, timepoint, split, row in keys:
        by_patient[patient].append((timepoint, split, row))
    for patient, rows in by_patient.items():
        all_rows = ", ".join(str(r) for _, _, r in rows)
        splits: dict[str, list[int]] = {}
        for _, split, row in rows:
            splits.setdefault(split, []).append(row)
        if len(splits) > 1:
            desc = ", ".join(f"{s!r} (row {', '.join(map(str, r))})" for s, r in splits.items())
            problems.append(f"{path}: rows {all_rows}: patient {patient!r} is in {len(splits)} splits: "
                            f"{desc}; a patient must be in one split only")
        if len({type(tp) for tp, _, _ in rows}) > 1:
            problems.append(f"{path}: rows {all_rows}: patient {patient!r} mixes integer and date timepoints")
            continue
        seen: dict[Timepoint, list[int]] = {}
        for tp, _, row in rows:
            seen.setdefault(tp, []).append(row)
        for tp, rws in seen.items():
            if len(rws) > 1:
                problems.append(f"{path}: rows {', '.join(map(str, rws))}: patient {patient!r} has "
                                f"timepoint {tp} more than once")
    return problems


def _deep_problems(path: str, files: list[tuple[int, str | None, str | None]]) -> list[tuple[int, str]]:
    """Open every existing image and mask: readable, finite, image non-empty, mask binary, same grids.

    Returns (row, message) pairs.
    """
    problems = []
    for row, image_path, mask_path in files:
        volumes = {}
        for kind, file in (("image", image_path), ("mask", mask_path)):
            if file is None:
                continue
            try:
                volumes[kind] = read_volume(file, kind=kind)
            except SpirsInputError as exc:
                problems.append((row, f"{path}: row {row}: {exc}"))
        if len(volumes) == 2:
            try:
                check_same_grid(volumes["mask"], volumes["image"])
            except SpirsInputError as exc:
                problems.append((row, f"{path}: row {row}: {exc}"))
    return problems


def validate_manifest(path: str | os.PathLike, deep: bool = True) -> tuple[Manifest, list[str]]:
    """Check a manifest and keep what is usable: (manifest of the rows without row-level problems,
    every problem found).

    Args:
        path: the CSV file.
        deep: also read every scan (slow on big data sets): unreadable files, NaN/inf voxels, all-zero
            images, non-binary masks, image and mask on different grids, and every other
            :func:`spirs_tf.io.read_volume` check.

    Returns:
        The :class:`Manifest` holds the rows without row-level problems (it may be empty); cross-row
        problems (duplicate time points, a patient in two splits) do not remove rows from it.
    """
    path = os.fspath(path)
    scans, problems, files = _parse(path)
    if deep:
        deep_problems = _deep_problems(path, files)
        problems += [message for _, message in deep_problems]
        bad_rows = {row for row, _ in deep_problems}
        scans = [scan for scan in scans if scan.row not in bad_rows]
    return Manifest(os.path.abspath(path), tuple(scans)), problems


def check_manifest(path: str | os.PathLike, deep: bool = True) -> list[str]:
    """Every problem of the manifest, one message each (empty list when clean); see
    :func:`validate_manifest` for what ``deep`` adds."""
    return validate_manifest(path, deep)[1]


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Parse and check the manifest (without reading scans; see :func:`check_manifest` for that).

    Raises:
        SpirsInputError: listing every problem, one per line (a single problem: one line,
            ``<manifest>: row N: <problem>``).
    """
    path = os.fspath(path)
    scans, problems, _ = _parse(path)
    if len(problems) == 1 and problems[0].startswith(f"{path}: "):  # one line: "<path>: row N: <problem>"
        raise SpirsInputError(problems[0][len(path) + 2:], path)
    if problems:
        raise SpirsInputError(f"{len(problems)} problem(s) in the manifest:\n" + "\n".join(problems), path)
    if not scans:
        raise SpirsInputError("manifest lists no scans", path)
    return Manifest(os.path.abspath(path), tuple(scans))


def make_pairs(manifest: Manifest, split: str | None = None, mode: str = "consecutive",
               both_directions: bool = False) -> list[Pair]:
    """Intra-patient (prior, new) pairs, per patient in time order.

    Args:
        manifest: a loaded manifest.
        split: only this split's patients (``None``: all).
        mode: ``"consecutive"`` — (t_i, t_{i+1}); ``"all"`` — every (t_i, t_j) with i < j.
        both_directions: also add each pair reversed (new registered to prior).

    Returns:
        pairs ordered by patient (first appearance), then prior time, then new time; a reversed pair
        follows its forward pair. A patient with one scan gives none.

    Raises:
        SpirsInputError: ``split`` is not in the manifest.
        ValueError: unknown ``mode``.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {PAIR_MODES}, got {mode!r}")
    if split is not None and split not in manifest.splits():
        raise SpirsInputError(f"no split {split!r} (the manifest has {', '.join(manifest.splits())})",
                              manifest.path)
    pairs = []
    for patient, scans in manifest.patients(split).items():
        n = len(scans)
        index_pairs = [(i, i + 1) for i in range(n - 1)] if mode == "consecutive" else \
            [(i, j) for i in range(n) for j in range(i + 1, n)]
        for i, j in index_pairs:
            pairs.append(Pair(patient, scans[i], scans[j]))
            if both_directions:
                pairs.append(Pair(patient, scans[j], scans[i]))
    return pairs
