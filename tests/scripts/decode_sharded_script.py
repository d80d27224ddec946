"""Run by test_multidevice.py in a fresh process with 8 host CPU devices (XLA_FLAGS set there).

Decoding token by token with the ``cache`` collection, under explicit and automatic meshes, with
the variables replicated (as ``init`` and a plain ``device_put`` leave them) and the tokens
batch-sharded: every step must equal single-device decoding, and the cache must end up
batch-sharded. Both normalisations, so both carried states (W and the key sum z) are covered;
and normalization="attention" with segment ids (documents starting at and inside calls, so the cache's
restart of W and z meets batch-sharded ids and a replicated cached id). Prints OK on success.
"""

from __future__ import annotations


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import dpfp_jax as dj

    assert jax.device_count() == 8, f"expected 8 host devices, got {jax.device_count()}"
    x = jax.random.normal(jax.random.key(0), (8, 5, 16))
    # Per row, documents start at different steps (row b at step b % 5, none in row 0 and 5).
    segment_ids = (jnp.arange(5)[None, :] >= (jnp.arange(8) % 5)[:, None]).astype(jnp.int32) + 3
    # Segment ids with normalization="attention", whose restart resets both W and z.
    for normalization, rule, ids in (("sum", "delta", None), ("attention", "sum", None),
                                     ("attention", "sum", segment_ids)):
        layer = dj.FastWeightAttention(num_heads=2, head_dim=4, rule=rule, normalization=normalization, decode=True)
        variables = layer.init(jax.random.key(1), x)
        calls = [(0, 1), (1, 3), (3, 5)]

        @jax.jit
        def step(variables, token, token_ids, layer=layer):
            (y, _), cache = layer.apply(variables, token, segment_ids=token_ids, mutable=["cache"])
            return y, {**variables, **cache}

        def piece(a, start, stop):
            return None if a is None else a[:, start:stop]

        want, state = [], variables
        for start, stop in calls:
            y, state = step(state, piece(x, start, stop), piece(ids, start, stop))
            want.append(y)

        for axis_type in (AxisType.Explicit, AxisType.Auto):
            mesh = jax.make_mesh((8,), ("batch",), axis_types=(axis_type,))
            label = f"{normalization} {axis_type} ids={ids is not None}"
            with jax.set_mesh(mesh):
                state = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
                tokens, token_ids = jax.device_put((x, ids), NamedSharding(mesh, PartitionSpec("batch")))
                for (start, stop), expected in zip(calls, want, strict=True):
                    y, state = step(state, piece(tokens, start, stop), piece(token_ids, start, stop))
                    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-4, atol=1e-5,
                                               err_msg=f"{label} step {start}")
                # The carried states follow the batch; the [B] int32 last segment ids may stay replicated.
                for name in ("fast_weights", "key_sum"):
                    if name in state["cache"]:
                        cached = state["cache"][name]
                        assert cached.sharding.spec[0] == "batch", (label, name, cached.sharding)
    print("OK")


if __name__ == "__main__":
    main()
