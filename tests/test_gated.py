"""Gated fast weights (``log_decay``): every XLA impl against the oracle, the decay regimes from
alpha near 1 to exactly 0, packed documents, decoding, context parallelism, errors, and a peer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

import dpfp_jax as dj
import pallas_kernels.decays
from dpfp_jax.ops.fast_weight.context_parallel import _apply, _end_state, _entering_gradient, _transition
from dpfp_jax.ops.fast_weight.naive import fast_weight_reference
from dpfp_jax.ops.fast_weight.recurrent import gated_block_size
from dpfp_jax.ops.fast_weight.segments import resets_of
from dpfp_jax.ops.fast_weight.wy import chunk_decays, log_decay_floor, split_log_decay
from tests import helpers
from tests.helpers import (
    DIFF_ARGS,
    JAX_SENSITIVE,
    SCRIPTS,
    assert_bfloat16_agrees,
    assert_relative_error,
    cast_inputs,
    packed_ids,
    random_like,
    run_with_host_devices,
    value_and_grads,
)

IMPLS = ["scan", "chunk"]
CHUNK = 16
GATED_ARGS = (*DIFF_ARGS, "log_decay")
SLOW = pytest.mark.slow


gated_inputs = functools.partial(helpers.gated_inputs, time=37, value_dim=4)


def op(impl, rule, **options):
    def fn(x):
        return dj.fast_weight(x["q"], x["k"], x["v"], x["beta"], rule=rule, initial_state=x["initial_state"],
                              log_decay=x["log_decay"], impl=impl, chunk_size=CHUNK, **options)
    return fn


def results_and_grads(inputs, impl, rule, **options):
    """``(out, state)`` and the gradients of q, k, v, beta, initial_state and log_decay."""
    return value_and_grads(op(impl, rule, **options), inputs, GATED_ARGS)


def assert_agree(got, want, tolerance):
    (got_values, got_grads), (want_values, want_grads) = got, want
    assert_relative_error(got_values, want_values, tolerance)
    assert_relative_error(got_grads, want_grads, tolerance)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("regime", [pytest.param(r, marks=SLOW) for r in ("typical", "near_one", "near_zero", "zero")]
                         + ["mixed"])
def test_matches_the_oracle_float32(impl, rule, regime):
    inputs = gated_inputs(1, rule=rule, regime=regime)
    got, want = results_and_grads(inputs, impl, rule), results_and_grads(inputs, "reference", rule)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(got))
    assert_agree(got, want, 2e-5)


@pytest.mark.parametrize("impl", [pytest.param("scan", marks=SLOW), "chunk"])
@pytest.mark.parametrize("rule", ["delta", pytest.param("sum", marks=SLOW)])
def test_matches_the_oracle_float64(x64, impl, rule):
    inputs = gated_inputs(2, rule=rule, dtype=jnp.float64, time=41)
    assert_agree(results_and_grads(inputs, impl, rule), results_and_grads(inputs, "reference", rule), 1e-11)


@SLOW
@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_gradients_numerically(x64, impl, rule):
    inputs = gated_inputs(3, rule=rule, dtype=jnp.float64, time=11, key_dim=3, value_dim=2, regime="typical")
    names = [n for n in GATED_ARGS if inputs[n] is not None]

    def f(*args):
        out, state = op(impl, rule)({**inputs, **dict(zip(names, args, strict=True))})
        return jnp.sum(out * jnp.sin(out)) + jnp.sum(state**2)

    check_grads(f, [inputs[n] for n in names], order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@SLOW
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_decay_is_the_ungated_op(impl):
    inputs = gated_inputs(4, rule="delta")
    inputs["log_decay"] = jnp.zeros_like(inputs["log_decay"])
    gated = results_and_grads(inputs, impl, "delta")
    plain = value_and_grads(op(impl, "delta"), {**inputs, "log_decay": None}, DIFF_ARGS)
    assert_relative_error(gated[0], plain[0], 1e-5)
    assert_relative_error(gated[1][:5], plain[1], 1e-5)


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=SLOW), pytest.param("scan", marks=SLOW), "chunk"])
def test_alpha_zero_forgets_everything_before(impl):
    """alpha_t = 0: the outputs from t on are those of a run that starts at t from zeros."""
    inputs = gated_inputs(5, rule="delta", regime="typical", time=40)
    cut = 21
    inputs["log_decay"] = inputs["log_decay"].at[:, cut].set(-jnp.inf)
    out, state = op(impl, "delta")(inputs)
    tail = {n: None if x is None or n == "initial_state" else x[:, cut:] for n, x in inputs.items()}
    want_out, want_state = op("reference", "delta")(tail)
    assert_relative_error(out[:, cut:], want_out, 1e-5)
    assert_relative_error(state, want_state, 1e-5)


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=SLOW), pytest.param("scan", marks=SLOW), "chunk"])
@pytest.mark.parametrize("rule", ["delta", pytest.param("sum", marks=SLOW)])
def test_with_segment_ids_a_reset_wins_over_the_gate(impl, rule):
    inputs = gated_inputs(6, rule=rule, time=40)
    ids = packed_ids(40, seed=6)
    got = results_and_grads(inputs, impl, rule, segment_ids=ids)
    assert_agree(got, results_and_grads(inputs, "reference", rule, segment_ids=ids), 2e-5)
    # At a reset the state is zero whatever alpha is: that alpha changes nothing and gets no gradient.
    resets = np.asarray(resets_of(ids))
    d_log_decay = np.asarray(got[1][-1])
    assert np.max(np.abs(d_log_decay[resets])) <= 1e-6 * np.max(np.abs(d_log_decay))
    changed = {**inputs, "log_decay": jnp.where(jnp.asarray(resets)[..., None], -3.0, inputs["log_decay"])}
    assert_relative_error(op(impl, rule, segment_ids=ids)(changed), got[0], 1e-6)


@pytest.mark.parametrize("impl", ["auto"])
def test_decoding_step_by_step_equals_the_whole_sequence(impl):
    inputs = gated_inputs(7, rule="delta", time=9)
    want_out, want_state = op("reference", "delta")(inputs)
    state, outs = inputs["initial_state"], []
    for t in range(9):
        step = {n: None if x is None or n == "initial_state" else x[:, t:t + 1] for n, x in inputs.items()}
        out, state = op(impl, "delta")({**step, "initial_state": state})
        outs.append(out)
    assert_relative_error(jnp.concatenate(outs, axis=1), want_out, 1e-5)
    assert_relative_error(state, want_state, 1e-5)


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=SLOW), pytest.param("scan", marks=SLOW), "chunk"])
@pytest.mark.parametrize("rule", ["delta", pytest.param("sum", marks=SLOW)])
def test_bfloat16_inputs(impl, rule):
    inputs = gated_inputs(8, rule=rule, dtype=jnp.bfloat16, time=40)
    (out, state), grads = results_and_grads(inputs, impl, rule)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    assert_bfloat16_agrees(((out, state), grads),
                           results_and_grads(cast_inputs(inputs, jnp.float32), "reference", rule))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key_dim", [pytest.param(1, marks=SLOW), pytest.param(64, marks=SLOW),
                                     pytest.param(130, marks=SLOW), pytest.param(384, marks=SLOW),
                                     pytest.param(1024, marks=SLOW)])
def test_key_widths(impl, key_dim):
    inputs = gated_inputs(9, rule="delta", key_dim=key_dim, time=37 if key_dim < 1024 else 21, batch=1)
    assert_agree(results_and_grads(inputs, impl, "delta"), results_and_grads(inputs, "reference", "delta"), 5e-5)


def test_chunk_decays_are_exact_differences_of_large_sums():
    # A chunk whose early steps hold large decays: g reaches about -4000, and a later difference of
    # -0.1 still comes out to float32 rounding (a plain cumulative sum keeps only about 1e-3 of it).
    log_decay = jnp.concatenate([jnp.full(60, -69.07755), jnp.full(4, -0.1)]).astype(jnp.float32)
    within = chunk_decays(log_decay).within
    np.testing.assert_allclose(within[62, 61], np.exp(-0.1), rtol=1e-6)
    np.testing.assert_allclose(within[63, 60], np.exp(-0.3), rtol=1e-6)
    # alpha = 0 (-inf) gives exact zeros and no NaN.
    decays = chunk_decays(jnp.array([-0.5, -jnp.inf, -0.25], jnp.float32))
    assert decays.within[2, 0] == 0.0 and np.isclose(float(decays.within[2, 1]), np.exp(-0.25))
    assert decays.total == 0.0 and not bool(decays.kept[1])
    assert float(jnp.exp(jnp.float32(log_decay_floor(jnp.float32)))) == 0.0


def test_the_kernels_split_log_decays_as_the_chunk_form_does():
    # The split is written twice (the ops import no pallas_kernels): the same bits, and exact ties
    # (odd multiples of 1/32) rounded to the even multiple of 1/16 by both.
    log_decay = jnp.array([-1 / 32, -3 / 32, -5 / 32, -33 / 32, -0.7, -69.07755, -200.0, -jnp.inf], jnp.float32)
    kernels, chunk_form = pallas_kernels.decays.split_log_decay(log_decay), split_log_decay(log_decay)
    for got, want in zip(kernels, chunk_form, strict=True):
        np.testing.assert_array_equal(got, want)
    assert (chunk_form[0][:4] * 16).tolist() == [0.0, -2.0, -2.0, -16.0]


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_empty_sequences_give_the_initial_state(impl):
    inputs = gated_inputs(15, rule="delta", time=0, regime="typical")
    (out, state), grads = results_and_grads(inputs, impl, "delta")
    assert out.shape == (2, 0, 2, 4)
    np.testing.assert_array_equal(state, inputs["initial_state"])
    assert grads[-1].shape == (2, 0, 2)


def test_scan_blocks():
    assert [gated_block_size(t) for t in (0, 1, 2, 16, 17, 4096)] == [1, 1, 2, 4, 5, 64]


# --- context parallelism: the gated shard algebra on one device, and 4 devices ---------------------


def _shard_inputs(seed, length=23):
    inputs = gated_inputs(seed, rule="delta", time=length, key_dim=6, value_dim=3)
    return inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["initial_state"], inputs["log_decay"]


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_resets", [pytest.param(False, marks=SLOW), True])
def test_a_gated_shard_is_affine_in_its_entering_state(rule, with_resets):
    _, k, v, beta, w_in, log_decay = _shard_inputs(10)
    beta = beta if rule == "delta" else None
    resets = jnp.zeros(k.shape[:2], bool).at[0, 9].set(True) if with_resets else None
    m, n = _transition(rule, k, v, beta, resets, jnp.float32, 4, log_decay)
    _, want = fast_weight_reference(k, k, v, beta, w_in, rule=rule, scale=1.0, resets=resets, log_decay=log_decay)
    np.testing.assert_allclose(_apply(rule, m, w_in) + n, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_resets", [pytest.param(False, marks=SLOW), True])
def test_the_gated_entering_gradient_is_the_oracles(rule, with_resets):
    q, k, v, beta, w_in, log_decay = _shard_inputs(11)
    beta = beta if rule == "delta" else None
    resets = jnp.zeros(k.shape[:2], bool).at[1, 5].set(True).at[1, 17].set(True) if with_resets else None
    d_out = jax.random.normal(jax.random.key(3), v.shape)
    scale = jnp.float32(0.6)

    def outputs(w):
        return fast_weight_reference(q, k, v, beta, w, rule=rule, scale=scale, resets=resets, log_decay=log_decay)[0]

    want = jax.vjp(outputs, w_in)[1](d_out)[0]
    got = _entering_gradient(rule, q, k, beta, resets, scale, d_out, 4, log_decay)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_the_relays_gated_walks_give_the_end_state_and_the_entering_gradient(rule):
    # The relay scheme's walks with a gate: the end state from a given entering state, and the
    # entering state's whole gradient from the outputs' and the end state's.
    q, k, v, beta, w_in, log_decay = _shard_inputs(12)
    beta = beta if rule == "delta" else None
    log_decay = log_decay.at[0, 6].set(-jnp.inf)
    resets = jnp.zeros(k.shape[:2], bool).at[1, 13].set(True)
    scale = jnp.float32(0.9)

    def results(w):
        return fast_weight_reference(q, k, v, beta, w, rule=rule, scale=scale, resets=resets, log_decay=log_decay)

    (_, want_end), pullback = jax.vjp(results, w_in)
    got_end = _end_state(rule, k, v, beta, resets, w_in, 4, log_decay)
    np.testing.assert_allclose(got_end, want_end, rtol=1e-5, atol=1e-5)
    d_out, d_end = jax.random.normal(jax.random.key(7), v.shape), jax.random.normal(jax.random.key(8), w_in.shape)
    got = _entering_gradient(rule, q, k, beta, resets, scale, d_out, 4, log_decay, d_end=d_end)
    np.testing.assert_allclose(got, pullback((d_out, d_end))[0], rtol=1e-5, atol=1e-5)


@SLOW
@JAX_SENSITIVE
def test_gated_sequence_sharded_on_4_devices_equals_one_device():
    result = run_with_host_devices(SCRIPTS / "context_parallel_gated_script.py", count=4)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


# --- errors ------------------------------------------------------------------------------------------

B, T, H, K, V = 2, 5, 3, 4, 6
GOOD = dict(q=jnp.ones((B, T, H, K)), k=jnp.ones((B, T, H, K)), v=jnp.ones((B, T, H, V)), beta=jnp.ones((B, T, H)),
            log_decay=jnp.full((B, T, H), -0.1))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(log_decay=jnp.zeros((B, T, H, 1))), ValueError, r"log_decay must be \[B, T, H\] = \(2, 5, 3\)"),
        (dict(log_decay=jnp.zeros((B, T))), ValueError, "log_decay must be"),
        (dict(log_decay=jnp.zeros((B, T, H), jnp.int32)), TypeError, "log_decay must have a floating dtype"),
        (dict(log_decay=[[0.0]]), TypeError, "log_decay must be an array"),
        (dict(log_decay=jnp.full((B, T, H), -0.1).at[1, 3, 2].set(0.5)), ValueError,
         r"log_decay must be <= 0 .* 1 of 30 values .* batch 1, step 3, head 2: 0.5"),
        (dict(log_decay=jnp.full((B, T, H), jnp.nan)), ValueError, "positive or NaN"),
        (dict(impl="pallas"), ValueError, r"pallas.*need a GPU or a TPU and the target platform is 'cpu'"),
        # An eager call checks the other arguments before log_decay's values: the message concerns k.
        (dict(k=jnp.ones((B, T, H, K + 1)), log_decay=jnp.full((B, T, H), 0.5)), ValueError, "k must have q's shape"),
    ],
)
def test_bad_log_decay_raises_clear_errors(change, error, match):
    args = {**GOOD, **change}
    with pytest.raises(error, match=match):
        dj.fast_weight(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), **args)


def test_traced_positive_log_decay_is_used_as_given_or_checked_on_request():
    q, k, v, beta = (GOOD[n] / 4 for n in ("q", "k", "v", "beta"))
    positive = jnp.full((B, T, H), 0.05)

    want = dj.fast_weight(q, k, v, beta, log_decay=jnp.zeros_like(positive), impl="reference")
    for impl in ("reference", "scan", "chunk"):
        got = jax.jit(lambda x, impl=impl: dj.fast_weight(q, k, v, beta, log_decay=x, impl=impl))(positive)
        assert float(jnp.max(jnp.abs(got[1]))) > float(jnp.max(jnp.abs(want[1])))  # alpha > 1 grew the state
    checked = checkify.checkify(jax.jit(lambda x: dj.fast_weight(q, k, v, beta, log_decay=x, check_stability=True)))
    error, _ = checked(positive)
    assert "log_decay must be <= 0" in str(error.get())
    error, _ = checked(-positive)
    assert error.get() is None


def test_a_concrete_log_decay_closed_over_under_jit_is_checked_at_trace_time():
    # A concrete array a jitted function closes over is known while tracing: checked, not staged.
    q, k, v, beta = (GOOD[n] for n in ("q", "k", "v", "beta"))
    bad = jnp.full((B, T, H), -0.1).at[0, 1, 2].set(0.5)
    with pytest.raises(ValueError, match=r"log_decay must be <= 0 .* batch 0, step 1, head 2: 0.5"):
        jax.jit(lambda q: dj.fast_weight(q, k, v, beta, log_decay=bad, impl="chunk"))(q)
    got = jax.jit(lambda q: dj.fast_weight(q, k, v, beta, log_decay=-jnp.abs(bad), impl="chunk"))(q)
    want = dj.fast_weight(q, k, v, beta, log_decay=-jnp.abs(bad), impl="chunk")
    assert_relative_error(got, want, 1e-6)


def test_auto_with_a_gate_picks_a_gated_impl():
    inputs = gated_inputs(12, rule="delta", time=40)
    assert_relative_error(op("auto", "delta")(inputs), op("reference", "delta")(inputs), 2e-5)


# --- a peer: jax-linear-attention's chunked Gated DeltaNet (plain JAX), where installed ----------------


@SLOW
def test_agrees_with_jax_linear_attention_gated_deltanet():
    chunked = pytest.importorskip("jla.ops.chunked")
    batch, length, heads, dim = 1, 100, 2, 128  # its head size
    keys = jax.random.split(jax.random.key(13), 5)
    q = dj.l2_norm(jax.random.normal(keys[0], (batch, length, heads, dim)))
    k = dj.l2_norm(jax.random.normal(keys[1], (batch, length, heads, dim)))
    v = jax.random.normal(keys[2], (batch, length, heads, dim))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, length, heads)))
    log_decay = -jax.nn.softplus(jax.random.normal(keys[4], (batch, length, heads)))
    w0 = random_like(14, jnp.zeros((batch, heads, dim, dim)))
    scale = dim**-0.5  # its default; its gate multiplies the state before the write, as ours

    def ours(q, k, v, beta, log_decay, w0):
        return dj.fast_weight(q, k, v, beta, log_decay=log_decay, initial_state=w0, scale=scale, impl="chunk")

    def theirs(q, k, v, beta, log_decay, w0):
        return chunked.gated_delta_rule(q, k, v, log_decay, beta, scale=scale, initial_state=w0,
                                        output_final_state=True)

    def loss(fn):
        def f(*args):
            out, state = fn(*args)
            return jnp.sum(out * random_like(1, out)) + jnp.sum(state * random_like(2, state)), (out, state)
        return jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True)

    args = (q, k, v, beta, log_decay, w0)
    (_, got), got_grads = jax.jit(loss(ours))(*args)
    (_, want), want_grads = jax.jit(loss(theirs))(*args)
    assert_relative_error(got, want, 1e-5)
    assert_relative_error(got_grads, want_grads, 1e-5)


# --- a peer: deltanet-tpu's Pallas TPU kernels (chunk_gdn, chunk_delta_rule), interpret mode on the CPU -------
# Its conventions, read from deltanet_tpu/gdn2.py and reference.py (0.3.0): arguments (q, k, v, g, beta) with
# g = log alpha [B, T, H]; the decay multiplies the state before the erase and the write, W_t = alpha_t
# (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T, as ours; the output reads the state after the write; the
# state is [B, H, K, V] as ours; scale defaults to K**-0.5 on q; q and k are not normalised unless
# qk_l2norm=True; precision="fp32" keeps every product in float32 (its default "bf16" rounds them); chunk 128,
# any T. It picks interpret mode when jax.default_backend() != "tpu", so on the CPU its pallas_call runs
# interpreted (not its pure-JAX fallback_scan, which it takes only when asked): the test checks that.


def _peer_inputs(length: int = 200, heads: int = 2, dim: int = 128):  # its head size; T not a multiple of 128
    keys = jax.random.split(jax.random.key(21), 6)
    q = dj.l2_norm(jax.random.normal(keys[0], (1, length, heads, dim)))
    k = dj.l2_norm(jax.random.normal(keys[1], (1, length, heads, dim)))
    v = jax.random.normal(keys[2], (1, length, heads, dim))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (1, length, heads)))
    log_decay = -jax.nn.softplus(jax.random.normal(keys[4], (1, length, heads)))
    w0 = 0.3 * jax.random.normal(keys[5], (1, heads, dim, dim))
    return q, k, v, beta, log_decay, w0


def _value_and_grads(fn, num_args):
    def f(*args):
        out, state = fn(*args)
        return jnp.sum(out * random_like(1, out)) + jnp.sum(state * random_like(2, state)), (out, state)

    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(num_args)), has_aux=True))


@SLOW
@pytest.mark.filterwarnings("ignore:deltanet-tpu. running on non-TPU backend")
def test_agrees_with_deltanet_tpu_chunk_gdn_in_interpret_mode():
    deltanet_tpu = pytest.importorskip("deltanet_tpu")
    q, k, v, beta, log_decay, w0 = args = _peer_inputs()
    scale = q.shape[-1] ** -0.5  # its default

    def theirs(q, k, v, beta, log_decay, w0):
        return deltanet_tpu.chunk_gdn(q, k, v, log_decay, beta, initial_state=w0, output_final_state=True,
                                      precision="fp32")

    assert "pallas_call" in str(jax.make_jaxpr(theirs)(*args))  # its kernel (interpreted), not a fallback
    (_, want), want_grads = _value_and_grads(theirs, 6)(*args)
    for impl in ("chunk", "reference"):
        def ours(q, k, v, beta, log_decay, w0, impl=impl):
            return dj.fast_weight(q, k, v, beta, log_decay=log_decay, initial_state=w0, scale=scale, impl=impl)

        (_, got), got_grads = _value_and_grads(ours, 6)(*args)
        assert_relative_error(got, want, 1e-5)
        assert_relative_error(got_grads, want_grads, 1e-5)


@SLOW
@pytest.mark.filterwarnings("ignore:deltanet-tpu. running on non-TPU backend")
def test_agrees_with_deltanet_tpu_chunk_delta_rule_in_interpret_mode():
    deltanet_tpu = pytest.importorskip("deltanet_tpu")
    q, k, v, beta, _, w0 = _peer_inputs(length=130)
    scale = q.shape[-1] ** -0.5

    def theirs(q, k, v, beta, w0):
        return deltanet_tpu.chunk_delta_rule(q, k, v, beta, initial_state=w0, output_final_state=True,
                                             precision="fp32")

    def ours(q, k, v, beta, w0):
        return dj.fast_weight(q, k, v, beta, initial_state=w0, scale=scale, impl="chunk")

    (_, want), want_grads = _value_and_grads(theirs, 5)(q, k, v, beta, w0)
    (_, got), got_grads = _value_and_grads(ours, 5)(q, k, v, beta, w0)
    assert_relative_error(got, want, 1e-5)
    assert_relative_error(got_grads, want_grads, 1e-5)


# --- layers: gate="gated_deltanet" (linen, NNX, DPFPformer, the drop-in self-attention) ------------

GATE = dict(gate="gated_deltanet")


def test_linen_layer_with_a_gate_has_its_parameters_and_they_learn():
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, **GATE)
    x = jax.random.normal(jax.random.key(0), (2, 9, 8))
    params = layer.init(jax.random.key(1), x)["params"]
    assert params["gate_a_log"].shape == params["gate_dt_bias"].shape == (2,)
    assert params["qkv"]["kernel"].shape == (8, 2, 3 * 4 + 2)  # q, k, v, beta and the gate's logit
    assert bool(jnp.all((jnp.exp(params["gate_a_log"]) >= 1.0) & (jnp.exp(params["gate_a_log"]) <= 16.0)))

    def loss(params):
        y, memory = layer.apply({"params": params}, x)
        return jnp.sum(y**2) + jnp.sum(memory**2)

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["gate_a_log"]).min()) > 0 and float(jnp.abs(grads["gate_dt_bias"]).min()) > 0
    plain = dj.FastWeightAttention(num_heads=2, head_dim=4)
    assert "gate_a_log" not in plain.init(jax.random.key(1), x)["params"]


@SLOW
def test_linen_decode_with_a_gate_equals_the_whole_sequence():
    x = jax.random.normal(jax.random.key(2), (2, 6, 8))
    full = dj.FastWeightAttention(num_heads=2, head_dim=4, **GATE)
    variables = full.init(jax.random.key(3), x)
    want_y, want_memory = full.apply(variables, x)
    decoder = dj.FastWeightAttention(num_heads=2, head_dim=4, decode=True, **GATE)
    cache = decoder.init(jax.random.key(3), x)["cache"]
    ys = []
    for start, stop in [(0, 1), (1, 2), (2, 4), (4, 6)]:
        (y, memory), updates = decoder.apply({"params": variables["params"], "cache": cache}, x[:, start:stop],
                                             mutable=["cache"])
        cache = updates["cache"]
        ys.append(y)
    assert_relative_error(jnp.concatenate(ys, axis=1), want_y, 1e-5)
    assert_relative_error(memory, want_memory, 1e-5)


@SLOW
def test_a_padded_token_neither_writes_nor_decays_the_memory():
    layer = dj.FastWeightAttention(num_heads=2, head_dim=4, **GATE)
    x = jax.random.normal(jax.random.key(4), (2, 7, 8))
    variables = layer.init(jax.random.key(5), x)
    mask = jnp.ones((2, 7), bool).at[:, 6].set(False)
    _, memory = layer.apply(variables, x, mask=mask)
    _, want = layer.apply(variables, x[:, :6])
    assert_relative_error(memory, want, 1e-6)


def test_nnx_twin_with_a_gate_computes_the_linen_layer():
    from flax import nnx

    from dpfp_jax import nnx as djnnx

    x = jax.random.normal(jax.random.key(6), (2, 20, 16))
    linen = dj.DPFPformer(16, 1, num_heads=2, head_dim=4, **GATE)
    params = linen.init(jax.random.key(7), x)["params"]
    twin = djnnx.DPFPformer(16, 1, num_heads=2, head_dim=4, rngs=nnx.Rngs(0), **GATE)
    djnnx.from_linen_params(twin, params)
    assert_relative_error(twin(x), linen.apply({"params": params}, x), 1e-5)
    attention = djnnx.DPFPSelfAttention(num_heads=2, qkv_features=8, in_features=16, rngs=nnx.Rngs(1), **GATE)
    assert attention(x).shape == x.shape


@pytest.mark.parametrize("change, match", [
    (dict(gate="mamba"), r"gate must be one of \(None, 'gated_deltanet'\)"),
    (dict(rule="sum", normalization="attention"), "normalization='attention'"),
    # The TPU and GPU kernels take a gate; on a CPU the op says why impl="pallas" cannot run.
    (dict(impl="pallas"), r"impl='pallas' cannot take this call: pallas: the Pallas kernels need a GPU or a TPU"),
])
def test_bad_gate_settings_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        dj.FastWeightAttention(num_heads=2, head_dim=4, **{**GATE, **change}).init(jax.random.key(0),
                                                                                 jnp.ones((1, 3, 8)))
