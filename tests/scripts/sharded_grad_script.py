"""Run by test_multidevice.py with 8 host CPU devices (XLA_FLAGS set there). Prints OK on success.

Every impl (the Pallas kernels in interpret mode) on explicit-sharding meshes, against the
oracle on one device:

- batch-sharded inputs, gradients of a loss on the outputs alone and of one on the final state
  alone: the unused output's zero cotangent must arrive with its primal's sharding (jax 0.12
  made it replicated, and the first contraction with the sharded residuals was a type error);
- inputs sharded over batch and heads, or heads alone, with a replicated ``initial_state``: the
  state takes the inputs' batch and head sharding, forward and gradients;
- a FastWeightAttention layer decoding with a replicated cache and head-sharded projections: the
  cached fast weights and key sum end up sharded like the inputs;
- packed documents: batch-sharded ``segment_ids`` with inputs sharded over batch, or batch and
  heads (the chunk form's per-head document masks take both), forward and gradients.
"""

from __future__ import annotations


def main() -> None:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import dpfp_jax as dj
    from dpfp_devtools.workloads import make_inputs
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas

    assert jax.device_count() == 8, f"expected 8 host devices, got {jax.device_count()}"
    inputs = make_inputs(0, batch=8, time=20, heads=4, key_dim=8, value_dim=4, with_state=True)
    names = ("q", "k", "v", "beta", "initial_state")
    args = [inputs[n] for n in names]

    def op(impl, chunk_size=16):
        def run(q, k, v, beta, state):
            if impl == "pallas":
                return fast_weight_pallas(q, k, v, beta, state, rule="delta", scale=1.0, chunk_size=chunk_size,
                                          interpret=True)
            return dj.fast_weight(q, k, v, beta, initial_state=state, impl=impl, chunk_size=chunk_size)
        return run

    losses = {"outputs": lambda out, state: jnp.sum(out**2), "state": lambda out, state: jnp.sum(state**2)}

    def grads(run, loss, *a):
        return jax.grad(lambda *a: loss(*run(*a)), argnums=tuple(range(5)))(*a)

    on_one = jax.device_put(args, jax.devices()[0])
    oracle = op("reference")
    want = {"forward": jax.jit(oracle)(*on_one),
            **{name: jax.jit(lambda *a, loss=loss: grads(oracle, loss, *a))(*on_one) for name, loss in losses.items()}}

    def check(name, got, expected):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)

    xla_impls = [("reference", op("reference")), ("scan", op("scan")), ("chunk", op("chunk"))]
    fused_chunk = ("pallas fused chunk", op("pallas", 16))
    fused_recurrent = ("pallas fused recurrent", op("pallas", 64))
    # The interpreted kernels are slow on CPU: both on the batch-sharded mesh, one with heads sharded.
    layouts = [
        # (mesh shape, mesh axes, spec of the [B, T, H, ...] inputs, replicated state?, impls)
        ((8,), ("batch",), PartitionSpec("batch", None, None), False, [*xla_impls, fused_chunk, fused_recurrent]),
        ((2, 4), ("batch", "heads"), PartitionSpec("batch", None, "heads"), True, [*xla_impls, fused_chunk]),
        ((4,), ("heads",), PartitionSpec(None, None, "heads"), True, xla_impls),
        # The batch over two mesh axes at once (data and fsdp, say), heads over a third.
        ((2, 2, 2), ("data", "fsdp", "heads"), PartitionSpec(("data", "fsdp"), None, "heads"), True, xla_impls),
    ]
    for shape, axes, spec, replicated_state, impls in layouts:
        mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * len(axes),
                             devices=jax.devices()[: int(np.prod(shape))])
        state_spec = PartitionSpec() if replicated_state else PartitionSpec(spec[0], spec[2])
        placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a in args[:4]]
        placed.append(jax.device_put(args[4], NamedSharding(mesh, state_spec)))
        for impl, run in impls:
            start = time.perf_counter()
            where = f"{impl} on {dict(zip(axes, shape, strict=True))} inputs {spec} state {state_spec}"
            out, state = jax.jit(run)(*placed)
            check(f"{where}: forward", (out, state), want["forward"])
            assert (tuple(state.sharding.spec) + (None,) * 2)[:2] == (spec[0], spec[2]), (where, state.sharding)
            # The state-only loss is the zero-cotangent case; checked once, on the batch-sharded mesh.
            for name, loss in losses.items() if not replicated_state else [("outputs", losses["outputs"])]:
                got = jax.jit(lambda *a, run=run, loss=loss: grads(run, loss, *a))(*placed)
                check(f"{where}: gradient of a loss on the {name} alone", got, want[name])
            print(f"{where}: {time.perf_counter() - start:.1f}s", flush=True)

    check_decoding_with_head_sharded_projections()
    check_packed_documents(args)
    print("OK")


def check_packed_documents(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import dpfp_jax as dj

    # Documents starting inside chunks of 8 and at their edges, different per row.
    starts = np.zeros((8, 20), np.int32)
    for row in range(8):
        starts[row, [1 + row, 7, 8 + row % 3, 16]] = 1
    segment_ids = jnp.asarray(np.cumsum(starts, axis=1, dtype=np.int32))

    def run(impl):
        def f(q, k, v, beta, state, ids):
            out, final = dj.fast_weight(q, k, v, beta, initial_state=state, impl=impl, chunk_size=8, segment_ids=ids)
            return jnp.sum(out**2) + jnp.sum(jnp.sin(final))
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(5))))

    want = run("reference")(*jax.device_put([*args, segment_ids], jax.devices()[0]))
    for shape, axes, spec in [((8,), ("batch",), PartitionSpec("batch", None, None)),
                              ((2, 4), ("batch", "heads"), PartitionSpec("batch", None, "heads"))]:
        mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * len(axes))
        placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a in args[:4]]
        placed.append(jax.device_put(args[4], NamedSharding(mesh, PartitionSpec())))
        placed.append(jax.device_put(segment_ids, NamedSharding(mesh, PartitionSpec(spec[0]))))
        for impl in ("scan", "chunk"):
            got = run(impl)(*placed)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5,
                                           err_msg=f"packed documents, {impl} on {axes}")


def check_decoding_with_head_sharded_projections() -> None:
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import dpfp_jax as dj

    x = jax.random.normal(jax.random.key(0), (2, 4, 16))
    # Attention normalisation: both carried states (W and the key sum z) are covered.
    layer = dj.FastWeightAttention(num_heads=4, head_dim=4, rule="sum", normalization="attention", decode=True)
    variables = layer.init(jax.random.key(1), x)

    @jax.jit
    def step(variables, token):
        (y, _), cache = layer.apply(variables, token, mutable=["cache"])
        return y, {**variables, **cache}

    want, state = [], variables
    for t in range(x.shape[1]):
        y, state = step(state, x[:, t : t + 1])
        want.append(y)

    mesh = jax.make_mesh((2, 4), ("batch", "heads"), axis_types=(AxisType.Explicit,) * 2)
    # The qkv kernel [D, H, F] sharded over heads, so q, k, v are too; the cache (from init) and
    # the output projection stay replicated.
    heads = {"qkv": {"kernel": PartitionSpec(None, "heads")}, "out": {"kernel": PartitionSpec()}}
    params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), variables["params"], heads)
    state = {**jax.device_put(variables, NamedSharding(mesh, PartitionSpec())), "params": params}
    tokens = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
    with jax.set_mesh(mesh):
        for t in range(x.shape[1]):
            y, state = step(state, tokens[:, t : t + 1])
            np.testing.assert_allclose(np.asarray(y), np.asarray(want[t]), rtol=1e-4, atol=1e-5,
                                       err_msg=f"head-sharded decoding step {t}")
    # The carried states, W [B, H, K, V] and z [B, H, K]; the cache's last segment id per row [B]
    # is a few bytes and may stay replicated.
    for name in ("fast_weights", "key_sum"):
        cached = state["cache"][name]
        assert tuple(cached.sharding.spec)[:2] == ("batch", "heads"), (name, cached.sharding)


if __name__ == "__main__":
    main()
