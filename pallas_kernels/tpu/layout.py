"""How the TPU kernel's per-step arrays sit in HBM and in its blocks: TPU tiles are 128 lanes wide.

A Mosaic block's last two dims must be multiples of the tile (8 sublanes for float32, 16 for
bfloat16, by 128 lanes) or equal the whole array's. The kernel reads one head's chunk of C steps
per grid step, so its blocks are ``[C, D]`` with the feature axis D on the lanes. Two layouts:

- in place: when D is a multiple of 128, ``[B, T, H, D]`` is viewed as ``[B, T, H * D]`` (a free
  reshape) and head h's block is lane block h: no copy of q and k, the largest inputs.
- head-major: otherwise ``[B, T, H, D]`` is transposed to ``[B * H, T, D]`` and the block takes
  the whole (short) lane axis. This is what V = 64 gets: zero-padding V to 128 instead would
  double the HBM bytes of v, the outputs, the stored writes and their gradients, and the
  kernel's state; the transpose is one pass over v-sized arrays in XLA. In VMEM Mosaic pads the
  64 lanes to 128 either way.

Keys whose K is not a multiple of 128 are zero-padded to the next one (then read in place):
zero key columns are inert (they add nothing to ``Q K^T``, ``K W`` or ``K^T u``, and the
state's padded rows stay zero), the padding is one copy of q and k, and the MXU works on
128-wide operands anyway.
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
    in_place: bool  # [B, T, H * D] lane block h, else head-major [B * H, T, D]

    def block(self, chunk: int, num_chunks: int, reverse: bool = False) -> pl.BlockSpec:
        """The BlockSpec of chunk n of head g on the grid (g, n); ``reverse`` walks chunks from the last."""
        heads = self.heads

        def chunk_of(n):
            return num_chunks - 1 - n if reverse else n

        if self.in_place:
            return pl.BlockSpec((None, chunk, self.width), lambda g, n: (g // heads, chunk_of(n), g % heads))
        return pl.BlockSpec((None, chunk, self.width), lambda g, n: (g, chunk_of(n), 0))

    def array_shape(self, batch: int, padded_length: int) -> tuple[int, int, int]:
        """The shape of the kernel's view of a ``[B, T, H, D]`` array."""
        if self.in_place:
            return batch, padded_length, self.heads * self.width
        return batch * self.heads, padded_length, self.width

    def to_kernel(self, x: Array, chunk: int) -> Array:
        """``[B, T, H, D] -> `` this layout: T zero-padded to whole chunks, D to ``width``."""
        x = _pad(_pad(x, 1, -(-x.shape[1] // chunk) * chunk), 3, self.width)
        batch, length, heads, width = x.shape
        if self.in_place:
            return x.reshape(batch, length, heads * width)
        return jnp.swapaxes(x, 1, 2).reshape(batch * heads, length, width)

    def from_kernel(self, y: Array, batch: int, length: int, width: int) -> Array:
        """This layout ``-> [B, T, H, D]``, the padding of T and D sliced off."""
        if self.in_place:
            y = y.reshape(batch, y.shape[1], self.heads, self.width)
        else:
            y = jnp.swapaxes(y.reshape(batch, self.heads, y.shape[1], self.width), 1, 2)
        return y[:, :length, :, :width]


def key_layout(heads: int, key_dim: int) -> Layout:
    """q and k (and their gradients): K padded to whole lane tiles, read in place."""
    return Layout(heads, padded_key_dim(key_dim), True)


def value_layout(heads: int, value_dim: int) -> Layout:
    """v, the outputs, the writes and their gradients: in place when V fills whole lane tiles, else head-major.

    Example:
        >>> value_layout(8, 64).in_place, value_layout(8, 128).in_place
        (False, True)
    """
    return Layout(heads, value_dim, value_dim % LANES == 0)

