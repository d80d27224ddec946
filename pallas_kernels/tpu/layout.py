"""How the TPU kernel's per-step arrays sit in HBM and in its blocks: TPU tiles are 128 lanes wide.

A Mosaic block's last two dims must be multiples of the tile (8 sublanes for float32, 16 for
bfloat16, by 128 lanes) or equal the whole array's. The kernel reads one head's chunk of C steps
per grid step, a ``[C, D]`` block with the feature axis D on the lanes, from a head-major
``[B * H, T, D]`` array: the caller's ``[B, T, H, D]`` transposed.

Why head-major, not ``[B, T, H * D]`` read in place (lane block h, also a legal block when D is
a multiple of 128, and free in the row-major sense): XLA lays out every array in tiles of its
last two dims, so ``[B, T, H, D]`` is tiled over (H, D) and its reshape to ``[B, T, H * D]``
(tiled over (T, H * D)) is a relayout copy on a TPU, not a bitcast. Compiled for v5e (B=8,
T=4096, H=8, K=128, V=64, bfloat16, forward and backward) both views cost XLA the same copies of
q, k and their gradients and the same temporary memory; the head-major one is a plain
permutation of the dims, a layout XLA can also give an array where it is made, and makes v
(V = 64, not a whole lane tile) readable at all.

V = 64 (less than a lane tile) stays 64 wide: the block takes the whole lane axis, which is
legal, and Mosaic pads it to 128 lanes in VMEM only. Zero-padding V to 128 in HBM instead would
double the bytes of v, the outputs, the stored writes, their gradients and the state.

Keys whose K is not a multiple of 128 are zero-padded to the next one: zero key columns are inert
(they add nothing to ``Q K^T``, ``K W`` or ``K^T u``, and the state's padded rows stay zero), the
padding is one copy of q and k, and the MXU works on 128-wide operands anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.triton.tiles import pad_to as _pad

Array = jax.Array

LANES = 128


def padded_key_dim(key_dim: int) -> int:
    """K rounded up to whole 128-lane tiles.

    Example:
        >>> padded_key_dim(128), padded_key_dim(200), padded_key_dim(64)
        (128, 256, 128)
    """
    return -(-key_dim // LANES) * LANES


class Layout(NamedTuple):
    """Where head g = b * H + h's chunk n of a per-step array is, for one feature width D."""

    heads: int
    width: int  # D as the kernel reads it (K padded to whole lane tiles, V as given)

    def block(self, chunk: int, num_chunks: int, reverse: bool = False) -> pl.BlockSpec:
        """The BlockSpec of chunk n of head g on the grid (g, n); ``reverse`` walks chunks from the last."""
        if reverse:
            return pl.BlockSpec((None, chunk, self.width), lambda g, n: (g, num_chunks - 1 - n, 0))
        return pl.BlockSpec((None, chunk, self.width), lambda g, n: (g, n, 0))

    def array_shape(self, batch: int, padded_length: int) -> tuple[int, int, int]:
        """The shape of the kernel's view of a ``[B, T, H, D]`` array: ``[B * H, T, D]``."""
        return batch * self.heads, padded_length, self.width

    def to_kernel(self, x: Array, chunk: int) -> Array:
        """``[B, T, H, D] -> [B * H, T, D]``: T zero-padded to whole chunks, D to ``width``."""
        x = _pad(_pad(x, 1, -(-x.shape[1] // chunk) * chunk), 3, self.width)
        batch, length, heads, width = x.shape
        return jnp.swapaxes(x, 1, 2).reshape(batch * heads, length, width)

    def from_kernel(self, y: Array, batch: int, length: int, width: int) -> Array:
        """``[B * H, T, D] -> [B, T, H, D]``, the padding of T and D sliced off."""
        y = jnp.swapaxes(y.reshape(batch, self.heads, y.shape[1], self.width), 1, 2)
        return y[:, :length, :, :width]


def key_layout(heads: int, key_dim: int) -> Layout:
    """q and k (and their gradients): K padded to whole lane tiles."""
    return Layout(heads, padded_key_dim(key_dim))


def value_layout(heads: int, value_dim: int) -> Layout:
    """v, the outputs, the writes and their gradients: V as it is (64 is the whole lane axis of a block).

    Example:
        >>> value_layout(8, 64).width, key_layout(8, 200).width
        (64, 256)
    """
    return Layout(heads, value_dim)
