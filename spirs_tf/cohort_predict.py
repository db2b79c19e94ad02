"""Cohort mode of ``spirs predict --manifest``: every (prior, new) pair of a manifest split, resumable,
with a prefetch thread and a summary CSV.

Built on :mod:`spirs_tf.inference`, which does the per-case work (read, run the network, refine,
write one case folder); this module adds the manifest, batching, resuming and the summary.
"""
from __future__ import annotations

import concurrent.futures
import csv
import io as _io
import json
import os
import shutil
import sys
import time
from typing import Callable

from spirs_tf.atomic import atomic_write_text
from spirs_tf.case_inputs import PreparedCase, prepare_case, read_case_inputs
from spirs_tf.errors import SpirsInputError
from spirs_tf.inference import TMP_PREFIX, refine_case, run_network, segment_case, write_case
from spirs_tf.manifest import Manifest, load_manifest, make_pairs
from spirs_tf.predictor import Predictor
from spirs_tf.refinement import resolve

SUMMARY_COLUMNS = ("case_id", "patient_id", "prior_timepoint", "new_timepoint", "status", "lncc",
                   "lncc_identity", "folding_percent", "p2_lesions", "new_lesions", "seconds", "message",
                   "warnings", "refine", "lncc_network")


def case_name(pair) -> str:
    """``<patient>_<priorTP>_to_<newTP>`` with characters other than letters, digits, ``-._`` → ``_``."""
    text = f"{pair.patient_id}_{pair.prior.timepoint}_to_{pair.new.timepoint}"
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in text)


def clean_stale_temp(out_dir: str) -> list[str]:
    """Remove ``.tmp-spirs-*`` folders left in ``out_dir`` by a crashed run; return their names."""
    removed = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.startswith(TMP_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _summary_row(pair, cid, status, report=None, seconds=None, message="") -> dict:
    reg = (report or {}).get("registration", {})
    les = (report or {}).get("lesions", {})
    return {"case_id": cid, "patient_id": pair.patient_id, "prior_timepoint": str(pair.prior.timepoint),
            "new_timepoint": str(pair.new.timepoint), "status": status, "lncc": reg.get("lncc"),
            "lncc_identity": reg.get("lncc_identity"), "folding_percent": reg.get("folding_percent"),
            "p2_lesions": les.get("p2_lesions"), "new_lesions": les.get("changes", {}).get("new"),
            "seconds": seconds, "message": message, "warnings": len((report or {}).get("warnings", [])),
            "refine": (reg.get("refinement") or {}).get("mode"),
            "lncc_network": (reg.get("refinement") or {}).get("lncc_before", reg.get("lncc"))}


class _Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled and total > 0, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9) * 60
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {rate:5.1f} cases/min "
                  f"{label[:40]:<40}", end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)


def predict_cohort(predictor: Predictor, manifest, split: str | None, out_dir: str, *,
                   pairing: str = "consecutive", batch_size: int = 1, verbose: bool = True,
                   transforms: str = "itk", refine: Callable | str | None = None) -> list[dict]:
    """Predict every (prior, new) pair of a manifest split into ``out_dir/<case_name>/``.

    Resumable: a pair whose ``report.json`` exists is skipped; ``.tmp-spirs-*`` folders left by a
    crash are removed first. A prefetch thread reads and preprocesses the next batch while the
    current one runs through the network and is written. A pair with bad input (e.g. a prior
    without a mask) is recorded as ``error`` and the cohort goes on.

    Args:
        predictor: from :func:`load_predictor`.
        manifest: a manifest path or :class:`spirs_tf.manifest.Manifest`.
        split: the split to predict (``None``: all).
        out_dir: cohort folder; also receives ``cohort_summary.csv`` (one row per pair).
        pairing: ``consecutive`` or ``all`` (:func:`spirs_tf.manifest.make_pairs`).
        batch_size: cases per forward pass.
        verbose: progress bar, warnings and the final cases-per-minute line.
        transforms: which transform files to write per case (:data:`spirs_tf.inference.TRANSFORMS`).
        refine: test-time refinement per case, as in :func:`predict_case` (no per-iteration
            progress here: the cohort's progress bar counts cases).

    Returns:
        the summary rows (:data:`SUMMARY_COLUMNS`).

    Raises:
        SpirsInputError: bad manifest, unknown split, no pairs.
    """
    refine_fn, refine_mode = resolve(refine, verbose=False)
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    pairs = make_pairs(m, split, pairing)
    if not pairs:
        raise SpirsInputError(f"no (prior, new) pairs in split {split!r}", m.path)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    clean_stale_temp(out_dir)
    rows: dict[str, dict] = {}
    todo = []
    for pair in pairs:
        cid = case_name(pair)
        report_path = os.path.join(out_dir, cid, "report.json")
        if os.path.isfile(report_path):
            with open(report_path, encoding="utf-8") as fh:
                rows[cid] = _summary_row(pair, cid, "skipped", json.load(fh), message="already done")
        else:
            todo.append((pair, cid))
    batches = [todo[i:i + max(1, batch_size)] for i in range(0, len(todo), max(1, batch_size))]

    def load(batch):
        loaded = []
        for pair, cid in batch:
            try:
                if pair.prior.mask is None:
                    raise SpirsInputError("the prior scan has no lesion mask in the manifest", pair.prior.image)
                inputs = read_case_inputs(pair.new.image, pair.prior.image, pair.prior.mask)
                loaded.append((pair, cid, prepare_case(inputs, predictor)))
            except SpirsInputError as exc:
                loaded.append((pair, cid, exc))
        return loaded

    if len(todo) > 1 and hasattr(predictor.run_fn, "use_graph"):
        predictor.run_fn.use_graph()  # trace once and reuse, instead of one eager case first
    progress = _Progress(len(todo), verbose)
    t_start, n_done = time.perf_counter(), 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load, batches[0]) if batches else None
        for k in range(len(batches)):
            loaded = future.result()
            if k + 1 < len(batches):
                future = pool.submit(load, batches[k + 1])
            ready = [item for item in loaded if isinstance(item[2], PreparedCase)]
            outputs, network_s = run_network(predictor, [c for _, _, c in ready]) if ready else ([], 0.0)
            results = dict(zip([cid for _, cid, _ in ready], outputs))
            for pair, cid, case in loaded:
                t0 = time.perf_counter()
                if isinstance(case, SpirsInputError):
                    rows[cid] = _summary_row(pair, cid, "error", message=str(case))
                else:
                    try:
                        outputs, refinement = refine_case(predictor, case, results[cid], refine_fn,
                                                          refine_mode)
                        outputs = segment_case(predictor, case, outputs)
                        res = write_case(predictor, case, outputs, os.path.join(out_dir, cid),
                                         overwrite=True, case_id=cid, network_s=network_s / len(ready),
                                         transforms=transforms, refinement=refinement, verbose=verbose)
                        n_done += 1
                        rows[cid] = _summary_row(pair, cid, "done", res.report, time.perf_counter() - t0
                                                 + case.preprocess_s + case.inputs.read_s + network_s / len(ready))
                    except SpirsInputError as exc:
                        rows[cid] = _summary_row(pair, cid, "error", message=str(exc))
                progress.step(cid)
    ordered = [rows[case_name(p)] for p in pairs]
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in ordered])
    atomic_write_text(os.path.join(out_dir, "cohort_summary.csv"), buf.getvalue())
    minutes = (time.perf_counter() - t_start) / 60
    if verbose:
        counts = {s: sum(r["status"] == s for r in ordered) for s in ("done", "skipped", "error")}
        rate = f"{n_done / minutes:.1f} cases/min" if n_done and minutes > 0 else "no case predicted"
        print(f"spirs: {counts['done']} predicted, {counts['skipped']} skipped (already done), "
              f"{counts['error']} failed; {rate}; summary: {os.path.join(out_dir, 'cohort_summary.csv')}",
              file=sys.stderr)
    return ordered
