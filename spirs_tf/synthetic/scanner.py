"""The scanner: head position and contrast, bias, gamma and noise of one acquisition.

Pose. Every time point has a 4×4 matrix ``P`` (world mm) taking a point ``w`` of the scanner's working
grid to the patient-space point ``q = P w`` that is imaged there::

    q = A (w − c) + c + t,    A = Rx(θ0) Ry(θ1) Rz(θ2) diag(s) Sh(h)      (spirs_tf.geometry order)

with ``c`` the grid's centre (the brain's centre). ``pose="raw"``: ``θ ~ U(±10°)``, ``t ~ U(±10 mm)``,
``s ~ U(0.97, 1.03)``, ``h ~ U(±0.03)`` per time point (a new head position in the same scanner grid).
``pose="aligned"``: ``P = I`` for every time point (as after co-registration to the baseline).

Contrast (:func:`acquire`), applied to the noise-free composite (white matter = 1): global gamma
``I^γ, γ ~ U(0.8, 1.25)``; a smooth multiplicative bias ``exp(b·f)`` (``f`` a unit-RMS low-frequency
field, ``b ~ U(0.05, 0.15)``); a global gain ``g ~ U(300, 1500)`` (arbitrary scanner units); Rician
noise ``|g·I·bias + σ(n₁ + i n₂)|`` with ``σ = g·U(0.015, 0.045)``; finally the background (outside the
brain mask) is set to exactly 0, as on a skull-stripped scan.
"""
from __future__ import annotations

import numpy as np

from spirs_tf.geometry import params_to_matrix
from spirs_tf.synthetic.anatomy import smooth_random_field

POSES = ("raw", "aligned")


def sample_pose(rng: np.random.Generator, centre_mm: np.ndarray, mode: str = "raw",
                max_rotation_deg: float = 10.0, max_translation_mm: float = 10.0,
                max_affine: float = 0.03) -> np.ndarray:
    """4×4 scanner-world → patient-world matrix ``P`` (module docstring); identity for ``aligned``.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in POSES:
        raise ValueError(f"pose must be one of {POSES}, got {mode!r}")
    if mode == "aligned":
        return np.eye(4)
    params = np.concatenate([
        rng.uniform(-max_translation_mm, max_translation_mm, 3),
        np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3)),
        rng.uniform(1.0 - max_affine, 1.0 + max_affine, 3),
        rng.uniform(-max_affine, max_affine, 6),
    ])
    m = params_to_matrix(params).astype(np.float64)
    c = np.asarray(centre_mm, dtype=np.float64)
    pose = np.eye(4)
    pose[:3, :3] = m[:, :3]
    pose[:3, 3] = c - m[:, :3] @ c + m[:, 3]
    return pose


def acquire(rng: np.random.Generator, composite: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Turn a noise-free composite (white matter = 1) into a scan (module docstring).

    Args:
        composite: float32 ``(D, H, W)``, ≥ 0.
        brain: bool brain mask; the result is exactly 0 outside it.

    Returns:
        float32 image in arbitrary units, ≥ 0.
    """
    gamma = rng.uniform(0.8, 1.25)
    bias = np.exp(np.float32(rng.uniform(0.05, 0.15)) * smooth_random_field(rng, composite.shape, 2)[0])
    gain = np.float32(rng.uniform(300.0, 1500.0))
    sigma = gain * np.float32(rng.uniform(0.015, 0.045))
    clean = np.power(np.clip(composite, 0.0, None), np.float32(gamma)) * bias * gain
    real = clean + sigma * rng.standard_normal(composite.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(composite.shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag)
    image *= brain
    return image.astype(np.float32, copy=False)
