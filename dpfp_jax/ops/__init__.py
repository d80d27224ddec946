"""Pure-function ops; one sub-package per op, its oracle beside its fast paths."""

from dpfp_jax.ops.fast_weight import IMPLS, RULES, fast_weight

__all__ = ["IMPLS", "RULES", "fast_weight"]
