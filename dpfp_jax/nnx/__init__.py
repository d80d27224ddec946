"""Flax NNX modules: the twins of :mod:`dpfp_jax.nn`, thin layers over the same shared math.

Same attributes, same op and math (:mod:`dpfp_jax.core`), same parameter names and shapes
(:func:`from_linen_params` / :func:`to_linen_params` carry weights across), with NNX's idioms:
``rngs=nnx.Rngs(...)``, the input width given when constructed (``in_features`` where linen
infers it), decode state in ``nnx.Cache`` variables made by ``init_cache(batch)``, and
``kernel_axes=KernelAxes(...)`` annotating the parameters with ``nnx.with_partitioning``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from dpfp_jax import nnx as djnnx
    >>> model = djnnx.DPFPformer(32, 2, num_heads=2, head_dim=16, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((4, 8, 32))).shape
    (4, 8, 32)
"""

from dpfp_jax.core.attention import NORMALIZATIONS
from dpfp_jax.core.settings import FastWeightSettings
from dpfp_jax.core.transformer import stack_layer_params, unstack_layer_params
from dpfp_jax.nnx.attention import DPFPAttention, FastWeightAttention
from dpfp_jax.nnx.cell import DPFPCell
from dpfp_jax.nnx.params import from_linen_params, to_linen_params
from dpfp_jax.nnx.partitioning import KernelAxes
from dpfp_jax.nnx.self_attention import DPFPSelfAttention
from dpfp_jax.nnx.transformer import DPFPformer, FeedForward

__all__ = [
    "NORMALIZATIONS",
    "DPFPAttention",
    "DPFPCell",
    "DPFPSelfAttention",
    "DPFPformer",
    "FastWeightAttention",
    "FastWeightSettings",
    "FeedForward",
    "KernelAxes",
    "from_linen_params",
    "to_linen_params",
    "stack_layer_params",
    "unstack_layer_params",
]
