"""Pallas kernels in interpret mode on the CPU, against the oracle; the GPU-only dispatch."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from dpfp_devtools.workloads import make_inputs
from dpfp_jax.ops.fast_weight.wy import wy_inverse
from pallas_kernels import MAX_KEY_DIM, chunk_walk, fused_chunk, fused_recurrent
from tests.helpers import DIFF_ARGS as ARGS
from tests.helpers import (
    SCRIPTS,
    assert_close,
    bad_kernel_calls,
    loss_and_grads,
    packed_case,
    pallas_calls,
    positional,
    random_like,
    run_with_host_devices,
    value_and_grads,
)


def kernel(rule, scale=1.0):
    return lambda q, k, v, beta, s: fused_recurrent(q, k, v, beta, s, rule=rule, scale=scale, interpret=True)


def oracle(rule, scale=1.0):
    return lambda q, k, v, beta, s: dj.fast_weight(q, k, v, beta, rule=rule, initial_state=s, scale=scale,
                                                   impl="reference")


SLOW = pytest.mark.slow


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("key_dim, value_dim", [pytest.param(8, 4, marks=SLOW), pytest.param(12, 5, marks=SLOW),
                                                (96, 70)])
def test_fused_recurrent_matches_reference(rule, key_dim, value_dim):
    # 12 and 96 exercise the padding of K to a power of two; V = 70 splits over value blocks.
    inputs = make_inputs(key_dim, time=11, rule=rule, key_dim=key_dim, value_dim=value_dim, with_state=True)
    got = value_and_grads(positional(kernel(rule, 0.5)), inputs)
    want = value_and_grads(positional(oracle(rule, 0.5)), inputs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def chunked_kernel(rule, scale=1.0, chunk_size=16):
    from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk

    return lambda q, k, v, beta, s: fast_weight_chunk(q, k, v, beta, s, rule=rule, scale=scale,
                                                      chunk_size=chunk_size, walk=chunk_walk(interpret=True))


def composed_fused_chunk(*args, rule, **kwargs):
    """``fused_chunk`` as the library composes it: given the library's WY inverse for the delta rule."""
    return fused_chunk(*args, rule=rule, wy_inverse=wy_inverse if rule == "delta" else None, **kwargs)


def fused_chunk_kernel(rule, scale=1.0, chunk_size=16):
    return lambda q, k, v, beta, s: composed_fused_chunk(q, k, v, beta, s, rule=rule, scale=scale,
                                                         chunk_size=chunk_size, interpret=True)


def chunked_cases():
    # Every shape for the shipped fused chunk kernel in `make test`; the walk-only kernel, kept
    # for comparison on the GPU, runs its larger shapes with the slow tests.
    for kernel_of, name in ((fused_chunk_kernel, "fused_chunk"), (chunked_kernel, "chunk_recurrence")):
        for shape, slow in (((8, 4, 40), True), ((12, 5, 33), False), ((160, 70, 50), name != "fused_chunk"),
                            ((130, 16, 32), True)):
            yield pytest.param(kernel_of, *shape, marks=[SLOW] if slow else [], id=f"{name}-{shape[0]}")


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("kernel_of, key_dim, value_dim, T", list(chunked_cases()))
def test_chunked_kernels_match_reference(kernel_of, rule, key_dim, value_dim, T):
    # K = 160 and 130 pad to 192: three 64-key tiles (whole tiles, not the power of two 256);
    # V = 70 splits over value blocks (forward and backward differently); T = 33 and 50 end in a
    # partial chunk.
    inputs = make_inputs(T, time=T, rule=rule, key_dim=key_dim, value_dim=value_dim, with_state=True)
    got = value_and_grads(positional(kernel_of(rule, 0.5)), inputs)
    want = value_and_grads(positional(oracle(rule, 0.5)), inputs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_of", [kernel, fused_chunk_kernel], ids=["fused_recurrent", "fused_chunk"])
def test_kernels_take_bfloat16(kernel_of):
    # bf16 inputs are read as they are; outputs and gradients come back in bf16, the state in
    # float32. T = 40 is two and a half chunks of 16 for the chunked kernel.
    inputs = make_inputs(1, time=40, key_dim=16, value_dim=8, with_state=True)
    bf16 = {n: x.astype(jnp.bfloat16) for n, x in inputs.items()}
    (out, state), grads = value_and_grads(positional(kernel_of("delta")), bf16)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    (want_out, want_state), want_grads = value_and_grads(
        positional(oracle("delta")), {n: x.astype(jnp.float32) for n, x in bf16.items()})
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(state), np.asarray(want_state), rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunk_size", [8, 48])
def test_fused_chunk_refuses_chunks_a_tensor_core_cannot_tile(chunk_size):
    inputs = make_inputs(0, time=96, with_state=True)
    with pytest.raises(ValueError, match=f"power of two >= 16; got chunk_size={chunk_size}"):
        composed_fused_chunk(*[inputs[n] for n in ARGS], rule="delta", chunk_size=chunk_size, interpret=True)


@pytest.mark.parametrize("T, kernel_name", [(40, "fused_chunk"), (10, "fused_recurrent")])
def test_pallas_adapter_picks_chunked_from_one_chunk_on(T, kernel_name):
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas

    inputs = make_inputs(2, time=T, key_dim=8, value_dim=4, with_state=True)
    args = [inputs[n] for n in ARGS]
    def run(*a):
        return fast_weight_pallas(*a, rule="delta", scale=1.0, chunk_size=16, interpret=True)

    jaxpr = str(jax.make_jaxpr(run)(*args))  # pallas_call keeps its kernel's name there
    assert f"fast_weight_{kernel_name}_fwd" in jaxpr
    want = oracle("delta")(*args)
    for g, w in zip(jax.jit(run)(*args), want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def primitives_outside_kernels(jaxpr) -> list[str]:
    """Names of the primitives a jaxpr runs, looking into nested jits but not into custom_vjp calls."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        if eqn.primitive.name in ("jit", "pjit"):
            names += primitives_outside_kernels(eqn.params["jaxpr"].jaxpr)
    return names


@pytest.mark.parametrize("rule, transposes", [("sum", 0), ("delta", 2)])
def test_fused_chunk_reads_inputs_in_place(rule, transposes):
    # With K a power of two and T whole chunks nothing is padded, and q, v, the outputs (and for
    # the sum rule k) are never transposed: the kernels read the [B, T, H, D] layout per head.
    # The delta rule's WY inverse reads k and beta head-major: two transposes, done by XLA.
    inputs = make_inputs(0, time=64, heads=3, key_dim=64, value_dim=32, rule=rule, with_state=True)
    args = {n: x if x is None or n == "initial_state" else x.astype(jnp.bfloat16) for n, x in inputs.items()}
    jaxpr = jax.make_jaxpr(lambda *a: composed_fused_chunk(*a, rule=rule, chunk_size=16))(*[args[n] for n in ARGS])
    names = primitives_outside_kernels(jaxpr.jaxpr)
    assert names.count("transpose") == transposes and "pad" not in names, names


def kernel_outputs(jaxpr, name: str) -> list[list[tuple[str, tuple]]]:
    """(dtype, shape) of the outputs of every pallas_call named ``name``, nested jaxprs included."""
    return [[(v.aval.dtype.name, v.aval.shape) for v in eqn.outvars]
            for eqn in pallas_calls(jaxpr) if name in str(eqn.params["name"])]


def test_fused_chunk_writes_outputs_in_v_dtype_and_keeps_writes_only_for_gradients():
    # The forward kernel rounds the (scaled) output to v's dtype on chip, and stores the float32
    # writes u, which the backward rebuilds states from, only when a gradient will be taken.
    inputs = make_inputs(0, time=32, key_dim=16, value_dim=16, with_state=True)
    args = [inputs[n] if n == "initial_state" else inputs[n].astype(jnp.bfloat16) for n in ARGS]

    def run(*a):
        return composed_fused_chunk(*a, rule="delta", scale=0.5, chunk_size=16, interpret=True)

    chunks, state = (2, 2, 16, 2, 16), (4, 16, 16)
    assert kernel_outputs(jax.make_jaxpr(run)(*args).jaxpr, "fused_chunk_fwd") == [
        [("bfloat16", chunks), ("float32", state)]]
    assert kernel_outputs(jax.make_jaxpr(lambda *a: jax.vjp(run, *a))(*args).jaxpr, "fused_chunk_fwd") == [
        [("bfloat16", chunks), ("float32", chunks), ("float32", state)]]
    # dv comes out of the backward kernel in v's dtype too (dq, dk sum over value blocks in float32).
    backward = kernel_outputs(jax.make_jaxpr(jax.grad(lambda *a: run(*a)[0].astype(jnp.float32).sum(),
                                                      argnums=2))(*args).jaxpr, "fused_chunk_bwd")
    assert [dtype for dtype, _ in backward[0]] == ["float32", "float32", "float32", "bfloat16", "float32"]


@pytest.mark.parametrize("variant", [pytest.param("plain", marks=SLOW), "gated", pytest.param("dpfp", marks=SLOW)])
def test_fused_recurrent_keeps_writes_and_checkpoints_only_for_gradients(variant):
    # As the fused chunk kernel's: the forward stores the float32 writes u (delta rule) and, gated,
    # the checkpointed states only when a gradient will be taken; the sum rule never stores u. The
    # gated case, which has both, is make test's (about 1 s: jaxprs only, nothing runs).
    from pallas_kernels.triton.dpfp import DPFP

    batch_heads, time, value_dim = 2, 8, 16
    features = DPFP(1, "sum") if variant == "dpfp" else None
    key_dim = 64 if features else 16
    inputs = make_inputs(0, batch=1, time=time, key_dim=32 if features else key_dim, value_dim=value_dim)
    extra = {"log_decay": -jax.nn.softplus(inputs["v"][..., 0])} if variant == "gated" else {}
    state = jnp.zeros((1, batch_heads, key_dim, value_dim))
    name = {"plain": "recurrent_fwd", "gated": "recurrent_gated_fwd", "dpfp": "recurrent_dpfp_fwd"}[variant]
    per_step, final = ("float32", (batch_heads, time, value_dim)), ("float32", (batch_heads, key_dim, value_dim))
    # Gated: T = 8 is padded to whole blocks of checkpoint_block(8) = 3 steps, one state stored per block.
    if variant == "gated":
        per_step = ("float32", (batch_heads, 9, value_dim))
    checkpoints = [("float32", (batch_heads, 3, key_dim, value_dim))] if variant == "gated" else []
    for rule in ("delta", "sum"):
        def run(q, k, v, beta, rule=rule):
            return fused_recurrent(q, k, v, beta if rule == "delta" else None, state, rule=rule, interpret=True,
                                   features=features, **extra)

        args = [inputs[n] for n in ("q", "k", "v", "beta")]
        writes = [per_step] if rule == "delta" else []
        assert kernel_outputs(jax.make_jaxpr(run)(*args).jaxpr, name) == [[per_step, final]], rule
        assert kernel_outputs(jax.make_jaxpr(lambda *a: jax.vjp(run, *a))(*args).jaxpr, name) == [
            [per_step, *writes, *checkpoints, final]], rule


def test_fused_recurrent_refuses_oversized_keys():
    x = jnp.ones((1, 2, 1, MAX_KEY_DIM + 1))
    with pytest.raises(ValueError, match="K <= 1024"):
        fused_recurrent(x, x, jnp.ones((1, 2, 1, 4)), None, jnp.zeros((1, 1, MAX_KEY_DIM + 1, 4)), rule="sum")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off the GPU")
def test_impl_pallas_needs_a_gpu():
    inputs = make_inputs(0, time=4)
    with pytest.raises(ValueError, match="need a GPU"):
        dj.fast_weight(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], impl="pallas")


@pytest.mark.jax_sensitive
def test_kernel_runs_per_batch_shard_under_sharded_jit():
    result = run_with_host_devices(SCRIPTS / "pallas_sharded_script.py")
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def pallas_adapter(rule, scale):
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas

    return lambda q, k, v, beta, s: fast_weight_pallas(q, k, v, beta, s, rule=rule, scale=scale, chunk_size=16,
                                                       interpret=True)


# (kernel, T): through the adapter, T = 20 takes the fused chunk kernel (one whole chunk of 16 and a
# partial one) and T = 10 the fused recurrent one; the walk-only kernel is reached through the
# chunked op.
SCALED = {"fused_chunk": (pallas_adapter, 20), "fused_recurrent": (pallas_adapter, 10),
          "chunk_recurrence": (chunked_kernel, 20)}


@pytest.mark.parametrize("rule", ["delta", "sum"])
# fused_chunk took scale as a compile-time float; the other two kernels apply scale outside
# themselves, so their cases (coverage, not regressions) run with the slow tests.
@pytest.mark.parametrize("name, scale", [pytest.param(name, 0.7, marks=[] if name == "fused_chunk" else SLOW)
                                         for name in SCALED] + [("fused_chunk", 0.0)])
def test_kernels_take_a_traced_scale_and_differentiate_it(name, rule, scale):
    # scale is a jit argument (a tracer, as for a learned scale): every kernel takes it at run time
    # and returns dL/dscale, also at scale = 0 (dL/dscale is not recovered by dividing by scale).
    kernel_of, time = SCALED[name]
    inputs = make_inputs(3, time=time, rule=rule, key_dim=12, value_dim=5, with_state=True)
    names = [n for n in ARGS if inputs[n] is not None]

    def grads_of(fn_of):
        def loss(args, scale):
            a = dict(zip(names, args, strict=True))
            out, state = fn_of(rule, scale)(a["q"], a["k"], a["v"], a.get("beta"), a["initial_state"])
            return jnp.sum(out * random_like(1, out)) + jnp.sum(state * random_like(2, state)), (out, state)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            [inputs[n] for n in names], jnp.float32(scale))

    if name == "fused_chunk":  # the adapter did take the kernel under test
        jaxpr = str(jax.make_jaxpr(lambda s: pallas_adapter(rule, s)(*[inputs[n] for n in ARGS]))(1.0))
        assert "fast_weight_fused_chunk_fwd" in jaxpr
    (_, got), got_grads = grads_of(kernel_of)
    (_, want), want_grads = grads_of(oracle)
    assert np.asarray(want_grads[1]) != 0.0
    for g, w in zip(jax.tree.leaves((got, got_grads)), jax.tree.leaves((want, want_grads)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_fn", [composed_fused_chunk, fused_recurrent], ids=["fused_chunk", "fused_recurrent"])
@pytest.mark.parametrize("case", range(len(bad_kernel_calls()[0])), ids=[c[0] for c in bad_kernel_calls()[0]])
def test_kernels_refuse_what_the_dispatcher_refuses(kernel_fn, case):
    # Called directly (no dispatcher in front), each kernel checks its own arguments at trace time.
    cases, good = bad_kernel_calls()
    _, changes, error, message = cases[case]
    kwargs = {**good, **changes}
    args = [kwargs.pop(n) for n in ARGS]
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda *a: kernel_fn(*a, **kwargs, interpret=True), *args)


@pytest.mark.parametrize("chunk_size, error, message", [
    (32.0, TypeError, "chunk_size must be an int; got float 32.0"),
    (True, TypeError, "chunk_size must be an int; got bool"),
])
def test_fused_chunk_refuses_chunk_sizes_that_are_not_ints_of_the_right_size(chunk_size, error, message):
    x = jnp.ones((1, 32, 1, 8))
    with pytest.raises(error, match=message):
        fused_chunk(x, x, x, None, jnp.zeros((1, 1, 8, 8)), rule="sum", chunk_size=chunk_size, interpret=True)


@pytest.mark.parametrize("rule, inverse, error, message", [
    ("delta", None, ValueError, "wy_inverse is required for rule='delta'.*got None"),
    ("delta", "solve", TypeError, "wy_inverse must be a function \\(k, beta\\) -> A\\^-1; got str"),
    ("sum", wy_inverse, ValueError, "wy_inverse is only used by rule='delta'; got a function with rule='sum'"),
    ("delta", lambda k, beta: k, ValueError,  # [B, H, N, C, K]: not a [C, C] matrix per chunk
     "wy_inverse must return A\\^-1 of shape \\[..., C, C\\] = \\(1, 2, 2, 32, 32\\); got \\(1, 2, 2, 32, 16\\)"),
    ("delta", lambda k, beta: None, ValueError, "wy_inverse must return .* got NoneType"),
    ("delta", lambda k, beta: wy_inverse(k, beta).astype(jnp.int32), TypeError,
     "wy_inverse's result must have a floating dtype; got int32"),
], ids=["delta without it", "not a function", "sum with it", "not [C, C] per chunk", "no array", "integer result"])
def test_fused_chunk_takes_the_delta_rules_wy_inverse_from_its_caller(rule, inverse, error, message):
    # The kernel imports nothing of the library: the delta rule's per-chunk inverse is an argument,
    # checked at trace time like the arrays.
    x = jnp.ones((1, 64, 2, 16))
    beta = jnp.full((1, 64, 2), 0.5) if rule == "delta" else None
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda: fused_chunk(x, x, x, beta, jnp.zeros((1, 2, 16, 16)), rule=rule, chunk_size=32,
                                           interpret=True, wy_inverse=inverse))


def recurrence_args(key_dim=8, value_dim=4, delta=True):
    """Good ``[N, G, C, ...]`` arguments of the chunk recurrence's forward and backward."""
    keys, values, state = jnp.ones((2, 3, 16, key_dim)), jnp.ones((2, 3, 16, value_dim)), jnp.zeros((3, key_dim,
                                                                                                     value_dim))
    return keys, values, state, keys if delta else None


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("what, message", [
    ("K over the bound", f"q_eff: the Pallas kernels take K <= {MAX_KEY_DIM}; got K={MAX_KEY_DIM + 1}"),
    ("y unlike q_eff", "y must have q_eff's shape \\[N, G, C, K\\] = \\(2, 3, 16, 8\\); got \\(2, 3, 16, 4\\)"),
    ("values of another G", "must be \\[N, G, C, V\\] with q_eff's N, G, C = \\(2, 3, 16\\); got \\(2, 2, 16, 4\\)"),
    ("state of another V", "must be \\[G, K, V\\] = \\(3, 8, 4\\); got \\(3, 8, 5\\)"),
])
def test_chunk_recurrence_refuses_inconsistent_shapes(direction, what, message):
    from pallas_kernels import backward_recurrence, forward_recurrence

    keys, values, state, y = recurrence_args(MAX_KEY_DIM + 1 if what == "K over the bound" else 8)
    if what == "y unlike q_eff":
        y = keys[..., :4]
    if what == "values of another G":
        values = values[:, :2]
    if what == "state of another V":
        state = jnp.zeros((3, 8, 5))
    if direction == "forward":
        def run():
            return forward_recurrence(keys, keys, values, y, values, state, interpret=True)
    else:
        def run():
            return backward_recurrence(keys, keys, values, y, values, state, state, interpret=True)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(run)


# Packed documents: every kernel against the oracle run one document at a time (tests/test_segments.py's
# case: the first row's documents start at positions C-1, C and C+1 of a chunk, at 2C and at T-1, so
# some have length 1; the second row's at random). The chunked kernels need C >= 16.
PACKED_CHUNK = 16


def packed_run(name, rule, segment_ids):
    """``fn(inputs) -> (out, final_state)`` of one kernel with the documents of ``segment_ids``."""
    from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas
    from dpfp_jax.ops.fast_weight.segments import resets_of

    resets = resets_of(segment_ids)

    def fn(inputs):
        args = [inputs[n] for n in ARGS]
        if name == "fused_chunk":
            return composed_fused_chunk(*args, rule=rule, chunk_size=PACKED_CHUNK, interpret=True, resets=resets)
        if name == "fused_recurrent":
            return fused_recurrent(*args, rule=rule, interpret=True, resets=resets)
        if name == "chunk_recurrence":
            return fast_weight_chunk(*args, rule=rule, scale=1.0, chunk_size=PACKED_CHUNK,
                                     walk=chunk_walk(interpret=True), resets=resets)
        # impl="pallas" as the op calls it: from one chunk on the fused chunked kernel; with a chunk
        # longer than T the fused recurrent one.
        chunk_size = PACKED_CHUNK if name == "pallas-chunked" else 128
        return fast_weight_pallas(*args, rule=rule, scale=1.0, chunk_size=chunk_size, interpret=True, resets=resets)

    return fn


def packed_cases():
    for name in ("fused_chunk", "fused_recurrent", "chunk_recurrence", "pallas-chunked", "pallas-recurrent"):
        for rule in ("delta", "sum"):
            for dtype in ("float32", "bfloat16"):
                # The adapter's float32 delta cases run always; its others add coverage, not checks.
                slow = dtype == "bfloat16" or (name.startswith("pallas") and rule == "sum")
                yield pytest.param(name, rule, dtype, marks=[SLOW] if slow else [], id=f"{name}-{rule}-{dtype}")


@pytest.mark.parametrize("name, rule, dtype", list(packed_cases()))
def test_kernels_take_packed_documents(name, rule, dtype):

    inputs, segment_ids, want = packed_case(rule, dtype, PACKED_CHUNK)
    got = loss_and_grads(packed_run(name, rule, segment_ids), inputs)
    tight = dtype == "float32"
    assert_close(got, want, rtol=1e-4 if tight else 2e-2, atol=1e-5 if tight else 2e-2)


def test_fused_chunk_gives_wy_inverse_the_documents():
    # With resets the WY inverse must mask the Gram matrix by document: a (k, beta) function cannot.
    x, resets = jnp.ones((1, 32, 2, 16)), jnp.zeros((1, 32), bool).at[0, 5].set(True)
    args = (x, x, x, jnp.full((1, 32, 2), 0.5), jnp.zeros((1, 2, 16, 16)))
    with pytest.raises(TypeError, match=r"with resets, wy_inverse is called as wy_inverse\(k, beta, same_document\)"
                                        r".*got a function <lambda>\(k, beta\)"):
        jax.eval_shape(lambda: fused_chunk(*args, rule="delta", chunk_size=16, interpret=True, resets=resets,
                                           wy_inverse=lambda k, beta: wy_inverse(k, beta)))
    seen = []

    def recording(k, beta, same_document):
        seen.append(same_document.shape)
        return wy_inverse(k, beta, same_document)

    jax.eval_shape(lambda: fused_chunk(*args, rule="delta", chunk_size=16, interpret=True, resets=resets,
                                       wy_inverse=recording))
    assert seen == [(1, 2, 2, 16, 16)]  # [B, H, N, C, C]


@pytest.mark.parametrize("direction, what, error, message", [
    ("forward", "integer keep", TypeError, "keep must be a bool array \\[N, G\\].*got int32"),
    ("forward", "keep of another G", ValueError, "keep must be \\[N, G\\] = \\(2, 3\\); got shape \\(2, 2\\)"),
    ("backward", "keep without states", ValueError, "states is required with keep.*\\(2, 3, 8, 4\\); got None"),
    ("backward", "states without keep", ValueError, "states is only used with keep"),
    ("backward", "states of another V", ValueError,
     "states must be \\[N, G, K, V\\] = \\(2, 3, 8, 4\\); got \\(2, 3, 8, 5\\)"),
])
def test_chunk_recurrence_refuses_inconsistent_documents(direction, what, error, message):
    from pallas_kernels import backward_recurrence, forward_recurrence

    keys, values, state, y = recurrence_args()
    keep = {"integer keep": jnp.ones((2, 3), jnp.int32), "keep of another G": jnp.ones((2, 2), bool),
            "states without keep": None}.get(what, jnp.ones((2, 3), bool))
    states = {"keep without states": None, "states of another V": jnp.zeros((2, 3, 8, 5))}.get(
        what, jnp.zeros((2, 3, 8, 4)))
    if direction == "forward":
        def run():
            return forward_recurrence(keys, keys, values, y, values, state, keep, interpret=True)
    else:
        def run():
            return backward_recurrence(keys, keys, values, y, values, state, state, keep, states, interpret=True)
    with pytest.raises(error, match=message):
        jax.eval_shape(run)


@pytest.mark.parametrize("name", ["fused_recurrent", "fused_chunk"])
def test_kernels_take_resets_as_the_oracle_does(name):
    # Called directly the kernels take any resets, also at step 0 (which segment ids never make):
    # the initial state is then dropped, as the oracle does; here with resets inside and at the
    # end of a chunk of 16 too.
    from dpfp_jax.ops.fast_weight.naive import fast_weight_reference

    inputs = make_inputs(5, time=20, with_state=True)
    resets = jnp.zeros((2, 20), bool).at[0, jnp.array([0, 4, 15])].set(True).at[1, jnp.array([1, 16])].set(True)
    fns = {"fused_recurrent": lambda *a: fused_recurrent(*a, rule="delta", scale=0.5, interpret=True, resets=resets),
           "fused_chunk": lambda *a: composed_fused_chunk(*a, rule="delta", scale=0.5, chunk_size=16,
                                                          interpret=True, resets=resets),
           "reference": lambda *a: fast_weight_reference(*a, rule="delta", scale=0.5, resets=resets)}
    got, want = value_and_grads(positional(fns[name]), inputs), value_and_grads(positional(fns["reference"]), inputs)
    assert not np.asarray(want[1][-1])[0].any()  # row 0's initial state was dropped: no gradient
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
