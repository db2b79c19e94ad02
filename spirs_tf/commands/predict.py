"""``spirs predict``: register a prior scan to a new scan and segment the new scan's metastases.

One case::

    spirs predict --new NEW --prior PRIOR --prior-mask MASK --out DIR [--model RUN_OR_SAVEDMODEL]

A cohort (one folder per (prior, new) pair of a manifest split, resumable)::

    spirs predict --manifest M --split test --out DIR [--model RUN_OR_SAVEDMODEL]

``--model`` is a run directory (highest stage, best checkpoint), a checkpoint ``.npz`` or a SavedModel
folder from ``spirs export``; without it the shipped demo weights are used, if any. Every image output is
on the new scan's original grid; see ``report.json`` in each case folder (its ``warnings`` list flags a
suspect registration or input; each is also printed as ``spirs: warning: ...``). Not for clinical use.

``--refine`` (default ``full``) refines the network's registration on this very pair before the
outputs are written (test-time optimisation, beyond the paper): ``affine`` optimises the 12 affine
parameters (masked LNCC), ``full`` then a smooth dense displacement field; ``off`` is the paper's pure
network. It costs about 5-10 s per case on a CPU, plus XLA's compilation for the first case (10-20 s; cached
on disk in ~/.cache/spirs-tf/xla, relocate or turn off with SPIRS_XLA_CACHE=DIR|off). report.json
records the mode, seconds per stage and the LNCC before/after the refinement.

``--segmenter DIR`` (beyond the paper; ``experiments/train_segmenter.py``) takes P1 and P2 from a segmenter
trained on a grid finer than the model's (e.g. 1.5 mm for the 3 mm CPU models, where micro lesions are
several voxels), with the prior placed by the registration used; report.json's ``segmentation`` block
names it.

``--transforms`` chooses the transform files: ``itk`` (default) writes ``affine.tfm`` and a compact
``deformation.nii.gz`` (a few MB) that ITK/ANTs/SimpleITK apply exactly; ``all`` adds
``transform_total.nii.gz`` and stores both fields on the new scan's own grid (~70 MB each for a
6-megavoxel scan); ``none`` writes no transform file.
"""
from __future__ import annotations

import argparse

from spirs_tf.errors import SpirsInputError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="predict one (prior, new) pair or a manifest cohort",
                                   description=__doc__.replace("``", "").replace("::", ":"),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    one = parser.add_argument_group("one case")
    one.add_argument("--new", help="new (follow-up) scan: NIfTI, NRRD, MetaImage or a DICOM folder")
    one.add_argument("--prior", help="prior scan")
    one.add_argument("--prior-mask", help="binary lesion mask of the prior scan (same grid as --prior)")
    cohort = parser.add_argument_group("cohort")
    cohort.add_argument("--manifest", help="manifest CSV (see data_manifests/README.md)")
    cohort.add_argument("--split", default="test",
                        help="manifest split to predict (default: test; all: every patient of the manifest)")
    cohort.add_argument("--pairing", choices=("consecutive", "all"), default="consecutive",
                        help="which (prior, new) pairs per patient (default: consecutive time points)")
    cohort.add_argument("--batch-size", type=int, default=1, help="cases per forward pass (default 1)")
    parser.add_argument("--out", required=True, help="case folder (one case) or cohort folder")
    parser.add_argument("--model", default=None, help="run directory, checkpoint .npz or SavedModel folder "
                                                      "(default: shipped demo weights)")
    parser.add_argument("--transforms", choices=("itk", "all", "none"), default="itk",
                        help="transform files: itk = affine.tfm + compact deformation.nii.gz (default); all = "
                             "also transform_total.nii.gz, fields on the new scan's grid; none = no transform file")
    parser.add_argument("--refine", default=None, metavar="{off,affine,full}",
                        help="test-time refinement of the registration: full = affine + dense field (default), "
                             "affine = affine only, off = the network alone (the paper)")
    parser.add_argument("--affine-passes", type=int, default=None, metavar="K",
                        help="network passes: the prior, warped by the affine found so far, is registered again "
                             "K-1 times (default: the model's config, model.affine_passes; 1 = the paper)")
    parser.add_argument("--affine-symmetric", choices=("on", "off"), default=None,
                        help="on: each pass's affine is the mean of the network's answer and the inverse of its "
                             "answer with the scans swapped, which cancels its bias (2K+1 network runs); "
                             "default: the model's config, model.affine_symmetric (off = the paper)")
    parser.add_argument("--segmenter", default=None, metavar="DIR",
                        help="P1 and P2 from this segmenter (folder of experiments/train_segmenter.py, or its "
                             ".npz) on its finer grid, the prior placed by the registration used (refined by "
                             "default); 'off' = the model's own P1/P2 (default: the shipped segmenter with the "
                             "demo weights, if any; the one exported with a SavedModel --model; none with "
                             "other --model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing case folder (one case)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def _load(args: argparse.Namespace):
    """The predictor of ``--model`` with ``--affine-passes``, ``--affine-symmetric`` and ``--segmenter`` applied."""
    from spirs_tf import inference

    predictor = inference.load_predictor(args.model)
    predictor.affine_passes = args.affine_passes
    if args.affine_symmetric is not None:
        predictor.affine_symmetric = args.affine_symmetric == "on"
    if args.segmenter == "off":
        predictor.segmenter = None
    elif args.segmenter:
        from spirs_tf.fine_seg_inference import check_segmenter_fits, load_segmenter

        predictor.segmenter = load_segmenter(args.segmenter)
        check_segmenter_fits(predictor.segmenter, predictor.cfg)
    return predictor


def run(args: argparse.Namespace) -> int:
    from spirs_tf import cohort_predict, inference
    from spirs_tf.refinement import DEFAULT_REFINE, check_mode, make_refine

    refine = check_mode(args.refine if args.refine is not None else DEFAULT_REFINE)
    if args.affine_passes is not None and args.affine_passes < 1:
        raise SpirsInputError(f"--affine-passes must be >= 1, got {args.affine_passes}")
    single = [args.new, args.prior, args.prior_mask]
    if args.manifest:
        if any(single):
            raise SpirsInputError("give either --manifest or --new/--prior/--prior-mask, not both")
        if args.batch_size < 1:
            raise SpirsInputError(f"--batch-size must be >= 1, got {args.batch_size}")
        from spirs_tf.manifest import load_manifest, make_pairs

        manifest = load_manifest(args.manifest)  # manifest problems are reported before the model loads
        split = None if args.split == "all" else args.split  # as the experiment scripts read "all"
        make_pairs(manifest, split, args.pairing)
        predictor = _load(args)
        rows = cohort_predict.predict_cohort(predictor, manifest, split, args.out, pairing=args.pairing,
                                             batch_size=args.batch_size, verbose=not args.quiet,
                                             transforms=args.transforms, refine=refine)
        failed = [r for r in rows if r["status"] == "error"]
        if failed:
            raise SpirsInputError(f"{len(failed)} of {len(rows)} case(s) failed, first: {failed[0]['message']} "
                                  "(see cohort_summary.csv)", args.out)
        return 0
    if not all(single):
        missing = [f for f, v in zip(("--new", "--prior", "--prior-mask"), single) if not v]
        raise SpirsInputError(f"missing {', '.join(missing)} (or use --manifest for a cohort)")
    inputs = inference.read_case_inputs(args.new, args.prior, args.prior_mask)  # validate before loading
    inference.check_out_dir(args.out, [args.new, args.prior, args.prior_mask], args.overwrite)
    predictor = _load(args)
    # a mode string shows the refinement's progress; --quiet: the same refinement without it (warnings stay)
    result = inference.run_case(predictor, inputs, args.out, overwrite=args.overwrite, transforms=args.transforms,
                                refine=make_refine(refine) if args.quiet and refine != "off" else refine)
    if not args.quiet:
        reg, les = result.report["registration"], result.report["lesions"]
        print(f"spirs: wrote {result.out_dir} ({len(result.files)} files); LNCC {reg['lncc']:.3f} "
              f"(before {reg['lncc_identity']:.3f}), folding {reg['folding_percent']:.2f} %, "
              f"{les['p2_lesions']} lesion(s): " + ", ".join(f"{k} {v}" for k, v in les["changes"].items() if v)
              + (f"; {len(result.report['warnings'])} warning(s)" if result.report["warnings"] else ""))
        ref = reg.get("refinement") or {}
        if ref.get("applied"):
            print(f"spirs: refinement {ref['mode']}: LNCC {ref['lncc_before']:.3f} (network) -> "
                  f"{ref['lncc_after']:.3f} in {ref['seconds']:.1f} s")
    return 0
