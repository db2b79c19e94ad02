"""Lesion detection of P1 and P2 in the case folders of ``spirs predict --manifest``, against the truth masks.

SYNTHETIC-DATA tool (or any cohort with lesion masks of the new scans). For every case folder of a
cohort output (named by :func:`spirs_tf.cohort_predict.case_name` from its manifest pair), the new scan's mask
is the truth; ``p1_mask.nii.gz`` and ``p2_mask.nii.gz`` (written on the new scan's grid) are the predictions. Each truth
lesion (26-connected component) is detected by a method when a predicted component overlaps it
(:func:`spirs_tf.metrics.lesion_table`, the rule of ``experiments/evaluate.py``). Printed per size bin:
lesions found by P1 and by P2, found by one only, and the exact McNemar p (two-sided binomial test on
the discordant lesions); and the false-positive components per scan. ``in_warped_prior``: lesions that the
case's ``prior_mask_warped.nii.gz`` overlaps (where the registered prior points at them). Unlike ``evaluate.py``, this
scores what ``spirs predict`` wrote, i.e. P2 computed from the registration it used (refined by default).

The McNemar p of the four size bins are also Holm-adjusted as one family (``mcnemar_p_holm``).

With ``--synthetic-lesions COHORT/lesions.csv`` (a ``spirs synth`` cohort: lesion ids in
``lesions.nii.gz`` next to each mask, stable across time points) the lesions are also counted by what the
prior says of them: ``with_prior`` (present in the prior scan), of those ``faded`` (rendered faint in the
new scan, ``contrast`` < 1), and ``new`` (absent from the prior scan) — where P2 should gain, and where it
must not lose.

Usage::

    spirs predict --manifest M.csv --split S --out OUT
    python experiments/score_cohort_lesions.py --manifest M.csv --cases OUT [--json OUT/lesions_p1_p2.json]
        [--synthetic-lesions COHORT/lesions.csv] [--markdown TABLE1.md [--title "#### ..."]] [--figure7 PNG]

``--markdown`` writes Table 1 (sensitivity per size bin with exact intervals, McNemar and Holm p, false
positives per scan) and names the registration each case's P2 came from (its ``report.json``);
``experiments/make_results.sh`` makes it from ``spirs predict``'s default (refined) registration.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

BINS = ("micro", "small", "medium", "large")
#: lesion groups of ``--synthetic-lesions`` (module docstring)
PRIOR_GROUPS = ("with_prior", "faded", "new")


def _synthetic_lesions(path: str) -> dict:
    """``{(patient, timepoint): {lesion id: (volume_mm3, contrast)}}`` of a ``spirs synth`` lesions.csv."""
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.manifest import parse_timepoint
    from spirs_tf.stats import parse_float, read_csv

    table: dict = {}
    for row in read_csv(path, ("patient_id", "timepoint", "lesion_id", "volume_mm3", "contrast")):
        try:
            key = (row["patient_id"], parse_timepoint(row["timepoint"]))
            lesion = int(row["lesion_id"])
        except ValueError as exc:
            raise SpirsInputError(f"line {row['_line']}: {exc}", path) from None
        table.setdefault(key, {})[lesion] = (parse_float(row, "volume_mm3", path, allow_empty=False),
                                             parse_float(row, "contrast", path, allow_empty=False))
    return table


def _prior_groups(pair, labels, count: int, synthetic: dict) -> dict:
    """``{truth component id: [groups]}``: each 26-connected truth lesion (``labels``, ``count`` of
    :func:`spirs_tf.metrics.label_lesions`) named by the synthetic lesion id most of its voxels carry in
    ``lesions.nii.gz`` next to the new scan's mask."""
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.io import read_volume

    ids_path = os.path.join(os.path.dirname(pair.new.mask), "lesions.nii.gz")
    if not os.path.isfile(ids_path):
        raise SpirsInputError("--synthetic-lesions needs the lesion-id map lesions.nii.gz next to the mask",
                              pair.new.mask)
    ids = np.rint(read_volume(ids_path, "labels").data).astype(np.int64)
    before = synthetic.get((pair.prior.patient_id, pair.prior.timepoint), {})
    now = synthetic.get((pair.new.patient_id, pair.new.timepoint), {})
    groups = {}
    for cid in range(1, count + 1):
        inside = ids[(labels == cid) & (ids > 0)]
        if not inside.size:
            raise SpirsInputError(f"lesion {cid} of the mask has no id in lesions.nii.gz", pair.new.mask)
        lesion = int(np.bincount(inside).argmax())
        if before.get(lesion, (0.0, 1.0))[0] > 0:
            groups[cid] = ["with_prior"] + (["faded"] if now.get(lesion, (0.0, 1.0))[1] < 1.0 else [])
        else:
            groups[cid] = ["new"]
    return groups


def _in_warped_prior(folder: str, labels) -> dict:
    """``{truth component id: overlaps prior_mask_warped.nii.gz}`` (empty when the case has no such file)."""
    from spirs_tf.io import read_volume

    path = os.path.join(folder, "prior_mask_warped.nii.gz")
    if not os.path.isfile(path):
        return {}
    prior = read_volume(path, "mask").data > 0.5
    return {int(c): True for c in np.unique(labels[prior & (labels > 0)])}


def _p2_registration(folder: str) -> str:
    """What the case's P2 was computed from, as its ``report.json`` says: ``refined (full)``,
    ``refined (affine)``, ``network`` or ``unknown`` (no report, or one without the field)."""
    import json

    try:
        with open(os.path.join(folder, "report.json"), encoding="utf-8") as fh:
            refinement = json.load(fh)["registration"]["refinement"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    if refinement.get("applied") and refinement.get("p2_from") == "refined registration":
        return f"refined ({refinement.get('mode')})"
    return "network"


def table1_markdown(result: dict, title: str = "") -> str:
    """Table 1 of the paper from :func:`score`: per size bin, sensitivity of P1 and P2 with exact 95 %
    intervals, the discordant lesions, the exact McNemar p and its Holm adjustment over the bins; false
    positives per scan; what P2's registration was."""
    from spirs_tf.stats import binomial_ci

    def pct(k, n):
        if not n:
            return "–"
        lo, hi = binomial_ci(k, n)
        return f"{100 * k / n:.0f} % ({100 * lo:.0f}–{100 * hi:.0f})"

    lines = [title, ""] if title else []
    lines += ["| lesions | n | P1 sensitivity (95 % CI) | P2 sensitivity (95 % CI) | P1 only | P2 only | "
              "McNemar p | Holm p |", "|---|---|---|---|---|---|---|---|"]
    for b, r in result["bins"].items():
        holm = f"{r['mcnemar_p_holm']:.2g}" if "mcnemar_p_holm" in r else ""
        lines.append(f"| {b} | {r['n']} | {pct(r['P1'], r['n'])} | {pct(r['P2'], r['n'])} | {r['P1_only']} | "
                     f"{r['P2_only']} | {r['mcnemar_p']:.2g} | {holm} |")
    fp = result["false_positives_per_scan"]
    regs = ", ".join(f"{k}: {v}" for k, v in result.get("p2_registration", {}).items())
    lines += ["", f"False-positive components per scan: P1 {fp['P1']:.2f}, P2 {fp['P2']:.2f}. "
              f"{result['cases']} cases, {result['lesions']} lesions; P2 from the registration `spirs predict` "
              f"used ({regs}). Lesions detected when a predicted component overlaps them; exact McNemar on "
              "the discordant lesions, Holm over the four size bins."]
    return "\n".join(lines) + "\n"


def _counts(rows: list) -> dict:
    from spirs_tf.stats import mcnemar_exact

    only1 = sum(r["P1"] and not r["P2"] for r in rows)
    only2 = sum(r["P2"] and not r["P1"] for r in rows)
    return {"n": len(rows), "P1": sum(r["P1"] for r in rows), "P2": sum(r["P2"] for r in rows),
            "P1_only": only1, "P2_only": only2,
            "mcnemar_p": mcnemar_exact([r["P1"] for r in rows], [r["P2"] for r in rows]).pvalue if rows else 1.0,
            "in_warped_prior": sum(r.get("in_prior", False) for r in rows)}


def score(manifest_path: str, cases_dir: str, synthetic_lesions: str | None = None) -> dict:
    """Per-bin detection counts of P1 and P2 and false positives per scan (module docstring)."""
    from spirs_tf import metrics
    from spirs_tf.cohort_predict import case_name
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.io import read_volume
    from spirs_tf.manifest import load_manifest, make_pairs

    manifest = load_manifest(manifest_path)
    synthetic = _synthetic_lesions(synthetic_lesions) if synthetic_lesions else None
    # every (prior, new) pair the manifest can form, by the folder name spirs predict gives it
    pairs = {case_name(p): p for p in make_pairs(manifest, None, "all", both_directions=True)}
    lesions, false_pos, registrations = [], {"P1": [], "P2": []}, []
    for case in sorted(os.listdir(cases_dir)):
        folder = os.path.join(cases_dir, case)
        if not os.path.isfile(os.path.join(folder, "p1_mask.nii.gz")):
            continue
        if case not in pairs or pairs[case].new.mask is None:
            raise SpirsInputError(f"case {case}: no pair of the manifest with a mask of its new scan is named so",
                                  manifest_path)
        gt_volume = read_volume(pairs[case].new.mask, "mask")
        gt = gt_volume.data > 0.5
        spacing = tuple(np.linalg.norm(np.asarray(gt_volume.affine)[:3, :3], axis=0))
        found = {}
        for method in ("P1", "P2"):
            pred = read_volume(os.path.join(folder, f"{method.lower()}_mask.nii.gz"), "mask").data > 0.5
            if pred.shape != gt.shape:
                raise SpirsInputError(f"{method.lower()}_mask is not on the new scan's grid ({pred.shape} vs "
                                      f"{gt.shape})", folder)
            found[method] = {r["lesion_id"]: (r["size_bin"], bool(r["detected"]))
                             for r in metrics.lesion_table(gt, pred, spacing)}
            false_pos[method].append(len(metrics.false_positive_components(gt, pred, spacing)))
        labels, count = metrics.label_lesions(gt)  # the components lesion_table numbers (its lesion_id)
        groups = _prior_groups(pairs[case], labels, count, synthetic) if synthetic is not None else {}
        in_prior = _in_warped_prior(folder, labels)
        registrations.append(_p2_registration(folder))
        centres = {}
        if any(found["P2"][lid][1] and not p1 for lid, (_, p1) in found["P1"].items()):
            from scipy import ndimage

            centres = {i + 1: tuple(int(round(c)) for c in xyz) for i, xyz in
                       enumerate(ndimage.center_of_mass(gt, labels, range(1, count + 1)))}
        for lid, (size_bin, p1) in found["P1"].items():
            lesions.append({"case": case, "lesion_id": lid, "bin": size_bin, "P1": p1, "P2": found["P2"][lid][1],
                            "groups": groups.get(lid, []), "in_prior": in_prior.get(lid, False)})
            if lid in centres and lesions[-1]["P2"] and not p1:  # what figure7 shows of it
                lesions[-1].update(centre_voxel=centres[lid], patient_id=pairs[case].new.patient_id,
                                   new_image=pairs[case].new.image, new_mask=pairs[case].new.mask)
    if not false_pos["P1"]:
        raise SpirsInputError("no case folders with p1_mask.nii.gz", cases_dir)
    result = {"cases": len(false_pos["P1"]), "lesions": len(lesions), "bins": {},
              "p2_only": [r for r in lesions if r["P2"] and not r["P1"]],
              "false_positives_per_scan": {m: float(np.mean(v)) for m, v in false_pos.items()},
              "p2_registration": {k: registrations.count(k) for k in sorted(set(registrations))}}
    for b in BINS + ("all",):
        result["bins"][b] = _counts([r for r in lesions if b == "all" or r["bin"] == b])
    from spirs_tf.stats import holm

    tested = [b for b in BINS if result["bins"][b]["n"]]
    for b, p in zip(tested, holm([result["bins"][b]["mcnemar_p"] for b in tested])):
        result["bins"][b]["mcnemar_p_holm"] = float(p)
    if synthetic is not None:
        result["prior_groups"] = {
            g: {b: _counts([r for r in lesions if g in r["groups"] and (b == "all" or r["bin"] == b)])
                for b in BINS + ("all",)} for g in PRIOR_GROUPS}
    return result


def figure7(result: dict, cases_dir: str, out_png: str, count: int = 3) -> int:
    """Figure 7 from ``spirs predict``'s outputs and :func:`score`'s result (its ``p2_only`` rows name
    their patient and new scan): lesions P2 found and P1 missed, micro first, at most one per patient.
    Each lesion: the new scan's axial slice through its centre, P1's mask (left) and P2's (right) in red,
    the truth dashed green. Returns the number of lesions shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spirs_tf.atomic import atomic_path
    from spirs_tf.io import read_volume

    chosen, patients = [], set()
    for b in BINS:
        for r in result["p2_only"]:
            patient = r["patient_id"]
            if r["bin"] == b and patient not in patients and len(chosen) < count:
                chosen.append(r)
                patients.add(patient)
    fig, axes = plt.subplots(max(1, len(chosen)), 2, figsize=(6, 3 * max(1, len(chosen))), squeeze=False)
    if not chosen:
        axes[0, 0].text(0.5, 0.5, "no lesion found by P2 and missed by P1", ha="center")
    for row, r in zip(axes, chosen):
        folder = os.path.join(cases_dir, r["case"])
        image = read_volume(r["new_image"]).data
        truth = read_volume(r["new_mask"], "mask").data > 0.5
        x, y, z = r["centre_voxel"]
        h = 20
        box = (slice(max(0, x - h), x + h), slice(max(0, y - h), y + h), z)
        for ax, method in zip(row, ("P1", "P2")):
            pred = read_volume(os.path.join(folder, f"{method.lower()}_mask.nii.gz"), "mask").data > 0.5
            ax.imshow(image[box].T, cmap="gray", origin="lower")
            if pred[box].any():
                ax.contour(pred[box].T.astype(float), [0.5], colors="red", linewidths=1)
            ax.contour(truth[box].T.astype(float), [0.5], colors="lime", linewidths=1, linestyles="dashed")
            ax.set_title(f"{r['case']} lesion {r['lesion_id']} ({r['bin']}): {method}", fontsize=7)
            ax.axis("off")
    fig.suptitle("SYNTHETIC: lesions found by P2 (with the prior) and missed by P1", fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return len(chosen)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="the manifest spirs predict read")
    parser.add_argument("--cases", required=True, help="spirs predict --manifest output folder")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--markdown", metavar="MD", help="write Table 1 (sensitivity per size bin) here")
    parser.add_argument("--title", default="", help="a heading line for --markdown")
    parser.add_argument("--synthetic-lesions", metavar="CSV",
                        help="a spirs synth cohort's lesions.csv: also count lesions with a prior, faded ones "
                             "and new ones")
    parser.add_argument("--figure7", metavar="PNG", help="draw lesions P2 found and P1 missed (micro first)")
    args = parser.parse_args(argv)
    from spirs_tf.errors import SpirsInputError

    try:
        result = score(args.manifest, args.cases, args.synthetic_lesions)
    except SpirsInputError as exc:
        print(f"score_cohort_lesions: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.cases}: {result['cases']} cases, {result['lesions']} lesions")
    for b, r in result["bins"].items():
        if r["n"]:
            holm_p = f" (Holm {r['mcnemar_p_holm']:.2g})" if "mcnemar_p_holm" in r else ""
            print(f"  {b:<7} n={r['n']:4d}  P1 {r['P1']:3d}  P2 {r['P2']:3d}  P1 only {r['P1_only']:3d}  "
                  f"P2 only {r['P2_only']:3d}  McNemar p = {r['mcnemar_p']:.2g}{holm_p}")
    for g, bins in result.get("prior_groups", {}).items():
        for b, r in bins.items():
            if r["n"]:
                print(f"  {g:<10} {b:<7} n={r['n']:4d}  P1 {r['P1']:3d}  P2 {r['P2']:3d}  P1 only {r['P1_only']:3d}  "
                      f"P2 only {r['P2_only']:3d}  McNemar p = {r['mcnemar_p']:.2g}  "
                      f"in the warped prior {r['in_warped_prior']}")
    fp = result["false_positives_per_scan"]
    print(f"  false-positive components per scan: P1 {fp['P1']:.2f}, P2 {fp['P2']:.2f}")
    print(f"  P2 from: {', '.join(f'{k} ({v} cases)' for k, v in result['p2_registration'].items())}")
    if args.json:
        from spirs_tf.atomic import atomic_write_json
        atomic_write_json(args.json, result)
    if args.markdown:
        from spirs_tf.atomic import atomic_write_text
        atomic_write_text(args.markdown, table1_markdown(result, args.title))
    if args.figure7:
        shown = figure7(result, args.cases, args.figure7)
        print(f"  Figure 7: {shown} lesion(s) found by P2 and missed by P1 in {args.figure7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
