"""The fast-weight settings: the one place where the options that decide a layer's math live.

:class:`FastWeightSettings` declares them (name, type, default, meaning) once. Every layer takes
them, under the same names and with the same defaults:

- the linen modules (:mod:`dpfp_jax.nn`) inherit them as keyword-only dataclass fields;
- the NNX modules (:mod:`dpfp_jax.nnx`) take them as keyword arguments, checked against these
  fields (:meth:`FastWeightSettings.from_kwargs`);
- :class:`dpfp_jax.core.attention.AttentionSpec`, the math the layers call, is these settings
  plus the heads' shape.

So a new option of the op is one field here (and its use in ``AttentionSpec``), and it reaches
``FastWeightAttention``, ``DPFPAttention``, ``DPFPformer`` and ``DPFPSelfAttention``, linen
and NNX. (The DPFP cell is one fixed step of the paper's layer, outside the op: its ``nu`` and
``eps`` are its own.)

Example:
    >>> settings = FastWeightSettings(nu=2, chunk_size=32)
    >>> settings.settings()["nu"], settings.settings()["chunk_size"]
    (2, 32)
    >>> FastWeightSettings.from_kwargs("MyLayer", {"nuu": 2})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: MyLayer got an unexpected keyword argument 'nuu'; its fast-weight settings are feature_map, nu, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dpfp_jax.feature_maps import FeatureMapLike
from dpfp_jax.ops.fast_weight import DEFAULT_CHUNK_SIZE


@dataclasses.dataclass(kw_only=True, eq=False)
class FastWeightSettings:
    """The settings that decide a fast-weight attention layer's math, shared by every layer.

    Not frozen and without its own equality so that Flax linen modules (dataclasses that are
    neither) can inherit these fields; :class:`dpfp_jax.core.attention.AttentionSpec` and the
    linen modules generate their own equality over all their fields.

    Attributes:
      feature_map: ``"dpfp"``, ``"linear"`` (elu+1), ``"favor"``, ``"relu"`` or ``"identity"``
        (:data:`dpfp_jax.FEATURE_MAPS`), or a pure callable ``[..., d] -> [..., K]`` for any K,
        e.g. ``lambda x: dj.dpfp(x, 3)``: K is found from its output shape on a ``[head_dim]``
        input (:func:`jax.eval_shape`, nothing computed); the output must keep the leading shape
        and be floating. ``nu``, ``num_features`` and ``favor_seed`` do not apply to a callable.
      nu: DPFP's nu (``feature_map="dpfp"``).
      num_features: FAVOR+'s number of random projections m (K = 2m).
      favor_seed: FAVOR+'s projection is drawn once from ``jax.random.key(favor_seed)``
        (block-orthogonal, see :func:`dpfp_jax.favor_projection`) and is a constant of the
        layer, not a parameter: it is never trained or decayed and needs no extra collection.
        Give layers different seeds for independent draws (``DPFPformer`` gives its layer i the
        seed ``favor_seed + i``).
      rule: ``"delta"`` or ``"sum"``.
      normalization: ``"sum"`` (phi(q), phi(k) divided by their sums: the paper's delta-rule
        layers; for non-negative feature maps only), ``"l2"`` (divided by their L2 norms,
        :func:`dpfp_jax.l2_norm`: for any feature map, ``identity`` and other signed maps
        included), ``"attention"`` (sum rule only, non-negative feature maps only:
        ``W^T phi(q) / (z . phi(q) + eps)`` with the running key sum z, the classic linear
        transformer) or ``"none"``. The delta rule's step ``W <- (I - beta k k^T) W + beta k v^T``
        is non-expanding only while ``0 <= beta |phi(k)|^2 <= 2``; with raw features
        ``|phi(k)|^2`` is unbounded and the state can grow exponentially (at default init, to
        inf within a few hundred steps). ``"sum"`` on non-negative features and ``"l2"`` on any
        give ``|phi(k)| <= 1``, and beta is a sigmoid in (0, 1), so the condition holds at every
        step; ``rule="delta"`` with ``"none"`` is refused unless ``allow_unbounded_delta=True``.
        ``"sum"`` and ``"attention"`` are refused with a signed feature map (``"identity"``, or a
        callable that gives a negative feature on a fixed probe input): a sum of signed features
        can be near zero, so sum-normalised keys break ``beta |k|^2 <= 2`` and the attention
        denominator ``z . phi(q)`` can vanish; use ``"l2"`` there.
      eps: the normalisations' epsilon.
      allow_unbounded_delta: opt in to ``rule="delta"`` with ``normalization="none"``, whose
        state is bounded only if the keys keep ``beta |phi(k)|^2 <= 2`` by themselves (nothing
        checks it). Not consulted for other configurations.
      impl: passed to :func:`dpfp_jax.fast_weight` (``"auto"``, ``"chunk"``, ``"scan"``,
        ``"pallas"``, ``"reference"``).
      chunk_size: passed to :func:`dpfp_jax.fast_weight`: steps per chunk for ``impl="chunk"``
        and ``"pallas"`` (and the length from which ``"auto"`` picks ``"chunk"``); the other
        impls compute the same function without chunks.
      context_axis: passed to :func:`dpfp_jax.fast_weight`: the mesh axis that shards the
        sequence (context parallelism, docs/context_parallel.md), for inputs under an Auto mesh
        (``jax.set_mesh``), whose layout the op cannot see; under an explicit mesh a sequence
        sharded in the inputs' types is found without it. ``normalization="attention"``'s
        running key sum is carried across the shards too. None: the sequence is not sharded
        (or is, under an explicit mesh). Not applied while decoding (``decode=True`` calls
        continuing the cache); a layer with it runs only under a mesh that has that axis, so
        evaluate on one device with a copy that has ``context_axis=None`` (same parameters).
      fuse_features: True (the default): the layer hands :func:`dpfp_jax.fast_weight` the raw
        q, k (width ``head_dim``) and the feature map with its normalisation
        (:class:`dpfp_jax.Features`), so the op applies it where it uses q and k and its
        backward keeps them at width d, not K (docs/math.md). False: the layer applies the map and
        hands the op phi(q), phi(k), as before; the same outputs and gradients to float32
        rounding, for comparison. ``feature_map="favor"`` always takes the latter (its random
        projection is an array, which ``Features`` does not carry).
      gate: None (no decay: the paper's fast weights) or ``"gated_deltanet"``: a per-step decay
        ``alpha_t`` of the memory before each write, from the input as in Gated DeltaNet (Yang,
        Kautz, Hatamizadeh, ICLR 2025; :mod:`dpfp_jax.core.gate`), passed to
        :func:`dpfp_jax.fast_weight` as ``log_decay``: one more projection column and two
        parameters (``gate_a_log``, ``gate_dt_bias``) per head. Not with
        ``normalization="attention"`` (its key sum does not decay); with ``impl="pallas"`` on a TPU
        or a GPU (there the fused chunk kernel where it runs, from one chunk on, the fused recurrent
        one otherwise).
    """

    feature_map: FeatureMapLike = "dpfp"
    nu: int = 1
    num_features: int = 64
    favor_seed: int = 0
    rule: str = "delta"
    normalization: str = "sum"
    eps: float = 1e-6
    allow_unbounded_delta: bool = False
    impl: str = "auto"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    context_axis: str | None = None
    fuse_features: bool = True
    gate: str | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names, in declaration order."""
        return tuple(field.name for field in dataclasses.fields(FastWeightSettings))

    def settings(self) -> dict[str, Any]:
        """``{name: value}`` of every setting."""
        return settings_of(self)

    @classmethod
    def from_kwargs(cls, owner: str, kwargs: Mapping[str, Any]) -> FastWeightSettings:
        """The settings given as keyword arguments to ``owner`` (the rest default); a TypeError
        naming ``owner`` and the argument for a name that is not a setting."""
        for name in kwargs:
            if name not in cls.names():
                raise TypeError(f"{owner} got an unexpected keyword argument {name!r}; its fast-weight settings "
                                f"are {', '.join(cls.names())}")
        return FastWeightSettings(**kwargs)


def settings_of(layer: object) -> dict[str, Any]:
    """``{name: value}`` of every setting of an object that has them as attributes (a
    :class:`FastWeightSettings`, a linen module inheriting them, an NNX module holding them)."""
    return {name: getattr(layer, name) for name in FastWeightSettings.names()}
