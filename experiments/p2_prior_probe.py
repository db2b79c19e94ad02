"""Does P2 use its prior on small lesions? P1 and P2 on training-distribution pairs, the prior placed by the truth.

SYNTHETIC-DATA diagnostic (issue 16). For ``--pairs`` pairs of a manifest split, augmented as in validation
(fixed generator per pair), the model's P1 and P2 are computed with the prior warped by the augmentation's
TRUE affine (``train.p2_prior = "truth"``, whatever the run was trained with), so the registration cannot be
the reason P2 misses a lesion. Each truth lesion (26-connected component of the fixed mask on the working grid)
is counted by its size in voxels, by whether the placed prior reaches it (its peak ≥ ``--prior-level``) and by
whether P1 and P2 reach 0.5 on it.

    python experiments/p2_prior_probe.py --run runs/cm9p2 --manifest runs/data/train64f/manifest.csv \\
        [--checkpoint runs/cm9p2/stage2/checkpoints/latest.npz] [--split val] [--pairs 30] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

#: lesion size classes in voxels of the working grid: [lo, hi)
VOXEL_BINS = ((1, 2), (2, 5), (5, 17), (17, None))


def probe(run: str, manifest_path: str, checkpoint: str | None = None, split: str = "val", pairs: int = 30,
          prior_level: float = 0.3) -> dict:
    """Per voxel-size class: lesions with / without the placed prior, and those P1 / P2 reach (module docstring)."""
    from scipy import ndimage

    from spirs_tf import config as config_lib
    from spirs_tf import data, train
    from spirs_tf._compat import ops
    from spirs_tf.checkpoints import find_run_checkpoint
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.manifest import load_manifest

    found, config_path, stage = find_run_checkpoint(run)
    if stage is None:
        raise SpirsInputError("--run must be a run directory with stageN/ folders", run)
    cfg = config_lib.apply_overrides(config_lib.get_config(config_path), ["train.p2_prior=truth"])
    source = data.PairSource(load_manifest(manifest_path), split, cfg.data, limit=pairs)
    levels = cfg.train.stages[stage - 1].levels
    rows = []
    with tempfile.TemporaryDirectory() as scratch:  # the trainer writes its config and checkpoint folder there
        trainer = train.Trainer(cfg, stage, source, None, scratch, init_from=checkpoint or found, verbose=0)
        for batch in data.numpy_batches(source, cfg, levels, 1, False, seed=cfg.train.seed):
            tensors = {k: ops.convert_to_tensor(v) for k, v in batch.items()}
            outputs, _ = trainer.compute_losses(tensors, training=False)
            prior = np.asarray(ops.convert_to_numpy(trainer.truth_p2_inputs(outputs, tensors)[3]))[0, ..., 0]
            p1, p2 = (np.asarray(ops.convert_to_numpy(ops.sigmoid(outputs[k])))[0, ..., 0]
                      for k in ("p1_logits", "p2_logits"))
            labels, count = ndimage.label(batch["fixed_mask"][0, ..., 0] > 0.5, np.ones((3, 3, 3)))
            for c in range(1, count + 1):
                lesion = labels == c
                rows.append((int(lesion.sum()), float(prior[lesion].max()), float(p1[lesion].max()),
                             float(p2[lesion].max())))
    result = {"pairs": len(source), "lesions": len(rows), "prior_level": prior_level, "bins": {}}
    for lo, hi in VOXEL_BINS:
        name = f"{lo}-{hi - 1}" if hi else f">={lo}"
        sel = [r for r in rows if r[0] >= lo and (hi is None or r[0] < hi)]
        entry = {}
        for key, keep in (("with_prior", lambda r: r[1] >= prior_level), ("without_prior", lambda r: r[1] < prior_level)):
            part = [r for r in sel if keep(r)]
            entry[key] = {"n": len(part), "P1": sum(r[2] >= 0.5 for r in part), "P2": sum(r[3] >= 0.5 for r in part)}
        result["bins"][name] = entry
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory (its config and, by default, best checkpoint)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--checkpoint", help="another checkpoint of the run (e.g. stage2/checkpoints/latest.npz)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--prior-level", type=float, default=0.3, help="peak of the placed prior that counts")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    from spirs_tf.errors import SpirsInputError

    try:
        result = probe(args.run, args.manifest, args.checkpoint, args.split, args.pairs, args.prior_level)
    except SpirsInputError as exc:
        print(f"p2_prior_probe: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.run}: {result['pairs']} {args.split} pairs, {result['lesions']} lesions (SYNTHETIC); "
          f"reached = probability >= 0.5 on the lesion")
    for name, entry in result["bins"].items():
        w, wo = entry["with_prior"], entry["without_prior"]
        print(f"  {name:>5} voxels  with prior n={w['n']:3d} P1 {w['P1']:3d} P2 {w['P2']:3d}   "
              f"without n={wo['n']:3d} P1 {wo['P1']:3d} P2 {wo['P2']:3d}")
    if args.json:
        from spirs_tf.atomic import atomic_write_json
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
