"""Forward and forward+backward time and compiled temp memory of the fast-weight op.

Compares our ``reference`` (scan + autodiff) and ``scan`` (custom backward) with
jax-linear-attention's ``reference`` and ``chunked`` deltanet on the same delta-rule inputs,
float32, and prints each as a ratio to our ``scan``. Peers that are not installed are skipped
with a note (``pip install -e '.[bench]'`` brings jax-linear-attention).

    python benchmarks/ops.py            # T in {256, 1024, 4096}, K in {128, 256}
    python benchmarks/ops.py --quick    # T in {256, 1024}, K = 128: a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_name, temp_mb, time_ms  # noqa: E402

import dpfp_jax as dj  # noqa: E402

FastWeightFn = Callable[..., tuple[jax.Array, jax.Array]]


def ours(impl: str) -> FastWeightFn:
    def fn(q, k, v, beta):
        return dj.fast_weight(q, k, v, beta, rule="delta", impl=impl)

    return fn


def peers() -> tuple[dict[str, FastWeightFn], str | None]:
    try:
        from jla.ops import linear_attention
    except ImportError as err:
        return {}, f"jax-linear-attention not installed ({err}); `pip install -e '.[bench]'` adds it"

    def peer(impl: str) -> FastWeightFn:
        def fn(q, k, v, beta):
            return linear_attention(
                "deltanet", q, k, v, beta=beta, impl=impl, scale=1.0, output_final_state=True
            )

        return fn

    return {"jla reference": peer("reference"), "jla chunked": peer("chunked")}, None


def make_inputs(batch: int, time: int, heads: int, key_dim: int, value_dim: int, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 4)
    shape = (batch, time, heads, key_dim)
    q = dj.sum_norm(jax.nn.relu(jax.random.normal(ks[0], shape, dtype)))
    k = dj.sum_norm(jax.nn.relu(jax.random.normal(ks[1], shape, dtype)))
    v = jax.random.normal(ks[2], (batch, time, heads, value_dim), dtype)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (batch, time, heads), dtype))
    return q, k, v, beta


def forward_and_backward(fn: FastWeightFn) -> tuple[Callable, Callable]:
    forward = jax.jit(fn)

    def loss(q, k, v, beta):
        out, state = fn(q, k, v, beta)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)

    return forward, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def measure(fns: dict[str, FastWeightFn], args, repeats: int) -> dict[str, tuple[float, float, float, float]]:
    rows = {}
    for name, fn in fns.items():
        forward, backward = forward_and_backward(fn)
        rows[name] = (
            time_ms(forward, *args, repeats=repeats),
            time_ms(backward, *args, repeats=repeats),
            temp_mb(forward, *args),
            temp_mb(backward, *args),
        )
    return rows


def print_table(rows: dict[str, tuple[float, float, float, float]], baseline: str) -> None:
    base_fwd, base_bwd, _, base_mem = rows[baseline]
    print("| impl | fwd ms | fwd+bwd ms | fwd temp MB | fwd+bwd temp MB | fwd+bwd time / ours | "
          "fwd+bwd temp / ours |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (fwd, bwd, fwd_mem, bwd_mem) in rows.items():
        print(f"| {name} | {fwd:.2f} | {bwd:.2f} | {fwd_mem:.1f} | {bwd_mem:.1f} | "
              f"{bwd / base_bwd:.2f}x | {bwd_mem / max(base_mem, 1e-6):.1f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="T in {256, 1024}, K = 128, fewer repeats")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    lengths, key_dims = ((256, 1024), (128,)) if args.quick else ((256, 1024, 4096), (128, 256))
    repeats = args.repeats or (3 if args.quick else 5)

    fns = {"ours reference": ours("reference"), "ours scan": ours("scan")}
    peer_fns, note = peers()
    fns.update(peer_fns)
    print(f"# fast_weight delta rule, float32, B={args.batch}, H={args.heads}, V={args.value_dim}")
    print(f"machine: {machine_name()}")
    if note:
        print(f"note: {note}")
    for key_dim in key_dims:
        for length in lengths:
            inputs = make_inputs(args.batch, length, args.heads, key_dim, args.value_dim)
            print(f"\n## T={length}, K={key_dim}\n")
            print_table(measure(fns, inputs, repeats), baseline="ours scan")


if __name__ == "__main__":
    main()
