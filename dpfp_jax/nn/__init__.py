"""Flax linen modules: thin layers over :func:`dpfp_jax.fast_weight` and the feature maps."""

from dpfp_jax.core.settings import FastWeightSettings
from dpfp_jax.core.transformer import stack_layer_params, unstack_layer_params
from dpfp_jax.nn.attention import NORMALIZATIONS, DPFPAttention, FastWeightAttention
from dpfp_jax.nn.cell import DPFPCell
from dpfp_jax.nn.self_attention import DPFPSelfAttention
from dpfp_jax.nn.transformer import DPFPformer, FeedForward

__all__ = [
    "NORMALIZATIONS",
    "DPFPAttention",
    "DPFPCell",
    "DPFPSelfAttention",
    "DPFPformer",
    "FastWeightAttention",
    "FastWeightSettings",
    "FeedForward",
    "stack_layer_params",
    "unstack_layer_params",
]
