"""impl="chunk": the chunkwise-parallel form against the oracle across chunk sizes and widths."""

import chex
import jax
import jax.numpy as jnp
import pytest

import dpfp_jax as dj
from dpfp_devtools.workloads import make_inputs
from tests.helpers import (
    DIFF_ARGS,
    JAX_SENSITIVE,
    assert_close,
    cast_inputs,
    random_like,
    temp_bytes_of_grad,
    value_and_grads,
)


def run(inputs, impl, rule, **kwargs):
    return dj.fast_weight(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], rule=rule,
                          initial_state=inputs["initial_state"], impl=impl, **kwargs)


def float64_cases():
    """The full grid; `make test` runs every T at K = 96 with a state and chunk size 16, and the
    other widths at T = 65 with chunk size 64; `make test-all` everything."""
    for rule in ("delta", "sum"):
        for chunk_size in (16, 64):
            for T in (1, 63, 64, 65, 300):
                for K in (16, 96, 384):
                    for with_state in (False, True):
                        fast = (K == 96 and with_state and chunk_size == 16) or (
                            T == 65 and chunk_size == 64 and K != 96 and with_state != (K == 16)
                        )
                        marks = () if fast else (pytest.mark.slow,)
                        yield pytest.param(rule, chunk_size, T, K, with_state, marks=marks)


@pytest.mark.parametrize("rule, chunk_size, T, K, with_state", list(float64_cases()))
def test_chunk_matches_reference_float64(x64, rule, chunk_size, T, K, with_state):
    inputs = make_inputs(T + K, batch=1, time=T, heads=2, key_dim=K, value_dim=8, rule=rule,
                         dtype=jnp.float64, with_state=with_state)
    got = value_and_grads(lambda x: run(x, "chunk", rule, chunk_size=chunk_size), inputs)
    want = value_and_grads(lambda x: run(x, "reference", rule), inputs)
    assert_close(got, want, rtol=1e-9, atol=1e-11)


def float32_cases():
    """`make test` runs two corners of the grid, `make test-all` all of it."""
    for rule in ("delta", "sum"):
        for chunk_size in (16, 64):
            for T in (63, 300):
                for K in (16, 384):
                    fast = (chunk_size, T, K) in ((16, 300, 384), (64, 63, 16))
                    yield pytest.param(rule, chunk_size, T, K, marks=() if fast else (pytest.mark.slow,))


@JAX_SENSITIVE
@pytest.mark.parametrize("rule, chunk_size, T, K", list(float32_cases()))
def test_chunk_matches_reference_float32(rule, chunk_size, T, K):
    inputs = make_inputs(T * K, time=T, key_dim=K, value_dim=8, rule=rule, with_state=True)
    got = value_and_grads(lambda x: run(x, "chunk", rule, chunk_size=chunk_size), inputs)
    want = value_and_grads(lambda x: run(x, "reference", rule), inputs)
    assert_close(got, want, rtol=1e-4, atol=1e-5)


@JAX_SENSITIVE
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_chunk_bfloat16(rule):
    inputs = make_inputs(3, time=100, key_dim=32, value_dim=8, rule=rule, with_state=True)
    bf16 = cast_inputs(inputs, jnp.bfloat16)
    (out, state), grads = value_and_grads(lambda x: run(x, "chunk", rule), bf16)
    chex.assert_type([out, state], [jnp.bfloat16, jnp.float32])
    chex.assert_type(grads, jnp.bfloat16)
    upcast = cast_inputs(bf16, jnp.float32)
    want = value_and_grads(lambda x: run(x, "reference", rule), upcast)
    assert_close((out.astype(jnp.float32), state), want[0], rtol=2e-2, atol=2e-2)
    assert_close([g.astype(jnp.float32) for g in grads], want[1], rtol=5e-2, atol=5e-2)


@JAX_SENSITIVE
def test_chunk_composes_with_jit_vmap_grad():
    inputs = make_inputs(4, time=40, key_dim=24, with_state=True)
    args = [inputs[n] for n in DIFF_ARGS]

    def f(q, k, v, beta, s):
        return dj.fast_weight(q, k, v, beta, initial_state=s, impl="chunk", chunk_size=16)

    want = run(inputs, "reference", "delta")
    assert_close(jax.jit(f)(*args), want, rtol=1e-5, atol=1e-6)
    stacked = [jnp.stack([a, a]) for a in args]
    out, state = jax.jit(jax.vmap(f))(*stacked)
    assert_close((out[1], state[1]), want, rtol=1e-5, atol=1e-6)
    loss = lambda *a: jnp.sum(f(*a)[0] ** 2)  # noqa: E731
    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*stacked)
    def reference_loss(*a):
        return jnp.sum(run(dict(zip(DIFF_ARGS, a, strict=True)), "reference", "delta")[0] ** 2)

    want_grads = jax.grad(reference_loss, argnums=(0, 1, 2, 3, 4))(*args)
    assert_close([g[0] for g in grads], want_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_chunk_long_sequence_stays_accurate(rule):
    # Sum-normalised keys, T = 8192, float32: outputs and gradients within 1e-4 of the oracle.
    inputs = make_inputs(21, batch=1, time=8192, heads=2, key_dim=64, value_dim=16, rule=rule,
                         with_state=True)
    got = value_and_grads(lambda x: run(x, "chunk", rule), inputs)
    want = value_and_grads(lambda x: run(x, "reference", rule), inputs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        rel = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
        assert rel < 1e-4, rel


def test_chunk_backward_keeps_no_state_per_chunk():

    scan, chunk = temp_bytes_of_grad("scan"), temp_bytes_of_grad("chunk")
    # T / C = 32 chunks; a state per chunk alone would be 32 * B * H * K * V * 4 bytes (8.4 MB).
    # The scan keeps no state at all beyond the running one, so chunk's temporaries may exceed
    # the scan's by its per-chunk pieces, but by less than half of a state per chunk (2.8 MB when
    # written: 36.7 MB against 33.9).
    per_chunk_states = 32 * 2 * 4 * 128 * 64 * 4
    assert chunk - scan < per_chunk_states / 2, (chunk, scan, per_chunk_states)


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_chunk_backward_keeps_the_writes_and_one_state_per_span(rule):
    # What the backward needs per step beyond the inputs as they came is the delta rule's write
    # u_t (V floats; the sum rule's is v_t itself) and, per span of span_size steps, the state
    # at its end; everything else (scores, the WY inverse, U_tilde, Y, Q - S Y, widened copies of
    # the inputs) is recomputed one span at a time, so it must not grow with T. Measured as the
    # growth of the compiled gradient's scratch memory from T = 4096 to 8192, per step and head.
    from dpfp_jax.ops.fast_weight.chunk import DEFAULT_SPAN_SIZE, fast_weight_chunk

    batch, heads, key_dim, value_dim = 2, 4, 128, 64

    def temp_bytes(length):
        def shape(*dims):
            return jax.ShapeDtypeStruct(dims, jnp.float32)

        def loss(q, k, v, beta):
            out, state = fast_weight_chunk(q, k, v, beta, jnp.zeros((batch, heads, key_dim, value_dim)), rule=rule,
                                           scale=1.0)
            return jnp.sum(out) + jnp.sum(state)

        keys, beta = shape(batch, length, heads, key_dim), shape(batch, length, heads) if rule == "delta" else None
        args = (keys, keys, shape(batch, length, heads, value_dim), beta)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_step = (temp_bytes(8192) - temp_bytes(4096)) / (4096 * batch * heads * 4)  # float32s per step and head
    kept = (value_dim if rule == "delta" else 0) + key_dim * value_dim / DEFAULT_SPAN_SIZE
    assert per_step <= kept + value_dim / 4, (per_step, kept)


@pytest.mark.parametrize("size", [1, 2, 3, 8, 9, 16, 64, 70])
def test_wy_inverse_matches_a_triangular_solve_with_matmuls_only(x64, size):
    # The per-chunk inverse is built from matmuls (a batched triangular solve stalled for seconds
    # on a loaded CPU); it must still be the inverse, for any chunk size, also with documents.
    from jax.scipy.linalg import solve_triangular

    from dpfp_jax.ops.fast_weight.wy import wy_inverse

    inputs = make_inputs(size, batch=1, time=size, heads=3, key_dim=16, dtype=jnp.float64)
    k, beta = inputs["k"][0].swapaxes(0, 1), inputs["beta"][0].T  # [H, C, K], [H, C]
    document = jnp.cumsum(jnp.arange(size) % 5 == 4)
    same = document[:, None] == document[None, :]
    for mask in (None, same):
        gram = jnp.einsum("hik,hjk->hij", k, k)
        lower = beta[..., None] * jnp.tril(gram if mask is None else jnp.where(mask, gram, 0.0), -1)
        want = solve_triangular(jnp.eye(size) + lower, jnp.broadcast_to(jnp.eye(size), lower.shape), lower=True,
                                unit_diagonal=True)
        got = wy_inverse(k, beta, mask)
        chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-13)
    assert "triangular_solve" not in str(jax.make_jaxpr(wy_inverse)(k, beta))


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("packed", [False, True])
def test_span_size_changes_nothing_but_memory(rule, packed):
    # Spans of one chunk, of 3 chunks (T = 300 in chunks of 16 needs 19: 7 spans, 2 chunks of
    # padding), of 12 chunks and of the whole sequence: the same outputs and gradients, to round-off.
    from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk
    from dpfp_jax.ops.fast_weight.segments import resets_of

    inputs = make_inputs(9, time=300, key_dim=24, rule=rule, with_state=True)
    resets = resets_of(jnp.cumsum(jnp.arange(300) % 37 == 36)[None].repeat(2, 0)) if packed else None
    names = [n for n in DIFF_ARGS if inputs[n] is not None]

    def grads(span_size):
        def loss(*args):
            a = {**inputs, **dict(zip(names, args, strict=True))}
            out, state = fast_weight_chunk(a["q"], a["k"], a["v"], a["beta"], a["initial_state"], rule=rule,
                                           scale=0.5, chunk_size=16, resets=resets, span_size=span_size)
            return jnp.sum(out * random_like(1, out)) + jnp.sum(state * random_like(2, state)), (out, state)

        return jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True)(*[inputs[n] for n in names])

    want = grads(10**6)
    for span_size in (16, 48, 200):
        assert_close(grads(span_size), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="span_size must be a positive int; got 0"):
        grads(0)


def test_chunk_size_is_validated():
    inputs = make_inputs(0, time=8)
    for bad in (0, -4, 2.0, True):
        with pytest.raises((TypeError, ValueError), match="chunk_size"):
            run(inputs, "chunk", "delta", chunk_size=bad)


def compiled_grad(inputs, impl, **kwargs):
    """The jitted gradient of a loss on both outputs, compiled, and its arguments."""
    names = [n for n in DIFF_ARGS if inputs[n] is not None]

    def loss(*args):
        out, state = run(dict(zip(names, args, strict=True)), impl, "delta", **kwargs)
        return jnp.sum(out**2) + jnp.sum(state**2)

    args = [inputs[n] for n in names]
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(names))))).lower(*args).compile(), args


def test_chunk_size_above_t_costs_what_t_needs():
    # A chunk of C steps costs O(C^2) whatever T is; padding T = 70 up to C = 10**6 would need
    # terabytes. Above T, the chunk size must not matter: one chunk of T steps.
    inputs = make_inputs(70, time=70, key_dim=16, with_state=True)
    huge, args = compiled_grad(inputs, "chunk", chunk_size=10**6)
    oracle, _ = compiled_grad(inputs, "reference")
    assert_close(huge(*args), oracle(*args), rtol=1e-4, atol=1e-5)
    outputs = jax.jit(lambda x: run(x, "chunk", "delta", chunk_size=10**6))(inputs)
    assert_close(outputs, jax.jit(lambda x: run(x, "reference", "delta"))(inputs), rtol=1e-5, atol=1e-6)
    temp_bytes = compiled_grad(inputs, "chunk", chunk_size=128)[0].memory_analysis().temp_size_in_bytes
    assert huge.memory_analysis().temp_size_in_bytes == temp_bytes


@JAX_SENSITIVE
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_chunk_runs_the_walk_it_is_given(rule):
    # The sequential part is passed in as (forward, backward) functions, not chosen by name: a
    # walk that records its calls runs once each way under value_and_grad, and being the XLA
    # walk's own functions it leaves every value and gradient as the default walk gives them.
    from dpfp_jax.ops.fast_weight.chunk import XLA_WALK, Walk, fast_weight_chunk

    calls = []

    def recorded(name, fn):
        def run(*args):
            calls.append(name)
            return fn(*args)

        return run

    walk = Walk(recorded("forward", XLA_WALK.forward), recorded("backward", XLA_WALK.backward))
    inputs = make_inputs(4, time=40, rule=rule, with_state=True)
    names = [n for n in DIFF_ARGS if inputs[n] is not None]

    def grads(walk):
        def loss(*args):
            a = {**inputs, **dict(zip(names, args, strict=True))}
            out, state = fast_weight_chunk(a["q"], a["k"], a["v"], a["beta"], a["initial_state"], rule=rule,
                                           scale=0.5, chunk_size=16, walk=walk)
            return jnp.sum(out * random_like(1, out)) + jnp.sum(state * random_like(2, state)), (out, state)

        return jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True)(*[inputs[n] for n in names])

    got = grads(walk)
    assert calls == ["forward", "backward"]
    assert_close(got, grads(XLA_WALK), rtol=0, atol=0)


@pytest.mark.parametrize("walk", ["pallas", (lambda *a: a,), (None, None)])
def test_chunk_refuses_a_walk_that_is_not_a_pair_of_functions(walk):
    from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk

    inputs = make_inputs(0, time=32, with_state=True)
    with pytest.raises(TypeError, match="walk must be a \\(forward, backward\\) pair of functions"):
        fast_weight_chunk(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["initial_state"],
                          rule="delta", scale=1.0, chunk_size=16, walk=walk)
