"""What the test files share, in one module: markers, array makers and comparisons, the delta
rule's state bound, and the runner of multi-device scripts (``tests/scripts/``).

Test files import from here (``from tests.helpers import ...``, with pytest's ``pythonpath``
``["."]``), never from one another.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"

JAX_SENSITIVE = pytest.mark.jax_sensitive
"""The ops, modules, multi-device and sharded-step tests that `make test` also runs on the newest
jax and flax admitted (.venv-newest); the marker is registered in pyproject.toml."""


def normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    """``scale`` times a standard Gaussian of ``shape`` drawn from ``jax.random.key(seed)``."""
    return scale * jax.random.normal(jax.random.key(seed), shape)


def random_like(seed: int, x: jax.Array) -> jax.Array:
    """Gaussian of x's shape and dtype; drawn in float32 so every dtype sees the same numbers."""
    return jax.random.normal(jax.random.key(seed), x.shape, jnp.float32).astype(x.dtype)


def close(a, b, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Two pytrees equal leaf for leaf (in order, compared in float32) within ``rtol``/``atol``."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


def assert_close(got, want, rtol: float, atol: float = 0.0) -> None:
    """Leaf by leaf, whatever containers hold them (a list of gradients against jax.grad's tuple)."""
    chex.assert_trees_all_close(jax.tree.leaves(got), jax.tree.leaves(want), rtol=rtol, atol=atol)


def run_with_host_devices(script: Path, count: int = 8) -> subprocess.CompletedProcess:
    """Run a script in a fresh Python with ``count`` host CPU devices; the repo root is importable
    (``tests.*``, ``examples.*``) as it is for pytest itself."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)


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


def pallas_calls(jaxpr):
    """Every ``pallas_call`` equation of a jaxpr, nested jaxprs (jit, custom_vjp, ...) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from pallas_calls(inner)
