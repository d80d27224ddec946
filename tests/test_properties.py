"""Property-based: every impl equals the oracle (impl="reference") over random shapes and arguments.

Hypothesis draws the shape (0, 1 and more along each of B, T, H, K, V), the rule, the impl, the
dtype, the chunk size (1, below, at and far above T), an initial state or none and a padding
mask, and checks outputs and final state, and for some cases the gradients of every input,
against the oracle on the same inputs. A masked step is what a padding mask means at the op's
level: a zero key and a zero write strength, so the step writes nothing.

Bounded for `make test`: a fixed number of examples drawn deterministically (``derandomize``, no
example database), small sizes drawn from short lists (each new shape is a new XLA compile) and
one jitted program per example for the impl, the oracle and their gradients together.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dpfp_jax as dj
from tests.helpers import DIFF_ARGS as ARGS
from tests.helpers import assert_close_to_scale

EXAMPLES = 50
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# float32: the fast paths reassociate sums, nothing more. bfloat16: outputs are rounded to
# bfloat16 at the end (one ulp is 2**-8 relative), the state stays float32 on both sides.
TOLERANCES = {"float32": (1e-4, 1e-5), "bfloat16": (2e-2, 2e-2)}
STATE_TOLERANCES = {"float32": (1e-4, 1e-5), "bfloat16": (1e-4, 1e-4)}


@st.composite
def cases(draw) -> dict:
    shape = [
        draw(st.sampled_from([1, 2])),  # B
        draw(st.sampled_from([1, 2, 5, 16, 40])),  # T
        draw(st.sampled_from([1, 3])),  # H
        draw(st.sampled_from([1, 4, 8])),  # K
        draw(st.sampled_from([1, 3, 8])),  # V
    ]
    # About one case in three has an empty axis (with every axis 0 half the time, most would).
    empty = draw(st.sampled_from([None, None, None, None, None, 0, 1, 2, 3, 4]))
    if empty is not None:
        shape[empty] = 0
    time = shape[1]
    return dict(
        shape=tuple(shape),
        rule=draw(st.sampled_from(dj.RULES)),
        # chunk twice: the most machinery. Every draw compares a fast impl with the oracle (the
        # oracle's own shapes, dtypes and empty cases are what the other impls are held to).
        impl=draw(st.sampled_from(["chunk", "scan", "auto", "chunk"])),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        chunk_size=draw(st.sampled_from([1, 3, 16, max(time, 1), 10**6])),
        with_state=draw(st.booleans()),
        masked=draw(st.booleans()),
        with_grads=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make_case_inputs(shape, rule, dtype, with_state, masked, seed) -> dict:
    """DPFP-like q, k (non-negative, sum-normalised), Gaussian v and state, beta in (0, 1); drawn
    with numpy, which compiles nothing per shape."""
    batch, time, heads, key_dim, value_dim = shape
    rng = np.random.default_rng(seed)

    def features():
        x = np.maximum(rng.standard_normal((batch, time, heads, key_dim)), 0.0) + 0.01
        return x / x.sum(axis=-1, keepdims=True).clip(1e-6)

    q, k = features(), features()
    v = rng.standard_normal((batch, time, heads, value_dim))
    beta = rng.uniform(0.05, 0.95, (batch, time, heads)) if rule == "delta" else None
    if masked:
        real = rng.random((batch, time)) < 0.6
        k = k * real[..., None, None]
        if beta is not None:
            beta = beta * real[..., None]
    state = rng.standard_normal((batch, heads, key_dim, value_dim)) if with_state else None
    return {n: None if x is None else jnp.asarray(x, dtype) for n, x in zip(ARGS, (q, k, v, beta, state),
                                                                           strict=True)}


@partial(jax.jit, static_argnames=("impl", "rule", "chunk_size", "with_grads"))
def impl_and_oracle(inputs, weights, *, impl, rule, chunk_size, with_grads):
    """``(got, want)``: ``(out, state)`` from the impl and the oracle, and with ``with_grads`` the
    gradients of a fixed linear loss on both with respect to every input."""

    def call(which, args):
        return dj.fast_weight(args["q"], args["k"], args["v"], args["beta"], rule=rule,
                              initial_state=args["initial_state"], impl=which, chunk_size=chunk_size)

    def loss(which, args):
        out, state = call(which, args)
        return jnp.sum(out.astype(jnp.float32) * weights[0]) + jnp.sum(state * weights[1])

    got, want = call(impl, inputs), call("reference", inputs)
    if with_grads:
        got, want = (got, jax.grad(partial(loss, impl))(inputs)), (want, jax.grad(partial(loss, "reference"))(inputs))
    return got, want


@PROPERTY_SETTINGS
@given(cases())
def test_every_impl_equals_the_oracle(case):
    batch, time, heads, key_dim, value_dim = case["shape"]
    inputs = make_case_inputs(case["shape"], case["rule"], case["dtype"], case["with_state"], case["masked"],
                              case["seed"])
    # Gradients in float32 only: bfloat16 gradients are rounded per input and per step.
    with_grads = case["with_grads"] and case["dtype"] == "float32"
    rng = np.random.default_rng(case["seed"] + 1)
    weights = (jnp.asarray(rng.standard_normal((batch, time, heads, value_dim)), jnp.float32),
               jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32))
    got, want = impl_and_oracle(inputs, weights, impl=case["impl"], rule=case["rule"],
                                chunk_size=case["chunk_size"], with_grads=with_grads)
    (out, state), (want_out, want_state) = (got[0], want[0]) if with_grads else (got, want)

    assert out.shape == (batch, time, heads, value_dim) and out.dtype == jnp.dtype(case["dtype"])
    assert state.shape == (batch, heads, key_dim, value_dim) and state.dtype == jnp.float32
    assert_close_to_scale(out, want_out, TOLERANCES[case["dtype"]])
    assert_close_to_scale(state, want_state, STATE_TOLERANCES[case["dtype"]])
    if time == 0:  # no step: the state is the initial one, or zeros
        start = inputs["initial_state"]
        assert_close_to_scale(state, np.zeros(state.shape) if start is None else start, (0, 0))
    if with_grads:
        for name in ARGS:
            if inputs[name] is not None:
                assert got[1][name].shape == inputs[name].shape, name
                assert_close_to_scale(got[1][name], want[1][name], (2e-4, 2e-5))
