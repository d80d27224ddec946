"""The drop-in causal self-attention (linen and NNX ``DPFPSelfAttention``): Flax's calling convention,
padding masks in Flax's shapes, refusals, and the one-line swap in a small transformer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpfp_jax as dj
from dpfp_jax import nnx as djnnx
from tests.helpers import JAX_SENSITIVE, close, normal

B, T, D, H = 2, 6, 16, 4
PAD = jnp.array([[True] * 6, [True] * 4 + [False] * 2])


def causal(pad=PAD):
    return nn.combine_masks(nn.make_attention_mask(pad, pad), nn.make_causal_mask(pad))


ONES = jnp.ones_like(PAD)
PADDING_MASKS = {
    "padding": nn.make_attention_mask(PAD, PAD),                         # float32 0/1, as Flax makes it
    "padding-and-causal": causal(),
    "key-padding": nn.make_attention_mask(ONES, PAD),                    # padded queries' rows not empty
    "key-padding-and-causal": nn.combine_masks(nn.make_attention_mask(ONES, PAD), nn.make_causal_mask(PAD)),
    "boolean-per-head": jnp.broadcast_to(causal() > 0, (B, H, T, T)),
    "integer-2d-causal-one-row": nn.make_causal_mask(PAD[:1])[0, 0].astype(jnp.int32),  # [T, T]: no padding
    "flax-key-padding-b11t": PAD[:, None, None, :],                      # Flax's usual pad[:, None, None, :]
}


def reference(params, x, pad):
    """The fast-weight layer underneath, given the padding as its own [B, T] mask."""
    layer = dj.FastWeightAttention(num_heads=H, head_dim=D // H, out_features=D, use_bias=True)
    return layer.apply({"params": params["attention"]}, x, mask=pad)[0]


@JAX_SENSITIVE
@pytest.mark.parametrize("name", PADDING_MASKS)
def test_a_padding_mask_in_flax_shapes_is_the_padding(name):
    mask = PADDING_MASKS[name]
    pad = PAD if mask.ndim == 4 else None
    layer = dj.nn.DPFPSelfAttention(num_heads=H, qkv_features=D, out_features=D)
    x = normal(0, (B, T, D))
    params = layer.init(jax.random.key(1), x)["params"]
    want = reference(params, x, pad)
    close(layer.apply({"params": params}, x, mask=mask), want)
    # Made inside jit the mask is traced: checked in the computation, with the same result.
    close(jax.jit(lambda m: layer.apply({"params": params}, x, mask=m))(mask), want)
    # inputs_k and inputs_v may be given as the query input itself.
    close(layer.apply({"params": params}, x, x, x, mask=mask), want)


NOT_PADDING = {
    "sliding-window": causal() * (jnp.arange(T)[:, None] - jnp.arange(T)[None, :] < 3),
    "prefix-attends-ahead": jnp.maximum(causal(), jnp.zeros((T, T)).at[:3, :3].set(1.0)),
    "per-head": jnp.concatenate([causal(), nn.make_attention_mask(PAD, PAD), causal(), causal()], axis=1),
    "read-but-not-reading": causal().at[0, 0, 2, 2].set(0.0),
    "mixed-forms": causal().at[0, 0, 1, 2:].set(1.0),
}


@pytest.mark.parametrize("name", NOT_PADDING)
def test_a_mask_that_is_not_padding_is_refused(name):
    mask = NOT_PADDING[name]
    layer = dj.nn.DPFPSelfAttention(num_heads=H)
    x = normal(0, (B, T, D))
    params = layer.init(jax.random.key(1), x)["params"]
    with pytest.raises(ValueError, match=r"mask must be a padding mask .* batch row 0 is not"):
        layer.apply({"params": params}, x, mask=mask)
    # Traced, it cannot raise: that row outputs NaN, the other (padding and causal) is untouched.
    traced_mask = mask if mask.shape[0] == B else jnp.broadcast_to(mask, (B, *mask.shape[1:]))
    traced_mask = traced_mask.at[1].set(jnp.broadcast_to(causal()[1], traced_mask.shape[1:]))
    y = jax.jit(lambda m: layer.apply({"params": params}, x, mask=m))(traced_mask)
    assert np.isnan(np.asarray(y[0])).all()
    close(y[1], reference(params, x, PAD)[1])


def test_bad_inputs_are_named():
    layer = dj.nn.DPFPSelfAttention(num_heads=H)
    x = normal(0, (B, T, D))
    params = layer.init(jax.random.key(1), x)["params"]
    other = normal(2, (B, T, D))
    for kwargs, name in ((dict(inputs_k=other), "inputs_k"), (dict(inputs_v=other), "inputs_v"),
                         (dict(inputs_kv=other), "inputs_kv"), (dict(inputs_k=x + 0), "inputs_k")):
        with pytest.raises(ValueError, match=rf"{name} must be None or inputs_q itself: this layer is causal"):
            layer.apply({"params": params}, x, **kwargs)
    for mask, error, match in [
        (jnp.ones((B, 1, T, T + 1)), ValueError,
         r"mask must be \[B or 1, H or 1, T or 1, T\] = \[2 or 1, 4 or 1, 6 or 1, 6\]"),
        (jnp.ones((3, 1, T, T)), ValueError, r"got shape \(3, 1, 6, 6\)"),
        (jnp.ones((B, 2, T, T)), ValueError, r"got shape \(2, 2, 6, 6\)"),
        (jnp.ones((T,)), ValueError, r"got shape \(6,\)"),
        (causal() * 0.5, ValueError, r"mask must hold only 0 and 1 \(or booleans\); got the values \[0.5\]"),
        (causal().astype(jnp.complex64), TypeError, "mask must hold booleans or 0/1"),
    ]:
        with pytest.raises(error, match=match):
            layer.apply({"params": params}, x, mask=mask)
    with pytest.raises(ValueError, match="sow_weights=True"):
        layer.apply({"params": params}, x, sow_weights=True)
    with pytest.raises(ValueError, match=r"qkv_features \(18\) must be divisible by num_heads \(4\)"):
        dj.nn.DPFPSelfAttention(num_heads=H, qkv_features=18).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="inputs_k must be None or inputs_q itself"):
        djnnx.DPFPSelfAttention(H, D, rngs=nnx.Rngs(0))(x, other)
    with pytest.raises(ValueError, match="mask must be a padding mask"):
        djnnx.DPFPSelfAttention(H, D, rngs=nnx.Rngs(0))(x, mask=NOT_PADDING["sliding-window"])


# --- the swap ------------------------------------------------------------------------------------

VOCAB = 8


class Block(nn.Module):
    """A small pre-norm transformer LM block; ``attention`` makes its one attention layer."""

    attention: type

    @nn.compact
    def __call__(self, tokens):
        pad = tokens > 0
        mask = nn.combine_masks(nn.make_attention_mask(pad, pad), nn.make_causal_mask(tokens))
        x = nn.Embed(VOCAB, 32)(tokens)
        x = x + self.attention(num_heads=4, qkv_features=32, out_features=32)(nn.LayerNorm()(x), mask=mask,
                                                                                 deterministic=True)
        x = x + nn.Dense(32)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(x))))
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def lm_batch():
    """Periodic rows (period 3: the next token is the one three back), the last row padded with 0."""
    rng = np.random.default_rng(0)
    period = rng.integers(1, VOCAB, size=(8, 3))
    tokens = np.tile(period, (1, 4))
    tokens[-1, 9:] = 0
    return jnp.asarray(tokens)


def next_token_loss(logits, tokens):
    real = (tokens[:, 1:] > 0).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return jnp.sum(losses * real) / jnp.sum(real)


@JAX_SENSITIVE
def test_swapping_one_line_of_a_flax_block_trains():
    tokens = lm_batch()
    swapped = Block(dj.nn.DPFPSelfAttention)

    def out_shape(module, *args, **kwargs):  # shapes only: nothing computed
        return jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), *args, **kwargs)[0]).shape

    # The same shapes out of the block, and out of the attention layer itself.
    assert out_shape(Block(nn.MultiHeadDotProductAttention), tokens) == out_shape(swapped, tokens) == (8, 12, VOCAB)
    x, mask = normal(0, (8, 12, 32)), causal(tokens > 0)
    layers = [cls(num_heads=4, qkv_features=32, out_features=32)
              for cls in (nn.MultiHeadDotProductAttention, dj.nn.DPFPSelfAttention)]
    assert [out_shape(layer, x, mask=mask) for layer in layers] == [(8, 12, 32)] * 2

    params = jax.jit(swapped.init)(jax.random.key(1), tokens)["params"]
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(swapped.apply({"params": p}, tokens), tokens))(
            params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(25):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


class NNXBlock(nnx.Module):
    def __init__(self, attention, *, rngs):
        self.embed = nnx.Embed(VOCAB, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.attention = attention(4, 32, qkv_features=32, out_features=32, decode=False, rngs=rngs)
        self.head = nnx.Linear(32, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        pad = tokens > 0
        mask = nnx.combine_masks(nnx.make_attention_mask(pad, pad), nnx.make_causal_mask(tokens))
        x = self.embed(tokens)
        x = x + self.attention(self.norm(x), mask=mask, deterministic=True)
        return self.head(x)


@JAX_SENSITIVE
def test_swapping_one_line_of_an_nnx_block_trains():
    tokens = lm_batch()
    assert NNXBlock(nnx.MultiHeadAttention, rngs=nnx.Rngs(0))(tokens).shape == (8, 12, VOCAB)
    model = NNXBlock(djnnx.DPFPSelfAttention, rngs=nnx.Rngs(0))
    assert model(tokens).shape == (8, 12, VOCAB)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: next_token_loss(m(tokens), tokens))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(25)]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


@JAX_SENSITIVE
def test_linen_and_nnx_drop_ins_are_twins_and_decode():
    x = normal(0, (B, T, D))
    layer = dj.nn.DPFPSelfAttention(num_heads=H, qkv_features=8, out_features=12)
    params = layer.init(jax.random.key(1), x)["params"]
    twin = djnnx.DPFPSelfAttention(H, D, qkv_features=8, out_features=12, rngs=nnx.Rngs(0))
    djnnx.from_linen_params(twin, params)
    mask = causal()
    want = layer.apply({"params": params}, x, mask=mask)
    assert want.shape == (B, T, 12)
    close(twin(x, mask=mask), want)
    # Decoding, one token per call, the mask the call's own [.., 1, 1].
    decoder = layer.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x)["cache"]
    twin_decoder = djnnx.DPFPSelfAttention(H, D, qkv_features=8, out_features=12, decode=True, rngs=nnx.Rngs(0))
    djnnx.from_linen_params(twin_decoder, params)
    twin_decoder.init_cache(x.shape)
    for t in range(T):
        step_mask = mask[:, :, t : t + 1, t : t + 1]
        y, updates = decoder.apply({"params": params, "cache": cache}, x[:, t : t + 1], mask=step_mask,
                                   mutable=["cache"])
        cache = updates["cache"]
        close(y, want[:, t : t + 1])
        close(twin_decoder(x[:, t : t + 1], mask=step_mask), want[:, t : t + 1])
    # init_cache takes Flax's dtype; the memory stays float32 (it sums the whole sequence's writes).
    twin_decoder.init_cache(x.shape, dtype=jnp.bfloat16)
    assert twin_decoder.attention.fast_weights[...].dtype == jnp.float32
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        twin_decoder.init_cache(x.shape, dtype=jnp.int32)


# --- Flax's call patterns, one test per form: the same call to nn.MultiHeadDotProductAttention (or
# nnx.MultiHeadAttention) runs, and the drop-in computes the layer underneath on the padding ----------

def mhdpa_accepts(*args, **kwargs):
    """Flax's own layer takes the same call (shapes only: nothing computed)."""
    flax_layer = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, out_features=D)
    shape = jax.eval_shape(lambda: flax_layer.init_with_output(jax.random.key(0), *args, **kwargs)[0]).shape
    assert shape == args[0].shape


def test_the_key_padding_mask_b11t_is_the_padding():
    x, mask = normal(0, (B, T, D)), PAD[:, None, None, :]
    mhdpa_accepts(x, mask=mask)
    layer = dj.nn.DPFPSelfAttention(num_heads=H, qkv_features=D, out_features=D)
    params = layer.init(jax.random.key(1), x, mask=mask)["params"]
    close(layer.apply({"params": params}, x, mask=mask), reference(params, x, PAD))
    twin = djnnx.DPFPSelfAttention(H, D, rngs=nnx.Rngs(0))
    djnnx.from_linen_params(twin, params)
    close(twin(x, mask=mask), reference(params, x, PAD))


def test_the_positional_mask_of_nn_self_attention():
    x, mask = normal(0, (B, T, D)), causal()
    flax_self = nn.SelfAttention(num_heads=H, qkv_features=D, out_features=D)
    assert jax.eval_shape(lambda: flax_self.init_with_output(jax.random.key(0), x, mask, True)[0]).shape == x.shape
    layer = dj.nn.DPFPSelfAttention(num_heads=H, qkv_features=D, out_features=D)
    params = layer.init(jax.random.key(1), x, mask)["params"]
    want = reference(params, x, PAD)
    close(layer.apply({"params": params}, x, mask), want)
    close(layer.apply({"params": params}, x, mask, True), want)  # nn.SelfAttention's (x, mask, deterministic)
    close(layer.apply({"params": params}, x, PAD[:, None, None, :]), want)
    with pytest.raises(ValueError, match="mask given twice"):
        layer.apply({"params": params}, x, mask, mask=mask)
    # As nn.MultiHeadDotProductAttention's, a second positional input is inputs_k.
    with pytest.raises(ValueError, match="inputs_k must be None or inputs_q itself"):
        layer.apply({"params": params}, x, normal(3, (B, T, D)))


def decode_mask_steps(mask):
    """Flax's decode-time masks: at step t the rows of the new token over the whole cache."""
    return [mask[:, :, t : t + 1, :] for t in range(T)]


@pytest.mark.parametrize("form", ["key-padding", "causal-row"])
def test_the_decode_time_mask_over_the_whole_cache(form):
    x = normal(0, (B, T, D))
    full = PAD[:, None, None, :] if form == "key-padding" else causal()
    steps = [full] * T if form == "key-padding" else decode_mask_steps(full)
    # Flax's decoder takes these masks, [B, 1, 1, max_len], one token per call.
    flax_decoder = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, out_features=D, decode=True)
    flax_vars = flax_decoder.init(jax.random.key(0), x)
    flax_y, _ = flax_decoder.apply(flax_vars, x[:, :1], mask=steps[0], mutable=["cache"])
    assert flax_y.shape == (B, 1, D)

    layer = dj.nn.DPFPSelfAttention(num_heads=H, qkv_features=D, out_features=D)
    params = layer.init(jax.random.key(1), x)["params"]
    want = reference(params, x, PAD)
    decoder = layer.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x)["cache"]
    twin = djnnx.DPFPSelfAttention(H, D, decode=True, rngs=nnx.Rngs(0))
    djnnx.from_linen_params(twin, params)
    twin.init_cache(x.shape)

    @jax.jit  # the cache's index traced: the new token's entry is read in the computation
    def step(cache, token, mask):
        return decoder.apply({"params": params, "cache": cache}, token, mask=mask, mutable=["cache"])

    for t in range(T):
        y, updates = step(cache, x[:, t : t + 1], steps[t])
        cache = updates["cache"]
        close(y, want[:, t : t + 1])
        close(twin(x[:, t : t + 1], mask=steps[t]), want[:, t : t + 1])
    assert int(cache["cache_index"]) == T and int(twin.cache_index[...]) == T
    # Past max_len there is no entry for the new token: an error while the index is known, NaN under jit.
    with pytest.raises(ValueError, match=r"covers 6 positions \(max_len\), but this call's 1 token\(s\) are at "
                                         r"positions 6..6"):
        decoder.apply({"params": params, "cache": cache}, x[:, :1], mask=steps[0], mutable=["cache"])
    assert np.isnan(np.asarray(step(cache, x[:, :1], steps[0])[0])).all()


def test_nnx_call_arguments_of_multi_head_attention():
    x, mask = normal(0, (B, T, D)), causal()
    flax_layer = nnx.MultiHeadAttention(H, D, qkv_features=D, out_features=D, decode=False, rngs=nnx.Rngs(0))
    assert flax_layer(x, mask=mask, is_causal=False, decode=False).shape == x.shape
    layer = djnnx.DPFPSelfAttention(H, D, rngs=nnx.Rngs(0))
    want = layer(x, mask=mask)
    close(layer(x, mask=mask, is_causal=True), want)  # what the layer does anyway
    close(layer(x, mask=mask, decode=False), want)
    with pytest.raises(ValueError, match="is_causal=False asks for attention to later tokens.*cannot compute"):
        layer(x, mask=mask, is_causal=False)
    with pytest.raises(ValueError, match="decode=True at the call continues the decode cache, which only a layer made "
                                         "with decode=True has"):
        layer(x[:, :1], decode=True)
    # decode=False on a decoding layer runs the call alone, the cache untouched.
    decoder = djnnx.DPFPSelfAttention(H, D, decode=True, rngs=nnx.Rngs(0))
    decoder.init_cache(x.shape)
    close(decoder(x, mask=mask, decode=False), want)
    assert int(decoder.cache_index[...]) == 0 and not np.asarray(decoder.attention.fast_weights[...]).any()


def test_the_missing_cache_error_names_init_cache_as_it_is_called():
    decoder = djnnx.DPFPSelfAttention(H, D, decode=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"call init_cache\(input_shape\) once before decoding, e\.g\. "
                                         r"layer\.init_cache\(x\.shape\)"):
        decoder(normal(0, (B, 1, D)))


def test_a_list_mask_is_refused_as_segment_ids_are():
    x = normal(0, (B, T, D))
    listed = np.asarray(causal()).tolist()
    layer = dj.nn.DPFPSelfAttention(num_heads=H)
    params = layer.init(jax.random.key(1), x)["params"]
    match = r"mask must be an array \(jax.Array or numpy.ndarray\); got list"
    with pytest.raises(TypeError, match=match):
        layer.apply({"params": params}, x, mask=listed)
    with pytest.raises(TypeError, match=match):
        djnnx.DPFPSelfAttention(H, D, rngs=nnx.Rngs(0))(x, mask=listed)
    fast = dj.FastWeightAttention(num_heads=H, head_dim=D // H)
    with pytest.raises(TypeError, match=match):
        fast.init(jax.random.key(0), x, mask=np.asarray(PAD).tolist())
    with pytest.raises(TypeError, match="segment_ids must be an array"):
        fast.init(jax.random.key(0), x, segment_ids=np.zeros((B, T), int).tolist())


def test_a_traced_mask_that_is_not_padding_makes_loss_and_gradients_nan():
    x = normal(0, (B, T, D))
    layer = dj.nn.DPFPSelfAttention(num_heads=H)
    params = layer.init(jax.random.key(1), x)["params"]
    mask = jnp.broadcast_to(NOT_PADDING["sliding-window"], (B, 1, T, T)).at[1].set(causal()[1])

    @jax.jit
    def loss_and_grads(params, mask):
        # The loss reads only the valid row 1: a select would leave every gradient finite.
        return jax.value_and_grad(lambda p: jnp.sum(layer.apply({"params": p}, x, mask=mask)[1] ** 2))(params)

    loss, grads = loss_and_grads(params, mask)
    assert np.isfinite(float(loss))
    assert all(np.isnan(np.asarray(g)).any() for g in jax.tree.leaves(grads))
    loss, grads = loss_and_grads(params, jnp.broadcast_to(causal(), (B, 1, T, T)))
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
