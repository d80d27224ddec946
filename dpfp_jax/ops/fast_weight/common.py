"""Small helpers shared by the fast-weight implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

HIGHEST = lax.Precision.HIGHEST
"""The precision of every XLA matmul of the op: float32 products in full, not TF32 or bfloat16 passes."""


def accumulation_dtype(*xs: Array | None) -> jnp.dtype:
    """float32, or float64 when an input is float64: bfloat16/float16 inputs never hold the state."""
    return jnp.promote_types(jnp.result_type(*(x for x in xs if x is not None)), jnp.float32)


def to_time_major(x: Array | None, dtype: jnp.dtype) -> Array | None:
    """``[B, T, ...] -> [T, B, ...]`` in ``dtype``; ``lax.scan`` walks the leading axis."""
    return None if x is None else jnp.swapaxes(x, 0, 1).astype(dtype)


def zeros_like_sharded(x: Array, dtype: jnp.dtype) -> Array:
    """Zeros of x's shape that keep x's sharding type.

    ``jnp.zeros_like`` drops the sharding under an explicit-sharding mesh (jax's default for
    ``jax.make_mesh``), and contracting replicated zeros with batch-sharded keys is then a
    sharding type error. A select keeps it, and unlike ``x * 0`` never turns inf or NaN into NaN.
    """
    return jnp.where(False, x, jnp.zeros((), dtype)).astype(dtype)


def zeros_without_time(x: Array, dtype: jnp.dtype) -> Array:
    """Zeros of x's shape less its time axis (axis 1), carrying the sharding of the other axes.

    A sum over an empty slice of time rather than ``x[:, 0]``: it needs no step to exist (T = 0)
    and reads nothing.
    """
    return jnp.sum(x[:, :0], axis=1, dtype=dtype)


def zero_state(q: Array, v: Array, dtype: jnp.dtype, key_dim: int | None = None) -> Array:
    """Zeros ``[B, H, K, V]`` carrying the batch/head sharding of q and v; also for T = 0. K is q's
    width, or ``key_dim`` when given (raw queries, feature-mapped inside the op)."""
    keys = (zeros_without_time(q[..., None], dtype) if key_dim is None
            else zeros_without_time(q[..., :1, None], dtype) + jnp.zeros((key_dim, 1), dtype))
    return keys + zeros_without_time(v[..., None, :], dtype)


def batch_head_axes_of(x: Array) -> tuple[object, str | tuple | None, str | tuple | None]:
    """The (abstract) mesh and the mesh axes that the batch and head dimensions of a ``[B, T, H, ...]``
    input are sharded over (None where not sharded or without a mesh)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None, None, None
    spec = tuple(sharding.spec) + (None,) * x.ndim
    return mesh, spec[0], spec[2]


def with_batch_head_sharding_of(x: Array, like: Array) -> Array:
    """A carried ``[B, H, ...]`` x with its batch and head axes sharded as those of ``like`` ``[B, T, H, ...]``.

    A carried state (``initial_state [B, H, K, V]``, a decode cache's key sum ``[B, H, K]``) is
    often replicated, e.g. made by ``init`` and put on the mesh with the parameters, while the
    inputs are sharded over batch, heads or both; explicit sharding then refuses to contract the
    two. x's other axes keep their sharding. Under automatic sharding, or when the axes already
    agree, x comes back unchanged.
    """
    mesh, batch_axis, head_axis = batch_head_axes_of(like)
    if mesh is None or not all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return x
    spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    if spec[:2] == (batch_axis, head_axis):
        return x
    # A NamedSharding on like's mesh, not a bare spec: no mesh context (jax.set_mesh) is needed.
    spec = jax.sharding.PartitionSpec(batch_axis, head_axis, *spec[2:x.ndim])
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
