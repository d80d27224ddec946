"""``custom_vjp`` plumbing that the kernels and the library's XLA paths share.

Backend-neutral and free of any kernel: it lives in the kernels' package, the lower layer, so that
both the kernels' custom gradients and ``dpfp_jax``'s take it from one place without the kernels
importing the library.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

Array = jax.Array


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
