"""The decay gate (``log_decay``) in the fused recurrent and chunk-walk Pallas GPU kernels, interpret
mode on the CPU, against the oracle: outputs, final state and every gradient (q, k, v, beta,
initial_state, log_decay), both rules, alpha from near 1 to exactly 0, packed documents, bfloat16."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfp_jax.ops.fast_weight.naive import fast_weight_reference
from dpfp_jax.ops.fast_weight.segments import resets_of
from pallas_kernels import chunk_walk, fused_recurrent
from pallas_kernels.triton.fused_recurrent import checkpoint_block
from tests import helpers
from tests.helpers import (
    DIFF_ARGS,
    assert_bfloat16_agrees,
    assert_relative_error,
    cast_inputs,
    packed_ids,
    value_and_grads,
)

GATED_ARGS = (*DIFF_ARGS, "log_decay")
SLOW = pytest.mark.slow


# Special steps of the mixed regime placed for chunks of 4 (the checkpoint blocks at these small T).
gated_inputs = functools.partial(helpers.gated_inputs, time=13, value_dim=5, chunk=4)


def recurrent(rule, resets=None):
    def fn(x):
        return fused_recurrent(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], rule=rule, scale=0.5,
                               interpret=True, resets=resets, log_decay=x["log_decay"])
    return fn


def reference(rule, resets=None):
    def fn(x):
        return fast_weight_reference(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], rule=rule, scale=0.5,
                                     resets=resets, log_decay=x["log_decay"])
    return fn


def agree(inputs, kernel, oracle, tolerance):
    got = value_and_grads(kernel, inputs, GATED_ARGS)
    want = value_and_grads(oracle, inputs, GATED_ARGS)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(got))
    assert_relative_error(got, want, tolerance)
    return got


def test_fused_recurrent_gated_delta_rule_matches_the_oracle():
    """The one cheap case make test runs: mixed alphas (0, 1e-30, 1 - 1e-6 among typical ones), T = 10
    (not a multiple of the checkpointed block of 4 steps), V = 5 padded."""
    agree(gated_inputs(0, rule="delta", batch=1, time=10), recurrent("delta"), reference("delta"), 2e-5)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("regime", ["typical", "near_one", "near_zero", "zero", "mixed"])
def test_fused_recurrent_gated_matches_the_oracle(rule, regime):
    agree(gated_inputs(1, rule=rule, regime=regime, time=21, key_dim=12, value_dim=70), recurrent(rule),
          reference(rule), 2e-5)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("key_dim", [1, 64, 130, 384, 1024])
def test_fused_recurrent_gated_key_widths(rule, key_dim):
    agree(gated_inputs(2, rule=rule, time=9, key_dim=key_dim, batch=1), recurrent(rule), reference(rule), 2e-5)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fused_recurrent_gated_with_documents_a_reset_wins(rule):
    inputs = gated_inputs(2, rule=rule, time=20)
    resets = resets_of(packed_ids(20, seed=2, chunk=4))
    (_, grads) = agree(inputs, recurrent(rule, resets), reference(rule, resets), 2e-5)
    d_log_decay = np.asarray(grads[-1])
    assert np.max(np.abs(d_log_decay[np.asarray(resets)])) == 0.0


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fused_recurrent_gated_bfloat16(rule):
    inputs = gated_inputs(3, rule=rule, dtype=jnp.bfloat16, time=17)
    got = value_and_grads(recurrent(rule), inputs, GATED_ARGS)
    (out, state), _ = got
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert_bfloat16_agrees(got, value_and_grads(reference(rule), cast_inputs(inputs, jnp.float32), GATED_ARGS))


def test_checkpoint_block_is_the_ceiling_square_root():
    assert [checkpoint_block(t) for t in (1, 2, 4, 5, 16, 17, 4096)] == [1, 2, 2, 3, 4, 5, 64]


@SLOW
@pytest.mark.parametrize("time", [10, 20])
def test_the_gpu_dispatch_sends_a_gate_to_the_fused_recurrent_kernel(time):
    """fast_weight_pallas's GPU branch (interpret mode), with segment ids as resets: a gated call
    below one chunk goes to the fused recurrent kernel (T = 10, chunk 16), from one chunk on to the
    fused chunk kernel (T = 20)."""
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas

    inputs = gated_inputs(4, rule="delta", time=time)
    resets = resets_of(packed_ids(time, seed=4, chunk=4))

    def dispatched(x):
        return fast_weight_pallas(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], rule="delta", scale=0.5,
                                  chunk_size=16, interpret=True, resets=resets, log_decay=x["log_decay"])

    agree(inputs, dispatched, reference("delta", resets), 2e-5)


def walked(rule, resets=None):
    """The chunk form (chunks of 16) with the Pallas walk (interpret mode)."""
    from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk

    def fn(x):
        return fast_weight_chunk(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], rule=rule, scale=0.5,
                                 chunk_size=16, walk=chunk_walk(interpret=True), resets=resets,
                                 log_decay=x["log_decay"])
    return fn


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("regime", ["typical", "near_one", "near_zero", "zero", "mixed"])
def test_chunk_walk_gated_matches_the_oracle(rule, regime):
    inputs = gated_inputs(5, rule=rule, regime=regime, time=37, key_dim=12, value_dim=20)
    agree(inputs, walked(rule), reference(rule), 2e-5)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_chunk_walk_gated_with_documents(rule):
    inputs = gated_inputs(6, rule=rule, time=40)
    resets = resets_of(packed_ids(40, seed=6))
    agree(inputs, walked(rule, resets), reference(rule, resets), 2e-5)


@SLOW
def test_chunk_walk_gated_bfloat16():
    inputs = gated_inputs(7, rule="delta", dtype=jnp.bfloat16, time=40)
    got = value_and_grads(walked("delta"), inputs, GATED_ARGS)
    assert_bfloat16_agrees(got, value_and_grads(reference("delta"), cast_inputs(inputs, jnp.float32), GATED_ARGS))


def test_bad_gates_are_refused_with_the_argument_named():
    x, state, log_decay = jnp.ones((2, 4, 2, 8)), jnp.zeros((2, 2, 8, 8)), jnp.zeros((2, 4, 2))
    call = dict(rule="sum", interpret=True)
    with pytest.raises(ValueError, match=r"log_decay must be \[B, T, H\] = \(2, 4, 2\)"):
        fused_recurrent(x, x, x, None, state, log_decay=log_decay[..., 0], **call)
    with pytest.raises(TypeError, match="log_decay"):
        fused_recurrent(x, x, x, None, state, log_decay=log_decay > 0, **call)
    forward, backward = chunk_walk(interpret=True)
    keys, values = jnp.ones((2, 1, 16, 4)), jnp.ones((2, 1, 16, 4))
    with pytest.raises(ValueError, match="decay and keep are exclusive"):
        forward(keys, keys, values, None, values, jnp.zeros((1, 4, 4)), jnp.ones((2, 1), bool), jnp.ones((2, 1)))
    with pytest.raises(ValueError, match=r"decay must be \[N, G\] = \(2, 1\)"):
        forward(keys, keys, values, None, values, jnp.zeros((1, 4, 4)), decay=jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="states is required with decay"):
        backward(keys, keys, values, None, values, jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 4)), decay=jnp.ones((2, 1)))
