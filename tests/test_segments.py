"""Packed documents (``segment_ids``): packed equals separate, for every impl, rule and dtype."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from dpfp_devtools.workloads import make_inputs
from tests.helpers import random_like
from tests.test_fast_weight import DIFF_ARGS, JAX_SENSITIVE, assert_close

CHUNK = 8
PACKED_IMPLS = ["reference", "scan", "chunk", "auto"]


def document_ids(length: int, starts: list[int], first_id: int = 5) -> np.ndarray:
    """Ids for one row whose documents start at ``starts`` (besides 0): unsorted, negative ones too,
    and an id may come back later (a new document all the same)."""
    count = np.zeros(length, np.int32)
    for start in starts:
        count[start:] += 1
    # 7 is coprime to 11: consecutive documents always differ.
    return (count * 7 + first_id) % 11 - 3


def packed_ids(length: int, seed: int, chunk: int = CHUNK) -> jnp.ndarray:
    """Two rows: the first has documents starting at positions C-1, C and C+1 of a chunk (C =
    ``chunk``; a document of length 1 among them), at a chunk's first step 2C, and at T-1 (length
    1 at the end); the second has random lengths."""
    rng = np.random.default_rng(seed)
    first = document_ids(length, [chunk - 1, chunk, chunk + 1, 2 * chunk, length - 1])
    cuts = sorted(set(rng.choice(np.arange(1, length), size=length // 6, replace=False).tolist()))
    return jnp.asarray(np.stack([first, document_ids(length, cuts, first_id=2)]))


def documents(ids: np.ndarray) -> list[tuple[int, int]]:
    starts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def run_separately(inputs, rule, segment_ids):
    """The oracle, each document alone: every document zero-padded to a row of its own (zero k, v
    and beta after its end write nothing), one reference run over those rows, then the outputs
    gathered back and each row's last document's final state. It never meets a reset."""
    rows = [documents(ids) for ids in np.asarray(segment_ids)]
    spans = [(b, p, e) for b, row in enumerate(rows) for p, e in row]
    longest = max(e - p for _, p, e in spans)
    # [documents, longest] indices into the packed [B, T]; padding points at a zeroed copy below.
    batch_of = np.array([[b] * longest for b, _, _ in spans])
    time_of = np.array([[min(p + i, e - 1) for i in range(longest)] for _, p, e in spans])
    real = np.array([[i < e - p for i in range(longest)] for _, p, e in spans])

    def unpack(x):
        picked = x[batch_of, time_of]
        return jnp.where(real.reshape(real.shape + (1,) * (x.ndim - 2)), picked, 0)

    starts = inputs["initial_state"]
    first = np.array([p == 0 for _, p, _ in spans])
    alone = {name: None if x is None else unpack(x) for name, x in inputs.items() if name != "initial_state"}
    if starts is not None:
        alone["initial_state"] = jnp.where(first[:, None, None, None], starts[batch_of[:, 0]], 0)
    out, state = dj.fast_weight(**alone, rule=rule, impl="reference")
    # Back to [B, T]: step (b, t) is at (its document, t - p); the last document of row b holds its state.
    where = {(b, p + i): (n, i) for n, (b, p, e) in enumerate(spans) for i in range(e - p)}
    length = segment_ids.shape[1]
    index = np.array([[where[b, t] for t in range(length)] for b in range(len(rows))])
    last = [max(n for n, span in enumerate(spans) if span[0] == b) for b in range(len(rows))]
    return out[index[..., 0], index[..., 1]], state[np.array(last)]


def run_packed(inputs, rule, segment_ids, impl):
    return dj.fast_weight(**inputs, rule=rule, impl=impl, chunk_size=CHUNK, segment_ids=segment_ids)


def loss_and_grads(fn, inputs):
    names = [n for n in DIFF_ARGS if inputs[n] is not None]

    def loss(*args):
        out, state = fn({**inputs, **dict(zip(names, args, strict=True))})
        return jnp.sum(out * random_like(1, out)) + jnp.sum(state * random_like(2, state)), (out, state)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    grads, results = grad(*[inputs[n] for n in names])
    return results, grads


def packed_length(chunk: int) -> int:
    return 5 * chunk - 3  # not a whole number of chunks


@functools.cache
def packed_case(rule: str, dtype: str, chunk: int = CHUNK):
    """Inputs, ids and the separate runs' results and gradients (the oracle, computed once per case),
    for chunks of ``chunk`` steps (which set T and where the first row's documents start)."""
    length = packed_length(chunk)
    inputs = make_inputs(3, time=length, rule=rule, dtype=jnp.dtype(dtype), with_state=True)
    segment_ids = packed_ids(length, seed=3, chunk=chunk)
    return inputs, segment_ids, loss_and_grads(lambda x: run_separately(x, rule, segment_ids), inputs)


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
