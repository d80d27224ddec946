"""Shared helpers: random fast-weight inputs shaped like the paper's delta-rule layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import dpfp_jax as dj


def make_inputs(
    seed: int = 0,
    *,
    batch: int = 2,
    time: int = 17,
    heads: int = 2,
    key_dim: int = 8,
    value_dim: int = 4,
    rule: str = "delta",
    dtype=jnp.float32,
    with_state: bool = False,
) -> dict:
    """Sum-normalised non-negative q, k (as DPFP gives), Gaussian v, sigmoid beta."""
    ks = jax.random.split(jax.random.key(seed), 5)
    shape = (batch, time, heads, key_dim)
    q = dj.sum_norm(jax.nn.relu(jax.random.normal(ks[0], shape, dtype)) + 0.01)
    k = dj.sum_norm(jax.nn.relu(jax.random.normal(ks[1], shape, dtype)) + 0.01)
    v = jax.random.normal(ks[2], (batch, time, heads, value_dim), dtype)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (batch, time, heads), dtype)) if rule == "delta" else None
    state = (
        jax.random.normal(ks[4], (batch, heads, key_dim, value_dim), dtype) if with_state else None
    )
    return dict(q=q, k=k, v=v, beta=beta, initial_state=state)


def random_like(seed: int, x: jax.Array) -> jax.Array:
    """Gaussian of x's shape and dtype; drawn in float32 so every dtype sees the same numbers."""
    return jax.random.normal(jax.random.key(seed), x.shape, jnp.float32).astype(x.dtype)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def pallas_calls(jaxpr):
    """Every ``pallas_call`` equation of a jaxpr, nested jaxprs (jit, custom_vjp, ...) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from pallas_calls(inner)
