"""Context parallelism (T sharded over devices): counted work, TPU memory without a TPU, CPU times.

``python -m benchmarks.context_parallel --flops`` prints the counted flops per chip and the
critical path of the two schemes docs/context_parallel.md derives ("transition" and "relay", the
one the op picks per call marked) and of running the shards one after the other, from the
per-chunk counts of ``dpfp_jax/ops/fast_weight/context_cost.py``.

``--tpu`` (libtpu in ``DPFP_TPU_COMPILER``): compiles the forward+backward (``jax.grad`` of the sum
of the outputs and of the final state) for TPU v5e ``2x2`` with T sharded over P in {1, 2, 4}
chips (P = 1: the single-device op on one chip) and reads the per-chip temporaries and the bytes of
every collective in the compiled program. Minutes per program at T = 65536.

``--cpu``: in a fresh process with ``--devices`` (4) host CPU devices, times the forward+backward
with T sharded over them against the single-device chunk form on one of them. The host devices
share this machine's cores, so the sharded time is the total work, not a speed-up.
``--ops ours-transition ours-relay`` times the two schemes side by side (the scheme given, not
picked).

``--tpu-features`` (libtpu as for ``--tpu``): the same forward+backward compiled for v5e with T over
the last of ``--shards`` chips, DPFP (``--dim``, ``--nu``) inside the op (each shard's TPU kernel
or chunk form given the raw q, k) against it applied first, per ``--impls``; per-chip temporaries.

``--features-memory``: in a fresh process with ``--devices`` host CPU devices, compiles the
forward+backward with T sharded over them, the feature map inside the op (``features=``: each
shard keeps the raw d-wide q, k) against it applied first (the op given phi(q), phi(k)), for each
scheme, and reads the per-device temporaries from ``memory_analysis()``. Nothing runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dpfp_devtools.hlo import collective_bytes
from dpfp_jax.ops.fast_weight.context_cost import (
    SCHEMES,
    choose_scheme,
    chunk_backward,
    chunk_forward,
    critical_path,
    flops_per_chip,
)

MB = 1e6


# --------------------------------------------------------------------------- counted work
# The per-chunk counts (flops per chunk of C steps and one (batch, head) group) are the library's
# own, dpfp_jax/ops/fast_weight/context_cost.py, which also picks the scheme per call from them.


def check_counts(c: int = 64, k: int = 128, v: int = 64) -> str:
    """The per-chunk counts against XLA's ``cost_analysis()`` on one chunk (``dpfp_devtools.counts``:
    B = H = 1, T = C, where every scan runs once, so counting its body once is exact)."""
    from dpfp_devtools.counts import chunk_rows, walk_rows

    lines = ["| program | cost_analysis() flops | counted | counted / XLA's |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {xla:,.0f} | {mine:,.0f} | {mine / xla:.3f} |"
              for name, xla, mine in chunk_rows(c, k, v) + walk_rows(c, k, v)]
    return "\n".join(lines)


def flops_table(length: int, heads: int, value_dim: int, chunk: int, shard_counts: list[int],
                key_dims: list[int]) -> str:
    """Per chip: flops, sequential chunk steps and the flops on the critical path (what a chip does
    plus what it waits on), over the single device's, for the two schemes and for running the
    shards one after the other; "picked" marks ``choose_scheme``'s choice for the call."""
    rows = ["| K | P | scheme | Gflop per chip | flops per chip / single's | sequential chunk steps per chip | "
            "critical path / single's | picked |", "|---:|---:|---|---:|---:|---:|---:|---|"]
    for k in key_dims:
        per_chunk = chunk_forward(chunk, k, value_dim) + chunk_backward(chunk, k, value_dim)
        total = per_chunk * length // chunk * heads
        rows.append(f"| {k} | 1 | single device | {total / 1e9:.1f} | 1.00 | {2 * length // chunk} | 1.00 | |")
        for shards in shard_counts:
            chunks = length // shards // chunk
            picked = choose_scheme("delta", shards, chunk, k, value_dim)
            steps = {"transition": 4 * chunks, "relay": 2 * shards * chunks}
            for name in SCHEMES:
                per_chip = flops_per_chip(name, chunk, k, value_dim) * chunks * heads
                critical = critical_path(name, shards, chunks, chunk, k, value_dim) * heads
                rows.append(f"| {k} | {shards} | {name} | {per_chip / 1e9:.1f} | {per_chip / total:.2f} | "
                            f"{steps[name]} | {critical / total:.2f} | {'yes' if name == picked else ''} |")
            per_chip = per_chunk * chunks * heads
            rows.append(f"| {k} | {shards} | shards in turn | {per_chip / 1e9:.1f} | {per_chip / total:.2f} | "
                        f"{2 * length // chunk} | 1.00 | |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- compiled programs


def sharded_op(name: str, mesh):
    """``fn(q, k, v, beta) -> (out, final state)`` with T sharded over ``mesh``'s "seq" axis (an Auto
    mesh, current in ``jax.set_mesh``): ours (``context_axis="seq"``, ``impl="chunk"`` or, for
    "ours-pallas", ``"pallas"``; the scheme picked per call, or given: "ours-transition",
    "ours-relay") or jax-linear-attention's ``context_parallel_linear_attention("deltanet", ...)``
    (the ``bench`` extra), the same function."""
    import dpfp_jax as dj
    from dpfp_jax.ops.fast_weight.context_parallel import context_plan, fast_weight_context_parallel

    if name in ("ours", "ours-pallas"):
        impl = "pallas" if name == "ours-pallas" else "chunk"
        return lambda q, k, v, beta: dj.fast_weight(q, k, v, beta, impl=impl, context_axis="seq")
    if name in ("ours-transition", "ours-relay"):
        def given(q, k, v, beta):
            state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
            return fast_weight_context_parallel(q, k, v, beta, state, rule="delta", scale=1.0, chunk_size=64,
                                                segment_ids=None, plan=context_plan(q, "seq", "chunk"),
                                                scheme=name.removeprefix("ours-"))
        return given
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


def tpu_features_rows(length: int, heads: int, value_dim: int, dim: int, nu: int, shards: int,
                      impls: list[str]) -> str:
    """Per-chip temporaries of the forward+backward compiled for TPU v5e ``2x2`` with T sharded over
    ``shards`` chips of an Auto mesh (delta rule, B = 1, bfloat16): DPFP of width ``dim`` and order
    ``nu`` inside the op (``features=``: each shard's TPU kernel, or chunk form, given the raw q, k)
    against it applied first (the op given phi(q), phi(k)), per impl, the scheme picked per call."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj
    from dpfp_devtools import tpu
    from dpfp_devtools.workloads import forward_and_backward, with_features

    phi = dj.Features("dpfp", dim=dim, nu=nu, normalization="sum")
    shapes = [(1, length, heads, dim), (1, length, heads, dim), (1, length, heads, value_dim), (1, length, heads)]
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in shapes]
    mesh = tpu.tpu_mesh("v5e:2x2", (shards,), ("seq",), axis_types=(AxisType.Auto,))
    rows = ["| impl | feature map | fwd+bwd temp MB per chip | / map applied first | collectives | compile s |",
            "|---|---|---:|---:|---:|---:|"]
    for impl in impls:
        temps = {}
        for fused in (False, True):
            start = time.perf_counter()
            grad = forward_and_backward(with_features(impl, phi, fused=fused, context_axis="seq"), 4)[1]
            compiled = tpu.compile_for_tpu(grad, *(tpu.place(a, mesh, P(None, "seq")) for a in args), mesh=mesh)
            seconds = time.perf_counter() - start
            temps[fused] = tpu.memory(compiled).temp_bytes / MB
            count, _ = collective_bytes(compiled.as_text())
            where = "inside the op (features=)" if fused else "applied first (phi(q), phi(k) given)"
            rows.append(f"| {impl} | {where} | {temps[fused]:.1f} | {temps[fused] / temps[False]:.2f}x | {count} | "
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


def features_memory_rows(length: int, heads: int, value_dim: int, dim: int, nu: int) -> str:
    """Run in a process with host devices: per-device compiled temporaries of the sharded
    forward+backward (delta rule, float32, B = 1), DPFP of width ``dim`` and order ``nu`` applied
    inside the op or before it, each scheme given by name."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj
    from dpfp_devtools.workloads import forward_and_backward
    from dpfp_jax.ops.fast_weight.context_parallel import context_plan, fast_weight_context_parallel

    shards = jax.device_count()
    phi = dj.Features("dpfp", dim=dim, nu=nu, normalization="sum")
    mesh = jax.make_mesh((shards,), ("seq",), axis_types=(AxisType.Auto,))
    along_t = NamedSharding(mesh, P(None, "seq"))
    shapes = [(1, length, heads, dim), (1, length, heads, dim), (1, length, heads, value_dim), (1, length, heads)]
    args = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=along_t) for shape in shapes]

    def op(scheme, fused):
        def call(q, k, v, beta):
            state = jnp.zeros((1, heads, phi.key_dim, value_dim), jnp.float32)
            qk = (q, k) if fused else (phi(q), phi(k))
            return fast_weight_context_parallel(*qk, v, beta, state, rule="delta", scale=1.0, chunk_size=64,
                                                segment_ids=None, plan=context_plan(q, "seq", "chunk"),
                                                scheme=scheme, features=phi if fused else None)
        return call

    rows = [f"| scheme | feature map | fwd+bwd temp MB per device | / map applied first "
            f"({shards} host devices, T / P = {length // shards}) |", "|---|---|---:|---:|"]
    for scheme in SCHEMES:
        temps = {}
        for fused in (False, True):
            with jax.set_mesh(mesh):
                compiled = forward_and_backward(op(scheme, fused), 4)[1].lower(*args).compile()
            temps[fused] = compiled.memory_analysis().temp_size_in_bytes / MB
            where = "inside the op (features=)" if fused else "applied first (phi(q), phi(k) given)"
            rows.append(f"| {scheme} | {where} | {temps[fused]:.1f} | {temps[fused] / temps[False]:.2f}x |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--check-counts", action="store_true", help="the per-chunk counts against cost_analysis()")
    parser.add_argument("--tpu", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--features-memory", action="store_true",
                        help="compiled temporaries, feature map inside the sharded op or applied first")
    parser.add_argument("--tpu-features", action="store_true",
                        help="TPU v5e per-chip temporaries, feature map inside the sharded op or applied first, for "
                             "--impls on --shards[-1] chips")
    parser.add_argument("--impls", nargs="+", default=["pallas", "chunk"], help="--tpu-features: dj.fast_weight impls")
    parser.add_argument("--dim", type=int, default=64, help="--features-memory, --tpu-features: d, the raw q, k width")
    parser.add_argument("--nu", type=int, default=3, help="--features-memory, --tpu-features: DPFP's nu (K = 2 d nu)")
    parser.add_argument("--key-dims", type=int, nargs="+", default=None)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="--tpu: chips P")
    parser.add_argument("--length", type=int, default=None, help="T (65536 for --flops/--tpu, else 8192)")
    parser.add_argument("--heads", type=int, default=None, help="H (8 for --flops/--tpu, else 4)")
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", nargs="+", default=["ours"],
                        choices=["ours", "ours-pallas", "ours-transition", "ours-relay", "jax-linear-attention"],
                        help="the sharded ops: ours with the chunk form (the scheme picked per call, or given) "
                             "or (--tpu only) the TPU kernel per shard, jax-linear-attention's context_parallel "
                             "(the bench extra)")
    parser.add_argument("--devices", type=int, default=4, help="--cpu, --features-memory: host devices P")
    parser.add_argument("--in-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_child:
        run(args)
    else:
        from benchmarks.common import reported_run

        with reported_run():
            run(args)


def run(args: argparse.Namespace) -> None:
    names = args.ops
    if args.flops:
        print(flops_table(args.length or 65536, args.heads or 8, args.value_dim, 64, [2, 4],
                          args.key_dims or [128, 512, 1024]))
    if args.check_counts:
        print(check_counts())
    if args.tpu:
        print(tpu_rows(args.key_dims or [128, 512], args.shards, args.length or 65536, args.heads or 8, args.value_dim,
                       names))
    if args.tpu_features:
        print(tpu_features_rows(args.length or 65536, args.heads or 8, args.value_dim, args.dim, args.nu,
                                args.shards[-1], args.impls))
    if args.in_child:
        if args.cpu:
            print(cpu_rows(args.key_dims or [128, 512], args.length or 8192, args.heads or 4, args.value_dim,
                           args.repeats, names))
        if args.features_memory:
            print(features_memory_rows(args.length or 8192, args.heads or 4, args.value_dim, args.dim, args.nu))
    elif args.cpu or args.features_memory:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}".strip()
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        command = [sys.executable, "-m", "benchmarks.context_parallel", "--in-child", "--repeats",
                   str(args.repeats), "--value-dim", str(args.value_dim), "--ops", *names, "--dim", str(args.dim),
                   "--nu", str(args.nu)]
        command += ["--cpu"] * args.cpu + ["--features-memory"] * args.features_memory
        for flag, value in (("--key-dims", args.key_dims), ("--length", args.length), ("--heads", args.heads)):
            if value is not None:
                command += [flag, *map(str, value if isinstance(value, list) else [value])]
        subprocess.run(command, env=env, check=True, cwd=root)


if __name__ == "__main__":
    main()
