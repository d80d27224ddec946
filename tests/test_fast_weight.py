"""dj.fast_weight: every fast path against the oracle, gradients, memory, transforms, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import dpfp_jax as dj
from dpfp_devtools.workloads import make_inputs, worst_relative_error
from tests.helpers import (
    DIFF_ARGS,
    JAX_SENSITIVE,
    assert_bounded_and_not_drifting,
    assert_close,
    cast_inputs,
    delta_column_bound,
    random_like,
    temp_bytes_of_grad,
)

FAST_IMPLS = ["scan", "chunk"]


def run(inputs, impl, rule, **kwargs):
    return dj.fast_weight(
        inputs["q"], inputs["k"], inputs["v"], inputs["beta"],
        rule=rule, initial_state=inputs["initial_state"], impl=impl, **kwargs,
    )


def grads(inputs, impl, rule, seed=7, on=("out", "state")):
    """Gradients of a random linear loss on the outputs and/or the final state."""
    names = [n for n in DIFF_ARGS if inputs[n] is not None]

    def loss(*args):
        out, state = run({**inputs, **dict(zip(names, args, strict=True))}, impl, rule)
        total = 0.0
        if "out" in on:
            total += jnp.sum(out * random_like(seed, out))
        if "state" in on:
            total += jnp.sum(state * random_like(seed + 1, state))
        return total

    return jax.grad(loss, argnums=tuple(range(len(names))))(*[inputs[n] for n in names])


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 2, 17, 256])
def test_matches_reference_float64(x64, impl, rule, with_state, T):
    inputs = make_inputs(T, time=T, rule=rule, dtype=jnp.float64, with_state=with_state)
    got, want = run(inputs, impl, rule), run(inputs, "reference", rule)
    chex.assert_type(got, jnp.float64)
    chex.assert_shape(got[0], inputs["v"].shape)
    assert_close(got, want, rtol=1e-10, atol=1e-12)


SLOW = pytest.mark.slow


@JAX_SENSITIVE
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [pytest.param(1, marks=SLOW), pytest.param(2, marks=SLOW),
                               pytest.param(17, marks=SLOW), 256])
def test_matches_reference_float32(impl, rule, with_state, T):
    inputs = make_inputs(T, time=T, rule=rule, with_state=with_state)
    assert_close(run(inputs, impl, rule), run(inputs, "reference", rule), rtol=2e-5, atol=2e-6)


@JAX_SENSITIVE
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_state", [pytest.param(False, marks=SLOW), True])
@pytest.mark.parametrize("on", [("out",), ("state",), ("out", "state")])
def test_gradients_match_reference(impl, rule, with_state, on):
    inputs = make_inputs(3, time=33, rule=rule, with_state=with_state)
    got, want = grads(inputs, impl, rule, on=on), grads(inputs, "reference", rule, on=on)
    assert len(got) == (4 if rule == "delta" else 3) + with_state
    assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_gradients_numerically(x64, impl, rule):
    inputs = make_inputs(5, batch=1, time=5, heads=2, key_dim=3, value_dim=2, rule=rule,
                         dtype=jnp.float64, with_state=True)
    names = [n for n in DIFF_ARGS if inputs[n] is not None]

    def f(*args):
        return run({**inputs, **dict(zip(names, args, strict=True))}, impl, rule)

    check_grads(f, [inputs[n] for n in names], order=1, modes=["rev"])


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_long_sequence_gradients_do_not_drift(impl):
    inputs = make_inputs(11, batch=1, time=4096, heads=2, key_dim=32, value_dim=16, with_state=True)
    got, want = grads(inputs, impl, "delta"), grads(inputs, "reference", "delta")
    for g, w in zip(got, want, strict=True):
        rel = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
        assert rel < 1e-4, rel


def test_scan_backward_memory_does_not_grow_with_t_k_v():
    reference, scan = temp_bytes_of_grad("reference"), temp_bytes_of_grad("scan")
    # The oracle keeps W at every step: T * B * H * K * V float32 at least.
    assert reference >= 2048 * 2 * 4 * 128 * 64 * 4
    assert reference / scan >= 20, (reference, scan)


@JAX_SENSITIVE
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_composes_with_jit_vmap_grad_checkpoint(impl):
    inputs = make_inputs(2, time=9, with_state=True)
    want_out, want_state = run(inputs, "reference", "delta")

    def f(q, k, v, beta, s):
        return dj.fast_weight(q, k, v, beta, initial_state=s, impl=impl)

    args = [inputs[n] for n in DIFF_ARGS]
    assert_close(jax.jit(f)(*args), (want_out, want_state), rtol=1e-5, atol=1e-6)
    # vmap over an extra leading axis: two stacked copies of the batch.
    stacked = [jnp.stack([a, 2 * a]) for a in args]
    out, state = jax.vmap(f)(*stacked)
    assert_close((out[0], state[0]), (want_out, want_state), rtol=1e-5, atol=1e-6)
    assert_close(out[1], run({**inputs, **{n: 2 * inputs[n] for n in DIFF_ARGS}}, "reference", "delta")[0],
                 rtol=1e-5, atol=1e-6)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a)[0] ** 2) + jnp.sum(fn(*a)[1])

    plain = jax.grad(loss(f), argnums=(0, 1, 2, 3, 4))(*args)
    remat = jax.jit(jax.grad(loss(jax.checkpoint(f)), argnums=(0, 1, 2, 3, 4)))(*args)
    # Gradients reach ~5 here: float32 rounding of differently batched matmuls is ~1e-6 absolute.
    assert_close(remat, plain, rtol=1e-5, atol=1e-6)
    # vmap of grad.
    per_copy = jax.vmap(jax.grad(loss(f), argnums=(0, 1, 2, 3, 4)))(*stacked)
    assert_close([g[0] for g in per_copy], plain, rtol=1e-5, atol=1e-6)


@JAX_SENSITIVE
@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_bfloat16_inputs(impl, rule):
    inputs = make_inputs(4, time=64, rule=rule, with_state=True)
    bf16 = cast_inputs(inputs, jnp.bfloat16)
    out, state = run(bf16, impl, rule)
    chex.assert_type([out, state], [jnp.bfloat16, jnp.float32])
    # Same bf16-rounded inputs in float32: only the output rounding differs.
    want_out, want_state = run(cast_inputs(bf16, jnp.float32),
                               "reference", rule)
    assert_close(out.astype(jnp.float32), want_out, rtol=1e-2, atol=1e-2)
    assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    g = grads(bf16, impl, rule)
    chex.assert_type(g[:3], jnp.bfloat16)
    # Their values: the oracle's gradients on the same bf16-rounded inputs in float32, up to
    # bfloat16's rounding of the gradients themselves (relative 2^-8 per entry).
    want_g = grads(cast_inputs(bf16, jnp.float32), "reference", rule)
    assert worst_relative_error(g, want_g) < 1e-2, worst_relative_error(g, want_g)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_scale_multiplies_outputs(impl):
    inputs = make_inputs(6, time=10)
    out, state = run(inputs, impl, "delta", scale=0.25)
    base_out, base_state = run(inputs, impl, "delta")
    assert_close(out, 0.25 * base_out, rtol=1e-6)
    assert_close(state, base_state, rtol=0)


@JAX_SENSITIVE
@pytest.mark.parametrize("T", [12, 80])
def test_auto_picks_a_qualified_impl(T):
    inputs = make_inputs(8, time=T)
    assert_close(run(inputs, "auto", "delta"), run(inputs, "reference", "delta"), rtol=1e-5, atol=1e-6)


def test_auto_prefers_chunk_from_one_chunk_on():
    from dpfp_jax.ops.fast_weight import auto_candidates

    assert auto_candidates(jnp.ones((1, 63, 1, 4)), 64) == ("scan",)
    assert auto_candidates(jnp.ones((1, 64, 1, 4)), 64)[0] == "chunk"
    assert auto_candidates(jnp.ones((1, 20, 1, 4)), 16)[0] == "chunk"


def test_delta_rule_stays_bounded_on_long_sequences():
    # Sum-normalised keys and beta in (0, 1) make each step a contraction.
    inputs = make_inputs(9, batch=1, time=3000, heads=1, key_dim=16, value_dim=4)
    _, state = run(inputs, "scan", "delta")
    assert float(jnp.abs(state).max()) < 10 * float(jnp.abs(inputs["v"]).max())


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_delta_rule_with_l2_normalised_keys_stays_bounded_at_t_65536(impl):
    # Gaussian q, k (negative entries: sum_norm is no normaliser there) made unit-length by l2_norm;
    # raw, these keys (|k|^2 about 8) overflow float32 within a few hundred steps.
    x = jax.random.normal(jax.random.key(12), (3, 1, 65536, 2, 8))
    q, k = dj.l2_norm(x[0]), dj.l2_norm(x[1])
    v, beta = x[2, ..., :4], jax.nn.sigmoid(x[2, ..., 4])
    out, state = jax.jit(lambda *a: dj.fast_weight(*a, impl=impl))(q, k, v, beta)
    assert_bounded_and_not_drifting(out, state, k, v, beta)
    # |o_tj| = |q_t . W_t[:, j]| <= |q_t| |W_t[:, j]| with |q_t| <= 1: the bound at every step.
    assert (out**2 <= delta_column_bound(k, v, beta) * (1 + 1e-4)).all()


# "pallas_interpret": the Pallas GPU kernels in interpret mode, fused chunk from one chunk (16 steps)
# on, fused recurrent below; "tpu_interpret": the Pallas TPU kernel (impl="pallas" inside
# force_tpu_interpret_mode), chunked at every length. inf goes the way of NaN (0 * inf is NaN),
# so it is run once.
NON_FINITE_CASES = [
    *[(impl, 40, np.nan) for impl in ("reference", *FAST_IMPLS, "pallas_interpret", "tpu_interpret")],
    ("chunk", 40, np.inf),
    ("pallas_interpret", 12, np.nan),
]


@pytest.mark.parametrize("impl, length, bad", NON_FINITE_CASES)
@pytest.mark.parametrize("rule, arg", [(r, a) for r in ("delta", "sum") for a in ("q", "k", "v", "beta")
                                       if (r, a) != ("sum", "beta")])
def test_where_a_non_finite_input_reaches(impl, length, bad, rule, arg):
    # As the op's docstring says: scan and reference are strictly causal; the chunked forms mix
    # the steps of a chunk in matmuls, so a bad write can also reach the outputs of its chunk
    # before it, but never an earlier chunk. A bad query spoils its own output only.
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas

    chunk_size = 16
    t = 21 if length > chunk_size else 7  # in the second chunk, or in a sequence shorter than one
    inputs = make_inputs(10, time=length, rule=rule)
    inputs[arg] = inputs[arg].at[0, t, 0].set(bad)  # batch 0, head 0, every feature
    if impl == "pallas_interpret":
        out, state = fast_weight_pallas(inputs["q"], inputs["k"], inputs["v"], inputs["beta"],
                                        jnp.zeros((2, 2, 8, 4)), rule=rule, scale=1.0, chunk_size=chunk_size,
                                        interpret=True)
    elif impl == "tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu

        with pltpu.force_tpu_interpret_mode():
            out, state = run(inputs, "pallas", rule, chunk_size=chunk_size)
    else:
        out, state = run(inputs, impl, rule, chunk_size=chunk_size)
    out, state = np.asarray(out), np.asarray(state)
    assert np.isfinite(out[1]).all() and np.isfinite(out[0, :, 1]).all()  # other batch rows and heads
    assert np.isfinite(state[1]).all() and np.isfinite(state[0, 1]).all()
    spoilt = out[0, :, 0]
    assert not np.isfinite(spoilt[t]).any()
    if arg == "q":
        assert np.isfinite(np.delete(spoilt, t, axis=0)).all() and np.isfinite(state).all()
        return
    assert not np.isfinite(spoilt[t:]).any() and not np.isfinite(state[0, 0]).any()
    chunked = impl in ("chunk", "tpu_interpret") or (impl == "pallas_interpret" and length >= chunk_size)
    causal_from = t - t % chunk_size if chunked else t
    assert np.isfinite(spoilt[:causal_from]).all()


B, T, H, K, V = 2, 5, 3, 4, 6
GOOD = dict(
    q=jnp.ones((B, T, H, K)), k=jnp.ones((B, T, H, K)), v=jnp.ones((B, T, H, V)), beta=jnp.ones((B, T, H))
)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=jnp.ones((B, T, K))), ValueError, "q must be 4-D"),
        (dict(k=jnp.ones((B, T, H, K + 1))), ValueError, "k must have q's shape"),
        (dict(k=jnp.ones((B, T + 1, H, K))), ValueError, "k must have q's shape"),
        (dict(v=jnp.ones((B, T, H + 1, V))), ValueError, "v must be"),
        (dict(v=jnp.ones((B + 1, T, H, V))), ValueError, "v must be"),
        (dict(beta=None), ValueError, "beta is required"),
        (dict(beta=jnp.ones((B, T, H, 1))), ValueError, "beta must be"),
        (dict(rule="sum"), ValueError, "beta is only used by rule='delta'"),
        (dict(rule="hebbian"), ValueError, "rule must be one of"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(initial_state=jnp.ones((B, H, V, K))), ValueError, "initial_state must be"),
        (dict(q=jnp.ones((B, T, H, K), jnp.int32)), TypeError, "q must have a floating dtype"),
        (dict(beta=jnp.ones((B, T, H), jnp.int32)), TypeError, "beta must have a floating dtype"),
        (dict(initial_state=jnp.ones((B, H, K, V), jnp.int32)), TypeError, "initial_state must have"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = {**GOOD, **change}
    with pytest.raises(error, match=match):
        dj.fast_weight(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), **args)


# --- empty inputs ----------------------------------------------------------------------------

EMPTY_SHAPES = {  # (B, T, H, K, V): one axis 0 each; K = 0 has outputs (zeros), the others none
    "T=0": (2, 0, 3, 4, 5), "B=0": (0, 6, 3, 4, 5), "H=0": (2, 6, 0, 4, 5), "K=0": (2, 6, 3, 0, 5),
    "V=0": (2, 6, 3, 4, 0),
}


def empty_inputs(shape, rule, with_state):
    batch, time, heads, key_dim, value_dim = shape
    return make_inputs(1, batch=batch, time=time, heads=heads, key_dim=key_dim, value_dim=value_dim, rule=rule,
                       with_state=with_state)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS, "auto"])
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", list(EMPTY_SHAPES.values()), ids=list(EMPTY_SHAPES))
def test_empty_inputs_give_empty_outputs_and_the_initial_state(impl, rule, with_state, shape):
    inputs = empty_inputs(shape, rule, with_state)
    # chunk_size 2 < T = 6: the chunk path really runs chunks, and "auto" picks it.
    out, state = run(inputs, impl, rule, chunk_size=2)
    batch, time, heads, key_dim, value_dim = shape
    chex.assert_shape([out, state], [(batch, time, heads, value_dim), (batch, heads, key_dim, value_dim)])
    chex.assert_type([out, state], jnp.float32)
    # Nothing is written (T = 0), or nothing can be read (K = 0): outputs are zeros.
    assert_close(out, jnp.zeros_like(out), rtol=0)
    if time == 0:
        want = inputs["initial_state"] if with_state else jnp.zeros_like(state)
        assert_close(state, want, rtol=0)


@JAX_SENSITIVE
@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("shape", list(EMPTY_SHAPES.values()), ids=list(EMPTY_SHAPES))
def test_empty_inputs_have_the_gradients_of_the_oracle(impl, shape):
    inputs = empty_inputs(shape, "delta", True)
    got = jax.grad(lambda *a: gradient_loss(impl, *a), argnums=(0, 1, 2, 3, 4))(*[inputs[n] for n in DIFF_ARGS])
    want = jax.grad(lambda *a: gradient_loss("reference", *a), argnums=(0, 1, 2, 3, 4))(
        *[inputs[n] for n in DIFF_ARGS])
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    if shape[1] == 0:  # final_state = initial_state, so d initial_state = d final_state
        assert_close(got[4], random_like(2, inputs["initial_state"]), rtol=0)


def gradient_loss(impl, q, k, v, beta, s):
    out, state = dj.fast_weight(q, k, v, beta, initial_state=s, impl=impl, chunk_size=2)
    return jnp.sum(out * random_like(1, out)) + jnp.sum(state * random_like(2, state))


@pytest.mark.parametrize("shape", list(EMPTY_SHAPES.values()), ids=list(EMPTY_SHAPES))
def test_pallas_adapter_takes_empty_inputs(shape):
    # The GPU kernels are dispatched through this adapter; Pallas's interpreter runs it here.
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas

    inputs = empty_inputs(shape, "delta", True)
    got = fast_weight_pallas(*[inputs[n] for n in DIFF_ARGS], rule="delta", scale=1.0, chunk_size=16,
                             interpret=True)
    assert_close(got, run(inputs, "reference", "delta"), rtol=0)


# --- what may be passed ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(beta=0.5), TypeError, "beta must be an array .* got float"),
        (dict(q=np.ones((B, T, H, K)).tolist()), TypeError, "q must be an array .* got list"),
        (dict(v=np.ones((B, T, H, V)).tolist()), TypeError, "v must be an array .* got list"),
        (dict(initial_state=np.ones((B, H, K, V)).tolist()), TypeError, "initial_state must be an array"),
        (dict(scale=jnp.ones(3)), ValueError, r"scale must be a scalar \(0-d\); got an array of shape \(3,\)"),
        (dict(scale=np.ones((1, 1))), ValueError, r"scale must be a scalar \(0-d\)"),
        (dict(scale="0.5"), TypeError, "scale must be a real number .* got '0.5' of type str"),
        (dict(scale=True), TypeError, "scale must be a real number"),
        (dict(scale=jnp.array(1 + 2j)), TypeError, "scale must be a real number; got an array of dtype complex"),
    ],
)
def test_non_arrays_and_bad_scales_are_refused(change, error, match):
    args = {**GOOD, **change}
    for impl in ("reference", *FAST_IMPLS):
        with pytest.raises(error, match=match):
            dj.fast_weight(args["q"], args["k"], args["v"], args["beta"], impl=impl,
                           **{n: args[n] for n in ("initial_state", "scale") if n in args})


@pytest.mark.parametrize("scale", [np.float32(0.5), jnp.array(0.5), np.array(2), 2])
def test_scalar_arrays_and_numbers_are_fine_scales(scale):
    out, _ = dj.fast_weight(*GOOD.values(), scale=scale, impl="scan")
    assert_close(out, float(scale) * dj.fast_weight(*GOOD.values(), impl="scan")[0], rtol=1e-6)


@JAX_SENSITIVE
@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_traced_scale_and_its_gradient(impl):
    inputs = make_inputs(12, time=9, with_state=True)
    unscaled_out, state = run(inputs, impl, "delta")
    weights = random_like(3, unscaled_out)

    @jax.jit
    def loss(scale):
        out, _ = run(inputs, impl, "delta", scale=scale)
        return jnp.sum(out * weights)

    value, d_scale = jax.value_and_grad(loss)(jnp.float32(0.25))
    # out is linear in scale: loss(s) = s * loss(1), so d loss / d scale = loss(1).
    want = jnp.sum(unscaled_out * weights)
    assert_close((value, d_scale), (0.25 * want, want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_a_float64_scale_keeps_float32_inputs_float32(x64, impl):
    # With x64 a numpy float64 scale is a float64 array; it must not widen q past the state's dtype
    # (the custom backward's scan carries would disagree).
    inputs = make_inputs(13, batch=1, time=5, with_state=True)
    out, state = run(inputs, impl, "delta", scale=np.float64(0.5))
    assert out.dtype == state.dtype == jnp.float32
    assert_close(out, 0.5 * run(inputs, "reference", "delta")[0], rtol=1e-5, atol=1e-7)
    dq = jax.grad(lambda q: jnp.sum(run({**inputs, "q": q}, impl, "delta", scale=np.float64(0.5))[0] ** 2))(
        inputs["q"])
    assert dq.dtype == jnp.float32
