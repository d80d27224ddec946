"""The DPFPformer's settings and per-layer memories, shared by the linen and NNX stacks.

Example:
    >>> layer_memories(None, 3)
    [None, None, None]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from dpfp_jax.core.attention import Memory
from dpfp_jax.validation import check_dropout_rate, check_positive_int


def check_transformer(dim: int, depth: int, attention_dropout_rate: float, ff_dropout_rate: float) -> None:
    """ValueError/TypeError naming the attribute for a width, depth or dropout rate out of range."""
    check_positive_int("dim", dim)
    check_positive_int("depth", depth)
    check_dropout_rate("attention_dropout_rate", attention_dropout_rate)
    check_dropout_rate("ff_dropout_rate", ff_dropout_rate)


def check_model_input(x, dim: int) -> None:
    """x must be ``[B, T, dim]``."""
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be [batch, time, dim={dim}]; got shape {x.shape}")


def layer_memories(memory: Sequence[Memory | None] | None, depth: int) -> list[Memory | None]:
    """One memory (or None) per layer; a ValueError for a sequence of another length."""
    if memory is None:
        return [None] * depth
    if len(memory) != depth:
        raise ValueError(f"memory must hold one entry per layer ({depth}); got {len(memory)}")
    return list(memory)


def layer_settings(settings: dict[str, Any], index: int) -> dict[str, Any]:
    """The fast-weight settings of the stack's layer ``index``: the stack's, with the FAVOR+ seed
    ``favor_seed + index`` so that layers draw independent projections.

    Example:
        >>> layer_settings({"favor_seed": 10, "nu": 2}, 3)
        {'favor_seed': 13, 'nu': 2}
    """
    return {**settings, "favor_seed": settings["favor_seed"] + index}


def residual_block(x, memory: Memory | None, attention, ff, norm_attention, norm_ff, *, pre_norm: bool, mask,
                   segment_ids, deterministic) -> tuple[Any, Memory]:
    """One DPFPformer block on ``x [B, T, D]``: attention then feed-forward, each residual, with a
    LayerNorm before each sub-layer (``pre_norm``) or after each residual sum. The sub-layers are
    callables (linen or NNX modules); returns ``(x, the attention's new memory)``."""
    options = dict(mask=mask, segment_ids=segment_ids, deterministic=deterministic)
    if pre_norm:
        h, memory = attention(norm_attention(x), memory, **options)
        x = x + h
        return x + ff(norm_ff(x), deterministic=deterministic), memory
    h, memory = attention(x, memory, **options)
    x = norm_attention(x + h)
    return norm_ff(x + ff(x, deterministic=deterministic)), memory


LAYER_PARTS = ("attention", "ff", "norm_attention", "norm_ff")


def check_scan_layers(settings: dict[str, Any]) -> None:
    """``scan_layers=True`` runs one layer function over parameters stacked per layer, so every layer
    must have the same function: FAVOR+ draws layer i's projection from ``favor_seed + i`` (a
    constant, not a parameter), which a scan cannot vary."""
    if settings["feature_map"] == "favor":
        raise ValueError(
            "scan_layers=True runs one layer function over stacked parameters, but feature_map='favor' gives "
            "each layer its own constant projection (favor_seed + i); use scan_layers=False with FAVOR+"
        )


def stack_layer_params(params: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """An unscanned stack's parameters (``attention_{i}``, ``ff_{i}``, ``norm_attention_{i}``,
    ``norm_ff_{i}``) as the scanned stack's (``blocks/{part}`` with a leading axis of ``depth``);
    the other entries (``norm_out``) are kept as they are.

    Example:
        >>> import numpy as np
        >>> params = {f"{part}_{i}": {"w": np.full(2, i)} for part in LAYER_PARTS for i in range(3)}
        >>> stacked = stack_layer_params(params, 3)
        >>> stacked["blocks"]["ff"]["w"].tolist()
        [[0, 0], [1, 1], [2, 2]]
        >>> unstack_layer_params(stacked, 3)["ff_2"]["w"].tolist()
        [2, 2]
    """
    layers = {part: jax.tree.map(lambda *leaves: jnp.stack(leaves), *(params[f"{part}_{i}"] for i in range(depth)))
              for part in LAYER_PARTS}
    rest = {name: value for name, value in params.items()
            if not any(name == f"{part}_{i}" for part in LAYER_PARTS for i in range(depth))}
    return {**rest, "blocks": layers}


def unstack_layer_params(params: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """The inverse of :func:`stack_layer_params`: the scanned stack's parameters as the unscanned one's."""
    rest = {name: value for name, value in params.items() if name != "blocks"}
    return rest | {f"{part}_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], params["blocks"][part])
                   for part in LAYER_PARTS for i in range(depth)}


def stack_memories(memory: Sequence[Memory | None]) -> Memory | None:
    """Per-layer memories (from :func:`layer_memories`) stacked on a leading layer axis for a scan:
    None if every one is None; otherwise a None becomes zeros (an empty memory, the same start)."""
    given = [m for m in memory if m is not None]
    if not given:
        return None
    shapes = {tuple(leaf.shape for leaf in jax.tree.leaves(m)) for m in given}
    if len(shapes) > 1:
        raise ValueError(f"with scan_layers=True every layer's memory must have the same shape; got {sorted(shapes)}")
    zeros = jax.tree.map(jnp.zeros_like, given[0])
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *(zeros if m is None else m for m in memory))


def unstack_memories(stacked: Memory, depth: int) -> tuple[Memory, ...]:
    """The scan's stacked memories as one per layer."""
    return tuple(jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(depth))
