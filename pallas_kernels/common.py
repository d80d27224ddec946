"""Padding and tiling shared by the Pallas kernels.

Triton's tensors need power-of-two sizes, so K is padded up to one and the value axis to a whole
number of BV-wide blocks; zero padding is inert for the fast-weight op (zero keys, queries and
writes neither write nor read anything).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array


def value_block(key_dim: int, value_dim: int) -> int:
    """Value columns per program: keep the ``[K, BV]`` state slice near 16K floats of registers."""
    return max(1, min(pl.next_power_of_2(value_dim), 16_384 // pl.next_power_of_2(key_dim), 64))


def padded_sizes(key_dim: int, value_dim: int) -> tuple[int, int, int]:
    """``(K padded to a power of two, BV, V padded to a multiple of BV)``."""
    k_pad = pl.next_power_of_2(key_dim)
    block = value_block(k_pad, value_dim)
    return k_pad, block, -(-value_dim // block) * block


def pad_to(x: Array, axis: int, size: int) -> Array:
    """Zero-pad ``axis`` of x up to ``size``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def pad_state(w: Array, k_pad: int, v_pad: int) -> Array:
    """Zero-pad a ``[G, K, V]`` state to ``[G, k_pad, v_pad]``."""
    return pad_to(pad_to(w, 1, k_pad), 2, v_pad)
