"""Shared helpers: random fast-weight inputs shaped like the paper's delta-rule layers, the delta rule's
state bound."""

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


def delta_column_bound(k, v, beta):
    """``sum_{s<=t} beta_s v_sj^2 / (2 - beta_s |k_s|^2)``, ``[B, T, H, V]``: bounds ``|W_t[:, j]|^2``.

    One step changes W's column j only along k_t (c = its component there, a = beta |k|^2):
    ``c' = (1 - a) c + beta |k| v_j``, and for 0 <= a <= 2 the largest ``c'^2 - c^2`` over c is
    ``beta v_j^2 / (2 - a)``. From zeros the squared column norm is at most the running sum: no
    key sequence makes it grow faster than sqrt(t), where raw keys grow it exponentially.
    """
    a = beta * jnp.sum(k.astype(jnp.float32) ** 2, axis=-1)
    return jnp.cumsum((beta / (2.0 - a))[..., None] * v.astype(jnp.float32) ** 2, axis=1)


def assert_bounded_and_not_drifting(out, state, k, v, beta, window=4096):
    """The bound above on the final state, and the outputs of the last window no larger than those
    of an early one."""
    assert jnp.isfinite(out).all() and jnp.isfinite(state).all()
    bound = delta_column_bound(k, v, beta) * (1 + 1e-4)  # float32 rounding
    column_sq = jnp.sum(state.astype(jnp.float32) ** 2, axis=-2)  # [B, H, V]
    assert (column_sq <= bound[:, -1]).all()
    # Stationary, not slowly growing: after the memory has filled, a late window of outputs is no
    # larger than an early one (random keys: both about max |v| * max |q|).
    early = float(jnp.abs(out[:, window : 2 * window]).max())
    late = float(jnp.abs(out[:, -window:]).max())
    assert late <= 1.5 * early, (early, late)


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
