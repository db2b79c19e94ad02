"""Make a native-grid test case (SYNTHETIC) for timing ``spirs predict``: a synthetic (prior, new) pair
resampled to an oblique ~1 mm grid of 177×247×140 voxels (6.1 megavoxels), the size of a clinical scan.

    spirs synth --patients 1 --timepoints 2 --lesions 5 --out SYNTH --seed 3 --no-qc --quiet
    python experiments/native_case.py SYNTH/patient_000 OUT
    spirs predict --new OUT/new.nii.gz --prior OUT/prior.nii.gz --prior-mask OUT/prior_mask.nii.gz --out CASE

The new scan is tp1, the prior tp0 (image and mask), each on its own oblique grid (rotations of
12° and −9°, spacing 1.0 × 0.95 × 1.1 mm) centred on the synthetic grid's centre.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from scipy import ndimage

from spirs_tf.geometry import rotation_matrices
from spirs_tf.io import read_volume, write_volume

SHAPE = (177, 247, 140)
SPACING = (1.0, 0.95, 1.1)


def native_affine(src_affine: np.ndarray, src_shape, angles_deg, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Oblique 4×4 affine of a ``shape`` grid (default :data:`SHAPE`, voxel size ``spacing`` mm) centred on
    the centre of the source grid."""
    rx, ry, rz = rotation_matrices(np.deg2rad(np.asarray(angles_deg, float)))
    rot = rx @ ry @ rz
    lin = rot @ np.diag(spacing)
    centre = src_affine[:3, :3] @ ((np.asarray(src_shape) - 1) / 2) + src_affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = centre - lin @ ((np.asarray(shape) - 1) / 2)
    return out


def resample(vol, affine, order, shape=SHAPE):
    """``vol`` (a :class:`spirs_tf.io.Volume`) resampled onto the grid ``(shape, affine)``, zeros outside."""
    m = np.linalg.inv(vol.affine) @ affine
    return ndimage.affine_transform(vol.data.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=tuple(shape),
                                    order=order, mode="constant", cval=0.0)


def main(patient_dir: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for tp, name, angles in (("tp1", "new", (12, -5, 8)), ("tp0", "prior", (-9, 6, -4))):
        image = read_volume(os.path.join(patient_dir, tp, "image.nii.gz"), "image")
        aff = native_affine(image.affine, image.shape, angles)
        write_volume(os.path.join(out, f"{name}.nii.gz"), np.maximum(resample(image, aff, 1), 0), aff)
        if name == "prior":
            mask = read_volume(os.path.join(patient_dir, tp, "mask.nii.gz"), "mask")
            write_volume(os.path.join(out, "prior_mask.nii.gz"), (resample(mask, aff, 1) >= 0.5).astype(np.uint8),
                         aff)
    print(f"wrote {out}: {SHAPE} = {np.prod(SHAPE) / 1e6:.1f} megavoxels")


if __name__ == "__main__":
    main(*sys.argv[1:3])
