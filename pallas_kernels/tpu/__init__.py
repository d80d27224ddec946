"""Pallas TPU (Mosaic) kernels: the fused chunked delta/sum rule with the state in VMEM.

- ``fused_chunk``: the kernels, their ``custom_vjp`` and the entry point ``fused_chunk_tpu``;
  ``forward_plan`` / ``backward_plan`` give each ``pallas_call``'s grid, block specs and flops
  (the dev tools count HBM traffic from them; ``hbm_bytes`` and ``cost_estimate`` tell XLA), and
  ``spread_heads`` how a call's heads are spread over programs for the chip compiled for.
- ``layout``: how the kernel reads per-step arrays where XLA keeps them (q, k row-major in blocks
  of all heads; V = 64 arrays with the steps on the lanes) and pads T and K.
- ``interpret``: whether the caller is inside ``pltpu.force_tpu_interpret_mode()``.
"""

from pallas_kernels.tpu.fused_chunk import (
    backward_plan,
    call_dims,
    cost_estimate,
    forward_plan,
    fused_chunk_tpu,
    hbm_bytes,
    spread_heads,
    writes_dtype,
)
from pallas_kernels.tpu.interpret import tpu_interpret_params

__all__ = ["backward_plan", "call_dims", "cost_estimate", "forward_plan", "fused_chunk_tpu", "hbm_bytes",
           "spread_heads", "tpu_interpret_params", "writes_dtype"]
