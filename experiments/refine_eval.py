"""Test-time refinement (:mod:`spirs_tf.refine`) on synthetic pairs: figures before/after, and seconds.

SYNTHETIC DATA. Per (prior, new) pair of a ``spirs synth`` cohort (consecutive time points, raw pose:
the head moves between scans), the shipped network (``spirs_tf/weights/demo``, or ``--model``)
runs as in ``spirs predict`` (:func:`spirs_tf.inference.prepare_case` + ``Predictor.predict``); its
affine and DVF are the start of the refinement, on the network's working grid of the new scan
(cpu-small: 64³ at 3 mm). Rows, all on that grid:

* ``identity``: the prior as it enters the network (each scan centred on its own brain);
* ``network``: the network's affine + DVF; ``network affine``: its affine alone;
* ``refined affine``: :func:`spirs_tf.refine.refine_affine` from the network's affine, no field;
* ``refined affine + net DVF``: that affine with the network's field unchanged;
* ``full (DVF from 0)`` / ``full (DVF from net)``: then :func:`spirs_tf.refine.refine_deformable`
  starting from a zero field or from the network's field.

Figures per row (median over pairs, mean in brackets): masked LNCC (exact float64 LNCC of
:mod:`spirs_tf.metrics`, mask :func:`spirs_tf.metrics.lncc_mask` of the non-zero voxels, the warped
prior mask as the moving lesions), Dice of the warped prior mask (trilinear, ≥ 0.5) with the new
scan's mask, % folding, seconds of the refinement (first pair includes XLA compilation, reported
apart). Then each new scan registered to itself (network + full refinement): Dice of its own mask and
the LNCC drop from 1.

``--grid 128 --spacing 1.5``: instead, per pair, the network on its own grid, its affine moved onto a
128³ 1.5 mm working grid (:func:`spirs_tf.refine.grid_relation`, :func:`spirs_tf.refine.matrix_to_grid`),
then ``refine(mode="full")`` with its defaults there (or ``--deformable-levels``, e.g. ``2,1,40;1,1,8``
for a dense stage on the 1.5 mm grid itself): seconds, and LNCC / Dice before (network affine) and
after, on that grid. ``--compile-cache DIR`` keeps XLA's compiled code between runs.

Usage::

    spirs synth --patients 6 --timepoints 3 --lesions 3-8 --lesion-sizes 0,1,1,1 --pose raw --seed 11 \\
        --no-qc --out /tmp/synth
    python experiments/refine_eval.py --data /tmp/synth [--pairs 12] [--self 4]
    python experiments/refine_eval.py --demo-seeds 1-8   # the demo patients, with the true-transform ceiling

``--demo-seeds A-B``: the patients of ``spirs demo --seed N`` (128³ at 1.5 mm, head moved), each
predicted with ``--refine off``, ``affine`` and ``full``, the warped prior mask scored on the native
grid as the demo does, next to the **ceiling**: the Dice of the prior mask moved by the true transform
(and by its affine part alone). Lesions change between time points, so the ceiling is below 1 (far
below on a patient whose lesions grow or shrink a lot).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROWS = ("identity", "network affine", "network", "refined affine", "refined affine + net DVF",
        "full (DVF from 0)", "full (DVF from net)")


def _warp(volume, matrix, dvf):
    from spirs_tf import transforms

    out = transforms.compiled_warp(volume[None, ..., None].astype(np.float32),
                                   None if matrix is None else np.asarray(matrix, np.float32)[None],
                                   None if dvf is None else np.asarray(dvf, np.float32)[None])
    return np.asarray(out)[0, ..., 0]


def _figures(new, new_mask, prior, prior_mask, matrix, dvf) -> dict:
    from spirs_tf import metrics

    warped = _warp(prior, matrix, dvf)
    warped_mask = _warp(prior_mask, matrix, dvf) >= 0.5
    mask = metrics.lncc_mask(new, warped, new_mask, warped_mask)
    return {"lncc": metrics.lncc(new, warped, 9, mask=mask),
            "dice": metrics.dice(warped_mask, new_mask >= 0.5),
            "folding": 0.0 if dvf is None else metrics.folding_percent(dvf)}


def _load(pair, predictor, data_cfg):
    from spirs_tf.inference import prepare_case, read_case_inputs
    from spirs_tf.io import read_volume
    from spirs_tf.preprocess import preprocess_scan, subsample

    inputs = read_case_inputs(pair.new.image, pair.prior.image, pair.prior.mask)
    case = prepare_case(inputs, predictor)
    new_mask = preprocess_scan(inputs.new, read_volume(pair.new.mask, "mask"), predictor.cfg.data).mask
    new_mask = subsample(new_mask, predictor.subsample_factor)
    if data_cfg is None:
        return case.new_image, new_mask, case.prior_image, case.prior_mask
    n = preprocess_scan(inputs.new, read_volume(pair.new.mask, "mask"), data_cfg)
    p = preprocess_scan(inputs.prior, inputs.prior_mask, data_cfg)
    return case, (n.image, n.mask, p.image, p.mask), n.mapping


def _network(predictor, new, prior, prior_mask):
    out = predictor.predict(new[None, ..., None], prior[None, ..., None], prior_mask[None, ..., None])
    return np.asarray(out["affine"][0], np.float64), np.asarray(out["dvf"][0], np.float32), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="a spirs synth cohort folder (manifest.csv)")
    parser.add_argument("--demo-seeds", default=None, metavar="A-B",
                        help="instead: the `spirs demo` patients of these seeds, Dice on the native grid per "
                             "refinement mode next to the ceiling of the true transform")
    parser.add_argument("--model", default=None, help="model (default: the shipped demo weights)")
    parser.add_argument("--pairs", type=int, default=12, help="pairs to evaluate (default 12)")
    parser.add_argument("--self", dest="self_pairs", type=int, default=4, help="self-registration checks (default 4)")
    parser.add_argument("--grid", type=int, default=None, help="refine on this working grid instead (timing)")
    parser.add_argument("--spacing", type=float, default=None, help="spacing (mm) of --grid")
    parser.add_argument("--bending", type=float, default=None, help="bending weight λ (default: refine's)")
    parser.add_argument("--deformable-levels", default=None, metavar="F,S,N[;F,S,N...]",
                        help="deformable levels (factor, control factor, iterations), coarse to fine, e.g. "
                             "'2,1,40;1,1,8' (default: refine's, on at most 64³)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="keep XLA's compiled code in DIR (spirs_tf.xla_cache)")
    args = parser.parse_args(argv)
    if args.compile_cache:
        from spirs_tf.xla_cache import enable_compile_cache  # before TensorFlow starts

        enable_compile_cache(args.compile_cache)

    from spirs_tf import refine
    from spirs_tf.inference import load_predictor

    if args.demo_seeds:
        lo, _, hi = args.demo_seeds.partition("-")
        return _demo_seeds(load_predictor(args.model), range(int(lo), int(hi or lo) + 1))
    if not args.data:
        parser.error("--data or --demo-seeds is required")
    from spirs_tf.manifest import load_manifest, make_pairs

    predictor = load_predictor(args.model)
    pairs = make_pairs(load_manifest(os.path.join(args.data, "manifest.csv")), None, "consecutive")[:args.pairs]
    deform_opts = {} if args.bending is None else {"bending_weight": args.bending}
    if args.deformable_levels:
        deform_opts["levels"] = tuple(tuple(int(v) for v in level.split(","))
                                      for level in args.deformable_levels.split(";"))
    if args.grid:
        return _timing(predictor, pairs, args, deform_opts)
    print(f"SYNTHETIC pairs: {len(pairs)} from {args.data}; grid: network working grid "
          f"{predictor.size}³ at {predictor.cfg.data.spacing_mm * predictor.subsample_factor:g} mm "
          f"(model {predictor.info.get('config')})", flush=True)
    rows = {name: [] for name in ROWS}
    secs = {"affine": [], "deformable from 0": [], "deformable from net": []}
    check = []
    for k, pair in enumerate(pairs):
        new, new_mask, prior, prior_mask = _load(pair, predictor, None)
        a_net, u_net, out = _network(predictor, new, prior, prior_mask)
        check.append(float(np.abs(_warp(prior, a_net, u_net) - out["prior_warped"][0, ..., 0]).max()))
        fig = lambda a, u: _figures(new, new_mask, prior, prior_mask, a, u)  # noqa: E731
        rows["identity"].append(fig(None, None))
        rows["network affine"].append(fig(a_net, None))
        rows["network"].append(fig(a_net, u_net))
        ra = refine.refine_affine(new, prior, a_net, moving_mask=prior_mask)
        rows["refined affine"].append(fig(ra.matrix, None))
        rows["refined affine + net DVF"].append(fig(ra.matrix, u_net))
        r0 = refine.refine_deformable(new, prior, ra.matrix, None, moving_mask=prior_mask, **deform_opts)
        rows["full (DVF from 0)"].append(fig(ra.matrix, r0.dvf))
        rn = refine.refine_deformable(new, prior, ra.matrix, u_net, moving_mask=prior_mask, **deform_opts)
        rows["full (DVF from net)"].append(fig(ra.matrix, rn.dvf))
        secs["affine"].append(ra.seconds)
        secs["deformable from 0"].append(r0.seconds)
        secs["deformable from net"].append(rn.seconds)
        print(f"  pair {k + 1}/{len(pairs)} {pair.patient_id} {pair.prior.timepoint}->{pair.new.timepoint}: "
              f"dice net {rows['network'][-1]['dice']:.3f} aff {rows['refined affine'][-1]['dice']:.3f} "
              f"full0 {rows['full (DVF from 0)'][-1]['dice']:.3f} "
              f"fullnet {rows['full (DVF from net)'][-1]['dice']:.3f}; "
              f"{ra.seconds:.1f}+{r0.seconds:.1f} s", flush=True)
    print(f"\nnetwork outputs re-warped here vs the network's own warped prior: max |diff| {max(check):.2e}")
    print(f"\n{'row':<26} {'masked LNCC':>16} {'Dice prior mask':>18} {'folding %':>10}")
    med = lambda v: f"{np.median(v):.3f} ({np.mean(v):.3f})"  # noqa: E731
    for name, values in rows.items():
        print(f"{name:<26} {med([v['lncc'] for v in values]):>16} {med([v['dice'] for v in values]):>18} "
              f"{max(v['folding'] for v in values):>10.3f}")
    print("(folding: the maximum over pairs)")
    for name, values in secs.items():
        print(f"seconds {name:<22} first pair {values[0]:.2f} (compilation), median of the rest "
              f"{np.median(values[1:]) if len(values) > 1 else float('nan'):.2f}")

    print("\nself-registration (new scan → itself, network + refine(mode='full'), its defaults):")
    for pair in pairs[:args.self_pairs]:
        new, new_mask, _, _ = _load(pair, predictor, None)
        a_net, u_net, _ = _network(predictor, new, new, new_mask)
        matrix, dvf, _ = refine.refine(new, new, a_net, u_net, moving_mask=new_mask,
                                       deformable_options=deform_opts)
        net = _figures(new, new_mask, new, new_mask, a_net, u_net)
        ref = _figures(new, new_mask, new, new_mask, matrix, dvf)
        print(f"  {pair.patient_id} tp{pair.new.timepoint}: network Dice {net['dice']:.3f} LNCC {net['lncc']:.4f}; "
              f"refined Dice {ref['dice']:.3f} LNCC {ref['lncc']:.4f} (drop {1 - ref['lncc']:.4f}), "
              f"folding {ref['folding']:.3f} %")
    return 0


def _timing(predictor, pairs, args, deform_opts) -> int:
    """Refinement seconds on a finer working grid (the network's output upsampled as the start)."""
    from spirs_tf import config as config_lib, metrics, refine

    data_cfg = config_lib.DataConfig(**{**predictor.cfg.data.__dict__, "grid_size": args.grid,
                                        "spacing_mm": args.spacing or predictor.cfg.data.spacing_mm})
    print(f"SYNTHETIC timing on a {args.grid}³ grid at {data_cfg.spacing_mm} mm (network at {predictor.size}³), "
          f"refine(mode='full'): affine levels {refine.default_levels((args.grid,) * 3)[0]}, deformable "
          f"{deform_opts or 'defaults ' + str(refine.default_levels((args.grid,) * 3)[1])}")
    seconds, figures = [], []
    for k, pair in enumerate(pairs):
        case, (new, new_mask, prior, prior_mask), mapping = _load(pair, predictor, data_cfg)
        a_net, u_net, _ = _network(predictor, case.new_image, case.prior_image, case.prior_mask)
        # the working grids are centred, not corner aligned: fine voxel = scale · coarse voxel + offset
        scale, offset = refine.grid_relation(case.new_mapping.working_affine, mapping.working_affine)
        a0 = refine.matrix_to_grid(a_net, scale, offset)
        t0 = time.perf_counter()
        matrix, dvf, info = refine.refine(new, prior, a0, None, moving_mask=prior_mask,
                                          deformable_options=deform_opts)
        total = time.perf_counter() - t0
        seconds.append(total)
        before = _figures(new, new_mask, prior, prior_mask, a0, None)
        after = _figures(new, new_mask, prior, prior_mask, matrix, dvf)
        figures.append((before["lncc"], after["lncc"], before["dice"], after["dice"], after["folding"]))
        print(f"  pair {k + 1}: {total:.2f} s (affine {info['affine'].seconds:.2f}, deformable "
              f"{info['deformable'].seconds:.2f}); LNCC {before['lncc']:.3f} -> {after['lncc']:.3f}, "
              f"Dice {before['dice']:.3f} -> {after['dice']:.3f}, folding {metrics.folding_percent(dvf):.3f} %",
              flush=True)
    rest = np.median(seconds[1:]) if len(seconds) > 1 else float("nan")
    print(f"median seconds of pairs 2-{len(seconds)}: {rest:.2f} "
          f"(pair 1 includes the XLA compilation: {seconds[0]:.2f} s)")
    f = np.asarray(figures)
    print(f"medians: masked LNCC network affine {np.median(f[:, 0]):.3f} -> refined {np.median(f[:, 1]):.3f}; "
          f"Dice {np.median(f[:, 2]):.3f} -> {np.median(f[:, 3]):.3f}; folding max {f[:, 4].max():.3f} %")
    return 0


def ceiling_dice(patient) -> tuple[float, float]:
    """Dice of the prior mask moved by the TRUE transform (affine + displacement; affine alone) with the
    new mask, native grid (trilinear, ≥ 0.5): the best any registration can do when lesions change."""
    from scipy import ndimage

    from spirs_tf import metrics

    prior, new = (np.asarray(s.mask, np.float32) for s in patient.scans[:2])
    tr = patient.transforms[0]
    g, shape = np.asarray(tr.grid_affine, np.float64), prior.shape
    world = g[:3, :3] @ np.indices(shape, dtype=np.float64).reshape(3, -1) + g[:3, 3:4]
    affine_only = tr.world_affine[:3, :3] @ world + tr.world_affine[:3, 3:4]
    out = []
    for coords in (tr.prior_voxel_coords(), np.linalg.solve(g[:3, :3], affine_only - g[:3, 3:4]).reshape((3,) + shape)):
        warped = ndimage.map_coordinates(prior, coords, order=1, mode="constant") >= 0.5
        out.append(float(metrics.dice(warped, new >= 0.5)))
    return out[0], out[1]


def _demo_seeds(predictor, seeds) -> int:
    """Per `spirs demo` seed: the warped-prior-mask Dice on the native grid (as the demo scores it) for
    ``--refine off / affine / full``, next to the ceiling of the true transform."""
    import tempfile

    from spirs_tf import inference, io, metrics
    from spirs_tf.refinement import make_refine
    from spirs_tf.synthetic.cohort import SynthConfig, generate_patient, write_patient

    cfg = SynthConfig(grid_size=128, spacing_mm=1.5, timepoints=(2, 2), pose="raw", lesions_per_patient=(6, 12))
    modes = ("off", "affine", "full")
    table, seconds = [], {m: [] for m in modes}
    print("SYNTHETIC: the `spirs demo` patients; Dice of the warped prior mask with the new mask, native grid")
    with tempfile.TemporaryDirectory() as root:
        for seed in seeds:
            patient = generate_patient(0, seed, cfg, patient_id="demo_patient")
            rows = write_patient(patient, os.path.join(root, str(seed)), qc=False)
            path = lambda r, k: os.path.join(root, str(seed), r[k])  # noqa: E731
            truth = io.read_volume(path(rows[1], "mask"), kind="mask").data
            row = {"seed": seed, "lesion voxels": int(truth.sum())}
            row["ceiling"], row["true affine"] = ceiling_dice(patient)
            for mode in modes:
                out = os.path.join(root, str(seed), mode)
                res = inference.predict_case(predictor, path(rows[1], "image"), path(rows[0], "image"),
                                             path(rows[0], "mask"), out, refine=make_refine(mode), verbose=False)
                warped = io.read_volume(os.path.join(out, "prior_mask_warped.nii.gz"), kind="mask").data
                row[mode] = float(metrics.dice(warped, truth))
                seconds[mode].append(res.report.get("timings_s", {}).get("refine", 0.0))
            table.append(row)
            print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    for key in ("ceiling", "true affine") + modes:
        v = np.asarray([r[key] for r in table])
        print(f"{key:<12} median {np.median(v):.3f} mean {v.mean():.3f}")
    for mode in modes[1:]:
        print(f"seconds --refine {mode}: median {np.median(seconds[mode][1:] or seconds[mode]):.2f} "
              f"(first seed, with compilation: {seconds[mode][0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
