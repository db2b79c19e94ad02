"""A tiny on-disk longitudinal cohort for tests that need files (no TensorFlow here), and the loader of
the ``experiments/`` scripts the tests exercise."""
from __future__ import annotations

import importlib.util

import csv
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_script(name: str):
    """``experiments/<name>.py`` imported as a module (``_experiments_<name>``; the folder is no package)."""
    spec = importlib.util.spec_from_file_location(f"_experiments_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _brain(shape, rng):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((zz / 0.8) ** 2 + (yy / 0.9) ** 2 + (xx / 0.75) ** 2)
    brain = (r < 1.0).astype(np.float32)
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    image = brain * (0.5 + 0.3 * np.cos(3 * zz) * np.sin(2 * xx) + 0.8 * texture)
    return np.clip(image, 0, None).astype(np.float32) * brain, brain


def make_cohort(root, n_patients=3, n_timepoints=2, shape=(32, 32, 32), spacing=6.0, seed=0,
                splits=("train", "train", "val")) -> str:
    """Write ``n_patients`` × ``n_timepoints`` scans with one or two spherical lesions each; return the manifest."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * np.asarray(shape) / 2
    rows = []
    for p in range(n_patients):
        image0, brain = _brain(shape, rng)
        centre = np.array(shape) // 2 + rng.integers(-4, 5, 3)
        for t in range(n_timepoints):
            radius = 2.5 + t * 0.7
            grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
            lesion = (np.linalg.norm(grid - centre.reshape(3, 1, 1, 1), axis=0) <= radius) & (brain > 0)
            image = image0.copy()
            image[lesion] = 1.5
            image += 0.02 * rng.normal(size=shape).astype(np.float32) * brain
            folder = os.path.join(root, f"p{p}", f"t{t}")
            os.makedirs(folder, exist_ok=True)
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), os.path.join(folder, "image.nii.gz"))
            nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), os.path.join(folder, "mask.nii.gz"))
            rows.append({"patient_id": f"p{p}", "timepoint": t, "image": f"p{p}/t{t}/image.nii.gz",
                         "mask": f"p{p}/t{t}/mask.nii.gz", "split": splits[p % len(splits)]})
    path = os.path.join(root, "manifest.csv")
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_fake_run(root, config_name: str = "test", perturb: float = 0.0, seed: int = 0) -> str:
    """A run folder ``root/stage3`` holding a freshly built (identity-initialised) model of ``config_name``.

    ``perturb`` > 0 adds seeded Gaussian noise of that size to every trainable weight (non-trivial outputs).
    """
    from spirs_tf import config, networks
    from spirs_tf.checkpoints import save_checkpoint

    cfg = config.get_config(config_name)
    model = networks.build_spirs(cfg, cfg.model.num_levels, bn_trainable=False)
    if perturb:
        rng = np.random.default_rng(seed)
        for v in model.trainable_variables:
            v.assign(v.numpy() + perturb * rng.normal(size=v.shape).astype(np.float32))
    stage = os.path.join(str(root), "stage3")
    os.makedirs(os.path.join(stage, "checkpoints"), exist_ok=True)
    save_checkpoint(os.path.join(stage, "checkpoints", "best.npz"), networks.model_state(model), {},
                    {"stage": 3, "levels": cfg.model.num_levels, "epoch": 1})
    config.save_config(cfg, os.path.join(stage, "config.json"))
    return str(root)
