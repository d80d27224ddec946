"""How precise the chunked kernel's tensor-core dots must be: TF32 in one pass or three.

On the GPU, the chunked kernels (``pallas_kernels.chunk_walk``, ``fused_chunk``) run their matmuls
in TF32 (10-bit mantissa): three passes (hi*hi + hi*lo + lo*hi) for float32 inputs, one for
bfloat16/float16 inputs. This script measures that choice on any machine by emulating both in the
chunk form's ``lax.scan`` walk (``xla_walk`` given a matmul doing the same sums as the kernel:
operands rounded to TF32 with round-to-nearest-even, products and sums in float32) and comparing
outputs and gradients with ``impl="reference"`` computed in float32.

Usage:
    python -m benchmarks.dot_precision
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import dpfp_jax as dj
from benchmarks.common import delta_rule_inputs, machine_name, reported_run
from dpfp_devtools.workloads import worst_relative_error
from dpfp_jax.ops.fast_weight.chunk import XLA_WALK, fast_weight_chunk, xla_walk
from dpfp_jax.ops.fast_weight.common import zero_state


def to_tf32(x: jax.Array) -> jax.Array:
    """Round float32 to TF32's 10 mantissa bits, to nearest, ties to even."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = (bits + jnp.uint32(0x0FFF) + ((bits >> 13) & 1)) & jnp.uint32(0xFFFFE000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def float32_matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """The chunk form's own product: an einsum in float32 at HIGHEST precision."""
    return jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST)


def one_pass(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return float32_matmul(spec, to_tf32(a), to_tf32(b))


def three_pass(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    a_hi, b_hi = to_tf32(a), to_tf32(b)
    a_lo, b_lo = to_tf32(a - a_hi), to_tf32(b - b_hi)
    return float32_matmul(spec, a_hi, b_hi) + float32_matmul(spec, a_hi, b_lo) + float32_matmul(spec, a_lo, b_hi)


def reference(q, k, v, beta):
    return dj.fast_weight(q, k, v, beta, rule="delta", impl="reference")


def chunk_with(walk):
    """``impl="chunk"`` at chunk_size 64 with ``walk``: the state-independent WY work around the
    walk keeps its float32 matmuls whatever products the walk does."""

    def op(q, k, v, beta):
        return fast_weight_chunk(q, k, v, beta, zero_state(q, v, jnp.float32), rule="delta", scale=1.0,
                                 chunk_size=64, walk=walk)

    return op


def outputs_and_gradients(op, q, k, v, beta) -> list[jax.Array]:
    def loss(q, k, v, beta):
        out, state = op(q, k, v, beta)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state), (out, state)

    (_, values), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, beta)
    return jax.tree.leaves((values, grads))


def main() -> None:
    print(f"Delta rule, chunk_size 64: worst relative error over outputs, final state and gradients "
          f"against impl='reference' in float32. Machine: {machine_name()}.\n")
    print("| B, T, H, K, V | inputs | float32 walk | TF32, three passes | TF32, one pass |")
    print("|---|---|---|---|---|")
    variants = [XLA_WALK, xla_walk(three_pass), xla_walk(one_pass)]
    for shape in [(2, 200, 2, 128, 16), (2, 200, 2, 384, 16), (1, 4096, 2, 128, 64)]:
        for dtype in (jnp.float32, jnp.bfloat16):
            inputs = delta_rule_inputs(*shape, dtype)
            want = outputs_and_gradients(reference, *[x.astype(jnp.float32) for x in inputs])
            errors = [worst_relative_error(outputs_and_gradients(chunk_with(walk), *inputs), want)
                      for walk in variants]
            print(f"| {', '.join(map(str, shape))} | {jnp.dtype(dtype).name} | "
                  + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    with reported_run():
        main()
