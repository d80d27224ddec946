"""DPFPformer (Flax NNX): a stack of residual fast-weight attention and feed-forward blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpfp_jax.core.attention import Memory, zero_padding
from dpfp_jax.core.settings import FastWeightSettings
from dpfp_jax.core.transformer import (
    check_model_input,
    check_scan_layers,
    check_transformer,
    layer_memories,
    layer_settings,
    residual_block,
    stack_memories,
    unstack_memories,
)
from dpfp_jax.nnx.attention import DEFAULT_KERNEL_INIT, ZEROS, FastWeightAttention
from dpfp_jax.nnx.partitioning import DOWN_KERNEL, EMBED, UP_BIAS, UP_KERNEL, KernelAxes, partitioned, project
from dpfp_jax.ops.fast_weight.validation import check_segment_ids
from dpfp_jax.validation import check_dropout_rate, check_mask, check_positive_int

Array = jax.Array


class FeedForward(nnx.Module):
    """``Linear(ff_mult * D) -> activation -> dropout -> Linear(D) -> dropout`` (Flax NNX), the twin
    of linen's :class:`dpfp_jax.nn.FeedForward`; ``dim`` is D."""

    def __init__(
        self,
        dim: int,
        ff_mult: int = 4,
        activation: Callable[[Array], Array] = nnx.relu,
        dropout_rate: float = 0.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = DEFAULT_KERNEL_INIT,
        *,
        kernel_axes: KernelAxes | None = None,
        rngs: nnx.Rngs,
    ):
        check_positive_int("dim", dim)
        check_positive_int("ff_mult", ff_mult)
        check_dropout_rate("dropout_rate", dropout_rate)
        self.activation = activation
        dense = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.up = nnx.Linear(dim, ff_mult * dim, kernel_init=partitioned(kernel_init, kernel_axes, UP_KERNEL),
                             bias_init=partitioned(ZEROS, kernel_axes, UP_BIAS), **dense)
        self.down = nnx.Linear(ff_mult * dim, dim, kernel_init=partitioned(kernel_init, kernel_axes, DOWN_KERNEL),
                               bias_init=partitioned(ZEROS, kernel_axes, EMBED), **dense)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: Array, *, deterministic: bool | None = None) -> Array:
        h = self.dropout(self.activation(project(self.up, x)), deterministic=deterministic)
        return self.dropout(project(self.down, h), deterministic=deterministic)


class DPFPformerBlock(nnx.Module):
    """One block of :class:`DPFPformer` with ``scan_layers=True`` (made under ``nnx.vmap``, run
    under ``nnx.scan``): ``attention``, ``ff``, ``norm_attention`` and ``norm_ff``, called as
    ``(x, memory, *, mask, segment_ids, deterministic) -> (x, new memory)``."""

    def __init__(self, dim: int, attention: dict[str, Any], ff: dict[str, Any], norm: dict[str, Any],
                 pre_norm: bool, *, rngs: nnx.Rngs):
        self.pre_norm = pre_norm
        self.attention = FastWeightAttention(**attention, rngs=rngs)
        self.ff = FeedForward(dim, **ff, rngs=rngs)
        self.norm_attention = nnx.LayerNorm(dim, **norm, rngs=rngs)
        self.norm_ff = nnx.LayerNorm(dim, **norm, rngs=rngs)

    def __call__(self, x: Array, memory: Memory | None, *, mask: Array | None, segment_ids: Array | None,
                 deterministic: bool | None) -> tuple[Array, Memory]:
        return residual_block(x, memory, self.attention, self.ff, self.norm_attention, self.norm_ff,
                              pre_norm=self.pre_norm, mask=mask, segment_ids=segment_ids, deterministic=deterministic)


class DPFPformer(nnx.Module):
    """A fast-weight transformer (Flax NNX): ``depth`` residual blocks of attention and feed-forward.

    The twin of linen's :class:`dpfp_jax.nn.DPFPformer`: the same attributes, math and parameter
    names (``attention_{i}``, ``ff_{i}``, ``norm_attention_{i}``, ``norm_ff_{i}``, ``norm_out``;
    every argument after ``head_dim`` keyword-only; the fast-weight settings as keyword arguments,
    :class:`dpfp_jax.core.settings.FastWeightSettings`, layer i's FAVOR+ seed ``favor_seed + i``),
    plus ``kernel_axes`` (passed to every layer; LayerNorms over ``embed``) and ``rngs``.
    ``scan_layers=True`` makes the blocks under ``nnx.vmap`` (one ``DPFPformerBlock``,
    ``blocks``, its variables stacked on a leading layer axis, each layer's keys split) and runs
    them under ``nnx.scan``, as linen's ``scan_layers`` (same parameter names); not with
    ``feature_map="favor"`` nor, here, with ``kernel_axes`` (the stacked parameters' sharding
    annotations would need a layer axis): both are ValueErrors.
    ``__call__(x, memory=None, *, mask=None, segment_ids=None, deterministic=None,
    return_memory=False)``; :meth:`init_cache` makes every layer's decode cache (``decode=True``).

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> model = DPFPformer(32, 2, num_heads=2, head_dim=16, rngs=nnx.Rngs(0))
        >>> y, memories = model(jax.random.normal(jax.random.key(0), (4, 16, 32)), return_memory=True)
        >>> y.shape, len(memories), memories[0].shape
        ((4, 16, 32), 2, (4, 2, 32, 16))
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int = 8,
        head_dim: int = 64,
        *,
        ff_mult: int = 4,
        attention_dropout_rate: float = 0.0,
        ff_dropout_rate: float = 0.0,
        pre_norm: bool = True,
        activation: Callable[[Array], Array] = nnx.relu,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = DEFAULT_KERNEL_INIT,
        decode: bool = False,
        kernel_axes: KernelAxes | None = None,
        scan_layers: bool = False,
        rngs: nnx.Rngs,
        **settings: Any,
    ):
        check_transformer(dim, depth, attention_dropout_rate, ff_dropout_rate)
        settings = FastWeightSettings.from_kwargs(type(self).__name__, settings).settings()
        self.dim, self.depth, self.pre_norm, self.scan_layers = dim, depth, pre_norm, scan_layers
        norm = dict(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                    scale_init=partitioned(nnx.initializers.ones_init(), kernel_axes, EMBED),
                    bias_init=partitioned(ZEROS, kernel_axes, EMBED))
        attention = dict(num_heads=num_heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype,
                         precision=precision, kernel_init=kernel_init, dropout_rate=attention_dropout_rate,
                         decode=decode, in_features=dim, kernel_axes=kernel_axes)
        ff = dict(ff_mult=ff_mult, activation=activation, dropout_rate=ff_dropout_rate, dtype=dtype,
                  param_dtype=param_dtype, precision=precision, kernel_init=kernel_init, kernel_axes=kernel_axes)
        if scan_layers:
            check_scan_layers(settings)
            if kernel_axes is not None:
                raise ValueError("scan_layers=True with kernel_axes is not supported in NNX (its stacked "
                                 "parameters would need a layer axis in their sharding); pass kernel_axes=None "
                                 "or use scan_layers=False")

            # Each layer's parameters and dropout stream drawn from its own split of the keys,
            # stacked on a leading layer axis.
            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=0, out_axes=0, axis_size=depth)
            def make_blocks(rngs: nnx.Rngs) -> DPFPformerBlock:
                return DPFPformerBlock(dim, {**attention, **settings}, ff, norm, pre_norm, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            for i in range(depth):
                setattr(self, f"attention_{i}", FastWeightAttention(**attention, **layer_settings(settings, i),
                                                                    rngs=rngs))
                setattr(self, f"ff_{i}", FeedForward(dim, **ff, rngs=rngs))
                setattr(self, f"norm_attention_{i}", nnx.LayerNorm(dim, **norm, rngs=rngs))
                setattr(self, f"norm_ff_{i}", nnx.LayerNorm(dim, **norm, rngs=rngs))
        self.norm_out = nnx.LayerNorm(dim, **norm, rngs=rngs) if pre_norm else None

    def layers(self) -> list[tuple[FastWeightAttention, FeedForward, nnx.LayerNorm, nnx.LayerNorm]]:
        """Per block: its attention, feed-forward and their two LayerNorms (``scan_layers=False``;
        with ``scan_layers=True`` they are one ``DPFPformerBlock``, ``blocks``, whose variables
        have a leading layer axis)."""
        if self.scan_layers:
            raise ValueError("scan_layers=True keeps the layers stacked in one block, `blocks`, whose variables "
                             "have a leading layer axis; layers() lists the unscanned stack's")
        return [(getattr(self, f"attention_{i}"), getattr(self, f"ff_{i}"), getattr(self, f"norm_attention_{i}"),
                 getattr(self, f"norm_ff_{i}")) for i in range(self.depth)]

    def init_cache(self, batch: int) -> None:
        """Make (or reset) every layer's decode cache for ``batch`` rows (``decode=True``)."""
        if self.scan_layers:
            @nnx.vmap(in_axes=(0, None), out_axes=None, axis_size=self.depth)
            def init_caches(block: DPFPformerBlock, batch: int) -> None:
                block.attention.init_cache(batch)

            init_caches(self.blocks, batch)
            return
        for attention, *_ in self.layers():
            attention.init_cache(batch)

    def __call__(
        self,
        x: Array,
        memory: Sequence[Memory | None] | None = None,
        *,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool | None = None,
        return_memory: bool = False,
    ) -> Array | tuple[Array, tuple[Memory, ...]]:
        check_model_input(x, self.dim)
        mask = check_mask(mask, *x.shape[:2])
        check_segment_ids(segment_ids, x)
        # The residual stream, LayerNorms and feed-forwards act on every position; a padded one
        # must not carry its value into them (0 * nan is nan in their gradients).
        x = zero_padding(x, mask)
        memory = layer_memories(memory, self.depth)
        options = dict(mask=mask, segment_ids=segment_ids, deterministic=deterministic)
        if self.scan_layers:
            # One block's function, traced and compiled once, run over the stacked variables.
            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), length=self.depth)
            def run_blocks(block: DPFPformerBlock, x: Array, layer_memory: Memory | None) -> tuple[Array, Memory]:
                return block(x, layer_memory, **options)

            x, stacked = run_blocks(self.blocks, x, stack_memories(memory))
            new_memories = unstack_memories(stacked, self.depth)
        else:
            new_memories = []
            for (attention, ff, norm_attention, norm_ff), layer_memory in zip(self.layers(), memory, strict=True):
                x, layer_memory = residual_block(x, layer_memory, attention, ff, norm_attention, norm_ff,
                                                 pre_norm=self.pre_norm, **options)
                new_memories.append(layer_memory)
        if self.pre_norm:
            x = self.norm_out(x)
        if mask is not None:
            x = jnp.where(mask[:, :, None], x, 0)
        return (x, tuple(new_memories)) if return_memory else x
