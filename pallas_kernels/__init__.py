"""Pallas kernels for the fast-weight op (GPU and TPU), reached through ``dpfp_jax.fast_weight(impl="pallas")``.

Kernels are grouped by backend: ``pallas_kernels.triton`` holds the GPU ones (lowered through
Triton) and the tiles they share (``triton.tiles``: padding, value blocks, launch settings,
tensor-core dots); ``pallas_kernels.tpu`` the TPU one (Mosaic) and its layout helpers.
``validation`` (the argument checks) and ``padding`` are backend-neutral.

- ``fused_chunk_tpu`` (TPU): the chunkwise WY form, sum and delta rules, one program per batch
  row (or per group of a row's heads) walking blocks of steps on a sequential grid axis, a loop
  over its heads in each, with the float32 states in VMEM, reading the arrays in place (no
  copies around it; head-major copies of q and k where the chip's VMEM is too small for blocks
  of all heads), the chunk step and the per-chunk
  triangular inverse as MXU matmuls; its ``custom_vjp`` backward walks chunks in reverse,
  rebuilding start states from the stored writes. Gated (``log_decay``): the decays computed in
  the kernel, and the state entering each block kept for the backward. No packed documents
  (a caller gives ``log alpha = -inf`` at a document's first step).
  Runs in Pallas's TPU interpret mode anywhere (``interpret=True`` or inside
  ``pltpu.force_tpu_interpret_mode()``). Given ``features=KernelFeatures(...)`` it reads q, k
  at width d and computes the feature map (DPFP, ...) and its VJP itself (``tpu/feature_map.py``).
- ``fused_chunk``: the chunkwise form with each chunk's whole step (WY writes, outputs, state
  update) in one program per (batch x head, value block), walking chunks with its slice of W on
  chip; ``impl="pallas"`` from one chunk on. The delta rule's per-chunk WY inverse comes from the
  caller (``wy_inverse=``): the op composes the kernels, the kernels import nothing of it. With
  ``features=DPFP(...)`` it reads q, k at width d and computes DPFP (and its VJP) on chip.
  Gated (``log_decay``): the decays built on chip from each chunk's cumulative log sums, and the
  state entering every few chunks kept for the backward.
- ``fused_recurrent``: one program per (batch x head, value block) walks time with its slice of W
  on chip; the backward rebuilds states in-kernel (the paper's CUDA kernel, redone).
- ``chunk_walk`` (``forward_recurrence``, ``backward_recurrence``): only the chunkwise form's
  sequential inter-chunk walk, forward and backward, with matmuls per chunk;
  ``fast_weight_chunk(..., walk=chunk_walk())`` uses it.

Each entry point checks its own arguments (``validation``: rule, beta, shapes, K <= ``MAX_KEY_DIM``);
``fused_chunk`` and ``fused_recurrent`` take ``scale`` as a run-time value, so it may be traced.

Packed documents: ``fused_chunk`` and ``fused_recurrent`` take ``resets`` (bool ``[B, T]``, True
where a step starts a new document: the state is zero before it), and ``chunk_walk``'s functions
the chunk form's ``keep`` and ``states``. The fused kernels keep nothing more for their backward:
after a reset they rebuild the discarded state by walking the previous document forward again
from the stored writes; the walk alone stores each chunk's start state, as the XLA walk does.

Gated fast weights: ``fused_chunk``, ``fused_recurrent`` and ``chunk_walk``'s functions take the
decay gate (``log_decay [B, T, H]``; the walk the chunk form's per-chunk ``decay``), forward and
backward, without dividing by it.

DPFP on chip: ``fused_chunk`` and ``fused_recurrent`` (without ``resets`` or ``log_decay``) take
``features=DPFP(...)`` and read q, k at width d (``triton/dpfp.py``).

Every kernel also runs in Pallas's interpret mode (``interpret=True``), which is how the test
suite checks what they compute on machines without a GPU or TPU; the dev-only
``dpfp_devtools.triton_lowering`` lowers the GPU ones to Triton IR for a named GPU, and
``dpfp_devtools.tpu`` compiles the TPU one with libtpu for a named TPU slice, which is how it
checks that they can become GPU and TPU kernels.
"""

from pallas_kernels.tpu import fused_chunk_tpu
from pallas_kernels.tpu.feature_map import KernelFeatures
from pallas_kernels.triton.chunk_recurrence import backward_recurrence, chunk_walk, forward_recurrence
from pallas_kernels.triton.dpfp import DPFP
from pallas_kernels.triton.fused_chunk import fused_chunk
from pallas_kernels.triton.fused_recurrent import fused_recurrent
from pallas_kernels.validation import MAX_KEY_DIM

__all__ = ["DPFP", "MAX_KEY_DIM", "KernelFeatures", "backward_recurrence", "chunk_walk", "forward_recurrence",
           "fused_chunk", "fused_chunk_tpu", "fused_recurrent"]
