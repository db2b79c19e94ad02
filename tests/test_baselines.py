"""Baselines: ANTs through antspyx (optional extra) and the Keras VxmDense (VoxelMorph).

ANTs tests need antspyx (``pytest.importorskip("ants")``); they run in an environment with the
``baselines`` extra (antspyx 0.6.3 caps numpy < 2.4, so not necessarily the main one). The
VoxelMorph tests need TensorFlow. References are SciPy (``map_coordinates``, ``uniform_filter``)
and the NumPy geometry of :mod:`spirs_tf.geometry`.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from spirs_tf.errors import SpirsInputError
from spirs_tf.geometry import invert_affine, params_to_matrix, sample_locations

N = 32


# ------------------------------------------------------------------------------------------------
# synthetic data and NumPy references
# ------------------------------------------------------------------------------------------------
def _phantom(n: int = N, seed: int = 0):
    """Smooth texture inside an ellipsoid (background exactly 0) and the ellipsoid mask."""
    rng = np.random.default_rng(seed)
    tex = ndi.gaussian_filter(rng.normal(size=(n, n, n)), 2.0 * n / 32)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    c = np.indices((n, n, n)).astype(float) * 32 / n
    blob = ((c[0] - 16) / 9) ** 2 + ((c[1] - 15) / 7) ** 2 + ((c[2] - 17) / 8) ** 2 < 1
    return ((tex + 0.5) * blob).astype(np.float32), blob.astype(np.uint8)


def _sample(volume, coords, order=1):
    """``volume`` at ``coords`` (3, D, H, W); zeros outside, as the project's warps."""
    return ndi.map_coordinates(np.asarray(volume, np.float64), coords, order=order, mode="constant", cval=0.0)


def _identity(shape):
    return np.indices(shape).astype(np.float64)


def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _lncc(a, b, win: int = 9, eps: float = 1e-5) -> float:
    """Mean local NCC (window ``win``) of two volumes, a brute-force SciPy reference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mean = lambda x: ndi.uniform_filter(x, win, mode="constant")  # noqa: E731
    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    va, vb = mean(a * a) - ma**2, mean(b * b) - mb**2
    return float(np.mean(cov**2 / (va * vb + eps)))


def _smooth_field(n: int, amplitude: float, seed: int, sigma: float = 4.0) -> np.ndarray:
    """A smooth random displacement (3, n, n, n) with max |component| = ``amplitude`` voxels."""
    rng = np.random.default_rng(seed)
    v = np.stack([ndi.gaussian_filter(rng.normal(size=(n, n, n)), sigma) for _ in range(3)])
    return v * (amplitude / np.abs(v).max())


# ------------------------------------------------------------------------------------------------
# ANTs
# ------------------------------------------------------------------------------------------------
def test_ants_missing_gives_install_hint(monkeypatch):
    from spirs_tf.baselines import ants as ants_baseline

    monkeypatch.setitem(sys.modules, "ants", None)  # makes `import ants` raise ImportError
    fixed, _ = _phantom(16)
    assert ants_baseline.ants_available() is False
    with pytest.raises(SpirsInputError) as info:
        ants_baseline.register_ants(fixed, fixed, None, spacing=1.0, mode="syn-paper")
    assert str(info.value) == "ANTs baselines need antspyx: pip install 'spirs-tf[baselines]'"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_ants_rejects_bad_input():
    from spirs_tf.baselines.ants import register_ants

    fixed, blob = _phantom(16)
    with pytest.raises(SpirsInputError, match="unknown ANTs mode 'syn'"):
        register_ants(fixed, fixed, mode="syn")
    with pytest.raises(SpirsInputError, match=r"moving has shape \(16, 16, 8\)"):
        register_ants(fixed, fixed[:, :, :8])
    with pytest.raises(SpirsInputError, match="binary"):
        register_ants(fixed, fixed, blob * 0.5)
    with pytest.raises(SpirsInputError, match="spacing must be positive"):
        register_ants(fixed, fixed, spacing=(1.0, 0.0, 1.0))
    bad = fixed.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(SpirsInputError, match="NaN"):
        register_ants(fixed, bad)


def test_affine_conversion_round_trip():
    from spirs_tf.baselines.ants import _itk_affine_from_ours, _ours_from_itk

    matrix = params_to_matrix([1.5, -2, 0.5, 0.1, -0.2, 0.05, 1.1, 0.9, 1.0, 0.02, 0, -0.03, 0, 0.01, 0])
    spacing = np.array([1.5, 1.0, 2.0])
    shape = (20, 24, 16)
    a, centre, translation = _itk_affine_from_ours(matrix, shape, spacing)
    # ITK maps physical X = S·x: S⁻¹(A(Sx − C) + C + Tr) must equal p(x) = M(x − c) + t + c.
    x = np.array([3.0, 17.0, 9.0])
    p_itk = (a @ (spacing * x - centre) + centre + translation) / spacing
    p_ours = sample_locations(matrix, shape)[:, 3, 17, 9]
    np.testing.assert_allclose(p_itk, p_ours, atol=1e-5)
    # A different ITK centre describes the same map; converting back must give our matrix.
    other = np.array([7.0, 3.0, 11.0])
    shifted_tr = a @ (other - centre) + centre + translation - other  # same T(X) with centre `other`
    params = np.concatenate([a.ravel(), shifted_tr])
    np.testing.assert_allclose(_ours_from_itk(params, other, shape, spacing), matrix, atol=1e-5)


@pytest.fixture(scope="module")
def ants_module():
    return pytest.importorskip("ants")


def test_ants_affine_recovers_rigid_motion(ants_module):
    from spirs_tf.baselines.ants import ants_available, register_ants

    assert ants_available()
    fixed, blob = _phantom()
    true = params_to_matrix([2.0, -1.5, 1.0, 0.1, -0.05, 0.08, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    # moving(p(x)) = fixed(x): resample fixed with the inverse transform.
    back = sample_locations(invert_affine(true), fixed.shape)
    moving = _sample(fixed, back).astype(np.float32)
    moving_mask = (_sample(blob, back) > 0.5).astype(np.uint8)
    result = register_ants(fixed, moving, moving_mask, spacing=1.5, mode="affine")

    inside = blob.astype(bool)
    before = np.abs(moving - fixed)[inside].mean()
    after = np.abs(result.warped_image - fixed)[inside].mean()
    assert after < 0.3 * before, (before, after)
    assert _dice(moving_mask, blob) < 0.8
    assert _dice(result.warped_mask, blob) > 0.9
    assert result.warped_mask.dtype == np.uint8 and set(np.unique(result.warped_mask)) <= {0, 1}
    np.testing.assert_allclose(result.matrix[:, 3], true[:, 3], atol=0.5)
    # The composed ANTs field equals the returned matrix in our convention.
    u_matrix = np.moveaxis(sample_locations(result.matrix, fixed.shape) - _identity(fixed.shape), 0, -1)
    np.testing.assert_allclose(result.displacement, u_matrix, atol=1e-3)
    assert result.displacement.shape == (N, N, N, 3) and result.displacement.dtype == np.float32
    assert result.method == "ants-affine" and result.seconds > 0


def test_ants_initial_affine_is_part_of_the_displacement(ants_module):
    from spirs_tf.baselines.ants import register_ants

    fixed, _ = _phantom()
    matrix = params_to_matrix([1.0, -2.0, 0.5, 0.05, 0.1, -0.1, 1.05, 0.95, 1.0, 0.02, 0, 0, -0.02, 0, 0])
    # Zero SyN iterations: the result is the initial affine alone, on an anisotropic grid.
    result = register_ants(
        fixed, fixed, None, spacing=(1.5, 1.0, 2.0), mode="syn-default", initial_affine=matrix,
        overrides={"reg_iterations": (0,)},
    )
    u_true = np.moveaxis(sample_locations(matrix, fixed.shape) - _identity(fixed.shape), 0, -1)
    np.testing.assert_allclose(result.displacement, u_true, atol=1e-4)


@pytest.fixture(scope="module")
def syn_case(ants_module):
    """A smooth known deformation (max 3 voxels) registered with the paper's SyN settings."""
    from spirs_tf.baselines.ants import register_ants

    fixed, blob = _phantom()
    coords = _identity(fixed.shape) + _smooth_field(N, 3.0, seed=3, sigma=6.0)
    moving = _sample(fixed, coords).astype(np.float32)
    moving_mask = (_sample(blob, coords) > 0.5).astype(np.uint8)
    result = register_ants(fixed, moving, moving_mask, spacing=1.0, mode="syn-paper")
    return fixed, blob, moving, moving_mask, result


def test_ants_syn_paper_improves_lncc_and_dice(syn_case):
    fixed, blob, moving, moving_mask, result = syn_case
    lncc_before, lncc_after = _lncc(fixed, moving), _lncc(fixed, result.warped_image)
    dice_before, dice_after = _dice(moving_mask, blob), _dice(result.warped_mask, blob)
    lncc_best = _lncc(fixed, fixed)  # < 1: the background has no local variance
    # SyN closes at least 40% of the LNCC gap (measured: 0.222 -> 0.264 of 0.295).
    assert lncc_after - lncc_before > 0.4 * (lncc_best - lncc_before), (lncc_before, lncc_after, lncc_best)
    assert dice_after > dice_before + 0.04 and dice_after > 0.95, (dice_before, dice_after)
    assert result.method == "ants-syn-paper" and result.matrix is None


def test_ants_displacement_reproduces_ants_warp(syn_case):
    fixed, _, moving, moving_mask, result = syn_case
    coords = _identity(fixed.shape) + np.moveaxis(result.displacement.astype(np.float64), -1, 0)
    ours = _sample(moving, coords)
    # Compare where every sample location lies inside the moving array (ITK and SciPy treat the
    # half voxel at the border differently).
    inside = np.all((coords >= 0) & (coords <= N - 1), axis=0)
    assert inside.mean() > 0.8
    err = np.abs(ours - result.warped_image)[inside]
    assert err.max() < 1e-4, err.max()  # measured 1.1e-6 (float32 field)
    assert np.abs(result.displacement).max() > 0.5  # a real deformation was found


# ------------------------------------------------------------------------------------------------
# VoxelMorph (Keras VxmDense)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vxm():
    pytest.importorskip("tensorflow")
    from spirs_tf.baselines import voxelmorph

    return voxelmorph


def _np_integrate(velocity: np.ndarray, steps: int) -> np.ndarray:
    """NumPy scaling and squaring: border-extended trilinear composition (SciPy mode 'nearest')."""
    u = velocity / 2.0**steps  # (3, D, H, W)
    grid = _identity(u.shape[1:])
    for _ in range(steps):
        coords = grid + u
        u = u + np.stack([ndi.map_coordinates(u[a], coords, order=1, mode="nearest") for a in range(3)])
    return u


def test_vxm_identity_at_initialisation(vxm):
    model = vxm.build_vxm_dense(16)
    rng = np.random.default_rng(1)
    moving, fixed = rng.random((2, 1, 16, 16, 16, 1)).astype(np.float32)
    out = model({"moving_image": moving, "fixed_image": fixed})
    assert set(out) == {"warped_image", "displacement", "velocity"}
    disp = np.asarray(out["displacement"])
    assert disp.shape == (1, 16, 16, 16, 3) and np.abs(disp).max() < 1e-3
    np.testing.assert_allclose(np.asarray(out["warped_image"]), moving, atol=1e-3)
    kernel = model.get_layer("vxm_flow").kernel.numpy()
    assert 0.5e-5 < kernel.std() < 2e-5
    assert all(layer.name.startswith("vxm_") for layer in model.layers if layer.name not in ("moving_image", "fixed_image"))
    with pytest.raises(ValueError, match="divisible by 16"):
        vxm.build_vxm_dense(24)


def test_scaling_and_squaring_constant_velocity_is_exact(vxm):
    v = np.broadcast_to(np.array([0.3, -0.7, 1.2], np.float32), (1, 16, 16, 16, 3))
    u = np.asarray(vxm.integrate_velocity(v, 7))
    np.testing.assert_allclose(u, v, atol=1e-5)


def test_scaling_and_squaring_matches_numpy(vxm):
    v = _smooth_field(16, 2.5, seed=5, sigma=3.0)  # (3, D, H, W)
    ours = np.asarray(vxm.integrate_velocity(np.moveaxis(v, 0, -1)[None].astype(np.float32), 7))[0]
    ref = np.moveaxis(_np_integrate(v, 7), 0, -1)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # The integrated field is the time-1 flow: integrating -v gives (approximately) its inverse.
    back = np.asarray(vxm.integrate_velocity(-np.moveaxis(v, 0, -1)[None].astype(np.float32), 7))[0]
    coords = _identity(v.shape[1:]) + np.moveaxis(ours, -1, 0)
    composed = ours + np.stack([_sample(back[..., a], coords) for a in range(3)], axis=-1)
    interior = (slice(4, -4),) * 3
    assert np.abs(composed[interior]).max() < 0.05 * np.abs(ours).max()


def test_vxm_ncc_matches_bruteforce_lncc(vxm):
    a = _smooth_field(16, 1.0, seed=6, sigma=1.5)[0]
    b = 0.7 * a + 0.3 * _smooth_field(16, 1.0, seed=7, sigma=1.5)[0]
    ours = np.asarray(vxm.vxm_ncc(a[None, ..., None], b[None, ..., None], window=9))
    # Zero-padded window sums: cross = n·cov, var = n·var, so eps enters as eps / n².
    ref = _lncc(a, b, win=9, eps=1e-5 / 9**6)
    assert ours.shape == (1,)
    np.testing.assert_allclose(ours[0], ref, rtol=1e-3)
    same = np.asarray(vxm.vxm_ncc(a[None, ..., None], a[None, ..., None]))[0]
    assert 0.99 < same <= 1.0


def test_vxm_grad_of_linear_field(vxm):
    alpha = 0.4
    flow = np.zeros((2, 16, 16, 16, 3), np.float32)
    flow[1, ..., 0] = alpha * np.arange(16, dtype=np.float32)[:, None, None]
    grad = np.asarray(vxm.vxm_grad(flow))
    # Only d0 of channel 0 is non-zero (= alpha): mean over channels alpha²/3, mean over axes /3.
    np.testing.assert_allclose(grad, [0.0, alpha**2 / 9], rtol=1e-6, atol=1e-8)
    loss = np.asarray(vxm.vxm_loss(flow[..., :1], flow[..., :1], flow, lambda_grad=2.0))
    np.testing.assert_allclose(loss, -np.asarray(vxm.vxm_ncc(flow[..., :1], flow[..., :1])) + 2 * grad, rtol=1e-6)


def test_vxm_training_reduces_loss_and_recovers_shift_direction(vxm):
    fixed, blob = _phantom(16)
    coords = _identity(fixed.shape)
    coords[0] += 1.0  # moving(x) = fixed(x + e0): the registration needs u ≈ -e0
    moving = _sample(fixed, coords).astype(np.float32)
    log = []
    model = vxm.train_vxm([(fixed, moving)], 16, steps=25, lr=1e-3, seed=0, on_step=lambda s, l: log.append(l["loss"]))
    assert len(log) == 25
    assert np.mean(log[-5:]) < log[0] - 0.1, log
    result = vxm.register_vxm(model, fixed, moving, blob)
    assert result.displacement[..., 0].mean() < -0.1
    assert abs(result.displacement[..., 1].mean()) < abs(result.displacement[..., 0].mean())
    with pytest.raises(ValueError, match="ran out after 0 pairs"):
        vxm.train_vxm(iter([]), 16, steps=2, model=model)


def test_vxm_register_result_and_keras_round_trip(vxm, tmp_path):
    import keras

    model = vxm.build_vxm_dense(16)
    flow = model.get_layer("vxm_flow")
    rng = np.random.default_rng(2)
    flow.kernel.assign(rng.normal(0, 0.02, flow.kernel.shape).astype(np.float32))  # a non-trivial field
    fixed, blob = _phantom(16)
    moving = np.roll(fixed, 1, axis=1)
    result = vxm.register_vxm(model, fixed, moving, np.roll(blob, 1, axis=1))
    assert result.method == "vxm" and result.matrix is None and result.seconds > 0
    assert result.warped_image.shape == (16, 16, 16) and result.displacement.shape == (16, 16, 16, 3)
    assert np.abs(result.displacement).max() > 0.05
    # Our convention: warped(x) = moving(x + u(x)), zero padding (SciPy 'grid-constant').
    coords = _identity(fixed.shape) + np.moveaxis(result.displacement.astype(np.float64), -1, 0)
    ref = ndi.map_coordinates(moving.astype(np.float64), coords, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(result.warped_image, ref, atol=1e-4)
    mask_ref = ndi.map_coordinates(np.roll(blob, 1, axis=1).astype(np.float64), coords, order=1, mode="grid-constant") > 0.5
    assert np.array_equal(result.warped_mask.astype(bool), mask_ref)

    path = tmp_path / "vxm.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = vxm.register_vxm(loaded, fixed, moving)
    np.testing.assert_allclose(again.displacement, result.displacement, atol=1e-6)
    np.testing.assert_allclose(again.warped_image, result.warped_image, atol=1e-6)
    layer = vxm.VelocityIntegration(5, name="int")
    assert vxm.VelocityIntegration.from_config(layer.get_config()).int_steps == 5
    with pytest.raises(SpirsInputError, match="spatial size"):
        vxm.register_vxm(model, fixed[:8], moving[:8])
