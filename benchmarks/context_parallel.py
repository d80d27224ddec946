"""Context parallelism (T sharded over devices): counted work, TPU memory without a TPU, CPU times.

``python -m benchmarks.context_parallel --flops`` prints the counted flops per chip and the
critical path (sequential chunk steps) of the scheme docs/context_parallel.md derives and of the
alternative, passing the state shard to shard, from the per-chunk counts below.

``--tpu`` (libtpu in ``DPFP_TPU_COMPILER``): compiles the forward+backward (``jax.grad`` of the sum
of the outputs and of the final state) for TPU v5e ``2x2`` with T sharded over P in {1, 2, 4}
chips (P = 1: the single-device op on one chip) and reads the per-chip temporaries and the bytes of
every collective in the compiled program. Minutes per program at T = 65536.

``--cpu``: in a fresh process with 4 host CPU devices, times the forward+backward with T sharded
over the 4 against the single-device chunk form on one of them. The 4 host devices share this
machine's cores, so the sharded time is the total work of the 4, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from dpfp_devtools.hlo import collective_bytes

MB = 1e6


# --------------------------------------------------------------------------- counted work
# Flops per chunk of C steps and one (batch, head) group, a multiply-add counted as 2; the
# triangular inverse as C^3 (its doubling: a few C^3 / 3 matmuls). docs/context_parallel.md
# lists where each term comes from.


@dataclass(frozen=True)
class Work:
    """Flops per step (summed over one group's chunks and divided by C) and sequential chunk walks."""

    flops_per_step: float
    walks: int  # sequential passes over the chunks of a slice


def chunk_forward(c: int, k: int, v: int) -> float:
    """The chunk form's forward: pieces (scores, Gram, inverse, U_tilde, Y, Q - S Y, S U_tilde) and
    the walk (Y W0, Q_eff W0, K^T U)."""
    return 8 * c * c * k + 4 * c * c * v + c**3 + 6 * c * k * v


def chunk_backward(c: int, k: int, v: int) -> float:
    """The chunk form's backward: pieces again (``8 C^2 K + 2 C^2 V + C^3``), the reverse walk (seven
    K x V products) and the pieces' own backward (seven ``C x C x K`` and four ``C x C x V`` products)."""
    return 22 * c * c * k + 10 * c * c * v + c**3 + 14 * c * k * v


def transition(c: int, k: int, v: int) -> float:
    """(M, N) of a slice: Gram, inverse, U_tilde, Y, and the walk over N (K x V) and M (K x K)."""
    return 4 * c * c * k + 2 * c * c * v + c**3 + 4 * c * k * v + 4 * c * k * k


def entering_gradient(c: int, k: int, v: int) -> float:
    """G of a slice: scores, Gram, inverse, Y, Q - S Y, and the state-gradient walk (three K x V products)."""
    return 8 * c * c * k + c**3 + 6 * c * k * v


def single(c: int, k: int, v: int) -> Work:
    return Work((chunk_forward(c, k, v) + chunk_backward(c, k, v)) / c, 2)


def ours(c: int, k: int, v: int) -> Work:
    """Per shard: (M, N), the forward from the true start (keeping the chunk form's residuals), G,
    and the chunk backward."""
    total = transition(c, k, v) + chunk_forward(c, k, v) + entering_gradient(c, k, v) + chunk_backward(c, k, v)
    return Work(total / c, 4)


def state_passing(c: int, k: int, v: int) -> Work:
    """Per shard the single-device work of its slice, but shard p waits for p - 1: P times the walks."""
    return single(c, k, v)


def check_counts(c: int = 64, k: int = 128, v: int = 64) -> str:
    """The per-chunk counts against XLA's ``cost_analysis()`` on one chunk (B = H = 1, T = C), where
    every scan runs once, so counting its body once is exact. In the forward+backward program XLA
    merges the backward's recomputed pieces with the forward's (the same computation, both alive
    in one program), so that row is compared with the count less one set of pieces."""
    from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk
    from dpfp_jax.ops.fast_weight.context_parallel import _entering_gradient, _transition

    q, values, beta = jnp.ones((1, c, 1, k)), jnp.ones((1, c, 1, v)), jnp.ones((1, c, 1))
    state = jnp.zeros((1, 1, k, v))

    def op(q, k, v, beta, w):
        return fast_weight_chunk(q, k, v, beta, w, rule="delta", scale=1.0, chunk_size=c)

    def pullback(q, k, v, beta, w, d_out, d_state):  # cotangents as inputs: nothing folds as a constant
        return jax.vjp(op, q, k, v, beta, w)[1]((d_out, d_state))

    def counted(fn, *args):
        return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

    pieces = 8 * c * c * k + 2 * c * c * v + c**3
    rows = [(f"chunk forward, C={c} K={k} V={v}", counted(op, q, q, values, beta, state), chunk_forward(c, k, v)),
            ("chunk forward+backward (less one set of pieces)", counted(pullback, q, q, values, beta, state, values,
                                                                       state),
             chunk_forward(c, k, v) + chunk_backward(c, k, v) - pieces),
            ("transition (M, N)", counted(lambda k, v, b: _transition("delta", k, v, b, None, jnp.float32, c), q,
                                          values, beta), transition(c, k, v)),
            ("G", counted(lambda q, k, b, d: _entering_gradient("delta", q, k, b, None, jnp.float32(1), d, c), q, q,
                          beta, values), entering_gradient(c, k, v))]
    lines = ["| program | cost_analysis() flops | counted | counted / XLA's |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {xla:,.0f} | {mine:,.0f} | {mine / xla:.3f} |" for name, xla, mine in rows]
    return "\n".join(lines)


def flops_table(length: int, heads: int, value_dim: int, chunk: int, shard_counts: list[int],
                key_dims: list[int]) -> str:
    """Per chip: flops, and the time they take on the critical path, both over the single device's.

    Ours: every chip works at once, so its time is its own work. State passing: chip p starts when
    chip p - 1 is done, so the time is P chips' work in a row, the single device's.
    """
    rows = ["| K | P | scheme | Gflop per chip | flops per chip / single's | sequential chunk steps per chip | "
            "time on the critical path / single's |", "|---:|---:|---|---:|---:|---:|---:|"]
    for k in key_dims:
        base = single(chunk, k, value_dim)
        total = base.flops_per_step * length * heads
        rows.append(f"| {k} | 1 | single device | {total / 1e9:.1f} | 1.00 | {2 * length // chunk} | 1.00 |")
        for shards in shard_counts:
            steps = length // shards * heads
            walks = length // shards // chunk
            mine, passing = ours(chunk, k, value_dim), state_passing(chunk, k, value_dim)
            for name, per_chip, critical, time_ratio in (
                    ("ours", mine.flops_per_step * steps, mine.walks * walks, mine.flops_per_step * steps / total),
                    ("state passing", passing.flops_per_step * steps, passing.walks * walks * shards, 1.0)):
                rows.append(f"| {k} | {shards} | {name} | {per_chip / 1e9:.1f} | {per_chip / total:.2f} | {critical} | "
                            f"{time_ratio:.2f} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- compiled programs


def sharded_op(name: str, mesh):
    """``fn(q, k, v, beta) -> (out, final state)`` with T sharded over ``mesh``'s "seq" axis (an Auto
    mesh, current in ``jax.set_mesh``): ours (``context_axis="seq"``, ``impl="chunk"`` or, for
    "ours-pallas", ``"pallas"``) or jax-linear-attention's
    ``context_parallel_linear_attention("deltanet", ...)`` (the ``bench`` extra), the same function."""
    import dpfp_jax as dj

    if name in ("ours", "ours-pallas"):
        impl = "pallas" if name == "ours-pallas" else "chunk"
        return lambda q, k, v, beta: dj.fast_weight(q, k, v, beta, impl=impl, context_axis="seq")
    from jla.distributed.context_parallel import context_parallel_linear_attention

    return lambda q, k, v, beta: context_parallel_linear_attention(
        "deltanet", q, k, v, beta=beta, mesh=mesh, axis="seq", output_final_state=True, scale=1.0)


def tpu_rows(key_dims: list[int], shard_counts: list[int], length: int, heads: int, value_dim: int,
             names: list[str]) -> str:
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from dpfp_devtools import tpu
    from dpfp_devtools.workloads import forward_and_backward
    from dpfp_devtools.workloads import ours as single_op

    rows = ["| K | chips P | op | fwd+bwd temp MB per chip | / one chip's chunk | collectives | collective MB per chip "
            "| compile s |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for k in key_dims:
        shapes = [(1, length, heads, k), (1, length, heads, k), (1, length, heads, value_dim), (1, length, heads)]
        args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
        one = None
        for shards in shard_counts:
            for name in ["chunk"] if shards == 1 else names:
                start = time.perf_counter()
                if shards == 1:
                    compiled = tpu.compile_for_tpu(forward_and_backward(single_op("chunk"), 4)[1], *args,
                                                   topology="v5e:2x2")
                else:
                    mesh = tpu.tpu_mesh("v5e:2x2", (shards,), ("seq",), axis_types=(AxisType.Auto,))
                    grad = forward_and_backward(sharded_op(name, mesh), 4)[1]
                    compiled = tpu.compile_for_tpu(grad, *(tpu.place(a, mesh, P(None, "seq")) for a in args),
                                                   mesh=mesh)
                seconds = time.perf_counter() - start
                temp = tpu.memory(compiled).temp_bytes / MB
                one = temp if shards == 1 else one
                count, size = collective_bytes(compiled.as_text())
                ratio = "" if one is None else f"{temp / one:.2f}x"
                rows.append(f"| {k} | {shards} | {name} | {temp:.1f} | {ratio} | {count} | {size / MB:.2f} | "
                            f"{seconds:.0f} |")
                print(rows[-1], flush=True)
    return "\n".join(rows)


def _bound(fn, args, mesh=None):
    """``fn`` with its arguments bound (``time_interleaved_ms`` passes one placeholder), called under
    ``jax.set_mesh(mesh)`` when given."""
    def call(_):
        if mesh is None:
            return fn(*args)
        with jax.set_mesh(mesh):
            return fn(*args)
    return call


def cpu_rows(key_dims: list[int], length: int, heads: int, value_dim: int, repeats: int, names: list[str]) -> str:
    """Run in a process with 4 host devices: the sharded ops against the single-device chunk form."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from benchmarks.common import time_interleaved_ms
    from dpfp_devtools.workloads import forward_and_backward, make_inputs
    from dpfp_devtools.workloads import ours as single_op

    mesh = jax.make_mesh((jax.device_count(),), ("seq",), axis_types=(AxisType.Auto,))
    rows = [f"| K | op | fwd+bwd ms | / single-device chunk's ({jax.device_count()} host devices share the cores) |",
            "|---:|---|---:|---:|"]
    for k in key_dims:
        inputs = make_inputs(0, batch=1, time=length, heads=heads, key_dim=k, value_dim=value_dim)
        args = tuple(inputs[n] for n in ("q", "k", "v", "beta"))
        on_one = jax.device_put(args, jax.devices()[0])
        sharded = tuple(jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in args)
        fns = {"single-device chunk": _bound(forward_and_backward(single_op("chunk"), 4)[1], on_one)}
        for name in names:
            fns[name] = _bound(forward_and_backward(sharded_op(name, mesh), 4)[1], sharded, mesh)
        times = time_interleaved_ms(fns, None, repeats=repeats)
        for name, ms in times.items():
            rows.append(f"| {k} | {name} | {ms:.0f} | {ms / times['single-device chunk']:.2f}x |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--check-counts", action="store_true", help="the per-chunk counts against cost_analysis()")
    parser.add_argument("--tpu", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--key-dims", type=int, nargs="+", default=None)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="--tpu: chips P")
    parser.add_argument("--length", type=int, default=None, help="T (65536 for --flops/--tpu, 8192 for --cpu)")
    parser.add_argument("--heads", type=int, default=None, help="H (8 for --flops/--tpu, 4 for --cpu)")
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", nargs="+", default=["ours"], choices=["ours", "ours-pallas", "jax-linear-attention"],
                        help="the sharded ops: ours with the chunk form or (--tpu only) the TPU kernel per "
                             "shard, jax-linear-attention's context_parallel (the bench extra)")
    parser.add_argument("--in-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.ops
    if args.flops:
        print(flops_table(args.length or 65536, args.heads or 8, args.value_dim, 64, [2, 4],
                          args.key_dims or [128, 512, 1024]))
    if args.check_counts:
        print(check_counts())
    if args.tpu:
        print(tpu_rows(args.key_dims or [128, 512], args.shards, args.length or 65536, args.heads or 8, args.value_dim,
                       names))
    if args.cpu and args.in_child:
        print(cpu_rows(args.key_dims or [128, 512], args.length or 8192, args.heads or 4, args.value_dim, args.repeats,
                       names))
    elif args.cpu:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        command = [sys.executable, "-m", "benchmarks.context_parallel", "--cpu", "--in-child", "--repeats",
                   str(args.repeats), "--value-dim", str(args.value_dim), "--ops", *names]
        for flag, value in (("--key-dims", args.key_dims), ("--length", args.length), ("--heads", args.heads)):
            if value is not None:
                command += [flag, *map(str, value if isinstance(value, list) else [value])]
        subprocess.run(command, env=env, check=True, cwd=root)


if __name__ == "__main__":
    main()
