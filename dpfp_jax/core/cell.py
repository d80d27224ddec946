"""One step of the DPFP cell (the paper's Eq. 23-25), shared by the linen and NNX cells.

Example:
    >>> import jax.numpy as jnp
    >>> out, w = dpfp_cell_step(jnp.ones((2, 13)), jnp.zeros((2, 8, 4)), head_dim=4, nu=1)
    >>> out.shape, w.shape
    ((2, 4), (2, 8, 4))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpfp_jax.core.attention import split_heads_projection
from dpfp_jax.feature_maps import dpfp, sum_norm
from dpfp_jax.validation import check_positive_int

Array = jax.Array


def cell_memory_shape(dim: int, nu: int, head_dim: int, batch: int) -> tuple[int, int, int]:
    """``(batch, 2 * nu * head_dim, head_dim)``, the settings checked."""
    check_positive_int("dim", dim)
    check_positive_int("nu", nu)
    check_positive_int("head_dim", head_dim)
    return (batch, 2 * nu * head_dim, head_dim)


def check_cell_step(x: Array, dim: int) -> int:
    """The batch size of one step ``x [B, dim]``; a ValueError for any other shape."""
    if x.ndim != 2 or x.shape[-1] != dim:
        raise ValueError(f"x must be one time step [batch, dim={dim}]; got shape {x.shape}")
    return x.shape[0]


def cell_memory(memory: Array | None, shape: tuple[int, int, int]) -> Array:
    """The carried W (zeros for None), its shape checked."""
    if memory is None:
        return jnp.zeros(shape, jnp.float32)
    if memory.shape != shape:
        raise ValueError(f"memory must be [B, 2*nu*head_dim, head_dim] = {shape}; got {memory.shape}")
    return memory


def dpfp_cell_step(
    projection: Array, memory: Array, *, head_dim: int, nu: int, eps: float = 1e-6
) -> tuple[Array, Array]:
    """From one step's projection ``[B, 3 d + 1]`` (q, k, v, beta logit) and W ``[B, 2 nu d, d]``
    to the read ``[B, d]`` (before the output projection) and the new W (float32).

    ``phi = sum_norm(dpfp(., nu))``; ``v_bar = W^T phi(k)``; ``W <- W + beta phi(k) (v - v_bar)^T``;
    the read is ``W^T phi(q) / sqrt(d)``.
    """
    q, k, v, beta = split_heads_projection(projection, head_dim, with_beta=True)
    phi_q, phi_k = (sum_norm(dpfp(t, nu), eps).astype(jnp.float32) for t in (q, k))
    w = memory.astype(jnp.float32)
    v_bar = jnp.einsum("bkv,bk->bv", w, phi_k)  # what phi(k) currently recalls
    w = w + jnp.einsum("bk,bv->bkv", phi_k, beta[:, None] * (v.astype(jnp.float32) - v_bar))
    return jnp.einsum("bkv,bk->bv", w, phi_q) / math.sqrt(head_dim), w
