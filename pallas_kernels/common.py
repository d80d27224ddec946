"""Padding and tiling shared by the Pallas kernels.

Triton's tensors need power-of-two sizes, so K is padded up to one and the value axis to a whole
number of BV-wide blocks; zero padding is inert for the fast-weight op (zero keys, queries and
writes neither write nor read anything).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Array = jax.Array


def value_block(key_dim: int, value_dim: int, state_budget: int = 16_384, min_block: int = 1) -> int:
    """Value columns per program, so the ``[K, BV]`` state slice holds about ``state_budget`` floats.

    Between ``min_block`` (16 where the block is a ``tl.dot`` operand side, Triton's minimum)
    and 64; never more than V needs, unless ``min_block`` asks for it.
    """
    fit = max(16, state_budget // pl.next_power_of_2(key_dim))
    return max(min_block, min(pl.next_power_of_2(value_dim), fit, 64))


def padded_sizes(key_dim: int, value_dim: int, state_budget: int = 16_384, min_block: int = 1
                 ) -> tuple[int, int, int]:
    """``(K padded to a power of two (at least 16), BV, V padded to a multiple of BV)``."""
    k_pad = max(16, pl.next_power_of_2(key_dim))
    block = value_block(k_pad, value_dim, state_budget, min_block)
    return k_pad, block, -(-value_dim // block) * block


def pad_to(x: Array, axis: int, size: int) -> Array:
    """Zero-pad ``axis`` of x up to ``size`` (x itself when it is that size already)."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def pad_state(w: Array, k_pad: int, v_pad: int) -> Array:
    """Zero-pad a ``[G, K, V]`` state to ``[G, k_pad, v_pad]``."""
    return pad_to(pad_to(w, 1, k_pad), 2, v_pad)


# State values one thread may keep in registers: beyond ~64 float32 registers for the state,
# the fused kernels (which also hold the loaded vectors and the products) spill.
STATE_VALUES_PER_THREAD = 64
MAX_WARPS = 8


def warps_for_state(state_values: int) -> int:
    """Warps per program that spread ``state_values`` float32 on-chip values ~64 per thread."""
    wanted = pl.next_power_of_2(-(-state_values // (32 * STATE_VALUES_PER_THREAD)))
    return max(4, min(MAX_WARPS, wanted))


def compiler_params(num_warps: int, *, num_stages: int | None = None) -> pltriton.CompilerParams:
    """Triton launch settings: ``num_warps`` per program and ``num_stages`` for loads in loops.

    ``num_stages=None`` leaves Triton's default software pipelining; 1 turns it off. Each extra
    stage keeps a copy of every load of the loop body in shared memory, the next iteration's
    operands arriving while this one computes.
    """
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
