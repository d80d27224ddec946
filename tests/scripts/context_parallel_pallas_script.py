"""Run by tests/test_context_parallel.py in a fresh process with N host CPU devices (XLA_FLAGS set
there): ``python context_parallel_pallas_script.py N [--quick]``. Prints OK on success.

``impl="pallas"`` with T sharded over a mesh axis, the Pallas TPU kernel (interpreted, inside
``pltpu.force_tpu_interpret_mode()``) as each shard's engine, given the raw q, k with the feature
map (``features``), ``log_decay`` and ``segment_ids``: against "the map first, then the unsharded
``reference`` op" on one device, float32: outputs, final state and the gradients of q, k, v,
beta, initial_state, scale and log_decay, from a loss on both results. Both rules, both schemes
(given by name), the feature map inside or applied first, with and without a gate (alpha = 0 on a
shard boundary) and packed documents (a reset on the shard boundary, a document crossing one;
without a gate the kernel runs gated with log alpha = 0 but at the resets), T / P no multiple of
the chunk; an explicit ``(seq,)`` mesh (T read from the inputs' types), the scheme given by name
and, once, the dispatcher's own pick. ``--quick``: the delta rule with everything on, both
schemes. Interpret mode is slow: about 20 s a case on this project's 2-core machine.
"""

from __future__ import annotations

import sys


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.pallas import tpu as pltpu
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj
    from dpfp_jax.ops.fast_weight.context_parallel import context_plan, fast_weight_context_parallel
    from tests.helpers import sharded_feature_inputs

    count, quick = int(sys.argv[1]), "--quick" in sys.argv
    assert jax.device_count() == count, f"expected {count} host devices, got {jax.device_count()}"
    # d = 32, nu = 1: K = 64, which the kernel maps itself (tpu_kernel_features); 40 steps a shard:
    # two chunks of 16 and a partial one.
    chunk, length = 16, 40 * count
    phi = dj.Features("dpfp", dim=32, nu=1, normalization="sum")
    # alpha = 0 and a reset on the first shard boundary, a document crossing it (tests/helpers.py).
    args, ids = sharded_feature_inputs(count, phi, count=count, length=length, value_dim=8)
    w0 = args[4]

    def grads(call, rule, gated):
        """Gradients of a loss on both results wrt q, k, v, beta, w0, scale, log_decay, and the results;
        ``call(q, k, v, beta, w0, scale, log_decay)`` runs the op (beta None for the sum rule). The
        loss's value is not returned: its sum over the shards would be a collective outside the op,
        which in interpret mode (each kernel call a barrier of the shards) could deadlock them."""
        def loss(q, k, v, beta, w0, scale, log_decay):
            out, state = call(q, k, v, beta if rule == "delta" else None, w0, scale, log_decay if gated else None)
            return jnp.sum(out * jnp.sin(out)) + 0.3 * jnp.sum(state * jnp.cos(state)), (out, state)
        return jax.jit(jax.grad(loss, argnums=tuple(range(7)), has_aux=True))

    def check(name, got, want):
        # Every gradient, log_decay's included (zero where the op takes no gate), to float32 rounding.
        leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
        assert len(leaves_got) == len(leaves_want) == 9, (name, len(leaves_got))
        for g, w in zip(leaves_got, leaves_want, strict=True):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5, err_msg=name)

    explicit = jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Explicit,))

    def put(x):
        if x.ndim == 0 or x.shape == w0.shape:  # scale and the state: replicated, as parameters would be
            return jax.device_put(x, NamedSharding(explicit, P()))
        return jax.device_put(x, NamedSharding(explicit, P(None, "seq")))

    # (rule, feature map inside, gated, packed documents, schemes): every option with both schemes,
    # then each option alone (the ungated documents, which run the gated kernel, with both).
    cases = [("delta", True, True, True, ("transition", "relay"))]
    if not quick:
        cases += [("sum", True, True, True, ("transition", "relay")),
                  ("delta", False, False, True, ("transition", "relay")),
                  ("sum", False, False, True, ("relay",)),
                  ("delta", False, True, False, ("transition",)),
                  ("sum", True, False, False, ("transition",)),
                  ("delta", True, False, False, ("relay",))]
    checked = 0
    for rule, fused, gated, with_ids, schemes in cases:
        segment_ids = ids if with_ids else None
        sharded_ids = put(ids) if with_ids else None
        name = f"{rule} features={'inside' if fused else 'first'} log_decay={gated} ids={with_ids}"

        def mapped_first(q, k, v, beta, w0, scale, log_decay, rule=rule, segment_ids=segment_ids):
            return dj.fast_weight(phi(q), phi(k), v, beta, rule=rule, initial_state=w0, scale=scale, impl="reference",
                                  segment_ids=segment_ids, log_decay=log_decay)

        want = grads(mapped_first, rule, gated)(*args)
        for scheme in schemes:
            def given(q, k, v, beta, w0, scale, log_decay, rule=rule, segment_ids=sharded_ids, scheme=scheme,
                      fused=fused):
                qk = (q, k) if fused else (phi(q), phi(k))
                return fast_weight_context_parallel(
                    *qk, v, beta, w0, rule=rule, scale=scale, chunk_size=chunk, segment_ids=segment_ids,
                    plan=context_plan(q, None, "pallas"), impl="pallas", log_decay=log_decay, scheme=scheme,
                    features=phi if fused else None)

            with pltpu.force_tpu_interpret_mode():
                got = grads(given, rule, gated)(*(put(x) for x in args))
            check(f"{name} scheme={scheme}", got, want)
            checked += 1
            print(f"{name} scheme={scheme}: OK", flush=True)
    if not quick:  # the dispatcher's pick, T read from the inputs' types (explicit mesh)
        def picked(q, k, v, beta, w0, scale, log_decay):
            return dj.fast_weight(q, k, v, beta, initial_state=w0, scale=scale, impl="pallas", chunk_size=chunk,
                                  segment_ids=put(ids), log_decay=log_decay, features=phi)

        def mapped_first(q, k, v, beta, w0, scale, log_decay):
            return dj.fast_weight(phi(q), phi(k), v, beta, initial_state=w0, scale=scale, impl="reference",
                                  segment_ids=ids, log_decay=log_decay)

        with pltpu.force_tpu_interpret_mode():
            got = grads(picked, "delta", True)(*(put(x) for x in args))
        assert got[1][0].sharding.spec[1] == "seq", got[1][0].sharding
        check("dj.fast_weight, explicit mesh", got, grads(mapped_first, "delta", True)(*args))
        checked += 1
    print(f"checked {checked} sharded runs of the TPU kernel")
    print("OK")


if __name__ == "__main__":
    main()
