"""TPU memory without a TPU, and TPU timings on one: ``pallas``, ``chunk`` and ``scan``.

``python -m benchmarks.tpu --deviceless`` (``make tpu-memory`` installs libtpu and names it in
``DPFP_TPU_COMPILER``) compiles for v5e and v6e by libtpu's compiler, no TPU needed: for B=8,
T=4096, H=8, V=64, bfloat16 and K in {128, 256, 384, 512, 1024} it prints, per topology, the
forward's and the forward+backward's temporary and peak memory on one chip (XLA's
``memory_analysis`` of the compiled program, dpfp_devtools/tpu.py) beside the inputs' size, and
each impl's forward+backward temporaries over ``chunk``'s. The forward+backward is ``jax.grad`` of
a loss on both results (outputs and final state), as in the GPU benchmark. A program that does
not compile shows libtpu's error instead. These are compile-time figures: no TPU speed comes from
them. The chunk form takes up to minutes per program to compile at these shapes (more with K).

``python -m benchmarks.tpu --run`` on a machine with a TPU times the same impls at the same
shapes (median ms of the forward and of the forward+backward, interleaved), with the compiled
temporary memory and the ratios to ``chunk``. This project's machines have no TPU, so no such
figure has been measured; ``--run --interpret`` runs that code path on a CPU in Pallas's TPU
interpret mode (the TPU kernel interpreted: meaningless times, for small shapes only), which is
how the tests check it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.common import delta_rule_inputs, machine_name, measure_forward_backward, print_table, reported_run
from dpfp_devtools import tpu
from dpfp_devtools.workloads import forward_and_backward, ours

MB = 1e6


def input_bytes(shapes: list[tuple[int, ...]], dtype) -> int:
    return sum(math.prod(shape) for shape in shapes) * jnp.dtype(dtype).itemsize


def contender(impl: str, shapes: list[tuple[int, ...]]):
    """``(fn, shapes)``: ``ours(impl)``, or for ``"NAME-gated"`` impl NAME with a ``log_decay [B, T, H]``
    (a fifth argument, beta's shape) passed to it."""
    if not impl.endswith("-gated"):
        return ours(impl), shapes

    def gated(q, k, v, beta, log_decay):
        return ours(impl.removesuffix("-gated"), log_decay=log_decay)(q, k, v, beta)

    return gated, [*shapes, shapes[3]]


def measure(topology: str, impl: str, shapes: list[tuple[int, ...]], dtype) -> tuple[float, ...] | str:
    """(fwd temp, fwd peak, fwd+bwd temp, fwd+bwd peak) in MB and the compile seconds, or why not."""
    op, shapes = contender(impl, shapes)
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]
    figures, start = [], time.perf_counter()
    try:
        for fn in forward_and_backward(op, len(args)):
            memory = tpu.memory(tpu.compile_for_tpu(fn, *args, topology=topology))
            figures += [memory.temp_bytes / MB, memory.peak_bytes / MB]
    except Exception as err:  # noqa: BLE001 - a program the TPU compiler refuses is a result
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return (*figures, time.perf_counter() - start)


def report(topologies: list[str], key_dims: list[int], impls: list[str], batch: int, length: int, heads: int,
           value_dim: int, dtype) -> int:
    """Print one table per topology; returns how many programs failed to compile."""
    failures = 0
    for topology in topologies:
        print(f"\n## {topology}, one chip: B={batch}, T={length}, H={heads}, V={value_dim}, "
              f"{jnp.dtype(dtype).name}\n")
        print("| K | impl | inputs MB | fwd temp MB | fwd peak MB | fwd+bwd temp MB | fwd+bwd peak MB | "
              "fwd+bwd temp / inputs | compile s | fwd+bwd temp / chunk |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key_dim in key_dims:
            shapes = [(batch, length, heads, key_dim)] * 2 + [(batch, length, heads, value_dim), (batch, length, heads)]
            inputs = input_bytes(shapes, dtype) / MB
            rows = {impl: measure(topology, impl, shapes, dtype) for impl in impls}
            chunk = rows.get("chunk")
            for impl, row in rows.items():
                if isinstance(row, str):
                    failures += 1
                    print(f"| {key_dim} | {impl} | {inputs:.1f} | {row} | | | | | | |")
                else:
                    fwd_temp, fwd_peak, bwd_temp, bwd_peak, seconds = row
                    over_chunk = ("" if chunk is None or isinstance(chunk, str) else
                                  f"{bwd_temp / chunk[2]:.2f}x" if chunk[2] > 0 else "chunk's is 0")
                    print(f"| {key_dim} | {impl} | {inputs:.1f} | {fwd_temp:.1f} | {fwd_peak:.1f} | {bwd_temp:.1f} | "
                          f"{bwd_peak:.1f} | {bwd_temp / inputs:.1f}x | {seconds:.0f} | {over_chunk} |")
            sys.stdout.flush()
    return failures


def run(key_dims: list[int], impls: list[str], batch: int, length: int, heads: int, value_dim: int, dtype,
        repeats: int) -> None:
    """Time the impls on this machine's default device (a TPU), one table per K, ratios to ``chunk``."""
    print(f"\n## {machine_name()}: B={batch}, T={length}, H={heads}, V={value_dim}, {jnp.dtype(dtype).name}")
    for key_dim in key_dims:
        args = delta_rule_inputs(batch, length, heads, key_dim, value_dim, dtype)
        rows = measure_forward_backward({impl: ours(impl) for impl in impls}, args, repeats)
        print(f"\n### K = {key_dim}\n")
        print_table(rows, baseline="chunk" if "chunk" in impls else impls[0])
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deviceless", action="store_true",
                        help="compile for TPU on this machine and print memory (nothing runs on a TPU)")
    parser.add_argument("--run", action="store_true", help="time the impls on this machine's TPU")
    parser.add_argument("--interpret", action="store_true",
                        help="with --run on a machine without a TPU: the TPU kernel in Pallas's interpret mode "
                             "(a check of this script, not a timing)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds with --run")
    parser.add_argument("--topologies", nargs="+", default=["v5e:2x2", "v6e:2x2"], help="libtpu topology names")
    parser.add_argument("--keys", nargs="+", type=int, default=[128, 256, 384, 512, 1024], help="key widths K")
    parser.add_argument("--impls", nargs="+", default=["chunk", "scan", "pallas"],
                        help="dj.fast_weight impls; NAME-gated (e.g. chunk-gated) adds a log_decay")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    if args.deviceless == args.run:
        parser.error("give one of --deviceless (compile for a TPU here) and --run (time on this machine's TPU)")
    if args.run:
        if jax.default_backend() != "tpu" and not args.interpret:
            parser.error(f"--run needs a TPU: jax.default_backend() is {jax.default_backend()!r} (--interpret runs "
                         "the TPU kernel interpreted, to check this script)")
        from jax.experimental.pallas import tpu as pltpu

        with pltpu.force_tpu_interpret_mode() if args.interpret else contextlib.nullcontext():
            run(args.keys, args.impls, args.batch, args.time, args.heads, args.value_dim, jnp.dtype(args.dtype),
                args.repeats)
        return
    print(f"compiled on {machine_name()}, libtpu {tpu.libtpu_version()}, for TPU: libtpu's compiler, no TPU ran")
    failures = report(args.topologies, args.keys, args.impls, args.batch, args.time, args.heads, args.value_dim,
                      jnp.dtype(args.dtype))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    with reported_run():
        main()
