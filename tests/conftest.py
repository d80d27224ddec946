"""Shared test helpers; the fast-weight input maker is ``dpfp_devtools.workloads.make_inputs``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest


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
