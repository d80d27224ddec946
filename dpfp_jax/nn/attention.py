"""Multi-head fast-weight attention layers (Flax linen): the general layer and the paper's DPFP one."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfp_jax.core.attention import (
    NORMALIZATIONS,
    HasAttentionSpec,
    Memory,
    check_cache_shape,
    check_sequence,
    split_heads_projection,
    zero_padding,
)
from dpfp_jax.core.gate import gate_a_log_init, gate_dt_bias_init
from dpfp_jax.core.segments import SEGMENT_ID_DTYPE, decode_restart, last_segment_id
from dpfp_jax.core.settings import FastWeightSettings, settings_of
from dpfp_jax.ops.fast_weight.validation import check_segment_ids
from dpfp_jax.validation import check_dropout_rate, check_mask, check_positive_int

Array = jax.Array

__all__ = ["NORMALIZATIONS", "DPFPAttention", "FastWeightAttention", "FastWeightSettings", "Memory",
           "split_heads_projection"]


class FastWeightAttention(nn.Module, FastWeightSettings, HasAttentionSpec):
    """Multi-head fast-weight (linear) attention with a feature map and an update rule.

    One Dense maps the input to ``H * (3 * head_dim + 1)`` (q, k, v and, for the delta rule, a
    beta logit per head); q and k go through ``feature_map`` (and the normalisation); the fast
    weights W ``[B, H, K, V]`` are written and read by :func:`dpfp_jax.fast_weight`, outputs are
    scaled by ``1 / sqrt(head_dim)`` and an output Dense maps the heads back.

    Attributes:
      num_heads: number of heads H.
      head_dim: width d of q, k, v per head; V = d, K = ``feature_dim(feature_map, d)``.
      feature_map, nu, num_features, favor_seed, rule, normalization, eps,
        allow_unbounded_delta, impl, chunk_size: the fast-weight settings, keyword-only,
        documented once in :class:`dpfp_jax.core.settings.FastWeightSettings` (every layer
        takes them). Default: the paper's DPFP-1, delta rule, sum normalisation.
      out_features: output width (default: the input width).
      use_bias: whether the projections have biases.
      dtype: computation dtype of the projections (default: inferred); state is float32.
      param_dtype: parameter dtype.
      precision: matmul precision of the projections.
      kernel_init, bias_init: initialisers of the projections.
      dropout_rate: dropout on the layer's output, in [0, 1).
      decode: keep the memory in the ``cache`` collection and continue it on every call
        (recurrent generation); init with a full-size input, then apply with ``mutable=["cache"]``.
        The cache also keeps each row's last segment id: a call whose first ``segment_ids``
        differ from it starts a new document (memory and key sum from zero); a call without
        ``segment_ids`` continues the current one.

    Every attribute but ``num_heads`` and ``head_dim`` is keyword-only.

    ``__call__(x, memory=None, *, mask=None, segment_ids=None, deterministic=True)`` takes
    ``x [B, T, D]`` and returns ``(y [B, T, out_features], new_memory)``. The memory is W
    ``[B, H, K, V]``, or ``(W, z)`` with ``z [B, H, K]`` for ``normalization="attention"``; None
    (or zeros) starts empty. ``mask [B, T]`` (boolean, or integer 0/1) marks real tokens: a masked
    token writes nothing and outputs zeros, whatever its value (NaN and inf included): its input is
    replaced by zeros before the projections and its query, key, value and beta by zeros before the
    memory, so neither the other tokens, nor the memory, nor the parameters' gradients ever see it.
    ``segment_ids [B, T]`` (integers) packs documents into a row: where the id changes, W and z
    restart from zero, so each document sees only its own tokens (outputs, memory and gradients
    are those of running each document alone); the row's first document continues ``memory``,
    and the returned memory is the last document's. A masked token's id still counts.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> layer = FastWeightAttention(num_heads=2, head_dim=8, feature_map="dpfp", nu=2)
        >>> x = jnp.ones((3, 5, 16))
        >>> variables = layer.init(jax.random.key(0), x)
        >>> y, memory = layer.apply(variables, x)
        >>> y.shape, memory.shape
        ((3, 5, 16), (3, 2, 32, 8))
    """

    # The settings (feature_map, ..., chunk_size) are inherited from FastWeightSettings as
    # keyword-only fields; so are the attributes below the marker, which once followed them by
    # position: a positional call past head_dim is a TypeError, never a silent reinterpretation.
    num_heads: int = 8
    head_dim: int = 64
    _: dataclasses.KW_ONLY
    out_features: int | None = None
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    dropout_rate: float = 0.0
    decode: bool = False

    def check_config(self) -> None:
        """Raise a ValueError (a TypeError for a wrong type) naming the attribute if the configuration is not usable."""
        self.spec().check()
        check_dropout_rate("dropout_rate", self.dropout_rate)

    def _features(self, x: Array) -> Array:
        return self.spec().features(x)

    @nn.compact
    def __call__(
        self,
        x: Array,
        memory: Memory | None = None,
        *,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Memory]:
        self.check_config()
        spec = self.spec()
        batch, length, width = check_sequence(x)
        mask = check_mask(mask, batch, length)
        check_segment_ids(segment_ids, x)
        w0, z0 = spec.split_memory(memory, batch)
        shape = spec.memory_shape(batch)

        restart = None
        if self.decode:
            if memory is not None:
                raise ValueError("decode=True keeps the memory in the 'cache' collection; pass memory=None")
            initialized = self.has_variable("cache", "fast_weights")
            if not initialized and not self.is_initializing():
                # Without this the memory would silently restart empty at every call.
                raise ValueError(
                    "decode=True continues the memory kept in the 'cache' collection, but this apply got no "
                    "cache: pass the variables init returned, {'params': ..., 'cache': ...}, and "
                    "mutable=['cache']"
                )
            cached_w = self.variable("cache", "fast_weights", jnp.zeros, shape, jnp.float32)
            cached_z = (
                self.variable("cache", "key_sum", jnp.zeros, shape[:3], jnp.float32)
                if self.normalization == "attention"
                else None
            )
            # Each row's last segment id: a call whose first id differs starts a new document.
            cached_id = self.variable("cache", "segment_id", jnp.zeros, (batch,), SEGMENT_ID_DTYPE)
            if initialized:
                for cached, want in ((cached_w, shape), (cached_z, shape[:3]), (cached_id, (batch,))):
                    if cached is not None:
                        check_cache_shape(cached.name, cached.value.shape, want, batch)
                w0 = cached_w.value
                z0 = None if cached_z is None else cached_z.value
                restart = decode_restart(cached_id.value, segment_ids)

        x = zero_padding(x, mask)
        dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     precision=self.precision, kernel_init=self.kernel_init, bias_init=self.bias_init)
        projection = nn.DenseGeneral(features=spec.projection_features, name="qkv", **dense)(x)
        gate_params = None
        if self.gate is not None:
            gate_params = (self.param("gate_a_log", gate_a_log_init, (self.num_heads,), self.param_dtype),
                           self.param("gate_dt_bias", gate_dt_bias_init, (self.num_heads,), self.param_dtype))
        out, new_memory = spec.attend(projection, mask=mask, segment_ids=segment_ids, initial_state=w0,
                                      key_sum=z0, restart=restart, decoding=self.decode, gate_params=gate_params)

        if self.decode and initialized:
            if cached_z is None:
                cached_w.value = new_memory
            else:
                cached_w.value, cached_z.value = new_memory
            cached_id.value = last_segment_id(cached_id.value, segment_ids)

        y = nn.DenseGeneral(features=self.out_features or width, axis=(-2, -1), name="out", **dense)(out)
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        if mask is not None:
            y = jnp.where(mask[:, :, None], y, 0)
        return y, new_memory


class DPFPAttention(nn.Module, FastWeightSettings):
    """The paper's best fast-weight layer: DPFP-nu features, delta rule, sum normalisation.

    ``DPFPAttention(dim, nu=v)`` of the original PyTorch package, dpfp-pytorch
    (docs/original_package.md), in Flax form, with the recurrence real at every position.
    ``get_memory_shape(batch)`` is ``(batch, num_heads, 2 * nu * head_dim, head_dim)``;
    ``y, W = model.apply(variables, x, W)`` continues from W (None or zeros: empty memory);
    ``segment_ids=`` packs documents as in :class:`FastWeightAttention`.

    Attributes:
      dim: model width D (input and output).
      num_heads, head_dim: as in :class:`FastWeightAttention`.
      feature_map, nu, num_features, favor_seed, rule, normalization, eps,
        allow_unbounded_delta, impl, chunk_size: the fast-weight settings, keyword-only
        (:class:`dpfp_jax.core.settings.FastWeightSettings`); their defaults are the paper's
        layer, which is what this class is for: change ``feature_map``, ``rule`` or
        ``normalization`` and it is a :class:`FastWeightAttention` of width ``dim``.
      dropout_rate, use_bias, dtype, param_dtype, precision, kernel_init, decode: passed on
        (keyword-only).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> m = DPFPAttention(128, nu=1)
        >>> x = jax.random.normal(jax.random.key(0), (1, 16, 128))
        >>> W = jnp.zeros(m.get_memory_shape(1))
        >>> variables = m.init(jax.random.key(1), x, W)
        >>> y, W = m.apply(variables, x, W)
        >>> y.shape, W.shape
        ((1, 16, 128), (1, 8, 128, 64))
    """

    dim: int
    num_heads: int = 8
    head_dim: int = 64
    _: dataclasses.KW_ONLY  # nu once came fourth by position; it is a setting now (keyword-only)
    dropout_rate: float = 0.0
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    decode: bool = False

    def _layer_config(self) -> dict[str, Any]:
        return dict(
            num_heads=self.num_heads, head_dim=self.head_dim, out_features=self.dim, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=self.kernel_init, dropout_rate=self.dropout_rate, decode=self.decode, **settings_of(self),
        )

    def get_memory_shape(self, batch: int) -> tuple[int, int, int, int]:
        """``(batch, num_heads, 2 * nu * head_dim, head_dim)``."""
        # parent=None: a detached copy, so asking for a shape never registers a submodule.
        return FastWeightAttention(**self._layer_config(), parent=None).get_memory_shape(batch)

    @nn.compact
    def __call__(
        self,
        x: Array,
        memory: Array | None = None,
        *,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array]:
        check_positive_int("dim", self.dim)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, time, dim={self.dim}]; got shape {x.shape}")
        layer = FastWeightAttention(**self._layer_config(), name="attention")
        return layer(x, memory, mask=mask, segment_ids=segment_ids, deterministic=deterministic)
