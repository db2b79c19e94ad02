"""Issue 15's "done when" comparison, end to end, on SYNTHETIC data: ``spirs predict --manifest`` (one process
per refinement mode) against one ANTsPy loop (Affine and SyN with ANTsPy's defaults), on native grids.

Data (cached in ``--work``): ``spirs synth --pose raw --grid 128 --spacing 1.5 --timepoints 2
--lesions 3-8 --lesion-sizes 0,1,1,1`` (fresh seed, one patient per pair; the head moves between the time
points; no micro lesions, whose Dice is noise; a pair whose new mask is empty gets Dice NaN, left out); each scan is then resampled onto its own
oblique native grid with :mod:`experiments.native_case` (default 177×247×140 at 1.0×0.95×1.1 mm, the size of
a clinical scan; ``--native-shape`` picks another shape with the same field of view), rotations drawn per
scan from ``--seed``. prior = tp0 (image + mask), new = tp1 (image + mask); ``manifest.csv`` (split
``pairs``) lists them, and split ``self`` holds ``--self`` patients whose prior IS the new scan.

Runs, each one process, timed as a whole (seconds per pair = wall time / pairs):

* ``SPIRS``: ``spirs predict --manifest M --split pairs --refine off`` (the paper's network);
* ``SPIRS + refinement``: the same with ``--refine full`` (the default of ``spirs predict``);
* ``ANTs``: one Python with antspyx (``--ants-python``, ``$SPIRS_ANTS_PYTHON``, this interpreter,
  ``../venv-ants/bin/python``) loops over the pairs: ``ants.registration(fixed=new, moving=prior,
  type_of_transform=T)`` for T = ``Affine`` and ``SyN`` (all else ANTsPy's defaults), then
  ``ants.apply_transforms`` of the prior image (linear) and mask (linear, then ≥ 0.5: the rule of
  spirs' ``prior_mask_warped.nii.gz``) onto the new scan's native grid; each timed per pair
  (registration + both warps) and written to ``OUT/ants/<case>/``.
* ``self``: ``spirs predict`` (default refinement) on the ``self`` split.

Metrics on the new scan's native grid: Dice of the warped prior mask with the new mask, and the masked
LNCC (exact float64, :func:`spirs_tf.metrics.lncc`, window 9, mask :func:`spirs_tf.metrics.lncc_mask`: non-zero
voxels outside the lesions of either scan) of the new scan vs the warped prior. Affine rows: SPIRS' affine is
``registration.affine_world_ras`` of each ``report.json`` (``--refine off``: the network's; ``--refine full``:
the refined affine the dense field starts from), applied here to the prior (trilinear, mask ≥ 0.5); ANTs'
affine is its ``Affine`` run. % folding of SPIRS from ``report.json``. Table: median [IQR] and mean, seconds
per pair, Wilcoxon signed-rank (:func:`spirs_tf.stats.wilcoxon_paired`) of SPIRS + refinement vs ANTs SyN
Dice, the time ratio SPIRS + refinement / ANTs SyN, and the self check (Dice ≥ 0.95, LNCC drop ≤ 0.01).
Writes ``OUT/registration_vs_ants.json`` and ``OUT/results.md``. The SPIRS and ANTs output folders in OUT
are removed and rebuilt on every run (``spirs predict --manifest`` resumes, which would spoil the timing).

Usage (the lead's full run, on an otherwise idle machine)::

    python experiments/registration_vs_ants.py --pairs 10 --self 3 --work /tmp/vsants_work --out results/vsants
    python experiments/registration_vs_ants.py --pairs 2 --self 1 --native-shape 89 124 70 ...   # quick check
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "experiments")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DATA_LABEL = "SYNTHETIC (spirs synth, raw pose, resampled to oblique native grids)"
WINDOW = 9
METHODS = ("identity", "SPIRS affine", "SPIRS", "SPIRS + refinement affine", "SPIRS + refinement",
           "ANTs Affine", "ANTs SyN")


# ------------------------------------------------------------------------------------ ANTs worker
def ants_worker(job_path: str) -> int:
    """Run in the ANTs Python (antspyx, numpy; no spirs_tf, no TensorFlow): the loop over ``job.json``'s pairs."""
    import ants

    with open(job_path, encoding="utf-8") as fh:
        job = json.load(fh)
    timings = {}
    for k, item in enumerate(job["pairs"]):
        new, prior = ants.image_read(item["new"]), ants.image_read(item["prior"])
        prior_mask = ants.image_read(item["prior_mask"])
        os.makedirs(item["out"], exist_ok=True)
        timings[item["case"]] = {}
        for kind in ("Affine", "SyN"):
            t0 = time.perf_counter()
            reg = ants.registration(fixed=new, moving=prior, type_of_transform=kind)
            t_reg = time.perf_counter() - t0
            image = ants.apply_transforms(fixed=new, moving=prior, transformlist=reg["fwdtransforms"],
                                          interpolator="linear")
            soft = ants.apply_transforms(fixed=new, moving=prior_mask, transformlist=reg["fwdtransforms"],
                                         interpolator="linear")
            mask = soft.new_image_like((soft.numpy() >= 0.5).astype(np.float32))
            seconds = time.perf_counter() - t0
            ants.image_write(image, os.path.join(item["out"], f"{kind}_prior_warped.nii.gz"))
            ants.image_write(mask.astype("uint8"), os.path.join(item["out"], f"{kind}_prior_mask_warped.nii.gz"))
            timings[item["case"]][kind] = {"seconds": seconds, "registration_seconds": t_reg}
            print(f"ants [{k + 1}/{len(job['pairs'])}] {item['case']} {kind}: {seconds:.1f} s "
                  f"(registration {t_reg:.1f} s)", flush=True)
    with open(job["timings"], "w", encoding="utf-8") as fh:
        json.dump(timings, fh, indent=2)
    return 0


def _env_with_repo() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


# ------------------------------------------------------------------------------------ data
def make_data(args, log) -> tuple[str, list[str]]:
    """Synthesise and resample the pairs into ``--work`` (kept and re-used); returns (manifest, pair cases)."""
    from native_case import SHAPE, SPACING, native_affine, resample
    from spirs_tf.io import read_volume, write_volume

    shape = tuple(args.native_shape)
    spacing = tuple(s * n / m for s, n, m in zip(SPACING, SHAPE, shape))  # same field of view as SHAPE
    tag = (f"seed{args.seed}_n{args.pairs}_self{args.self}_{'x'.join(map(str, shape))}_les{args.lesions}_"
           f"{args.lesion_sizes.replace(',', '-')}")
    work = os.path.join(args.work, tag)
    manifest = os.path.join(work, "manifest.csv")
    n = args.pairs + args.self
    cases = [f"p{k:03d}_0_to_1" for k in range(args.pairs)]
    if os.path.isfile(manifest):
        log(f"data: re-using {work}")
        return manifest, cases
    synth = os.path.join(work, "synth")
    if not os.path.isdir(synth):
        cmd = [sys.executable, "-m", "spirs_tf.cli", "synth", "--patients", str(n), "--timepoints", "2",
               "--pose", "raw", "--grid", "128", "--spacing", "1.5", "--seed", str(args.seed), "--lesions",
               args.lesions, "--lesion-sizes", args.lesion_sizes, "--no-qc", "--quiet", "--out", synth + ".tmp"]
        log("data: " + " ".join(cmd[2:]))
        shutil.rmtree(synth + ".tmp", ignore_errors=True)
        subprocess.run(cmd, check=True, env=_env_with_repo())
        os.replace(synth + ".tmp", synth)
    rng = np.random.default_rng(args.seed)
    rows = []
    for k in range(n):
        src = os.path.join(synth, f"patient_{k:03d}")
        is_self = k >= args.pairs
        pid = f"self{k - args.pairs:03d}" if is_self else f"p{k:03d}"
        out = os.path.join(work, pid)
        os.makedirs(out, exist_ok=True)
        for tp, role in (("tp1", "new"), ("tp0", "prior")):
            angles = rng.uniform(-12, 12, 3)
            if is_self and role == "prior":
                continue
            image = read_volume(os.path.join(src, tp, "image.nii.gz"), "image")
            mask = read_volume(os.path.join(src, tp, "mask.nii.gz"), "mask")
            aff = native_affine(image.affine, image.shape, angles, shape, spacing)
            write_volume(os.path.join(out, f"{role}.nii.gz"), np.maximum(resample(image, aff, 1, shape), 0), aff)
            write_volume(os.path.join(out, f"{role}_mask.nii.gz"),
                         (resample(mask, aff, 1, shape) >= 0.5).astype(np.uint8), aff)
        prior = "new" if is_self else "prior"  # self: the prior IS the new scan (same files)
        split = "self" if is_self else "pairs"
        rows += [(pid, 0, f"{pid}/{prior}.nii.gz", f"{pid}/{prior}_mask.nii.gz", split),
                 (pid, 1, f"{pid}/new.nii.gz", f"{pid}/new_mask.nii.gz", split)]
        log(f"data: {pid} on {shape} ({np.prod(shape) / 1e6:.1f} megavoxels)")
    with open(manifest + ".tmp", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(("patient_id", "timepoint", "image", "mask", "split"))
        w.writerows(rows)
    os.replace(manifest + ".tmp", manifest)
    return manifest, cases


# ------------------------------------------------------------------------------------ runs
def _timed(cmd: list[str], log, name: str) -> float:
    log(f"{name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    for line in proc.stdout.replace("\r", "\n").splitlines():
        if line.startswith(("ants [", "spirs: warning", "spirs: ")):
            log("  " + line)
    log(f"{name}: {wall:.1f} s wall")
    return wall


def run_spirs(manifest: str, split: str, out: str, refine: str, args, log) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "spirs_tf.cli", "predict", "--manifest", manifest, "--split", split,
           "--out", out, "--refine", refine]
    if args.model:
        cmd += ["--model", args.model]
    return _timed(cmd, log, f"spirs predict --refine {refine} ({split})")


def run_ants(manifest: str, cases: list[str], out: str, args, log) -> tuple[float, dict] | None:
    from compare_registration import find_ants_python

    python = find_ants_python(args.ants_python)
    if python is None:
        log("ANTs skipped: no Python with antspyx found (--ants-python or SPIRS_ANTS_PYTHON)")
        return None
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    work = os.path.dirname(manifest)
    job = {"timings": os.path.join(out, "timings.json"),
           "pairs": [{"case": c, "new": os.path.join(work, c.split("_")[0], "new.nii.gz"),
                      "prior": os.path.join(work, c.split("_")[0], "prior.nii.gz"),
                      "prior_mask": os.path.join(work, c.split("_")[0], "prior_mask.nii.gz"),
                      "out": os.path.join(out, c)} for c in cases]}
    job_path = os.path.join(out, "job.json")
    with open(job_path, "w", encoding="utf-8") as fh:
        json.dump(job, fh, indent=2)
    wall = _timed([python, os.path.abspath(__file__), "--ants-worker", job_path], log, f"ANTs loop ({python})")
    with open(job["timings"], encoding="utf-8") as fh:
        return wall, json.load(fh)


# ------------------------------------------------------------------------------------ metrics
def _affine_warp(prior, prior_mask, world_ras: np.ndarray, new):
    """Prior image/mask through the world map ``new RAS → prior RAS`` onto the new grid (trilinear; mask ≥ 0.5)."""
    from scipy import ndimage

    m = np.linalg.inv(prior.affine) @ np.asarray(world_ras, float) @ new.affine
    warp = [ndimage.affine_transform(v.data.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=new.shape,
                                     order=1, mode="constant", cval=0.0) for v in (prior, prior_mask)]
    return warp[0], warp[1] >= 0.5


def scores(new, new_mask, warped, warped_mask) -> dict:
    from spirs_tf import metrics

    mask = metrics.lncc_mask(new.data, warped, new_mask.data, warped_mask)
    # an empty new mask has no overlap to measure (dice() would give 1 for two empty masks): NaN, left out
    return {"dice": metrics.dice(new_mask.data, warped_mask) if new_mask.data.any() else float("nan"),
            "lncc_masked": metrics.lncc(new.data, warped, WINDOW, mask=mask)}


def evaluate(work: str, cases: list[str], out: str, have_ants: bool, log) -> dict:
    """Per case and method: Dice, masked LNCC (and folding, seconds of SPIRS from report.json)."""
    from spirs_tf.io import read_volume

    rows = {m: {} for m in METHODS}
    for c in cases:
        pid = c.split("_")[0]
        vol = {n: read_volume(os.path.join(work, pid, f"{n}.nii.gz"), "mask" if "mask" in n else "image")
               for n in ("new", "new_mask", "prior", "prior_mask")}
        new, new_mask = vol["new"], vol["new_mask"]
        rows["identity"][c] = scores(new, new_mask, *_affine_warp(vol["prior"], vol["prior_mask"], np.eye(4), new))
        for name, folder in (("SPIRS", "spirs_off"), ("SPIRS + refinement", "spirs_full")):
            case_dir = os.path.join(out, folder, c)
            with open(os.path.join(case_dir, "report.json"), encoding="utf-8") as fh:
                report = json.load(fh)
            reg = report["registration"]
            rows[f"{name} affine"][c] = scores(new, new_mask, *_affine_warp(
                vol["prior"], vol["prior_mask"], reg["affine_world_ras"], new))
            warped = read_volume(os.path.join(case_dir, "prior_warped.nii.gz"), "image").data
            wmask = read_volume(os.path.join(case_dir, "prior_mask_warped.nii.gz"), "mask").data
            rows[name][c] = scores(new, new_mask, warped, wmask) | {
                "folding_percent": reg["folding_percent"], "report_seconds": sum(report["timings_s"].values()),
                "warnings": report["warnings"]}
        if have_ants:
            for kind in ("Affine", "SyN"):
                d = os.path.join(out, "ants", c)
                warped = read_volume(os.path.join(d, f"{kind}_prior_warped.nii.gz"), "image").data
                wmask = read_volume(os.path.join(d, f"{kind}_prior_mask_warped.nii.gz"), "mask").data
                rows[f"ANTs {kind}"][c] = scores(new, new_mask, warped, wmask)
        log(f"metrics {c}: " + ", ".join(f"{m} Dice {r[c]['dice']:.3f}" for m, r in rows.items() if c in r))
    return {m: r for m, r in rows.items() if r}


def self_check(work: str, out: str, n: int, log) -> dict:
    """Dice of each self case's written warped mask with its own mask, and 1 − LNCC(new, warped prior)."""
    from spirs_tf.io import read_volume

    res = {}
    for k in range(n):
        pid = f"self{k:03d}"
        case_dir = os.path.join(out, "spirs_self", f"{pid}_0_to_1")
        new = read_volume(os.path.join(work, pid, "new.nii.gz"), "image")
        new_mask = read_volume(os.path.join(work, pid, "new_mask.nii.gz"), "mask")
        warped = read_volume(os.path.join(case_dir, "prior_warped.nii.gz"), "image").data
        wmask = read_volume(os.path.join(case_dir, "prior_mask_warped.nii.gz"), "mask").data
        s = scores(new, new_mask, warped, wmask)
        s["lncc_drop"] = 1.0 - s["lncc_masked"]
        s["pass"] = bool(s["dice"] >= 0.95 and s["lncc_drop"] <= 0.01)
        res[pid] = s
        log(f"self {pid}: Dice {s['dice']:.3f}, LNCC drop {s['lncc_drop']:.4f} -> {'PASS' if s['pass'] else 'FAIL'}")
    return res


# ------------------------------------------------------------------------------------ summary
def _stats(values) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if not v.size:
        return {"median": np.nan, "q1": np.nan, "q3": np.nan, "mean": np.nan}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "mean": float(v.mean())}


def _cell(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}–{s['q3']:.{digits}f}], mean {s['mean']:.{digits}f}"


def summarise(rows: dict, seconds: dict, selfres: dict, info: dict) -> tuple[dict, str]:
    from spirs_tf.stats import wilcoxon_paired

    table = {}
    for m, r in rows.items():
        table[m] = {k: _stats([x[k] for x in r.values()]) for k in ("dice", "lncc_masked")}
        if "folding_percent" in next(iter(r.values())):
            table[m]["folding_percent_max"] = max(x["folding_percent"] for x in r.values())
        table[m]["seconds_per_pair"] = seconds.get(m)
    result = {"data": DATA_LABEL, **info, "table": table, "per_pair": rows, "self": selfres}
    lines = [f"### Registration vs ANTs (issue 15) — data: **{DATA_LABEL}**", "",
             f"{info['pairs']} pairs, native grid {info['native_shape']} at "
             f"{'×'.join(f'{s:.2f}' for s in info['native_spacing'])} mm; metrics on the new scan's native grid; "
             "LNCC = masked LNCC (window 9, exact). Median [IQR], mean. Seconds per pair = wall time of the "
             "whole process / pairs (SPIRS: model load, XLA compile, reading, writing all outputs included; ANTs: "
             "registration + both warps per pair, timed in the loop). Timings on a "
             f"{info['machine']}.", "",
             "| method | Dice (warped prior mask) | masked LNCC | max % folding | s / pair |", "|---|---|---|---|---|"]
    for m, t in table.items():
        fold = f"{t['folding_percent_max']:.3f}" if "folding_percent_max" in t else ""
        sec = f"{t['seconds_per_pair']:.1f}" if t["seconds_per_pair"] is not None else ""
        lines.append(f"| {m} | {_cell(t['dice'])} | {_cell(t['lncc_masked'])} | {fold} | {sec} |")
    lines.append("")
    if "ANTs SyN" in rows:
        keys = sorted(rows["ANTs SyN"])
        w = wilcoxon_paired([rows["SPIRS + refinement"][k]["dice"] for k in keys],
                            [rows["ANTs SyN"][k]["dice"] for k in keys])
        ratio = seconds["SPIRS + refinement"] / seconds["ANTs SyN"]
        gap = table["ANTs Affine"]["lncc_masked"]["mean"] - table["SPIRS affine"]["lncc_masked"]["mean"]
        result |= {"wilcoxon_dice_spirs_refined_vs_ants_syn": {"statistic": w.statistic, "pvalue": w.pvalue},
                   "time_ratio_spirs_refined_over_ants_syn": ratio, "affine_lncc_gap_ants_minus_network": gap}
        lines += [f"- Dice, SPIRS + refinement vs ANTs SyN: mean {table['SPIRS + refinement']['dice']['mean']:.3f} vs "
                  f"{table['ANTs SyN']['dice']['mean']:.3f}; Wilcoxon signed-rank over {len(keys)} pairs: "
                  f"statistic {w.statistic:.1f}, p = {w.pvalue:.3g} (target: mean ≥ ANTs SyN).",
                  f"- Time ratio SPIRS + refinement / ANTs SyN (s per pair): {ratio:.2f} (target ≤ 0.5).",
                  f"- Affine masked LNCC, ANTs Affine − SPIRS network affine (means): {gap:.3f} (target ≤ 0.05).",
                  f"- ANTs whole process (Affine + SyN loop, import and reads included): "
                  f"{info['ants_wall_s'] / info['pairs']:.1f} s per pair."]
    for m in ("SPIRS", "SPIRS + refinement"):
        sec = [x["report_seconds"] for x in rows[m].values()]
        table[m]["report_seconds_per_pair_mean"] = float(np.mean(sec))
        lines.append(f"- {m}: {np.mean(sec):.1f} s per pair inside the process (sum of report.json `timings_s`: read, "
                     "preprocess, network, refinement, resample + write; the first case's refinement includes XLA's compilation, "
                     "and reading overlaps the previous case, so this can exceed the wall time / pairs).")
    lines.append("- Warnings in report.json: " + ", ".join(
        f"{m} {sum(len(x['warnings']) for x in rows[m].values())}" for m in ("SPIRS", "SPIRS + refinement")) + ".")
    if selfres:
        ok = all(s["pass"] for s in selfres.values())
        lines.append(f"- Self check ({len(selfres)} pairs registered to themselves, default `spirs predict`): "
                     + ", ".join(f"Dice {s['dice']:.3f} / LNCC drop {s['lncc_drop']:.4f}" for s in selfres.values())
                     + f" → **{'PASS' if ok else 'FAIL'}** (Dice ≥ 0.95, drop ≤ 0.01).")
        result["self_pass"] = ok
    return result, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--ants-worker"]:
        return ants_worker(argv[1])
    from native_case import SHAPE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=10, help="synthetic (prior, new) pairs (default 10)")
    p.add_argument("--self", type=int, default=3, help="pairs registered to themselves (default 3; 0 = skip)")
    p.add_argument("--seed", type=int, default=2015, help="spirs synth seed and native-grid angles (default 2015)")
    p.add_argument("--lesions", default="3-8", help="spirs synth --lesions (default 3-8)")
    p.add_argument("--lesion-sizes", default="0,1,1,1",
                   help="spirs synth --lesion-sizes (default 0,1,1,1: no micro lesions, whose Dice is noise)")
    p.add_argument("--native-shape", type=int, nargs=3, default=SHAPE, metavar=("I", "J", "K"),
                   help="native grid shape; spacing follows so the field of view stays (default 177 247 140)")
    p.add_argument("--work", required=True, help="data cache folder")
    p.add_argument("--out", required=True, help="results folder (its spirs_*/ and ants/ are rebuilt)")
    p.add_argument("--model", help="spirs predict --model (default: shipped weights)")
    p.add_argument("--ants-python", help="Python executable with antspyx")
    p.add_argument("--skip-ants", action="store_true", help="SPIRS rows only")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.self < 0:
        p.error("--pairs must be >= 1 and --self >= 0")
    os.makedirs(args.out, exist_ok=True)

    def log(text):
        print(text, flush=True)

    log(f"data: {DATA_LABEL}")
    manifest, cases = make_data(args, log)
    work = os.path.dirname(manifest)
    n = len(cases)
    wall = {"SPIRS": run_spirs(manifest, "pairs", os.path.join(args.out, "spirs_off"), "off", args, log),
            "SPIRS + refinement": run_spirs(manifest, "pairs", os.path.join(args.out, "spirs_full"), "full", args,
                                            log)}
    seconds = {m: w / n for m, w in wall.items()}
    ants_res = None if args.skip_ants else run_ants(manifest, cases, os.path.join(args.out, "ants"), args, log)
    if ants_res is not None:
        for kind in ("Affine", "SyN"):
            seconds[f"ANTs {kind}"] = float(np.mean([t[kind]["seconds"] for t in ants_res[1].values()]))
    selfres = {}
    if args.self:
        run_spirs(manifest, "self", os.path.join(args.out, "spirs_self"), "full", args, log)
        selfres = self_check(work, args.out, args.self, log)
    rows = evaluate(work, cases, args.out, ants_res is not None, log)
    from native_case import SPACING

    info = {"pairs": n, "seed": args.seed, "native_shape": list(args.native_shape),
            "native_spacing": [s * a / b for s, a, b in zip(SPACING, SHAPE, args.native_shape)],
            "manifest": manifest, "spirs_wall_s": wall, "ants_wall_s": ants_res[0] if ants_res else None,
            "machine": f"{os.cpu_count()}-core CPU (shared machine unless stated otherwise)",
            "command": " ".join([os.path.basename(sys.argv[0])] + argv)}
    result, md = summarise(rows, seconds, selfres, info)
    from spirs_tf.atomic import atomic_write_text

    atomic_write_text(os.path.join(args.out, "registration_vs_ants.json"),
                      json.dumps(result, indent=2, default=float) + "\n")
    atomic_write_text(os.path.join(args.out, "results.md"), md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
