"""Run by tests/test_context_parallel.py in a fresh process with N host CPU devices (XLA_FLAGS set
there): ``python context_parallel_features_script.py N``. Prints OK on success.

The feature map inside the context-parallel op (``features``: raw q, k of width d, every shard
mapping them where it uses them and keeping them d wide for its backward) against "features first,
then the unsharded op" (``dj.fast_weight(phi(q), phi(k), ...)`` on one device), float32: outputs,
final state and the gradients of q, k, v, beta, initial_state, scale and log_decay from a loss on
both results. Both rules, both schemes (given by name on an Auto ``(seq,)`` mesh), with and without
``log_decay`` (alpha = 0 on a shard boundary) and ``segment_ids`` (a reset on a shard boundary, a
document crossing one), T / P no multiple of the chunk; the dispatcher's own pick on an explicit
mesh for each rule. Then the compiled temporaries of a sharded forward+backward: with the map
inside, the shards never hold phi(q), phi(k) or their gradients whole (at most 0.5x of the
unfused program's).
"""

from __future__ import annotations

import itertools
import sys


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj
    from dpfp_jax.ops.fast_weight.context_cost import SCHEMES
    from dpfp_jax.ops.fast_weight.context_parallel import context_plan, fast_weight_context_parallel
    from tests.helpers import sharded_feature_inputs

    count = int(sys.argv[1])
    assert jax.device_count() == count, f"expected {count} host devices, got {jax.device_count()}"
    length, chunk = 48, 5
    phi = dj.Features("dpfp", dim=4, nu=2, normalization="sum")
    # alpha = 0 and a reset on the first shard boundary, a document crossing it (tests/helpers.py).
    args, ids = sharded_feature_inputs(count, phi, count=count, length=length, value_dim=3)
    w0 = args[4]

    def grads(call, rule, gated):
        """Value, results and gradients of a loss on both results wrt q, k, v, beta, w0, scale, log_decay;
        ``call(q, k, v, beta, w0, scale, log_decay)`` runs the op (beta None for the sum rule)."""
        def loss(q, k, v, beta, w0, scale, log_decay):
            out, state = call(q, k, v, beta if rule == "delta" else None, w0, scale, log_decay if gated else None)
            return jnp.sum(out * jnp.sin(out)) + 0.3 * jnp.sum(state * jnp.cos(state)), (out, state)
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))

    def check(name, got, want):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5, err_msg=name)

    auto = jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))
    explicit = jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Explicit,))

    def put(x):
        if x.ndim == 0 or x.shape == w0.shape:  # scale and the state: replicated, as parameters would be
            return jax.device_put(x, NamedSharding(explicit, P()))
        return jax.device_put(x, NamedSharding(explicit, P(None, "seq")))

    checked = 0
    for rule, gated, with_ids in itertools.product(("delta", "sum"), (False, True), (False, True)):
        segment_ids = ids if with_ids else None
        name = f"{rule} log_decay={gated} ids={with_ids}"

        def mapped_first(q, k, v, beta, w0, scale, log_decay, rule=rule, segment_ids=segment_ids):
            return dj.fast_weight(phi(q), phi(k), v, beta, rule=rule, initial_state=w0, scale=scale, impl="chunk",
                                  chunk_size=chunk, segment_ids=segment_ids, log_decay=log_decay)

        want = grads(mapped_first, rule, gated)(*args)
        for scheme in SCHEMES:
            def given(q, k, v, beta, w0, scale, log_decay, rule=rule, segment_ids=segment_ids, scheme=scheme):
                return fast_weight_context_parallel(q, k, v, beta, w0, rule=rule, scale=scale, chunk_size=chunk,
                                                    segment_ids=segment_ids, plan=context_plan(q, "seq", "chunk"),
                                                    log_decay=log_decay, scheme=scheme, features=phi)

            with jax.set_mesh(auto):
                check(f"{name} scheme={scheme}", grads(given, rule, gated)(*args), want)
            checked += 1
        if gated and with_ids:  # the dispatcher's pick, T read from the inputs' types
            def picked(q, k, v, beta, w0, scale, log_decay, rule=rule):
                return dj.fast_weight(q, k, v, beta, rule=rule, initial_state=w0, scale=scale, chunk_size=chunk,
                                      segment_ids=put(ids), log_decay=log_decay, features=phi)

            got = grads(picked, rule, gated)(*(put(x) for x in args))
            assert got[0][1][0].sharding.spec[1] == "seq", got[0][1][0].sharding
            check(f"{name} dj.fast_weight, explicit mesh", got, want)
            checked += 1
    print(f"checked {checked} sharded runs with the feature map inside")
    check_memory(count)
    print("OK")


def check_memory(count: int) -> None:
    """A sharded forward+backward's compiled temporaries, the map inside against phi(q), phi(k) given
    (nu = 3, K = 6 d, four spans per shard): fused at most 0.5x (0.38x on 2 devices when written)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType

    import dpfp_jax as dj

    phi = dj.Features("dpfp", dim=16, nu=3, normalization="sum")
    shape = (1, 2048 * count, 2)
    q = jnp.ones((*shape, 16))
    v, beta = jnp.ones((*shape, 16)), jnp.ones(shape)

    def temp_bytes(fused):
        def loss(q, k, v, beta):
            qk = (q, k) if fused else (phi(q), phi(k))
            out, state = dj.fast_weight(*qk, v, beta, context_axis="seq", features=phi if fused else None)
            return jnp.sum(out**2) + jnp.sum(state**2)

        with jax.set_mesh(jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))):
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, q, v, beta).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused, unfused = temp_bytes(True), temp_bytes(False)
    print(f"temp bytes fused {fused:,} unfused {unfused:,} ({fused / unfused:.2f}x)")
    assert fused <= 0.5 * unfused, (fused, unfused)


if __name__ == "__main__":
    main()
