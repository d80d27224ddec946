"""GPU benchmark: our kernels and ops against FLA and jax-linear-attention.

Run on a GPU machine, through ``benchmarks/run_gpu.sh`` (it installs the carried peer wheels and
first runs the GPU correctness tests, ``tests/test_gpu.py``), as ``python -m benchmarks.gpu``.

Forward and forward+backward time and peak memory at B=8, T=4096, H=8, V=64, bfloat16,
K in {128, 256, 384, 512}, plus T=16384 at B=2 (K=128), for the same five paths of ours (and the
fused chunk kernel with two load-pipelining stages, up to K=256), FLA's
``chunk_delta_rule`` and ``fused_recurrent_delta_rule`` (PyTorch + Triton) and
jax-linear-attention's ``mosaic_gpu`` deltanet, each as a ratio to our ``chunk``.
A peer that refuses a shape is listed with its reason.

Like for like: every contender is timed in the same interleaved rounds (one call of each per
round, the median kept), PyTorch's forward without autograd as JAX's jitted forward; memory is
each side's allocator peak over one forward+backward with the inputs included (PyTorch's
``max_memory_allocated``, XLA's ``peak_bytes_in_use`` in a fresh process), and JAX's compiled
peak (what ``--deviceless`` reads) stands beside it for comparison with the deviceless tables.

``--features`` times instead a ``DPFPAttention`` training step (``--feature-shape``, default
B=8, T=4096, H=8, d=64, nu=3, V=d, bfloat16: ``dpfp_devtools.workloads.attention_training_step``)
with impl ``chunk`` and ``pallas``, each with the feature map inside the op (the layer's default:
the Pallas kernels then compute DPFP on chip from q, k of width d) and applied by the layer
(the op, and the kernels, given phi(q), phi(k) of width K = 2·nu·d), with each program's compiled
peak. With ``--deviceless`` it compiles the same four steps for the GPU without one and prints
their temporary and peak memory.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--deviceless" in sys.argv:
    # XLA reads its logging and dump settings once, when jax loads: set them first.
    from dpfp_devtools.deviceless import prepare_environment

    prepare_environment()

import argparse  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import (  # noqa: E402
    delta_rule_inputs,
    peer_deltanet,
    reported_run,
    time_interleaved_ms,
)
from dpfp_devtools.deviceless import GPUS, compile_for_gpu, peak_bytes  # noqa: E402
from dpfp_devtools.torch_peers import torch_calls, torch_runtime_peak_bytes  # noqa: E402
from dpfp_devtools.workloads import (  # noqa: E402
    EXTRA_PATHS,
    attention_training_step,
    fits_on_chip,
    forward_and_backward,
    ours,
)


def failure(err: Exception) -> str:
    """A table row's text for a contender that could not compile or run: the error's type and first line."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def jax_calls(fn: Callable, args: tuple) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward+backward) of a JAX contender as calls that return once the device is done."""
    forward, backward = forward_and_backward(fn, len(args))
    return (lambda: jax.block_until_ready(forward(*args))), (lambda: jax.block_until_ready(backward(*args)))


def jax_runtime_peak_bytes(name: str, shape: tuple[int, ...]) -> int | str:
    """XLA's allocator peak over one forward+backward of contender ``name`` at ``shape``, the inputs
    (allocated before) included: the figure ``torch_runtime_peak_bytes`` reads on the PyTorch side.

    jax cannot reset its allocator's peak, and compiling (autotuning) allocates device memory too,
    so each figure comes from a fresh process that loads the program from a persistent compilation
    cache that another fresh process filled: the measured process allocates only the inputs and
    what the run itself needs. Returns the bytes, or why there is no figure.
    """
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        command = [sys.executable, "-m", "benchmarks.gpu", "--runtime-peak-of", name,
                   "--shape", ",".join(map(str, shape)), "--cache-dir", cache]
        for step in ("compile", "measure"):
            done = subprocess.run([*command, "--step", step], capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode or (step == "measure" and not lines):
                return f"{step} failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return json.loads(lines[-1])["peak_bytes"]


def runtime_peak_child(name: str, shape: tuple[int, ...], cache_dir: str, step: str) -> None:
    """The fresh process of ``jax_runtime_peak_bytes``: ``step="compile"`` fills the cache,
    ``"measure"`` runs once from it and prints ``{"peak_bytes": ...}`` (XLA's ``peak_bytes_in_use``)."""
    import json

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Draw the inputs on the host: drawing them on the device would leave float32 draws in the peak.
    with jax.default_device(jax.devices("cpu")[0]):
        host_args = delta_rule_inputs(*shape, jnp.bfloat16)
    args = jax.device_put(host_args, jax.devices()[0])
    _, backward = forward_and_backward(contenders()[name][1], len(args))
    compiled = backward.lower(*args).compile()
    if step == "measure":
        if compiled.memory_analysis() is None or jax.devices()[0].memory_stats() is None:
            raise SystemExit(f"no allocator statistics on {jax.devices()[0].platform}")
        jax.block_until_ready(compiled(*args))
        print(json.dumps({"peak_bytes": jax.devices()[0].memory_stats()["peak_bytes_in_use"]}))


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
                rows[name] = failure(err)
                failures += name.startswith("ours") and fits_on_chip(fn, key_dim, jnp.bfloat16)
        print_ratio_table(rows, ("fwd temp MB", "fwd+bwd temp MB", "fwd+bwd peak MB"), {"peak": 2},
                          ("ours chunk", "jla mosaic_gpu deltanet"), digits=1)
        sys.stdout.flush()
    return failures


FEATURE_SHAPE = (8, 4096, 8, 64, 3)
"""B, T, H, d, nu of ``--features``' DPFPAttention training step (V = d)."""


def feature_steps(shape: tuple[int, ...], rule: str) -> dict[str, tuple[Callable, tuple]]:
    """``"impl, map where" -> (fn, args)``: the DPFPAttention training step at ``shape`` (B, T, H,
    d, nu) with ``rule``, for impl chunk and pallas, the feature map in the op and in the layer;
    ``args`` are ShapeDtypeStructs (``attention_training_step``)."""
    batch, length, heads, head_dim, nu = shape
    return {f"{impl}, map {'in the op' if fuse else 'in the layer'}":
            attention_training_step(fuse, impl, batch=batch, time=length, heads=heads, head_dim=head_dim, nu=nu,
                                    rule=rule)
            for impl in ("chunk", "pallas") for fuse in (False, True)}


def flat(fn: Callable, args: tuple) -> tuple[Callable, list]:
    """``fn`` taking ``args``' leaves one by one (what ``compile_for_gpu`` places), and the leaves."""
    leaves, tree = jax.tree.flatten(args)
    return (lambda *leaves: fn(*jax.tree.unflatten(tree, leaves))), leaves


def feature_title(shape: tuple[int, ...], rule: str, where: str) -> str:
    batch, length, heads, head_dim, nu = shape
    return (f"\n## DPFPAttention training step, B={batch}, T={length}, H={heads}, d={head_dim}, nu={nu} "
            f"(K={2 * nu * head_dim}), V={head_dim}, bfloat16, {rule} rule, {where}\n")


def deviceless_features_memory(gpu: str, shape: tuple[int, ...] = FEATURE_SHAPE, rule: str = "delta") -> int:
    """The four ``feature_steps`` compiled for ``gpu``: temp and peak memory, each peak over its
    impl's step with the map in the layer. Returns how many failed to compile."""
    print(feature_title(shape, rule, f"compiled for {gpu}"))
    rows: dict[str, tuple[float, ...] | str] = {}
    for name, (fn, args) in feature_steps(shape, rule).items():
        try:
            flat_fn, leaves = flat(fn, args)
            compiled = compile_for_gpu(flat_fn, *leaves, gpu=gpu)
            rows[name] = (compiled.temp_bytes / 1e6, compiled.peak_bytes / 1e6)
        except Exception as err:  # noqa: BLE001 - a step that cannot compile is a result
            rows[name] = failure(err)
    print_ratio_table(rows, ("temp MB", "peak MB"), {"peak": 1},
                      ("chunk, map in the layer", "pallas, map in the layer"), digits=1)
    return sum(isinstance(row, str) for row in rows.values())


def features_benchmark(repeats: int, shape: tuple[int, ...] = FEATURE_SHAPE, rule: str = "delta") -> None:
    """The four ``feature_steps`` run on the default device: time in interleaved rounds (median
    of ``repeats``) and compiled peak, each over its impl's step with the map in the layer. A step
    that cannot run here (impl pallas without a GPU or TPU) gets its error as its row."""
    print(feature_title(shape, rule, f"on {jax.devices()[0].device_kind}"))
    steps = feature_steps(shape, rule)
    rows: dict[str, tuple[float, ...] | str] = {}
    calls, peaks = {}, {}
    for name, (fn, args) in steps.items():
        # The same small draws for every step (their parameter trees agree): the time does not
        # depend on the values, and small ones keep the layer's activations far from overflow.
        leaves, tree = jax.tree.flatten(args)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        values = jax.tree.unflatten(tree, [0.05 * jax.random.normal(key, leaf.shape, leaf.dtype)
                                           for key, leaf in zip(keys, leaves, strict=True)])
        try:
            step = jax.jit(fn)
            peaks[name] = peak_bytes(step.lower(*values).compile())
            calls[name] = lambda step=step, values=values: step(*values)
            jax.block_until_ready(calls[name]())  # compile, and a refusal, before any timing
        except Exception as err:  # noqa: BLE001 - a path that cannot run here is a result
            calls.pop(name, None)
            rows[name] = failure(err)
    times = time_interleaved_ms(calls, repeats=repeats)
    for name in calls:
        rows[name] = (times[name], peaks[name] / 1e9)
    print_ratio_table({name: rows[name] for name in steps}, ("fwd+bwd ms", "compiled peak GB"),
                      {"time": 0, "memory": 1}, ("chunk, map in the layer", "pallas, map in the layer"), digits=2)


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


def benchmark(repeats: int, memory_shapes: list[tuple[int, ...]], shapes: list[tuple[int, ...]]) -> None:
    """Each shape's table: every contender's forward and forward+backward timed in interleaved rounds
    (median of ``repeats``: ``benchmarks.common.time_interleaved_ms``), its runtime allocator peak
    over a forward+backward (the same figure on both sides; for JAX contenders only at
    ``memory_shapes``, each taking two fresh processes), and JAX's compiled peak beside it."""
    for shape in shapes:
        batch, length, heads, key_dim, value_dim = shape
        args = delta_rule_inputs(batch, length, heads, key_dim, value_dim, jnp.bfloat16)
        print(f"\n## B={batch}, T={length}, H={heads}, K={key_dim}, V={value_dim}, bfloat16\n")
        rows: dict[str, tuple[float, ...] | str] = {}
        calls, peaks, compiled = {}, {}, {}
        for name, (framework, fn) in contenders().items():
            if fn is None:
                rows[name] = "not installed"
            elif not fits_on_chip(fn, key_dim, jnp.bfloat16):
                rows[name] = "skipped: over an H200's shared memory at this K (triton_report.py)"
            else:
                try:
                    calls[name] = (jax_calls if framework == "jax" else torch_calls)(fn, args)
                    for call in calls[name]:
                        call()  # compile (and a peer's refusal of the shape) before any timing
                    if framework == "torch":
                        peaks[name] = torch_runtime_peak_bytes(fn, args)
                    else:
                        backward = forward_and_backward(fn, len(args))[1]
                        compiled[name] = peak_bytes(backward.lower(*args).compile())
                        if shape in memory_shapes:
                            peaks[name] = jax_runtime_peak_bytes(name, shape)
                except Exception as err:  # noqa: BLE001 - a peer refusing a shape is a result
                    calls.pop(name, None)
                    rows[name] = failure(err)
        forward = time_interleaved_ms({n: c[0] for n, c in calls.items()}, repeats=repeats)
        backward = time_interleaved_ms({n: c[1] for n, c in calls.items()}, repeats=repeats)
        for name in calls:
            peak = peaks.get(name, "not measured")
            rows[name] = (forward[name], backward[name],
                          peak / 1e9 if isinstance(peak, int) else float("nan"),
                          compiled[name] / 1e9 if name in compiled else float("nan"))
            if isinstance(peak, str) and peak != "not measured":
                print(f"- {name}: no runtime peak: {peak}")
        print_ratios({name: rows[name] for name in contenders()})
        sys.stdout.flush()


# Every row's forward+backward time and peak memory is divided by each of these rows'.
RATIO_BASES = ("ours chunk", "FLA chunk_delta_rule", "FLA fused_recurrent_delta_rule", "jla mosaic_gpu deltanet")


def print_ratios(rows: dict[str, tuple[float, ...] | str]) -> None:
    """The benchmark table: times, runtime peak memory (nan: not measured), JAX's compiled peak, and
    fwd+bwd time and runtime peak over each base row."""
    print_ratio_table(rows, ("fwd ms", "fwd+bwd ms", "fwd+bwd runtime peak GB", "fwd+bwd compiled peak GB"),
                      {"time": 1, "memory": 2}, RATIO_BASES, digits=2)


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
        cells = ["n/a" if math.isnan(x) else f"{x:.{digits}f}" for x in row]
        cells += ["n/a" if math.isnan(row[i] / base[i]) else f"{row[i] / base[i]:.2f}x"
                  for base in present.values() for i in ratios.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


def five_positive_integers(names: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: ``"8,4096,8,128,64"`` -> ``(8, 4096, 8, 128, 64)``, five positive integers
    ``names`` (e.g. ``"B,T,H,K,V"``), or an error naming them."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            shape = tuple(int(x) for x in text.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 5 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"a shape is five positive integers {names}; got {text!r}")
        return shape

    return parse


parse_shape = five_positive_integers("B,T,H,K,V")
parse_feature_shape = five_positive_integers("B,T,H,d,nu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds (median)")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=SHAPES, metavar="B,T,H,K,V",
                        help="the shapes to time (default: the issue's four at T=4096 and one at T=16384)")
    parser.add_argument("--memory-shapes", type=parse_shape, nargs="*", default=[SHAPES[0], SHAPES[3]],
                        metavar="B,T,H,K,V",
                        help="shapes at which JAX contenders' runtime peak is measured (two fresh processes "
                             "each); default: K=128 and K=512 at B=8, T=4096")
    parser.add_argument("--deviceless", metavar="GPU", nargs="?", const="NVIDIA H200",
                        help="no GPU needed: compile every JAX path for GPU (default NVIDIA H200) and print "
                             "its temp memory (dpfp_devtools/deviceless.py; `make gpu-memory`)")
    parser.add_argument("--features", action="store_true",
                        help="a DPFPAttention training step instead, impl chunk and pallas, the feature map in the "
                             "op or applied by the layer (timed; with --deviceless, its memory)")
    parser.add_argument("--feature-shape", type=parse_feature_shape, default=FEATURE_SHAPE, metavar="B,T,H,d,nu",
                        help="--features' shape (default: %(default)s; V = d)")
    parser.add_argument("--rule", choices=("delta", "sum"), default="delta", help="--features' update rule")
    # The fresh processes of jax_runtime_peak_bytes.
    parser.add_argument("--runtime-peak-of", help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=parse_shape, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=("compile", "measure"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")
    if not args.features and (args.rule != "delta" or args.feature_shape != FEATURE_SHAPE):
        parser.error("--rule and --feature-shape apply to --features only")
    if args.runtime_peak_of:
        runtime_peak_child(args.runtime_peak_of, args.shape, args.cache_dir, args.step)
        return
    with reported_run():
        if args.deviceless:
            print(f"compiled for {args.deviceless}, not run")
            failures = (deviceless_features_memory(args.deviceless, args.feature_shape, args.rule) if args.features
                        else deviceless_memory(args.deviceless))
        elif args.features:
            features_benchmark(args.repeats, args.feature_shape, args.rule)
            failures = 0
        else:
            benchmark(args.repeats, args.memory_shapes, args.shapes)
            failures = 0
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
