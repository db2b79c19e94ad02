"""Registration baselines of the paper (section 5.1, FACTS decision 11): ANTs and VoxelMorph.

* :mod:`spirs_tf.baselines.ants` -- ANTs affine and ANTs SyN through antspyx, an OPTIONAL extra
  (``pip install 'spirs-tf[baselines]'``); it never imports TensorFlow.
* :mod:`spirs_tf.baselines.voxelmorph` -- VoxelMorph's published VxmDense (diffeomorphic) written in
  Keras 3 on :mod:`spirs_tf.transforms`, with its NCC + gradient loss and a small training loop.

Both return a :class:`RegistrationResult` whose displacement field is in the project's convention,
so that baselines and SPIRS are scored by the same metrics. The submodules are imported lazily
(``import spirs_tf.baselines`` loads neither antspyx nor TensorFlow).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RegistrationResult"]


@dataclass(frozen=True)
class RegistrationResult:
    """What a baseline registration returns (NumPy, fixed grid).

    Attributes:
        warped_image: ``(D, H, W)`` float32, the moving image resampled on the fixed grid.
        warped_mask: ``(D, H, W)`` uint8 in {0, 1} (the moving mask warped trilinearly and
            thresholded at 0.5, or warped nearest-neighbour where the method says so), or None when
            no moving mask was given.
        displacement: ``(D, H, W, 3)`` float32 displacement ``u`` in voxels, channels in array-axis
            order: fixed voxel ``x`` samples the moving ARRAY at ``p(x) = x + u(x)`` (the project's
            convention with ``T = identity``; an affine is folded into ``u``).
        seconds: wall-clock seconds of the registration itself (the optimisation or the forward
            pass), not counting input conversion or the mask warp.
        method: a short name, e.g. ``"ants-affine"``, ``"ants-syn-paper"``, ``"vxm"``.
        matrix: for affine methods, the ``(3, 4)`` centred voxel affine ``[M | t]`` with
            ``p(x) = M(x − c) + t + c``, ``c = N/2`` (so ``displacement = p(x) − x``); else None.
    """

    warped_image: np.ndarray
    warped_mask: np.ndarray | None
    displacement: np.ndarray
    seconds: float
    method: str
    matrix: np.ndarray | None = None
