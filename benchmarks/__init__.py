"""Benchmark scripts, each run from the repository root as ``python -m benchmarks.NAME``.

Not part of the library (the wheel ships ``dpfp_jax`` and ``pallas_kernels`` only). Importing this
package imports nothing, so a script can still set XLA's environment before jax loads.
"""
