"""Multi-head fast-weight attention's math, shared by the linen and NNX layers.

:class:`AttentionSpec` holds the settings that decide the math (the heads' shape and the
:class:`dpfp_jax.core.settings.FastWeightSettings`: feature map, rule, normalisation, impl, ...)
and computes, from the one q/k/v/beta projection of the input, the heads'
outputs and the new memory (:meth:`AttentionSpec.attend`). The layers own the projections'
parameters, dropout and the decode cache, and call it.

Example:
    >>> import jax, jax.numpy as jnp
    >>> spec = AttentionSpec(num_heads=2, head_dim=4, nu=2)
    >>> spec.projection_features, spec.memory_shape(3)
    ((2, 13), (3, 2, 16, 4))
    >>> out, memory = spec.attend(jnp.ones((3, 5, 2, 13)))
    >>> out.shape, memory.shape
    ((3, 5, 2, 4), (3, 2, 16, 4))
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dpfp_jax.core.gate import GATES, gated_deltanet_log_decay
from dpfp_jax.core.segments import restart_rows
from dpfp_jax.core.settings import FastWeightSettings, settings_of
from dpfp_jax.feature_maps import (
    Features,
    apply_feature_map,
    check_feature_map,
    favor_projection,
    feature_dim,
    is_non_negative,
    normalized,
)
from dpfp_jax.ops import IMPLS, RULES, fast_weight
from dpfp_jax.ops.fast_weight.common import with_batch_head_sharding_of, zeros_without_time
from dpfp_jax.ops.fast_weight.context_parallel import running_key_sum_context_parallel
from dpfp_jax.ops.fast_weight.validation import check_bool
from dpfp_jax.validation import check_choice, check_positive_int

Array = jax.Array
Memory = Array | tuple[Array, Array]

NORMALIZATIONS = ("sum", "l2", "attention", "none")
"""Accepted values of the modules' ``normalization`` attribute."""


def split_heads_projection(projection: Array, head_dim: int, with_beta: bool):
    """``[..., H, 3 * d (+ 1)] -> q, k, v [..., H, d]`` and ``beta [..., H]`` (or None).

    Example:
        >>> import jax.numpy as jnp
        >>> q, k, v, beta = split_heads_projection(jnp.zeros((2, 3, 7)), 2, with_beta=True)
        >>> q.shape, beta.shape, float(beta[0, 0])
        ((2, 3, 2), (2, 3), 0.5)
    """
    q, k, v = (projection[..., i * head_dim : (i + 1) * head_dim] for i in range(3))
    beta = jax.nn.sigmoid(projection[..., 3 * head_dim].astype(jnp.float32)) if with_beta else None
    return q, k, v, beta


def check_sequence(x: Array) -> tuple[int, int, int]:
    """``(batch, time, width)`` of a layer input ``x [B, T, D]``; a ValueError for any other rank."""
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, time, features]; got shape {x.shape}")
    return x.shape


def zero_padding(x: Array, mask: Array | None) -> Array:
    """x with its padded steps (``mask [B, T]`` False) replaced by zeros; x itself without a mask.

    Select, never multiply: ``0 * nan`` is nan. The layers select the input itself, not only what
    comes out of its projection: a Dense's kernel gradient is ``x^T d(projection)``, where a padded
    NaN in x would meet the zero cotangent of a later select and give NaN.
    """
    return x if mask is None else jnp.where(mask[:, :, None], x, 0)


def check_cache_shape(name: str, shape: tuple[int, ...], want: tuple[int, ...], batch: int) -> None:
    """A decode cache entry made for another batch than x's: a ValueError naming both."""
    if shape != want:
        raise ValueError(
            f"the decode cache's {name} has shape {shape} (batch {shape[0] if shape else '?'}), but x of batch "
            f"{batch} needs {want}; init the decoder with an input of this batch"
        )


@dataclasses.dataclass
class AttentionSpec(FastWeightSettings):
    """The settings of a fast-weight attention layer that its math depends on: the heads' shape
    and the :class:`dpfp_jax.core.settings.FastWeightSettings` (keyword-only, documented there).

    Attributes:
      num_heads: number of heads H.
      head_dim: width d of q, k, v per head; V = d, K = ``feature_dim(feature_map, d)``.
    """

    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, layer: object) -> AttentionSpec:
        """The spec of a layer holding ``num_heads``, ``head_dim`` and every setting as attributes."""
        return cls(num_heads=layer.num_heads, head_dim=layer.head_dim, **settings_of(layer))

    def check(self) -> None:
        """Raise a ValueError (a TypeError for a wrong type) naming the attribute if the settings are not usable."""
        check_positive_int("num_heads", self.num_heads)
        check_positive_int("head_dim", self.head_dim)
        check_feature_map(self.feature_map)
        check_choice("rule", self.rule, RULES)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("impl", self.impl, IMPLS)
        check_positive_int("chunk_size", self.chunk_size)
        check_bool("fuse_features", self.fuse_features)
        if self.context_axis is not None and not isinstance(self.context_axis, str):
            raise TypeError(f"context_axis must be a mesh axis name (a str) or None; got {self.context_axis!r}")
        if check_choice("gate", self.gate, (None, *GATES)) is not None:
            if self.normalization == "attention":
                raise ValueError("gate with normalization='attention' is not supported: the running key sum z would "
                                 "have to decay with the memory; use normalization='sum' or 'l2'")
        if self.feature_map == "dpfp":
            check_positive_int("nu", self.nu)
        if self.feature_map == "favor":
            check_positive_int("num_features", self.num_features)
        if self.normalization == "attention" and self.rule != "sum":
            raise ValueError(
                "normalization='attention' (the running key-sum denominator) is defined for rule='sum'; "
                "the delta rule uses normalization='sum' (the paper's choice, for non-negative feature maps) "
                "or 'l2' (any feature map)"
            )
        if self.rule == "delta" and self.normalization == "none" and not self.allow_unbounded_delta:
            raise ValueError(
                "normalization='none' with rule='delta' leaves the fast weights unbounded: each step "
                "W <- (I - beta k k^T) W + beta k v^T is non-expanding only while 0 <= beta |phi(k)|^2 <= 2, "
                "and raw feature-mapped keys break that (at default init the state overflows to inf within "
                "a few hundred steps); use normalization='sum' (non-negative feature maps) or 'l2' "
                "(any feature map), or set allow_unbounded_delta=True to opt in"
            )
        # A callable's width is checked (on one [head_dim] vector) before its values are probed.
        feature_dim(self.feature_map, self.head_dim, nu=self.nu, num_features=self.num_features)
        if self.normalization in ("sum", "attention") and not is_non_negative(self.feature_map, self.head_dim):
            why = (
                "sum-normalised keys phi(k) / sum(phi(k)) then have norms far above 1 (the sum can be near "
                "zero or negative), so the delta rule's beta |k|^2 <= 2 fails and the state diverges, and the "
                "sum rule's outputs blow up" if self.normalization == "sum" else
                "the denominator z . phi(q) (running key sum times the query) can then be near zero or "
                "negative, so the outputs blow up"
            )
            raise ValueError(
                f"normalization={self.normalization!r} needs a non-negative feature map, but feature_map="
                f"{self.feature_map!r} gives negative features: {why}; use normalization='l2' (any sign)"
            )

    @property
    def key_dim(self) -> int:
        """K, the feature-mapped key width."""
        return feature_dim(self.feature_map, self.head_dim, nu=self.nu, num_features=self.num_features)

    @property
    def projection_features(self) -> tuple[int, int]:
        """``(H, 3 * head_dim (+ 1) (+ 1))``: the input projection's output axes (q, k, v, the delta rule's
        beta and the gate's logit)."""
        return (self.num_heads, 3 * self.head_dim + int(self.rule == "delta") + int(self.gate is not None))

    def memory_shape(self, batch: int) -> tuple[int, int, int, int]:
        """Shape of the fast weights W: ``(batch, num_heads, key_dim, head_dim)``."""
        self.check()
        return (batch, self.num_heads, self.key_dim, self.head_dim)

    def features(self, x: Array) -> Array:
        """phi(x) over the last axis, normalised as ``normalization`` says (``"sum"``, ``"l2"``)."""
        projection = None
        if self.feature_map == "favor":
            projection = favor_projection(jax.random.key(self.favor_seed), self.num_features, self.head_dim)
        return normalized(apply_feature_map(self.feature_map, x, nu=self.nu, projection=projection),
                          self.normalization, self.eps)

    def op_features(self) -> Features | None:
        """The :class:`dpfp_jax.Features` the layer hands the op with the raw q and k
        (``fuse_features``), or None: the layer applies :meth:`features` itself. FAVOR+ always
        takes the latter (its projection is an array, which a ``Features`` does not carry);
        ``normalization="attention"`` gives the op the map unnormalised (its denominator is the layer's).

        Example:
            >>> AttentionSpec(num_heads=2, head_dim=4, nu=2).op_features()
            Features(feature_map='dpfp', dim=4, nu=2, normalization='sum', eps=1e-06)
            >>> AttentionSpec(num_heads=2, head_dim=4, fuse_features=False).op_features() is None
            True
        """
        if not self.fuse_features or (isinstance(self.feature_map, str) and self.feature_map == "favor"):
            return None
        return Features(self.feature_map, dim=self.head_dim, nu=self.nu if self.feature_map == "dpfp" else 1,
                        normalization="none" if self.normalization == "attention" else self.normalization,
                        eps=self.eps)

    def split_memory(self, memory: Memory | None, batch: int) -> tuple[Array | None, Array | None]:
        """``(W, z)`` of a carried memory (z None unless ``normalization="attention"``), shapes checked."""
        shape = self.memory_shape(batch)
        if memory is None:
            return None, None
        if self.normalization == "attention":
            if not (isinstance(memory, tuple | list) and len(memory) == 2):
                raise ValueError(
                    "memory must be a (W, z) pair for normalization='attention'; "
                    f"got {type(memory).__name__}"
                )
            w, z = memory
            if z.shape != shape[:3]:
                raise ValueError(f"memory's key sum z must be [B, H, K] = {shape[:3]}; got {z.shape}")
        else:
            w, z = memory, None
        if not hasattr(w, "shape") or w.shape != shape:
            raise ValueError(
                f"memory must be fast weights of shape [B, H, K, V] = {shape}; "
                f"got {getattr(w, 'shape', type(w).__name__)}"
            )
        return w, z

    def attend(
        self,
        projection: Array,
        *,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        initial_state: Array | None = None,
        key_sum: Array | None = None,
        restart: Array | None = None,
        decoding: bool = False,
        gate_params: tuple[Array, Array] | None = None,
    ) -> tuple[Array, Memory]:
        """From the input projection ``[B, T, H, 3 d (+ 1)]`` to the heads' outputs ``[B, T, H, d]``
        (before the output projection) and the new memory: W, or ``(W, z)`` for ``"attention"``.

        Args:
          projection: the q/k/v/beta projection of the (padding-zeroed) input.
          mask: ``[B, T]`` bool, True for a real token: a padded one writes nothing (zero key,
            value and beta, selected) and reads zeros.
          segment_ids: ``[B, T]`` integer document ids (packed documents): W and z restart from
            zero at every change of id; the row's first document continues ``initial_state``
            and ``key_sum``.
          initial_state: W ``[B, H, K, V]`` to continue (None: zeros).
          key_sum: z ``[B, H, K]`` to continue (``normalization="attention"``; None: zeros).
          restart: ``[B]`` bool, True for a row whose carried W and z belong to a finished
            document (a decode cache meeting a new segment id): that row starts from zeros.
          decoding: the call continues a decode cache (a few new tokens): ``context_axis`` is
            not applied, since a decode step's tokens are not split over devices.
          gate_params: ``(gate_a_log, gate_dt_bias)``, ``[H]`` each, with a ``gate``
            (:mod:`dpfp_jax.core.gate`); the gate's logit is the projection's last column.
        """
        context_axis = None if decoding else self.context_axis
        q, k, v, beta = split_heads_projection(projection, self.head_dim, self.rule == "delta")
        features = self.op_features()
        log_decay = None
        if self.gate is not None:
            log_decay = gated_deltanet_log_decay(projection[..., -1], *gate_params)
            if mask is not None:  # a padded step keeps the memory as it is: alpha = 1
                log_decay = jnp.where(mask[:, :, None], log_decay, 0.0)
        # phi(q), phi(k) here only when the op is not given the map, or for the attention denominator.
        phi_q, phi_k = (self.features(q), self.features(k)) if (
            features is None or self.normalization == "attention") else (None, None)
        if mask is not None:
            # A zero key writes nothing under either rule (W += 0 (...)^T), and zero values and beta
            # make the delta rule's write beta (v - W^T k) itself zero, so the chunked impls, which
            # mix the steps of a chunk in matmuls, meet nothing but zeros at a padded step. With the
            # map inside the op a padded key is phi of k's bias, inert all the same: its v and beta are 0.
            real = mask[:, :, None, None]
            phi_q, phi_k, v = (None if t is None else jnp.where(real, t, 0) for t in (phi_q, phi_k, v))
            beta = None if beta is None else jnp.where(mask[:, :, None], beta, 0)
        queries, keys = (phi_q, phi_k) if features is None else (q, k)
        if restart is not None and initial_state is not None:
            initial_state = restart_rows(restart, with_batch_head_sharding_of(initial_state, keys))

        out, w = fast_weight(
            queries, keys, v, beta, rule=self.rule, initial_state=initial_state,
            scale=1.0 / math.sqrt(self.head_dim), impl=self.impl, chunk_size=self.chunk_size,
            segment_ids=segment_ids, context_axis=context_axis, features=features, log_decay=log_decay,
        )
        if features is not None and mask is not None:
            out = jnp.where(mask[:, :, None, None], out, 0)  # a padded step reads zeros, as its zero phi(q) would
        if self.normalization != "attention":
            return out, w
        z_start = (zeros_without_time(phi_k, jnp.float32) if key_sum is None
                   else with_batch_head_sharding_of(key_sum.astype(jnp.float32), phi_k))
        if restart is not None:
            z_start = restart_rows(restart, z_start)
        # The last step's sum comes back beside z: indexing z[:, -1] is refused on a sharded T.
        z, z_last = running_key_sum_context_parallel(phi_k, z_start, segment_ids, context_axis=context_axis)
        denominator = jnp.einsum("bthk,bthk->bth", phi_q.astype(jnp.float32), z) + self.eps
        out = (out.astype(jnp.float32) / denominator[..., None]).astype(out.dtype)
        return out, (w, z_last)


class HasAttentionSpec:
    """What the linen and NNX ``FastWeightAttention`` read off their :class:`AttentionSpec`,
    written once: a mixin for a layer holding ``num_heads``, ``head_dim`` and every
    :class:`dpfp_jax.core.settings.FastWeightSettings` as attributes."""

    def spec(self) -> AttentionSpec:
        """The settings the math depends on (:class:`AttentionSpec`)."""
        return AttentionSpec.of(self)

    @property
    def key_dim(self) -> int:
        """K, the feature-mapped key width."""
        return self.spec().key_dim

    def get_memory_shape(self, batch: int) -> tuple[int, int, int, int]:
        """Shape of the fast weights W: ``(batch, num_heads, key_dim, head_dim)``."""
        return self.spec().memory_shape(batch)
