"""Shared test helpers: the delta rule's state bound; the fast-weight input maker is
``dpfp_devtools.workloads.make_inputs``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest


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
