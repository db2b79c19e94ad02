"""Figure 4 I/J of the paper: LNCC of every test pair after affine (I) and deformable (J) registration at
each pyramid level 1, 2, 3 (coarsest to finest), with the unregistered pair as reference.

At level ``i`` the fixed image and the unregistered prior are the strided subsamples the network sees
(grid ``S / 2**(n−i)``); the affine result is ``warped_affine_image_i`` (``A_i``) and the deformable one
``warped_image_i`` (``A_final`` and ``u_i``), as in :mod:`spirs_tf.evaluation`. The paper's LNCC is
unmasked here (column ``lncc``); the masked variant is in the CSV too.

LNCC on grids of different sizes is not comparable (a window of 9 voxels covers 4× more anatomy at
level 1, and the coarse images are smoother), so a second measure, ``lncc_finest_grid``, applies the
level-``i`` transform to the FINEST images: the affine ``A_i`` (already in finest voxels), and the
deformable ``(A_final, up(u_i))`` with ``up`` the network's own DVF upsampler
(:func:`spirs_tf.transforms.upsample_dvf`, ``n − i`` times). At the finest level both measures agree.
It needs the model, so it is empty with ``--from-csv``.

Outputs in ``--out``: ``levels.csv`` (one row per pair, level and transform: ``identity``, ``affine``,
``deformable``; LNCC unmasked and masked, Dice), ``figure4ij.png`` (per-pair lines across levels over
box plots), ``levels.json`` and ``results.md``. ``--from-csv per_pair.csv`` re-uses
``experiments/evaluate.py``'s output instead of running the model.

Usage::

    python experiments/pyramid_levels.py --run RUN --manifest test/manifest.csv --split all --out results/figure4
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from spirs_tf import evaluation as ev  # noqa: E402
from spirs_tf.atomic import atomic_path, atomic_write_text  # noqa: E402
from spirs_tf.errors import SpirsInputError  # noqa: E402
from spirs_tf.stats import wilcoxon_paired  # noqa: E402

COLUMNS = ("pair_id", "patient_id", "level", "grid", "transform", "lncc", "lncc_masked", "dice", "lncc_finest_grid")
TRANSFORMS = ("identity", "affine", "deformable")
#: The example pair of the paper's Figure 4 (LNCC, not medians): before 0.064; affine levels 1-3; deformable 1-3.
PAPER_EXAMPLE = {"identity": 0.064, "affine": (0.110, 0.160, 0.163), "deformable": (0.398, 0.525, 0.614)}


def finest_grid_lncc(result, window: int) -> dict[tuple[int, str], float]:
    """``{(level, transform): LNCC}`` of each level's transform applied to the finest images (docstring)."""
    from spirs_tf import transforms
    from spirs_tf._compat import ops
    from spirs_tf.metrics import lncc

    fixed, moving = result.inputs["fixed_image"], result.inputs["moving_image"][None, ..., None]
    out, n = result.outputs, result.levels[-1]
    identity = lncc(fixed, moving[0, ..., 0], window)  # the same unwarped prior at every level
    values = {}
    for level in result.levels:
        u = out[f"dvf_{level}"][None]
        for _ in range(n - level):
            u = transforms.upsample_dvf(u)
        warped = {"affine": transforms.warp(moving, matrix=out[f"affine_{level}"][None]),
                  "deformable": transforms.warp(moving, matrix=out[f"affine_{n}"][None], dvf=u)}
        values[(level, "identity")] = identity
        for kind, w in warped.items():
            values[(level, kind)] = lncc(fixed, ops.convert_to_numpy(w)[0, ..., 0], window)
    return values


def long_rows(per_pair: list[dict], levels, grid_of, finest: dict | None = None) -> list[dict]:
    """Per-pair registration rows (identity + SPIRS, per-level columns) → one row per pair, level, transform;
    ``finest``: ``{(pair_id, level, transform): lncc_finest_grid}`` (NaN where missing)."""
    out = []
    for row in per_pair:
        for level in levels:
            kinds = ("identity",) if row["method"] == "identity" else ("affine", "deformable")
            for kind in kinds:
                col = "affine" if kind == "identity" else kind
                out.append({"pair_id": row["pair_id"], "patient_id": row["patient_id"], "level": level,
                            "grid": grid_of(level), "transform": kind,
                            "lncc": row[f"lncc_{col}_l{level}"], "lncc_masked": row[f"lncc_masked_{col}_l{level}"],
                            "dice": row[f"dice_{col}_l{level}"],
                            "lncc_finest_grid": (finest or {}).get((row["pair_id"], level, kind), np.nan)})
    return out


def figure(rows: list[dict], levels, path: str, title: str) -> None:
    """(I) affine, (J) deformable: per-pair lines over box plots per level; a second row with
    ``lncc_finest_grid`` when it is available."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [("lncc", "LNCC on the level's own grid")]
    if any(np.isfinite(r["lncc_finest_grid"]) for r in rows):
        measures.append(("lncc_finest_grid", "level's transform applied at the finest grid"))
    fig, axes = plt.subplots(len(measures), 2, figsize=(10, 4 * len(measures)), squeeze=False)
    pairs = sorted({r["pair_id"] for r in rows})
    for (measure, label), axrow in zip(measures, axes):
        value = {(r["pair_id"], r["level"], r["transform"]): r[measure] for r in rows}
        for ax, kind, letter in zip(axrow, ("affine", "deformable"), "IJ"):
            for p in pairs:
                ax.plot(levels, [value.get((p, lv, kind), np.nan) for lv in levels], color="0.7", lw=0.7, zorder=1)
            data = [[value[(p, lv, kind)] for p in pairs if np.isfinite(value.get((p, lv, kind), np.nan))]
                    for lv in levels]
            ax.boxplot(data, positions=list(levels), widths=0.3, showfliers=False, zorder=2)
            ident = [np.nanmedian([value.get((p, lv, "identity"), np.nan) for p in pairs]) for lv in levels]
            ax.plot(levels, ident, "k--", lw=1, label="before registration (median)")
            ax.set_xticks(list(levels), [f"level {lv}" for lv in levels])
            ax.set_title(f"({letter}) {kind}: {label}", fontsize=9)
            ax.set_ylabel("LNCC")
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def pyramid_levels(args, log=print) -> dict:
    if args.from_csv:
        per_pair = ev.read_rows(args.from_csv)
        levels = sorted({int(c.rsplit("_l", 1)[1]) for c in per_pair[0] if c.startswith("lncc_affine_l")})
        levels = [lv for lv in levels if any(np.isfinite(r[f"lncc_affine_l{lv}"]) for r in per_pair)]
        run_info, grid_of, finest = {"per_pair_csv": os.path.abspath(args.from_csv)}, (lambda lv: ""), None
    else:
        run = ev.load_run(args.run)
        source = ev.pair_source(run, args.manifest, ev.split_arg(args.split), args.pairing, args.limit)
        per_pair, levels, finest = [], [], {}
        for k, result in enumerate(ev.iterate_pairs(run, source)):
            per_pair += ev.registration_rows(result, run.cfg.loss.lncc_window)
            levels = list(result.levels)
            for (level, kind), v in finest_grid_lncc(result, run.cfg.loss.lncc_window).items():
                finest[(result.pair_id, level, kind)] = v
            log(f"[{k + 1}/{len(source)}] {result.pair_id}")
        run_info, grid_of = run.describe(), run.cfg.level_grid
    if not per_pair:
        raise SpirsInputError("no pairs", args.from_csv or args.manifest)
    rows = long_rows(per_pair, levels, grid_of, finest)
    os.makedirs(args.out, exist_ok=True)
    ev.write_csv(os.path.join(args.out, "levels.csv"), rows, COLUMNS)
    label = ev.data_label(args.manifest, args.synthetic)
    n_pairs = len({r["pair_id"] for r in rows})
    figure(rows, levels, os.path.join(args.out, "figure4ij.png"),
           f"Figure 4 I/J (data: {label.split(' (')[0]}): LNCC of {n_pairs} pairs per pyramid level")
    summary = {}
    for measure in ("lncc", "lncc_finest_grid"):
        for kind in TRANSFORMS:
            for lv in levels:
                summary[f"{measure}:{kind}_l{lv}"] = ev.median_iqr_text(
                    [r[measure] for r in rows if r["transform"] == kind and r["level"] == lv], 3)
    # does LNCC rise from one level to the next? (paired over pairs, Wilcoxon)
    trend = {}
    for measure in ("lncc", "lncc_finest_grid"):
        for kind in ("affine", "deformable"):
            v = {(r["pair_id"], r["level"]): r[measure] for r in rows if r["transform"] == kind}
            pairs = sorted({p for p, _ in v})
            for a, b in zip(levels[:-1], levels[1:]):
                res = wilcoxon_paired([v[(p, b)] for p in pairs], [v[(p, a)] for p in pairs])
                if res.n:
                    trend[f"{measure}, {kind}: level {b} vs {a}"] = {"median_difference": res.median_difference,
                                                                     "p": res.pvalue}
    info = {"data": label, "pairs": n_pairs, "levels": levels, "run": run_info, "median_iqr": summary, "trend": trend}
    ev.write_info(args.out, "levels", info)
    atomic_write_text(os.path.join(args.out, "results.md"), markdown(info))
    return info


def markdown(info) -> str:
    levels = info["levels"]
    lines = [f"#### Figure 4 I/J — LNCC per pyramid level — data: **{info['data']}**", "",
             f"{info['pairs']} pairs, unmasked LNCC, median (IQR). The paper gives no medians for I/J; its "
             f"example pair (Fig. 4 A–H) rises {PAPER_EXAMPLE['identity']} → affine "
             f"{' / '.join(map(str, PAPER_EXAMPLE['affine']))} → deformable "
             f"{' / '.join(map(str, PAPER_EXAMPLE['deformable']))} over levels 1/2/3.", "",
             "| measure | transform | " + " | ".join(f"level {lv}" for lv in levels) + " |",
             "|---" * (len(levels) + 2) + "|"]
    for measure, name in (("lncc", "own grid"), ("lncc_finest_grid", "at finest grid")):
        for kind in TRANSFORMS:
            cells = [info["median_iqr"][f"{measure}:{kind}_l{lv}"] for lv in levels]
            if any(c != "n/a" for c in cells):
                lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, t in info["trend"].items():
        lines.append(f"- {name}: median change {t['median_difference']:+.3f}, Wilcoxon p = {ev.p_text(t['p'])}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ev.add_common_arguments(parser)
    parser.add_argument("--from-csv", help="per_pair.csv of experiments/evaluate.py (skip running the model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = pyramid_levels(args)
    except SpirsInputError as exc:
        print(f"pyramid_levels: error: {exc}", file=sys.stderr)
        return 2
    print(f"pyramid_levels: {info['pairs']} pairs, levels {info['levels']} ({info['data']}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
