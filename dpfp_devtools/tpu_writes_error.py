"""The bfloat16 error of the Pallas TPU kernel (interpret mode) and of the XLA chunk form, against float32.

The TPU kernel keeps the delta rule's writes u in bfloat16 when v is bfloat16
(``pallas_kernels.tpu.writes_dtype``) and uses that rounded u in its own forward too. This
measures what that costs: bfloat16 inputs through the kernel (interpreted on the CPU) and through
``dj.fast_weight(impl="chunk")``, each against the float32 ``reference`` on the same numbers
(the bfloat16 inputs, upcast); per result (outputs, final state) and per gradient of a fixed
random linear loss on both, the largest error relative to the reference's largest magnitude
(as ``tests/helpers.assert_relative_error`` measures). Counted, not timed: the machine's load
does not change the figures.

It imports only what the library had before the change, so the same file run against another
tree (``PYTHONPATH=<that tree> python <this file>``) gives that tree's figures.

Run: ``python -m dpfp_devtools.tpu_writes_error [--time 2048] [--key-dim 128]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

import dpfp_jax as dj
from dpfp_devtools.workloads import make_inputs

NAMES = ("out", "final state", "dq", "dk", "dv", "dbeta", "d initial state")


def values_and_grads(impl: str, inputs: dict, chunk_size: int) -> list[np.ndarray]:
    """``[out, final state, dq, dk, dv, dbeta, d initial state]`` of ``impl`` on ``inputs``, float32."""
    out_weights = jax.random.normal(jax.random.key(1), inputs["v"].shape, jnp.float32)
    state_weights = jax.random.normal(jax.random.key(2), inputs["initial_state"].shape, jnp.float32)

    def loss(q, k, v, beta, state):
        out, final = dj.fast_weight(q, k, v, beta, initial_state=state, impl=impl, chunk_size=chunk_size)
        return jnp.sum(out.astype(jnp.float32) * out_weights) + jnp.sum(final * state_weights), (out, final)

    args = [inputs[n] for n in ("q", "k", "v", "beta", "initial_state")]
    (_, (out, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True))(*args)
    return [np.asarray(x, np.float32) for x in (out, final, *grads)]


def relative_errors(got: list[np.ndarray], want: list[np.ndarray]) -> list[float]:
    return [float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-6)) for g, w in zip(got, want, strict=True)]


def measure(time: int = 2048, key_dim: int = 128, heads: int = 2, value_dim: int = 64,
            chunk_size: int = 64) -> dict[str, list[float]]:
    """Per impl (``"pallas"`` interpreted, ``"chunk"``), the relative errors of :data:`NAMES` with
    bfloat16 inputs, against the float32 reference on the same (rounded) numbers."""
    bf16 = make_inputs(7, batch=1, time=time, heads=heads, key_dim=key_dim, value_dim=value_dim,
                       dtype=jnp.bfloat16, with_state=True)
    bf16["initial_state"] = 0.1 * bf16["initial_state"].astype(jnp.float32)  # the state is float32
    exact = {n: x.astype(jnp.float32) for n, x in bf16.items()}
    want = values_and_grads("reference", exact, chunk_size)
    with pltpu.force_tpu_interpret_mode():
        pallas = values_and_grads("pallas", bf16, chunk_size)
    return {"pallas": relative_errors(pallas, want),
            "chunk": relative_errors(values_and_grads("chunk", bf16, chunk_size), want)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=int, default=2048)
    parser.add_argument("--key-dim", type=int, default=128)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"delta rule, B=1, T={args.time}, H=2, K={args.key_dim}, V=64, chunks of 64, bfloat16 inputs; "
          "max |error| / max |float32 reference|")
    errors = measure(args.time, args.key_dim)
    print("| impl | " + " | ".join(NAMES) + " |")
    print("|---|" + "---:|" * len(NAMES))
    for impl, row in errors.items():
        print(f"| {impl} | " + " | ".join(f"{e:.1e}" for e in row) + " |")


if __name__ == "__main__":
    main()
