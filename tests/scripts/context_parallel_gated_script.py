"""Run by tests/test_gated.py in a fresh process with 4 host CPU devices (XLA_FLAGS set there):
``python context_parallel_gated_script.py``. Prints OK on success.

Gated fast weights (``log_decay``) with T sharded over a mesh axis against the oracle on one
device, float32: outputs, final state and the gradients of q, k, v, beta, initial_state, scale and
log_decay, from a loss on both results; both rules, with initial_state and segment_ids, alpha = 0
on a shard boundary and just inside a shard, T / P not a multiple of the chunk size; an explicit
``(seq,)`` and ``(data, seq)`` mesh and an Auto mesh with ``context_axis`` (the transition scheme,
which the op picks here), the relay scheme given by name on the Auto mesh; and the refusal of
``impl="pallas"`` with a gate off a TPU (outside interpret mode).
"""

from __future__ import annotations


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj

    count = 4
    assert jax.device_count() == count, f"expected {count} host devices, got {jax.device_count()}"
    batch, length, heads, key_dim, value_dim, chunk = 2, 48, 2, 8, 4, 5
    shard = length // count
    keys = jax.random.split(jax.random.key(0), 6)
    q = dj.sum_norm(jax.nn.relu(jax.random.normal(keys[0], (batch, length, heads, key_dim))))
    k = dj.sum_norm(jax.nn.relu(jax.random.normal(keys[1], (batch, length, heads, key_dim))))
    v = jax.random.normal(keys[2], (batch, length, heads, value_dim))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, length, heads)))
    w0 = jax.random.normal(keys[4], (batch, heads, key_dim, value_dim))
    log_decay = -0.4 * jax.nn.softplus(jax.random.normal(keys[5], (batch, length, heads)))
    log_decay = log_decay.at[0, shard].set(-jnp.inf).at[1, 2 * shard + 3].set(-jnp.inf).at[1, 5].set(-69.0)
    scale = jnp.float32(0.7)
    starts = [[shard + 3], [shard // 2, length - 1]]
    ids = jnp.array([[sum(t >= s for s in row) for t in range(length)] for row in starts], jnp.int32)

    def run(impl, rule, segment_ids, context_axis=None):
        def loss(q, k, v, beta, w0, scale, log_decay):
            out, state = dj.fast_weight(q, k, v, beta if rule == "delta" else None, rule=rule, scale=scale,
                                        initial_state=w0, impl=impl, chunk_size=chunk, segment_ids=segment_ids,
                                        context_axis=context_axis, log_decay=log_decay)
            return jnp.sum(out * jnp.sin(out)) + 0.3 * jnp.sum(state * jnp.cos(state)), (out, state)
        return jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)

    def run_relay(rule, segment_ids):
        """As ``run("auto", ..., context_axis="seq")`` with the relay scheme given: at P = 4, K = 8 the
        op picks the transition scheme, so the relay's gated walks are run here."""
        from dpfp_jax.ops.fast_weight.context_parallel import context_plan, fast_weight_context_parallel

        def loss(q, k, v, beta, w0, scale, log_decay):
            out, state = fast_weight_context_parallel(
                q, k, v, beta if rule == "delta" else None, w0, rule=rule, scale=scale, chunk_size=chunk,
                segment_ids=segment_ids, plan=context_plan(q, "seq", "chunk"), log_decay=log_decay, scheme="relay")
            return jnp.sum(out * jnp.sin(out)) + 0.3 * jnp.sum(state * jnp.cos(state)), (out, state)
        return jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)

    def check(name, got, want):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)

    args = (q, k, v, beta, w0, scale, log_decay)
    checked = 0
    for rule in ("delta", "sum"):
        for with_ids in (True, False):
            segment_ids = ids if with_ids else None
            want = jax.jit(run("reference", rule, segment_ids))(*args)
            for names, shape in ((("seq",), (count,)), (("data", "seq"), (2, count // 2))):
                mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names))
                data = "data" if "data" in names else None
                spec_of = {4: P(data, "seq"), 3: P(data, "seq"), 2: P(data, "seq")}

                def put(x, spec_of=spec_of, mesh=mesh):
                    if x.ndim == 0 or x.shape == w0.shape:
                        return jax.device_put(x, NamedSharding(mesh, P()))
                    return jax.device_put(x, NamedSharding(mesh, spec_of[x.ndim]))

                got = jax.jit(run("chunk", rule, None if segment_ids is None else put(segment_ids)))(
                    *(put(x) for x in args))
                check(f"{rule} ids={with_ids} {names}", got, want)
                checked += 1
            with jax.set_mesh(jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))):
                got = jax.jit(run("auto", rule, segment_ids, context_axis="seq"))(*args)
            check(f"{rule} ids={with_ids} auto mesh", got, want)
            checked += 1
            with jax.set_mesh(jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))):
                got = jax.jit(run_relay(rule, segment_ids))(*args)
            check(f"{rule} ids={with_ids} auto mesh, relay scheme", got, want)
            checked += 1
    print(f"checked {checked} gated sharded runs")

    with jax.set_mesh(jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))):
        try:  # the TPU kernel takes the gate per shard (context_parallel_pallas_script.py), not off a TPU
            dj.fast_weight(q, k, v, beta, context_axis="seq", impl="pallas", log_decay=log_decay)
        except ValueError as error:
            assert "force_tpu_interpret_mode" in str(error), error
        else:
            raise AssertionError("impl='pallas' with a gate and a sharded T off a TPU was not refused")
    print("OK")


if __name__ == "__main__":
    main()
