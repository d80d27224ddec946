"""Padding and tiling shared by the Triton kernels, and their tensor-core dots.

Triton's tensors need power-of-two sizes, so K is padded up to one (or, for kernels that load K
64 rows at a time, to whole tiles) and the value axis to a whole number of BV-wide blocks; zero
padding is inert for the fast-weight op (zero keys, queries and writes neither write nor read
anything).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.padding import pad_to

Array = jax.Array


def value_block(key_dim: int, value_dim: int, state_budget: int = 16_384, min_block: int = 1) -> int:
    """Value columns per program, so the ``[K, BV]`` state slice holds about ``state_budget`` floats.

    Between ``min_block`` (16 where the block is a ``tl.dot`` operand side, Triton's minimum)
    and 64; never more than V needs, unless ``min_block`` asks for it.
    """
    fit = max(16, state_budget // pl.next_power_of_2(key_dim))
    return max(min_block, min(pl.next_power_of_2(value_dim), fit, 64))


def padded_sizes(key_dim: int, value_dim: int, state_budget: int = 16_384, min_block: int = 1,
                 key_tile: int | None = None) -> tuple[int, int, int]:
    """``(K padded, BV, V padded to a multiple of BV)``.

    K is padded to a power of two (at least 16): Triton tensors have power-of-two shapes. A kernel
    that only ever loads ``key_tile`` rows of K at a time (the chunked ones) passes ``key_tile``:
    beyond one tile K is then padded to whole tiles only (K = 384 stays 384 instead of 512: no
    padded copy of q and k, and a quarter fewer tiles to walk).
    """
    k_pad = max(16, pl.next_power_of_2(key_dim))
    if key_tile is not None and key_dim > key_tile:
        k_pad = -(-key_dim // key_tile) * key_tile
    block = value_block(k_pad, value_dim, state_budget, min_block)
    return k_pad, block, -(-value_dim // block) * block


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


# The chunked kernels (chunk_recurrence.py, fused_chunk.py): the state as on-chip tiles of
# KEY_TILE rows, walked with tensor-core dots.
KEY_TILE = 64  # rows of the state per on-chip tile
NUM_WARPS = 8


# On the GPU the dots run on tensor cores in TF32 (10-bit mantissa). For float32 inputs, three
# passes (hi*hi + hi*lo + lo*hi) keep float32's accuracy: one pass leaves 3-4e-4 relative error in
# outputs and gradients against at most 1e-6 (benchmarks/dot_precision.py), since the walk carries the
# state through every chunk. For bfloat16/float16 inputs one pass costs nothing measurable (their
# own rounding, 2e-3, dominates) and frees registers. Pallas's IEEE float32 dot would run on CUDA
# cores with several times the shared memory. Interpret mode runs on the CPU, whose dot takes no
# such algorithm: plain float32 there.
PRECISE_DOT = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
FAST_DOT = lax.DotAlgorithmPreset.TF32_TF32_F32


def float32_or_wider(*xs: Array) -> bool:
    """Whether an input is float32 or wider, so the tile dots take three TF32 passes (``PRECISE_DOT``).

    Example:
        >>> import jax.numpy as jnp
        >>> float32_or_wider(jnp.ones(2, jnp.bfloat16), jnp.ones(2, jnp.float32))
        True
        >>> float32_or_wider(jnp.ones(2, jnp.float16))
        False
    """
    return any(jnp.finfo(x.dtype).bits >= 32 for x in xs)


def tile_dot(interpret: bool, precise: bool):
    """The chunked kernels' ``jnp.dot``: float32 accumulation, precision as ``PRECISE_DOT`` above says."""
    precision = None if interpret else PRECISE_DOT if precise else FAST_DOT
    return functools.partial(jnp.dot, precision=precision, preferred_element_type=jnp.float32)


def total(x: Array) -> Array:
    """The sum of a 2-D on-chip array, one axis at a time: Pallas's Triton lowering cannot reduce
    both axes in one ``jnp.sum`` (jax 0.11.2: it gives the 1-D partial result a 2-D sharding)."""
    return jnp.sum(jnp.sum(x, axis=1), axis=0)


def key_tiles(key_dim: int) -> list[slice]:
    """Row slices of the state's on-chip tiles: ``KEY_TILE`` keys each (all of K when smaller)."""
    tile = min(KEY_TILE, key_dim)
    return [slice(i, i + tile) for i in range(0, key_dim, tile)]


def walk_in_reverse(step, num_chunks: int, tiles: list[slice], w_ref, d_w_ref, d_w0_ref) -> None:
    """The backward kernels' walk: ``step(i, (W1 tiles, dW1 tiles))`` for chunk ``num_chunks - 1 - i``
    returns the tiles of W0 and dL/dW0; starts from the final state and its cotangent, and stores
    dL/d(initial state)."""
    initial = (tuple(w_ref[rows, :] for rows in tiles), tuple(d_w_ref[rows, :] for rows in tiles))
    _, dw0 = lax.fori_loop(0, num_chunks, step, initial)
    for rows, dw in zip(tiles, dw0, strict=True):
        d_w0_ref[rows, :] = dw
