"""The layers' decay gate: alpha_t from the input, for :func:`dpfp_jax.fast_weight`'s ``log_decay``.

``gate="gated_deltanet"`` is the parametrisation of Songlin Yang, Jan Kautz and Ali Hatamizadeh,
*Gated Delta Networks: Improving Mamba2 with Delta Rule* (ICLR 2025), as their released layer
computes it: one more column per head in the input projection, ``a_t``, and two parameters per
head, ``A_log`` and ``dt_bias``, with

    log alpha_t = -exp(A_log) * softplus(a_t + dt_bias)    (always <= 0, so alpha_t in (0, 1]).

Initialised as that layer does (Mamba-2's initialisation): ``A`` uniform in [1, 16]
(``A_log = log A``) and ``dt`` log-uniform in [1e-3, 1e-1] (floored at 1e-4) with
``dt_bias = softplus^-1(dt)``, so at start ``alpha`` lies between about exp(-1.6) and 1.

Both the linen and the NNX layers create the parameters ``gate_a_log`` and ``gate_dt_bias``
(``[H]`` each) with these initialisers and call :func:`gated_deltanet_log_decay`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> a_log = gate_a_log_init(jax.random.key(0), (2,))
    >>> dt_bias = gate_dt_bias_init(jax.random.key(1), (2,))
    >>> log_decay = gated_deltanet_log_decay(jnp.zeros((1, 3, 2)), a_log, dt_bias)
    >>> log_decay.shape, bool((log_decay <= 0).all())
    ((1, 3, 2), True)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

GATES = ("gated_deltanet",)
"""Accepted values of the layers' ``gate`` attribute besides None (no gate)."""

A_RANGE = (1.0, 16.0)
DT_RANGE = (1e-3, 1e-1)
DT_FLOOR = 1e-4


def gate_a_log_init(key: Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
    """``log A``, A uniform in ``A_RANGE``: the decay rate per head."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_RANGE)).astype(dtype)


def gate_dt_bias_init(key: Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
    """``softplus^-1(dt)``, dt log-uniform in ``DT_RANGE`` and at least ``DT_FLOOR``."""
    low, high = (math.log(x) for x in DT_RANGE)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, low, high)), DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def gated_deltanet_log_decay(logit: Array, a_log: Array, dt_bias: Array) -> Array:
    """``log alpha [B, T, H]`` float32 from the gate column of the projection ``logit [B, T, H]``
    and the per-head parameters ``a_log``, ``dt_bias`` ``[H]`` (module docstring)."""
    rate = jnp.exp(a_log.astype(jnp.float32))
    return -rate * jax.nn.softplus(logit.astype(jnp.float32) + dt_bias.astype(jnp.float32))
