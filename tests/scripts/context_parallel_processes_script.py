"""Run by tests/test_context_parallel.py as two processes (``python ... PROCESS_ID PORT``), one CPU
device each, joined by ``jax.distributed`` with gloo collectives: T sharded over the two
processes. Each process checks its half of the outputs and of the gradients of q, k, v, beta,
and the final state and initial_state's gradient, against the oracle run locally on the whole
sequence. Prints OK on success.
"""

from __future__ import annotations

import sys


def main() -> None:
    import jax

    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               local_device_ids=[0])
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj

    assert jax.device_count() == 2 and jax.local_device_count() == 1
    batch, length, heads, key_dim, value_dim = 2, 40, 2, 8, 4
    keys = jax.random.split(jax.random.key(0), 5)
    q = dj.sum_norm(jax.nn.relu(jax.random.normal(keys[0], (batch, length, heads, key_dim))))
    k = dj.sum_norm(jax.nn.relu(jax.random.normal(keys[1], (batch, length, heads, key_dim))))
    v = jax.random.normal(keys[2], (batch, length, heads, value_dim))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, length, heads)))
    w0 = jax.random.normal(keys[4], (batch, heads, key_dim, value_dim))
    ids = jnp.array([[0] * 15 + [1] * 25, [0] * 20 + [1] * 20], jnp.int32)  # row 1: a reset on the boundary

    def loss(q, k, v, beta, w0, ids, impl):
        out, state = dj.fast_weight(q, k, v, beta, initial_state=w0, impl=impl, chunk_size=6, segment_ids=ids)
        return jnp.sum(out * jnp.sin(out)) + jnp.sum(state**2), (out, state)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    with jax.default_device(jax.local_devices()[0]):
        want = jax.jit(grad, static_argnums=6)(q, k, v, beta, w0, ids, "reference")

    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Explicit,))
    half = length // 2

    def along_t(x):
        sharding = NamedSharding(mesh, P(None, "seq"))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: np.asarray(x)[index])

    replicated = jax.make_array_from_callback(w0.shape, NamedSharding(mesh, P()), lambda index: np.asarray(w0)[index])
    got = jax.jit(grad, static_argnums=6)(*(along_t(x) for x in (q, k, v, beta)), replicated, along_t(ids), "chunk")
    mine = slice(process_id * half, (process_id + 1) * half)
    (_, (out, state)), grads = got
    (_, (want_out, want_state)), want_grads = want
    for name, g, w in [("out", out, want_out), *(zip(("dq", "dk", "dv", "dbeta"), grads[:4], want_grads[:4],
                                                     strict=True))]:
        local = np.asarray(g.addressable_shards[0].data)
        np.testing.assert_allclose(local, np.asarray(w)[:, mine], rtol=1e-5, atol=1e-5, err_msg=name)
    for name, g, w in (("state", state, want_state), ("d initial_state", grads[4], want_grads[4])):
        np.testing.assert_allclose(np.asarray(g.addressable_shards[0].data), np.asarray(w), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    jax.distributed.shutdown()
    print("OK")


if __name__ == "__main__":
    main()
