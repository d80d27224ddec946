"""Temp memory of forward+backward compiled for an H200 (no GPU): reference, scan, pallas.

Run by tests/test_deviceless.py with XLA's CUDA compiler on PYTHONPATH; prints one line per impl.
"""

from dpfp_devtools.deviceless import prepare_environment


def main() -> None:
    prepare_environment()  # before jax is imported
    import jax
    import jax.numpy as jnp

    from dpfp_devtools.deviceless import compile_for_gpu
    from dpfp_devtools.workloads import forward_and_backward, ours

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
