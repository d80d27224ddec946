"""The feature map inside the op (``dj.fast_weight(..., features=dj.Features(...))``), issue 29.

With ``features`` the op takes the raw q, k (width d) and computes what it computes without it on
``features(q), features(k)``: outputs, final state and the gradients of q, k, v, beta,
initial_state and scale, to float32 rounding, on every XLA impl, both rules, packed documents.
``scan`` and ``chunk`` keep q, k at width d for the backward (their compiled temporaries drop);
``reference`` is given phi(q), phi(k), and so is ``pallas`` but where its TPU kernel (d = 32, 64,
128: tests/test_tpu_kernel_features.py) or its fused chunk GPU kernel (DPFP, d a multiple of 32:
tests/test_triton_features.py) maps q, k itself. The modules hand the op the raw q, k by
default (``fuse_features``), with the same results as the separate path, decoding included.
Sharded runs (batch, heads, the sequence): tests/scripts/features_sharded_script.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dpfp_jax as dj
from dpfp_jax import nnx as djnnx
from dpfp_jax.core.attention import AttentionSpec
from tests.helpers import SCRIPTS, assert_close_to_scale, normal, run_with_host_devices

SLOW = pytest.mark.slow
B, T, H, D, V, CHUNK = 2, 40, 2, 4, 3, 16  # T is no multiple of the chunk: the chunk form pads
TOLERANCE = (2e-5, 1e-5)  # float32 rounding (rtol; atol relative to 1 + the largest magnitude)

MAPS = {
    "dpfp2-sum": dict(feature_map="dpfp", nu=2, normalization="sum"),
    "dpfp3-l2": dict(feature_map="dpfp", nu=3, normalization="l2"),
    "linear-none": dict(feature_map="linear"),
    "linear-sum": dict(feature_map="linear", normalization="sum"),
    "relu-sum": dict(feature_map="relu", normalization="sum"),
    "identity-l2": dict(feature_map="identity", normalization="l2"),
    "callable-sum": dict(feature_map=lambda x: jnp.concatenate([jax.nn.softplus(x), x * x], axis=-1),
                         normalization="sum"),
}


def inputs(features: dj.Features, dtype=jnp.float32, seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), 5)
    return dict(q=jax.random.normal(keys[0], (B, T, H, D), dtype), k=jax.random.normal(keys[1], (B, T, H, D), dtype),
                v=jax.random.normal(keys[2], (B, T, H, V), dtype),
                beta=jax.nn.sigmoid(jax.random.normal(keys[3], (B, T, H), dtype)),
                initial_state=0.3 * jax.random.normal(keys[4], (B, H, features.key_dim, V)),
                scale=jnp.float32(0.7))


def results_and_grads(features, impl, rule, args, segment_ids=None, fused=True):
    """Outputs, final state and the gradients of a loss on both wrt q, k, v, beta, initial_state, scale."""
    names = [n for n in ("q", "k", "v", "beta", "initial_state", "scale") if rule == "delta" or n != "beta"]

    def loss(*values):
        a = dict(zip(names, values, strict=True))
        q, k = (a["q"], a["k"]) if fused else (features(a["q"]), features(a["k"]))
        out, state = dj.fast_weight(q, k, a["v"], a.get("beta"), rule=rule, initial_state=a["initial_state"],
                                    scale=a["scale"], impl=impl, chunk_size=CHUNK, segment_ids=segment_ids,
                                    features=features if fused else None)
        return (jnp.sum(out.astype(jnp.float32) * jnp.sin(out.astype(jnp.float32)))
                + 0.3 * jnp.sum(state * jnp.cos(state))), (out, state)

    (_, values), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
        *(args[n] for n in names))
    return (*values, *grads)


def assert_fused_equals_map_then_op(features, impl, rule, segment_ids=None, dtype=jnp.float32, tolerance=TOLERANCE):
    args = inputs(features, dtype)
    got = results_and_grads(features, impl, rule, args, segment_ids)
    want = results_and_grads(features, impl, rule, args, segment_ids, fused=False)
    assert got[0].dtype == want[0].dtype == dtype
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert_close_to_scale(g, w, tolerance)


SEGMENT_IDS = jnp.array([[0] * 7 + [1] * 20 + [2] * 13, [3] * 17 + [4] * 23], jnp.int32)  # resets mid-chunk and on one


# make test: the delta rule through every path once, the sum rule through chunk; the rest is slow.
@pytest.mark.parametrize("impl, rule, name", [
    *((impl, "delta", "dpfp2-sum") for impl in ("reference", "scan", "chunk")),
    pytest.param("auto", "delta", "dpfp2-sum", marks=SLOW), ("chunk", "sum", "linear-none"),
    *(pytest.param(impl, "sum", "linear-none", marks=SLOW) for impl in ("reference", "scan", "auto"))])
def test_fused_equals_feature_map_then_op(impl, rule, name):
    assert_fused_equals_map_then_op(dj.Features(dim=D, **MAPS[name]), impl, rule)


@pytest.mark.parametrize("impl", [pytest.param("scan", marks=SLOW), "chunk"])
def test_fused_equals_feature_map_then_op_with_packed_documents(impl):
    assert_fused_equals_map_then_op(dj.Features(dim=D, **MAPS["dpfp2-sum"]), impl, "delta", SEGMENT_IDS)


# The delta rule with unnormalised keys ("linear-none") diverges (states of 1e18 within 40 steps),
# where no two orders of float32 additions agree: that map with the sum rule only.
GRID = [(rule, name, packed) for rule in ("delta", "sum")
        for name, packed in [(name, False) for name in MAPS] + [("dpfp2-sum", True), ("callable-sum", True)]
        if not (rule == "delta" and name == "linear-none")]


@SLOW
@pytest.mark.parametrize("rule, name, packed", GRID)
@pytest.mark.parametrize("impl", ["scan", "chunk"])
def test_every_registered_map_fused_equals_map_then_op(impl, rule, name, packed):
    assert_fused_equals_map_then_op(dj.Features(dim=D, **MAPS[name]), impl, rule, SEGMENT_IDS if packed else None)


@SLOW
@pytest.mark.parametrize("impl", ["scan", "chunk"])
def test_fused_equals_map_then_op_in_bfloat16(impl):
    # phi is computed in the inputs' dtype either way; the op's float32 work differs in order only.
    assert_fused_equals_map_then_op(dj.Features(dim=D, **MAPS["dpfp2-sum"]), impl, "delta", dtype=jnp.bfloat16,
                                    tolerance=(2e-2, 1e-2))


def test_without_features_the_op_is_unchanged():
    # features=None is the op as it was: the same program, bit for bit (the branch that added
    # features was checked bit-identical against the op before it, every impl, both rules).
    phi = dj.Features("dpfp", dim=D, nu=2, normalization="sum")
    args = inputs(phi)
    q, k = phi(args["q"]), phi(args["k"])
    for impl in ("scan", "chunk"):
        plain = dj.fast_weight(q, k, args["v"], args["beta"], impl=impl, chunk_size=CHUNK)
        explicit = dj.fast_weight(q, k, args["v"], args["beta"], impl=impl, chunk_size=CHUNK, features=None)
        for a, b in zip(plain, explicit, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", [pytest.param("scan", marks=SLOW), "chunk"])
def test_fused_backward_keeps_q_and_k_at_width_d(impl):
    # Compiled temporaries of the gradient, nu = 3 (K = 6 d), four spans of the chunk form: phi(q),
    # phi(k) and their gradients are never whole arrays with features (0.09x of the unfused
    # program's for scan, 0.33x for chunk when written).
    phi = dj.Features("dpfp", dim=16, nu=3, normalization="sum")
    shape = (1, 2048, 2)
    q, k = jnp.ones((*shape, 16)), jnp.ones((*shape, 16))
    v, beta = jnp.ones((*shape, 16)), jnp.ones(shape)

    def temp_bytes(fused):
        def loss(q, k, v, beta):
            qk = (q, k) if fused else (phi(q), phi(k))
            out, state = dj.fast_weight(*qk, v, beta, impl=impl, features=phi if fused else None)
            return jnp.sum(out**2) + jnp.sum(state**2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, beta).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused, unfused = temp_bytes(True), temp_bytes(False)
    assert fused <= 0.5 * unfused, (fused, unfused)


# --- errors ---------------------------------------------------------------------------------------


def test_features_errors_name_the_argument():
    phi = dj.Features("dpfp", dim=D, nu=3, normalization="sum")
    q, v, beta = jnp.ones((B, T, H, D)), jnp.ones((B, T, H, V)), jnp.ones((B, T, H))
    wide = phi(q)
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, d\] with d = features.dim = 4 .*24 is "
                                         r"features.key_dim, phi's output width: give q before the feature map"):
        dj.fast_weight(wide, wide, v, beta, features=phi)
    with pytest.raises(ValueError, match=r"k must be \[B, T, H, d\] with d = features.dim = 4"):
        dj.fast_weight(q, jnp.ones((B, T, H, 5)), v, beta, features=phi)
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, K, V\] = \(2, 2, 24, 3\) \(K = "
                                         r"features.key_dim"):
        dj.fast_weight(q, q, v, beta, features=phi, initial_state=jnp.zeros((B, H, D, V)))
    with pytest.raises(TypeError, match="features must be a dj.Features .* got 'dpfp' of type str"):
        dj.fast_weight(q, q, v, beta, features="dpfp")


def test_features_refuses_what_it_cannot_describe():
    with pytest.raises(ValueError, match="feature_map='favor' cannot be a Features: .*random projection"):
        dj.Features("favor", dim=D)
    with pytest.raises(ValueError, match="nu is DPFP's option; feature_map='relu' takes none"):
        dj.Features("relu", dim=D, nu=2)
    with pytest.raises(ValueError, match=r"normalization must be one of \('sum', 'l2', 'none'\); got 'attention'"):
        dj.Features("dpfp", dim=D, normalization="attention")
    with pytest.raises(ValueError, match="eps must be a finite real number >= 0"):
        dj.Features("dpfp", dim=D, eps=-1.0)
    with pytest.raises(ValueError, match="nu must be a positive int"):
        dj.Features("dpfp", dim=D, nu=0)
    with pytest.raises(ValueError, match="a callable feature_map must map"):
        dj.Features(lambda x: x.sum(-1), dim=D)


def test_pallas_names_the_features_that_make_k_too_wide():
    # K = 2 nu d = 1536 > 1024, the kernels' state width whether they compute the map or are given it.
    phi = dj.Features("dpfp", dim=256, nu=3, normalization="sum")
    q, v, beta = jnp.ones((1, 4, 1, 256)), jnp.ones((1, 4, 1, 8)), jnp.ones((1, 4, 1))
    with pytest.raises(ValueError, match=r"impl='pallas' cannot take this call: pallas: the Pallas kernels take "
                                         r"K <= 1024; got K=1536 from features=Features\(feature_map='dpfp', "
                                         r"dim=256, nu=3"):
        dj.fast_weight(q, q, v, beta, impl="pallas", features=phi)


@SLOW
def test_pallas_is_given_the_feature_map_applied_before_the_kernel():
    # d = 4 is no width the TPU kernel maps itself (tests/test_tpu_kernel_features.py has those).
    from jax.experimental.pallas import tpu as pltpu

    phi = dj.Features("dpfp", dim=D, nu=2, normalization="sum")
    args = inputs(phi)
    with pltpu.force_tpu_interpret_mode():
        got = results_and_grads(phi, "pallas", "delta", args)
        want = results_and_grads(phi, "pallas", "delta", args, fused=False)
    for g, w in zip(got, want, strict=True):
        assert_close_to_scale(g, w, TOLERANCE)


# --- the modules ----------------------------------------------------------------------------------

LAYER_CONFIGS = {
    "dpfp-delta-sum": dict(nu=2),
    "linear-sum-attention": dict(feature_map="linear", rule="sum", normalization="attention"),
    "callable-delta-l2": dict(feature_map=lambda x: jnp.concatenate([x, jnp.tanh(x)], axis=-1), normalization="l2"),
}


def layer_results(config, x, fuse, mask=None, segment_ids=None):
    layer = dj.DPFPAttention(8, num_heads=2, head_dim=4, fuse_features=fuse, chunk_size=CHUNK, **config)
    params = layer.init(jax.random.key(1), x)["params"]

    def loss(params, x):
        y, memory = layer.apply({"params": params}, x, mask=mask, segment_ids=segment_ids)
        return jnp.sum(y * jnp.sin(y)) + sum(jnp.sum(m**2) for m in jax.tree.leaves(memory)), (y, memory)

    (_, values), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return values, grads


@pytest.mark.parametrize("config", [c if c == "dpfp-delta-sum" else pytest.param(c, marks=SLOW) for c in LAYER_CONFIGS])
def test_layer_hands_the_op_the_raw_q_and_k_with_the_same_results(config):
    x = normal(0, (B, T, 8))
    mask = jnp.arange(T)[None, :] < jnp.array([[T], [T - 9]])  # row 1 padded at the end
    got = layer_results(LAYER_CONFIGS[config], x, True, mask=mask, segment_ids=SEGMENT_IDS)
    want = layer_results(LAYER_CONFIGS[config], x, False, mask=mask, segment_ids=SEGMENT_IDS)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close_to_scale(g, w, TOLERANCE)


def test_layer_gives_the_op_its_features_unless_told_not_to():
    spec = AttentionSpec(num_heads=2, head_dim=4, nu=3, normalization="l2", eps=1e-5)
    assert spec.op_features() == dj.Features("dpfp", dim=4, nu=3, normalization="l2", eps=1e-5)
    assert AttentionSpec(num_heads=2, head_dim=4, rule="sum", normalization="attention").op_features().normalization \
        == "none"  # the attention denominator stays the layer's
    assert AttentionSpec(num_heads=2, head_dim=4, feature_map="relu", nu=3).op_features().nu == 1
    assert AttentionSpec(num_heads=2, head_dim=4, fuse_features=False).op_features() is None
    assert AttentionSpec(num_heads=2, head_dim=4, feature_map="favor").op_features() is None
    with pytest.raises(TypeError, match="fuse_features must be a bool"):
        AttentionSpec(num_heads=2, head_dim=4, fuse_features="yes").check()


@pytest.mark.parametrize("config", ["dpfp-delta-sum", pytest.param("linear-sum-attention", marks=SLOW)])
def test_decoding_gives_the_same_tokens_either_way(config):
    x = normal(0, (2, 6, 8))
    ys = {}
    for fuse in (True, False):
        decoder = dj.FastWeightAttention(num_heads=2, head_dim=4, decode=True, fuse_features=fuse,
                                         **LAYER_CONFIGS[config])
        variables = decoder.init(jax.random.key(1), x)
        cache, ys[fuse] = variables["cache"], []
        for start in range(6):
            (y, memory), updates = decoder.apply({"params": variables["params"], "cache": cache},
                                                 x[:, start:start + 1], mutable=["cache"])
            cache = updates["cache"]
            ys[fuse].append(y)
        ys[fuse] = (jnp.concatenate(ys[fuse], axis=1), memory)
    for g, w in zip(jax.tree.leaves(ys[True]), jax.tree.leaves(ys[False]), strict=True):
        assert_close_to_scale(g, w, TOLERANCE)


def test_nnx_layer_hands_the_op_the_raw_q_and_k_with_the_same_results():
    x = normal(0, (B, T, 8))

    def results(fuse):
        layer = djnnx.DPFPAttention(8, 2, 4, nu=2, fuse_features=fuse, chunk_size=CHUNK, rngs=nnx.Rngs(0))

        def loss(layer, x):
            y, memory = layer(x, segment_ids=SEGMENT_IDS)
            return jnp.sum(y * jnp.sin(y)) + jnp.sum(memory**2)

        return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(layer, x)

    got, want = results(True), results(False)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close_to_scale(g, w, TOLERANCE)


# --- sharded: batch and heads, and the sequence (context parallelism), on host devices -------------


def test_sharded_runs_with_features_equal_one_device():  # pinned jax only: the CP runs check the newest
    result = run_with_host_devices(SCRIPTS / "features_sharded_script.py", count=4)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
