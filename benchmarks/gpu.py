"""GPU benchmark: our kernels and ops against FLA and jax-linear-attention.

Run on a GPU machine, through ``benchmarks/run_gpu.sh`` (it installs the carried peer wheels and
first runs the GPU correctness tests, ``tests/test_gpu.py``), as ``python -m benchmarks.gpu``.

Forward and forward+backward time and peak memory at B=8, T=4096, H=8, V=64, bfloat16,
K in {128, 256, 384, 512}, plus T=16384 at B=2 (K=128), for the same five paths of ours (and the
fused chunk kernel with two load-pipelining stages, up to K=256), FLA's
``chunk_delta_rule`` and ``fused_recurrent_delta_rule`` (PyTorch + Triton) and
jax-linear-attention's ``mosaic_gpu`` deltanet, each as a ratio to our ``chunk``.
A peer that refuses a shape is listed with its reason.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--deviceless" in sys.argv:
    # XLA reads its logging and dump settings once, when jax loads: set them first.
    from dpfp_devtools.deviceless import prepare_environment

    prepare_environment()

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import delta_rule_inputs, machine_name, peer_deltanet  # noqa: E402
from dpfp_devtools.deviceless import GPUS, compile_for_gpu, peak_bytes  # noqa: E402
from dpfp_devtools.workloads import EXTRA_PATHS, fits_on_chip, forward_and_backward, ours  # noqa: E402


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
    """Every JAX contender compiled for ``gpu`` at SHAPES without one (dpfp_devtools/deviceless.py):
    XLA's temp memory of the forward and of forward+backward, and the forward+backward peak (what
    the benchmark's memory column reads on the GPU), or why it does not compile. Returns the
    number of our paths that fail to compile where fits_on_chip says they fit.
    """
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
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deviceless", metavar="GPU", nargs="?", const="NVIDIA H200",
                        help="no GPU needed: compile every JAX path for GPU (default NVIDIA H200) and print "
                             "its temp memory (dpfp_devtools/deviceless.py; `make gpu-memory`)")
    args = parser.parse_args()
    if args.deviceless:
        print(f"compiled on {machine_name()} for {args.deviceless}, not run")
        sys.exit(1 if deviceless_memory(args.deviceless) else 0)
    print(f"machine: {machine_name()}")
    benchmark(args.repeats)


if __name__ == "__main__":
    main()
