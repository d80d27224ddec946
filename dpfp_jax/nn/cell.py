"""The DPFP cell: one time step of the paper's fast-weight layer, written as matrix-vector products."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfp_jax.feature_maps import dpfp, sum_norm
from dpfp_jax.nn.attention import split_heads_projection
from dpfp_jax.validation import check_positive_int

Array = jax.Array


class DPFPCell(nn.Module):
    """One step of a single-head DPFP delta-rule fast-weight memory (the paper's Eq. 23-25).

    ``k, v, q, beta`` come from one Dense of ``x_t``; ``phi = sum_norm(dpfp(., nu))``;
    ``v_bar = W^T phi(k)``; ``W <- W + beta phi(k) (v - v_bar)^T``; ``y = out(W^T phi(q) / sqrt(d))``.
    The original package's cell multiplied elementwise where W must be applied; here it is applied.
    The parameters are laid out as :class:`FastWeightAttention` with one head, so a cell looped
    over time equals that layer with the same variables.

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
        check_positive_int("dim", self.dim)
        check_positive_int("nu", self.nu)
        check_positive_int("head_dim", self._head_dim)
        return (batch, 2 * self.nu * self._head_dim, self._head_dim)

    @nn.compact
    def __call__(self, x: Array, memory: Array | None = None) -> tuple[Array, Array]:
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be one time step [batch, dim={self.dim}]; got shape {x.shape}")
        shape = self.get_memory_shape(x.shape[0])
        if memory is None:
            memory = jnp.zeros(shape, jnp.float32)
        elif memory.shape != shape:
            raise ValueError(f"memory must be [B, 2*nu*head_dim, head_dim] = {shape}; got {memory.shape}")
        d = self._head_dim
        dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     precision=self.precision, kernel_init=self.kernel_init)
        projection = nn.DenseGeneral(features=(1, 3 * d + 1), name="qkv", **dense)(x)[:, 0]
        q, k, v, beta = split_heads_projection(projection, d, with_beta=True)
        phi_q, phi_k = (sum_norm(dpfp(t, self.nu), self.eps).astype(jnp.float32) for t in (q, k))
        w = memory.astype(jnp.float32)
        v_bar = jnp.einsum("bkv,bk->bv", w, phi_k)  # what phi(k) currently recalls
        w = w + jnp.einsum("bk,bv->bkv", phi_k, beta[:, None] * (v.astype(jnp.float32) - v_bar))
        out = jnp.einsum("bkv,bk->bv", w, phi_q) / math.sqrt(d)
        y = nn.DenseGeneral(features=self.dim, axis=(-2, -1), name="out", **dense)(
            out[:, None].astype(projection.dtype)
        )
        return y, w
