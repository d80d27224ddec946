"""The DPFP cell: one time step of the paper's fast-weight layer, written as matrix-vector products."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfp_jax.core.cell import cell_memory, cell_memory_shape, check_cell_step, dpfp_cell_step

Array = jax.Array


class DPFPCell(nn.Module):
    """One step of a single-head DPFP delta-rule fast-weight memory (the paper's Eq. 23-25).

    ``k, v, q, beta`` come from one Dense of ``x_t``; ``phi = sum_norm(dpfp(., nu))``;
    ``v_bar = W^T phi(k)``; ``W <- W + beta phi(k) (v - v_bar)^T``; ``y = out(W^T phi(q) / sqrt(d))``.
    The original package's cell multiplied elementwise where W must be applied; here it is applied.
    The parameters are laid out as :class:`FastWeightAttention` with one head, so a cell looped
    over time equals that layer with the same variables.

    The cell takes one step and its memory comes in and goes out with every call, so it has no
    ``segment_ids``: the caller starts a new document by passing ``memory=None`` (or zeros) at its
    first step, which is all a segment id would do to a single step.

    Attributes:
      dim: input and output width.
      nu: DPFP's nu.
      head_dim: width d of q, k, v (default: ``dim``); W is ``[B, 2 * nu * d, d]``.
      use_bias, dtype, param_dtype, precision, kernel_init: as in Flax's Dense.
      eps: sum normalisation's epsilon.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cell = DPFPCell(128, nu=1)
        >>> x = jax.random.normal(jax.random.key(0), (1, 128))
        >>> W = jnp.zeros(cell.get_memory_shape(1))
        >>> variables = cell.init(jax.random.key(1), x, W)
        >>> y, W = cell.apply(variables, x, W)
        >>> y.shape, W.shape
        ((1, 128), (1, 256, 128))
    """

    dim: int
    nu: int = 1
    head_dim: int | None = None
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    eps: float = 1e-6

    @property
    def _head_dim(self) -> int:
        return self.dim if self.head_dim is None else self.head_dim

    def get_memory_shape(self, batch: int) -> tuple[int, int, int]:
        """``(batch, 2 * nu * head_dim, head_dim)``."""
        return cell_memory_shape(self.dim, self.nu, self._head_dim, batch)

    @nn.compact
    def __call__(self, x: Array, memory: Array | None = None) -> tuple[Array, Array]:
        memory = cell_memory(memory, self.get_memory_shape(check_cell_step(x, self.dim)))
        d = self._head_dim
        dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     precision=self.precision, kernel_init=self.kernel_init)
        projection = nn.DenseGeneral(features=(1, 3 * d + 1), name="qkv", **dense)(x)[:, 0]
        out, w = dpfp_cell_step(projection, memory, head_dim=d, nu=self.nu, eps=self.eps)
        y = nn.DenseGeneral(features=self.dim, axis=(-2, -1), name="out", **dense)(
            out[:, None].astype(projection.dtype)
        )
        return y, w
