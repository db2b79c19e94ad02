"""Running the network more than once at inference (``model.affine_passes``, ``model.affine_symmetric``):
:meth:`spirs_tf.predictor.Predictor.predict` calls these with its network ``run(new, prior, mask) → dict``
(NumPy, batches ``(B, S, S, S, 1)``) and its ``p2_fn`` (``None``: P2 from the last run)."""
from __future__ import annotations

import numpy as np

from spirs_tf.geometry import affine_log_mean, to_homogeneous, total_displacement, warp_working


def _warp_batch(volumes, matrices, dvfs=None) -> np.ndarray:
    """``(B, S, S, S, 1)`` volumes each resampled once by its own affine (3×4 or 4×4) and field."""
    dvfs = [None] * len(volumes) if dvfs is None else dvfs
    warped = [warp_working(v[..., 0], np.asarray(m)[:3], d) for v, m, d in zip(volumes, matrices, dvfs)]
    return np.stack(warped)[..., None]


def _homogeneous(affine) -> np.ndarray:
    return to_homogeneous(np.asarray(affine, np.float64))


def _outputs(out: dict, p2_fn, new, total, dvf, prior, mask) -> dict:
    """The predictor's outputs for the whole transform ``p(x) = total(x) + dvf(x)``: the prior and its mask
    resampled once, P2 recomputed from them where ``p2_fn`` can (else the last run's)."""
    warped = [_warp_batch(v, total, dvf) for v in (prior, mask)]
    p2 = p2_fn(new, *warped) if p2_fn is not None else out["p2_prob"]
    return {"p1_prob": out["p1_prob"], "p2_prob": np.asarray(p2, np.float32),
            "affine": np.asarray(total, np.float64)[:, :3].astype(np.float32), "dvf": dvf,
            "prior_warped": warped[0], "prior_mask_warped": warped[1]}


def recursive_passes(run, p2_fn, new, prior, mask, passes: int) -> dict:
    """``passes`` runs, each on the ORIGINAL prior resampled once by the affine ``A`` found so far; each
    run's affine ``R`` composes as ``A ← A·R``; the last run's field ``u`` is returned in the prior's
    voxels (``M_A·u``, ``A`` before the last run), so that ``p(x) = A(x) + u(x)``."""
    out = run(new, prior, mask)
    total = np.asarray(out["affine"], np.float64)
    before = np.tile(np.eye(4)[:3], (len(new), 1, 1))
    for _ in range(passes - 1):
        before = total
        out = run(new, *(_warp_batch(v, before) for v in (prior, mask)))
        total = (_homogeneous(before) @ _homogeneous(out["affine"]))[:, :3]
    dvf = np.einsum("bij,bxyzj->bxyzi", before[:, :, :3], np.asarray(out["dvf"], np.float64)).astype(np.float32)
    return _outputs(out, p2_fn, new, total, dvf, prior, mask)


def symmetric_passes(run, p2_fn, new, prior, mask, passes: int) -> dict:
    """``passes`` symmetric affine estimates, then one run for the field (``2·passes + 1`` runs).

    Each pass's affine is the log-Euclidean mean (:func:`spirs_tf.geometry.affine_log_mean`) of the
    network's answer ``F`` for (new, prior) and the inverse of its answer ``B`` for (prior, new) (no mask
    on that side: the registration does not read the masks), which cancels a bias the network has in both
    directions (a constant answer gives the identity); an answer without a real logarithm keeps ``F``.
    The last run, on the prior resampled by the affine ``A`` found, gives the field: its own affine ``F'``
    and field ``u`` are folded into it (``M_A·(F'(x) − x + u(x))``), so that the sample locations are that
    run's composed onto ``A``, and the returned ``affine`` is ``A``."""
    total = np.tile(np.eye(4), (len(new), 1, 1))
    moved, moved_mask, none = prior, mask, np.zeros_like(new)
    for k in range(passes):
        if k:
            moved, moved_mask = _warp_batch(prior, total), _warp_batch(mask, total)
        forward = _homogeneous(run(new, moved, moved_mask)["affine"])
        backward = _homogeneous(run(moved, new, none)["affine"])
        step = []
        for f, b in zip(forward, backward):
            try:
                step.append(affine_log_mean([f, np.linalg.inv(b)]))
            except (ValueError, np.linalg.LinAlgError):
                step.append(f)
        total = total @ np.stack(step)
    out = run(new, _warp_batch(prior, total), _warp_batch(mask, total))
    dvf = []
    for a, f, u in zip(total, _homogeneous(out["affine"]), np.asarray(out["dvf"])):
        local = np.asarray(total_displacement(f[:3], u, new.shape[1:4]), np.float64)  # F'(x) − x + u(x)
        dvf.append(np.einsum("ij,xyzj->xyzi", a[:3, :3], local))
    return _outputs(out, p2_fn, new, total, np.stack(dvf).astype(np.float32), prior, mask)
