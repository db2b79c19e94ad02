"""Table 3 of the paper: registration with and without the pyramid (median LNCC and DSC, affine and deformable).

``pyramid`` is the trained run's full coarse-to-fine pyramid, scored at its finest level. ``no pyramid``
is, by default, a PROXY: the same trained weights run once at the finest level without the coarser
levels' initialisation (:func:`spirs_tf.networks.build_finest_only`: affine and deformable modules of
the finest level alone). The paper's variant is a network TRAINED without the pyramid; with the shared
weights of spirs-tf the proxy isolates the effect of the coarse-to-fine initialisation at test time and
is labelled ``proxy`` everywhere. ``--no-pyramid-run RUN2`` instead evaluates a separately trained run
(e.g. a config with ``model.num_levels=1`` trained on the same grid), scored at its own finest level; the
two runs must share the working grid and spacing (RUN2 is run as it was trained, all its levels).

Outputs in ``--out``: ``ablation.csv`` (one row per pair and variant, the metric columns of
:mod:`spirs_tf.evaluation`; ``experiments/stats.py --registration ablation.csv --reference pyramid``),
``table3.csv`` (medians and IQR, Wilcoxon p of pyramid vs no pyramid), ``ablation.json``, ``results.md``.

Usage::

    python experiments/ablation_pyramid.py --run RUN --manifest test/manifest.csv --split all --out results/table3
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from spirs_tf import evaluation as ev  # noqa: E402
from spirs_tf.atomic import atomic_write_text  # noqa: E402
from spirs_tf.errors import SpirsInputError  # noqa: E402
from spirs_tf.stats import median_iqr, wilcoxon_paired  # noqa: E402

COLUMNS = ("pair_id", "patient_id", "fixed_timepoint", "moving_timepoint", "method", "lncc_affine",
           "lncc_masked_affine", "dice_affine", "lncc_deformable", "lncc_masked_deformable", "dice_deformable",
           "folding_percent", "log_jacobian_std")
TABLE_COLUMNS = ("pyramidal", "variant", "transformation", "n", "lncc_median", "lncc_q1", "lncc_q3", "dsc_median",
                 "dsc_q1", "dsc_q3", "lncc_wilcoxon_p", "dsc_wilcoxon_p")
#: Paper Table 3 (median (IQR)), for the side-by-side snippet.
PAPER = {("no", "affine"): ("0.14 (0.11 – 0.17)", "0.26 (0.11 – 0.44)"),
         ("yes", "affine"): ("0.59 (0.52 – 0.65)", "0.51 (0.32 – 0.69)"),
         ("no", "deformable"): ("0.68 (0.64 – 0.71)", "0.76 (0.72 – 0.79)"),
         ("yes", "deformable"): ("0.72 (0.53 – 0.82)", "0.78 (0.61 – 0.85)")}


def _finest_rows(run, source, kind: str, method: str, log) -> list[dict]:
    rows = []
    for k, result in enumerate(ev.iterate_pairs(run, source, kind)):
        spirs = ev.registration_rows(result, run.cfg.loss.lncc_window, method)[1]
        rows.append({c: spirs.get(c) for c in COLUMNS})
        log(f"{method} [{k + 1}/{len(source)}] {result.pair_id}")
    return rows


def ablation(run_path: str, manifest: str, split: str | None, out_dir: str, no_pyramid_run: str | None = None,
             pairing: str | None = None, limit: int | None = None, synthetic: str = "auto", log=print) -> dict:
    run = ev.load_run(run_path)
    source = ev.pair_source(run, manifest, split, pairing, limit)
    rows = _finest_rows(run, source, "pyramid", "pyramid", log)
    if no_pyramid_run:
        other = ev.load_run(no_pyramid_run)
        if (other.cfg.data.grid_size, other.cfg.data.spacing_mm) != (run.cfg.data.grid_size, run.cfg.data.spacing_mm):
            raise SpirsInputError(f"its working grid ({other.cfg.data.grid_size} at {other.cfg.data.spacing_mm} mm) "
                                  f"differs from --run's ({run.cfg.data.grid_size} at {run.cfg.data.spacing_mm} mm)",
                                  no_pyramid_run)
        if other.size != run.size:
            raise SpirsInputError(f"its finest grid {other.size} differs from --run's {run.size}", no_pyramid_run)
        variant = f"separately trained run {os.path.abspath(other.checkpoint)}"
        rows += _finest_rows(other, source, "pyramid", "no-pyramid", log)
    else:
        variant = "proxy: finest level alone, same trained weights (no coarse-to-fine initialisation)"
        rows += _finest_rows(run, source, "finest-only", "no-pyramid", log)
    table = []
    for kind in ("affine", "deformable"):
        by = {m: {r["pair_id"]: r for r in rows if r["method"] == m} for m in ("pyramid", "no-pyramid")}
        keys = sorted(set(by["pyramid"]) & set(by["no-pyramid"]))
        p = {m: wilcoxon_paired([by["pyramid"][k][f"{m}_{kind}"] for k in keys],
                                [by["no-pyramid"][k][f"{m}_{kind}"] for k in keys]).pvalue for m in ("lncc", "dice")}
        for method, flag in (("no-pyramid", "no"), ("pyramid", "yes")):
            lncc = median_iqr([r[f"lncc_{kind}"] for r in by[method].values()])
            dsc = median_iqr([r[f"dice_{kind}"] for r in by[method].values()])
            table.append({"pyramidal": flag, "variant": "pyramid" if flag == "yes" else variant,
                          "transformation": kind, "n": len(by[method]), "lncc_median": lncc[0], "lncc_q1": lncc[1],
                          "lncc_q3": lncc[2], "dsc_median": dsc[0], "dsc_q1": dsc[1], "dsc_q3": dsc[2],
                          "lncc_wilcoxon_p": p["lncc"], "dsc_wilcoxon_p": p["dice"]})
    os.makedirs(out_dir, exist_ok=True)
    ev.write_csv(os.path.join(out_dir, "ablation.csv"), rows, COLUMNS)
    ev.write_csv(os.path.join(out_dir, "table3.csv"), table, TABLE_COLUMNS)
    info = {"data": ev.data_label(manifest, synthetic), "pairs": len(source), "run": run.describe(),
            "no_pyramid_variant": variant, "split": split or "all", "table": table}
    ev.write_info(out_dir, "ablation", info)
    atomic_write_text(os.path.join(out_dir, "results.md"), markdown(table, info))
    return info


def markdown(table, info) -> str:
    def cell(row, m):
        med, q1, q3 = row[f"{m}_median"], row[f"{m}_q1"], row[f"{m}_q3"]
        return "n/a" if med != med else f"{med:.2f} ({q1:.2f} – {q3:.2f})"

    lines = [f"#### Table 3 — pyramid ablation — data: **{info['data']}**", "",
             f"{info['pairs']} pairs; no-pyramid variant: {info['no_pyramid_variant']}. Median (IQR); p: "
             "two-sided Wilcoxon signed-rank, pyramid vs no pyramid, paired by pair.", "",
             "| Pyramidal | Transformation | LNCC (ours) | LNCC (paper) | DSC (ours) | DSC (paper) | p LNCC | p DSC |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table:
        paper = PAPER[(row["pyramidal"], row["transformation"])]
        mark = "✓" if row["pyramidal"] == "yes" else ("proxy ✗" if row["variant"].startswith("proxy") else "✗")
        lines.append(f"| {mark} | {row['transformation']} | {cell(row, 'lncc')} | {paper[0]} | {cell(row, 'dsc')} "
                     f"| {paper[1]} | {ev.p_text(row['lncc_wilcoxon_p'])} | {ev.p_text(row['dsc_wilcoxon_p'])} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ev.add_common_arguments(parser)
    parser.add_argument("--no-pyramid-run", help="a separately trained non-pyramidal run (default: the proxy)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = ablation(args.run, args.manifest, ev.split_arg(args.split), args.out, args.no_pyramid_run,
                        args.pairing, args.limit, args.synthetic)
    except SpirsInputError as exc:
        print(f"ablation_pyramid: error: {exc}", file=sys.stderr)
        return 2
    print(f"ablation_pyramid: {info['pairs']} pairs ({info['data']}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
