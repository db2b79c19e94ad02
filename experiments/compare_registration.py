"""Figure 5 of the paper: SPIRS vs ANTs vs VoxelMorph, LNCC and Dice for affine and deformable registration.

Per test pair (pre-aligned on the new scan's working grid, model finest grid, augmentation off):

* ``SPIRS`` -- the finest pyramid level: affine ``A_final`` and deformable ``(A_final, u)``.
* ``ANTs`` (antspyx, optional) -- affine: ANTs ``Affine`` on the pair as it enters SPIRS; deformable:
  ANTs SyN started from the SPIRS affine (``initial_transform``: the deformable baselines get
  SPIRS-affine pre-aligned pairs, as in the paper; the original prior is resampled once). ``--ants
  paper`` uses the paper's SyN (CC radius 4, step 0.25, Gauss[9, 0.2], 3 × 201 iterations; FACTS decision
  11; about 5 minutes per 32³ pair on 2 CPU cores, so hours at 64³), ``--ants default`` ANTsPy's SyN
  defaults (seconds per pair), ``--ants-syn-iterations`` overrides the iterations. ANTs runs in a
  subprocess of a Python that can ``import ants`` (``--ants-python``, ``$SPIRS_ANTS_PYTHON``, this
  interpreter, or ``../venv-ants/bin/python`` beside the repository), exchanging ``.npz`` files in
  ``OUT/ants/`` (finished pairs are kept under a hash of their inputs and settings, so an interrupted
  run resumes and a changed run or setting never re-uses a stale result). Without antspyx the ANTs
  rows are skipped with a message.
* ``VXM`` -- VxmDense (:mod:`spirs_tf.baselines.voxelmorph`) trained with its own NCC + gradient loss
  for ``--vxm-steps`` Adam steps on the TRAINING pairs (``--train-manifest``/``--train-split``), each
  first aligned by the SPIRS affine; at test time it registers the SPIRS-affine-aligned prior and the
  original prior is resampled once through ``A(x + u(x))``. ``--vxm-steps 0`` skips it; the weights are
  saved as ``OUT/vxm.weights.h5`` and ``--vxm-weights`` re-uses them.
* ``SPIRS ×K symmetric`` / ``SPIRS ×K`` (with ``--affine-passes K`` > 1 or ``--affine-symmetric``; beyond the
  paper) -- the same network run as :meth:`spirs_tf.predictor.Predictor.predict` runs it with those
  settings (``spirs predict --affine-passes K --affine-symmetric on``): affine ``A`` and the whole
  transform. Still the network alone: no optimisation.
* ``identity`` -- the pair unregistered (reference; not in the figure).

Metrics as in :mod:`spirs_tf.evaluation` (LNCC unmasked/masked, Dice of the warped prior mask, % folding
and std log-Jacobian of the whole map). Outputs in ``--out``: ``registration.csv`` (one row per pair and
method; ``experiments/stats.py --registration`` reads it), ``figure5.png`` (four box plots), ``comparison.json``
and ``results.md``; ``arrays/`` holds each pair's images and warped results for ``experiments/examples.py``.

Usage::

    python experiments/compare_registration.py --run RUN --manifest test/manifest.csv --split all \\
        --train-manifest train/manifest.csv --ants default --vxm-steps 2000 --out results/figure5
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the ANTs worker runs in another environment, maybe without spirs-tf installed
    sys.path.insert(0, REPO)

METHODS = ("identity", "SPIRS", "ANTs", "VXM")
COLUMNS = ("pair_id", "patient_id", "fixed_timepoint", "moving_timepoint", "method", "lncc_affine",
           "lncc_masked_affine", "dice_affine", "lncc_deformable", "lncc_masked_deformable", "dice_deformable",
           "folding_percent", "log_jacobian_std")
PANELS = (("lncc_affine", "LNCC, affine", ("ANTs", "SPIRS")),
          ("lncc_deformable", "LNCC, deformable", ("VXM", "ANTs", "SPIRS")),
          ("dice_affine", "DSC, affine", ("ANTs", "SPIRS")),
          ("dice_deformable", "DSC, deformable", ("VXM", "ANTs", "SPIRS")))
ANTS_MISSING = ("ANTs baselines skipped: no Python with antspyx found (pip install 'spirs-tf[baselines]' "
                "in some environment and pass --ants-python, or set SPIRS_ANTS_PYTHON)")


# ------------------------------------------------------------------------------------ ANTs worker
def ants_worker(job_dir: str) -> int:
    """Run the ANTs job in ``job_dir`` (``job.json`` + input ``.npz``); imports antspyx, never TensorFlow."""
    from spirs_tf.atomic import atomic_path
    from spirs_tf.baselines.ants import register_ants

    with open(os.path.join(job_dir, "job.json"), encoding="utf-8") as fh:
        job = json.load(fh)
    overrides = {"reg_iterations": tuple(job["syn_iterations"])} if job.get("syn_iterations") else None
    for k, item in enumerate(job["pairs"]):
        out_path = os.path.join(job_dir, item["output"])
        if os.path.isfile(out_path):
            continue
        with np.load(os.path.join(job_dir, item["input"])) as z:
            fixed, moving, mask, affine = z["fixed"], z["moving"], z["moving_mask"], z["spirs_affine"]
        aff = register_ants(fixed, moving, mask, job["spacing"], mode="affine", random_seed=job["seed"])
        syn = register_ants(fixed, moving, mask, job["spacing"], mode=job["syn_mode"], initial_affine=affine,
                            random_seed=job["seed"], overrides=overrides)
        with atomic_path(out_path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, affine_image=aff.warped_image, affine_mask=aff.warped_mask,
                         affine_displacement=aff.displacement, affine_seconds=aff.seconds,
                         syn_image=syn.warped_image, syn_mask=syn.warped_mask,
                         syn_displacement=syn.displacement, syn_seconds=syn.seconds)
        print(f"ants [{k + 1}/{len(job['pairs'])}] {item['pair_id']}: affine {aff.seconds:.1f} s, "
              f"{job['syn_mode']} {syn.seconds:.1f} s", flush=True)
    return 0


def _env_with_repo() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def find_ants_python(explicit: str | None = None) -> str | None:
    """A Python executable that can ``import ants``: ``explicit`` only if given, else
    ``$SPIRS_ANTS_PYTHON``, this interpreter, ``<repo>/../venv-ants/bin/python``; None if none can."""
    candidates = [explicit] if explicit else [os.environ.get("SPIRS_ANTS_PYTHON"), sys.executable,
                                              os.path.join(os.path.dirname(REPO), "venv-ants", "bin", "python")]
    for python in candidates:
        if not python or not os.path.isfile(python):
            continue
        probe = subprocess.run([python, "-c", "import ants"], capture_output=True, env=_env_with_repo())
        if probe.returncode == 0:
            return python
    return None


# ------------------------------------------------------------------------------------ comparison
def _save(path: str, **arrays) -> None:
    from spirs_tf.atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def _row(ids: dict, method: str, affine: dict | None, deformable: dict | None) -> dict:
    row = dict(ids, method=method)
    for kind, res in (("affine", affine), ("deformable", deformable)):
        for m in ("lncc", "lncc_masked", "dice"):
            row[f"{m}_{kind}"] = np.nan if res is None else res[m]
    for m in ("folding_percent", "log_jacobian_std"):
        row[m] = np.nan if deformable is None else deformable[m]
    return row


def passes_method(passes: int, symmetric: bool) -> str | None:
    """Name of the extra SPIRS row of ``--affine-passes``/``--affine-symmetric`` (None: no extra row)."""
    if passes <= 1 and not symmetric:
        return None
    return f"SPIRS ×{passes}" + (" symmetric" if symmetric else "")


def _passes_row(predictor, ids: dict, inp: dict, passes: int, symmetric: bool, window: int) -> dict:
    """The extra SPIRS row: the network run ``passes`` times (symmetric or not) by the predictor."""
    from spirs_tf import evaluation as ev
    from spirs_tf.geometry import warp_working

    batch = [np.asarray(inp[k], np.float32)[None, ..., None] for k in ("fixed_image", "moving_image", "moving_mask")]
    out = predictor.predict(*batch, passes=passes, symmetric=symmetric)
    a, shape = out["affine"][0], inp["fixed_image"].shape
    aff = ev.registration_metrics(inp["fixed_image"], inp["fixed_mask"], warp_working(inp["moving_image"], a, None),
                                  warp_working(inp["moving_mask"], a, None), None, window)
    deform = ev.registration_metrics(inp["fixed_image"], inp["fixed_mask"], out["prior_warped"][0, ..., 0],
                                     out["prior_mask_warped"][0, ..., 0],
                                     ev.total_displacement(a, out["dvf"][0], shape), window)
    return _row(ids, passes_method(passes, symmetric), aff, deform)


def _spirs_pairs(run, source, arrays_dir: str, window: int, log, passes: int = 1,
                 symmetric: bool = False) -> tuple[list[dict], list[dict]]:
    """Run SPIRS on every test pair, save its arrays, return (rows, index); with ``passes`` > 1 or
    ``symmetric`` also the extra row of :func:`passes_method`."""
    from spirs_tf import evaluation as ev

    rows, index = [], []
    predictor = run.predictor() if passes_method(passes, symmetric) else None
    for k, res in enumerate(ev.iterate_pairs(run, source)):
        L, out, inp = res.levels[-1], res.outputs, res.inputs
        a = out[f"affine_{L}"]
        arrays = {"fixed": inp["fixed_image"], "fixed_mask": inp["fixed_mask"], "moving": inp["moving_image"],
                  "moving_mask": inp["moving_mask"], "spirs_affine": a,
                  "spirs_affine_image": out[f"warped_affine_image_{L}"][..., 0],
                  "spirs_affine_mask": out[f"warped_affine_mask_{L}"][..., 0],
                  "spirs_image": out[f"warped_image_{L}"][..., 0], "spirs_mask": out[f"warped_mask_{L}"][..., 0],
                  "p1_logits": out["p1_logits"][..., 0], "p2_logits": out["p2_logits"][..., 0]}
        name = f"pair_{k:04d}"
        _save(os.path.join(arrays_dir, f"{name}.npz"), **arrays)
        fm, shape = inp["fixed_mask"], inp["fixed_image"].shape
        ident = ev.registration_metrics(inp["fixed_image"], fm, inp["moving_image"], inp["moving_mask"],
                                        np.zeros(shape + (3,), np.float32), window)
        aff = ev.registration_metrics(inp["fixed_image"], fm, arrays["spirs_affine_image"], arrays["spirs_affine_mask"],
                                      None, window)
        deform = ev.registration_metrics(inp["fixed_image"], fm, arrays["spirs_image"], arrays["spirs_mask"],
                                         ev.total_displacement(a, out[f"dvf_{L}"], shape), window)
        rows += [_row(res.ids, "identity", ident, ident), _row(res.ids, "SPIRS", aff, deform)]
        if predictor is not None:
            rows.append(_passes_row(predictor, res.ids, inp, passes, symmetric, window))
        index.append(dict(res.ids, file=f"{name}.npz", spacing=list(res.spacing)))
        log(f"SPIRS [{k + 1}/{len(source)}] {res.pair_id}")
    return rows, index


def _vxm(run, args, index, arrays_dir, window, out_dir, log) -> tuple[list[dict], dict]:
    """Train (or load) VxmDense on SPIRS-affine-aligned training pairs and register every test pair."""
    from spirs_tf import evaluation as ev
    from spirs_tf import transforms
    from spirs_tf._compat import ops
    from spirs_tf.baselines.voxelmorph import build_vxm_dense, register_vxm, train_vxm

    size = (run.size,) * 3
    info = {"steps": args.vxm_steps, "lr": args.vxm_lr}
    if args.vxm_weights:
        info = {}
        model = build_vxm_dense(size)
        model.load_weights(args.vxm_weights)
        info["weights"] = os.path.abspath(args.vxm_weights)
    else:
        train = ev.pair_source(run, args.train_manifest or args.manifest, ev.split_arg(args.train_split),
                               args.pairing, args.train_limit)
        pairs = [(r.inputs["fixed_image"], r.outputs[f"warped_affine_image_{r.levels[-1]}"][..., 0])
                 for r in ev.iterate_pairs(run, train)]
        log(f"VXM: training {args.vxm_steps} steps on {len(pairs)} SPIRS-affine-aligned training pairs")
        start = time.perf_counter()
        losses = []
        model = train_vxm(pairs, size, args.vxm_steps, lr=args.vxm_lr, seed=args.seed,
                          on_step=lambda step, logs: losses.append(logs["loss"]))
        info.update(train_pairs=len(pairs), train_seconds=time.perf_counter() - start,
                    first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
        model.save_weights(os.path.join(out_dir, "vxm.weights.h5"))
    rows = []
    for item in index:
        with np.load(os.path.join(arrays_dir, item["file"])) as z:
            d = {k: z[k] for k in z.files}
        res = register_vxm(model, d["fixed"], d["spirs_affine_image"])
        m = d["spirs_affine"][:, :3].astype(np.float64)
        dvf = np.einsum("ab,ijkb->ijka", m, res.displacement).astype(np.float32)  # A(x + u) = A(x) + M·u
        both = np.stack([d["moving"], d["moving_mask"]], -1)[None]
        warped = ops.convert_to_numpy(transforms.warp(both, matrix=d["spirs_affine"][None], dvf=dvf[None]))[0]
        shape = d["fixed"].shape
        metrics = ev.registration_metrics(d["fixed"], d["fixed_mask"], warped[..., 0], warped[..., 1],
                                          ev.total_displacement(d["spirs_affine"], dvf, shape), window)
        rows.append(_row({k: item[k] for k in COLUMNS[:4]}, "VXM", None, metrics))
        _save(os.path.join(arrays_dir, item["file"].replace(".npz", "_vxm.npz")),
              vxm_image=warped[..., 0], vxm_mask=warped[..., 1])
    return rows, info


def _ants(run, args, index, arrays_dir, window, out_dir, log) -> tuple[list[dict], dict]:
    """Run the ANTs worker in a subprocess and score its results; skipped (with a reason) without antspyx."""
    from spirs_tf import evaluation as ev

    python = find_ants_python(args.ants_python)
    if python is None:
        log(ANTS_MISSING)
        return [], {"skipped": ANTS_MISSING}
    job_dir = os.path.join(out_dir, "ants")
    os.makedirs(job_dir, exist_ok=True)
    syn_mode = {"paper": "syn-paper", "default": "syn-default"}[args.ants]
    job = {"syn_mode": syn_mode, "syn_iterations": args.ants_syn_iterations, "seed": args.seed,
           "spacing": list(run.spacing), "pairs": []}
    for item in index:
        with np.load(os.path.join(arrays_dir, item["file"])) as z:
            arrays = {"fixed": z["fixed"], "moving": z["moving"],
                      "moving_mask": (z["moving_mask"] > 0.5).astype(np.uint8), "spirs_affine": z["spirs_affine"]}
        # results are kept for resuming, keyed by everything they depend on (inputs, SPIRS affine, settings)
        digest = hashlib.sha1(json.dumps([item["pair_id"], syn_mode, args.ants_syn_iterations, args.seed,
                                          list(run.spacing)]).encode())
        for key in sorted(arrays):
            digest.update(np.ascontiguousarray(arrays[key]).tobytes())
        name = digest.hexdigest()[:16]
        if not os.path.isfile(os.path.join(job_dir, f"{name}_input.npz")):
            _save(os.path.join(job_dir, f"{name}_input.npz"), **arrays)
        job["pairs"].append({"pair_id": item["pair_id"], "input": f"{name}_input.npz",
                             "output": f"{name}_{syn_mode}.npz"})
    ev.atomic_write_text(os.path.join(job_dir, "job.json"), json.dumps(job, indent=2) + "\n")
    log(f"ANTs: affine + {syn_mode} on {len(index)} pairs with {python}")
    proc = subprocess.run([python, os.path.abspath(__file__), "--ants-worker", job_dir], env=_env_with_repo(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ants ["):
            log(line)
    if proc.returncode != 0:
        reason = f"ANTs worker failed (exit {proc.returncode}): {proc.stdout.strip()[-2000:]}"
        log(reason)
        return [], {"skipped": reason, "python": python}
    rows, seconds = [], []
    for item, spec in zip(index, job["pairs"]):
        with np.load(os.path.join(arrays_dir, item["file"])) as z:
            fixed, fixed_mask = z["fixed"], z["fixed_mask"]
        with np.load(os.path.join(job_dir, spec["output"])) as r:
            aff = ev.registration_metrics(fixed, fixed_mask, r["affine_image"], r["affine_mask"], None, window)
            syn = ev.registration_metrics(fixed, fixed_mask, r["syn_image"], r["syn_mask"], r["syn_displacement"],
                                          window)
            seconds.append(float(r["affine_seconds"]) + float(r["syn_seconds"]))
            _save(os.path.join(arrays_dir, item["file"].replace(".npz", "_ants.npz")),
                  ants_affine_image=r["affine_image"], ants_affine_mask=r["affine_mask"],
                  ants_image=r["syn_image"], ants_mask=r["syn_mask"])
        rows.append(_row({k: item[k] for k in COLUMNS[:4]}, "ANTs", aff, syn))
    return rows, {"python": python, "syn_mode": syn_mode, "syn_iterations": args.ants_syn_iterations,
                  "mean_seconds_per_pair": float(np.mean(seconds))}


def figure(rows: list[dict], path: str, title: str) -> dict:
    """Four box plots (Figure 5 A–D) + Wilcoxon p of SPIRS vs each baseline; returns the p-values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spirs_tf.evaluation import p_text
    from spirs_tf.stats import wilcoxon_paired

    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    tests = {}
    extras = tuple(sorted({r["method"] for r in rows} - set(METHODS)))  # SPIRS ×K (symmetric)
    for ax, (col, label, methods) in zip(axes, PANELS):
        present = [m for m in methods + extras if any(r["method"] == m and np.isfinite(r[col]) for r in rows)]
        by = {m: {r["pair_id"]: r[col] for r in rows if r["method"] == m} for m in present}
        data = [[v for v in by[m].values() if np.isfinite(v)] for m in present]
        if data:
            ax.boxplot(data, showfliers=True)
            ax.set_xticks(range(1, len(present) + 1), present)
        names = []
        for m in present:
            if m != "SPIRS" and "SPIRS" in by:
                keys = sorted(set(by[m]) & set(by["SPIRS"]))
                res = wilcoxon_paired([by["SPIRS"][k] for k in keys], [by[m][k] for k in keys])
                tests[f"{col}: SPIRS vs {m}"] = res.pvalue
                names.append(f"vs {m}: p={p_text(res.pvalue)}")
        for extra in extras:
            for m in present:
                if m in ("ANTs", "VXM") and extra in by:
                    keys = sorted(set(by[m]) & set(by[extra]))
                    tests[f"{col}: {extra} vs {m}"] = wilcoxon_paired([by[extra][k] for k in keys],
                                                                      [by[m][k] for k in keys]).pvalue
        ax.set_title(label + ("\n" + ", ".join(names) if names else ""), fontsize=9)
        ax.set_ylabel(label.split(",")[0])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from spirs_tf.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return tests


def markdown(rows, info, tests) -> str:
    from spirs_tf.evaluation import median_iqr_text, p_text

    lines = [f"#### Figure 5 — SPIRS vs ANTs vs VoxelMorph — data: **{info['data']}**", "",
             f"{info['pairs']} test pairs, grid {info['run']['grid']}³ at {info['run']['spacing_mm']:g} mm. "
             "Median (IQR); p: two-sided Wilcoxon signed-rank, SPIRS vs method, paired by pair, uncorrected "
             "(`experiments/stats.py` gives Holm-adjusted values).", "",
             "| method | LNCC affine | LNCC deformable | DSC affine | DSC deformable | % folding |",
             "|---|---|---|---|---|---|"]
    extras = sorted({r["method"] for r in rows} - set(METHODS))
    for method in METHODS[:2] + tuple(extras) + METHODS[2:]:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            cells = [median_iqr_text([r[c] for r in mine], 3) for c in
                     ("lncc_affine", "lncc_deformable", "dice_affine", "dice_deformable", "folding_percent")]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {k}: p = {p_text(v)}" for k, v in tests.items()]
    for name in ("ants", "vxm"):
        if "skipped" in info[name]:
            lines.append(f"- {name.upper()}: {info[name]['skipped']}")
    if "syn_mode" in info["ants"]:
        lines.append(f"- ANTs: affine + {info['ants']['syn_mode']} (iterations "
                     f"{info['ants']['syn_iterations'] or 'as the mode sets'}), from the SPIRS affine; "
                     f"{info['ants']['mean_seconds_per_pair']:.1f} s per pair.")
    if "weights" in info["vxm"]:
        lines.append(f"- VXM: weights loaded from `{info['vxm']['weights']}` (`--vxm-weights`; trained "
                     "earlier, see there); applied after the SPIRS affine.")
    elif "steps" in info["vxm"] and "skipped" not in info["vxm"]:
        lines.append(f"- VXM: {info['vxm']['steps']} Adam steps (lr {info['vxm']['lr']:g}) on "
                     f"{info['vxm'].get('train_pairs', '?')} SPIRS-affine-aligned training pairs.")
    return "\n".join(lines) + "\n"


def compare(args, log=print) -> dict:
    from spirs_tf import evaluation as ev

    run = ev.load_run(args.run)
    source = ev.pair_source(run, args.manifest, ev.split_arg(args.split), args.pairing, args.limit)
    out_dir = args.out
    arrays_dir = os.path.join(out_dir, "arrays")
    os.makedirs(arrays_dir, exist_ok=True)
    window = run.cfg.loss.lncc_window
    rows, index = _spirs_pairs(run, source, arrays_dir, window, log, args.affine_passes, args.affine_symmetric)
    ev.atomic_write_text(os.path.join(arrays_dir, "index.json"), json.dumps(index, indent=2) + "\n")
    info = {"data": ev.data_label(args.manifest, args.synthetic), "pairs": len(index), "run": run.describe(),
            "split": args.split}
    if args.vxm_steps > 0 or args.vxm_weights:
        vxm_rows, info["vxm"] = _vxm(run, args, index, arrays_dir, window, out_dir, log)
        rows += vxm_rows
    else:
        info["vxm"] = {"skipped": "VXM skipped (--vxm-steps 0)"}
    if args.ants != "none":
        ants_rows, info["ants"] = _ants(run, args, index, arrays_dir, window, out_dir, log)
        rows += ants_rows
    else:
        info["ants"] = {"skipped": "ANTs skipped (--ants none)"}
    ev.write_csv(os.path.join(out_dir, "registration.csv"), rows, COLUMNS)
    title = f"Figure 5 (data: {info['data'].split(' (')[0]}): {len(index)} pairs"
    tests = figure(rows, os.path.join(out_dir, "figure5.png"), title)
    info["wilcoxon_p"] = tests
    ev.write_info(out_dir, "comparison", info)
    ev.atomic_write_text(os.path.join(out_dir, "results.md"), markdown(rows, info, tests))
    return info


def build_parser() -> argparse.ArgumentParser:
    from spirs_tf.evaluation import add_common_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--train-manifest", help="manifest of VXM's training pairs (default: --manifest)")
    parser.add_argument("--train-split", default="train", help="split of VXM's training pairs ('all' = every patient)")
    parser.add_argument("--train-limit", type=int, help="at most this many training pairs for VXM")
    parser.add_argument("--vxm-steps", type=int, default=1000, help="VXM Adam steps (0 = skip VXM)")
    parser.add_argument("--vxm-lr", type=float, default=1e-4, help="VXM learning rate (VoxelMorph's 1e-4)")
    parser.add_argument("--vxm-weights", help="load VXM weights (.weights.h5) instead of training")
    parser.add_argument("--ants", choices=("paper", "default", "none"), default="paper",
                        help="ANTs SyN settings: the paper's (slow), ANTsPy's defaults, or no ANTs")
    parser.add_argument("--ants-syn-iterations", type=int, nargs="+", metavar="N",
                        help="override SyN iterations per level, e.g. 50 30 10")
    parser.add_argument("--ants-python", help="Python executable with antspyx")
    parser.add_argument("--seed", type=int, default=0, help="seed of VXM initialisation and ANTs")
    parser.add_argument("--affine-passes", type=int, default=1, metavar="K",
                        help="with K > 1 (or --affine-symmetric): an extra row, the network run K times as "
                             "spirs predict --affine-passes K runs it (beyond the paper; default 1)")
    parser.add_argument("--affine-symmetric", action="store_true",
                        help="the extra row's affines are symmetric (spirs predict --affine-symmetric on)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--ants-worker"]:
        return ants_worker(argv[1])
    from spirs_tf.errors import SpirsInputError

    args = build_parser().parse_args(argv)
    if args.vxm_steps < 0:
        print("compare_registration: error: --vxm-steps must be >= 0", file=sys.stderr)
        return 2
    if args.affine_passes < 1:
        print(f"compare_registration: error: --affine-passes must be >= 1, got {args.affine_passes}", file=sys.stderr)
        return 2
    try:
        info = compare(args)
    except SpirsInputError as exc:
        print(f"compare_registration: error: {exc}", file=sys.stderr)
        return 2
    print(f"compare_registration: {info['pairs']} pairs ({info['data']}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
