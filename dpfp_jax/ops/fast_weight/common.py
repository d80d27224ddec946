"""Small helpers shared by the fast-weight implementations."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

Array = jax.Array


def accumulation_dtype(*xs: Array | None) -> jnp.dtype:
    """float32, or float64 when an input is float64: bfloat16/float16 inputs never hold the state."""
    return jnp.promote_types(jnp.result_type(*(x for x in xs if x is not None)), jnp.float32)


def float32_or_wider(*xs: Array) -> bool:
    """Whether an input is float32 or wider: the Pallas kernels' tensor-core dots then take three
    TF32 passes instead of one (``pallas_kernels.common.PRECISE_DOT``)."""
    return any(jnp.finfo(x.dtype).bits >= 32 for x in xs)


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


def zero_state(q: Array, v: Array, dtype: jnp.dtype) -> Array:
    """Zeros ``[B, H, K, V]`` carrying the batch/head sharding of q and v."""
    return zeros_like_sharded(q[:, 0, :, :, None], dtype) + zeros_like_sharded(v[:, 0, :, None, :], dtype)


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


def primal_values(*primals: Any) -> list[Any]:
    """The arrays inside a ``custom_vjp`` forward rule's ``CustomVJPPrimal`` arguments (None stays None).

    Rules registered with ``symbolic_zeros=True`` (see :func:`cotangent_array`) get their
    differentiable arguments wrapped.
    """
    return [jax.tree.map(lambda p: p.value, x, is_leaf=lambda p: isinstance(p, CustomVJPPrimal)) for x in primals]


def cotangent_array(ct: Array | SymbolicZero) -> Array:
    """A ``custom_vjp`` backward rule's incoming cotangent as an array with its primal output's sharding.

    An output the loss does not use (the final state when the loss reads only the outputs, or
    the reverse) gets a zero cotangent. jax 0.12 makes those zeros itself outside the jitted
    function's mesh context, which loses the sharding: a replicated zero met batch-sharded
    residuals in the first contraction (a ShardingTypeError on explicit meshes). Rules registered
    with ``symbolic_zeros=True`` receive the zero as a ``SymbolicZero`` whose type still names the
    primal's sharding, and this makes the array under that mesh. Non-zero cotangents already
    carry the primal's type and come back unchanged.
    """
    if not isinstance(ct, SymbolicZero):
        return ct
    aval = ct.aval
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return jnp.zeros(aval.shape, aval.dtype)
    with jax.sharding.use_abstract_mesh(mesh):
        return jnp.zeros(aval.shape, aval.dtype, out_sharding=sharding)
