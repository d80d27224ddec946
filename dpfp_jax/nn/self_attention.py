"""A drop-in for Flax's ``nn.SelfAttention`` / ``nn.MultiHeadDotProductAttention`` in causal models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfp_jax.core.self_attention import (
    check_self_inputs,
    check_sow_weights,
    padding_of_mask,
    poison_invalid_rows,
    qkv_head_dim,
)
from dpfp_jax.feature_maps import FeatureMapLike
from dpfp_jax.nn.attention import FastWeightAttention
from dpfp_jax.validation import check_dropout_rate

Array = jax.Array


class DPFPSelfAttention(nn.Module):
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
    in the computation instead, and a batch row whose mask is not a padding mask outputs NaN.

    The attributes are Flax's where they share its names; ``qkv_features`` and ``out_features``
    default to the input width, ``use_bias`` to True as Flax's.

    Attributes:
      num_heads, qkv_features, out_features, dtype, param_dtype, precision, kernel_init,
      bias_init, use_bias: as in ``nn.MultiHeadDotProductAttention``.
      dropout_rate: dropout on the layer's output (there are no attention weights to drop);
        ``deterministic`` (attribute or call argument, the call's winning) and ``dropout_rng``
        as in Flax.
      decode: recurrent generation as :class:`FastWeightAttention`'s (the ``cache``
        collection): init with a full-size input, then one or more tokens per call; the mask,
        if any, is then the call's ``[.., T, T]`` one.
      feature_map, nu, num_features, rule, normalization, impl, eps, allow_unbounded_delta:
        the fast-weight attention's (see :class:`FastWeightAttention`).

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
    feature_map: FeatureMapLike = "dpfp"
    nu: int = 1
    num_features: int = 64
    rule: str = "delta"
    normalization: str = "sum"
    impl: str = "auto"
    eps: float = 1e-6
    allow_unbounded_delta: bool = False

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
        check_self_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
        check_sow_weights(sow_weights)
        check_dropout_rate("dropout_rate", self.dropout_rate)
        if inputs_q.ndim != 3:
            raise ValueError(f"inputs_q must be [batch, time, features]; got shape {inputs_q.shape}")
        batch, length, width = inputs_q.shape
        head_dim = qkv_head_dim(self.qkv_features or width, self.num_heads)
        padding, valid = padding_of_mask(mask, batch=batch, num_heads=self.num_heads, length=length)
        attention = FastWeightAttention(
            num_heads=self.num_heads, head_dim=head_dim, feature_map=self.feature_map, nu=self.nu,
            num_features=self.num_features, rule=self.rule, normalization=self.normalization,
            out_features=self.out_features or width, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, kernel_init=self.kernel_init,
            bias_init=self.bias_init, impl=self.impl, decode=self.decode, eps=self.eps,
            allow_unbounded_delta=self.allow_unbounded_delta, name="attention",
        )
        y, _ = attention(inputs_q, mask=padding)
        if self.dropout_rate > 0:
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic, rng=dropout_rng)
        return poison_invalid_rows(y, valid)
