"""Our GPU paths against ``impl="reference"`` on a GPU: outputs, final state and gradients.

Float32 and bfloat16 inputs, small shapes, both rules, K in {128, 384}: ``pallas`` (the fused
chunk kernel, also with two load stages, and the fused recurrent one), ``chunk`` with its
inter-chunk walk in Pallas, ``chunk`` and ``scan``. Skipped without a GPU; ``benchmarks/run_gpu.sh``
runs them on the GPU machine (``pytest -m gpu``) before the benchmark.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import dpfp_jax as dj
from dpfp_devtools.workloads import EXTRA_PATHS, fits_on_chip, make_inputs, worst_relative_error
from tests.helpers import pallas_calls

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu",
                       reason=f"needs a GPU: jax.default_backend() is {jax.default_backend()!r}, not 'gpu'"),
]

# float32 inputs must match to 1e-4 relative (the chunked kernels' dots take three TF32 passes);
# bfloat16 inputs (one pass) to 1e-2 against the reference run on the same values in float32:
# bfloat16's own output rounding is about 2e-3 (benchmarks/dot_precision.py).
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}

# impl (or a path of EXTRA_PATHS), chunk_size: pallas with chunk_size 64 takes the fused chunk
# kernel, with 256 > T the fused recurrent one.
PATHS = [("pallas", 64), ("pallas fused chunk, 2 load stages", 64), ("pallas", 256), ("chunk + pallas walk", 64),
         ("chunk", 64), ("scan", 64)]


def outputs_and_gradients(impl: str, rule: str, dtype, key_dim: int, chunk_size: int = 64, cast=None):
    inputs = make_inputs(0, batch=2, time=200, heads=2, key_dim=key_dim, value_dim=16, rule=rule, dtype=dtype)
    args = tuple(inputs[n] for n in ("q", "k", "v", "beta") if inputs[n] is not None)
    args = args if cast is None else tuple(x.astype(cast) for x in args)

    def loss(*a):
        a = (*a, None) if len(a) == 3 else a
        if impl in EXTRA_PATHS:
            out, state = EXTRA_PATHS[impl](*a, rule=rule)
        else:
            out, state = dj.fast_weight(*a, rule=rule, impl=impl, chunk_size=chunk_size)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state), (out, state)

    (_, values), grads = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
    return values, grads


@functools.cache
def reference(rule: str, dtype, key_dim: int):
    return outputs_and_gradients("reference", rule, dtype, key_dim, cast=jnp.float32)


@pytest.mark.parametrize("impl, chunk_size", PATHS)
@pytest.mark.parametrize("key_dim", [128, 384])
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_gpu_path_matches_reference(dtype, rule, key_dim, impl, chunk_size):
    if not fits_on_chip(EXTRA_PATHS.get(impl), key_dim, dtype):
        pytest.skip(f"{impl} needs more than an H200 program's shared memory at K={key_dim}, "
                    f"{jnp.dtype(dtype).name} (benchmarks/triton_report.py)")
    got = outputs_and_gradients(impl, rule, dtype, key_dim, chunk_size)
    worst = worst_relative_error(got, reference(rule, dtype, key_dim))
    assert worst < TOLERANCE[dtype], f"worst relative error {worst} (tolerance {TOLERANCE[dtype]})"


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("time, kernel", [(200, "fused_chunk_fwd"), (40, "fused_recurrent_dpfp_fwd")])
def test_gpu_fused_kernels_compute_dpfp_on_chip(dtype, rule, time, kernel):
    # impl="pallas" with features: the fused chunk kernel (T = 200, chunks of 64) or below one
    # chunk the fused recurrent one (T = 40) reads q, k at d = 64 and computes DPFP-3 (K = 384)
    # itself; against the map applied first and the reference, in float32.
    phi = dj.Features("dpfp", dim=64, nu=3, normalization="sum")
    inputs = make_inputs(0, batch=2, time=time, heads=2, key_dim=64, value_dim=16, rule=rule, dtype=dtype)
    raw = jax.random.normal(jax.random.key(5), (2, 2, time, 2, 64))  # make_inputs' q, k are non-negative
    args = (raw[0].astype(dtype), raw[1].astype(dtype), inputs["v"], inputs["beta"])

    def values_and_grads(fused: bool, cast=None):
        given = args if cast is None else tuple(None if x is None else x.astype(cast) for x in args)

        def loss(*a):
            q, k, v, beta = (*a, None) if rule == "sum" else a
            if fused:
                out, state = dj.fast_weight(q, k, v, beta, rule=rule, impl="pallas", features=phi)
            else:
                out, state = dj.fast_weight(phi(q), phi(k), v, beta, rule=rule, impl="reference")
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state), (out, state)

        present = tuple(x for x in given if x is not None)
        (_, values), grads = jax.value_and_grad(loss, argnums=tuple(range(len(present))), has_aux=True)(*present)
        return values, grads

    # The kernels read q, k at width d (a map applied before them would hand them K = 384).
    fused = jax.make_jaxpr(lambda *a: dj.fast_weight(*a[:3], a[3] if rule == "delta" else None, rule=rule,
                                                     impl="pallas", features=phi))(*args[:3], args[3])
    assert any(f"fast_weight_{kernel}" in str(eqn.params["name"]) for eqn in pallas_calls(fused.jaxpr))
    assert {next(v.aval.shape[-1] for v in eqn.invars if v.aval.ndim >= 3) for eqn in pallas_calls(fused.jaxpr)} == {64}
    worst = worst_relative_error(values_and_grads(True), values_and_grads(False, cast=jnp.float32))
    assert worst < TOLERANCE[dtype], f"worst relative error {worst} (tolerance {TOLERANCE[dtype]})"


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("time, kernel", [(200, "fused_chunk_fwd"), (40, "fused_recurrent_gated_fwd")])
def test_gpu_gated_fused_kernels_match_reference(dtype, rule, time, kernel):
    # impl="pallas" with log_decay (alpha between about 0.3 and 1, exactly 0 at two steps): the
    # fused chunk kernel gated (T = 200, chunks of 64) or below one chunk the fused recurrent one
    # (T = 40), K = 128, every gradient including log_decay's.
    inputs = make_inputs(0, batch=2, time=time, heads=2, key_dim=128, value_dim=16, rule=rule, dtype=dtype)
    noise = jax.random.normal(jax.random.key(1), (2, time, 2))
    log_decay = (-0.5 * jax.nn.softplus(noise)).at[:, time // 3].set(-jnp.inf).at[:, time // 2].set(-jnp.inf)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["beta"], log_decay)
    argnums = (0, 1, 2, 4) + ((3,) if rule == "delta" else ())

    def loss(q, k, v, beta, gate, impl, cast=None):
        if cast is not None:
            q, k, v, beta = (None if x is None else x.astype(cast) for x in (q, k, v, beta))
        out, state = dj.fast_weight(q, k, v, beta, rule=rule, impl=impl, chunk_size=64, log_decay=gate)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state), (out, state)

    def values_and_grads(impl, cast=None):
        (_, values), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(*args, impl, cast)
        return values, grads

    assert f"fast_weight_{kernel}" in str(jax.make_jaxpr(lambda *a: loss(*a, "pallas"))(*args))
    worst = worst_relative_error(values_and_grads("pallas"), values_and_grads("reference", jnp.float32))
    assert worst < TOLERANCE[dtype], f"worst relative error {worst} (tolerance {TOLERANCE[dtype]})"
