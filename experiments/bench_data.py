"""Data of ``experiments/benchmark.py``: synthetic 128³ pairs, cached network and training inputs, and
the quality measures (Dice of the warped prior mask, brain LNCC) on the new scan's grid."""
from __future__ import annotations

import os

import numpy as np


def make_pairs(work: str, n: int, seed: int) -> list[dict]:
    """``n`` synthetic 128³ (prior, new) pairs as NIfTI files (cached), with the true warped prior mask."""
    from scipy import ndimage

    from spirs_tf.io import write_volume
    from spirs_tf.synthetic import SynthConfig, generate_patient

    scfg = SynthConfig(grid_size=128, spacing_mm=1.5, pose="raw", timepoints=(2, 2), lesions_per_patient=(4, 10),
                       size_weights=(1, 2, 3, 2))
    pairs = []
    for k in range(n):
        folder = os.path.join(work, "pairs", f"seed{seed}_pair{k}")
        files = {name: os.path.join(folder, f"{name}.nii.gz")
                 for name in ("prior_image", "prior_mask", "new_image", "new_mask")}
        files["truth"] = os.path.join(folder, "true_warped_prior_mask.npy")
        if not all(os.path.isfile(p) for p in files.values()):
            patient = generate_patient(k, seed, scfg)
            prior, new = patient.scans[0], patient.scans[1]
            os.makedirs(folder, exist_ok=True)
            write_volume(files["prior_image"], prior.image, prior.affine)
            write_volume(files["prior_mask"], prior.mask.astype(np.uint8), prior.affine)
            write_volume(files["new_image"], new.image, new.affine)
            write_volume(files["new_mask"], new.mask.astype(np.uint8), new.affine)
            coords = patient.transforms[0].prior_voxel_coords()
            truth = ndimage.map_coordinates(prior.mask.astype(np.float32), coords, order=1) >= 0.5
            np.save(files["truth"], truth.astype(np.uint8))
        pairs.append({"name": f"pair{k}", **files})
    return pairs


def _read(path, kind="image") -> tuple[np.ndarray, np.ndarray]:
    from spirs_tf.io import read_volume

    v = read_volume(path, kind=kind)
    return np.asarray(v.data), np.asarray(v.affine)


def quality(pair: dict, warped_image: np.ndarray | None, warped_mask: np.ndarray) -> dict:
    """Dice(warped prior mask, new mask) and brain LNCC(new, warped prior), on the new scan's grid."""
    from spirs_tf import metrics
    from spirs_tf.preprocess import normalize_intensity

    new_mask = _read(pair["new_mask"], "mask")[0] > 0
    out = {"dice": metrics.dice(new_mask, np.asarray(warped_mask) >= 0.5)}
    if warped_image is not None:
        fixed = normalize_intensity(_read(pair["new_image"])[0].astype(np.float32))
        moving = normalize_intensity(np.asarray(warped_image, np.float32))
        out["lncc"] = metrics.lncc(fixed, moving, 9, mask=metrics.lncc_mask(fixed, moving))
    return out


def model_inputs(pair: dict, config: str, work: str) -> str:
    """``spirs predict``'s network inputs for one pair and config, saved as .npz (cached)."""
    path = os.path.join(work, "inputs", f"{config}_{os.path.basename(os.path.dirname(pair['new_image']))}.npz")
    if not os.path.isfile(path):
        from spirs_tf import config as config_lib, data as data_lib
        from spirs_tf.io import read_volume

        cfg = config_lib.get_config(config)
        arrays, _ = data_lib.prediction_inputs(read_volume(pair["prior_image"]),
                                               read_volume(pair["prior_mask"], kind="mask"),
                                               read_volume(pair["new_image"]), cfg)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, **arrays)
    return path


def train_arrays(pairs: list[dict], config: str, work: str) -> str:
    """Pre-aligned training arrays (new grid) of every pair for one config, saved as .npz (cached)."""
    path = os.path.join(work, "inputs", f"train_{config}_{len(pairs)}.npz")
    if not os.path.isfile(path):
        from spirs_tf import config as config_lib, data as data_lib
        from spirs_tf.io import read_volume
        from spirs_tf.preprocess import preprocess_scan

        cfg = config_lib.get_config(config)
        out = {"n": len(pairs)}
        for k, pair in enumerate(pairs):
            pre = preprocess_scan(read_volume(pair["new_image"]), read_volume(pair["new_mask"], kind="mask"), cfg.data)
            image, mask = data_lib.prior_onto_new(read_volume(pair["prior_image"]),
                                                  read_volume(pair["prior_mask"], kind="mask"),
                                                  pre.mapping, cfg.data.clip_sigma)
            out.update({f"fixed{k}": pre.image, f"fixed_mask{k}": pre.mask, f"moving{k}": image,
                        f"moving_mask{k}": mask})
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, **out)
    return path
