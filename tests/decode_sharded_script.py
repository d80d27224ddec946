"""Run by test_multidevice.py in a fresh process with 8 host CPU devices (XLA_FLAGS set there).

Decoding token by token with the ``cache`` collection, under explicit and automatic meshes, with
the variables replicated (as ``init`` and a plain ``device_put`` leave them) and the tokens
batch-sharded: every step must equal single-device decoding, and the cache must end up
batch-sharded. Both normalisations, so both carried states (W and the key sum z) are covered.
Prints OK on success.
"""

from __future__ import annotations


def main() -> None:
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import dpfp_jax as dj

    assert jax.device_count() == 8, f"expected 8 host devices, got {jax.device_count()}"
    x = jax.random.normal(jax.random.key(0), (8, 5, 16))
    for normalization, rule in (("sum", "delta"), ("attention", "sum")):
        layer = dj.FastWeightAttention(num_heads=2, head_dim=4, rule=rule, normalization=normalization, decode=True)
        variables = layer.init(jax.random.key(1), x)

        @jax.jit
        def step(variables, token, layer=layer):
            (y, _), cache = layer.apply(variables, token, mutable=["cache"])
            return y, {**variables, **cache}

        want, state = [], variables
        for t in range(x.shape[1]):
            y, state = step(state, x[:, t : t + 1])
            want.append(y)

        for axis_type in (AxisType.Explicit, AxisType.Auto):
            mesh = jax.make_mesh((8,), ("batch",), axis_types=(axis_type,))
            with jax.set_mesh(mesh):
                state = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
                tokens = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
                for t in range(x.shape[1]):
                    y, state = step(state, tokens[:, t : t + 1])
                    np.testing.assert_allclose(np.asarray(y), np.asarray(want[t]), rtol=1e-4, atol=1e-5,
                                               err_msg=f"{normalization} {axis_type} step {t}")
                for cached in jax.tree.leaves(state["cache"]):
                    assert cached.sharding.spec[0] == "batch", (normalization, axis_type, cached.sharding)
    print("OK")


if __name__ == "__main__":
    main()
