"""The fused chunk GPU kernel (``pallas_kernels.fused_chunk``) with a gate (``log_decay``), in
interpret mode on the CPU, against the oracle: outputs, final state and the gradients of q, k, v,
beta, the initial state and log_decay, both rules, alpha from near 1 to exactly 0, T not a multiple
of the chunk, packed documents, bfloat16, K up to 384 and DPFP on chip; and where ``impl="pallas"``
sends a gated call on a GPU (the fused recurrent kernel's gate: tests/test_triton_gated_recurrent.py).

Interpret mode is slow: one small case runs in ``make test``, the rest are slow. The H200 compile
of the gated kernels is in tests/test_triton_lowering.py and the report.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from dpfp_jax.ops.fast_weight import pallas as pallas_adapter
from dpfp_jax.ops.fast_weight.naive import fast_weight_reference
from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas, pallas_supports
from dpfp_jax.ops.fast_weight.segments import resets_of
from dpfp_jax.ops.fast_weight.wy import wy_inverse
from pallas_kernels import fused_chunk
from pallas_kernels.triton.dpfp import DPFP
from pallas_kernels.triton.fused_chunk import SPAN_CHUNKS
from tests import helpers
from tests.helpers import (
    DIFF_ARGS,
    assert_relative_error,
    cast_inputs,
    normal,
    packed_ids,
    pallas_calls,
    value_and_grads,
)

SLOW = pytest.mark.slow
CHUNK = 16
NAMES = (*DIFF_ARGS, "log_decay")


def gated_inputs(rule, regime, *, time=37, value_dim=24, dtype=jnp.float32, state_key_dim=None, **shape):
    """``state_key_dim``: the state's K where a feature map widens q, k (else their width)."""
    inputs = helpers.gated_inputs(3, rule=rule, regime=regime, time=time, value_dim=value_dim, chunk=CHUNK,
                                  decay_seed=4, **shape)
    if state_key_dim is not None:
        batch, heads = inputs["q"].shape[0], inputs["q"].shape[2]
        inputs["initial_state"] = normal(5, (batch, heads, state_key_dim, value_dim), 0.1)
    return cast_inputs(inputs, dtype)


def kernel(rule, **options):
    """The kernel as the library composes it (its WY inverse for the delta rule), scale 0.7."""
    def fn(x):
        return fused_chunk(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], rule=rule, scale=0.7,
                           chunk_size=CHUNK, interpret=True, wy_inverse=wy_inverse if rule == "delta" else None,
                           log_decay=x["log_decay"], **options)
    return fn


def oracle(rule, resets=None, features=None):
    def fn(x):
        q, k = (x["q"], x["k"]) if features is None else (features(x["q"]), features(x["k"]))
        return fast_weight_reference(q, k, x["v"], x["beta"], x["initial_state"], rule=rule, scale=0.7,
                                     resets=resets, log_decay=x["log_decay"])
    return fn


def check(rule, regime, tolerance=2e-5, *, resets=None, features=None, fn=None, **shape):
    """The kernel (or ``fn``) against the oracle: every result and gradient finite, each within
    ``tolerance`` of the oracle's relative to its largest entry; returns the kernel's."""
    inputs = gated_inputs(rule, regime, **shape)
    # Jitted: one compile of each program instead of every op of the interpreted kernels run eagerly.
    got = jax.jit(lambda x: value_and_grads(fn or kernel(rule), x, NAMES))(inputs)
    wide = cast_inputs(inputs, jnp.float32)
    want = jax.jit(lambda x: value_and_grads(oracle(rule, resets, features), x, NAMES))(wide)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(got))
    (out, state), grads = got
    assert out.dtype == inputs["v"].dtype and state.dtype == jnp.float32
    assert all(g.dtype == inputs[n].dtype for g, n in zip(grads, [n for n in NAMES if inputs[n] is not None],
                                                           strict=True))
    assert_relative_error(got, want, tolerance)
    return got


def test_gated_fused_chunk_matches_the_oracle():
    # make test's case: T = 37 in chunks of 16 (the last partial), alpha = 0 on and off chunk
    # boundaries, 1e-30 and 1 - 1e-6 among typical decays, an initial state; states kept every 2
    # chunks, so the backward walks one chunk forward from a kept state for the second chunk.
    check("delta", "mixed", fn=kernel("delta", checkpoint_chunks=2), batch=1, heads=1, value_dim=4, time=37)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("regime", ["typical", "near_one", "near_zero", "zero", "mixed"])
def test_every_decay_regime(rule, regime):
    check(rule, regime)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("checkpoint_chunks, time", [(1, 48), (3, 80), (8, 37)])
def test_kept_states_every_few_chunks(rule, checkpoint_chunks, time):
    # 1: every chunk's start state kept, nothing walked; 3 over 5 chunks (T a multiple of C): a
    # partial last span; 8: one span, each chunk walked from the initial state.
    check(rule, "mixed", fn=kernel(rule, checkpoint_chunks=checkpoint_chunks), time=time)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("key_dim", [1, 64, 130, 384, 1024])
def test_key_widths(rule, key_dim):
    # 1: one padded tile; 64: one key tile; 130: padded to three tiles; 384: six; 1024 (the limit): sixteen.
    check(rule, "mixed", key_dim=key_dim, batch=1, time=37)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_bfloat16_inputs(rule):
    check(rule, "mixed", tolerance=2e-2, dtype=jnp.bfloat16, time=40)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("through", ["kernel", "adapter"])
def test_with_packed_documents_a_reset_wins_over_the_gate(rule, through):
    # Documents start on and off chunk boundaries; the kernel takes a reset as alpha = 0, and that
    # step's log_decay gets no gradient (as the oracle's). "adapter": impl="pallas"'s GPU path.
    ids = packed_ids(40, seed=3, chunk=CHUNK)
    resets = resets_of(ids)

    def adapter(x):
        return fast_weight_pallas(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], rule=rule, scale=0.7,
                                  chunk_size=CHUNK, interpret=True, resets=resets, log_decay=x["log_decay"])

    fn = adapter if through == "adapter" else kernel(rule, resets=resets)
    _, grads = check(rule, "typical", resets=resets, fn=fn, time=40)
    d_log_decay = np.asarray(grads[-1])
    flags = np.asarray(resets)
    assert flags.any() and np.max(np.abs(d_log_decay[flags])) == 0.0


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_dpfp_on_chip(rule):
    phi = dj.Features("dpfp", dim=32, nu=2, normalization="sum")
    # The delta rule's WY inverse takes phi(k) a span of SPAN_CHUNKS chunks at a time: two spans.
    time = 37 if rule == "sum" else (SPAN_CHUNKS + 1) * CHUNK + 5
    check(rule, "mixed", features=phi, fn=kernel(rule, features=DPFP(2, "sum")), key_dim=32, state_key_dim=128,
          time=time)


@SLOW
def test_the_wy_inverse_must_take_the_weighted_gram_matrix():
    x = jnp.ones((1, 32, 2, 16))
    args = (x, x, x, jnp.full((1, 32, 2), 0.5), jnp.zeros((1, 2, 16, 16)))
    with pytest.raises(TypeError, match=r"with log_decay, wy_inverse is called as wy_inverse\(k, beta, gram=G\)"):
        fused_chunk(*args, rule="delta", chunk_size=16, interpret=True, log_decay=jnp.zeros((1, 32, 2)),
                    wy_inverse=lambda k, beta: k)
    with pytest.raises(ValueError, match="checkpoint_chunks must be a positive int"):
        fused_chunk(*args, rule="delta", chunk_size=16, interpret=True, log_decay=jnp.zeros((1, 32, 2)),
                    wy_inverse=wy_inverse, checkpoint_chunks=0)


def test_on_a_gpu_the_fused_kernels_take_the_gate(monkeypatch):
    # The platform is a GPU's (traced, nothing runs): from one chunk on the fused chunk kernel takes
    # a gate, below one chunk the fused recurrent one (tests/test_triton_gated_recurrent.py), both
    # given log_decay; DPFP goes on chip to the fused chunk kernel gated, and to the fused recurrent
    # one only ungated (gated there, the map is applied before it).
    monkeypatch.setattr(pallas_adapter, "target_platform", lambda: "gpu")
    x, beta, gate = jnp.ones((1, 40, 2, 32)), jnp.full((1, 40, 2), 0.5), jnp.zeros((1, 40, 2))
    dpfp = dj.Features("dpfp", dim=32, nu=1)
    assert pallas_supports(x, x, x, beta, log_decay=gate) is None
    assert pallas_supports(x[:, :10], x[:, :10], x[:, :10], beta[:, :10], log_decay=gate[:, :10]) is None

    def kernels(time, gated, features=None):
        width = 32 if features is None else features.key_dim
        state = jnp.zeros((1, 2, width, 32))

        def run(q, g):
            return fast_weight_pallas(q, q, q[..., :32], beta[:, :time], state, rule="delta", scale=0.5,
                                      chunk_size=16, interpret=True, log_decay=g if gated else None,
                                      features=features)

        jaxpr = jax.make_jaxpr(run)(x[:, :time], gate[:, :time]).jaxpr
        # Each kernel's name and the width of q as it gets it (its first operand of rank 3 or more).
        return {(str(eqn.params["name"]).split(" ")[0], next(v.aval.shape[-1] for v in eqn.invars if v.aval.ndim >= 3))
                for eqn in pallas_calls(jaxpr)}

    assert kernels(40, gated=True) == {("fast_weight_fused_chunk_fwd", 32)}
    assert kernels(10, gated=True) == {("fast_weight_fused_recurrent_gated_fwd", 32)}
    assert kernels(10, gated=False) == {("fast_weight_fused_recurrent_fwd", 32)}
    assert kernels(40, gated=True, features=dpfp) == {("fast_weight_fused_chunk_fwd", 32)}  # DPFP on chip
    assert kernels(10, gated=True, features=dpfp) == {("fast_weight_fused_recurrent_gated_fwd", dpfp.key_dim)}
    assert kernels(10, gated=False, features=dpfp) == {("fast_weight_fused_recurrent_dpfp_fwd", 32)}
    monkeypatch.setattr(pallas_adapter, "target_platform", lambda: "cpu")
    assert "target platform is 'cpu'" in pallas_supports(x, x, x, beta, log_decay=gate)
