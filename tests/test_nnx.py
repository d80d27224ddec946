"""Flax NNX modules: twins of the linen ones (same weights, same outputs and memories), the parameter
mapping, decoding with nnx.Cache, partitioning annotations, training, and sharded training."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpfp_jax as dj
from dpfp_jax import nnx as djnnx
from dpfp_jax.core.transformer import stack_layer_params, unstack_layer_params
from tests.helpers import (
    JAX_SENSITIVE,
    SCRIPTS,
    Regressor,
    close,
    normal,
    regression_batch,
    run_with_host_devices,
    train_step,
)

B, T, D = 2, 7, 8
MASK = jnp.ones((B, T), bool).at[0, 5].set(False).at[1, 0].set(False)
SEGMENT_IDS = jnp.array([[3, 3, 3, 1, 1, 1, 1], [0, 0, 2, 2, 2, 5, 5]])


# name -> (linen module, NNX twin factory, call options); the NNX factory takes rngs.
ATTENTION = dict(num_heads=2, head_dim=4)
TWINS = {
    "attention-dpfp-delta-sum": (
        dj.FastWeightAttention(**ATTENTION, nu=2, use_bias=True),
        lambda rngs: djnnx.FastWeightAttention(**ATTENTION, nu=2, use_bias=True, in_features=D, rngs=rngs),
    ),
    "attention-linear-sum-attention": (
        dj.FastWeightAttention(**ATTENTION, feature_map="linear", rule="sum", normalization="attention",
                               out_features=6),
        lambda rngs: djnnx.FastWeightAttention(**ATTENTION, feature_map="linear", rule="sum", normalization="attention",
                                               out_features=6, in_features=D, rngs=rngs),
    ),
    "attention-favor-delta-l2": (
        dj.FastWeightAttention(**ATTENTION, feature_map="favor", num_features=3, favor_seed=4, normalization="l2"),
        lambda rngs: djnnx.FastWeightAttention(**ATTENTION, feature_map="favor", num_features=3, favor_seed=4,
                                               normalization="l2", in_features=D, rngs=rngs),
    ),
    "DPFPAttention": (
        dj.DPFPAttention(D, **ATTENTION, nu=2),
        lambda rngs: djnnx.DPFPAttention(D, **ATTENTION, nu=2, rngs=rngs),
    ),
    "DPFPformer": (
        dj.DPFPformer(D, 2, **ATTENTION, ff_mult=2),
        lambda rngs: djnnx.DPFPformer(D, 2, **ATTENTION, ff_mult=2, rngs=rngs),
    ),
    "DPFPformer-post-norm-attention": (
        dj.DPFPformer(D, 1, **ATTENTION, feature_map="linear", rule="sum", normalization="attention", pre_norm=False),
        lambda rngs: djnnx.DPFPformer(D, 1, **ATTENTION, feature_map="linear", rule="sum", normalization="attention",
                                      pre_norm=False, rngs=rngs),
    ),
}


def call(module, *args, **kwargs):
    """Outputs and memories of a linen ``(module, params)`` pair or an NNX module, packed documents and padding."""
    is_former = isinstance(module[0] if isinstance(module, tuple) else module, dj.DPFPformer | djnnx.DPFPformer)
    options = dict(mask=MASK, segment_ids=SEGMENT_IDS, **(dict(return_memory=True) if is_former else {}))
    if isinstance(module, tuple):
        linen_module, params = module
        return linen_module.apply({"params": params}, *args, **options, **kwargs)
    return module(*args, **options, **kwargs)


@JAX_SENSITIVE
@pytest.mark.parametrize("name", TWINS)
def test_nnx_twin_with_linen_weights_gives_the_same_outputs_and_memories(name):
    linen_module, make = TWINS[name]
    x = normal(0, (B, T, D))
    params = linen_module.init(jax.random.key(1), x)["params"]
    twin = make(nnx.Rngs(2))
    djnnx.from_linen_params(twin, params)
    want = call((linen_module, params), x)
    close(call(twin, x), want)
    # ... and carried on: the memory each returned continues in the other.
    close(call(twin, x, want[1]), call((linen_module, params), x, want[1]))
    # The mapping both ways is the identity on the tree, every leaf as given.
    jax.tree.map(np.testing.assert_array_equal, djnnx.to_linen_params(twin), params)


@JAX_SENSITIVE
@pytest.mark.parametrize("name", ["attention-dpfp-delta-sum", "DPFPformer"])
def test_linen_twin_with_nnx_weights_gives_the_same_outputs(name):
    linen_module, make = TWINS[name]
    twin = make(nnx.Rngs(3))
    x = normal(0, (B, T, D))
    close(call((linen_module, djnnx.to_linen_params(twin)), x), call(twin, x))


def test_the_cell_twins():
    cell, twin = dj.DPFPCell(D, nu=2, head_dim=4), djnnx.DPFPCell(D, nu=2, head_dim=4, rngs=nnx.Rngs(0))
    x = normal(0, (B, D))
    params = cell.init(jax.random.key(1), x)["params"]
    djnnx.from_linen_params(twin, params)
    w = normal(2, cell.get_memory_shape(B), 0.1)
    close(twin(x, w), cell.apply({"params": params}, x, w))
    # The NNX cell looped over time equals the NNX one-head layer with the same weights, as in linen.
    layer = djnnx.FastWeightAttention(num_heads=1, head_dim=4, nu=2, out_features=D, in_features=D, rngs=nnx.Rngs(4))
    djnnx.from_linen_params(layer, params)
    xs = normal(5, (B, 4, D))
    want_y, want_w = layer(xs)
    ys, w = [], None
    for t in range(4):
        y, w = twin(xs[:, t], w)
        ys.append(y)
    close(jnp.stack(ys, axis=1), want_y)
    close(w, want_w[:, 0])


def test_from_linen_params_refuses_what_does_not_fit():
    linen_module, make = TWINS["DPFPAttention"]
    x = normal(0, (B, T, D))
    variables = linen_module.init(jax.random.key(1), x)
    params = variables["params"]
    twin = make(nnx.Rngs(0))
    kernel = params["attention"]["qkv"]["kernel"]
    with pytest.raises(ValueError, match=r"missing \['attention/out/kernel'\], unexpected \[\]"):
        djnnx.from_linen_params(twin, {"attention": {"qkv": {"kernel": kernel}}})
    with pytest.raises(ValueError, match=r"unexpected \['attention/qkv/bias'\]"):
        djnnx.from_linen_params(twin, {"attention": {**params["attention"],
                                                     "qkv": {"kernel": kernel, "bias": jnp.zeros(kernel.shape[1:])}}})
    with pytest.raises(ValueError, match=r"attention/qkv/kernel must have shape \(8, 2, 13\); got \(8, 2, 12\)"):
        djnnx.from_linen_params(twin, {"attention": {**params["attention"], "qkv": {"kernel": kernel[..., :12]}}})
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        djnnx.from_linen_params(twin, variables)
    with pytest.raises(TypeError, match="params must be a linen params collection"):
        djnnx.from_linen_params(twin, [kernel])
    # Nothing was set by the refused calls.
    assert not np.array_equal(twin.attention.qkv.kernel[...], kernel)


def test_bad_configuration_is_refused_when_constructed():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="normalization='attention'"):
        djnnx.FastWeightAttention(**ATTENTION, normalization="attention", in_features=D, rngs=rngs)
    with pytest.raises(ValueError, match="allow_unbounded_delta"):
        djnnx.FastWeightAttention(**ATTENTION, normalization="none", in_features=D, rngs=rngs)
    with pytest.raises(TypeError, match="in_features must be a positive int"):
        djnnx.FastWeightAttention(**ATTENTION, in_features=8.0, rngs=rngs)
    with pytest.raises(ValueError, match=r"ff_dropout_rate must be in \[0, 1\)"):
        djnnx.DPFPformer(D, 1, ff_dropout_rate=1.0, rngs=rngs)
    with pytest.raises(ValueError, match="nu must be a positive int"):
        djnnx.DPFPCell(D, nu=0, rngs=rngs)
    layer = djnnx.FastWeightAttention(**ATTENTION, in_features=D, rngs=rngs)
    with pytest.raises(ValueError, match=r"x must be \[batch, time, in_features=8\]"):
        layer(jnp.ones((1, 3, 9)))


# --- scanned layers -----------------------------------------------------------------------------


@pytest.mark.slow
def test_scanned_layers_equal_the_unscanned_stack_and_the_linen_twin():
    config = dict(**ATTENTION, nu=2, ff_mult=2)
    unscanned = djnnx.DPFPformer(D, 2, **config, rngs=nnx.Rngs(0))
    scanned = djnnx.DPFPformer(D, 2, **config, scan_layers=True, rngs=nnx.Rngs(0))
    kernel = scanned.blocks.attention.qkv.kernel[...]
    assert kernel.shape[0] == 2 and not np.allclose(kernel[0], kernel[1])  # each layer its own init
    stacked = stack_layer_params(djnnx.to_linen_params(unscanned), 2)
    djnnx.from_linen_params(scanned, stacked)
    x = normal(0, (B, T, D))
    want = call(unscanned, x)
    close(call(scanned, x), want)
    close(call(scanned, x, want[1]), call(unscanned, x, want[1]))
    # the linen scanned stack is its twin, parameter names included
    close(call((dj.DPFPformer(D, 2, **config, scan_layers=True), stacked), x), want)

    def loss(model):
        return jnp.sum(call(model, x)[0] ** 2)

    grads = unstack_layer_params(nnx.to_pure_dict(nnx.grad(loss)(scanned)), 2)
    close(grads, nnx.to_pure_dict(nnx.grad(loss)(unscanned)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="keeps the layers stacked in one block"):
        scanned.layers()

    decoder = djnnx.DPFPformer(D, 2, **config, scan_layers=True, decode=True, rngs=nnx.Rngs(1))
    djnnx.from_linen_params(decoder, stacked)
    decoder.init_cache(B)
    assert decoder.blocks.attention.fast_weights[...].shape[0] == 2  # one cache per layer, stacked
    close(jnp.concatenate([decoder(x[:, t : t + 1]) for t in range(T)], axis=1), scanned(x))


def test_scanned_layers_refuse_what_they_cannot_scan():
    with pytest.raises(ValueError, match="feature_map='favor'"):
        djnnx.DPFPformer(D, 2, **ATTENTION, feature_map="favor", scan_layers=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="scan_layers=True with kernel_axes"):
        djnnx.DPFPformer(D, 2, **ATTENTION, kernel_axes=djnnx.KernelAxes(), scan_layers=True, rngs=nnx.Rngs(0))


# --- decoding -----------------------------------------------------------------------------------

CALLS = [(0, 1), (1, 3), (3, 4), (4, 7)]


@JAX_SENSITIVE
@pytest.mark.parametrize("name", ["attention-dpfp-delta-sum", "attention-linear-sum-attention", "DPFPformer"])
def test_decoding_token_by_token_equals_the_full_pass(name):
    _, make = TWINS[name]
    x = normal(0, (B, T, D))
    model = make(nnx.Rngs(0))
    want = call(model, x)
    decoder = make(nnx.Rngs(0))  # the same weights: the same seed
    decoder.set_attributes(decode=True)
    decoder.init_cache(B)
    ys = []
    for start, stop in CALLS:
        out = decoder(x[:, start:stop], mask=MASK[:, start:stop], segment_ids=SEGMENT_IDS[:, start:stop],
                      **(dict(return_memory=True) if isinstance(decoder, djnnx.DPFPformer) else {}))
        ys.append(out[0])
    close(jnp.concatenate(ys, axis=1), want[0])
    close(out[1], want[1])
    # Under nnx.jit too, the cache updated in place; init_cache starts over.
    decoder.init_cache(B)
    step = nnx.jit(lambda m, x, ids: m(x, segment_ids=ids))
    ys = [step(decoder, x[:, t : t + 1], SEGMENT_IDS[:, t : t + 1]) for t in range(T)]
    ys = [y[0] if isinstance(y, tuple) else y for y in ys]
    want = model(x, segment_ids=SEGMENT_IDS)
    close(jnp.concatenate(ys, axis=1), want[0] if isinstance(want, tuple) else want)


def test_decode_misuse_is_named():
    layer = djnnx.FastWeightAttention(**ATTENTION, in_features=D, decode=True, rngs=nnx.Rngs(0))
    x = normal(0, (B, 1, D))
    with pytest.raises(ValueError, match=r"call init_cache\(batch\) once before decoding"):
        layer(x)
    layer.init_cache(B)
    with pytest.raises(ValueError, match=r"decode cache's fast_weights has shape \(2, 2, 8, 4\) \(batch 2\), "
                                         r"but x of batch 3"):
        layer(normal(0, (3, 1, D)))
    with pytest.raises(ValueError, match="pass memory=None"):
        layer(x, jnp.zeros(layer.get_memory_shape(B)))
    with pytest.raises(ValueError, match="this one has decode=False"):
        djnnx.DPFPAttention(D, **ATTENTION, rngs=nnx.Rngs(0)).init_cache(B)


# --- partitioning -------------------------------------------------------------------------------


def test_partitioning_annotations():
    # None (the default) annotates nothing: made without a mesh.
    specs = nnx.get_partition_spec(nnx.state(djnnx.DPFPformer(D, 1, **ATTENTION, rngs=nnx.Rngs(0)), nnx.Param))
    assert all(s == jax.sharding.PartitionSpec() for s in jax.tree.leaves(specs))
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    axes = djnnx.KernelAxes(embed=None, heads="model", mlp="model")
    with jax.set_mesh(mesh):
        model = djnnx.DPFPformer(D, 1, **ATTENTION, kernel_axes=axes, rngs=nnx.Rngs(0))
    P = jax.sharding.PartitionSpec
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert specs["attention_0"]["qkv"]["kernel"] == P(None, "model", None)
    assert specs["attention_0"]["out"]["kernel"] == P("model", None, None)
    assert specs["ff_0"]["up"]["kernel"] == P(None, "model")
    assert specs["ff_0"]["up"]["bias"] == P("model")
    assert specs["ff_0"]["down"]["kernel"] == P("model", None)
    assert specs["norm_out"]["scale"] == P(None)
    assert model.attention_0.qkv.kernel[...].sharding.spec == P(None, "model", None)
    # Logical names, mapped by flax's logical axis rules.
    with jax.set_mesh(mesh), nn.logical_axis_rules([("embed", None), ("heads", "model"), ("mlp", "model")]):
        layer = djnnx.DPFPAttention(D, **ATTENTION, kernel_axes=djnnx.KernelAxes(), rngs=nnx.Rngs(0))
    assert layer.attention.qkv.kernel.get_metadata()["out_sharding"] == ("embed", "heads", None)
    assert layer.attention.qkv.kernel[...].sharding.spec == P(None, "model", None)


# --- training -----------------------------------------------------------------------------------


@JAX_SENSITIVE
def test_an_nnx_optimizer_lowers_the_loss_under_nnx_jit():
    model = Regressor(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, target = regression_batch()
    losses = [float(train_step(model, optimizer, x, target)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


@JAX_SENSITIVE
def test_data_parallel_and_head_sharded_nnx_training_equal_one_device():
    result = run_with_host_devices(SCRIPTS / "nnx_sharded_script.py")
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
