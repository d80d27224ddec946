"""Flax modules: the seed's usage, its bugs fixed, decoding, segments, masks, dtypes, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpfp_jax as dj

# Also run by `make test` with the newest jax admitted (.venv-newest): see the Makefile.
pytestmark = pytest.mark.jax_sensitive

CONFIGS = [
    dict(feature_map="dpfp", nu=2, rule="delta", normalization="sum"),
    dict(feature_map="dpfp", nu=1, rule="sum", normalization="attention"),
    dict(feature_map="linear", rule="delta", normalization="sum"),
    dict(feature_map="linear", rule="sum", normalization="attention"),
    dict(feature_map="favor", num_features=8, rule="delta", normalization="sum"),
    dict(feature_map="favor", num_features=8, rule="sum", normalization="attention"),
    dict(feature_map="relu", rule="sum", normalization="none"),
    dict(feature_map="identity", rule="delta", normalization="none"),
]
CONFIG_IDS = [f"{c['feature_map']}-{c['rule']}-{c['normalization']}" for c in CONFIGS]


def close(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


def normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


# --- the seed README's four examples, in Flax form -------------------------------------------


def test_seed_example_dpfpformer():
    v, dim, depth, batch = 1, 128, 3, 16
    model = dj.DPFPformer(dim, depth, nu=v)
    x = normal(0, (batch, 16, dim))  # b, seq, dim
    variables = model.init(jax.random.key(1), x)
    x = model.apply(variables, x)
    assert x.shape == (batch, 16, dim) and jnp.isfinite(x).all()


def test_seed_example_dpfp_attention():
    v, dim, batch = 1, 128, 1
    m = dj.DPFPAttention(dim, nu=v)
    x = normal(0, (batch, 16, dim))
    W = jnp.zeros(m.get_memory_shape(batch))
    assert W.shape == (batch, 8, 2 * v * 64, 64)
    variables = m.init(jax.random.key(1), x, W)
    y, W = m.apply(variables, x, W)
    assert y.shape == x.shape and W.shape == m.get_memory_shape(batch)
    # None means the same empty memory as zeros.
    close(m.apply(variables, x, None), (y, W))


def test_seed_example_dpfp_cell():
    nu, dim = 1, 128
    m = dj.DPFPCell(dim, nu=nu)
    W = jnp.zeros(m.get_memory_shape(1))
    assert W.shape == (1, 2 * nu * dim, dim)
    x = normal(0, (1, dim))
    variables = m.init(jax.random.key(1), x, W)
    y, W = m.apply(variables, x, W)
    assert y.shape == (1, dim) and W.shape == (1, 2 * nu * dim, dim)


def test_seed_example_projection():
    features = normal(0, (4, 3, 256, 256))
    assert dj.dpfp(features).shape == (4, 3, 256, 512)
    assert dj.dpfp(features, nu=2).shape == (4, 3, 256, 1024)


# --- the seed's bugs, fixed -------------------------------------------------------------------


def test_attention_recurs_over_time():
    # Seed bug 1: without CUDA every position read the pre-sequence W.
    m = dj.DPFPAttention(16, num_heads=2, head_dim=8)
    x = normal(0, (1, 6, 16))
    variables = m.init(jax.random.key(1), x)
    y, _ = m.apply(variables, x)
    y2, _ = m.apply(variables, x.at[:, 0].add(1.0))
    assert not np.allclose(y[:, 5], y2[:, 5])  # the last output sees the first token
    y3, _ = m.apply(variables, x.at[:, 5].add(1.0))
    close(y3[:, :5], y[:, :5])  # and nothing sees the future


def test_cell_looped_equals_sequence_layer():
    # Seed bug 2: the cell multiplied elementwise instead of applying W.
    dim, nu = 12, 2
    cell = dj.DPFPCell(dim, nu=nu)
    layer = dj.FastWeightAttention(num_heads=1, head_dim=dim, feature_map="dpfp", nu=nu, rule="delta",
                                   normalization="sum", out_features=dim)
    x = normal(0, (3, 7, dim))
    variables = layer.init(jax.random.key(1), x)
    want_y, want_w = layer.apply(variables, x)
    w = jnp.zeros(cell.get_memory_shape(3))
    ys = []
    for t in range(x.shape[1]):
        y_t, w = cell.apply(variables, x[:, t], w)
        ys.append(y_t)
    close(jnp.stack(ys, axis=1), want_y)
    close(w, want_w[:, 0])


def test_dpfpformer_keeps_one_live_memory_per_layer():
    # Seed bug 3: one layer's W went into the next, and W came back detached.
    model = dj.DPFPformer(16, 2, num_heads=2, head_dim=4)
    x = normal(0, (2, 5, 16))
    variables = model.init(jax.random.key(1), x)
    _, memories = model.apply(variables, x, return_memory=True)
    assert len(memories) == 2 and not np.allclose(memories[0], memories[1])
    # Each layer's memory input changes only that layer: feed layer 0's memory to layer 1 only.
    y_a = model.apply(variables, x[:, :2], [None, memories[1]])
    y_b = model.apply(variables, x[:, :2], [None, memories[0]])
    assert not np.allclose(y_a, y_b)

    def loss(params):
        _, mem = model.apply({"params": params}, x, return_memory=True)
        return sum(jnp.sum(m**2) for m in mem)

    grads = jax.grad(loss)(variables["params"])
    assert float(jnp.abs(grads["attention_0"]["qkv"]["kernel"]).sum()) > 0  # not detached


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_padding_mask(config):
    # Seed bug 4: `if mask:` failed on arrays, and masked tokens still wrote to the memory.
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, **config)
    x = normal(0, (2, 9, 8))
    lengths = jnp.array([9, 5])
    mask = jnp.arange(9)[None, :] < lengths[:, None]
    variables = layer.init(jax.random.key(1), x)
    y, memory = layer.apply(variables, x, mask=mask)
    assert not np.asarray(y[1, 5:]).any()  # masked outputs are zero
    y_short, memory_short = layer.apply(variables, x[1:, :5])
    close(y[1:, :5], y_short)
    close(jax.tree.map(lambda m: m[1:], memory), memory_short)


def test_dpfpformer_padding_leaves_real_tokens_alone():
    model = dj.DPFPformer(8, 2, num_heads=2, head_dim=4)
    x = normal(0, (1, 7, 8))
    mask = jnp.arange(7)[None] < 4
    variables = model.init(jax.random.key(1), x)
    y, memory = model.apply(variables, x, mask=mask, return_memory=True)
    y_short, memory_short = model.apply(variables, x[:, :4], return_memory=True)
    close(y[:, :4], y_short)
    close(memory, memory_short)


# --- recurrent decoding and carried memory -----------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_decode_token_by_token_equals_full_sequence(config):
    x = normal(0, (2, 6, 8))
    full = dj.FastWeightAttention(num_heads=2, head_dim=4, **config)
    variables = full.init(jax.random.key(1), x)
    want_y, want_memory = full.apply(variables, x)

    decoder = dj.FastWeightAttention(num_heads=2, head_dim=4, decode=True, **config)
    cache = decoder.init(jax.random.key(1), x)["cache"]
    assert not any(np.asarray(c).any() for c in jax.tree.leaves(cache))  # init leaves an empty memory
    ys = []
    for start, stop in [(0, 1), (1, 2), (2, 4), (4, 6)]:  # one or more tokens per call
        (y, memory), updates = decoder.apply(
            {"params": variables["params"], "cache": cache}, x[:, start:stop], mutable=["cache"]
        )
        cache = updates["cache"]
        ys.append(y)
    close(jnp.concatenate(ys, axis=1), want_y)
    close(memory, want_memory)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_carrying_memory_across_segments(config):
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, **config)
    x = normal(0, (2, 10, 8))
    variables = layer.init(jax.random.key(1), x)
    want_y, want_memory = layer.apply(variables, x)
    y1, memory = layer.apply(variables, x[:, :4])
    y2, memory = layer.apply(variables, x[:, 4:], memory)
    close(jnp.concatenate([y1, y2], axis=1), want_y)
    close(memory, want_memory)


def test_dpfpformer_segments_and_decode():
    model = dj.DPFPformer(8, 2, num_heads=2, head_dim=4, nu=2)
    x = normal(0, (2, 6, 8))
    variables = model.init(jax.random.key(1), x)
    want_y, want_memory = model.apply(variables, x, return_memory=True)
    y1, memory = model.apply(variables, x[:, :3], return_memory=True)
    y2, memory = model.apply(variables, x[:, 3:], memory, return_memory=True)
    close(jnp.concatenate([y1, y2], axis=1), want_y)
    close(memory, want_memory)

    decoder = dj.DPFPformer(8, 2, num_heads=2, head_dim=4, nu=2, decode=True)
    cache = decoder.init(jax.random.key(1), x)["cache"]
    ys = []
    for t in range(6):
        y, updates = decoder.apply({"params": variables["params"], "cache": cache}, x[:, t : t + 1],
                                   mutable=["cache"])
        cache = updates["cache"]
        ys.append(y)
    close(jnp.concatenate(ys, axis=1), want_y)


# --- dtypes, gradients, training ---------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_params_and_state():
    x = normal(0, (2, 12, 16))
    model32 = dj.DPFPAttention(16, num_heads=2, head_dim=8, nu=2)
    model16 = dj.DPFPAttention(16, num_heads=2, head_dim=8, nu=2, dtype=jnp.bfloat16)
    variables = model16.init(jax.random.key(1), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    y16, w16 = model16.apply(variables, x)
    y32, w32 = model32.apply(variables, x)
    assert y16.dtype == jnp.bfloat16 and w16.dtype == jnp.float32
    close(y16, y32, rtol=5e-2, atol=5e-2)
    close(w16, w32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("config", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_gradients_reach_every_parameter(config):
    model = dj.DPFPformer(8, 2, num_heads=2, head_dim=4, **{k: v for k, v in config.items()})
    x = normal(0, (2, 5, 8))
    variables = model.init(jax.random.key(1), x)
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) * normal(2, x.shape)))(
        variables["params"]
    )
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_a_few_optax_steps_lower_the_loss():
    # Toy task: predict the running mean of the inputs so far (needs memory of the past).
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16)(x)
            h = dj.DPFPformer(16, 1, num_heads=2, head_dim=8)(h)
            return nn.Dense(x.shape[-1])(h)

    x = normal(0, (8, 12, 4))
    target = jnp.cumsum(x, axis=1) / jnp.arange(1, 13)[None, :, None]
    model = Model()
    params = model.init(jax.random.key(1), x)["params"]
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, x) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_dropout_is_active_only_when_not_deterministic():
    m = dj.DPFPAttention(8, num_heads=2, head_dim=4, dropout_rate=0.5)
    x = normal(0, (2, 5, 8))
    variables = m.init(jax.random.key(1), x)
    close(m.apply(variables, x), m.apply(variables, x))
    y, _ = m.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert float((y == 0).mean()) > 0.3


# --- bad configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=0), "head_dim"),
        (dict(head_dim=2.5), "head_dim"),
        (dict(num_heads=-1), "num_heads"),
        (dict(nu=0), "nu"),
        (dict(feature_map="softmax"), "feature_map"),
        (dict(rule="hebb"), "rule"),
        (dict(normalization="layer"), "normalization"),
        (dict(rule="delta", normalization="attention"), "normalization='attention'"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    layer = dj.FastWeightAttention(**{**dict(num_heads=2, head_dim=4), **kwargs})
    with pytest.raises((TypeError, ValueError), match=match):
        layer.init(jax.random.key(0), jnp.ones((1, 3, 8)))


def test_bad_memory_and_inputs_raise():
    m = dj.DPFPAttention(8, num_heads=2, head_dim=4)
    x = jnp.ones((1, 3, 8))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="memory must be"):
        m.apply(variables, x, jnp.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="dim=8"):
        m.apply(variables, jnp.ones((1, 3, 9)))
    with pytest.raises(ValueError, match="mask must be"):
        m.apply(variables, x, mask=jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="nu"):
        dj.DPFPAttention(8, nu=0).get_memory_shape(1)
    attention_norm = dj.FastWeightAttention(num_heads=2, head_dim=4, rule="sum", normalization="attention")
    with pytest.raises(ValueError, match=r"\(W, z\) pair"):
        attention_norm.init(jax.random.key(0), x, jnp.zeros(attention_norm.get_memory_shape(1)))
    cell = dj.DPFPCell(8)
    with pytest.raises(ValueError, match="memory must be"):
        cell.init(jax.random.key(0), jnp.ones((1, 8)), jnp.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="one entry per layer"):
        dj.DPFPformer(8, 2, num_heads=2, head_dim=4).init(jax.random.key(0), x, [None])
    decoder = dj.DPFPAttention(8, num_heads=2, head_dim=4, decode=True)
    with pytest.raises(ValueError, match="cache"):
        decoder.init(jax.random.key(0), x, jnp.zeros(decoder.get_memory_shape(1)))
