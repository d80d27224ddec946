"""Parameters between the linen modules and their NNX twins, written once for every module.

Each NNX module lays out its parameters as its linen twin does, name for name (a linen
submodule's name is the NNX attribute's: ``qkv``, ``out``, ``attention``, ``attention_0``,
``ff_0``/``up``, ``norm_out``, ...; a kernel or bias has the same shape and axis order), so the
mapping is the identity on the parameter tree. These two functions are that mapping, with the
checks that make a mismatch an error rather than a silently wrong model.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import dpfp_jax as dj
    >>> from dpfp_jax import nnx as djnnx
    >>> x = jnp.ones((1, 4, 16))
    >>> params = dj.DPFPAttention(16, num_heads=2, head_dim=8).init(jax.random.key(0), x)["params"]
    >>> twin = djnnx.DPFPAttention(16, num_heads=2, head_dim=8, rngs=nnx.Rngs(1))
    >>> djnnx.from_linen_params(twin, params)
    >>> bool(jnp.all(djnnx.to_linen_params(twin)["attention"]["qkv"]["kernel"] == params["attention"]["qkv"]["kernel"]))
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx, traverse_util


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree))


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def to_linen_params(module: nnx.Module) -> dict[str, Any]:
    """The NNX module's parameters as its linen twin's ``params`` collection (nested dicts of arrays):
    ``twin.apply({"params": to_linen_params(module)}, x)`` computes what ``module(x)`` does."""
    flat = _flat(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    return traverse_util.unflatten_dict({tuple(str(p) for p in path): value for path, value in flat.items()})


def from_linen_params(module: nnx.Module, params: Mapping[str, Any]) -> None:
    """Set the NNX module's parameters, in place, to a linen twin's ``params`` collection.

    Every parameter must be given, with its shape, and nothing else: a missing, unexpected or
    misshapen entry is a ValueError naming its path. A parameter that is a sharded array keeps
    its sharding (the value is placed like the one it replaces).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a linen params collection (a mapping); got {type(params).__name__}")
    state = nnx.state(module, nnx.Param)
    have = _flat(nnx.to_pure_dict(state))
    have = {tuple(str(p) for p in path): (path, value) for path, value in have.items()}
    given = _flat(params)
    missing = sorted(_name(p) for p in have.keys() - given.keys())
    unexpected = sorted(_name(p) for p in given.keys() - have.keys())
    if missing or unexpected:
        hint = ("; pass variables['params'], not the whole variables dict"
                if any(p[0] == "params" for p in given) else "")
        raise ValueError(f"params do not match {type(module).__name__}'s parameters: missing {missing}, "
                         f"unexpected {unexpected}{hint}")
    values = {}
    for key, (path, old) in have.items():
        new = given[key]
        if getattr(new, "shape", None) != old.shape:
            raise ValueError(f"params {_name(key)} must have shape {old.shape}; got "
                             f"{getattr(new, 'shape', type(new).__name__)}")
        sharding = getattr(old, "sharding", None)
        if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer) and sharding is not None:
            new = jax.device_put(new, sharding)
        values[path] = new
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    nnx.update(module, state)
