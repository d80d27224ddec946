"""A drop-in for Flax NNX's ``nnx.MultiHeadAttention`` in causal models."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpfp_jax.core.self_attention import (
    check_is_causal,
    check_self_inputs,
    check_sow_weights,
    padding_of_decode_mask,
    padding_of_mask,
    poison_invalid_rows,
    qkv_head_dim,
)
from dpfp_jax.core.settings import FastWeightSettings
from dpfp_jax.nnx.attention import DEFAULT_KERNEL_INIT, ZEROS, FastWeightAttention
from dpfp_jax.nnx.partitioning import KernelAxes
from dpfp_jax.validation import check_dropout_rate, check_positive_int

Array = jax.Array


class DPFPSelfAttention(nnx.Module):
    """Causal self-attention by fast weights, made and called as ``nnx.MultiHeadAttention`` is.

    ``DPFPSelfAttention(num_heads, in_features, qkv_features=None, out_features=None, ...,
    rngs=...)(inputs_q, mask=..., deterministic=...)`` returns ``y``; the NNX twin of linen's
    :class:`dpfp_jax.nn.DPFPSelfAttention` (same parameters, under ``attention``; see there for
    what it accepts: ``inputs_k``/``inputs_v`` only as ``inputs_q`` itself, a padding mask only,
    Flax's key-padding ``[B, 1, 1, T]`` and decode-time ``[B, 1, 1, max_len]`` masks included).
    ``decode=True`` decodes after :meth:`init_cache`, called as Flax's with the input shape. The
    fast-weight settings are keyword arguments (:class:`dpfp_jax.core.settings.FastWeightSettings`).

    The call takes ``nnx.MultiHeadAttention``'s arguments: ``decode`` (None: the layer's;
    ``False`` on a decoding layer runs the call alone, the cache untouched; ``True`` needs a
    layer made with ``decode=True``) and ``is_causal`` (True, or left out, is what the layer does;
    False is refused: a causal layer cannot attend to later tokens).

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
        kernel_axes: KernelAxes | None = None,
        rngs: nnx.Rngs,
        **settings: Any,
    ):
        self.num_heads = num_heads
        self.in_features = check_positive_int("in_features", in_features)
        self.qkv_features = qkv_features or in_features
        self.out_features = out_features or in_features
        self.dropout_rate = check_dropout_rate("dropout_rate", dropout_rate)
        self.deterministic = deterministic
        self.attention = FastWeightAttention(
            num_heads=num_heads, head_dim=qkv_head_dim(self.qkv_features, num_heads),
            out_features=self.out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            precision=precision, kernel_init=kernel_init, bias_init=bias_init, decode=decode,
            in_features=in_features, kernel_axes=kernel_axes, rngs=rngs,
            **FastWeightSettings.from_kwargs(type(self).__name__, settings).settings(),
        )
        self.dropout = nnx.Dropout(dropout_rate, deterministic=deterministic, rngs=rngs)

    def init_cache(self, input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> None:
        """Make (or reset) the decode cache for inputs of ``input_shape`` ``(B, T, D)`` (only B
        matters: the memory does not grow with T), and the count of tokens so far (``cache_index``).

        ``dtype`` is taken as ``nnx.MultiHeadAttention.init_cache`` takes it (there it is the dtype
        of the cached keys and values), so a call written for Flax runs unchanged; it must be a
        floating dtype. The fast-weight memory is float32 whatever it says: it sums the whole
        sequence's writes, which a bfloat16 accumulator would round away.
        """
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise TypeError(f"dtype must be a floating dtype (the cache's, as Flax's init_cache takes it); got {dtype}")
        self.attention.init_cache(input_shape[0])
        self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

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
        decode: bool | None = None,
        is_causal: bool | None = None,
    ) -> Array:
        check_self_inputs(inputs_q, inputs_k, inputs_v)
        check_sow_weights(sow_weights)
        check_is_causal(is_causal)
        if inputs_q.ndim != 3:
            raise ValueError(f"inputs_q must be [batch, time, features]; got shape {inputs_q.shape}")
        batch, length, _ = inputs_q.shape
        decode = self.attention.decode if decode is None else decode
        if decode and self.attention.decode and getattr(self, "cache_index", None) is None:
            # Without this the memory would silently restart empty at every call.
            raise ValueError("decode=True continues the memory in the layer's nnx.Cache variables, but it has none: "
                             "call init_cache(input_shape) once before decoding, e.g. layer.init_cache(x.shape)")
        if decode and mask is not None and jnp.shape(mask)[-1] != length:
            padding, valid = padding_of_decode_mask(mask, batch=batch, num_heads=self.num_heads, length=length,
                                                    index=self.cache_index[...])
        else:
            padding, valid = padding_of_mask(mask, batch=batch, num_heads=self.num_heads, length=length)
        y, _ = self.attention(inputs_q, mask=padding, deterministic=True, decode=decode)
        if decode:
            self.cache_index[...] = self.cache_index[...] + length
        if self.dropout_rate > 0:
            y = self.dropout(y, deterministic=deterministic, rngs=rngs)
        return poison_invalid_rows(y, valid)
