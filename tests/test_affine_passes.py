"""Recursive network passes at inference (``model.affine_passes``, ``Predictor.predict(passes=k)``).

Checked against analytic truths: a 'network' that always answers the same affine and field composes
to its k-th power, and a 'network' that finds only half of a translation converges geometrically to
the true one, as a cascade of it must.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from spirs_tf import config, geometry
from spirs_tf.errors import SpirsInputError
from spirs_tf.predictor import Predictor

S = 32  # the test config's model grid at 3 levels


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _blob(centre, sigma=4.0) -> np.ndarray:
    x = np.stack(np.meshgrid(*[np.arange(S, dtype=np.float64)] * 3, indexing="ij"))
    r2 = sum((x[i] - centre[i]) ** 2 for i in range(3))
    return np.exp(-r2 / (2 * sigma ** 2)).astype(np.float32)


def _batch(v):
    return np.asarray(v, np.float32)[None, ..., None]


def _outputs(new, prior, mask, matrix, dvf):
    """The six outputs of a network that answers ``matrix``/``dvf`` (warps as the model does)."""
    warp = lambda v: geometry.warp_working(v[0, ..., 0], matrix, dvf)[None, ..., None]  # noqa: E731
    return {"p1_prob": (new > 0.5).astype(np.float32), "p2_prob": warp(mask),
            "affine": np.asarray(matrix, np.float32)[None], "dvf": np.asarray(dvf, np.float32)[None],
            "prior_warped": warp(prior), "prior_mask_warped": warp(mask)}


def test_constant_answer_composes_to_its_power_and_rotates_the_last_field():
    """A network that always answers R = [M | t] and u: k passes give A = R^k and the field M^(k-1)·u
    (p(x) = R^(k-1)(R x + u)), and the prior is resampled once by that transform."""
    residual = np.concatenate([_rotation(8.0) @ np.diag([1.03, 0.98, 1.0]), [[1.5], [-0.5], [0.75]]], axis=1)
    u = np.zeros((S, S, S, 3), np.float32)
    u[..., 0], u[..., 2] = 0.4, -0.3
    calls = []

    def run(new, prior, mask):
        calls.append(prior.copy())
        return _outputs(new, prior, mask, residual, u)

    predictor = Predictor(config.get_config("test"), 3, run)
    prior = _blob((15, 17, 16), 5.0)
    mask = (prior > 0.5).astype(np.float32)
    new = _blob((16, 16, 16), 5.0)
    for k in (1, 2, 3):
        calls.clear()
        out = predictor.predict(_batch(new), _batch(prior), _batch(mask), passes=k)
        assert len(calls) == k
        power = np.linalg.matrix_power(geometry.to_homogeneous(residual), k)
        np.testing.assert_allclose(out["affine"][0], power[:3], atol=1e-5)
        before = np.linalg.matrix_power(geometry.to_homogeneous(residual), k - 1)[:3, :3]
        np.testing.assert_allclose(out["dvf"][0], u @ before.T, atol=1e-5)
        # the same sample locations as R^(k-1) applied to (R x + u), computed without the predictor
        p = geometry.sample_locations(np.linalg.matrix_power(geometry.to_homogeneous(residual), k - 1)[:3],
                                      (S, S, S))
        q = geometry.sample_locations(residual, (S, S, S), u)
        c = geometry.grid_centre((S, S, S)).reshape(3, 1, 1, 1)
        m, t = before, np.linalg.matrix_power(geometry.to_homogeneous(residual), k - 1)[:3, 3]
        locations = np.einsum("ab,bijk->aijk", m, q - c) + t.reshape(3, 1, 1, 1) + c
        expected = ndimage.map_coordinates(prior, locations, order=1, mode="grid-constant", prefilter=False)
        np.testing.assert_allclose(out["prior_warped"][0, ..., 0], expected, atol=1e-4)
        if k > 1:  # pass k saw the prior resampled once by R^(k-1)
            seen = ndimage.map_coordinates(prior, p, order=1, mode="grid-constant", prefilter=False)
            np.testing.assert_allclose(calls[-1][0, ..., 0], seen, atol=1e-5)


def test_half_translation_network_converges_geometrically():
    """A 'network' that finds half of a translation (centroid shift): k passes find 1 − 2^−k of it."""
    shift = np.array([4.0, -3.0, 2.0])
    new = _blob((16, 16, 16))
    prior = _blob(16 + shift)

    def centroid(v):
        grid = np.stack(np.meshgrid(*[np.arange(S, dtype=np.float64)] * 3, indexing="ij"))
        return (grid * v).reshape(3, -1).sum(1) / v.sum()

    def run(new_b, prior_b, mask_b):
        t = 0.5 * (centroid(prior_b[0, ..., 0]) - centroid(new_b[0, ..., 0]))
        return _outputs(new_b, prior_b, mask_b, np.concatenate([np.eye(3), t[:, None]], axis=1),
                        np.zeros((S, S, S, 3), np.float32))

    predictor = Predictor(config.get_config("test"), 3, run)
    for k in (1, 2, 4):
        out = predictor.predict(_batch(new), _batch(prior), _batch(prior > 0.5), passes=k)
        np.testing.assert_allclose(out["affine"][0, :, 3], (1 - 0.5 ** k) * shift, atol=0.05)  # trilinear blur, blob tails
        np.testing.assert_allclose(out["affine"][0, :, :3], np.eye(3), atol=1e-6)
    # four passes: the prior lands on the new scan far better than after one
    one = predictor.predict(_batch(new), _batch(prior), _batch(prior > 0.5), passes=1)["prior_warped"]
    four = out["prior_warped"]
    assert np.abs(four[0, ..., 0] - new).max() < 0.3 * np.abs(one[0, ..., 0] - new).max()


def test_passes_default_from_config_override_and_p2_recomputed():
    cfg = config.get_config("test")
    cfg.model.affine_passes = 2
    calls, p2_calls = [], []
    residual = np.concatenate([np.eye(3), [[1.0], [0.0], [0.0]]], axis=1)

    def run(new, prior, mask):
        calls.append(1)
        return _outputs(new, prior, mask, residual, np.zeros((S, S, S, 3), np.float32))

    def p2(new, warped, warped_mask):
        p2_calls.append(warped_mask.copy())
        return warped_mask * 0.5

    predictor = Predictor(cfg, 3, run, p2_fn=p2)
    new = _batch(_blob((16, 16, 16)))
    mask = _batch(_blob((16, 16, 16)) > 0.5)
    out = predictor.predict(new, new, mask)
    assert len(calls) == 2 and predictor.passes == 2
    np.testing.assert_allclose(out["p2_prob"], 0.5 * out["prior_mask_warped"], atol=1e-6)
    np.testing.assert_allclose(p2_calls[0], out["prior_mask_warped"])
    calls.clear()
    predictor.affine_passes = 1  # what spirs predict --affine-passes 1 sets
    predictor.predict(new, new, mask)
    assert len(calls) == 1 and predictor.passes == 1
    with pytest.raises(ValueError, match="passes"):
        predictor.predict(new, new, mask, passes=0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_config_refuses_bad_affine_passes(bad):
    cfg = config.get_config("test")
    cfg.model.affine_passes = bad
    with pytest.raises(SpirsInputError, match="affine_passes"):
        cfg.validate()


# ------------------------------------------------------------------ symmetric passes (model.affine_symmetric)
def _affine4(deg: float, shift) -> np.ndarray:
    return geometry.to_homogeneous(np.concatenate([_rotation(deg), np.asarray(shift, float)[:, None]], axis=1))


def test_affine_log_mean_analytic():
    a = _affine4(12.0, [2.0, -1.0, 3.0]) @ np.diag([1.05, 0.97, 1.0, 1.0])
    np.testing.assert_allclose(geometry.affine_log_mean([a, np.linalg.inv(a)]), np.eye(4), atol=1e-12)
    np.testing.assert_allclose(geometry.affine_log_mean([a, a]), a, atol=1e-10)
    t1, t2 = _affine4(0.0, [2.0, 0.0, -4.0]), _affine4(0.0, [0.0, 6.0, 1.0])
    np.testing.assert_allclose(geometry.affine_log_mean([t1, t2]), _affine4(0.0, [1.0, 3.0, -1.5]), atol=1e-12)
    np.testing.assert_allclose(geometry.affine_log_mean([_affine4(10.0, [0, 0, 0]), _affine4(30.0, [0, 0, 0])]),
                               _affine4(20.0, [0, 0, 0]), atol=1e-12)
    with pytest.raises(ValueError, match="determinant"):
        geometry.affine_log_mean([a, np.diag([-1.0, 1.0, 1.0, 1.0])])


def test_symmetric_cancels_a_constant_answer_and_keeps_the_last_runs_locations():
    """A network that always answers R and u (whatever it is shown) is pure bias: each symmetric pass
    averages R with R⁻¹, so the affine is the identity exactly; the field run then gives the sample
    locations R(x) + u(x). 2k + 1 runs for k passes, the swapped ones with the new scan as the prior."""
    residual = (_affine4(8.0, [1.5, -0.5, 0.75]) @ np.diag([1.03, 0.98, 1.0, 1.0]))[:3]
    u = np.zeros((S, S, S, 3), np.float32)
    u[..., 0], u[..., 2] = 0.4, -0.3
    calls = []

    def run(new, prior, mask):
        calls.append((new.copy(), prior.copy(), mask.copy()))
        return _outputs(new, prior, mask, residual, u)

    predictor = Predictor(config.get_config("test"), 3, run)
    new, prior = _blob((16, 16, 16), 5.0), _blob((15, 17, 16), 5.0)
    mask = (prior > 0.5).astype(np.float32)
    for k in (1, 3):
        calls.clear()
        out = predictor.predict(_batch(new), _batch(prior), _batch(mask), passes=k, symmetric=True)
        assert len(calls) == 2 * k + 1
        np.testing.assert_allclose(calls[1][0][0, ..., 0], prior)    # swapped: the prior is the 'new' scan
        np.testing.assert_allclose(calls[1][1][0, ..., 0], new)
        assert not calls[1][2].any()                                  # no mask known for the new scan
        np.testing.assert_allclose(out["affine"][0], np.eye(4)[:3], atol=1e-6)
        expected = ndimage.map_coordinates(prior, geometry.sample_locations(residual, (S, S, S), u), order=1,
                                           mode="grid-constant", prefilter=False)
        np.testing.assert_allclose(out["prior_warped"][0, ..., 0], expected, atol=1e-4)
        locations = geometry.sample_locations(out["affine"][0], (S, S, S), out["dvf"][0])
        np.testing.assert_allclose(locations, geometry.sample_locations(residual, (S, S, S), u), atol=1e-4)


def test_symmetric_removes_a_bias_the_plain_network_keeps():
    """A 'network' that finds the true translation (centroid shift) plus a constant bias b: one plain pass
    is off by b, one symmetric pass is not (t + b averaged with −(−t + b))."""
    shift, bias = np.array([4.0, -3.0, 2.0]), np.array([1.5, 1.0, -2.0])
    new, prior = _blob((16, 16, 16)), _blob(16 + shift)
    grid = np.stack(np.meshgrid(*[np.arange(S, dtype=np.float64)] * 3, indexing="ij"))

    def centroid(v):
        return (grid * v).reshape(3, -1).sum(1) / v.sum()

    def run(new_b, prior_b, mask_b):
        t = centroid(prior_b[0, ..., 0]) - centroid(new_b[0, ..., 0]) + bias
        return _outputs(new_b, prior_b, mask_b, np.concatenate([np.eye(3), t[:, None]], axis=1),
                        np.zeros((S, S, S, 3), np.float32))

    predictor = Predictor(config.get_config("test"), 3, run)
    plain = predictor.predict(_batch(new), _batch(prior), _batch(prior > 0.5), passes=1)
    np.testing.assert_allclose(plain["affine"][0, :, 3], shift + bias, atol=0.05)
    sym = predictor.predict(_batch(new), _batch(prior), _batch(prior > 0.5), passes=1, symmetric=True)
    np.testing.assert_allclose(sym["affine"][0, :, 3], shift, atol=0.05)
    np.testing.assert_allclose(sym["affine"][0, :, :3], np.eye(3), atol=1e-9)


def test_symmetric_default_from_config_and_override():
    cfg = config.get_config("test")
    cfg.model.affine_symmetric = True
    calls = []

    def run(new, prior, mask):
        calls.append(1)
        return _outputs(new, prior, mask, np.eye(4)[:3], np.zeros((S, S, S, 3), np.float32))

    predictor = Predictor(cfg, 3, run)
    blob = _batch(_blob((16, 16, 16)))
    predictor.predict(blob, blob, blob > 0.5)
    assert predictor.symmetric and len(calls) == 3
    calls.clear()
    predictor.affine_symmetric = False  # what spirs predict --affine-symmetric off sets
    predictor.predict(blob, blob, blob > 0.5)
    assert not predictor.symmetric and len(calls) == 1


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_config_refuses_bad_affine_symmetric(bad):
    cfg = config.get_config("test")
    cfg.model.affine_symmetric = bad
    with pytest.raises(SpirsInputError, match="affine_symmetric"):
        cfg.validate()
