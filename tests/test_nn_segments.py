"""Packed documents (``segment_ids``) in the linen modules: packed equals separate, decoding included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from tests.helpers import JAX_SENSITIVE, close, document_ids, documents, normal

LENGTH = 11
# Row 0: documents of 3, 1 (masked), 5 and 2 tokens; row 1: 6, 4 and 1. Row 1's first id is 0,
# the id a fresh decode cache holds; row 0's is not.
IDS = np.stack([document_ids(LENGTH, [3, 4, 9]), document_ids(LENGTH, [6, 10], first_id=3)])
SEGMENT_IDS = jnp.asarray(IDS)
# Padding at a document's only token (row 0, t=3), at a document's first token (row 1, t=6) and inside.
MASK = jnp.ones((2, LENGTH), bool).at[0, 3].set(False).at[0, 10].set(False).at[1, 6].set(False).at[1, 7].set(False)

LAYER_CONFIGS = {
    "sum": dict(feature_map="dpfp", nu=2, rule="delta", normalization="sum"),
    "l2": dict(feature_map="identity", rule="delta", normalization="l2"),
    # elu+1 features are positive, so the denominator phi(q) . z never nears eps: DPFP's sparse
    # features can make it exactly eps, where gradients are scaled by 1/eps and the scan's recomputed
    # states' float32 rounding shows.
    "attention": dict(feature_map="linear", rule="sum", normalization="attention"),
}


def test_the_case_has_what_it_claims():
    assert [documents(IDS[b]) for b in range(2)] == [
        [(0, 3), (3, 4), (4, 9), (9, 11)], [(0, 6), (6, 10), (10, 11)]]
    assert int(SEGMENT_IDS[1, 0]) == 0 and int(SEGMENT_IDS[0, 0]) != 0


def starting_memory(model, batch):
    """A non-empty memory to start from: the row's first document must continue it."""
    if isinstance(model, dj.DPFPformer):
        x = normal(7, (batch, 4, model.dim))
        variables = model.init(jax.random.key(1), x)
        return model.apply(variables, x, return_memory=True)[1]
    shape = model.get_memory_shape(batch)
    w = normal(8, shape, 0.1)
    # A positive key sum, as one accumulated from non-negative features would be.
    attention = getattr(model, "normalization", "sum") == "attention"
    return (w, jnp.abs(normal(9, shape[:3])) + 1.0) if attention else w


def packed_and_separate(model, params, x, memory):
    """Loss, outputs, memory and gradients (parameters and starting memory) of the packed pass and
    of running each document alone (the row's first from ``memory``, the others from empty).

    Alone means in a row of its own: the documents are stacked as rows, right-padded by the mask
    (a padded token writes nothing and leaves the real ones alone, tests/test_nn.py), so one call
    runs them all and compiles once."""
    options = dict(return_memory=True) if isinstance(model, dj.DPFPformer) else {}
    weights = normal(3, x.shape)
    memory_weights = jax.tree.map(lambda m: normal(4, m.shape), memory)
    pieces = [(b, n, p, e) for b in range(x.shape[0]) for n, (p, e) in enumerate(documents(IDS[b]))]
    width = max(e - p for _, _, p, e in pieces)

    def memory_term(mem):
        return sum(jnp.sum(m * w) for m, w in zip(jax.tree.leaves(mem), jax.tree.leaves(memory_weights),
                                                  strict=True))

    def packed(params, memory):
        y, mem = model.apply({"params": params}, x, memory, mask=MASK, segment_ids=SEGMENT_IDS, **options)
        return jnp.sum(y * weights) + memory_term(mem), (y, mem)

    def separate(params, memory):
        def pad(a, p, e):
            return jnp.pad(a[p:e], [(0, width - e + p)] + [(0, 0)] * (a.ndim - 1))

        rows = jnp.stack([pad(x[b], p, e) for b, _, p, e in pieces])
        masks = jnp.stack([pad(MASK[b], p, e) for b, _, p, e in pieces])
        starts = jax.tree.map(lambda m: jnp.stack([m[b] if n == 0 else jnp.zeros_like(m[b])
                                                   for b, n, _, _ in pieces]), memory)
        ys, mems = model.apply({"params": params}, rows, starts, mask=masks, **options)
        y = jnp.stack([jnp.concatenate([ys[i, : e - p] for i, (c, _, p, e) in enumerate(pieces) if c == b])
                       for b in range(x.shape[0])])
        last = [max(i for i, piece in enumerate(pieces) if piece[0] == b) for b in range(x.shape[0])]
        mem = jax.tree.map(lambda m: m[jnp.array(last)], mems)
        return jnp.sum(y * weights) + memory_term(mem), (y, mem)

    run = [jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True)) for f in (packed, separate)]
    return [f(params, memory) for f in run]


@JAX_SENSITIVE
@pytest.mark.parametrize("normalization", LAYER_CONFIGS)
def test_packed_equals_separate_fast_weight_attention(normalization):
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, **LAYER_CONFIGS[normalization])
    x = normal(0, (2, LENGTH, 8))
    params = layer.init(jax.random.key(1), x)["params"]
    got, want = packed_and_separate(layer, params, x, starting_memory(layer, 2))
    close(got, want)
    (_, (y, _)) = got
    assert not np.asarray(y)[~np.asarray(MASK)].any()  # masked tokens still output zeros


def test_packed_equals_separate_dpfp_attention():
    layer = dj.DPFPAttention(8, num_heads=2, head_dim=4, nu=2)
    x = normal(0, (2, LENGTH, 8))
    params = layer.init(jax.random.key(1), x)["params"]
    got, want = packed_and_separate(layer, params, x, starting_memory(layer, 2))
    close(got, want)


@JAX_SENSITIVE
@pytest.mark.parametrize("normalization", ["sum", "attention"])
def test_packed_equals_separate_dpfpformer(normalization):
    config = {k: v for k, v in LAYER_CONFIGS[normalization].items() if k != "nu"}
    model = dj.DPFPformer(8, 1, num_heads=2, head_dim=4, **config)
    x = normal(0, (2, LENGTH, 8))
    params = model.init(jax.random.key(1), x)["params"]
    got, want = packed_and_separate(model, params, x, starting_memory(model, 2))
    # Looser than one layer: the LayerNorms' and feed-forward's gradients gather float32 rounding
    # of summation orders that differ between the two (about 3e-5 on jax 0.12's CPU build).
    close(got, want, rtol=1e-4, atol=1e-4)


def test_one_id_per_row_changes_nothing():
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, **LAYER_CONFIGS["attention"])
    x = normal(0, (2, LENGTH, 8))
    variables = layer.init(jax.random.key(1), x)
    memory = starting_memory(layer, 2)
    close(layer.apply(variables, x, memory, segment_ids=jnp.full((2, LENGTH), 9)), layer.apply(variables, x, memory),
          rtol=1e-6, atol=1e-6)


# --- decoding --------------------------------------------------------------------------------

CALLS = [(0, 1), (1, 3), (3, 4), (4, 8), (8, 9), (9, 11)]
# Documents start at a call's first token (t = 3, 4, 9 in row 0) and inside a call (t = 6, 10 in
# row 1). In the calls (1, 3) and (8, 9) both rows continue their document, so those may omit the ids.
CONTINUING = {(1, 3), (8, 9)}


def decode(decoder, params, cache, x, omit_continuing_ids):
    ys = []
    for start, stop in CALLS:
        ids = None if omit_continuing_ids and (start, stop) in CONTINUING else SEGMENT_IDS[:, start:stop]
        out, updates = decoder.apply({"params": params, "cache": cache}, x[:, start:stop],
                                     mask=MASK[:, start:stop], segment_ids=ids, mutable=["cache"])
        cache = updates["cache"]
        ys.append(out[0] if isinstance(out, tuple) else out)
    return jnp.concatenate(ys, axis=1), cache, out


def test_continuing_calls_really_continue():
    for start, stop in CONTINUING:
        assert (SEGMENT_IDS[:, start:stop] == SEGMENT_IDS[:, start - 1 : start]).all()


@JAX_SENSITIVE
@pytest.mark.parametrize("omit_continuing_ids", [False, True], ids=["ids-every-call", "ids-omitted-when-continuing"])
@pytest.mark.parametrize("normalization", ["sum", "attention"])
def test_decoding_with_segment_ids_equals_the_packed_pass(normalization, omit_continuing_ids):
    config = LAYER_CONFIGS[normalization]
    x = normal(0, (2, LENGTH, 8))
    full = dj.FastWeightAttention(num_heads=2, head_dim=4, **config)
    params = full.init(jax.random.key(1), x)["params"]
    want_y, want_memory = full.apply({"params": params}, x, mask=MASK, segment_ids=SEGMENT_IDS)

    decoder = full.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x, segment_ids=SEGMENT_IDS)["cache"]
    # Fresh: zeros everywhere, the ids included; the first call needs no special case (row 0's first
    # id differs from the cached 0, row 1's equals it: both start from the empty memory).
    assert not any(np.asarray(c).any() for c in jax.tree.leaves(cache))
    assert cache["segment_id"].shape == (2,) and cache["segment_id"].dtype == jnp.int32
    y, cache, (_, memory) = decode(decoder, params, cache, x, omit_continuing_ids)
    close(y, want_y)
    close(memory, want_memory)
    np.testing.assert_array_equal(cache["segment_id"], SEGMENT_IDS[:, -1])


@JAX_SENSITIVE
def test_dpfpformer_decoding_with_segment_ids_equals_the_packed_pass():
    x = normal(0, (2, LENGTH, 8))
    model = dj.DPFPformer(8, 2, num_heads=2, head_dim=4, nu=2)
    params = model.init(jax.random.key(1), x)["params"]
    want = model.apply({"params": params}, x, mask=MASK, segment_ids=SEGMENT_IDS)
    decoder = model.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x)["cache"]
    y, _, _ = decode(decoder, params, cache, x, omit_continuing_ids=True)
    close(y, want)


def test_a_new_document_while_decoding_forgets_the_old_one():
    # The restart selects zeros: a NaN left in the cache by a finished document does not survive.
    decoder = dj.FastWeightAttention(num_heads=2, head_dim=4, decode=True, **LAYER_CONFIGS["attention"])
    x = normal(0, (2, 3, 8))
    variables = decoder.init(jax.random.key(1), x)
    poisoned = jax.tree.map(lambda c: jnp.full_like(c, jnp.nan) if c.dtype == jnp.float32 else c, variables["cache"])
    fresh = decoder.apply(variables, x, mutable=["cache"])[0]
    ids = jnp.ones((2, 3), jnp.int32)  # the cache holds 0: a new document
    restarted = decoder.apply({**variables, "cache": poisoned}, x, segment_ids=ids, mutable=["cache"])[0]
    close(restarted, fresh, rtol=0, atol=0)
    continued = decoder.apply({**variables, "cache": poisoned}, x, mutable=["cache"])[0]
    assert np.isnan(np.asarray(continued[0])).all()


# --- bad input --------------------------------------------------------------------------------

SEGMENT_MODULES = {
    "FastWeightAttention": lambda **kw: dj.FastWeightAttention(num_heads=2, head_dim=4, **kw),
    "DPFPAttention": lambda **kw: dj.DPFPAttention(8, num_heads=2, head_dim=4, **kw),
    "DPFPformer": lambda **kw: dj.DPFPformer(8, 1, num_heads=2, head_dim=4, **kw),
}


@pytest.mark.parametrize("decode", [False, True], ids=["full", "decode"])
@pytest.mark.parametrize("name", SEGMENT_MODULES)
def test_bad_segment_ids_are_named(name, decode):
    model = SEGMENT_MODULES[name](decode=decode)
    x = normal(0, (2, 5, 8))
    variables = model.init(jax.random.key(1), x)
    apply = dict(mutable=["cache"]) if decode else {}
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\] = \(2, 5\).*got shape \(2, 4\)"):
        model.apply(variables, x, segment_ids=jnp.zeros((2, 4), jnp.int32), **apply)
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\] = \(2, 5\).*got shape \(1, 5\)"):
        model.apply(variables, x, segment_ids=jnp.zeros((1, 5), jnp.int32), **apply)
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype.*float32"):
        model.apply(variables, x, segment_ids=jnp.zeros((2, 5)), **apply)
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype.*bool.*mask="):
        model.apply(variables, x, segment_ids=MASK[:, :5], **apply)


def test_the_cell_takes_no_segment_ids():
    # One step, its memory passed in by the caller: a new document is memory=None at its first step.
    cell = dj.DPFPCell(8)
    x = normal(0, (2, 8))
    variables = cell.init(jax.random.key(1), x)
    with pytest.raises(TypeError, match="segment_ids"):
        cell.apply(variables, x, segment_ids=jnp.zeros((2, 1), jnp.int32))
