"""The op's opt-in stability check, eager-call caching, forward-mode errors, interpret mode across
the backward, and the kernels' entry-point checks (docs/op_checks.md).

Kernel calls run in Pallas's interpret mode on the CPU at tiny shapes, to stay cheap.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.experimental.pallas import tpu as pltpu

import dpfp_jax as dj
from dpfp_devtools.workloads import make_inputs
from dpfp_jax.ops.fast_weight import check_delta_stability
from pallas_kernels import chunk_walk, fused_chunk, fused_chunk_tpu, fused_recurrent
from tests.helpers import SCRIPTS, run_with_host_devices

# ---------------------------------------------------------------------------------------------
# Stability check (check_stability=True)


def _normalised_with_one_raw_key(b: int, t: int, h: int):
    """Sum-normalised DPFP keys everywhere but at (b, t, h), where the key is raw Gaussian (|k|^2 ~ 4K)."""
    x = jax.random.normal(jax.random.key(0), (4, 2, 48, 3, 8))
    q, k = dj.sum_norm(dj.dpfp(x[0])), dj.sum_norm(dj.dpfp(x[1]))
    k = k.at[b, t, h].set(jax.random.normal(jax.random.key(1), (16,)) * 4)
    return q, k, x[2], jax.nn.sigmoid(x[3, ..., 0])


def test_raw_gaussian_keys_diverge_and_the_check_names_the_first_step():
    # The documented failure: unnormalised keys of width 64 overflow within ~100 steps, silently.
    x = jax.random.normal(jax.random.key(2), (4, 1, 128, 1, 64))
    q, k, v, beta = x[0], x[1], x[2], jax.nn.sigmoid(x[3, ..., 0])
    out, _ = dj.fast_weight(q, k, v, beta, impl="scan")
    assert not jnp.isfinite(out).all()
    first_nan = int(jnp.argmax(~jnp.isfinite(out[0, :, 0]).any(-1)))
    assert 50 < first_nan < 128, first_nan  # 87 for this draw
    with pytest.raises(ValueError, match=r"first at batch 0, head 0, step 0: beta \|k\|\^2 = .*128 of 128"):
        dj.fast_weight(q, k, v, beta, impl="scan", check_stability=True)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_check_names_the_planted_step_eagerly(impl):
    q, k, v, beta = _normalised_with_one_raw_key(1, 37, 2)
    with pytest.raises(ValueError, match=r"first at batch 1, head 2, step 37: .* 1 of 288 \(batch, head, step\)"):
        dj.fast_weight(q, k, v, beta, impl=impl, check_stability=True)
    # The function itself, called on concrete arrays, raises the same message.
    with pytest.raises(ValueError, match=r"first at batch 1, head 2, step 37: .* 1 of 288"):
        check_delta_stability(k, beta)


def test_check_under_jit_reports_through_checkify_and_is_never_dropped():
    q, k, v, beta = _normalised_with_one_raw_key(0, 5, 1)
    op = jax.jit(lambda q, k, v, beta: dj.fast_weight(q, k, v, beta, check_stability=True)[0])
    error, _ = checkify.checkify(op)(q, k, v, beta)
    assert "first at batch 0, head 1, step 5" in error.get()
    good = dj.sum_norm(jax.nn.relu(k))
    error, out = checkify.checkify(op)(q, good, v, beta)
    assert error.get() is None
    np.testing.assert_array_equal(out, dj.fast_weight(q, good, v, beta)[0])
    # Under a plain jit, JAX refuses to lower the check rather than skipping it.
    with pytest.raises(ValueError, match="checkify"):
        op(q, k, v, beta)


def test_normalised_dpfp_keys_pass_and_give_the_same_result():
    q, k, v, beta = _normalised_with_one_raw_key(0, 0, 0)
    k = k.at[0, 0, 0].set(dj.sum_norm(jnp.abs(k[0, 0, 0])))
    checked = dj.fast_weight(q, k, v, beta, check_stability=True)
    np.testing.assert_array_equal(checked[0], dj.fast_weight(q, k, v, beta)[0])
    # beta = 2 with |k| = 1 (a reflection) is on the boundary: float rounding must not flag it.
    unit = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    dj.fast_weight(q, unit, v, jnp.full_like(beta, 2.0), check_stability=True)


def test_check_stability_arguments():
    inputs = make_inputs(0, time=4)
    with pytest.raises(ValueError, match="check_stability checks the delta rule's condition.*rule='sum'"):
        dj.fast_weight(inputs["q"], inputs["k"], inputs["v"], rule="sum", check_stability=True)
    with pytest.raises(TypeError, match="check_stability must be a bool"):
        dj.fast_weight(**inputs, check_stability="yes")
    with pytest.raises(ValueError, match="first at batch 0, head 0, step 2"):
        dj.fast_weight(**{**inputs, "beta": inputs["beta"].at[0, 2, 0].set(-0.5)}, check_stability=True)
    # numpy's booleans are booleans: checked eagerly, passing or naming the step, as True is.
    dj.fast_weight(**inputs, check_stability=np.True_)
    with pytest.raises(ValueError, match="first at batch 0, head 0, step 2"):
        dj.fast_weight(**{**inputs, "beta": inputs["beta"].at[0, 2, 0].set(-0.5)}, check_stability=np.True_)


# ---------------------------------------------------------------------------------------------
# Eager calls: one trace per shape, results and gradients as jitted


def _counting_impl(monkeypatch, name: str) -> list[int]:
    """Replace impl ``name`` by a wrapper counting its calls (one per trace under the eager cache)."""
    calls = [0]
    # The package, not the function dpfp_jax.ops re-exports under the same name.
    fast_weight_package = sys.modules["dpfp_jax.ops.fast_weight"]
    fn, supports = fast_weight_package._IMPLS[name]

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setitem(fast_weight_package._IMPLS, name, (counted, supports))
    return calls


@pytest.mark.parametrize("impl", ["chunk", "scan"])
def test_second_eager_call_does_not_retrace(monkeypatch, impl):
    calls = _counting_impl(monkeypatch, impl)
    # Shapes no other test uses, so the first call here is the first trace of them.
    inputs = make_inputs(3, batch=1, time=23, heads=3, key_dim=5, value_dim=7)
    first = dj.fast_weight(**inputs, impl=impl, chunk_size=8, scale=0.5)
    again = dj.fast_weight(**make_inputs(4, batch=1, time=23, heads=3, key_dim=5, value_dim=7), impl=impl,
                           chunk_size=8, scale=0.25)  # new values and a new Python scale: no new trace
    assert calls[0] == 1
    jitted = jax.jit(dj.fast_weight, static_argnames=("impl", "chunk_size"))
    for got, want in ((first, jitted(**inputs, impl=impl, chunk_size=8, scale=0.5)),
                      (again, jitted(**make_inputs(4, batch=1, time=23, heads=3, key_dim=5, value_dim=7), impl=impl,
                                     chunk_size=8, scale=0.25))):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    # A new option is a new trace; under an outer jit the plain function is traced, once per outer trace.
    before = calls[0]
    dj.fast_weight(**inputs, impl=impl, chunk_size=16)
    assert calls[0] == before + 1
    outer = jax.jit(lambda q: dj.fast_weight(q, inputs["k"], inputs["v"], inputs["beta"], impl=impl, chunk_size=4))
    outer(inputs["q"])
    outer(inputs["q"])
    assert calls[0] == before + 2


def test_eager_gradients_match_jitted_and_reach_scale():
    inputs = make_inputs(5, batch=1, time=20, heads=2, key_dim=6, value_dim=3)

    def loss(q, scale):
        out, state = dj.fast_weight(q, inputs["k"], inputs["v"], inputs["beta"], scale=scale, chunk_size=8)
        return jnp.sum(out**2) + jnp.sum(state)

    eager = jax.grad(loss, argnums=(0, 1))(inputs["q"], 0.5)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs["q"], 0.5)
    reference = jax.grad(lambda q, s: jnp.sum(dj.fast_weight(q, inputs["k"], inputs["v"], inputs["beta"], scale=s,
                                                             impl="reference")[0] ** 2) + jnp.sum(
        dj.fast_weight(q, inputs["k"], inputs["v"], inputs["beta"], impl="reference")[1]), argnums=(0, 1))(
        inputs["q"], 0.5)
    # An eager grad runs op by op (its inputs are tracers, so the eager cache stays out of it):
    # equal to the jitted one up to XLA's fusion rounding.
    for a, b, c in zip(eager, jitted, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    assert float(eager[1]) != 0.0


def test_eager_cache_keeps_interpret_mode_apart():
    # The interpret mode is read at trace time; a cached trace from inside the context must not
    # serve a call outside it (or the reverse).
    inputs = make_inputs(6, batch=1, time=16, heads=1, key_dim=128, value_dim=64)
    want = dj.fast_weight(**inputs, impl="reference")
    with pltpu.force_tpu_interpret_mode():
        got = dj.fast_weight(**inputs, impl="pallas", chunk_size=16)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="need a GPU or a TPU"):
        dj.fast_weight(**inputs, impl="pallas", chunk_size=16)


def test_numpy_integer_chunk_size_is_accepted():
    inputs = make_inputs(7, time=20)
    got = dj.fast_weight(**inputs, impl="chunk", chunk_size=np.int64(8))
    want = dj.fast_weight(**inputs, impl="chunk", chunk_size=8)
    np.testing.assert_array_equal(got[0], want[0])
    for bad in (8.0, True):
        with pytest.raises(TypeError, match="chunk_size must be a positive int"):
            dj.fast_weight(**inputs, chunk_size=bad)


# ---------------------------------------------------------------------------------------------
# Forward-mode autodiff


def _loss_of_q(impl: str):
    inputs = make_inputs(8, batch=1, time=12, heads=1, key_dim=3, value_dim=2)
    rest = {n: inputs[n] for n in ("k", "v", "beta")}
    return (lambda q: jnp.sum(dj.fast_weight(q, **rest, impl=impl, chunk_size=4)[0] ** 2)), inputs["q"]


FORWARD_MODES = {
    "jvp": lambda f, q: jax.jvp(f, (q,), (jnp.ones_like(q),)),
    "jacfwd": lambda f, q: jax.jacfwd(f)(q),
    "jit-jvp": lambda f, q: jax.jit(lambda q: jax.jvp(f, (q,), (jnp.ones_like(q),)))(q),
}


@pytest.mark.parametrize("mode", FORWARD_MODES)
@pytest.mark.parametrize("impl", ["scan", "chunk", "auto"])
def test_forward_mode_raises_a_clear_error(impl, mode):
    f, q = _loss_of_q(impl)
    picked = "" if impl != "auto" else r" \(what impl='auto' picked\)"
    with pytest.raises(TypeError, match=rf"impl='(scan|chunk)'{picked} cannot be differentiated in forward mode.*"
                                        r"use impl='reference'"):
        FORWARD_MODES[mode](f, q)


@pytest.mark.parametrize("impl", ["scan", "chunk"])
def test_forward_modes_that_work_match_reference(impl):
    f, q = _loss_of_q(impl)
    reference, _ = _loss_of_q("reference")
    # Forward mode on the oracle; hessian (forward over reverse) on every impl.
    np.testing.assert_allclose(jax.jacfwd(reference)(q), jax.grad(f)(q), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.hessian(f)(q), jax.hessian(reference)(q), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Interpret mode across the backward


def test_interpret_mode_around_the_forward_only_reaches_the_backward():
    inputs = make_inputs(9, batch=1, time=16, heads=1, key_dim=128, value_dim=64)
    rest = {n: inputs[n] for n in ("k", "v", "beta")}

    def loss(q, impl):
        if impl == "reference":
            return jnp.sum(dj.fast_weight(q, **rest, impl=impl)[0] ** 2)
        with pltpu.force_tpu_interpret_mode():
            out, _ = dj.fast_weight(q, **rest, impl=impl, chunk_size=16)
        return jnp.sum(out**2)  # the backward is traced here, outside the context

    got = jax.grad(loss)(inputs["q"], "pallas")
    np.testing.assert_allclose(got, jax.grad(loss)(inputs["q"], "reference"), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Kernel entry points called directly


def _kernel_call(kernel: str, time: int = 16, **changes):
    key_dim = 128 if kernel == "tpu" else 8
    inputs = make_inputs(10, batch=1, time=time, heads=2, key_dim=key_dim, value_dim=key_dim // 2,
                         with_state=True)
    args = {**{n: inputs[n] for n in ("q", "k", "v", "beta", "initial_state")}, "rule": "delta", "interpret": True,
            **changes}
    if kernel == "tpu":
        return fused_chunk_tpu(**{"chunk_size": 16, **args})
    if kernel == "chunk":
        from dpfp_jax.ops.fast_weight.wy import wy_inverse

        return fused_chunk(**{"chunk_size": 16, "wy_inverse": wy_inverse, **args})
    return fused_recurrent(**args)


KERNELS = ["chunk", "recurrent", "tpu"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_with_no_steps_return_the_initial_state(kernel):
    out, state = _kernel_call(kernel, time=0)
    inputs = make_inputs(10, batch=1, time=0, heads=2, key_dim=128 if kernel == "tpu" else 8,
                         value_dim=64 if kernel == "tpu" else 4, with_state=True)
    assert out.shape == inputs["v"].shape and out.dtype == inputs["v"].dtype
    np.testing.assert_array_equal(state, inputs["initial_state"])


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_name_the_type_of_a_list(kernel):
    q = [[[[0.0] * 8] * 2] * 16]
    with pytest.raises(TypeError, match=r"^q must be an array \(jax.Array or numpy.ndarray\); got list of length 1$"):
        _kernel_call(kernel, q=q)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_refuse_a_non_bool_interpret(kernel):
    with pytest.raises(TypeError, match="interpret must be a bool .*got 'yes' of type str"):
        _kernel_call(kernel, interpret="yes")


def test_chunk_walk_refuses_a_non_bool_interpret():
    with pytest.raises(TypeError, match="interpret must be a bool .*got 'yes' of type str"):
        chunk_walk(interpret="yes")


@pytest.mark.parametrize("kernel", ["chunk", "tpu"])
def test_kernels_take_numpy_integer_chunk_sizes(kernel):
    got = _kernel_call(kernel, chunk_size=np.int64(16))
    np.testing.assert_array_equal(got[0], _kernel_call(kernel, chunk_size=16)[0])
    for bad in (16.0, True):
        with pytest.raises(TypeError, match="chunk_size must be an int"):
            _kernel_call(kernel, chunk_size=bad)


def test_eager_calls_on_an_explicit_mesh_keep_shardings_and_values():
    result = run_with_host_devices(SCRIPTS / "eager_sharded_script.py", count=4)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
