"""Context parallelism: T sharded over a mesh axis equals the single-device op.

The multi-device checks run tests/scripts/context_parallel_script.py in fresh processes with 2, 4
and 8 host CPU devices (its docstring lists them), and context_parallel_features_script.py (the
feature map inside the sharded op) with 2 and 4; here also the per-shard algebra on one device:
over a shard, the end state is ``M W_in + N`` for the ``(M, N)`` the scheme exchanges.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from dpfp_devtools.counts import walk_rows
from dpfp_jax.ops.fast_weight import context_cost
from dpfp_jax.ops.fast_weight.context_parallel import _apply, _end_state, _entering_gradient, _fold, _transition
from dpfp_jax.ops.fast_weight.naive import fast_weight_reference
from tests.helpers import REPO_ROOT

SCRIPT = Path(__file__).with_name("scripts") / "context_parallel_script.py"


def _inputs(seed: int, batch=2, length=23, heads=2, key_dim=6, value_dim=3):
    keys = jax.random.split(jax.random.key(seed), 5)
    k = jax.nn.softmax(jax.random.normal(keys[0], (batch, length, heads, key_dim)), axis=-1)
    v = jax.random.normal(keys[1], (batch, length, heads, value_dim))
    beta = jax.nn.sigmoid(jax.random.normal(keys[2], (batch, length, heads)))
    w_in = jax.random.normal(keys[3], (batch, heads, key_dim, value_dim))
    return k, v, beta, w_in


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_resets", [False, True])
def test_a_shard_is_affine_in_its_entering_state(rule, with_resets):
    k, v, beta, w_in = _inputs(0)
    beta = beta if rule == "delta" else None
    # Row 0 restarts mid-shard (M must be zero there), row 1 runs through.
    resets = jnp.zeros(k.shape[:2], bool).at[0, 9].set(True) if with_resets else None
    m, n = _transition(rule, k, v, beta, resets, jnp.float32, 4)
    _, want = fast_weight_reference(k, k, v, beta, w_in, rule=rule, scale=1.0, resets=resets)
    np.testing.assert_allclose(_apply(rule, m, w_in) + n, want, rtol=1e-5, atol=1e-5)
    if with_resets:
        assert float(jnp.max(jnp.abs(m[0]))) == 0.0 and float(jnp.max(jnp.abs(m[1]))) > 0.0


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_resets", [False, True])
def test_the_entering_gradient_is_the_oracles_from_the_outputs_alone(rule, with_resets):
    k, v, beta, w_in = _inputs(2)
    q = jnp.roll(k, 1, axis=-1)
    beta = beta if rule == "delta" else None
    resets = jnp.zeros(k.shape[:2], bool).at[1, 5].set(True).at[1, 17].set(True) if with_resets else None
    d_out = jax.random.normal(jax.random.key(3), v.shape)
    scale = jnp.float32(0.6)

    def outputs(w):
        return fast_weight_reference(q, k, v, beta, w, rule=rule, scale=scale, resets=resets)[0]

    want = jax.vjp(outputs, w_in)[1](d_out)[0]
    got = _entering_gradient(rule, q, k, beta, resets, scale, d_out, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("with_resets", [False, True])
def test_the_relays_walks_give_the_end_state_and_the_entering_gradient(rule, with_resets):
    # The relay scheme's two walks: the end state from a given entering state (forward), and the
    # entering state's whole gradient from the outputs' and the end state's (backward).
    k, v, beta, w_in = _inputs(4)
    q = jnp.roll(k, 2, axis=-1)
    beta = beta if rule == "delta" else None
    resets = jnp.zeros(k.shape[:2], bool).at[0, 7].set(True).at[1, 20].set(True) if with_resets else None
    scale = jnp.float32(0.8)

    def results(w):
        return fast_weight_reference(q, k, v, beta, w, rule=rule, scale=scale, resets=resets)

    (_, want_end), pullback = jax.vjp(results, w_in)
    np.testing.assert_allclose(_end_state(rule, k, v, beta, resets, w_in, 4), want_end, rtol=1e-5, atol=1e-5)
    d_out, d_end = jax.random.normal(jax.random.key(5), v.shape), jax.random.normal(jax.random.key(6), w_in.shape)
    got = _entering_gradient(rule, q, k, beta, resets, scale, d_out, 4, d_end=d_end)
    np.testing.assert_allclose(got, pullback((d_out, d_end))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_each_walk_given_raw_q_k_and_features_equals_it_given_phi_q_phi_k(rule):
    # The per-shard walks with the map inside (one span of raw q, k mapped at a time; the sum rule
    # then walks instead of taking its closed forms) against the same walks on phi(q), phi(k).
    phi = dj.Features("dpfp", dim=3, nu=2, normalization="sum")
    raw_k, v, beta, _ = _inputs(7, length=40, key_dim=3)
    raw_q = jnp.roll(raw_k, 1, axis=-1) - 0.2
    beta = beta if rule == "delta" else None
    resets = jnp.zeros(raw_k.shape[:2], bool).at[0, 9].set(True).at[1, 33].set(True)
    w_in = jax.random.normal(jax.random.key(8), (2, 2, phi.key_dim, 3))
    d_out, scale = jax.random.normal(jax.random.key(9), v.shape), jnp.float32(0.6)
    q, k = phi(raw_q), phi(raw_k)
    for options in ({}, {"features": phi}):
        mapped = (raw_q, raw_k) if options else (q, k)
        got = (_transition(rule, mapped[1], v, beta, resets, jnp.float32, 4, **options),
               _end_state(rule, mapped[1], v, beta, resets, w_in, 4, **options),
               _entering_gradient(rule, *mapped, beta, resets, scale, d_out, 4, **options),
               _entering_gradient(rule, *mapped, beta, resets, scale, d_out, 4, d_end=w_in, **options))
        if not options:
            want = got
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, jnp.broadcast_to(w, g.shape), rtol=1e-5, atol=1e-5)


def test_the_scheme_picked_per_call_has_the_shorter_critical_path():
    # Relay always wins at P = 2 (it skips M's walk, and nobody waits longer than under the
    # transition scheme); at P = 4 only once M's 4 C K^2 outweighs three walks in a row.
    for key_dim in (1, 8, 128, 384, 1024):
        assert context_cost.choose_scheme("delta", 2, 64, key_dim, 64) == "relay"
        assert context_cost.choose_scheme("sum", 2, 64, key_dim, 64) == "transition"
    assert [context_cost.choose_scheme("delta", 4, 64, k, 64) for k in (128, 512, 768, 1024)] == [
        "transition", "transition", "relay", "relay"]
    assert context_cost.choose_scheme("delta", 8, 64, 1024, 64) == "transition"
    for shards, key_dim in [(2, 128), (3, 384), (4, 512), (4, 1024), (8, 1024)]:
        costs = {s: context_cost.critical_path(s, shards, 10, 64, key_dim, 64) for s in context_cost.SCHEMES}
        assert context_cost.choose_scheme("delta", shards, 64, key_dim, 64) == min(costs, key=costs.get)
    with pytest.raises(ValueError, match="scheme"):
        context_cost.critical_path("gather", 2, 1, 64, 128, 64)


def test_the_counted_walks_match_xlas_count_on_one_chunk():
    # cost_analysis() counts a loop's body once: on one chunk (T = C, B = H = 1) that is exact. At
    # the benchmark's --check-counts shape (C = 64, K = 128, V = 64) the small terms are uncounted.
    for name, xla, mine in walk_rows(64, 128, 64):
        assert abs(mine / xla - 1) < 0.02, (name, mine, xla)


def test_the_fold_gives_each_shard_the_state_the_sequence_reaches_there():
    k, v, beta, w0 = _inputs(1, length=24)
    shards = [slice(0, 8), slice(8, 16), slice(16, 24)]
    pieces = [_transition("delta", k[:, s], v[:, s], beta[:, s], None, jnp.float32, 3) for s in shards]
    starts, final = _fold("delta", *(jnp.stack(x) for x in zip(*pieces, strict=True)), w0)
    for index, s in enumerate(shards):
        _, want = fast_weight_reference(k[:, :s.start], k[:, :s.start], v[:, :s.start], beta[:, :s.start], w0,
                                        rule="delta", scale=1.0)
        np.testing.assert_allclose(starts[index], want, rtol=1e-5, atol=1e-5)
    _, want = fast_weight_reference(k, k, v, beta, w0, rule="delta", scale=1.0)
    np.testing.assert_allclose(final, want, rtol=1e-5, atol=1e-5)


def _run(*args: str, count: int, script: Path = SCRIPT) -> None:
    # As tests/test_multidevice.py's run_with_host_devices, with the script's arguments.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, str(script), str(count), *args], env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


@pytest.mark.jax_sensitive
def test_sharded_sequence_on_4_devices_equals_one_device():
    _run(count=4)


# On the pinned jax only (the 4-device run checks the newest too); 8 devices only with the slow tests:
# at 8 shards the op picks the transition scheme, as at 4, so `make test` runs 2 (the relay) and 4.
@pytest.mark.parametrize("count", [2, pytest.param(8, marks=pytest.mark.slow)])
def test_sharded_sequence_on_2_and_8_devices_equals_one_device(count):
    _run("--quick", count=count)


@pytest.mark.slow
@pytest.mark.jax_sensitive
@pytest.mark.parametrize("count", [2, 4, 8])
def test_every_combination_on_2_4_8_devices(count):
    _run("--full", count=count)


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 4])
def test_the_feature_map_inside_the_sharded_op_equals_it_applied_first(count):
    # Both schemes, both rules, with and without log_decay and segment_ids, and the compiled
    # temporaries: each shard keeps q, k d wide (make test's features_sharded_script.py runs the
    # dispatcher's pick with features on 4 devices).
    _run(count=count, script=SCRIPT.with_name("context_parallel_features_script.py"))


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 4])
def test_the_tpu_kernel_per_shard_with_features_gate_and_documents_equals_the_unsharded_op(count):
    # impl="pallas" (the TPU kernel interpreted per shard): both rules, both schemes, the map inside
    # or applied first, with and without log_decay and segment_ids, against the map, then the
    # unsharded reference op; every gradient.
    _run(count=count, script=SCRIPT.with_name("context_parallel_pallas_script.py"))


def test_q_k_enter_the_tpu_kernel_of_each_shard_at_width_d():
    # Traced only (an abstract 2-shard mesh, nothing run): with features, a gate and packed
    # documents each shard's kernel, forward and backward, is given the raw q, k, [B, H, d, L]
    # (d = 32 is read with the steps on the lanes), never phi(q), phi(k) ([B, L, H, K], K = 128).
    from jax.experimental.pallas import tpu as pltpu
    from jax.sharding import AbstractMesh, AxisType

    from tests.helpers import pallas_calls

    phi = dj.Features("dpfp", dim=32, nu=2, normalization="sum")
    batch, length, heads, value_dim = 1, 96, 2, 8
    x, v = jnp.ones((batch, length, heads, phi.dim)), jnp.ones((batch, length, heads, value_dim))
    gate = jnp.zeros((batch, length, heads))
    ids = jnp.zeros((batch, length), jnp.int32).at[:, 50:].set(1)

    def loss(q, k, v, beta, log_decay):
        out, state = dj.fast_weight(q, k, v, beta, impl="pallas", chunk_size=16, context_axis="seq", features=phi,
                                    log_decay=log_decay, segment_ids=ids)
        return jnp.sum(out) + jnp.sum(state)

    with jax.sharding.use_abstract_mesh(AbstractMesh((2,), ("seq",), axis_types=(AxisType.Auto,))), \
            pltpu.force_tpu_interpret_mode():
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 3, 4)))(x, x, v, gate, gate).jaxpr
    # Each pallas_call's operands: the scale, then q and k.
    shapes = [tuple(v.aval.shape) for eqn in pallas_calls(jaxpr) for v in eqn.invars[1:3]]
    assert len(shapes) == 4 and set(shapes) == {(batch, heads, phi.dim, length // 2)}, shapes


@pytest.mark.slow
@pytest.mark.jax_sensitive
def test_sequence_split_between_two_processes_equals_one_device():
    import socket

    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).with_name("scripts") / "context_parallel_processes_script.py"
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    processes = [subprocess.Popen([sys.executable, str(script), str(rank), str(port)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    outputs = [process.communicate(timeout=1200)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0 and output.strip().endswith("OK"), output
