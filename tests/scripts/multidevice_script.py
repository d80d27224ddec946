"""Run by test_multidevice.py in a fresh process with 8 host CPU devices (XLA_FLAGS set there).

Checks that a DPFPformer apply and gradient, jitted with the batch sharded over 8 devices, and a
pmap'd apply equal the single-device results. Prints OK on success.
"""

from __future__ import annotations


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import dpfp_jax as dj

    assert jax.device_count() == 8, f"expected 8 host devices, got {jax.device_count()}"
    model = dj.DPFPformer(16, 2, num_heads=2, head_dim=4, nu=2)
    # T = 70 >= chunk_size: impl="auto" takes the chunkwise path (T < 64 would take the scan).
    x = jax.random.normal(jax.random.key(0), (8, 70, 16))
    variables = model.init(jax.random.key(1), x)

    def apply(variables, x):
        return model.apply(variables, x, return_memory=True)

    def loss(params, x):
        return jnp.mean(model.apply({"params": params}, x) ** 2)

    on_one = jax.device_put((variables, x), jax.devices()[0])
    want = jax.jit(apply)(*on_one)
    want_grads = jax.jit(jax.grad(loss))(on_one[0]["params"], on_one[1])

    checks = []
    # Explicit sharding is jax.make_mesh's default; Auto is the classic GSPMD propagation.
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((8,), ("batch",), axis_types=(axis_type,))
        x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
        replicated = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
        got = jax.jit(apply)(replicated, x_sharded)
        assert got[0].sharding.spec[0] == "batch", got[0].sharding
        got_grads = jax.jit(jax.grad(loss))(replicated["params"], x_sharded)
        checks.append((f"{axis_type} sharded jit", got, want))
        checks.append((f"{axis_type} sharded grad", got_grads, want_grads))

    pmapped = jax.pmap(apply, in_axes=(None, 0))(variables, x.reshape(8, 1, 70, 16))
    checks.append(("pmap", jax.tree.map(lambda a: a.reshape(8, *a.shape[2:]), pmapped), want))

    for name, result, expected in checks:
        for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)
    print("OK")


if __name__ == "__main__":
    main()
