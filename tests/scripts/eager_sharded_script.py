"""Run by test_op_checks.py in a fresh process with 4 host CPU devices (XLA_FLAGS set there).

Eager ``dj.fast_weight`` calls (the internal jit of ``ops/fast_weight/eager.py``) on inputs sharded
over batch and heads under an explicit mesh, with and without ``jax.set_mesh``, and with a
replicated initial state: same values as on one device, the outputs keep the inputs' sharding,
and a second call does not trace again. Prints OK on success.
"""

from __future__ import annotations


def main() -> None:
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import dpfp_jax as dj
    from dpfp_devtools.workloads import make_inputs

    assert jax.device_count() == 4, f"expected 4 host devices, got {jax.device_count()}"
    inputs = make_inputs(0, batch=2, time=20, heads=2, key_dim=6, value_dim=3, with_state=True)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    specs = {"q": PartitionSpec("data", None, "model"), "k": PartitionSpec("data", None, "model"),
             "v": PartitionSpec("data", None, "model"), "beta": PartitionSpec("data", None, "model"),
             "initial_state": PartitionSpec()}  # replicated, as a carried state often is
    sharded = {n: jax.device_put(x, NamedSharding(mesh, specs[n])) for n, x in inputs.items()}
    for impl in ("chunk", "scan"):
        want = dj.fast_weight(**inputs, impl=impl, chunk_size=8)
        before = dj.fast_weight.trace_count()
        for context in (False, True, True):
            if context:
                with jax.set_mesh(mesh):
                    got = dj.fast_weight(**sharded, impl=impl, chunk_size=8)
            else:
                got = dj.fast_weight(**sharded, impl=impl, chunk_size=8)
            assert got[0].sharding.spec[0] == "data" and got[0].sharding.spec[2] == "model", got[0].sharding
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=impl)
        # One trace outside the mesh context, one inside it (jit keys on the context's mesh), then reuse.
        assert dj.fast_weight.trace_count() - before <= 2, dj.fast_weight.trace_count() - before
    print("OK")


if __name__ == "__main__":
    main()
