"""HBM traffic of the Pallas TPU kernel, counted from its own block specs (no TPU needed).

Mosaic's pipeline copies an operand's block between HBM and VMEM at a grid step only when its
block index differs from the previous step's (a state block whose index stays put over the
blocks is read once per batch row, an output block written once when the walk leaves it). So the
bytes a ``pallas_call`` moves are: for each operand, its block's bytes times the number of runs
of equal consecutive block indices over the grid, walked in order (the last axis fastest). An
operand placed whole in SMEM (the scale) is read once. :func:`kernel_bytes` does that walk on
the ``CallPlan`` the kernel itself is launched from (``pallas_kernels.tpu.forward_plan`` /
``backward_plan``).

:func:`minimum_bytes` is what any implementation must move: read q, k, v, beta (and the initial
state) once and write the outputs (and the final state); the backward reads the same inputs and
the gradients of the outputs and final state, and writes the gradients of q, k, v, beta and the
initial state. Work outside the kernel (padding T to whole blocks and K to whole lane tiles when
they are not; ``pallas_kernels/tpu/layout.py``) is not counted by either.

:func:`features_table` compares the kernel that computes the feature map itself (q, k read at
width d) with the one given phi(q), phi(k) (read at K = 2 nu d), against the minimum for the raw
inputs (width d).
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp

LANES, SUBLANES = 128, 8


def _block_bytes(spec, shape, tiled: bool = False) -> int:
    itemsize = jnp.dtype(shape.dtype).itemsize
    block = list(shape.shape if spec.block_shape is None else (1 if d is None else d for d in spec.block_shape))
    if tiled and spec.block_shape is not None and len(block) >= 2:
        # HBM tiles: 8 rows by 128 lanes (XLA's T(8,128) for 32-bit arrays; T(8,128)(2,1) for 16-bit
        # ones, which packs pairs of rows: an [8, 4096, 8, 128] bfloat16 array takes exactly its bytes).
        block[-1] = -(-block[-1] // LANES) * LANES
        block[-2] = -(-block[-2] // SUBLANES) * SUBLANES
    return math.prod(block) * itemsize


def kernel_bytes(plan, tiled: bool = False) -> int:
    """HBM bytes one call of the kernel described by ``plan`` (a ``CallPlan``) reads and writes.

    ``tiled``: count each block as the whole HBM tiles it spans (a 64-wide block is half of each
    128-lane tile it touches, and a two-row block two rows of each 8-row tile); else its own bytes.

    Example (two heads, 32 steps in chunks of 16, K = 128, V = 64, float32; the sum rule):
        >>> import jax.numpy as jnp
        >>> from pallas_kernels.tpu import call_dims, forward_plan
        >>> dims = call_dims((1, 32, 2, 128), 64, 16)
        >>> plan = forward_plan(dims, jnp.float32, jnp.float32, jnp.float32, delta=False, keep_writes=False)
        >>> kernel_bytes(plan) == minimum_bytes(1, 32, 2, 128, 64, 4, delta=False, backward=False) + 4  # + the scale
        True
    """
    total = 0
    for spec, shape in (*plan.inputs, *plan.outputs):
        if spec.block_shape is None:
            total += _block_bytes(spec, shape, tiled)
            continue
        previous, runs = None, 0
        for point in itertools.product(*(range(size) for size in plan.grid)):
            index = tuple(int(i) for i in spec.index_map(*point))
            runs += index != previous
            previous = index
        total += runs * _block_bytes(spec, shape, tiled)
    return total


def minimum_bytes(batch: int, length: int, heads: int, key_dim: int, value_dim: int, itemsize: int, *,
                  delta: bool, backward: bool, state_key_dim: int | None = None) -> int:
    """The least HBM traffic of the op (inputs of ``itemsize`` bytes, states float32).

    Forward: read q, k, v, beta (delta rule) and the initial state; write the outputs and the final
    state. Backward: read q, k, v, beta, the outputs' and the final state's gradients; write the
    gradients of q, k, v, beta and the initial state. ``state_key_dim``: the states' K when q and k
    are read at another width (raw q, k of width ``key_dim`` = d, the feature map in the kernel).
    """
    steps = batch * length * heads
    per_step = (2 * key_dim + value_dim + (1 if delta else 0)) * itemsize
    state = batch * heads * (key_dim if state_key_dim is None else state_key_dim) * value_dim * 4
    if not backward:
        return steps * (per_step + value_dim * itemsize) + 2 * state
    return steps * (2 * per_step + value_dim * itemsize) + 2 * state


def table(key_dims=(128, 256, 384, 512, 1024), batch: int = 8, length: int = 4096, heads: int = 8,
          value_dim: int = 64, dtype=jnp.bfloat16, chunk_size: int = 64) -> str:
    """A markdown table of the delta rule's kernel traffic against the minimum, per K: the forward
    without a gradient (no writes stored), the forward of a training step (the writes u stored)
    and the backward, each as the blocks' own bytes and as whole HBM tiles (``kernel_bytes``'s
    ``tiled``), over the minimum. MB are 10^6 bytes."""
    from pallas_kernels.tpu import backward_plan, call_dims, forward_plan

    itemsize = jnp.dtype(dtype).itemsize
    lines = ["| K | fwd MB | fwd min MB | fwd / min | training fwd MB | training fwd / min | bwd MB | bwd min MB | "
             "bwd / min | in whole tiles: fwd, training fwd, bwd / min |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key_dim in key_dims:
        dims = call_dims((batch, length, heads, key_dim), value_dim, chunk_size)
        plans = (forward_plan(dims, dtype, dtype, dtype, delta=True, keep_writes=False),
                 forward_plan(dims, dtype, dtype, dtype, delta=True, keep_writes=True),
                 backward_plan(dims, dtype, dtype, dtype, delta=True))
        forward, training, backward = (kernel_bytes(plan) for plan in plans)
        least = minimum_bytes(batch, length, heads, key_dim, value_dim, itemsize, delta=True, backward=False)
        least_backward = minimum_bytes(batch, length, heads, key_dim, value_dim, itemsize, delta=True, backward=True)
        tiled = ", ".join(f"{kernel_bytes(plan, tiled=True) / base:.2f}x"
                          for plan, base in zip(plans, (least, least, least_backward), strict=True))
        lines.append(f"| {key_dim} | {forward / 1e6:.1f} | {least / 1e6:.1f} | {forward / least:.2f}x | "
                     f"{training / 1e6:.1f} | {training / least:.2f}x | {backward / 1e6:.1f} | "
                     f"{least_backward / 1e6:.1f} | {backward / least_backward:.2f}x | {tiled} |")
    return "\n".join(lines)


def _delta_rule_bytes(dims, dtype) -> tuple[int, int, int]:
    """The delta rule's (forward, training forward, backward) bytes for ``dims``."""
    from pallas_kernels.tpu import backward_plan, forward_plan

    return tuple(kernel_bytes(plan) for plan in (
        forward_plan(dims, dtype, dtype, dtype, delta=True, keep_writes=False),
        forward_plan(dims, dtype, dtype, dtype, delta=True, keep_writes=True),
        backward_plan(dims, dtype, dtype, dtype, delta=True)))


def features_traffic(raw_dim: int, nu: int, batch: int = 8, length: int = 4096, heads: int = 8, value_dim: int = 64,
                     dtype=jnp.bfloat16, chunk_size: int = 64) -> dict[str, tuple[int, ...]]:
    """The delta rule's kernel bytes with DPFP-nu (sum-normalised) of width-``raw_dim`` q, k computed in
    the kernel (``"fused"``) and before it (``"unfused"``, K = 2 nu d), each as (forward, training
    forward, backward), and the minimum for the raw inputs (``"minimum"``: forward, backward; q, k at
    width d, the states at K).

    Example (nu = 3, d = 64, the issue's shape: the fused kernel moves about a third of the bytes):
        >>> bytes_ = features_traffic(64, 3)
        >>> round((bytes_["fused"][1] + bytes_["fused"][2]) / (bytes_["unfused"][1] + bytes_["unfused"][2]), 2)
        0.32
    """
    from pallas_kernels.tpu import call_dims
    from pallas_kernels.tpu.feature_map import KernelFeatures

    features = KernelFeatures("dpfp", raw_dim, nu, "sum")
    itemsize = jnp.dtype(dtype).itemsize
    shape = (batch, length, heads, raw_dim)
    return {
        "fused": _delta_rule_bytes(call_dims(shape, value_dim, chunk_size, features=features), dtype),
        "unfused": _delta_rule_bytes(call_dims((*shape[:3], features.width), value_dim, chunk_size), dtype),
        "minimum": tuple(minimum_bytes(batch, length, heads, raw_dim, value_dim, itemsize, delta=True, backward=b,
                                       state_key_dim=features.width) for b in (False, True)),
    }


def features_table(cases=((64, 3), (64, 1), (32, 3), (128, 3)), **shape) -> str:
    """A markdown table of :func:`features_traffic` per (d, nu): the fused kernel's bytes, over the
    unfused kernel's and over the minimum for the raw inputs; "training" is the training forward
    and the backward together. MB are 10^6 bytes."""
    lines = ["| d | nu | K | fused fwd MB | fused training fwd MB | fused bwd MB | fused / unfused: fwd, training fwd, "
             "bwd, training | fused / raw minimum: fwd, training fwd, bwd, training |",
             "|---:|---:|---:|---:|---:|---:|---|---|"]
    for raw_dim, nu in cases:
        counts = features_traffic(raw_dim, nu, **shape)
        fused, unfused, (least, least_backward) = counts["fused"], counts["unfused"], counts["minimum"]
        over_unfused = [f / u for f, u in zip(fused, unfused, strict=True)]
        over_unfused.append((fused[1] + fused[2]) / (unfused[1] + unfused[2]))
        over_minimum = [fused[0] / least, fused[1] / least, fused[2] / least_backward,
                        (fused[1] + fused[2]) / (least + least_backward)]
        lines.append(f"| {raw_dim} | {nu} | {2 * nu * raw_dim} | {fused[0] / 1e6:.1f} | {fused[1] / 1e6:.1f} | "
                     f"{fused[2] / 1e6:.1f} | {', '.join(f'{r:.2f}x' for r in over_unfused)} | "
                     f"{', '.join(f'{r:.2f}x' for r in over_minimum)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(features_table() if "--features" in sys.argv[1:] else table())
