"""Small helpers shared by the fast-weight implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


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


def zero_state(q: Array, v: Array, dtype: jnp.dtype) -> Array:
    """Zeros ``[B, H, K, V]`` carrying the batch/head sharding of q and v; also for T = 0."""
    return zeros_without_time(q[..., None], dtype) + zeros_without_time(v[..., None, :], dtype)


def batch_axis_of(x: Array) -> tuple[object, str | tuple | None]:
    """The (abstract) mesh and the mesh axis that x's batch dimension is sharded over, if any."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not sharding.spec:
        return None, None
    return mesh, sharding.spec[0]


def with_batch_sharding_of(x: Array, like: Array) -> Array:
    """x with its leading (batch) axis sharded as ``like``'s, under an explicit-sharding mesh.

    A carried state (``initial_state``, a decode cache) is often replicated, e.g. made by
    ``init`` and put on the mesh with the parameters, while the inputs are batch-sharded; explicit
    sharding then refuses to contract the two. The state's other axes keep their sharding. Under
    automatic sharding, or when the batch axes already agree, x comes back unchanged.
    """
    mesh, axis = batch_axis_of(like)
    if axis is None or not all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return x
    spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    if spec[0] == axis:
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(axis, *spec[1:x.ndim]))
