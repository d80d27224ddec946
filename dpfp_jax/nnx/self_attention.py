"""A drop-in for Flax NNX's ``nnx.MultiHeadAttention`` in causal models."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpfp_jax.core.self_attention import (
    check_self_inputs,
    check_sow_weights,
    padding_of_mask,
    poison_invalid_rows,
    qkv_head_dim,
)
from dpfp_jax.feature_maps import FeatureMapLike
from dpfp_jax.nnx.attention import DEFAULT_KERNEL_INIT, ZEROS, FastWeightAttention
from dpfp_jax.nnx.partitioning import KernelAxes
from dpfp_jax.validation import check_dropout_rate, check_positive_int

Array = jax.Array


class DPFPSelfAttention(nnx.Module):
    """Causal self-attention by fast weights, made and called as ``nnx.MultiHeadAttention`` is.

    ``DPFPSelfAttention(num_heads, in_features, qkv_features=None, out_features=None, ...,
    rngs=...)(inputs_q, mask=..., deterministic=...)`` returns ``y``; the NNX twin of linen's
    :class:`dpfp_jax.nn.DPFPSelfAttention` (same parameters, under ``attention``; see there for
    what it accepts: ``inputs_k``/``inputs_v`` only as ``inputs_q`` itself, a padding mask only).
    ``decode=True`` decodes after :meth:`init_cache`, called as Flax's with the input shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = DPFPSelfAttention(4, 32, qkv_features=32, rngs=nnx.Rngs(0))
        >>> pad = jnp.array([[True, True, True, False]])
        >>> layer(jnp.ones((1, 4, 32)), mask=nnx.make_attention_mask(pad, pad)).shape
        (1, 4, 32)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Any = DEFAULT_KERNEL_INIT,
        bias_init: Any = ZEROS,
        use_bias: bool = True,
        decode: bool = False,
        feature_map: FeatureMapLike = "dpfp",
        nu: int = 1,
        num_features: int = 64,
        rule: str = "delta",
        normalization: str = "sum",
        impl: str = "auto",
        eps: float = 1e-6,
        allow_unbounded_delta: bool = False,
        kernel_axes: KernelAxes | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        self.in_features = check_positive_int("in_features", in_features)
        self.qkv_features = qkv_features or in_features
        self.out_features = out_features or in_features
        self.dropout_rate = check_dropout_rate("dropout_rate", dropout_rate)
        self.deterministic = deterministic
        self.attention = FastWeightAttention(
            num_heads=num_heads, head_dim=qkv_head_dim(self.qkv_features, num_heads), feature_map=feature_map,
            nu=nu, num_features=num_features, rule=rule, normalization=normalization,
            out_features=self.out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            precision=precision, kernel_init=kernel_init, bias_init=bias_init, impl=impl, decode=decode,
            eps=eps, allow_unbounded_delta=allow_unbounded_delta, in_features=in_features,
            kernel_axes=kernel_axes, rngs=rngs,
        )
        self.dropout = nnx.Dropout(dropout_rate, deterministic=deterministic, rngs=rngs)

    def init_cache(self, input_shape: tuple[int, ...], dtype: Any = None) -> None:
        """Make (or reset) the decode cache for inputs of ``input_shape`` ``(B, T, D)`` (only B
        matters: the memory does not grow with T). ``dtype`` is accepted as Flax's is, but the
        memory is float32 whatever the inputs: None or float32 only."""
        if dtype is not None and jnp.dtype(dtype) != jnp.float32:
            raise ValueError(f"dtype: the fast-weight memory is float32 whatever the inputs; got {dtype}")
        self.attention.init_cache(input_shape[0])

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
        sow_weights: bool = False,
    ) -> Array:
        check_self_inputs(inputs_q, inputs_k, inputs_v)
        check_sow_weights(sow_weights)
        if inputs_q.ndim != 3:
            raise ValueError(f"inputs_q must be [batch, time, features]; got shape {inputs_q.shape}")
        batch, length, _ = inputs_q.shape
        padding, valid = padding_of_mask(mask, batch=batch, num_heads=self.num_heads, length=length)
        y, _ = self.attention(inputs_q, mask=padding, deterministic=True)
        if self.dropout_rate > 0:
            y = self.dropout(y, deterministic=deterministic, rngs=rngs)
        return poison_invalid_rows(y, valid)
