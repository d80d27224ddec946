"""Temp memory of forward+backward compiled for an H200 (no GPU): reference, scan, pallas.

Run by tests/test_deviceless.py with XLA's CUDA compiler on PYTHONPATH; prints one line per impl.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def main() -> None:
    from deviceless import prepare_environment

    prepare_environment()  # before jax is imported
    import jax
    import jax.numpy as jnp
    from common import forward_and_backward, ours
    from deviceless import compile_for_gpu

    B, T, H, K, V = 1, 4096, 2, 128, 64
    shapes = ((B, T, H, K), (B, T, H, K), (B, T, H, V), (B, T, H))
    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    for impl in ("reference", "scan", "chunk", "pallas"):
        _, backward = forward_and_backward(ours(impl), len(args))
        compiled = compile_for_gpu(backward, *args)
        kernels = sorted(name for name in compiled.kernels if name.startswith("fast_weight_"))
        print(impl, compiled.temp_bytes, ",".join(kernels))


if __name__ == "__main__":
    main()
