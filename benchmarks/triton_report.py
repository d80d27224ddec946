"""What each Pallas kernel costs on chip, compiled for an H100/H200 without one.

For every kernel (forward and backward, both rules, a range of K), this lowers the op to Triton IR
for the named GPU (``pallas_kernels.triton_lowering``), compiles that IR with Triton's own
compiler to PTX for the GPU's architecture, and assembles it with Triton's bundled ``ptxas -v``.
It prints what decides whether a kernel launches and how fast it can run: shared memory per
program (a launch fails above the GPU's limit), registers per thread and bytes spilled to local
memory.

Caveat: XLA compiles Pallas's Triton IR with the Triton fork inside jaxlib, not the ``triton``
package used here, so figures can differ a little from what runs on the GPU; a shared-memory
overflow or heavy spilling shows in both.

Usage (needs the ``triton`` package; ``make triton-report`` installs it):
    python benchmarks/triton_report.py [--gpu "NVIDIA H100"] [--keys 128 256 384 512 1024]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk  # noqa: E402
from pallas_kernels import fused_chunk, fused_recurrent  # noqa: E402
from pallas_kernels.triton_lowering import DEFAULT_GPU, TritonCall, triton_calls  # noqa: E402

# Kernel -> sequence length T it is compiled for (chunked kernels: four chunks of 64).
KERNELS = {"fused_recurrent": 64, "fused_chunk": 256, "chunk_recurrence": 256}

# Shared memory one program may use (the opt-in maximum per block), by compute capability.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 100: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}


def compute_capability(gpu: str) -> int:
    from jax.experimental.pallas import triton as pltriton

    version = pltriton.GpuVersion(gpu)
    return int(pltriton.get_gpu_info_from_version(version).arch_name.replace(".", ""))


def op_gradient(kernel: str, rule: str, key_dim: int, time: int, value_dim: int = 64, dtype=jnp.bfloat16,
                batch: int = 1, heads: int = 2, num_stages: int = 1):
    """(fn, args): forward and backward of one kernel through the op, args as ShapeDtypeStructs.

    ``num_stages``: the fused chunk kernel's load-pipelining stages (the others ignore it).
    """

    def run(q, k, v, beta, s):
        if kernel == "fused_recurrent":
            return fused_recurrent(q, k, v, beta, s, rule=rule)
        if kernel == "fused_chunk":
            return fused_chunk(q, k, v, beta, s, rule=rule, chunk_size=64, num_stages=num_stages)
        return fast_weight_chunk(q, k, v, beta, s, rule=rule, scale=1.0, chunk_size=64, recurrence="pallas")

    def loss(q, k, v, beta, s):
        out, state = run(q, k, v, beta, s)
        return out.astype(jnp.float32).sum() + state.sum()

    def shape(*dims, dtype=dtype):
        return jax.ShapeDtypeStruct(dims, dtype)

    keys = shape(batch, time, heads, key_dim)
    beta = shape(batch, time, heads) if rule == "delta" else None
    args = (keys, keys, shape(batch, time, heads, value_dim), beta,
            shape(batch, heads, key_dim, value_dim, dtype=jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2, 4)), args


def compile_to_machine_code(call: TritonCall, capability: int) -> dict[str, int]:
    """Shared memory, registers and spills of one kernel, from Triton's compiler and ptxas -v."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses multiply-adds
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, f"{call.name}.ttir")
        source.write_text(call.ir)
        compiled = triton.compile(str(source), target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": call.num_warps, "num_stages": call.num_stages})
        ptx = Path(folder, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        report = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", str(ptx),
                                 "-o", str(Path(folder, "kernel.cubin"))],
                                capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(shared=compiled.metadata.shared,
                registers=int(re.search(r"Used (\d+) registers", text).group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


def _triton_version() -> str:
    import triton

    return triton.__version__


def verdict(resources: dict[str, int], shared_limit: int) -> str:
    if resources["shared"] > shared_limit:
        return f"FAILS: needs {resources['shared'] // 1024} KiB shared memory"
    if resources["spill_stores"]:
        return "spills"
    return "fits"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default=DEFAULT_GPU, help="device kind, e.g. 'NVIDIA H100'")
    parser.add_argument("--keys", type=int, nargs="+", default=[128, 256, 384, 512, 1024])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--rules", nargs="+", default=["delta", "sum"], choices=["delta", "sum"])
    parser.add_argument("--fused-chunk-stages", type=int, default=1,
                        help="the fused chunk kernel's load-pipelining stages (fused_chunk(num_stages=...))")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="input dtype (the chunked kernel's dots take three TF32 passes for float32)")
    args = parser.parse_args(argv)
    capability = compute_capability(args.gpu)
    limit = SHARED_MEMORY_LIMIT.get(capability, 99 * 1024)
    print(f"Triton resources for {args.gpu} (sm_{capability}, {limit // 1024} KiB shared memory per program), "
          f"{args.dtype} inputs, V=64; jax {jax.__version__}, triton {_triton_version()}\n")
    print("| kernel | rule | K | programs (B·H = 2) | warps | stages | shared KiB | registers | spilled bytes "
          "| verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for kernel in args.kernels:
        time = KERNELS[kernel]
        for rule in args.rules:
            for key_dim in args.keys:
                fn, fn_args = op_gradient(kernel, rule, key_dim, time, dtype=jnp.dtype(args.dtype),
                                          num_stages=args.fused_chunk_stages)
                for call in triton_calls(fn, *fn_args, gpu=args.gpu):
                    res = compile_to_machine_code(call, capability)
                    status = verdict(res, limit)
                    failures += status.startswith("FAILS")
                    print(f"| {call.name} | {rule} | {key_dim} | {call.grid[0] * call.grid[1] * call.grid[2]} "
                          f"| {call.num_warps} | {call.num_stages} | {res['shared'] / 1024:.0f} "
                          f"| {res['registers']} | {res['spill_stores']} | {status} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
