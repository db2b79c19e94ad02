import numpy as np

from spirs_tf import geometry as G


def test_identity_params_give_identity_matrix():
    np.testing.assert_allclose(G.params_to_matrix(G.IDENTITY_PARAMS), np.eye(3, 4), atol=1e-7)


def test_known_rotation_about_axis_0():
    p = G.IDENTITY_PARAMS.copy()
    p[3] = np.pi / 2
    m = G.params_to_matrix(p)
    np.testing.assert_allclose(m[:, :3], [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-6)


def test_invert_affine_round_trip(rng):
    p = G.IDENTITY_PARAMS + rng.normal(0, 0.05, 15).astype(np.float32)
    m = G.params_to_matrix(p)
    shape = (8, 10, 12)
    fwd = G.sample_locations(m, shape)
    back = np.einsum("ab,bijk->aijk", G.invert_affine(m)[:, :3], fwd - G.grid_centre(shape).reshape(3, 1, 1, 1))
    back += G.invert_affine(m)[:, 3].reshape(3, 1, 1, 1) + G.grid_centre(shape).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(back, G.sample_locations(None, shape), atol=1e-4)


def test_translation_scales_with_grid():
    m = np.eye(3, 4, dtype=np.float32)
    m[:, 3] = [4, -2, 1]
    np.testing.assert_allclose(G.scale_translation(m, 0.5)[:, 3], [2, -1, 0.5])
