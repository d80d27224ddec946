"""Sharding annotations of the NNX modules' parameters (``nnx.with_partitioning``).

Every parameter axis plays one of three roles: ``embed`` (the model width D: inputs and outputs),
``heads`` (the attention heads H) or ``mlp`` (the feed-forward's hidden width); the others
(a head's q/k/v/beta columns, its value width) are never split. :class:`KernelAxes` names the
mesh axis, or the logical axis name, each role is sharded over.

Example:
    >>> axes = KernelAxes(embed=None, heads="model", mlp="model")
    >>> axes.spec("embed", "heads", None)
    (None, 'model', None)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Initializer = Callable[..., Any]

QKV_KERNEL = ("embed", "heads", None)
"""``[D, H, 3 d (+ 1)]``: the q/k/v/beta projection."""
QKV_BIAS = ("heads", None)
OUT_KERNEL = ("heads", None, "embed")
"""``[H, d, D_out]``: the output projection."""
EMBED = ("embed",)
"""A bias or LayerNorm scale over the model width."""
UP_KERNEL = ("embed", "mlp")
UP_BIAS = ("mlp",)
DOWN_KERNEL = ("mlp", "embed")


@dataclasses.dataclass(frozen=True)
class KernelAxes:
    """The axis each parameter role is sharded over: a mesh axis name, a logical name that flax's
    logical axis rules map to one, or None (replicated).

    ``KernelAxes()`` annotates with the logical names ``"embed"``, ``"heads"`` and ``"mlp"``; name
    the mesh axes so, or map them with ``flax.linen.logical_axis_rules`` (e.g. ``[("embed", None),
    ("heads", "model"), ("mlp", "model")]``). ``KernelAxes(embed=None, heads="model", mlp="model")``
    names mesh axes directly: heads split over ``"model"`` (each device holds whole heads, so the
    fast-weight memory splits with them), the feed-forward's hidden width too.

    Attributes:
      embed: the model width D (inputs, outputs, LayerNorms).
      heads: the attention heads H.
      mlp: the feed-forward's hidden width.
    """

    embed: str | None = "embed"
    heads: str | None = "heads"
    mlp: str | None = "mlp"

    def spec(self, *roles: str | None) -> tuple[str | None, ...]:
        """One axis name (or None) per parameter axis, given the axes' roles (None: not split)."""
        return tuple(None if role is None else getattr(self, role) for role in roles)


def partitioned(initializer: Initializer, kernel_axes: KernelAxes | None, roles: tuple[str | None, ...]) -> Initializer:
    """``initializer`` annotated with ``nnx.with_partitioning`` for the roles' axes; unchanged for
    ``kernel_axes=None`` (no annotation, so the module is made without a mesh as well).

    Flax creates an annotated parameter sharded (eager sharding, flax's default), which needs a
    mesh (``jax.set_mesh``) whose axes the names resolve to.
    """
    if kernel_axes is None:
        return initializer
    return nnx.with_partitioning(initializer, kernel_axes.spec(*roles))


def reduced_sharding(x: jax.Array, kernel: jax.Array, contracted: int) -> NamedSharding | None:
    """The output sharding of ``x @ kernel`` over x's last ``contracted`` axes (kernel's first),
    where an explicit mesh needs one; None elsewhere.

    Under explicit sharding, a contraction over axes that are sharded (the heads of the output
    projection, the hidden width of the feed-forward's second layer) is refused unless the output
    sharding is given: x's other axes keep theirs and the features take the kernel's (the sum over
    devices is then XLA's all-reduce), as automatic sharding would choose.
    """
    x_sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(x_sharding, "mesh", None)
    if mesh is None or mesh.empty or not all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return None
    x_spec = tuple(x_sharding.spec) + (None,) * (x.ndim - len(x_sharding.spec))
    k_sharding = getattr(jax.typeof(kernel), "sharding", None)
    k_spec = tuple(getattr(k_sharding, "spec", ())) + (None,) * kernel.ndim
    if all(axis is None for axis in x_spec[x.ndim - contracted:]):
        return None
    kept = x_spec[: x.ndim - contracted]
    used = {a for axis in kept if axis is not None for a in (axis if isinstance(axis, tuple) else (axis,))}
    features = tuple(None if axis is not None and set(axis if isinstance(axis, tuple) else (axis,)) & used else axis
                     for axis in k_spec[contracted : kernel.ndim])
    return NamedSharding(mesh, PartitionSpec(*kept, *features))


def project(layer: nnx.LinearGeneral | nnx.Linear, x: jax.Array, contracted: int = 1) -> jax.Array:
    """``layer(x)``, with the output sharding an explicit mesh needs (:func:`reduced_sharding`)."""
    sharding = reduced_sharding(x, layer.kernel[...], contracted)
    return layer(x) if sharding is None else layer(x, out_sharding=sharding)
