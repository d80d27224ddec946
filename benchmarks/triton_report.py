"""What each Pallas kernel costs on chip, compiled for an H100/H200 without one.

For every kernel (forward and backward, both rules, a range of K), this compiles the op's gradient
for the named GPU with XLA's deviceless ahead-of-time compile (``dpfp_devtools/deviceless.py``): the
Pallas kernels go through jaxlib's own Triton pipeline and ``ptxas``, as on the GPU machine. It
prints what decides whether a kernel launches and how fast it can run: shared memory per program
(a compile fails above the GPU's limit, as the launch would), registers per thread and bytes
spilled to local memory. Exits 1 if any kernel fails to compile.

Usage (needs the CUDA plugin's compiler on PYTHONPATH; ``make triton-report`` installs it):
    PYTHONPATH=.venv/cuda-compiler python -m benchmarks.triton_report [--gpu "NVIDIA H100"] \
        [--keys 128 256 384 512 1024] [--kernels fused_chunk] [--dtype float32] [--dpfp-nu 3] [--gated]
"""

from __future__ import annotations

if __name__ == "__main__":
    # XLA reads its logging and dump settings once, when jax loads: set them first.
    from dpfp_devtools.deviceless import prepare_environment

    prepare_environment()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dpfp_devtools.deviceless import GPUS, SHARED_MEMORY_PER_BLOCK_OPTIN, compile_for_gpu, ptxas_version  # noqa: E402
from dpfp_devtools.workloads import KERNELS, op_gradient  # noqa: E402
from pallas_kernels.triton.dpfp import DPFP  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="NVIDIA H200", choices=sorted(GPUS))
    parser.add_argument("--keys", type=int, nargs="+", default=[128, 256, 384, 512, 1024])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--rules", nargs="+", default=["delta", "sum"], choices=["delta", "sum"])
    parser.add_argument("--fused-chunk-stages", type=int, default=1,
                        help="the fused chunk kernel's load-pipelining stages (fused_chunk(num_stages=...))")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="input dtype (the chunked kernels' dots take three TF32 passes for float32)")
    parser.add_argument("--dpfp-nu", type=int, default=None,
                        help="the fused kernels compute DPFP-nu (sum-normalised) on chip: --keys are then the "
                             "raw inputs' widths d, and K = 2 nu d")
    parser.add_argument("--gated", action="store_true",
                        help="with the decay gate (log_decay), its gradient taken too (every kernel takes it)")
    args = parser.parse_args(argv)
    features = None if args.dpfp_nu is None else DPFP(args.dpfp_nu, "sum")
    if features is not None and not set(args.kernels) <= {"fused_chunk", "fused_recurrent"}:
        parser.error("--dpfp-nu needs --kernels fused_chunk and/or fused_recurrent (the kernels that compute the "
                     "feature map)")
    if features is not None and args.gated and "fused_recurrent" in args.kernels:
        parser.error("--dpfp-nu with --gated: the fused recurrent kernel maps q, k itself only ungated (the library "
                     "applies the map before it when gated); use --kernels fused_chunk")
    shared_kib = SHARED_MEMORY_PER_BLOCK_OPTIN // 1024
    on_chip = "" if features is None else f", DPFP-{features.nu} (sum) on chip: column K is d, the state's is 2·nu·d"
    on_chip += ", gated (log_decay)" if args.gated else ""
    print(f"Pallas kernels compiled for {args.gpu} (sm_90a, {shared_kib} KiB shared memory per program) by "
          f"XLA's deviceless compile, {args.dtype} inputs, V=64{on_chip}; jax {jax.__version__}, "
          f"{ptxas_version()}\n")
    print("| kernel | rule | K | programs (B·H = 2) | warps | stages | shared KiB | registers | spill stores B "
          "| spill loads B | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for kernel in args.kernels:
        time = KERNELS[kernel]
        for rule in args.rules:
            for key_dim in args.keys:
                fn, fn_args = op_gradient(kernel, rule, key_dim, time, dtype=jnp.dtype(args.dtype),
                                          num_stages=args.fused_chunk_stages, features=features, gated=args.gated)
                try:
                    compiled = compile_for_gpu(fn, *fn_args, gpu=args.gpu)
                except Exception as err:  # noqa: BLE001 - a kernel that does not compile is a result
                    failures += 1
                    reason = str(err).splitlines()[0][:200]
                    print(f"| {kernel} (forward + backward) | {rule} | {key_dim} | | | | | | | "
                          f"| FAILS: {reason} |", flush=True)
                    continue
                for k in compiled.kernels.values():
                    if not k.name.startswith("fast_weight_"):
                        continue  # XLA's own fusions around the kernels
                    # Over the shared-memory limit the compile itself fails (above); a compiled
                    # kernel fits, and may spill registers to local memory: slower, not wrong.
                    status = "spills" if k.spill_stores else "fits"
                    print(f"| {k.name} | {rule} | {key_dim} | {k.grid[0] * k.grid[1] * k.grid[2]} | {k.threads // 32} "
                          f"| {k.stages} | {k.shared / 1024:.0f} | {k.registers} | {k.spill_stores} "
                          f"| {k.spill_loads} | {status} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
