"""DPFPformer: a stack of residual fast-weight attention and feed-forward blocks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfp_jax.core.attention import Memory, zero_padding
from dpfp_jax.core.settings import FastWeightSettings, settings_of
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
from dpfp_jax.nn.attention import FastWeightAttention
from dpfp_jax.ops.fast_weight.validation import check_segment_ids
from dpfp_jax.validation import check_dropout_rate, check_mask

Array = jax.Array


class FeedForward(nn.Module):
    """``Dense(ff_mult * D) -> activation -> dropout -> Dense(D) -> dropout``."""

    ff_mult: int = 4
    activation: Callable[[Array], Array] = nn.relu
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        check_dropout_rate("dropout_rate", self.dropout_rate)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                     kernel_init=self.kernel_init)
        h = self.activation(nn.Dense(self.ff_mult * x.shape[-1], name="up", **dense)(x))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        h = nn.Dense(x.shape[-1], name="down", **dense)(h)
        return nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class DPFPformer(nn.Module, FastWeightSettings):
    """A fast-weight transformer: ``depth`` blocks of attention and feed-forward, each residual.

    Every layer has its own memory (the original package passed one layer's W on); memories are
    carried in and out per layer, so a long text can be processed segment by segment.

    Attributes:
      dim: model width D.
      depth: number of blocks.
      num_heads, head_dim: the attention's heads (see :class:`FastWeightAttention`).
      feature_map, nu, num_features, favor_seed, rule, normalization, eps,
        allow_unbounded_delta, impl, chunk_size: the fast-weight settings, keyword-only,
        passed to every layer (:class:`dpfp_jax.core.settings.FastWeightSettings`; default:
        the paper's DPFP, delta rule, sum normalisation), except that layer i draws its FAVOR+
        projection from ``favor_seed + i``.
      ff_mult: feed-forward width multiplier.
      attention_dropout_rate, ff_dropout_rate: dropout rates, in [0, 1).
      pre_norm: LayerNorm before each sub-layer (and a final one) or after each residual sum.
      activation: the feed-forward non-linearity.
      dtype, param_dtype, precision, kernel_init, decode: passed to every layer.
      scan_layers: run the blocks as one ``nn.scan`` over a block whose parameters (and decode
        caches) are stacked on a leading layer axis, under ``blocks/attention``, ``blocks/ff``,
        ``blocks/norm_attention`` and ``blocks/norm_ff``, instead of a Python loop over
        ``attention_{i}``, ...: XLA then compiles one block however deep the stack, so a deep
        model compiles in about the time of a shallow one. The same math (each layer draws its
        own initial values and dropout masks, from split keys, so not the unscanned stack's);
        :func:`stack_layer_params` / :func:`unstack_layer_params` convert parameters between the
        two layouts. Not with ``feature_map="favor"`` (each layer's projection is its own
        constant, which a scan cannot vary: a ValueError).

    Every attribute after ``head_dim`` is keyword-only.

    ``__call__(x, memory=None, *, mask=None, segment_ids=None, deterministic=True,
    return_memory=False)`` maps ``x [B, T, D]`` to ``y [B, T, D]``, or ``(y, memories)`` with
    ``return_memory=True``; ``memory`` is None or a sequence of ``depth`` per-layer memories.
    ``mask [B, T]`` (boolean, or integer 0/1) marks real tokens: a padded token is replaced by zeros
    on entry, so whatever its value (NaN and inf included) it reaches neither the real tokens, nor
    the memories, nor the parameters' gradients, and its output is zeros. ``segment_ids [B, T]``
    packs documents: every layer's memory restarts where the id changes (see
    :class:`FastWeightAttention`), and the other sub-layers act token by token, so each document's
    outputs and gradients are those of running it alone; with ``decode=True`` every layer's cache
    restarts at a new id.

    Example:
        >>> import jax
        >>> model = DPFPformer(128, 3, nu=1)
        >>> x = jax.random.normal(jax.random.key(0), (16, 16, 128))
        >>> variables = model.init(jax.random.key(1), x)
        >>> y, memories = model.apply(variables, x, return_memory=True)
        >>> y.shape, len(memories), memories[0].shape
        ((16, 16, 128), 3, (16, 8, 128, 64))
    """

    dim: int
    depth: int
    num_heads: int = 8
    head_dim: int = 64
    _: dataclasses.KW_ONLY  # nu once came fifth by position; it is a setting now (keyword-only)
    ff_mult: int = 4
    attention_dropout_rate: float = 0.0
    ff_dropout_rate: float = 0.0
    pre_norm: bool = True
    activation: Callable[[Array], Array] = nn.relu
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    decode: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        memory: Sequence[Memory | None] | None = None,
        *,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
        return_memory: bool = False,
    ) -> Array | tuple[Array, tuple[Memory, ...]]:
        check_transformer(self.dim, self.depth, self.attention_dropout_rate, self.ff_dropout_rate)
        check_model_input(x, self.dim)
        mask = check_mask(mask, *x.shape[:2])
        check_segment_ids(segment_ids, x)
        # The residual stream, LayerNorms and feed-forwards act on every position; a padded one
        # must not carry its value into them (0 * nan is nan in their gradients).
        x = zero_padding(x, mask)
        memory = layer_memories(memory, self.depth)
        norm = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        options = dict(mask=mask, segment_ids=segment_ids, deterministic=deterministic)
        if self.scan_layers:
            check_scan_layers(settings_of(self))
            # One block's function, traced and compiled once, run over parameters (and decode
            # caches) stacked on a leading layer axis; each layer draws its own init and dropout keys.
            blocks = nn.scan(
                DPFPformerBlock, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth,
            )
            x, stacked = blocks(self.block_settings(settings_of(self)), norm, self.pre_norm, deterministic,
                                name="blocks")(x, stack_memories(memory), mask, segment_ids)
            new_memories = unstack_memories(stacked, self.depth)
        else:
            new_memories = []
            for i in range(self.depth):
                attention_settings, ff_settings = self.block_settings(layer_settings(settings_of(self), i))
                x, layer_memory = residual_block(
                    x, memory[i], FastWeightAttention(name=f"attention_{i}", **attention_settings),
                    FeedForward(name=f"ff_{i}", **ff_settings), nn.LayerNorm(name=f"norm_attention_{i}", **norm),
                    nn.LayerNorm(name=f"norm_ff_{i}", **norm), pre_norm=self.pre_norm, **options,
                )
                new_memories.append(layer_memory)
        if self.pre_norm:
            x = nn.LayerNorm(name="norm_out", **norm)(x)
        if mask is not None:
            x = jnp.where(mask[:, :, None], x, 0)
        return (x, tuple(new_memories)) if return_memory else x

    def block_settings(self, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The attention's and the feed-forward's attributes in one block, given its fast-weight settings."""
        attention = dict(num_heads=self.num_heads, head_dim=self.head_dim, dtype=self.dtype,
                         param_dtype=self.param_dtype, precision=self.precision, kernel_init=self.kernel_init,
                         dropout_rate=self.attention_dropout_rate, decode=self.decode, **settings)
        ff = dict(ff_mult=self.ff_mult, activation=self.activation, dropout_rate=self.ff_dropout_rate,
                  dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  kernel_init=self.kernel_init)
        return attention, ff


class DPFPformerBlock(nn.Module):
    """One block of :class:`DPFPformer` with ``scan_layers=True`` (the body of its ``nn.scan``):
    ``(x, memory, mask, segment_ids) -> (x, new memory)``; submodules ``attention``, ``ff``,
    ``norm_attention`` and ``norm_ff``. ``settings`` is ``DPFPformer.block_settings``' pair, ``norm``
    the LayerNorms' dtypes."""

    settings: tuple[Any, Any]
    norm: Any
    pre_norm: bool
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array, memory: Memory | None, mask: Array | None,
                 segment_ids: Array | None) -> tuple[Array, Memory]:
        attention_settings, ff_settings = self.settings
        return residual_block(
            x, memory, FastWeightAttention(name="attention", **attention_settings),
            FeedForward(name="ff", **ff_settings),
            nn.LayerNorm(name="norm_attention", **self.norm), nn.LayerNorm(name="norm_ff", **self.norm),
            pre_norm=self.pre_norm, mask=mask, segment_ids=segment_ids, deterministic=self.deterministic,
        )
