"""Eager calls against jitted ones: what a call costs outside ``jax.jit`` once its shapes are known.

``dj.fast_weight`` called eagerly (no ``jit`` around it) runs an internal ``jax.jit`` keyed on its
static options and the inputs' shapes and dtypes (``dpfp_jax/ops/fast_weight/eager.py``), so only
the first call with new shapes traces and compiles. This prints, per impl, the first eager call,
the median of later eager calls and the median of calls to ``jax.jit(dj.fast_weight)``; then the
same for a linen ``FastWeightAttention``'s ``apply`` and for one token of the README's decoding loop
(a ``decode=True`` ``DPFPformer``), eager and jitted. Delta rule, float32, one
row per line, with the machine and its load average (a shared machine's numbers move with its load).

    python -m benchmarks.eager            # B=2, T=256, H=4, K=32, V=16
    python -m benchmarks.eager --time 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax

import dpfp_jax as dj
from benchmarks.common import machine_name


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return (time.perf_counter() - start) * 1e3


def first_and_median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """The first call's wall time and the median of ``repeats`` later calls, in ms."""
    first = _ms(fn)
    return first, statistics.median(_ms(fn) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", type=int, default=256, help="sequence length T")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first")
    args = parser.parse_args()
    batch, heads, key_dim, value_dim = 2, 4, 32, 16
    x = jax.random.normal(jax.random.key(0), (4, batch, args.time, heads, key_dim))
    q, k = dj.sum_norm(jax.nn.relu(x[0])), dj.sum_norm(jax.nn.relu(x[1]))
    v, beta = x[2, ..., :value_dim], jax.nn.sigmoid(x[3, ..., 0])
    print(f"# {machine_name()}; load average {' '.join(f'{a:.2f}' for a in os.getloadavg())}")
    print(f"# delta rule, float32, B={batch}, T={args.time}, H={heads}, K={key_dim}, V={value_dim}")
    print("| call | first ms | later ms (median) | jitted ms (median) | later / jitted |")
    print("|---|---:|---:|---:|---:|")
    jitted_op = jax.jit(dj.fast_weight, static_argnames=("rule", "impl", "chunk_size"))
    for impl in ("scan", "chunk", "auto"):
        first, later = first_and_median_ms(lambda impl=impl: dj.fast_weight(q, k, v, beta, impl=impl), args.repeats)
        _, jitted = first_and_median_ms(lambda impl=impl: jitted_op(q, k, v, beta, impl=impl), args.repeats)
        print(f"| dj.fast_weight(impl={impl!r}) | {first:.1f} | {later:.2f} | {jitted:.2f} | {later / jitted:.1f}x |")

    layer = dj.FastWeightAttention(num_heads=heads, head_dim=value_dim)
    inputs = x[2, ..., 0, :].reshape(batch, args.time, key_dim)[..., :heads * value_dim // 2]
    variables = layer.init(jax.random.key(1), inputs)
    first, later = first_and_median_ms(lambda: layer.apply(variables, inputs), args.repeats)
    jitted_apply = jax.jit(layer.apply)
    _, jitted = first_and_median_ms(lambda: jitted_apply(variables, inputs), args.repeats)
    print(f"| FastWeightAttention.apply (linen) | {first:.1f} | {later:.2f} | {jitted:.2f} | {later / jitted:.1f}x |")

    # The README's decoding loop: one token per eager apply of a decode=True DPFPformer.
    decoder = dj.DPFPformer(64, 2, num_heads=4, head_dim=16, decode=True)
    tokens = jax.random.normal(jax.random.key(2), (2, args.repeats + 1, 64))
    decoder_variables = decoder.init(jax.random.key(3), tokens)

    def decode_step(cache, token):
        return decoder.apply({"params": decoder_variables["params"], "cache": cache}, token, mutable=["cache"])

    jitted_step = jax.jit(decode_step)
    times = {}
    for name, step in (("eager", decode_step), ("jitted", jitted_step)):
        cache, times[name] = decoder_variables["cache"], []
        for t in range(args.repeats + 1):
            start = time.perf_counter()
            _, updates = jax.block_until_ready(step(cache, tokens[:, t : t + 1]))
            times[name].append((time.perf_counter() - start) * 1e3)
            cache = updates["cache"]
    first, later = times["eager"][0], statistics.median(times["eager"][1:])
    jitted = statistics.median(times["jitted"][1:])
    print(f"| DPFPformer decode step (linen, 2 layers) | {first:.1f} | {later:.2f} | {jitted:.2f} | "
          f"{later / jitted:.1f}x |")


if __name__ == "__main__":
    main()
