"""dj.fast_weight: every fast path against the oracle, gradients, memory, transforms, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import dpfp_jax as dj
from tests.conftest import make_inputs, random_like

# Also run by `make test` with the newest jax admitted (.venv-newest): see the Makefile.
pytestmark = pytest.mark.jax_sensitive

FAST_IMPLS = ["scan", "chunk"]
DIFF_ARGS = ("q", "k", "v", "beta", "initial_state")


def run(inputs, impl, rule, **kwargs):
    return dj.fast_weight(
        inputs["q"], inputs["k"], inputs["v"], inputs["beta"],
        rule=rule, initial_state=inputs["initial_state"], impl=impl, **kwargs,
    )


def assert_close(got, want, rtol, atol=0.0):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


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
    assert got[0].dtype == got[1].dtype == jnp.float64 and got[0].shape == inputs["v"].shape
    assert_close(got, want, rtol=1e-10, atol=1e-12)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [pytest.param(1, marks=SLOW), pytest.param(2, marks=SLOW),
                               pytest.param(17, marks=SLOW), 256])
def test_matches_reference_float32(impl, rule, with_state, T):
    inputs = make_inputs(T, time=T, rule=rule, with_state=with_state)
    assert_close(run(inputs, impl, rule), run(inputs, "reference", rule), rtol=2e-5, atol=2e-6)


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


def temp_bytes_of_grad(impl, batch=2, time=2048, heads=4, key_dim=128, value_dim=64):
    inputs = make_inputs(0, batch=batch, time=time, heads=heads, key_dim=key_dim, value_dim=value_dim)

    def loss(q, k, v, beta):
        out, state = dj.fast_weight(q, k, v, beta, impl=impl)
        return jnp.sum(out**2) + jnp.sum(state**2)

    args = [inputs[n] for n in ("q", "k", "v", "beta")]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_scan_backward_memory_does_not_grow_with_t_k_v():
    reference, scan = temp_bytes_of_grad("reference"), temp_bytes_of_grad("scan")
    # The oracle keeps W at every step: T * B * H * K * V float32 at least.
    assert reference >= 2048 * 2 * 4 * 128 * 64 * 4
    assert reference / scan >= 20, (reference, scan)


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
    assert_close(remat, plain, rtol=1e-5, atol=1e-7)
    # vmap of grad.
    per_copy = jax.vmap(jax.grad(loss(f), argnums=(0, 1, 2, 3, 4)))(*stacked)
    assert_close([g[0] for g in per_copy], plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_bfloat16_inputs(impl, rule):
    inputs = make_inputs(4, time=64, rule=rule, with_state=True)
    bf16 = {n: None if x is None else x.astype(jnp.bfloat16) for n, x in inputs.items()}
    out, state = run(bf16, impl, rule)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    # Same bf16-rounded inputs in float32: only the output rounding differs.
    want_out, want_state = run({n: None if x is None else x.astype(jnp.float32) for n, x in bf16.items()},
                               "reference", rule)
    assert_close(out.astype(jnp.float32), want_out, rtol=1e-2, atol=1e-2)
    assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    g = grads(bf16, impl, rule)
    assert all(x.dtype == jnp.bfloat16 for x in g[:3])


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_scale_multiplies_outputs(impl):
    inputs = make_inputs(6, time=10)
    out, state = run(inputs, impl, "delta", scale=0.25)
    base_out, base_state = run(inputs, impl, "delta")
    assert_close(out, 0.25 * base_out, rtol=1e-6)
    assert_close(state, base_state, rtol=0)


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
