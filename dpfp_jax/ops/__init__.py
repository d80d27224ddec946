"""Pure-function ops; one sub-package per op, its oracle beside its fast paths."""

from dpfp_jax.ops.fast_weight import IMPLS, RULES, check_delta_stability, fast_weight

__all__ = ["IMPLS", "RULES", "check_delta_stability", "fast_weight"]
