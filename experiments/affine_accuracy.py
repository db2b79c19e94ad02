"""How well does the network's affine head recover a known affine? Slope and correlation, predicted vs true.

SYNTHETIC DATA. Each held-out pair of a manifest split (default ``test``; pre-aligned pairs such as
``spirs synth --pose aligned``) is moved by a random affine drawn as in training
(:func:`spirs_tf.augment.augment_pair`, the config's ``augment`` settings without the near-identity
share ``augment.near_identity_probability``, so that runs trained with and without it meet the same
pairs; generator ``[seed, 7, 0, k]`` for sample ``k``: a stream that training (0) and validation (1)
never draw). The
network (eval mode, its finest level) predicts the affine ``[M̂ | t̂]`` that undoes it; the truth is
``[M | t]`` (the augmentation's own matrix, translation in voxels of the model's finest grid).

Reported, pooled over samples:

* ``linear``: the nine entries of ``M − I`` (rotation, scale and shear together), predicted against
  true: least-squares slope of predicted on true, Pearson correlation;
* ``rotation``: the rotation vector (axis · angle, degrees) of the polar factor of ``M`` and ``M̂``;
* ``scale``: the singular values of ``M`` and ``M̂`` minus 1;
* ``translation``: the three entries of ``t`` (voxels);
* the root mean squared displacement error over the fixed brain (voxels of the finest grid and mm)
  of the identity, of the network's affine, and its median over samples;
* the masked LNCC of the fixed image with the moving one, unwarped and warped by the network's affine.

Issue 15's target: slope ≥ 0.8 and correlation ≥ 0.9 for the linear part and for translation.

Usage::

    spirs synth --patients 48 --out runs/data/train64r --grid 64 --spacing 3 --pose aligned --seed 2026 ...
    python experiments/affine_accuracy.py --model runs/cm3 --manifest runs/data/train64r/manifest.csv \\
        --pairs 32 --json runs/cm3/affine_accuracy.json
    python experiments/affine_accuracy.py --model spirs_tf/weights/demo.npz \\
        --config spirs_tf/weights/demo.json --manifest runs/data/train64r/manifest.csv
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: The augmentation stream of this script's samples (training draws stream 0, validation 1).
AFFINE_TEST_STREAM = 7
#: the seed of those samples (the script's --seed default; the GPU recipe's held-out figures)
AFFINE_TEST_SEED = 2027


def slope_correlation(true: np.ndarray, pred: np.ndarray) -> dict:
    """Least-squares slope of ``pred`` on ``true`` (with intercept) and Pearson's r, over all entries."""
    x, y = np.ravel(true).astype(np.float64), np.ravel(pred).astype(np.float64)
    if x.size < 3 or np.std(x) == 0:
        return {"slope": float("nan"), "correlation": float("nan"), "n": int(x.size)}
    xc, yc = x - x.mean(), y - y.mean()
    slope = float(np.dot(xc, yc) / np.dot(xc, xc))
    corr = float(np.dot(xc, yc) / np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))) if np.any(yc) else float("nan")
    return {"slope": slope, "correlation": corr, "n": int(x.size)}


def polar_parts(linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rotation vector in degrees, singular values)`` of a 3×3 linear map
    (:func:`spirs_tf.qc.polar_decomposition`)."""
    from spirs_tf.qc import polar_decomposition

    rot, s, u, vt = polar_decomposition(linear)
    if np.linalg.det(rot) < 0:  # not expected for these maps; keep a proper rotation
        u[:, -1] *= -1
        rot = u @ vt
    angle = np.arccos(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0))
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    norm = np.linalg.norm(axis)
    vec = np.zeros(3) if norm < 1e-12 else axis / norm * angle
    return np.rad2deg(vec), s


def rms_displacement(error: np.ndarray, mask: np.ndarray) -> float:
    """Root mean squared length of ``error · [x − c; 1]`` over the voxels of ``mask`` (centre ``c``:
    :func:`spirs_tf.geometry.grid_centre`)."""
    from spirs_tf.geometry import grid_centre

    idx = np.argwhere(mask > 0.5).astype(np.float64)
    if len(idx) == 0:
        return float("nan")
    x = idx - grid_centre(mask.shape)
    d = x @ error[:, :3].T + error[:, 3]
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1))))


def measure(run, source, samples: int, seed: int, augment, passes: int = 1, symmetric: bool = False,
            deadline: float | None = None) -> dict:
    """The figures of this script for ``run`` (:func:`spirs_tf.predictor.load_run`) on ``samples`` augmented
    pairs of ``source`` (a :class:`spirs_tf.data.PairSource`; pairs reused when it has fewer), drawn with
    ``augment`` from stream :data:`AFFINE_TEST_STREAM`, without its near-identity share (the pairs span the
    whole range, whatever share the run trained on). ``deadline`` (``time.time()`` seconds): no new pair
    starts after it, so ``samples`` in the result can be smaller (0: every figure NaN).
    """
    from spirs_tf import data, metrics
    from spirs_tf.geometry import warp_working

    augment = dataclasses.replace(augment, near_identity_probability=0.0)
    cfg, size, levels = run.cfg, run.size, run.levels
    predictor = run.predictor()
    spacing = run.spacing[0]
    rows, t0 = [], time.time()
    for k in range(samples):
        if deadline is not None and time.time() >= deadline:
            break
        sample = data.make_sample(source, (k % len(source), AFFINE_TEST_STREAM, 0, k), seed, augment, size)
        out = predictor.predict(*(sample[name][None] for name in data.MODEL_INPUT_KEYS), passes=passes,
                                symmetric=symmetric)
        pred = np.asarray(out["affine"][0], np.float64)
        true = np.asarray(sample["true_affine"], np.float64)
        fixed, moving = sample["fixed_image"][..., 0], sample["moving_image"][..., 0]
        warped = warp_working(moving, pred, None)
        brain = fixed > 0
        rot_t, sv_t = polar_parts(true[:, :3])
        rot_p, sv_p = polar_parts(pred[:, :3])
        rows.append({
            "true": true, "pred": pred, "rot_t": rot_t, "rot_p": rot_p, "sv_t": sv_t, "sv_p": sv_p,
            "rms_identity": rms_displacement(true - np.eye(3, 4), brain),
            "rms_network": rms_displacement(pred - true, brain),
            "lncc_identity": metrics.lncc(fixed, moving, mask=metrics.lncc_mask(fixed, moving)),
            "lncc_network": metrics.lncc(fixed, warped, mask=metrics.lncc_mask(fixed, warped)),
        })
    seconds = time.time() - t0

    def stack(key, part=None):
        return np.stack([r[key] if part is None else r[key][part] for r in rows])

    result = {
        "config": cfg.name, "levels": levels, "grid": size, "passes": passes, "symmetric": symmetric,
        "fixed_pose_probability": augment.fixed_pose_probability, "spacing_mm": spacing,
        "samples": len(rows), "seed": seed, "seconds": seconds,
    }
    parts = ("linear", "rotation", "scale", "translation")
    if rows:
        lin, eye = (slice(None), slice(0, 3)), np.eye(3)
        pairs = [(stack("true", lin) - eye, stack("pred", lin) - eye), (stack("rot_t"), stack("rot_p")),
                 (stack("sv_t") - 1, stack("sv_p") - 1),
                 (stack("true", (slice(None), 3)), stack("pred", (slice(None), 3)))]
    else:  # no pair before the deadline: every figure NaN
        pairs = [(np.zeros(0), np.zeros(0))] * len(parts)
    result.update({part: slope_correlation(*xy) for part, xy in zip(parts, pairs)})
    for key in ("rms_identity", "rms_network", "lncc_identity", "lncc_network"):
        values = np.array([r[key] for r in rows], np.float64)
        result[key] = {"median": float(np.nanmedian(values)) if rows else float("nan"),
                       "mean": float(np.nanmean(values)) if rows else float("nan")}
    result["rms_identity_mm"] = result["rms_identity"]["median"] * spacing
    result["rms_network_mm"] = result["rms_network"]["median"] * spacing
    result["target_met"] = bool(all(result[p]["slope"] >= 0.8 and result[p]["correlation"] >= 0.9
                                    for p in ("linear", "translation")))
    return result


def held_out(run_dir: str, manifest, samples: int, deadline: float | None = None,
             seed: int = AFFINE_TEST_SEED) -> dict:
    """:func:`measure` for the best weights of a run's last stage (:func:`spirs_tf.predictor.load_run`) on
    ``samples`` augmented pairs of ``manifest``'s test split (else its validation split), the fixed image
    upright, with a one-line ``summary``; ``{"skipped": reason}`` when the manifest has neither split.
    The GPU recipe's step 5 (``experiments/gpu/recipe.py``)."""
    from spirs_tf import data
    from spirs_tf.predictor import load_run

    run = load_run(run_dir)
    for split in ("test", "val"):
        source = data.PairSource(manifest, split, run.cfg.data) if split in manifest.splits() else []
        if len(source):
            break
    else:
        return {"skipped": "the cohort has no test or validation pairs"}
    augment = dataclasses.replace(run.cfg.augment, fixed_pose_probability=0.0)
    acc = {"split": split, "pairs_in_split": len(source), **measure(run, source, samples, seed, augment,
                                                                     deadline=deadline)}
    acc["summary"] = (
        f"SYNTHETIC, {acc['samples']} augmented pairs of split {split!r}, upright fixed image: linear slope "
        f"{acc['linear']['slope']:.3f} r {acc['linear']['correlation']:.3f}, translation slope "
        f"{acc['translation']['slope']:.3f} r {acc['translation']['correlation']:.3f}, RMS error "
        f"{acc['rms_network_mm']:.1f} mm (identity {acc['rms_identity_mm']:.1f} mm), target "
        f"{'met' if acc['target_met'] else 'NOT met'}")
    return acc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="run directory or checkpoint .npz")
    parser.add_argument("--config", help="config file of a checkpoint whose config.json is not beside it")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--pairs", type=int, default=32, help="samples (pairs are reused if the split has fewer)")
    parser.add_argument("--seed", type=int, default=AFFINE_TEST_SEED)
    parser.add_argument("--fixed-pose", type=float, default=None, metavar="P",
                        help="pose the fixed image too with probability P (augment.fixed_pose_probability; "
                             "default: the model's config). 1 = pairs in which neither scan is upright")
    parser.add_argument("--passes", type=int, default=1, help="network passes (model.affine_passes; default 1)")
    parser.add_argument("--symmetric", action="store_true",
                        help="symmetric passes (model.affine_symmetric, spirs predict --affine-symmetric on)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    from spirs_tf import data
    from spirs_tf.errors import SpirsInputError
    from spirs_tf.manifest import load_manifest
    from spirs_tf.predictor import load_run, open_run

    try:
        run = open_run(args.model, args.config) if args.config else load_run(args.model)
        source = data.PairSource(load_manifest(args.manifest), args.split, run.cfg.data)
        if len(source) == 0:
            raise SpirsInputError(f"no pairs in split {args.split!r}", args.manifest)
    except SpirsInputError as exc:
        print(f"affine_accuracy: error: {exc}", file=sys.stderr)
        return 2
    augment = run.cfg.augment if args.fixed_pose is None else \
        dataclasses.replace(run.cfg.augment, fixed_pose_probability=args.fixed_pose)
    result = measure(run, source, args.pairs, args.seed, augment, passes=args.passes, symmetric=args.symmetric)
    result = {"model": os.path.abspath(args.model), "manifest": os.path.abspath(args.manifest), "split": args.split,
              **result}
    print(f"SYNTHETIC: {result['samples']} augmented pairs of split {args.split!r} (fixed image posed with "
          f"probability {augment.fixed_pose_probability:g}), model {args.model} ({run.cfg.name}, {run.size}³ at "
          f"{result['spacing_mm']:g} mm, {args.passes} pass(es){', symmetric' if args.symmetric else ''}), "
          f"{result['seconds']:.1f} s")
    for part in ("linear", "rotation", "scale", "translation"):
        r = result[part]
        print(f"  {part:<12} slope {r['slope']:6.3f}  correlation {r['correlation']:6.3f}  (n = {r['n']})")
    print(f"  RMS displacement error over the brain, median: identity {result['rms_identity']['median']:.2f} vx "
          f"({result['rms_identity_mm']:.1f} mm), network {result['rms_network']['median']:.2f} vx "
          f"({result['rms_network_mm']:.1f} mm)")
    print(f"  masked LNCC, median: identity {result['lncc_identity']['median']:.3f}, "
          f"network affine {result['lncc_network']['median']:.3f}")
    print(f"  target (slope >= 0.8, correlation >= 0.9 for linear part and translation): "
          f"{'met' if result['target_met'] else 'NOT met'}")
    if args.json:
        from spirs_tf.atomic import atomic_write_json
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
