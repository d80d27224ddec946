"""Multi-head fast-weight attention layers (Flax NNX): the general layer and the paper's DPFP one.

The NNX twins of :mod:`dpfp_jax.nn.attention`: the same attributes, the same math
(:mod:`dpfp_jax.core.attention`), parameters laid out as the linen ones (so
:func:`dpfp_jax.nnx.from_linen_params` maps them name for name).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpfp_jax.core.attention import (
    HasAttentionSpec,
    Memory,
    check_cache_shape,
    check_sequence,
    zero_padding,
)
from dpfp_jax.core.gate import gate_a_log_init, gate_dt_bias_init
from dpfp_jax.core.segments import SEGMENT_ID_DTYPE, decode_restart, last_segment_id
from dpfp_jax.core.settings import FastWeightSettings
from dpfp_jax.nnx.partitioning import EMBED, OUT_KERNEL, QKV_BIAS, QKV_KERNEL, KernelAxes, partitioned, project
from dpfp_jax.ops.fast_weight.validation import check_segment_ids
from dpfp_jax.validation import check_dropout_rate, check_mask, check_positive_int

Array = jax.Array

DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
ZEROS = nnx.initializers.zeros_init()


class FastWeightAttention(nnx.Module, HasAttentionSpec):
    """Multi-head fast-weight (linear) attention with a feature map and an update rule (Flax NNX).

    The attributes, the math and the parameter layout are those of the linen
    :class:`dpfp_jax.nn.FastWeightAttention` (see there for each attribute; as there, every
    argument after ``head_dim`` is keyword-only). The fast-weight settings (``feature_map``,
    ``nu``, ..., ``chunk_size``) are keyword arguments, documented once in
    :class:`dpfp_jax.core.settings.FastWeightSettings`: a name that is not one is a TypeError.
    Each is kept as an attribute of the same name. NNX adds:

    Args:
      in_features: the input width D (linen finds it from the first input; NNX makes the
        parameters when constructed).
      kernel_axes: a :class:`dpfp_jax.nnx.KernelAxes` to annotate the parameters with
        ``nnx.with_partitioning`` (q/k/v kernel ``[D, H, 3d(+1)]`` over ``(embed, heads, None)``,
        output kernel ``[H, d, D_out]`` over ``(heads, None, embed)``); None (the default)
        annotates nothing, so the layer is made without a mesh too.
      rngs: ``nnx.Rngs`` for the parameters (and the dropout stream).

    ``__call__(x, memory=None, *, mask=None, segment_ids=None, deterministic=None, decode=None)``
    returns ``(y, new_memory)`` as linen's does. ``deterministic=None`` leaves dropout to the
    layer's mode (NNX's: active until ``model.eval()``; only with ``dropout_rate > 0``).
    ``decode`` overrides the layer's for one call, as ``nnx.MultiHeadAttention``'s does:
    ``False`` on a decoding layer runs the call on ``memory`` alone, the cache neither read nor
    written; ``True`` needs a layer made with ``decode=True``.

    Decoding: ``decode=True`` keeps the memory in ``nnx.Cache`` variables (``fast_weights``,
    ``key_sum`` for ``normalization="attention"``, and ``segment_id``, each row's last segment
    id) that :meth:`init_cache` makes; each call continues them, on one or more new tokens; a call
    whose first ``segment_ids`` differ from a row's cached id restarts that row.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = FastWeightAttention(num_heads=2, head_dim=8, nu=2, in_features=16, rngs=nnx.Rngs(0))
        >>> y, memory = layer(jnp.ones((3, 5, 16)))
        >>> y.shape, memory.shape
        ((3, 5, 16), (3, 2, 32, 8))
    """

    def __init__(
        self,
        num_heads: int = 8,
        head_dim: int = 64,
        *,
        out_features: int | None = None,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = DEFAULT_KERNEL_INIT,
        bias_init: Any = ZEROS,
        dropout_rate: float = 0.0,
        decode: bool = False,
        in_features: int,
        kernel_axes: KernelAxes | None = None,
        rngs: nnx.Rngs,
        **settings: Any,
    ):
        self.num_heads, self.head_dim = num_heads, head_dim
        for name, value in FastWeightSettings.from_kwargs(type(self).__name__, settings).settings().items():
            setattr(self, name, value)
        self.out_features, self.use_bias, self.dtype, self.param_dtype = out_features, use_bias, dtype, param_dtype
        self.precision, self.kernel_init, self.bias_init = precision, kernel_init, bias_init
        self.dropout_rate, self.decode = dropout_rate, decode
        self.in_features, self.kernel_axes = in_features, kernel_axes
        spec = self.spec()
        spec.check()
        check_dropout_rate("dropout_rate", dropout_rate)
        check_positive_int("in_features", in_features)
        dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.qkv = nnx.LinearGeneral(
            in_features, spec.projection_features, kernel_init=partitioned(kernel_init, kernel_axes, QKV_KERNEL),
            bias_init=partitioned(bias_init, kernel_axes, QKV_BIAS), **dense,
        )
        self.out = nnx.LinearGeneral(
            (num_heads, head_dim), out_features or in_features, axis=(-2, -1),
            kernel_init=partitioned(kernel_init, kernel_axes, OUT_KERNEL),
            bias_init=partitioned(bias_init, kernel_axes, EMBED), **dense,
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        if spec.gate is not None:  # the decay gate's per-head parameters (dpfp_jax.core.gate)
            heads_init = (partitioned(init, kernel_axes, ("heads",)) for init in (gate_a_log_init, gate_dt_bias_init))
            self.gate_a_log, self.gate_dt_bias = (nnx.Param(init(rngs.params(), (num_heads,), param_dtype))
                                                  for init in heads_init)

    def init_cache(self, batch: int) -> None:
        """Make (or reset) the decode cache for ``batch`` rows: empty memory, segment ids 0."""
        if not self.decode:
            raise ValueError("init_cache makes the decode cache of a decode=True layer; this one has decode=False")
        shape = self.get_memory_shape(check_positive_int("batch", batch))
        self.fast_weights = nnx.Cache(jnp.zeros(shape, jnp.float32))
        self.key_sum = nnx.Cache(jnp.zeros(shape[:3], jnp.float32)) if self.normalization == "attention" else None
        self.segment_id = nnx.Cache(jnp.zeros((batch,), SEGMENT_ID_DTYPE))

    def _cached(self, batch: int) -> tuple[Array, Array | None, Array]:
        if getattr(self, "fast_weights", None) is None:
            # Without this the memory would silently restart empty at every call.
            raise ValueError("decode=True continues the memory in the layer's nnx.Cache variables, but it has "
                             "none: call init_cache(batch) once before decoding")
        shape = self.get_memory_shape(batch)
        caches = (("fast_weights", self.fast_weights, shape), ("key_sum", self.key_sum, shape[:3]),
                  ("segment_id", self.segment_id, (batch,)))
        for name, cached, want in caches:
            if cached is not None:
                check_cache_shape(name, cached[...].shape, want, batch)
        return self.fast_weights[...], None if self.key_sum is None else self.key_sum[...], self.segment_id[...]

    def __call__(
        self,
        x: Array,
        memory: Memory | None = None,
        *,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool | None = None,
        decode: bool | None = None,
    ) -> tuple[Array, Memory]:
        spec = self.spec()
        decode = self.decode if decode is None else decode
        if decode and not self.decode:
            raise ValueError("decode=True at the call continues the decode cache, which only a layer made with "
                             "decode=True has (init_cache refuses the others); this one has decode=False")
        batch, length, width = check_sequence(x)
        if width != self.in_features:
            raise ValueError(f"x must be [batch, time, in_features={self.in_features}]; got shape {x.shape}")
        mask = check_mask(mask, batch, length)
        check_segment_ids(segment_ids, x)
        w0, z0 = spec.split_memory(memory, batch)
        restart = None
        if decode:
            if memory is not None:
                raise ValueError("decode=True keeps the memory in the layer's nnx.Cache variables; pass memory=None")
            w0, z0, cached_id = self._cached(batch)
            restart = decode_restart(cached_id, segment_ids)

        out, new_memory = spec.attend(project(self.qkv, zero_padding(x, mask)), mask=mask, segment_ids=segment_ids,
                                      initial_state=w0, key_sum=z0, restart=restart, decoding=decode,
                                      gate_params=None if spec.gate is None else (self.gate_a_log[...],
                                                                                 self.gate_dt_bias[...]))
        if decode:
            if self.key_sum is None:
                self.fast_weights[...] = new_memory
            else:
                self.fast_weights[...], self.key_sum[...] = new_memory
            self.segment_id[...] = last_segment_id(cached_id, segment_ids)

        y = self.dropout(project(self.out, out, contracted=2), deterministic=deterministic)
        if mask is not None:
            y = jnp.where(mask[:, :, None], y, 0)
        return y, new_memory


class DPFPAttention(nnx.Module):
    """The paper's best fast-weight layer (Flax NNX): DPFP-nu features, delta rule, sum normalisation.

    The twin of linen's :class:`dpfp_jax.nn.DPFPAttention` (same attributes and parameters,
    under ``attention``; every argument after ``head_dim`` keyword-only; the fast-weight settings
    as keyword arguments, :class:`dpfp_jax.core.settings.FastWeightSettings`, defaulting to the
    paper's), plus ``kernel_axes`` and ``rngs`` as in :class:`FastWeightAttention`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> m = DPFPAttention(128, nu=1, rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (1, 16, 128))
        >>> y, W = m(x, jnp.zeros(m.get_memory_shape(1)))
        >>> y.shape, W.shape
        ((1, 16, 128), (1, 8, 128, 64))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int = 64,
        *,
        dropout_rate: float = 0.0,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = DEFAULT_KERNEL_INIT,
        decode: bool = False,
        kernel_axes: KernelAxes | None = None,
        rngs: nnx.Rngs,
        **settings: Any,
    ):
        self.dim = check_positive_int("dim", dim)
        self.attention = FastWeightAttention(
            num_heads=num_heads, head_dim=head_dim, out_features=dim, use_bias=use_bias, dtype=dtype,
            param_dtype=param_dtype, precision=precision, kernel_init=kernel_init, dropout_rate=dropout_rate,
            decode=decode, in_features=dim, kernel_axes=kernel_axes, rngs=rngs,
            **FastWeightSettings.from_kwargs(type(self).__name__, settings).settings(),
        )

    def get_memory_shape(self, batch: int) -> tuple[int, int, int, int]:
        """``(batch, num_heads, 2 * nu * head_dim, head_dim)``."""
        return self.attention.get_memory_shape(batch)

    def init_cache(self, batch: int) -> None:
        """Make (or reset) the decode cache for ``batch`` rows (``decode=True``)."""
        self.attention.init_cache(batch)

    def __call__(
        self,
        x: Array,
        memory: Array | None = None,
        *,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[Array, Array]:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, time, dim={self.dim}]; got shape {x.shape}")
        return self.attention(x, memory, mask=mask, segment_ids=segment_ids, deterministic=deterministic)
