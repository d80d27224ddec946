"""The DPFP cell (Flax NNX): one time step of the paper's fast-weight layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpfp_jax.core.cell import cell_memory, cell_memory_shape, check_cell_step, dpfp_cell_step
from dpfp_jax.nnx.attention import DEFAULT_KERNEL_INIT
from dpfp_jax.nnx.partitioning import OUT_KERNEL, QKV_KERNEL, KernelAxes, partitioned

Array = jax.Array


class DPFPCell(nnx.Module):
    """One step of a single-head DPFP delta-rule fast-weight memory (Flax NNX).

    The twin of linen's :class:`dpfp_jax.nn.DPFPCell` (same attributes, math and parameters),
    plus ``kernel_axes`` (the head axis of its one head is never split) and ``rngs``. Like the
    linen cell it has no ``segment_ids``: pass ``memory=None`` at a document's first step.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> cell = DPFPCell(128, nu=1, rngs=nnx.Rngs(0))
        >>> y, W = cell(jax.random.normal(jax.random.key(0), (1, 128)), jnp.zeros(cell.get_memory_shape(1)))
        >>> y.shape, W.shape
        ((1, 128), (1, 256, 128))
    """

    def __init__(
        self,
        dim: int,
        nu: int = 1,
        head_dim: int | None = None,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = DEFAULT_KERNEL_INIT,
        eps: float = 1e-6,
        *,
        kernel_axes: KernelAxes | None = None,
        rngs: nnx.Rngs,
    ):
        self.dim, self.nu, self.head_dim, self.eps = dim, nu, head_dim, eps
        d = self._head_dim
        cell_memory_shape(dim, nu, d, 1)  # checks dim, nu, head_dim
        one_head = KernelAxes(embed=kernel_axes.embed, heads=None) if kernel_axes is not None else None
        dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.qkv = nnx.LinearGeneral(dim, (1, 3 * d + 1), **dense,
                                     kernel_init=partitioned(kernel_init, one_head, QKV_KERNEL))
        self.out = nnx.LinearGeneral((1, d), dim, axis=(-2, -1), **dense,
                                     kernel_init=partitioned(kernel_init, one_head, OUT_KERNEL))

    @property
    def _head_dim(self) -> int:
        return self.dim if self.head_dim is None else self.head_dim

    def get_memory_shape(self, batch: int) -> tuple[int, int, int]:
        """``(batch, 2 * nu * head_dim, head_dim)``."""
        return cell_memory_shape(self.dim, self.nu, self._head_dim, batch)

    def __call__(self, x: Array, memory: Array | None = None) -> tuple[Array, Array]:
        memory = cell_memory(memory, self.get_memory_shape(check_cell_step(x, self.dim)))
        projection = self.qkv(x)[:, 0]
        out, w = dpfp_cell_step(projection, memory, head_dim=self._head_dim, nu=self.nu, eps=self.eps)
        return self.out(out[:, None].astype(projection.dtype)), w
