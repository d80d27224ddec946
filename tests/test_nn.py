"""Flax modules: the original package's usage, its bugs fixed, decoding, segments, masks, dtypes, training.

The original package is the PyTorch dpfp-pytorch; docs/original_package.md lists its bugs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpfp_jax as dj
from dpfp_jax.core.transformer import stack_layer_params, unstack_layer_params
from dpfp_jax.nn.attention import split_heads_projection
from tests.helpers import JAX_SENSITIVE, assert_bounded_and_not_drifting, close, normal

CONFIGS = [
    dict(feature_map="dpfp", nu=2, rule="delta", normalization="sum"),
    dict(feature_map="dpfp", nu=1, rule="sum", normalization="attention"),
    dict(feature_map="linear", rule="delta", normalization="sum"),
    dict(feature_map="linear", rule="sum", normalization="attention"),
    dict(feature_map="favor", num_features=8, rule="delta", normalization="sum"),
    dict(feature_map="favor", num_features=8, rule="sum", normalization="attention"),
    dict(feature_map="relu", rule="sum", normalization="none"),
    dict(feature_map="identity", rule="delta", normalization="l2"),
    dict(feature_map="identity", rule="delta", normalization="none", allow_unbounded_delta=True),
]
CONFIG_IDS = [f"{c['feature_map']}-{c['rule']}-{c['normalization']}" for c in CONFIGS]


# --- the original package's four README examples, in Flax form ---------------------------------


@JAX_SENSITIVE
def test_original_example_dpfpformer():
    v, dim, depth, batch = 1, 128, 3, 16
    model = dj.DPFPformer(dim, depth, nu=v)
    x = normal(0, (batch, 16, dim))  # b, seq, dim
    variables = model.init(jax.random.key(1), x)
    x = model.apply(variables, x)
    assert x.shape == (batch, 16, dim) and jnp.isfinite(x).all()


@JAX_SENSITIVE
def test_original_example_dpfp_attention():
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


def test_original_example_dpfp_cell():
    nu, dim = 1, 128
    m = dj.DPFPCell(dim, nu=nu)
    W = jnp.zeros(m.get_memory_shape(1))
    assert W.shape == (1, 2 * nu * dim, dim)
    x = normal(0, (1, dim))
    variables = m.init(jax.random.key(1), x, W)
    y, W = m.apply(variables, x, W)
    assert y.shape == (1, dim) and W.shape == (1, 2 * nu * dim, dim)


def test_original_example_projection():
    features = normal(0, (4, 3, 256, 256))
    assert dj.dpfp(features).shape == (4, 3, 256, 512)
    assert dj.dpfp(features, nu=2).shape == (4, 3, 256, 1024)


# --- the original package's bugs, fixed --------------------------------------------------------


def test_attention_recurs_over_time():
    # Original package's bug 1: without CUDA every position read the pre-sequence W.
    m = dj.DPFPAttention(16, num_heads=2, head_dim=8)
    x = normal(0, (1, 6, 16))
    variables = m.init(jax.random.key(1), x)
    y, _ = m.apply(variables, x)
    y2, _ = m.apply(variables, x.at[:, 0].add(1.0))
    assert not np.allclose(y[:, 5], y2[:, 5])  # the last output sees the first token
    y3, _ = m.apply(variables, x.at[:, 5].add(1.0))
    close(y3[:, :5], y[:, :5])  # and nothing sees the future


def test_cell_looped_equals_sequence_layer():
    # Original package's bug 2: the cell multiplied elementwise instead of applying W.
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
    # Original package's bug 3: one layer's W went into the next, and W came back detached.
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


@JAX_SENSITIVE
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_padding_mask(config):
    # Original package's bug 4: `if mask:` failed on arrays, and masked tokens still wrote to the memory.
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


PADDED_IMPLS = ["reference", "scan", "chunk", "auto"]  # "pallas" needs a GPU


def padded_batch(length: int = 70):
    """x ``[2, length, 8]`` and a mask padding row 0 at the front and in the middle, row 1 at the end.

    70 steps are more than the default chunk of 64: ``auto`` takes ``chunk``, over two chunks.
    """
    t = jnp.arange(length)
    mask = jnp.stack([(t >= 5) & ((t < 30) | (t >= 34)), t < 50])
    return normal(0, (2, length, 8)), mask


@pytest.mark.parametrize("config", CONFIGS[:2], ids=CONFIG_IDS[:2])
@pytest.mark.parametrize("impl", PADDED_IMPLS)
@pytest.mark.parametrize("module", ["FastWeightAttention", "DPFPformer"])
def test_non_finite_padding_reaches_nothing(module, impl, config):
    # A padded token's value, NaN and inf included, must reach neither a real token's output, nor
    # the memory, nor the gradients: the results equal those of zeros at the padding, bit for bit.
    x, mask = padded_batch()
    if module == "FastWeightAttention":
        model = dj.FastWeightAttention(num_heads=2, head_dim=4, impl=impl, **config)
        options = {}
    else:
        model = dj.DPFPformer(8, 1, num_heads=2, head_dim=4, impl=impl, **config)
        options = dict(return_memory=True)
    params = model.init(jax.random.key(1), x)["params"]
    weights = normal(2, x.shape)

    @jax.jit
    def run(params, x):
        def loss(params, x):
            y, memory = model.apply({"params": params}, x, mask=mask, **options)
            return jnp.sum(y * weights) + sum(jnp.sum(m) for m in jax.tree.leaves(memory)), (y, memory)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    want = run(params, jnp.where(mask[:, :, None], x, 0.0))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(want))
    for bad in (np.nan, np.inf, -np.inf):
        got = run(params, jnp.where(mask[:, :, None], x, bad))
        (d_params, d_x), (y, memory) = got
        assert np.isfinite(np.asarray(y)).all(), bad
        assert all(np.isfinite(np.asarray(m)).all() for m in jax.tree.leaves(memory)), bad
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(d_params)), bad
        close(got, want, rtol=0, atol=0)
        assert not np.asarray(y)[~np.asarray(mask)].any()  # padded outputs are zeros


MASK_MODULES = {
    "FastWeightAttention": lambda: dj.FastWeightAttention(num_heads=2, head_dim=4),
    "DPFPAttention": lambda: dj.DPFPAttention(8, num_heads=2, head_dim=4),
    "DPFPformer": lambda: dj.DPFPformer(8, 1, num_heads=2, head_dim=4),
}


@pytest.mark.parametrize("name", MASK_MODULES)
def test_mask_must_be_boolean_or_integer_0_1(name):
    model = MASK_MODULES[name]()
    x = normal(0, (2, 5, 8))
    variables = model.init(jax.random.key(1), x)
    mask = jnp.arange(5)[None] < jnp.array([[5], [3]])
    want = model.apply(variables, x, mask=mask)
    for integer_mask in (mask.astype(jnp.int32), mask.astype(jnp.uint8), np.asarray(mask, np.int64)):
        close(model.apply(variables, x, mask=integer_mask), want, rtol=0, atol=0)
    # Traced under jit, an integer mask's values cannot be checked; it is still read as mask != 0
    # (compiled whole, the model may round differently from op by op).
    close(jax.jit(lambda m: model.apply(variables, x, mask=m))(mask.astype(jnp.int32)), want)
    for float_mask in (mask * 0.5, mask * 2.0, mask.astype(jnp.bfloat16), np.asarray(mask, np.float64)):
        with pytest.raises(TypeError, match=r"mask must be boolean or integer 0/1.*got dtype (float|bfloat)"):
            model.apply(variables, x, mask=float_mask)
    with pytest.raises(ValueError, match=r"integer mask must hold only 0 and 1; got the values \[-1, 2\]"):
        model.apply(variables, x, mask=mask.astype(jnp.int32).at[0, 0].set(2).at[1, 4].set(-1))


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_rate_outside_0_1_is_refused(rate):
    x = normal(0, (1, 3, 8))
    cases = [
        (dj.FastWeightAttention(num_heads=2, head_dim=4, dropout_rate=rate), "dropout_rate"),
        (dj.DPFPAttention(8, num_heads=2, head_dim=4, dropout_rate=rate), "dropout_rate"),
        (dj.DPFPformer(8, 1, num_heads=2, head_dim=4, attention_dropout_rate=rate), "attention_dropout_rate"),
        (dj.DPFPformer(8, 1, num_heads=2, head_dim=4, ff_dropout_rate=rate), "ff_dropout_rate"),
        (dj.nn.FeedForward(dropout_rate=rate), "dropout_rate"),
    ]
    for model, name in cases:
        with pytest.raises(ValueError, match=rf"^{name} must be in \[0, 1\); got {rate}"):
            model.init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="dropout_rate must be a float"):
        dj.DPFPAttention(8, num_heads=2, head_dim=4, dropout_rate="0.1").init(jax.random.key(0), x)


# --- recurrent decoding and carried memory -----------------------------------------------------


@JAX_SENSITIVE
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


@JAX_SENSITIVE
@pytest.mark.parametrize("module", ["FastWeightAttention", "DPFPformer"])
def test_decode_without_the_cache_is_refused(module):
    # It used to restart the memory empty at every call, silently.
    if module == "FastWeightAttention":
        decoder = dj.FastWeightAttention(num_heads=2, head_dim=4, decode=True)
    else:
        decoder = dj.DPFPformer(8, 2, num_heads=2, head_dim=4, decode=True)
    x = normal(0, (2, 4, 8))
    params = decoder.init(jax.random.key(1), x)["params"]
    for mutable in (False, ["cache"]):
        with pytest.raises(ValueError, match=r"got no cache: pass .*'cache'.*mutable=\['cache'\]"):
            decoder.apply({"params": params}, x[:, :1], mutable=mutable)


@pytest.mark.parametrize("config", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_decode_cache_of_another_batch_is_named(config):
    decoder = dj.FastWeightAttention(num_heads=2, head_dim=4, decode=True, **config)
    variables = decoder.init(jax.random.key(1), normal(0, (2, 4, 8)))
    shape = decoder.get_memory_shape(2)
    with pytest.raises(ValueError, match=rf"decode cache's fast_weights has shape \({shape[0]}, {shape[1]}, "
                                         rf"{shape[2]}, {shape[3]}\) \(batch 2\), but x of batch 3"):
        decoder.apply(variables, normal(0, (3, 1, 8)), mutable=["cache"])


@JAX_SENSITIVE
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


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_empty_segments_and_batches(config):
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, **config)
    x = normal(0, (2, 5, 8))
    variables = layer.init(jax.random.key(1), x)
    _, memory = layer.apply(variables, x)
    # A segment of no steps outputs nothing and leaves the memory as it was (or empty, from None).
    y, same = layer.apply(variables, x[:, :0], memory, mask=jnp.ones((2, 0), bool))
    assert y.shape == (2, 0, 8)
    close(same, memory)
    _, fresh = layer.apply(variables, x[:, :0])
    close(fresh, jax.tree.map(jnp.zeros_like, memory))
    y, empty = layer.apply(variables, x[:0])
    assert y.shape == (0, 5, 8) and all(m.shape[0] == 0 for m in jax.tree.leaves(empty))


def test_empty_inputs_to_dpfp_attention_and_dpfpformer():
    x = normal(0, (2, 5, 8))
    attention = dj.DPFPAttention(8, num_heads=2, head_dim=4)
    model = dj.DPFPformer(8, 2, num_heads=2, head_dim=4)
    for module, kwargs in ((attention, {}), (model, dict(return_memory=True))):
        variables = module.init(jax.random.key(1), x)
        _, memory = module.apply(variables, x, **kwargs)
        y, same = module.apply(variables, x[:, :0], memory, **kwargs)
        assert y.shape == (2, 0, 8)
        close(same, memory)
        _, fresh = module.apply(variables, x[:, :0], **kwargs)
        close(fresh, jax.tree.map(jnp.zeros_like, memory))
        y, empty = module.apply(variables, x[:0], **kwargs)
        assert y.shape == (0, 5, 8) and all(m.shape[0] == 0 for m in jax.tree.leaves(empty))


@JAX_SENSITIVE
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


# --- scanned layers ---------------------------------------------------------------------------


def scanned_and_unscanned(depth: int, **config):
    """The same DPFPformer unscanned and with ``scan_layers=True``."""
    unscanned = dj.DPFPformer(8, depth, num_heads=2, head_dim=4, nu=2, **config)
    return unscanned, unscanned.clone(scan_layers=True)


def packed_inputs():
    """x [2, 6, 8], a mask and segment ids for the scanned-layer tests."""
    mask = jnp.arange(6)[None, :] < jnp.array([[6], [4]])
    return normal(0, (2, 6, 8)), mask, jnp.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def test_scanned_layers_give_the_unscanned_outputs():
    # The cheap case in make test: outputs and memories; the gradients are in the slow test below.
    unscanned, scanned = scanned_and_unscanned(2, normalization="attention", rule="sum")
    x, mask, segment_ids = packed_inputs()
    params = jax.jit(unscanned.init)(jax.random.key(1), x)["params"]
    stacked = stack_layer_params(params, 2)
    assert jax.tree.map(jnp.shape, jax.eval_shape(scanned.init, jax.random.key(1), x)["params"]) == jax.tree.map(
        jnp.shape, stacked)
    memory = (None, (normal(1, (2, 2, 16, 4)), normal(2, (2, 2, 16))))  # a None layer starts empty in both

    @jax.jit
    def both(params, stacked):
        options = dict(mask=mask, segment_ids=segment_ids, return_memory=True)
        return (unscanned.apply({"params": params}, x, memory, **options),
                scanned.apply({"params": stacked}, x, memory, **options))

    want, got = both(params, stacked)
    close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("pre_norm", [True, False])
def test_scanned_layers_equal_the_unscanned_stack(pre_norm):
    depth = 3
    unscanned, scanned = scanned_and_unscanned(depth, pre_norm=pre_norm, normalization="attention", rule="sum")
    x, mask, segment_ids = packed_inputs()
    params = unscanned.init(jax.random.key(1), x)["params"]
    stacked = stack_layer_params(params, depth)
    scanned_init = scanned.init(jax.random.key(1), x)["params"]
    # split_rngs: each layer draws its own initial values
    assert not np.allclose(scanned_init["blocks"]["attention"]["qkv"]["kernel"][0],
                           scanned_init["blocks"]["attention"]["qkv"]["kernel"][1])
    _, memory = unscanned.apply({"params": params}, normal(1, (2, 3, 8)), return_memory=True)
    memory = (memory[0], None, memory[2])

    def loss(model, params):
        y, new_memory = model.apply({"params": params}, x, memory, mask=mask, segment_ids=segment_ids,
                                    return_memory=True)
        return jnp.sum(y**2) + sum(jnp.sum(leaf) for leaf in jax.tree.leaves(new_memory)), (y, new_memory)

    def value_and_grad(model, params):
        return jax.jit(jax.value_and_grad(functools.partial(loss, model), has_aux=True))(params)

    (want_loss, want), want_grads = value_and_grad(unscanned, params)
    (got_loss, got), got_grads = value_and_grad(scanned, stacked)
    close(got, want)
    close(got_loss, want_loss)
    close(unstack_layer_params(got_grads, depth), want_grads, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_scanned_layers_decode_token_by_token():
    unscanned, scanned = scanned_and_unscanned(2, decode=True)
    x = normal(0, (2, 5, 8))
    variables = unscanned.init(jax.random.key(1), x)
    want = unscanned.clone(decode=False).apply(variables, x)
    cache = scanned.init(jax.random.key(1), x)["cache"]
    assert cache["blocks"]["attention"]["fast_weights"].shape[0] == 2  # one cache per layer, stacked
    params = stack_layer_params(variables["params"], 2)
    step = jax.jit(functools.partial(scanned.apply, mutable=["cache"]))
    ys = []
    for t in range(5):
        y, updates = step({"params": params, "cache": cache}, x[:, t : t + 1])
        cache = updates["cache"]
        ys.append(y)
    close(jnp.concatenate(ys, axis=1), want)
    with pytest.raises(ValueError, match="this apply got no cache"):
        scanned.apply({"params": params}, x[:, :1], mutable=["cache"])


def test_scanned_layers_refuse_favor():
    _, scanned = scanned_and_unscanned(2, feature_map="favor", num_features=8)
    with pytest.raises(ValueError, match="scan_layers=True .* feature_map='favor'"):
        scanned.init(jax.random.key(0), normal(0, (1, 2, 8)))


# --- dtypes, gradients, training ---------------------------------------------------------------


@JAX_SENSITIVE
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


@JAX_SENSITIVE
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


@JAX_SENSITIVE
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


@JAX_SENSITIVE
def test_dropout_is_active_only_when_not_deterministic():
    m = dj.DPFPAttention(8, num_heads=2, head_dim=4, dropout_rate=0.5)
    x = normal(0, (2, 5, 8))
    variables = m.init(jax.random.key(1), x)
    close(m.apply(variables, x), m.apply(variables, x))
    y, _ = m.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert float((y == 0).mean()) > 0.3


# --- the delta rule's stability condition -------------------------------------------------------

NON_NEGATIVE_MAPS = ("dpfp", "linear", "favor", "relu")  # sum-normalisable; identity is not
STABLE_DELTA = [(f, n) for f in dj.FEATURE_MAPS for n in ("sum", "l2") if n == "l2" or f in NON_NEGATIVE_MAPS]


@pytest.mark.parametrize("feature_map, normalization", STABLE_DELTA)
def test_normalised_delta_rule_stays_bounded_at_t_65536(feature_map, normalization):
    # |phi(k)| <= 1 and beta = sigmoid in (0, 1): every step is non-expanding, for any length.
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, feature_map=feature_map, num_features=4,
                                   rule="delta", normalization=normalization, impl="scan")
    x = normal(0, (1, 65536, 8))
    variables = jax.jit(layer.init)(jax.random.key(1), x[:, :1])
    y, state = jax.jit(layer.apply)(variables, x)
    # The layer's own k, v and beta, to check its state against the bound they imply.
    projection = jnp.einsum("btd,dhe->bthe", x, variables["params"]["qkv"]["kernel"])
    _, k, v, beta = split_heads_projection(projection, 4, with_beta=True)
    phi_k = layer.apply(variables, k, method=layer._features)
    assert float(jnp.sum(phi_k**2, axis=-1).max()) <= 1.0 + 1e-6
    assert_bounded_and_not_drifting(y, state, phi_k, v, beta)


def test_delta_rule_without_normalization_needs_an_explicit_opt_in():
    x = normal(0, (1, 3, 8))
    raw = dict(num_heads=2, head_dim=4, rule="delta", normalization="none")
    for module in (dj.FastWeightAttention(**raw), dj.DPFPformer(8, 1, **raw)):
        with pytest.raises(ValueError, match=r"normalization='none' with rule='delta'") as error:
            module.init(jax.random.key(0), x)
        message = str(error.value)
        assert "0 <= beta |phi(k)|^2 <= 2" in message and "allow_unbounded_delta=True" in message
        assert "normalization='sum'" in message and "'l2'" in message
    # Opted in, the layer runs on raw features: the op on phi(q), phi(k) as they come.
    layer = dj.FastWeightAttention(**raw, feature_map="relu", allow_unbounded_delta=True)
    variables = layer.init(jax.random.key(0), x)
    y, state = layer.apply(variables, x)
    projection = jnp.einsum("btd,dhe->bthe", x, variables["params"]["qkv"]["kernel"])
    q, k, v, beta = split_heads_projection(projection, 4, with_beta=True)
    _, want_state = dj.fast_weight(jax.nn.relu(q), jax.nn.relu(k), v, beta)
    close(state, want_state)
    model = dj.DPFPformer(8, 1, **raw, allow_unbounded_delta=True)
    assert model.apply(model.init(jax.random.key(0), x), x).shape == x.shape


def test_attention_normalization_error_recommends_bounded_delta_normalisations():
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, rule="delta", normalization="attention")
    with pytest.raises(ValueError, match="normalization='attention'") as error:
        layer.init(jax.random.key(0), jnp.ones((1, 3, 8)))
    assert "'l2'" in str(error.value) and "'none'" not in str(error.value)


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
        (dict(rule="delta", normalization="none"), "allow_unbounded_delta"),
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


# --- callable feature maps ------------------------------------------------------------------

CALLABLE_EQUIVALENTS = [
    (dict(feature_map="dpfp", nu=2), lambda x: dj.dpfp(x, 2), 2 * 2 * 4),
    (dict(feature_map="favor", num_features=3, favor_seed=5),
     lambda x: dj.favor(x, dj.favor_projection(jax.random.key(5), 3, 4)), 2 * 3),
    (dict(feature_map="linear"), dj.elu_plus_one, 4),
]


@JAX_SENSITIVE
@pytest.mark.parametrize("normalization", ["sum", "attention"])
@pytest.mark.parametrize("named, fn, key_dim", CALLABLE_EQUIVALENTS, ids=["dpfp", "favor", "linear"])
def test_callable_feature_map_equals_its_name(named, fn, key_dim, normalization):
    rule = "sum" if normalization == "attention" else "delta"
    common = dict(num_heads=2, head_dim=4, rule=rule, normalization=normalization)
    by_name = dj.FastWeightAttention(**common, **named)
    by_callable = dj.FastWeightAttention(**common, feature_map=fn)
    assert by_callable.key_dim == by_name.key_dim == key_dim
    assert by_callable.get_memory_shape(3) == by_name.get_memory_shape(3) == (3, 2, key_dim, 4)
    x = normal(0, (3, 5, 8))
    variables = by_name.init(jax.random.key(1), x)
    y, memory = by_name.apply(variables, x)
    y_callable, memory_callable = by_callable.apply(variables, x)
    close(y_callable, y)
    close(memory_callable, memory)
    # Continuing from a memory checks its shape against the callable's K.
    close(by_callable.apply(variables, x, memory_callable), by_name.apply(variables, x, memory))


def test_dpfpformer_with_a_callable_feature_map_equals_its_name():
    common = dict(dim=8, depth=2, num_heads=2, head_dim=4)
    by_name = dj.DPFPformer(**common, feature_map="dpfp", nu=3)
    by_callable = dj.DPFPformer(**common, feature_map=lambda x: dj.dpfp(x, 3))
    x = normal(0, (2, 5, 8))
    variables = by_name.init(jax.random.key(1), x)
    y, memories = by_name.apply(variables, x, return_memory=True)
    y_callable, memories_callable = by_callable.apply(variables, x, return_memory=True)
    close(y_callable, y)
    close(memories_callable, memories)
    assert memories_callable[0].shape == (2, 2, 2 * 3 * 4, 4)


def test_decode_with_a_callable_feature_map():
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, feature_map=lambda x: dj.dpfp(x, 2), decode=True)
    x = normal(0, (1, 4, 8))
    variables = layer.init(jax.random.key(1), x)
    assert variables["cache"]["fast_weights"].shape == (1, 2, 16, 4)
    full, _ = layer.clone(decode=False).apply({"params": variables["params"]}, x)
    cache = variables["cache"]
    for t in range(4):
        (y, _), updated = layer.apply({"params": variables["params"], "cache": cache}, x[:, t : t + 1],
                                      mutable=["cache"])
        cache = updated["cache"]
        close(y, full[:, t : t + 1])


@pytest.mark.parametrize(
    "fn, error, match",
    [
        (lambda x: x.sum(-1), ValueError,
         r"keeping the leading shape; .* mapped an input of shape \(4,\) to shape \(\)"),
        (lambda x: x[..., None] * x[..., None, :], ValueError, r"shape \(4,\) to shape \(4, 4\)"),
        (lambda x: x[..., :0], ValueError, r"K >= 1"),
        (lambda x: (x, x), ValueError, "a tuple"),
        (lambda x: (x > 0).astype(jnp.int32), TypeError, "floating features"),
        # Right on one [d] vector, wrong on the layer's [B, T, H, d]: caught when applied.
        (lambda x: x.reshape(-1), ValueError, r"mapped an input of shape \(1, 3, 2, 4\) to shape \(24,\)"),
        (lambda x: jnp.concatenate([x] * x.ndim, axis=-1), ValueError, "must depend on d alone"),
    ],
    ids=["drops-axis", "adds-axis", "empty", "tuple", "int", "flattens", "width-by-rank"],
)
def test_bad_callable_feature_map_is_refused(fn, error, match):
    # l2: these maps are signed, which sum normalisation refuses first (test_settings.py).
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, feature_map=fn, normalization="l2")
    with pytest.raises(error, match=match):
        layer.init(jax.random.key(0), jnp.ones((1, 3, 8)))


@pytest.mark.parametrize("feature_map", [3, None, ("dpfp",), b"dpfp"])
def test_feature_map_neither_name_nor_callable_is_a_type_error(feature_map):
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, feature_map=feature_map)
    match = r"feature_map must be one of \('dpfp', .*\) or a callable \[\.\.\., d\] -> \[\.\.\., K\]; got"
    with pytest.raises(TypeError, match=match):
        layer.get_memory_shape(1)
    with pytest.raises(TypeError, match=match):
        layer.init(jax.random.key(0), jnp.ones((1, 3, 8)))
    with pytest.raises(TypeError, match=match):
        model = dj.DPFPformer(8, 1, num_heads=2, head_dim=4, feature_map=feature_map)
        model.init(jax.random.key(0), jnp.ones((1, 3, 8)))
