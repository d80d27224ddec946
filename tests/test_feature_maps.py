import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from dpfp_jax.feature_maps import REGISTRY, favor_projection, is_non_negative, sign_probe


def dpfp_original_numpy(x: np.ndarray, nu: int) -> np.ndarray:
    """dpfp-pytorch's definition, transcribed line by line: repeat(x) * concat(rolls)."""
    x = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)
    x_rolled = np.concatenate([np.roll(x, shift=j, axis=-1) for j in range(1, nu + 1)], axis=-1)
    x_repeat = np.concatenate([x] * nu, axis=-1)
    return x_repeat * x_rolled


@pytest.mark.parametrize("nu", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4, 8), (1, 16)])
def test_dpfp_matches_original_definition(nu, shape):
    x = np.random.default_rng(nu).standard_normal(shape).astype(np.float32)
    got = np.asarray(dj.dpfp(jnp.asarray(x), nu=nu))
    assert got.shape == (*shape[:-1], 2 * nu * shape[-1])
    np.testing.assert_allclose(got, dpfp_original_numpy(x, nu), rtol=1e-6, atol=0)
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


def test_registry_is_the_one_list_of_maps():
    from dpfp_jax.feature_maps import REGISTRY, FeatureMap

    assert dj.FEATURE_MAPS == tuple(REGISTRY) == ("dpfp", "linear", "favor", "relu", "identity")
    for name, entry in REGISTRY.items():
        assert isinstance(entry, FeatureMap) and entry.name == name
    with pytest.raises(TypeError):
        REGISTRY["tanh"] = REGISTRY["relu"]
    with pytest.raises(AttributeError):
        REGISTRY["relu"].width = REGISTRY["dpfp"].width


@pytest.mark.parametrize("name", dj.FEATURE_MAPS)
@pytest.mark.parametrize("dim", [1, 6])
def test_every_registered_width_matches_its_function(name, dim):
    from dpfp_jax.feature_maps import REGISTRY

    entry = REGISTRY[name]
    given = dict(nu=3, num_features=5, projection=dj.favor_projection(jax.random.key(0), 5, dim))
    x = jax.random.normal(jax.random.key(1), (2, 3, dim))
    out = entry.fn(x, **{o: given[o] for o in entry.options})
    width = entry.width(dim, **{o: given[o] for o in entry.width_options})
    assert out.shape == (2, 3, width)
    assert dj.feature_dim(name, dim, nu=3, num_features=5) == width
    projection = given["projection"] if "projection" in entry.options else None
    np.testing.assert_array_equal(dj.apply_feature_map(name, x, nu=3, projection=projection), out)


def test_feature_dim_and_apply_take_a_callable():
    fn = lambda x: dj.dpfp(x, 2)  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    assert dj.feature_dim(fn, 5) == dj.feature_dim("dpfp", 5, nu=2) == 20
    np.testing.assert_array_equal(dj.apply_feature_map(fn, x), dj.apply_feature_map("dpfp", x, nu=2))
    with pytest.raises(ValueError, match="projection is only used by feature_map 'favor'; got it for <function"):
        dj.apply_feature_map(fn, x, projection=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="feature axis"):
        dj.apply_feature_map(fn, jnp.float32(1.0))
    with pytest.raises(ValueError, match="keeping the leading shape"):
        dj.apply_feature_map(lambda x: x.reshape(-1), x)
    with pytest.raises(ValueError, match="keeping the leading shape"):
        dj.feature_dim(lambda x: x.sum(), 5)


@pytest.mark.parametrize("feature_map", [3, None, ["dpfp"]])
def test_feature_map_neither_name_nor_callable(feature_map):
    with pytest.raises(TypeError, match=r"feature_map must be one of .* or a callable .*; got .* of type"):
        dj.feature_dim(feature_map, 4)
    with pytest.raises(TypeError, match=r"feature_map must be one of .* or a callable"):
        dj.apply_feature_map(feature_map, jnp.ones(4))


@pytest.mark.parametrize("name", dj.FEATURE_MAPS)
def test_each_registered_sign_flag_is_what_the_map_gives(name):
    x = jnp.asarray(sign_probe(8))
    projection = favor_projection(jax.random.key(0), 16, 8) if name == "favor" else None
    features = np.asarray(dj.apply_feature_map(name, x, nu=2, projection=projection))
    assert is_non_negative(name, 8) == REGISTRY[name].non_negative == bool((features >= 0).all())


def test_a_callable_is_signed_when_the_probe_finds_a_negative_feature():
    assert not is_non_negative(jnp.tanh, 4) and not is_non_negative(lambda x: x - 2.5, 4)
    assert is_non_negative(jax.nn.softplus, 4) and is_non_negative(lambda x: x**2, 4)
    with pytest.raises(ValueError, match="keeping the leading shape"):
        is_non_negative(lambda x: x.sum(-1), 4)
