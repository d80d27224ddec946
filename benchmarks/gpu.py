"""GPU checks and benchmark: our kernels and ops against FLA and jax-linear-attention, one run.

Run on a GPU machine, through ``benchmarks/run_gpu.sh`` (it installs the carried peer wheels).

``--check``: our GPU paths' outputs and gradients against ``reference`` on the GPU (float32 and
bfloat16 inputs, small shapes, both rules, K in {128, 384}): ``pallas`` (fused chunk and fused
recurrent kernels), ``chunk`` with its inter-chunk walk in Pallas, ``chunk`` and ``scan``.

Default: forward and forward+backward time and peak memory at B=8, T=4096, H=8, V=64, bfloat16,
K in {128, 256, 384, 512}, plus T=16384 at B=2 (K=128), for the same five paths of ours (and the
fused chunk kernel with two load-pipelining stages, up to K=256), FLA's
``chunk_delta_rule`` and ``fused_recurrent_delta_rule`` (PyTorch + Triton) and
jax-linear-attention's ``mosaic_gpu`` deltanet, each as a ratio to our ``chunk``.
A peer that refuses a shape is listed with its reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__" and "--deviceless" in sys.argv:
    # XLA reads its logging and dump settings once, when jax loads: set them first.
    from deviceless import prepare_environment

    prepare_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    delta_rule_inputs,
    forward_and_backward,
    machine_name,
    ours,
    peer_deltanet,
    worst_relative_error,
)
from deviceless import peak_bytes  # noqa: E402

import dpfp_jax as dj  # noqa: E402
from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk, wy_inverse  # noqa: E402
from dpfp_jax.ops.fast_weight.common import zero_state  # noqa: E402
from pallas_kernels import chunk_walk, fused_chunk  # noqa: E402
from pallas_kernels.triton.tiles import float32_or_wider  # noqa: E402


def jax_timings(fn: Callable, args: tuple, repeats: int) -> tuple[float, float, float]:
    """(fwd ms, fwd+bwd ms, fwd+bwd peak GB: XLA's temporaries + arguments + outputs)."""
    forward, backward = forward_and_backward(fn, len(args))
    times = []
    for f in (forward, backward):
        jax.block_until_ready(f(*args))
        start = time.perf_counter()
        for _ in range(repeats):
            result = f(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / repeats * 1e3)
    return times[0], times[1], peak_bytes(backward.lower(*args).compile()) / 1e9


def torch_timings(fn: Callable, args: tuple, repeats: int) -> tuple[float, float, float]:
    import torch

    tensors = [torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda().to(torch.bfloat16).requires_grad_()
               for a in args]

    def forward():
        out, state = fn(*tensors)
        return out, state

    def forward_backward():
        out, state = forward()
        (out.float().sum() + state.float().sum()).backward()

    result = []
    for f in (forward, forward_backward):
        f()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            f()
        torch.cuda.synchronize()
        result.append((time.perf_counter() - start) / repeats * 1e3)
    return result[0], result[1], torch.cuda.max_memory_allocated() / 1e9


def fla(name: str) -> Callable | None:
    try:
        from fla.ops import delta_rule
    except ImportError:
        return None
    op = getattr(delta_rule, name)

    def fn(q, k, v, beta):
        return op(q, k, v, beta, scale=1.0, output_final_state=True)

    return fn


def chunk_with_pallas_walk(q, k, v, beta, rule="delta"):
    """``impl="chunk"`` with its inter-chunk walk in Pallas (``pallas_kernels.chunk_walk``)."""
    return fast_weight_chunk(q, k, v, beta, zero_state(q, v, jnp.float32), rule=rule, scale=1.0,
                             walk=chunk_walk(precise=float32_or_wider(q, k, v)))


def fused_chunk_two_stages(q, k, v, beta, rule="delta"):
    """The fused chunk kernel with Triton's load pipelining (2 stages) instead of none."""
    return fused_chunk(q, k, v, beta, zero_state(q, v, jnp.float32), rule=rule, num_stages=2,
                       wy_inverse=wy_inverse if rule == "delta" else None)


# Paths of ours that no ``impl=`` names: the walk-only kernel, and a launch variant of the fused one.
EXTRA_PATHS = {"chunk + pallas walk": chunk_with_pallas_walk,
               "pallas fused chunk, 2 load stages": fused_chunk_two_stages}


def fits_on_chip(path: Callable, key_dim: int, dtype) -> bool:
    """False where triton_report.py found a path over an H200 program's shared memory: two load
    stages from K = 384 (260 KiB) and with float32 inputs (240 KiB at K = 128)."""
    return path is not fused_chunk_two_stages or (key_dim <= 256 and dtype == jnp.bfloat16)


def check(repeats: int) -> int:
    """Our GPU impls against the reference on the GPU; returns the number of failures.

    float32 inputs must match to 1e-4 relative (the chunked kernel's dots take three TF32 passes);
    bfloat16 inputs (one pass) to 1e-2, against the reference run on the same values in float32:
    bfloat16's own output rounding is about 2e-3 (benchmarks/dot_precision.py).
    """
    del repeats
    failures = 0
    for dtype, tolerance in ((jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)):
        for rule in ("delta", "sum"):
            for key_dim in (128, 384):
                failures += check_one(dtype, tolerance, rule, key_dim)
    return failures


def check_one(dtype, tolerance: float, rule: str, key_dim: int) -> int:
    q, k, v, beta = delta_rule_inputs(2, 200, 2, key_dim, 16, dtype)
    beta = beta if rule == "delta" else None
    names = ("q", "k", "v", "beta") if rule == "delta" else ("q", "k", "v")

    def run(impl, chunk_size=64, cast=None):
        def loss(*a):
            a = (*a, None) if len(a) == 3 else a
            if impl in EXTRA_PATHS:
                out, state = EXTRA_PATHS[impl](*a, rule=rule)
            else:
                out, state = dj.fast_weight(*a, rule=rule, impl=impl, chunk_size=chunk_size)
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state), (out, state)

        args = (q, k, v, beta) if beta is not None else (q, k, v)
        args = args if cast is None else tuple(x.astype(cast) for x in args)
        (_, values), grads = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
        return values, grads

    want = run("reference", cast=jnp.float32)
    failures = 0
    # pallas with chunk_size 64 takes the fused chunk kernel, with 256 > T the fused recurrent one.
    for impl, chunk_size in (("pallas", 64), ("pallas fused chunk, 2 load stages", 64), ("pallas", 256),
                             ("chunk + pallas walk", 64), ("chunk", 64), ("scan", 64)):
        if not fits_on_chip(EXTRA_PATHS.get(impl), key_dim, dtype):
            continue
        try:
            got = run(impl, chunk_size)
            worst = worst_relative_error(got, want)
            ok = worst < tolerance
        except Exception as err:  # noqa: BLE001 - report every failure and go on
            ok, worst = False, f"{type(err).__name__}: {err}"[:300]
        failures += not ok
        print(f"check {jnp.dtype(dtype).name} rule={rule} K={key_dim} impl={impl} chunk_size={chunk_size} "
              f"({', '.join(names)}): {'ok' if ok else 'FAIL'} worst relative error {worst} (tolerance {tolerance})")
    return failures


# B, T, H, K, V: the shapes (DPFP heads have K = 2·ν·64), then a long sequence.
SHAPES = [(8, 4096, 8, k, 64) for k in (128, 256, 384, 512)] + [(2, 16384, 8, 128, 64)]


def contenders() -> dict[str, tuple[str, Callable | None]]:
    """Name -> (framework, fn(q, k, v, beta) -> (out, final state)); fn is None if not installed."""
    return {
        "ours pallas fused chunk": ("jax", ours("pallas")),
        **{f"ours {name}": ("jax", path) for name, path in EXTRA_PATHS.items()},
        # a chunk longer than any T sends impl="pallas" to the fused recurrent kernel
        "ours pallas fused recurrent": ("jax", ours("pallas", chunk_size=1 << 30)),
        "ours chunk": ("jax", ours("chunk")),
        "ours scan": ("jax", ours("scan")),
        "FLA chunk_delta_rule": ("torch", fla("chunk_delta_rule")),
        "FLA fused_recurrent_delta_rule": ("torch", fla("fused_recurrent_delta_rule")),
        "jla mosaic_gpu deltanet": ("jax", peer_deltanet("mosaic_gpu")[0]),
    }


def deviceless_memory(gpu: str) -> int:
    """Every JAX contender compiled for ``gpu`` at SHAPES without one (benchmarks/deviceless.py):
    XLA's temp memory of the forward and of forward+backward, and the forward+backward peak (what
    the benchmark's memory column reads on the GPU), or why it does not compile. Returns the
    number of our paths that fail to compile where fits_on_chip says they fit.
    """
    from deviceless import GPUS, compile_for_gpu

    compile_jla_for(GPUS[gpu]["core_count"])
    failures = 0
    for batch, length, heads, key_dim, value_dim in SHAPES:
        shapes = [(batch, length, heads, key_dim)] * 2 + [(batch, length, heads, value_dim), (batch, length, heads)]
        args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in shapes]
        print(f"\n## B={batch}, T={length}, H={heads}, K={key_dim}, V={value_dim}, bfloat16, compiled for {gpu}\n")
        rows = {}
        for name, (framework, fn) in contenders().items():
            if framework != "jax" or fn is None:
                rows[name] = "PyTorch: XLA does not compile it" if framework != "jax" else "not installed"
                continue
            try:
                forward, backward = (compile_for_gpu(f, *args, gpu=gpu) for f in forward_and_backward(fn, len(args)))
                rows[name] = (forward.temp_bytes / 1e6, backward.temp_bytes / 1e6, backward.peak_bytes / 1e6)
            except Exception as err:  # noqa: BLE001 - a path that cannot compile is a result
                rows[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                failures += name.startswith("ours") and fits_on_chip(fn, key_dim, jnp.bfloat16)
        print_ratio_table(rows, ("fwd temp MB", "fwd+bwd temp MB", "fwd+bwd peak MB"), {"peak": 2},
                          ("ours chunk", "jla mosaic_gpu deltanet"), digits=1)
        sys.stdout.flush()
    return failures


def compile_jla_for(num_sms: int) -> None:
    """Let jax-linear-attention's Mosaic GPU deltanet compile for a Hopper GPU this machine lacks.

    Its kernels check ``jax.devices()[0]`` (not the compile target) for sm_90 and read the SM count
    from it; for a deviceless compile both are told the target's values instead.
    """
    try:
        import jla.ops.mosaic_gpu.gated_delta_rule  # noqa: F401 - loads the modules patched below
    except ImportError:
        return
    for name, module in list(sys.modules.items()):
        if name.startswith("jla.") and hasattr(module, "is_hopper"):
            module.is_hopper = lambda: True
        if name.startswith("jla.") and hasattr(module, "num_sms"):
            module.num_sms = lambda: num_sms


def benchmark(repeats: int) -> None:
    for shape in SHAPES:
        batch, length, heads, key_dim, value_dim = shape
        args = delta_rule_inputs(batch, length, heads, key_dim, value_dim, jnp.bfloat16)
        print(f"\n## B={batch}, T={length}, H={heads}, K={key_dim}, V={value_dim}, bfloat16\n")
        rows = {}
        for name, (framework, fn) in contenders().items():
            if fn is None:
                rows[name] = "not installed"
                continue
            if not fits_on_chip(fn, key_dim, jnp.bfloat16):
                rows[name] = "skipped: over an H200's shared memory at this K (triton_report.py)"
                continue
            try:
                rows[name] = (jax_timings if framework == "jax" else torch_timings)(fn, args, repeats)
            except Exception as err:  # noqa: BLE001 - a peer refusing a shape is a result
                rows[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        print_ratios(rows)
        sys.stdout.flush()


# Every row's forward+backward time and peak memory is divided by each of these rows'.
RATIO_BASES = ("ours chunk", "FLA chunk_delta_rule", "FLA fused_recurrent_delta_rule", "jla mosaic_gpu deltanet")


def print_ratios(rows: dict[str, tuple[float, float, float] | str]) -> None:
    """The benchmark table: times, peak memory, and fwd+bwd time and memory over each base row."""
    print_ratio_table(rows, ("fwd ms", "fwd+bwd ms", "fwd+bwd peak GB"), {"time": 1, "memory": 2}, RATIO_BASES,
                      digits=2)


def print_ratio_table(rows: dict[str, tuple[float, ...] | str], columns: tuple[str, ...],
                      ratios: dict[str, int], bases: tuple[str, ...], *, digits: int) -> None:
    """A markdown table of ``rows`` (name -> figures under ``columns``, or why there are none), then
    for each of ``bases`` present with figures, each ``ratios`` column (label -> figure index) of
    every row over that base row's."""
    present = {name: rows[name] for name in bases if not isinstance(rows.get(name, ""), str)}
    heads = [f"{label} / {base}" for base in present for label in ratios]
    print("| impl | " + " | ".join((*columns, *heads)) + " |")
    print("|---|" + "---:|" * (len(columns) + len(heads)))
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"| {name} | {row} |" + " |" * (len(columns) + len(heads) - 1))
            continue
        cells = [f"{x:.{digits}f}" for x in row]
        cells += [f"{row[i] / base[i]:.2f}x" for base in present.values() for i in ratios.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness against reference on the GPU only")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deviceless", metavar="GPU", nargs="?", const="NVIDIA H200",
                        help="no GPU needed: compile every JAX path for GPU (default NVIDIA H200) and print "
                             "its temp memory (benchmarks/deviceless.py; `make gpu-memory`)")
    args = parser.parse_args()
    if args.deviceless:
        print(f"compiled on {machine_name()} for {args.deviceless}, not run")
        sys.exit(1 if deviceless_memory(args.deviceless) else 0)
    print(f"machine: {machine_name()}")
    if args.check:
        sys.exit(1 if check(args.repeats) else 0)
    benchmark(args.repeats)


if __name__ == "__main__":
    main()
