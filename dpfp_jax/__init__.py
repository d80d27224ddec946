"""dpfp-jax: fast-weight (linear) attention with DPFP in JAX/Flax.

Example:
    >>> import jax.numpy as jnp
    >>> import dpfp_jax as dj
    >>> dj.dpfp(jnp.ones((4, 3, 256, 256)), nu=2).shape
    (4, 3, 256, 1024)
"""

from dpfp_jax.feature_maps import (
    FEATURE_MAPS,
    Features,
    apply_feature_map,
    dpfp,
    elu_plus_one,
    favor,
    favor_projection,
    feature_dim,
    identity,
    l2_norm,
    relu,
    sum_norm,
)
from dpfp_jax.nn import NORMALIZATIONS, DPFPAttention, DPFPCell, DPFPformer, FastWeightAttention
from dpfp_jax.ops import IMPLS, RULES, check_delta_stability, fast_weight

__version__ = "0.2.0"

__all__ = [
    "FEATURE_MAPS",
    "IMPLS",
    "NORMALIZATIONS",
    "RULES",
    "DPFPAttention",
    "DPFPCell",
    "DPFPformer",
    "FastWeightAttention",
    "Features",
    "apply_feature_map",
    "check_delta_stability",
    "dpfp",
    "elu_plus_one",
    "fast_weight",
    "favor",
    "favor_projection",
    "feature_dim",
    "identity",
    "l2_norm",
    "relu",
    "sum_norm",
]
