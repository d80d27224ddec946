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
``--impls`` also takes deltanet-tpu's Mosaic kernels (``deltanet-tpu``, ``deltanet-tpu-gdn``: K = V =
128 only, so ``--keys 128 --value-dim 128``) and jax-linear-attention's chunked Gated DeltaNet in
plain JAX (``jla-gdn``, an XLA chunked GDN), beside ``NAME-gated`` for ours with a gate and
``NAME-packed`` for ours with packed documents of 512 steps (no gate); without
``chunk`` among them the last column's base is the first impl.

``python -m benchmarks.tpu --deviceless --features`` compiles, instead of the op alone, a
``DPFPAttention`` training step (B=8, T=4096, H=8, d=64, nu=3, V=64, bfloat16: the gradient of a
loss on its output with respect to its parameters, ``dpfp_devtools.workloads.attention_training_step``)
with the feature map inside the op (``fuse_features=True``, the default) and applied by the layer
(``False``), per impl, and prints both programs' temporary and peak memory. Inside the op with
``pallas`` means inside the TPU kernel, which reads q, k at width d and computes the map itself.

``python -m benchmarks.tpu --compile-time`` times compiling the Pallas TPU kernel (trace, lower
and libtpu's compile, on this machine, no TPU): the forward+backward at B=8, T=4096, H=8,
V=64, bfloat16 and K in {128, 512, 1024}, and a ``DPFPformer`` training step (loss, gradients,
an SGD update) with ``impl="pallas"`` at 1 and 4 layers, its layers unrolled (a Python loop) and
scanned (``scan_layers=True``; ``--stacks`` picks), in interleaved rounds, each round with freshly
made functions (nothing comes from jax's caches); the table gives each round's wall and CPU seconds
(this process's: on a shared machine the wall time grows with the load, the CPU time much less)
and the 4-layer step's CPU time over the 1-layer one's of the same stack. ``--keys`` alone leaves
out the kernel's own rows.

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
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp

import dpfp_jax as dj
from benchmarks.common import (
    delta_rule_inputs,
    machine_name,
    measure_forward_backward,
    peer_gated_deltanet,
    print_table,
    reported_run,
)
from dpfp_devtools import tpu
from dpfp_devtools.workloads import attention_training_step, forward_and_backward, ours

MB = 1e6


def input_bytes(shapes: list[tuple[int, ...]], dtype) -> int:
    return sum(math.prod(shape) for shape in shapes) * jnp.dtype(dtype).itemsize


# deltanet-tpu's Pallas TPU kernels (0.3.0, K = V = 128 only), its defaults (bfloat16 products, scale K**-0.5):
# the plain delta rule and Gated DeltaNet, with the arguments ours take, (q, k, v, beta[, log_decay]).
PEERS = {
    "deltanet-tpu": lambda peer: lambda q, k, v, beta: peer.chunk_delta_rule(q, k, v, beta, output_final_state=True),
    "deltanet-tpu-gdn": lambda peer: lambda q, k, v, beta, log_decay: peer.chunk_gdn(
        q, k, v, log_decay, beta, output_final_state=True),
}


# Peers written in plain JAX (XLA's programs, any K): an XLA chunked Gated DeltaNet beside ours, at
# its own default scale (K**-0.5), with its final state; each maker gives (fn, None) or (None, why not).
XLA_PEERS = {"jla-gdn": peer_gated_deltanet}


class _JaxOnATpu:
    """``jax`` as deltanet-tpu's kernel module sees it while compiling for a TPU on this machine.

    It picks Pallas's interpret mode whenever ``jax.default_backend() != "tpu"`` (deltanet_tpu/gdn2.py):
    compiled here, on a CPU host, it would silently give the interpreted kernel (an XLA loop), not its
    Mosaic kernel, and the memory table would describe a program a TPU never runs. This proxy answers
    "tpu" to that one question and passes everything else to jax; only that module sees it, only while
    tracing (:func:`_peer_traced_for_a_tpu`), and the lowered program is checked for its Mosaic kernel.
    """

    def __getattr__(self, name: str):
        return (lambda: "tpu") if name == "default_backend" else getattr(jax, name)


def _peer_traced_for_a_tpu(impl: str):
    if impl not in PEERS:
        return contextlib.nullcontext()
    from unittest import mock

    from deltanet_tpu import gdn2

    return mock.patch.object(gdn2, "jax", _JaxOnATpu())


PACKED_LENGTH = 512
"""The documents' length for ``NAME-packed``."""


def contender(impl: str, shapes: list[tuple[int, ...]]):
    """``(fn, shapes)``: ``ours(impl)``; for ``"NAME-gated"`` impl NAME with a ``log_decay [B, T, H]``
    (a fifth argument, beta's shape) passed to it; for ``"NAME-packed"`` impl NAME with
    ``segment_ids`` (documents of :data:`PACKED_LENGTH` steps); for a name in :data:`PEERS`
    deltanet-tpu's kernel; for one in :data:`XLA_PEERS` that peer (gated: beta's shape again)."""
    if impl in XLA_PEERS:
        peer, why_not = XLA_PEERS[impl]()
        if peer is None:
            raise ImportError(why_not)
        return peer, [*shapes, shapes[3]]
    if impl in PEERS:
        import deltanet_tpu

        return PEERS[impl](deltanet_tpu), [*shapes, shapes[3]] if impl.endswith("-gdn") else shapes
    if impl.endswith("-packed"):
        # Packed documents of PACKED_LENGTH steps, no gate (the TPU kernel then runs gated, log alpha = 0
        # but at the resets): ids made in the program, no fifth argument.
        def packed(q, k, v, beta):
            ids = jnp.broadcast_to(jnp.arange(q.shape[1]) // PACKED_LENGTH, q.shape[:2])
            return ours(impl.removesuffix("-packed"), segment_ids=ids)(q, k, v, beta)

        return packed, shapes
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
            with _peer_traced_for_a_tpu(impl):
                lowered = tpu.lower_for_tpu(fn, *args, topology=topology)
            if impl in PEERS and "tpu_custom_call" not in lowered.as_text():
                return "its Mosaic kernel is not in the lowered program (it took its interpret mode)"
            memory = tpu.memory(lowered.compile())
            figures += [memory.temp_bytes / MB, memory.peak_bytes / MB]
    except Exception as err:  # noqa: BLE001 - a program the TPU compiler refuses is a result
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return (*figures, time.perf_counter() - start)


def report(topologies: list[str], key_dims: list[int], impls: list[str], batch: int, length: int, heads: int,
           value_dim: int, dtype) -> int:
    """Print one table per topology; returns how many programs failed to compile."""
    failures, base = 0, "chunk" if "chunk" in impls else impls[0]
    for topology in topologies:
        print(f"\n## {topology}, one chip: B={batch}, T={length}, H={heads}, V={value_dim}, "
              f"{jnp.dtype(dtype).name}\n")
        print("| K | impl | inputs MB | fwd temp MB | fwd peak MB | fwd+bwd temp MB | fwd+bwd peak MB | "
              f"fwd+bwd temp / inputs | compile s | fwd+bwd temp / {base} |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key_dim in key_dims:
            shapes = [(batch, length, heads, key_dim)] * 2 + [(batch, length, heads, value_dim), (batch, length, heads)]
            inputs = input_bytes(shapes, dtype) / MB
            rows = {impl: measure(topology, impl, shapes, dtype) for impl in impls}
            chunk = rows[base]
            for impl, row in rows.items():
                if isinstance(row, str):
                    failures += 1
                    print(f"| {key_dim} | {impl} | {inputs:.1f} | {row} | | | | | | |")
                else:
                    fwd_temp, fwd_peak, bwd_temp, bwd_peak, seconds = row
                    over_chunk = ("" if isinstance(chunk, str) else
                                  f"{bwd_temp / chunk[2]:.2f}x" if chunk[2] > 0 else f"{base}'s is 0")
                    print(f"| {key_dim} | {impl} | {inputs:.1f} | {fwd_temp:.1f} | {fwd_peak:.1f} | {bwd_temp:.1f} | "
                          f"{bwd_peak:.1f} | {bwd_temp / inputs:.1f}x | {seconds:.0f} | {over_chunk} |")
            sys.stdout.flush()
    return failures


def report_features(topologies: list[str], impls: list[str], nu: int) -> int:
    """The DPFPAttention training step with the map inside the op and before it; returns failures."""
    failures = 0
    for topology in topologies:
        print(f"\n## {topology}, one chip: DPFPAttention training step, B=8, T=4096, H=8, d=64, nu={nu} "
              f"(K={2 * nu * 64}), V=64, bfloat16\n")
        print("| impl | feature map | temp MB | peak MB | compile s | temp / map in the layer |")
        print("|---|---|---:|---:|---:|---:|")
        for impl in impls:
            rows = {}
            for fuse in (False, True):
                start = time.perf_counter()
                try:
                    fn, args = attention_training_step(fuse, impl, nu=nu)
                    rows[fuse] = (tpu.memory(tpu.compile_for_tpu(fn, *args, topology=topology)),
                                  time.perf_counter() - start)
                except Exception as err:  # noqa: BLE001 - a program the TPU compiler refuses is a result
                    rows[fuse] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            for fuse, row in rows.items():
                where = "in the op (fuse_features=True)" if fuse else "in the layer (fuse_features=False)"
                if isinstance(row, str):
                    failures += 1
                    print(f"| {impl} | {where} | {row} | | | |")
                    continue
                memory, seconds = row
                base = rows[False]
                ratio = "" if isinstance(base, str) else f"{memory.temp_bytes / base[0].temp_bytes:.2f}x"
                print(f"| {impl} | {where} | {memory.temp_bytes / MB:.1f} | {memory.peak_bytes / MB:.1f} | "
                      f"{seconds:.0f} | {ratio} |")
            sys.stdout.flush()
    return failures


def kernel_training_program(key_dim: int, batch: int, length: int, heads: int, value_dim: int, dtype):
    """A fresh ``jit(grad)`` of a loss on the Pallas kernel's results (``impl="pallas"``) and its
    abstract arguments q, k, v, beta."""
    shapes = [(batch, length, heads, key_dim)] * 2 + [(batch, length, heads, value_dim), (batch, length, heads)]
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]
    return forward_and_backward(ours("pallas"), len(args))[1], args


def former_training_program(depth: int, batch: int, length: int, heads: int, dtype, scan_layers: bool = False):
    """A fresh ``DPFPformer`` training step with ``impl="pallas"``: ``(params, x) -> (params, loss)``,
    the loss's gradients applied by SGD; width 512, ``heads`` heads of 64 (K = 128), its layers
    scanned or not, and its abstract arguments."""
    model = dj.DPFPformer(512, depth, num_heads=heads, head_dim=64, nu=1, impl="pallas", dtype=dtype,
                          scan_layers=scan_layers)
    x = jax.ShapeDtypeStruct((batch, length, 512), dtype)
    # The parameters' shapes, from impl="chunk" (a CPU traces the TPU kernel only in a compile for a TPU).
    params = jax.eval_shape(model.clone(impl="chunk").init, jax.random.key(0), x)["params"]

    def step(params, x):
        def loss(params):
            return jnp.mean((model.apply({"params": params}, x).astype(jnp.float32) - x) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), value

    return step, (params, x)


def compile_seconds(program: tuple, topology: str) -> tuple[float, float]:
    """(wall, CPU) seconds to trace, lower and compile ``program`` for ``topology``: the CPU time is
    this process's, what the compile costs on a machine that other jobs share."""
    fn, args = program
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = tpu.compile_for_tpu(fn, *args, topology=topology)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if "fast_weight_tpu_chunk_bwd" not in compiled.as_text():
        raise RuntimeError("the compiled program has no Pallas TPU kernel")
    return wall, cpu


def compile_times(topology: str, key_dims: list[int], depths: list[int], batch: int, length: int, heads: int,
                  value_dim: int, dtype, rounds: int, stacks: list[str]) -> None:
    """Print the compile times (wall and CPU seconds) of the kernel's forward+backward per K and of
    the training step per depth and per stack (``"unrolled"``: a Python loop over the layers;
    ``"scanned"``: ``scan_layers=True``), ``rounds`` interleaved rounds, and each step's CPU time
    over the same stack's first depth's, per round."""
    programs = {f"kernel fwd+bwd, K = {k}": functools.partial(kernel_training_program, k, batch, length, heads,
                                                                 value_dim, dtype) for k in key_dims}
    steps = {(stack, d): f"DPFPformer train step, {d} layer{'s' * (d > 1)}{', scanned' * (stack == 'scanned')}"
             for stack in stacks for d in depths}
    programs |= {name: functools.partial(former_training_program, d, batch, length, heads, dtype, stack == "scanned")
                 for (stack, d), name in steps.items()}
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
    for _ in range(rounds):
        for name, make in programs.items():
            seconds[name].append(compile_seconds(make(), topology))
            print(f"{name}: {seconds[name][-1][0]:.1f} s wall, {seconds[name][-1][1]:.1f} s CPU", flush=True)
    print(f"\n## Compile time for {topology}: B={batch}, T={length}, H={heads}, V={value_dim}, "
          f"{jnp.dtype(dtype).name}\n")
    columns = " | ".join(f"round {r + 1}: wall s | round {r + 1}: CPU s" for r in range(rounds))
    print(f"| program | {columns} | CPU s over the {depths[0]}-layer step's |")
    print(f"|---|{'---:|' * 2 * rounds}---:|")
    base = {name: steps[stack, depths[0]] for (stack, _), name in steps.items()}
    for name, times in seconds.items():
        ratio = ", ".join(f"{t[1] / b[1]:.2f}x" for t, b in zip(times, seconds[base[name]], strict=True)) \
            if name in base else ""
        print(f"| {name} | {' | '.join(f'{wall:.1f} | {cpu:.1f}' for wall, cpu in times)} | {ratio} |")


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
    parser.add_argument("--compile-time", action="store_true",
                        help="time compiling the Pallas TPU kernel and a DPFPformer step for TPU on this machine")
    parser.add_argument("--depths", nargs="+", type=int, default=[1, 4],
                        help="DPFPformer depths with --compile-time (the first is the ratios' base)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds with --compile-time")
    parser.add_argument("--stacks", nargs="+", choices=["unrolled", "scanned"], default=["unrolled", "scanned"],
                        help="with --compile-time: the DPFPformer's layers as a Python loop, scan_layers=True, or both")
    parser.add_argument("--interpret", action="store_true",
                        help="with --run on a machine without a TPU: the TPU kernel in Pallas's interpret mode "
                             "(a check of this script, not a timing)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds with --run")
    parser.add_argument("--topologies", nargs="+", default=["v5e:2x2", "v6e:2x2"], help="libtpu topology names")
    parser.add_argument("--keys", nargs="*", type=int, default=None,
                        help="key widths K (default 128 256 384 512 1024; with --compile-time 128 512 1024, and "
                             "none (--keys alone) times the DPFPformer steps only)")
    parser.add_argument("--impls", nargs="+", default=["chunk", "scan", "pallas"],
                        help="dj.fast_weight impls; NAME-gated (chunk-gated, pallas-gated, ...) adds a log_decay, "
                             "NAME-packed segment_ids (documents of 512 steps); "
                             f"peers (K = V = 128): {', '.join(PEERS)}; XLA peers (any K): {', '.join(XLA_PEERS)}; "
                             "the ratios' base is chunk if given, "
                             "else the first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--features", action="store_true",
                        help="with --deviceless: a DPFPAttention training step, the feature map in the op or not")
    parser.add_argument("--nu", type=int, default=3, help="DPFP's nu with --features")
    parser.add_argument("--without-cost-estimate", action="store_true",
                        help="with --deviceless: the TPU kernel's pallas_call without its pl.CostEstimate")
    args = parser.parse_args()
    if args.deviceless + args.run + args.compile_time != 1:
        parser.error("give one of --deviceless (compile for a TPU here), --compile-time (time those compiles) and "
                     "--run (time on this machine's TPU)")
    if args.keys is None:
        args.keys = [128, 512, 1024] if args.compile_time else [128, 256, 384, 512, 1024]
    if args.compile_time:
        print(f"compiled on {machine_name()}, libtpu {tpu.libtpu_version()}, for TPU: libtpu's compiler, no TPU ran")
        compile_times(args.topologies[0], args.keys, args.depths, args.batch, args.time, args.heads, args.value_dim,
                      jnp.dtype(args.dtype), args.rounds, args.stacks)
        return
    if args.run:
        if set(args.impls) & (set(PEERS) | set(XLA_PEERS)):
            parser.error(f"--run times dj.fast_weight's impls only; {', '.join([*PEERS, *XLA_PEERS])} are for "
                         "--deviceless")
        if jax.default_backend() != "tpu" and not args.interpret:
            parser.error(f"--run needs a TPU: jax.default_backend() is {jax.default_backend()!r} (--interpret runs "
                         "the TPU kernel interpreted, to check this script)")
        from jax.experimental.pallas import tpu as pltpu

        with pltpu.force_tpu_interpret_mode() if args.interpret else contextlib.nullcontext():
            run(args.keys, args.impls, args.batch, args.time, args.heads, args.value_dim, jnp.dtype(args.dtype),
                args.repeats)
        return
    print(f"compiled on {machine_name()}, libtpu {tpu.libtpu_version()}, for TPU: libtpu's compiler, no TPU ran")
    if args.features:
        sys.exit(1 if report_features(args.topologies, args.impls, args.nu) else 0)
    with without_cost_estimate() if args.without_cost_estimate else contextlib.nullcontext():
        failures = report(args.topologies, args.keys, args.impls, args.batch, args.time, args.heads, args.value_dim,
                          jnp.dtype(args.dtype))
    sys.exit(1 if failures else 0)


@contextlib.contextmanager
def without_cost_estimate():
    """The TPU kernel's ``pallas_call`` without its ``pl.CostEstimate`` (XLA then guesses the call's
    cost), to see what the estimate changes in XLA's schedule."""
    from unittest import mock

    from pallas_kernels.tpu import fused_chunk

    with mock.patch.object(fused_chunk, "cost_estimate", lambda plan: None):
        yield


if __name__ == "__main__":
    with reported_run():
        main()
