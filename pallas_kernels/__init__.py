"""Pallas GPU kernels for the fast-weight op, reached through ``dpfp_jax.fast_weight(impl="pallas")``.

Every kernel also runs in Pallas's interpret mode (``interpret=True``), which is how the test
suite checks them on machines without a GPU.
"""

from pallas_kernels.fused_recurrent import MAX_KEY_DIM, fused_recurrent

__all__ = ["MAX_KEY_DIM", "fused_recurrent"]
