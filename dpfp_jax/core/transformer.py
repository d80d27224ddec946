"""The DPFPformer's settings and per-layer memories, shared by the linen and NNX stacks.

Example:
    >>> layer_memories(None, 3)
    [None, None, None]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
