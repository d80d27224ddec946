"""Pallas TPU (Mosaic) kernels: the fused chunked delta/sum rule with the state in VMEM.

- ``fused_chunk``: the kernels, their ``custom_vjp`` and the entry point ``fused_chunk_tpu``;
  ``forward_plan`` / ``backward_plan`` give each ``pallas_call``'s grid and block specs (the dev
  tools count HBM traffic from them).
- ``layout``: how per-step arrays sit in HBM and in the kernel's 128-lane blocks (V = 64, K not a
  multiple of 128).
- ``interpret``: whether the caller is inside ``pltpu.force_tpu_interpret_mode()``.
"""

from pallas_kernels.tpu.fused_chunk import backward_plan, call_dims, forward_plan, fused_chunk_tpu
from pallas_kernels.tpu.interpret import tpu_interpret_params

__all__ = ["backward_plan", "call_dims", "forward_plan", "fused_chunk_tpu", "tpu_interpret_params"]
