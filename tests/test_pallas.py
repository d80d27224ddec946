"""Pallas kernels in interpret mode on the CPU, against the oracle; the GPU-only dispatch."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from pallas_kernels import MAX_KEY_DIM, fused_chunk, fused_recurrent
from tests.conftest import make_inputs, pallas_calls, random_like
from tests.test_multidevice import run_with_host_devices

ARGS = ("q", "k", "v", "beta", "initial_state")


def value_and_grads(fn, inputs):
    names = [n for n in ARGS if inputs[n] is not None]

    def loss(*args):
        out, state = fn(*args) if len(args) == 5 else fn(args[0], args[1], args[2], None, args[3])
        return (jnp.sum(out.astype(jnp.float32) * random_like(1, out).astype(jnp.float32))
                + jnp.sum(state * random_like(2, state)), (out, state))

    (_, values), grads = jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True)(
        *[inputs[n] for n in names]
    )
    return values, grads


def kernel(rule, scale=1.0):
    return lambda q, k, v, beta, s: fused_recurrent(q, k, v, beta, s, rule=rule, scale=scale, interpret=True)


def oracle(rule, scale=1.0):
    return lambda q, k, v, beta, s: dj.fast_weight(q, k, v, beta, rule=rule, initial_state=s, scale=scale,
                                                   impl="reference")


SLOW = pytest.mark.slow


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("key_dim, value_dim", [pytest.param(8, 4, marks=SLOW), pytest.param(12, 5, marks=SLOW),
                                                (96, 70)])
def test_fused_recurrent_matches_reference(rule, key_dim, value_dim):
    # 12 and 96 exercise the padding of K to a power of two; V = 70 splits over value blocks.
    inputs = make_inputs(key_dim, time=11, rule=rule, key_dim=key_dim, value_dim=value_dim, with_state=True)
    got = value_and_grads(kernel(rule, 0.5), inputs)
    want = value_and_grads(oracle(rule, 0.5), inputs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def chunked_kernel(rule, scale=1.0, chunk_size=16):
    from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk

    return lambda q, k, v, beta, s: fast_weight_chunk(q, k, v, beta, s, rule=rule, scale=scale,
                                                      chunk_size=chunk_size, recurrence="pallas_interpret")


def fused_chunk_kernel(rule, scale=1.0, chunk_size=16):
    return lambda q, k, v, beta, s: fused_chunk(q, k, v, beta, s, rule=rule, scale=scale, chunk_size=chunk_size,
                                                interpret=True)


def chunked_cases():
    # Every shape for the shipped fused chunk kernel in `make test`; the walk-only kernel, kept
    # for comparison on the GPU, runs its larger shapes with the slow tests.
    for kernel_of, name in ((fused_chunk_kernel, "fused_chunk"), (chunked_kernel, "chunk_recurrence")):
        for shape, slow in (((8, 4, 40), True), ((12, 5, 33), False), ((160, 70, 50), name != "fused_chunk"),
                            ((130, 16, 32), True)):
            yield pytest.param(kernel_of, *shape, marks=[SLOW] if slow else [], id=f"{name}-{shape[0]}")


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("kernel_of, key_dim, value_dim, T", list(chunked_cases()))
def test_chunked_kernels_match_reference(kernel_of, rule, key_dim, value_dim, T):
    # K = 160 and 130 pad to 192: three 64-key tiles (whole tiles, not the power of two 256);
    # V = 70 splits over value blocks (forward and backward differently); T = 33 and 50 end in a
    # partial chunk.
    inputs = make_inputs(T, time=T, rule=rule, key_dim=key_dim, value_dim=value_dim, with_state=True)
    got = value_and_grads(kernel_of(rule, 0.5), inputs)
    want = value_and_grads(oracle(rule, 0.5), inputs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_of", [kernel, fused_chunk_kernel], ids=["fused_recurrent", "fused_chunk"])
def test_kernels_take_bfloat16(kernel_of):
    # bf16 inputs are read as they are; outputs and gradients come back in bf16, the state in
    # float32. T = 40 is two and a half chunks of 16 for the chunked kernel.
    inputs = make_inputs(1, time=40, key_dim=16, value_dim=8, with_state=True)
    bf16 = {n: x.astype(jnp.bfloat16) for n, x in inputs.items()}
    (out, state), grads = value_and_grads(kernel_of("delta"), bf16)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    (want_out, want_state), want_grads = value_and_grads(
        oracle("delta"), {n: x.astype(jnp.float32) for n, x in bf16.items()})
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(state), np.asarray(want_state), rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunk_size", [8, 48])
def test_fused_chunk_refuses_chunks_a_tensor_core_cannot_tile(chunk_size):
    inputs = make_inputs(0, time=96, with_state=True)
    with pytest.raises(ValueError, match=f"power of two >= 16; got chunk_size={chunk_size}"):
        fused_chunk(*[inputs[n] for n in ARGS], rule="delta", chunk_size=chunk_size, interpret=True)


@pytest.mark.parametrize("T, kernel_name", [(40, "fused_chunk"), (10, "fused_recurrent")])
def test_pallas_adapter_picks_chunked_from_one_chunk_on(T, kernel_name):
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas

    inputs = make_inputs(2, time=T, key_dim=8, value_dim=4, with_state=True)
    args = [inputs[n] for n in ARGS]
    def run(*a):
        return fast_weight_pallas(*a, rule="delta", scale=1.0, chunk_size=16, interpret=True)

    jaxpr = str(jax.make_jaxpr(run)(*args))  # pallas_call keeps its kernel's name there
    assert f"fast_weight_{kernel_name}_fwd" in jaxpr
    want = oracle("delta")(*args)
    for g, w in zip(jax.jit(run)(*args), want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def primitives_outside_kernels(jaxpr) -> list[str]:
    """Names of the primitives a jaxpr runs, looking into nested jits but not into custom_vjp calls."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        if eqn.primitive.name in ("jit", "pjit"):
            names += primitives_outside_kernels(eqn.params["jaxpr"].jaxpr)
    return names


@pytest.mark.parametrize("rule, transposes", [("sum", 0), ("delta", 2)])
def test_fused_chunk_reads_inputs_in_place(rule, transposes):
    # With K a power of two and T whole chunks nothing is padded, and q, v, the outputs (and for
    # the sum rule k) are never transposed: the kernels read the [B, T, H, D] layout per head.
    # The delta rule's WY inverse reads k and beta head-major: two transposes, done by XLA.
    inputs = make_inputs(0, time=64, heads=3, key_dim=64, value_dim=32, rule=rule, with_state=True)
    args = {n: x if x is None or n == "initial_state" else x.astype(jnp.bfloat16) for n, x in inputs.items()}
    jaxpr = jax.make_jaxpr(lambda *a: fused_chunk(*a, rule=rule, chunk_size=16))(*[args[n] for n in ARGS])
    names = primitives_outside_kernels(jaxpr.jaxpr)
    assert names.count("transpose") == transposes and "pad" not in names, names


def kernel_outputs(jaxpr, name: str) -> list[list[tuple[str, tuple]]]:
    """(dtype, shape) of the outputs of every pallas_call named ``name``, nested jaxprs included."""
    return [[(v.aval.dtype.name, v.aval.shape) for v in eqn.outvars]
            for eqn in pallas_calls(jaxpr) if name in str(eqn.params["name"])]


def test_fused_chunk_writes_outputs_in_v_dtype_and_keeps_writes_only_for_gradients():
    # The forward kernel rounds the (scaled) output to v's dtype on chip, and stores the float32
    # writes u, which the backward rebuilds states from, only when a gradient will be taken.
    inputs = make_inputs(0, time=32, key_dim=16, value_dim=16, with_state=True)
    args = [inputs[n] if n == "initial_state" else inputs[n].astype(jnp.bfloat16) for n in ARGS]

    def run(*a):
        return fused_chunk(*a, rule="delta", scale=0.5, chunk_size=16, interpret=True)

    chunks, state = (2, 2, 16, 2, 16), (4, 16, 16)
    assert kernel_outputs(jax.make_jaxpr(run)(*args).jaxpr, "fused_chunk_fwd") == [
        [("bfloat16", chunks), ("float32", state)]]
    assert kernel_outputs(jax.make_jaxpr(lambda *a: jax.vjp(run, *a))(*args).jaxpr, "fused_chunk_fwd") == [
        [("bfloat16", chunks), ("float32", chunks), ("float32", state)]]
    # dv comes out of the backward kernel in v's dtype too (dq, dk sum over value blocks in float32).
    backward = kernel_outputs(jax.make_jaxpr(jax.grad(lambda *a: run(*a)[0].astype(jnp.float32).sum(),
                                                      argnums=2))(*args).jaxpr, "fused_chunk_bwd")
    assert [dtype for dtype, _ in backward[0]] == ["float32", "float32", "float32", "bfloat16", "float32"]


def test_fused_recurrent_refuses_oversized_keys():
    x = jnp.ones((1, 2, 1, MAX_KEY_DIM + 1))
    with pytest.raises(ValueError, match="K <= 1024"):
        fused_recurrent(x, x, jnp.ones((1, 2, 1, 4)), None, jnp.zeros((1, 1, MAX_KEY_DIM + 1, 4)), rule="sum")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off the GPU")
def test_impl_pallas_needs_a_gpu():
    inputs = make_inputs(0, time=4)
    with pytest.raises(ValueError, match="need a GPU"):
        dj.fast_weight(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], impl="pallas")


@pytest.mark.jax_sensitive
def test_kernel_runs_per_batch_shard_under_sharded_jit():
    result = run_with_host_devices(Path(__file__).with_name("pallas_sharded_script.py"))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
