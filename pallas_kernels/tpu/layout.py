"""How the TPU kernel reads and writes per-step arrays: in the layouts XLA already gives them.

XLA stores a TPU array in tiles of its last two dims (8 sublanes of 32 bits by 128 lanes). For
the op's ``[B, T, H, D]`` arrays that means two cases, and the kernel reads each in place:

- **Keys** (q, k and their gradients; D = K, a multiple of 128 after padding): XLA keeps
  ``[B, T, H, K]`` row-major, tiled over (H, K). The kernel's block is ``[L, H, K]`` (L steps, all
  heads) at index (b, block, 0, 0), and one head's chunk is taken from the chunk's rows of all
  heads in VMEM (fused_chunk.py says how). No copy of q, k or their gradients is made around the
  kernel. (A block with the head axis squeezed, ``[L, None, K]``, is what Mosaic refuses: the
  second-to-last block dim must be whole tiles or the whole axis.) Where blocks of all heads do
  not fit a chip's VMEM (v4 at K >= 384), ``keys_to_kernel(..., head_major=True)`` makes the
  head-major copy ``[B, H, T', K']`` the kernel then reads in blocks of a few heads.
- **Values** (v, the outputs, the stored writes u and their gradients; V = 64 in DPFP's
  configurations): a 64-wide last dim would fill half of each 128-lane tile, so XLA stores
  ``[B, T, H, 64]`` with T on the lanes (layout ``{1,3,2,0}``). The kernel takes the same bytes
  as the logical transpose ``[B, H, V, T]`` (a bitcast for XLA, no copy) in ``[H, V, L]`` blocks:
  a chunk of one head is ``ref[h, :, steps]``, ``[V, C]`` with the steps on the lanes, and the
  kernel does its math on the transposes ``v^T``, ``u^T``, ``O^T`` and the state ``W^T`` ``[V, K]``
  (also no padding of V = 64 in VMEM). The stored writes u, which only the kernel reads, are
  kept that way at every V. Other V below 128 take the same path; whether XLA stores those
  T-minor too (so that the view is free) was checked for V = 64 only.
- **Values with V a multiple of 128** (e.g. 128) XLA keeps row-major like the keys: the kernel
  reads and writes them as they are, in ``[L, H, V]`` blocks, and transposes each chunk in VMEM
  (``[C, V] <-> [V, C]``, Mosaic's transpose), so the math is the same and there is no copy in HBM
  (reading them transposed would make XLA copy v, the outputs and their gradients).

A block's step axis L must be whole lane tiles for the value arrays: L = 128 steps when the
chunk C divides 128 (the kernel walks the ``128 / C`` chunks of a block in turn), else L = C (a
multiple of 128); when the whole padded sequence is one block, L is its length (a block may be
the whole axis). T is zero-padded to whole blocks and K to whole lane tiles: zero keys and
values are inert (they add nothing to ``Q K^T``, ``K W`` or ``K^T u``, and their beta is 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.padding import pad_to as _pad

Array = jax.Array

LANES = 128


def padded_key_dim(key_dim: int) -> int:
    """K rounded up to whole 128-lane tiles.

    Example:
        >>> padded_key_dim(128), padded_key_dim(200), padded_key_dim(64)
        (128, 256, 128)
    """
    return -(-key_dim // LANES) * LANES


def block_steps(chunk: int, length: int) -> int:
    """L, the steps of one grid step's blocks: whole lane tiles of whole chunks, or the whole
    (padded) sequence when that is shorter.

    Example:
        >>> block_steps(64, 4096), block_steps(16, 40), block_steps(256, 4096)
        (128, 48, 256)
    """
    padded = -(-length // chunk) * chunk
    return min(max(chunk, LANES), padded)


def keys_to_kernel(x: Array, padded_length: int, width: int, head_major: bool = False) -> Array:
    """``[B, T, H, K] -> [B, T', H, K']``: zero-padded to whole blocks and lane tiles (x itself when
    it is that shape already); ``head_major``: ``[B, H, T', K']``, a copy."""
    x = _pad(_pad(x, 1, padded_length), 3, width)
    return jnp.swapaxes(x, 1, 2) if head_major else x


def values_to_kernel(x: Array, padded_length: int, on_lanes: bool) -> Array:
    """``[B, T, H, V] -> [B, H, V, T']``, T zero-padded: the steps on the lanes (``on_lanes``: V on the
    lanes, ``[B, T', H, V]`` as it is)."""
    x = _pad(x, 1, padded_length)
    return x if on_lanes else jnp.transpose(x, (0, 2, 3, 1))


def values_from_kernel(y: Array, length: int, on_lanes: bool) -> Array:
    """The inverse of :func:`values_to_kernel`, the padding of T sliced off."""
    return (y if on_lanes else jnp.transpose(y, (0, 3, 1, 2)))[:, :length]


def betas_to_kernel(beta: Array, padded_length: int) -> Array:
    """``[B, T, H] -> [B, H, T']`` float32: a head's chunk of write strengths is a lane row."""
    return jnp.swapaxes(_pad(beta.astype(jnp.float32), 1, padded_length), 1, 2)
