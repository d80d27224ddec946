"""Run by tests/test_features_in_op.py in a fresh process with 4 host CPU devices (XLA_FLAGS set
there): ``python features_sharded_script.py``. Prints OK on success.

The op with ``features`` (raw q, k; the feature map applied inside) on sharded inputs against
"feature map, then the op" on one device: outputs, final state and the gradients of q, k, v,
beta, initial_state and scale, float32, both rules, packed documents. Explicit meshes: batch and
heads sharded (``(data, heads)``, ``scan`` and ``chunk``: the map fused), and the sequence
sharded (``(seq,)``, context parallelism: each shard maps its raw slice, fused too; the scheme
the op picks: tests/scripts/context_parallel_features_script.py runs both); an Auto mesh with
``context_axis``; a linen layer's default (fused) against its separate path on the
``(data, heads)`` mesh.
"""

from __future__ import annotations


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj

    assert jax.device_count() == 4, f"expected 4 host devices, got {jax.device_count()}"
    batch, length, heads, dim, value_dim, chunk = 2, 48, 2, 4, 3, 5
    phi = dj.Features("dpfp", dim=dim, nu=2, normalization="sum")
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (batch, length, heads, dim))
    k = jax.random.normal(keys[1], (batch, length, heads, dim))
    v = jax.random.normal(keys[2], (batch, length, heads, value_dim))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, length, heads)))
    w0 = 0.3 * jax.random.normal(keys[4], (batch, heads, phi.key_dim, value_dim))
    scale = jnp.float32(0.7)
    # A reset on the boundary of the 4 sequence shards (step 12) and one mid-shard.
    ids = jnp.array([[0] * 12 + [1] * 36, [0] * 20 + [1] * 28], jnp.int32)
    args = (q, k, v, beta, w0, scale)

    def run(impl, rule, segment_ids, fused, context_axis=None):
        def loss(q, k, v, beta, w0, scale):
            qk = (q, k) if fused else (phi(q), phi(k))
            out, state = dj.fast_weight(*qk, v, beta if rule == "delta" else None, rule=rule, scale=scale,
                                        initial_state=w0, impl=impl, chunk_size=chunk, segment_ids=segment_ids,
                                        context_axis=context_axis, features=phi if fused else None)
            return jnp.sum(out * jnp.sin(out)) + 0.3 * jnp.sum(state * jnp.cos(state)), (out, state)

        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))

    def check(name, got, want):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5, err_msg=name)

    def put(mesh, spec, x):
        if x.ndim == 0 or x.shape == w0.shape:  # scale and the state: replicated, as parameters would be
            return jax.device_put(x, NamedSharding(mesh, P()))
        return jax.device_put(x, NamedSharding(mesh, P(*spec[:x.ndim])))

    checked = 0
    for rule in ("delta", "sum"):
        want = run("reference", rule, ids, fused=False)(*args)
        # Batch and heads sharded: the fused impls run on each device's slice.
        mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=(AxisType.Explicit,) * 2)
        spec = ("data", None, "heads", None)
        for impl in ("scan", "chunk"):
            got = run(impl, rule, put(mesh, spec, ids), fused=True)(*(put(mesh, spec, x) for x in args))
            assert tuple(got[0][1][0].sharding.spec)[:3] == ("data", None, "heads"), got[0][1][0].sharding
            check(f"{rule} {impl} (data, heads)", got, want)
            checked += 1
        # The sequence sharded (context parallelism), explicit mesh: T read from the inputs' types.
        mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Explicit,))
        spec = (None, "seq", None, None)
        got = run("chunk", rule, put(mesh, spec, ids), fused=True)(*(put(mesh, spec, x) for x in args))
        assert got[0][1][0].sharding.spec[1] == "seq", got[0][1][0].sharding
        check(f"{rule} context parallel, explicit", got, want)
        # An Auto mesh, the sequence axis named.
        mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Auto,))
        with jax.set_mesh(mesh):
            got = run("auto", rule, ids, fused=True, context_axis="seq")(*args)
        check(f"{rule} context parallel, Auto", got, want)
        checked += 2

    # A layer on the (data, heads) mesh: its default (the map in the op) against its separate path.
    mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=(AxisType.Explicit,) * 2)
    x = jax.random.normal(keys[0], (batch, length, 8))
    results = []
    for fuse in (True, False):
        layer = dj.DPFPAttention(8, num_heads=heads, head_dim=dim, nu=2, chunk_size=chunk, fuse_features=fuse)
        # Parameters replicated, the input's batch sharded.
        params = jax.device_put(layer.init(jax.random.key(1), x)["params"], NamedSharding(mesh, P()))
        x = jax.device_put(x, NamedSharding(mesh, P("data")))

        def loss(params, x, layer=layer):
            y, memory = layer.apply({"params": params}, x)
            return jnp.sum(y * jnp.sin(y)) + jnp.sum(memory**2)

        results.append(jax.jit(jax.value_and_grad(loss))(params, x))
    check("layer (data, heads)", results[0], results[1])
    print(f"checked {checked + 1} sharded runs")
    print("OK")


if __name__ == "__main__":
    main()
