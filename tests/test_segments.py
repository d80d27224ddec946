"""Packed documents (``segment_ids``): packed equals separate, for every impl, rule and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from dpfp_devtools.workloads import make_inputs
from tests.helpers import (
    JAX_SENSITIVE,
    assert_close,
    document_ids,
    loss_and_grads,
    packed_case,
    packed_ids,
)
from tests.helpers import PACKED_CHUNK as CHUNK

PACKED_IMPLS = ["reference", "scan", "chunk", "auto"]


def run_packed(inputs, rule, segment_ids, impl):
    return dj.fast_weight(**inputs, rule=rule, impl=impl, chunk_size=CHUNK, segment_ids=segment_ids)


@pytest.mark.parametrize("impl", PACKED_IMPLS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
# bfloat16 with the slow tests (make test-all): make test is near its CI budget, and float32 holds the tight check.
@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=JAX_SENSITIVE),
                                   pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_packed_equals_separate(impl, rule, dtype):
    inputs, segment_ids, want = packed_case(rule, dtype)
    got = loss_and_grads(lambda x: run_packed(x, rule, segment_ids, impl), inputs)
    tight = dtype == "float32"
    assert_close(got, want, rtol=1e-5 if tight else 2e-2, atol=1e-6 if tight else 2e-2)


@pytest.mark.parametrize("impl", ["scan", "chunk"])
def test_one_document_per_row_is_no_segment_ids(impl):
    inputs = make_inputs(4, time=3 * CHUNK + 1, with_state=True)
    same = jnp.full((2, 3 * CHUNK + 1), 42)
    assert_close(loss_and_grads(lambda x: run_packed(x, "delta", same, impl), inputs),
                 loss_and_grads(lambda x: run_packed(x, "delta", None, impl), inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "scan"])
def test_a_non_finite_document_reaches_no_other(impl):
    # The step-by-step paths are strictly causal and a reset selects zero: nothing of a NaN document
    # survives into the next. (The chunked paths mix a chunk's steps in masked matmuls, see the op.)
    inputs = make_inputs(5, time=12, with_state=True)
    segment_ids = jnp.asarray(np.repeat([[0, 1, 2]], 2, axis=0).repeat(4, axis=1))
    clean = run_packed(inputs, "delta", segment_ids, impl)
    poisoned = {**inputs, "k": inputs["k"].at[:, 5].set(jnp.nan), "v": inputs["v"].at[:, 6].set(jnp.inf)}
    out, state = run_packed(poisoned, "delta", segment_ids, impl)
    assert np.isnan(np.asarray(out[:, 5:8])).any()
    assert_close((out[:, :4], out[:, 8:], state), (clean[0][:, :4], clean[0][:, 8:], clean[1]), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["scan", "chunk"])
def test_empty_and_jit_vmap(impl):
    inputs = make_inputs(6, time=0)
    out, state = dj.fast_weight(**inputs, impl=impl, segment_ids=jnp.zeros((2, 0), jnp.int32))
    assert out.shape == (2, 0, 2, 4) and not np.asarray(state).any()
    inputs = make_inputs(6, time=2 * CHUNK + 3)
    segment_ids = packed_ids(2 * CHUNK + 3, seed=6)

    def f(q, k, v, beta, ids):
        return dj.fast_weight(q, k, v, beta, impl=impl, chunk_size=CHUNK, segment_ids=ids)

    args = [inputs[n] for n in ("q", "k", "v", "beta")]
    stacked = jax.jit(jax.vmap(f))(*(jnp.stack([a, a]) for a in args), jnp.stack([segment_ids, segment_ids[::-1]]))
    assert_close((stacked[0][0], stacked[1][0]), f(*args, segment_ids), rtol=1e-6, atol=1e-7)
    assert_close((stacked[0][1], stacked[1][1]), f(*args, segment_ids[::-1]), rtol=1e-6, atol=1e-7)


def backward_temp_bytes(impl, segment_ids, batch=2, time=2048, heads=4, key_dim=128, value_dim=64):
    inputs = make_inputs(0, batch=batch, time=time, heads=heads, key_dim=key_dim, value_dim=value_dim)

    def loss(q, k, v, beta):
        out, state = dj.fast_weight(q, k, v, beta, impl=impl, segment_ids=segment_ids)
        return jnp.sum(out**2) + jnp.sum(state**2)

    args = [inputs[n] for n in ("q", "k", "v", "beta")]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("impl", ["scan", "chunk"])
def test_backward_memory_with_documents_within_half_again(impl):
    # The memory test's shape; documents of random lengths, resets inside chunks.
    rng = np.random.default_rng(0)
    rows = [document_ids(2048, rng.choice(np.arange(1, 2048), size=12, replace=False).tolist()) for _ in range(2)]
    with_documents = backward_temp_bytes(impl, jnp.asarray(np.stack(rows)))
    without = backward_temp_bytes(impl, None)
    assert with_documents <= 1.5 * without, (with_documents, without)


@pytest.mark.parametrize("segment_ids, error, message", [
    (jnp.zeros((2, 5), jnp.int32), ValueError, r"segment_ids must be \[B, T\] = \(2, 7\).*got shape \(2, 5\)"),
    (jnp.zeros((2, 7, 1), jnp.int32), ValueError, r"segment_ids must be \[B, T\]"),
    (jnp.zeros((2, 7)), TypeError, "segment_ids must have an integer dtype.*float32"),
    (jnp.zeros((2, 7), bool), TypeError, "integer dtype.*bool.*padding mask"),
    ([[0] * 7] * 2, TypeError, "segment_ids must be an array.*list"),
])
def test_bad_segment_ids_are_refused(segment_ids, error, message):
    inputs = make_inputs(7, time=7)
    with pytest.raises(error, match=message):
        dj.fast_weight(**inputs, segment_ids=segment_ids)
