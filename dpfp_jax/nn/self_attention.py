"""A drop-in for Flax's ``nn.SelfAttention`` / ``nn.MultiHeadDotProductAttention`` in causal models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpfp_jax.core.self_attention import (
    check_self_inputs,
    check_sow_weights,
    padding_of_decode_mask,
    padding_of_mask,
    poison_invalid_rows,
    qkv_head_dim,
    self_attention_arguments,
)
from dpfp_jax.core.settings import FastWeightSettings, settings_of
from dpfp_jax.nn.attention import FastWeightAttention
from dpfp_jax.validation import check_dropout_rate

Array = jax.Array


class DPFPSelfAttention(nn.Module, FastWeightSettings):
    """Causal self-attention by fast weights, called as Flax's dot-product attention is.

    ``DPFPSelfAttention(num_heads, qkv_features=..., out_features=...)(inputs_q, mask=...,
    deterministic=...)`` returns ``y`` only, as ``nn.MultiHeadDotProductAttention`` and
    ``nn.SelfAttention`` do, so a causal model swaps one line. Inside is
    :class:`FastWeightAttention` (by default the paper's DPFP, delta rule, sum normalisation) with
    ``head_dim = qkv_features // num_heads``: every token reads the fast weights written by the
    tokens up to itself, in O(T) time and O(1) memory in T.

    It is **causal self-attention**, whatever the mask says: ``inputs_k``, ``inputs_v`` (and
    ``inputs_kv``) must be None or ``inputs_q`` itself, and ``mask`` must be a padding mask
    (:mod:`dpfp_jax.core.self_attention`: ``nn.make_attention_mask(pad, pad)``, alone or combined
    with ``nn.make_causal_mask``, broadcastable to ``[B, H, T, T]``; booleans or 0/1). Padded
    tokens write nothing and output zeros. Other inputs and masks are refused with a ValueError
    naming them while tracing when their values are known; a mask made inside ``jit`` is checked
    in the computation instead, and a batch row whose mask is not a padding mask outputs NaN, with
    NaN gradients too (the output is multiplied by NaN, not replaced: a replaced output would give
    finite parameter gradients from a NaN loss, and training would go on). A mask must be an array
    (a list is a TypeError, as for the fast-weight layers' ``mask`` and ``segment_ids``).

    Called as ``nn.SelfAttention`` is, ``layer(x, mask)`` (or ``layer(x, mask, deterministic)``),
    it takes the second positional argument as the mask when it is one (rank 2 or 4, or boolean);
    as ``nn.MultiHeadDotProductAttention`` is, it is ``inputs_k``. Flax's key-padding mask
    ``pad[:, None, None, :]`` (``[B, 1, 1, T]``) is taken as the padding ``pad``.

    The attributes are Flax's where they share its names; ``qkv_features`` and ``out_features``
    default to the input width, ``use_bias`` to True as Flax's.

    Attributes:
      num_heads, qkv_features, out_features, dtype, param_dtype, precision, kernel_init,
      bias_init, use_bias: as in ``nn.MultiHeadDotProductAttention``.
      dropout_rate: dropout on the layer's output (there are no attention weights to drop);
        ``deterministic`` (attribute or call argument, the call's winning) and ``dropout_rng``
        as in Flax.
      decode: recurrent generation as :class:`FastWeightAttention`'s (the ``cache``
        collection, which also counts the tokens so far in ``cache_index`` as Flax's does):
        init with a full-size input, then one or more tokens per call. The mask, if any, is then
        the call's own ``[.., T, T]`` one, or Flax's decode-time mask over the whole cache,
        ``[B, 1, 1 or T, max_len]``, of which each new token's own entry says whether it is real
        (:func:`dpfp_jax.core.self_attention.padding_of_decode_mask`).
      feature_map, nu, num_features, favor_seed, rule, normalization, eps,
        allow_unbounded_delta, impl, chunk_size: the fast-weight settings, keyword-only
        (:class:`dpfp_jax.core.settings.FastWeightSettings`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> tokens = jnp.array([[5, 3, 8, 0]])            # 0 is padding
        >>> mask = nn.combine_masks(nn.make_attention_mask(tokens > 0, tokens > 0), nn.make_causal_mask(tokens))
        >>> x = jax.random.normal(jax.random.key(0), (1, 4, 32))
        >>> layer = DPFPSelfAttention(num_heads=4, qkv_features=32, out_features=32)
        >>> variables = layer.init(jax.random.key(1), x, mask=mask)
        >>> layer.apply(variables, x, mask=mask).shape
        (1, 4, 32)
    """

    num_heads: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    qkv_features: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    use_bias: bool = True
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        inputs_kv: Array | None = None,
        mask: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        sow_weights: bool = False,
    ) -> Array:
        inputs_k, inputs_v, mask, deterministic = self_attention_arguments(
            inputs_q, inputs_k, inputs_v, mask, deterministic)
        check_self_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
        check_sow_weights(sow_weights)
        check_dropout_rate("dropout_rate", self.dropout_rate)
        if inputs_q.ndim != 3:
            raise ValueError(f"inputs_q must be [batch, time, features]; got shape {inputs_q.shape}")
        batch, length, width = inputs_q.shape
        head_dim = qkv_head_dim(self.qkv_features or width, self.num_heads)
        index = None
        if self.decode and (self.has_variable("cache", "cache_index") or self.is_initializing()):
            index = self.variable("cache", "cache_index", jnp.zeros, (), jnp.int32)
        if index is not None and not self.is_initializing() and mask is not None and np.shape(mask)[-1] != length:
            padding, valid = padding_of_decode_mask(mask, batch=batch, num_heads=self.num_heads, length=length,
                                                    index=index.value)
        else:
            padding, valid = padding_of_mask(mask, batch=batch, num_heads=self.num_heads, length=length)
        attention = FastWeightAttention(
            num_heads=self.num_heads, head_dim=head_dim, out_features=self.out_features or width,
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=self.kernel_init, bias_init=self.bias_init, decode=self.decode, name="attention",
            **settings_of(self),
        )
        y, _ = attention(inputs_q, mask=padding)
        if index is not None and not self.is_initializing():
            index.value = index.value + length
        if self.dropout_rate > 0:
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic, rng=dropout_rng)
        return poison_invalid_rows(y, valid)
