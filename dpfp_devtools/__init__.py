"""Developer tools for dpfp-jax: dev-only, not part of the library and not in its wheel.

``pyproject.toml`` lists only ``dpfp_jax`` and ``pallas_kernels`` for the wheel (``tests/test_packaging.py``
checks it), so nothing here may be imported by either. What is here serves the test suite and the
benchmarks of a source checkout, which import it from the repository root:

- ``triton_lowering``: lower a jitted function's Pallas kernels to Triton IR for a named GPU, on
  any host. It reads jaxlib's Triton bindings through ``jax._src``, a private path that may move
  between jax releases: one more reason it stays out of the library.
- ``deviceless``: compile a jitted function all the way for an H100/H200 without one (XLA's
  deviceless ahead-of-time compile), with each kernel's shared memory, registers and spills.
- ``counts``: the context-parallel per-chunk flop counts next to XLA's ``cost_analysis()`` of
  the programs they count, for the test that holds them and the benchmark's table.
- ``workloads``: what the tests and benchmarks both run: the fast-weight input maker, the op's
  forward and backward, each Pallas kernel's gradient program, and the GPU paths ``impl=`` does not name.

Importing this package imports nothing else, so ``deviceless.prepare_environment()`` can still
run before jax loads.
"""
