"""A layer with the ``context_axis`` setting, on 2 host devices: run over a sequence-sharded input
it equals the same layer without the setting, and decoding (a step of one token, which no mesh
axis divides) continues its cache as the plain layer's does: the setting is not applied there.

Run by tests/test_settings.py in a fresh process with 2 host devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

import dpfp_jax as dj


def main() -> None:
    assert jax.device_count() == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8))
    plain = dj.FastWeightAttention(num_heads=2, head_dim=4, decode=True, rule="sum", normalization="attention")
    sharded = plain.clone(context_axis="seq")
    variables = plain.init(jax.random.key(1), x)
    with jax.set_mesh(mesh):
        # The whole sequence, split over the devices (the op's context-parallel path).
        full = sharded.clone(decode=False)
        want, want_memory = jax.jit(plain.clone(decode=False).apply)({"params": variables["params"]}, x)
        got, got_memory = jax.jit(full.apply)({"params": variables["params"]}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_memory, want_memory, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        # Decoding: one token a call, the cache continued; the same as the plain layer's steps.
        cache_plain = cache_sharded = variables["cache"]
        for t in range(3):
            step = x[:, t : t + 1]
            want_y, state = plain.apply({"params": variables["params"], "cache": cache_plain}, step,
                                        mutable=["cache"])
            cache_plain = state["cache"]
            got_y, state = jax.jit(lambda v, s: sharded.apply(v, s, mutable=["cache"]))(
                {"params": variables["params"], "cache": cache_sharded}, step)
            cache_sharded = state["cache"]
            np.testing.assert_allclose(got_y[0], want_y[0], rtol=1e-5, atol=1e-6)
    assert jnp.isfinite(got_y[0]).all()
    print("ok")


if __name__ == "__main__":
    main()
