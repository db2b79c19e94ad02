"""Figures 6 and 7 of the paper: qualitative panels.

* ``figure6.png`` -- deformable registration of example pairs: fixed (new) image, moving (prior) image,
  then the prior warped by VXM, ANTs and SPIRS (whichever are available), on the axial slice through a
  lesion of the new scan. Red: the lesion outline (on the fixed and moving images their own masks; on a
  warped image the warped prior mask); dashed cyan on the warps: the fixed lesion, for reference.
  Rows (``--pairs``, default 2): the pair with the largest lesion and the pair with the smallest lesion
  (the paper's rows show a large and a small lesion) among the pairs the baselines ran on (all pairs
  without ``--compare``), or the pairs named by ``--pair-ids``.
* ``figure7.png`` -- lesions detected by P2 (with the prior) and missed by P1 (without it): micro
  lesions (< 25 mm³) first, at most one per patient, up to ``--lesions`` (default 3). Each lesion gets
  two crops of the new scan: P1's prediction and P2's, outlined in red, the ground truth dashed green.
  If no micro lesion qualifies, larger ones are shown and the title says so; if none at all, the
  figure says that.

SPIRS is run on the split (augmentation off, :mod:`spirs_tf.evaluation`). Baseline warps come from a
``experiments/compare_registration.py`` output folder (``--compare DIR``: its ``arrays/``), matched by
pair id. Outputs in ``--out``: the two PNGs, ``examples.json``, ``results.md``.

Usage::

    python experiments/examples.py --run RUN --manifest test/manifest.csv --split all \\
        --compare results/figure5 --out results/examples
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from spirs_tf import evaluation as ev  # noqa: E402
from spirs_tf import metrics  # noqa: E402
from spirs_tf.atomic import atomic_path, atomic_write_text  # noqa: E402
from spirs_tf.errors import SpirsInputError  # noqa: E402

CROP_MM = 60.0  #: side of the Figure 7 crops


def _baselines(compare_dir: str | None) -> dict[str, dict]:
    """``{pair_id: {"VXM": (image, mask), "ANTs": (image, mask)}}`` from a compare_registration folder."""
    if not compare_dir:
        return {}
    index_path = os.path.join(compare_dir, "arrays", "index.json")
    if not os.path.isfile(index_path):
        raise SpirsInputError("not a compare_registration output folder (no arrays/index.json)", compare_dir)
    with open(index_path, encoding="utf-8") as fh:
        index = json.load(fh)
    out = {}
    for item in index:
        stem = os.path.join(compare_dir, "arrays", item["file"][: -len(".npz")])
        found = {}
        for method, suffix, keys in (("VXM", "_vxm.npz", ("vxm_image", "vxm_mask")),
                                     ("ANTs", "_ants.npz", ("ants_image", "ants_mask"))):
            if os.path.isfile(stem + suffix):
                with np.load(stem + suffix) as z:
                    found[method] = (z[keys[0]], z[keys[1]])
        out[item["pair_id"]] = found
    return out


def _slice(vol: np.ndarray, k: int) -> np.ndarray:
    """Axial slice (array axis 2 = inferior→superior on the RAS working grid), transposed for imshow."""
    return np.asarray(vol)[:, :, k].T


def _show(ax, image, k, outlines=(), title="", box=None):
    sl = _slice(image, k)
    ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=max(float(np.percentile(image, 99.5)), 1e-6))
    for mask, colour, style in outlines:
        m = _slice(metrics.as_mask(mask), k).astype(float)
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors=colour, linewidths=1.0, linestyles=style)
    if box is not None:
        ax.set_xlim(box[0]), ax.set_ylim(box[1])
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])


def _finish(fig, title: str, path: str) -> None:
    """Wrapped title, tight layout below it, atomic PNG write."""
    import textwrap

    import matplotlib.pyplot as plt

    width = max(int(fig.get_figwidth() * 12), 40)
    lines = textwrap.wrap(title, width)
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.15 + 0.18 * len(lines)) / fig.get_figheight()))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _lesion_slice(mask: np.ndarray, largest: bool) -> tuple[int, float]:
    """(axial index through the largest/smallest lesion's centroid, its voxel count); centre if no lesion."""
    labels, n = metrics.label_lesions(mask)
    if not n:
        return mask.shape[2] // 2, 0.0
    sizes = np.bincount(labels.ravel())[1:]
    lid = int(np.argmax(sizes) if largest else np.argmin(sizes)) + 1
    k = int(round(np.argwhere(labels == lid)[:, 2].mean()))
    return k, float(sizes[lid - 1])


def figure6(cases: list[dict], baselines: dict, path: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("VXM", "ANTs") if any(m in baselines.get(c["pair_id"], {}) for c in cases)] + ["SPIRS"]
    ncol = 2 + len(methods)
    fig, axes = plt.subplots(len(cases), ncol, figsize=(2.4 * ncol, 2.9 * len(cases) + 0.4), squeeze=False)
    for row, case in zip(axes, cases):
        k, fixed_mask = case["slice"], case["fixed_mask"]
        _show(row[0], case["fixed"], k, [(fixed_mask, "r", "solid")], f"fixed {case['pair_id']}")
        _show(row[1], case["moving"], k, [(case["moving_mask"], "r", "solid")], "moving (prior)")
        warps = dict(baselines.get(case["pair_id"], {}), SPIRS=(case["spirs_image"], case["spirs_mask"]))
        for ax, m in zip(row[2:], methods):
            if m in warps:
                image, mask = warps[m]
                _show(ax, image, k, [(mask, "r", "solid"), (fixed_mask, "c", "dashed")],
                      f"{m}: DSC {metrics.dice(fixed_mask, mask):.2f}")
            else:
                ax.axis("off")
    _finish(fig, title, path)
    return methods


def figure7(picks: list[dict], path: str, title: str, spacing: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not picks:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, "no lesion detected by P2 and missed by P1", ha="center", va="center")
        ax.axis("off")
    else:
        fig, axes = plt.subplots(2, len(picks), figsize=(2.8 * len(picks), 5.4), squeeze=False)
        half = CROP_MM / spacing / 2
        for col, p in enumerate(picks):
            ci, cj, ck = p["centroid"]
            box = ((ci - half, ci + half), (cj - half, cj + half))
            for r, method in enumerate(("P1", "P2")):
                outlines = [(p[method], "r", "solid"), (p["gt"], "lime", "dashed")]
                _show(axes[r, col], p["fixed"], int(round(ck)), outlines,
                      f"{method} — {p['pair_id']}\nlesion {p['lesion_id']}, {p['volume_mm3']:.1f} mm³", box)
    _finish(fig, title, path)


def examples(args, log=print) -> dict:
    run = ev.load_run(args.run)
    source = ev.pair_source(run, args.manifest, ev.split_arg(args.split), args.pairing, args.limit)
    baselines = _baselines(args.compare)
    label = ev.data_label(args.manifest, args.synthetic)
    short = label.split(" (")[0]
    candidates, stash, first = [], {}, []
    extremes = {"largest": (None, -1.0), "smallest": (None, np.inf)}   # pair with the largest / smallest lesion
    for result in ev.iterate_pairs(run, source):
        inp, out, L = result.inputs, result.outputs, result.levels[-1]
        lesion_rows, _ = ev.segmentation_rows(result)
        p1 = {r["lesion_id"]: r for r in lesion_rows if r["method"] == "P1"}
        found = [r for r in lesion_rows if r["method"] == "P2" and r["detected"] and not p1[r["lesion_id"]]["detected"]]
        keep = {"pair_id": result.pair_id, "fixed": inp["fixed_image"], "fixed_mask": inp["fixed_mask"],
                "moving": inp["moving_image"], "moving_mask": inp["moving_mask"],
                "spirs_image": out[f"warped_image_{L}"][..., 0], "spirs_mask": out[f"warped_mask_{L}"][..., 0]}
        keep.update(ev.segmentation_masks(result))
        candidates += [dict(r, patient_id=result.patient_id) for r in found]
        sizes = [r["n_voxels"] for r in p1.values()]
        eligible = not baselines or result.pair_id in baselines     # Figure 6 only where baselines ran
        if eligible and sizes and max(sizes) > extremes["largest"][1]:
            extremes["largest"] = (result.pair_id, max(sizes))
        if eligible and sizes and min(sizes) < extremes["smallest"][1]:
            extremes["smallest"] = (result.pair_id, min(sizes))
        if eligible and len(first) < args.pairs:
            first.append(result.pair_id)                             # fill-ins when extremes coincide
        stash[result.pair_id] = keep
        wanted = {e[0] for e in extremes.values()} | set(first)
        wanted |= set(args.pair_ids or ()) | {c["pair_id"] for c in candidates}
        stash = {p: v for p, v in stash.items() if p in wanted}     # keep only what a figure may need
        log(f"examples: {result.pair_id}")
    # ---- Figure 6: the pair with the largest lesion, the pair with the smallest lesion (or the named ones)
    if args.pair_ids:
        missing = [p for p in args.pair_ids if p not in stash]
        if missing:
            raise SpirsInputError(f"pair id(s) not in the split: {', '.join(missing)}", args.manifest)
        chosen = [(p, True) for p in args.pair_ids]
    else:
        order = [(extremes["largest"][0], True), (extremes["smallest"][0], False)]
        order += [(p, True) for p in first]
        chosen = []
        for p, largest in order:
            if p and p not in [c for c, _ in chosen] and len(chosen) < args.pairs:
                chosen.append((p, largest))
    cases = []
    for p, largest in chosen:
        case = dict(stash[p])
        case["slice"], _ = _lesion_slice(case["fixed_mask"], largest)
        cases.append(case)
    methods = figure6(cases, baselines, os.path.join(args.out, "figure6.png"),
                      f"Figure 6 (data: {short}): deformable registration; red = lesion / warped prior lesion, "
                      "dashed cyan = fixed lesion")
    # ---- Figure 7: P2-only detections, micro first, one per patient
    micro = [c for c in candidates if c["size_bin"] == "micro"]
    pool = sorted(micro or candidates, key=lambda c: c["volume_mm3"])
    picks, patients = [], set()
    for c in pool:
        if c["patient_id"] not in patients and len(picks) < args.lesions:
            patients.add(c["patient_id"])
            s = stash[c["pair_id"]]
            labels, _ = metrics.label_lesions(s["fixed_mask"])
            picks.append(dict(c, centroid=(c["centroid_i"], c["centroid_j"], c["centroid_k"]), fixed=s["fixed"],
                              gt=labels == c["lesion_id"], P1=s["P1"], P2=s["P2"]))
    which = "micro lesions" if micro else ("NO micro lesion qualified; smallest lesions of any size" if candidates
                                           else "none found")
    figure7(picks, os.path.join(args.out, "figure7.png"),
            f"Figure 7 (data: {short}): detected by P2, missed by P1 — {which}", run.spacing[0])
    info = {"data": label, "pairs": len(source), "figure6_pairs": [c["pair_id"] for c in cases],
            "figure6_methods": methods, "p2_only_lesions": len(candidates), "p2_only_micro": len(micro),
            "figure7_lesions": [{k: c[k] for k in ("pair_id", "lesion_id", "volume_mm3", "size_bin")} for c in picks],
            "figure7_kind": which, "run": run.describe()}
    ev.write_info(args.out, "examples", info)
    atomic_write_text(os.path.join(args.out, "results.md"), markdown(info))
    return info


def markdown(info) -> str:
    lines = [f"#### Figures 6 and 7 — examples — data: **{info['data']}**", "",
             f"- Figure 6 (`figure6.png`): pairs {', '.join(info['figure6_pairs']) or 'none'}; "
             f"warps shown: {', '.join(info['figure6_methods'])}.",
             f"- Figure 7 (`figure7.png`): {info['p2_only_lesions']} lesions detected by P2 and missed by P1 "
             f"({info['p2_only_micro']} micro) over {info['pairs']} pairs; shown: {info['figure7_kind']}: "
             + (", ".join(f"{c['pair_id']} lesion {c['lesion_id']} ({c['volume_mm3']:.1f} mm³, {c['size_bin']})"
                          for c in info["figure7_lesions"]) or "none") + "."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ev.add_common_arguments(parser)
    parser.add_argument("--compare", help="output folder of compare_registration.py (baseline warps)")
    parser.add_argument("--pairs", type=int, default=2, help="rows of Figure 6")
    parser.add_argument("--pair-ids", nargs="+", help="pairs for Figure 6 (default: largest and smallest lesion)")
    parser.add_argument("--lesions", type=int, default=3, help="lesions in Figure 7")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        os.makedirs(args.out, exist_ok=True)
        info = examples(args)
    except SpirsInputError as exc:
        print(f"examples: error: {exc}", file=sys.stderr)
        return 2
    print(f"examples: figure 6 pairs {info['figure6_pairs']}, figure 7 {len(info['figure7_lesions'])} lesions "
          f"({info['data']}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
