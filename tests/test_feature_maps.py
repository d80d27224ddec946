import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj


def dpfp_seed_numpy(x: np.ndarray, nu: int) -> np.ndarray:
    """The seed's definition, transcribed line by line: repeat(x) * concat(rolls)."""
    x = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)
    x_rolled = np.concatenate([np.roll(x, shift=j, axis=-1) for j in range(1, nu + 1)], axis=-1)
    x_repeat = np.concatenate([x] * nu, axis=-1)
    return x_repeat * x_rolled


@pytest.mark.parametrize("nu", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4, 8), (1, 16)])
def test_dpfp_matches_seed_definition(nu, shape):
    x = np.random.default_rng(nu).standard_normal(shape).astype(np.float32)
    got = np.asarray(dj.dpfp(jnp.asarray(x), nu=nu))
    assert got.shape == (*shape[:-1], 2 * nu * shape[-1])
    np.testing.assert_allclose(got, dpfp_seed_numpy(x, nu), rtol=1e-6, atol=0)
    assert (got >= 0).all()


def test_dpfp_zero_input_and_sum_norm_stay_finite():
    phi = dj.dpfp(jnp.zeros((2, 6)), nu=3)
    assert phi.shape == (2, 36)
    assert not phi.any()
    normed = dj.sum_norm(phi)
    assert jnp.isfinite(normed).all()
    assert not normed.any()


def test_sum_norm_rows_sum_to_one():
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 9))) + 0.1
    np.testing.assert_allclose(dj.sum_norm(x).sum(-1), 1.0, rtol=1e-5)


def test_l2_norm_gives_unit_rows_of_the_same_direction():
    x = jax.random.normal(jax.random.key(0), (3, 5, 16))  # negative entries included
    y = dj.l2_norm(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(y, x / norms, rtol=1e-5, atol=1e-7)


def test_l2_norm_keeps_squared_norm_below_one():
    # s / (s + eps) <= 1 for every row, however small or large (float32 rounding aside):
    # beta |k|^2 <= 1 for beta <= 1, well inside the delta rule's 0..2.
    scales = jnp.array([1e-6, 1e-3, 1.0, 1e3, 1e6])[:, None]
    y = dj.l2_norm(scales * jax.random.normal(jax.random.key(1), (5, 8)))
    squared = jnp.sum(y**2, axis=-1)
    assert (squared <= 1.0 + 1e-6).all(), squared
    assert squared[0] < 0.01  # a row far below sqrt(eps) is not blown up to unit length


def test_l2_norm_zero_row_and_its_gradient_stay_finite():
    zeros = jnp.zeros((2, 6))
    assert not dj.l2_norm(zeros).any()
    jacobian = jax.jacobian(lambda x: dj.l2_norm(x, eps=1e-6))(jnp.zeros(6))
    # At zero the map is x * rsqrt(eps): its Jacobian is rsqrt(eps) * I, finite.
    np.testing.assert_allclose(jacobian, np.eye(6) * 1e3, rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(dj.l2_norm(x) * jnp.arange(6.0)))(zeros)
    assert jnp.isfinite(grad).all()


def test_l2_norm_bfloat16_keeps_dtype_and_sums_wide():
    x = jax.random.normal(jax.random.key(2), (4, 256)).astype(jnp.bfloat16)
    y = dj.l2_norm(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(jnp.linalg.norm(y.astype(jnp.float32), axis=-1), 1.0, rtol=1e-2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_dpfp_rejects_bad_nu(bad):
    with pytest.raises((TypeError, ValueError), match="nu"):
        dj.dpfp(jnp.ones(3), nu=bad)


def test_dpfp_rejects_scalar():
    with pytest.raises(ValueError, match="feature axis"):
        dj.dpfp(jnp.float32(1.0))


def test_elementwise_maps():
    x = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(dj.elu_plus_one(x), [np.exp(-2.0), 1.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(dj.relu(x), [0.0, 0.0, 3.0])
    np.testing.assert_array_equal(dj.identity(x), x)


def test_favor_projection_is_blockwise_orthogonal():
    w = dj.favor_projection(jax.random.key(1), 24, 8)
    assert w.shape == (24, 8)
    block = w[:8] / jnp.linalg.norm(w[:8], axis=-1, keepdims=True)
    np.testing.assert_allclose(block @ block.T, np.eye(8), atol=1e-5)
    iid = dj.favor_projection(jax.random.key(1), 24, 8, orthogonal=False)
    assert iid.shape == (24, 8)


def test_favor_estimates_softmax_kernel():
    # Unbiased: phi(x) . phi(y) averages to exp(x . y) over random projections.
    d = 4
    x = jnp.array([0.3, -0.2, 0.1, 0.4])
    y = jnp.array([-0.1, 0.5, 0.2, 0.0])
    w = dj.favor_projection(jax.random.key(2), 8192, d)
    phi_x, phi_y = dj.favor(x, w), dj.favor(y, w)
    assert phi_x.shape == (2 * 8192,)
    assert (phi_x > 0).all()
    np.testing.assert_allclose(phi_x @ phi_y, np.exp(x @ y), rtol=0.02)


def test_favor_rejects_mismatched_projection():
    with pytest.raises(ValueError, match="projection"):
        dj.favor(jnp.ones((2, 5)), jnp.ones((8, 4)))


@pytest.mark.parametrize(
    "name, kwargs, width",
    [("dpfp", {"nu": 3}, 6 * 10), ("linear", {}, 10), ("relu", {}, 10), ("identity", {}, 10),
     ("favor", {"num_features": 16}, 32)],
)
def test_feature_dim_matches_apply(name, kwargs, width):
    x = jnp.ones((2, 10))
    projection = dj.favor_projection(jax.random.key(0), 16, 10) if name == "favor" else None
    assert dj.feature_dim(name, 10, **kwargs) == width
    out = dj.apply_feature_map(name, x, nu=kwargs.get("nu", 1), projection=projection)
    assert out.shape == (2, width)


def test_feature_map_errors():
    with pytest.raises(ValueError, match="feature_map"):
        dj.feature_dim("softmax", 4)
    with pytest.raises(ValueError, match="num_features"):
        dj.feature_dim("favor", 4)
    with pytest.raises(ValueError, match="projection"):
        dj.apply_feature_map("favor", jnp.ones(4))
    with pytest.raises(ValueError, match="projection"):
        dj.apply_feature_map("dpfp", jnp.ones(4), projection=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="feature_map"):
        dj.apply_feature_map("tanh", jnp.ones(4))
