"""Run by tests/test_context_parallel.py in a fresh process with N host CPU devices (XLA_FLAGS set
there): ``python context_parallel_script.py N [--full]``. Prints OK on success.

Context parallelism (T sharded over a mesh axis) against the oracle on one device, float32:
outputs, final state and the gradients of q, k, v, beta, initial_state and scale, from a loss on
both results, within 1e-5; both rules, with and without initial_state and segment_ids (a
document crossing a shard boundary, a boundary falling on a reset), T / P not a multiple of the
chunk size (and with ``impl="pallas"``, on 2 devices, the TPU kernel interpreted as each shard's
engine); explicit meshes (T found from the inputs' types) and Auto meshes with
``context_axis``, also given to the layers (linen and NNX, on 4 devices); ``(seq,)``,
``(data, seq)`` and ``(data, seq, heads)`` meshes. Then the compiled
program's collectives: none has an operand with the global T (and the same check does find the
sequence all-gathers of the unsharded op on an Auto mesh, so it can fail). ``--full`` runs every
combination, the default a covering subset, ``--quick`` both rules with every option, to keep the
compile time small. Both context-parallel schemes are checked on every device count: the one
``dj.fast_weight`` picks, and the other through ``fast_weight_context_parallel(scheme=)`` (for
the first case only, unless ``--full``).
"""

from __future__ import annotations

import itertools
import sys

from dpfp_devtools.hlo import collectives_with_length


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj
    from dpfp_jax.ops.fast_weight.context_cost import SCHEMES, choose_scheme
    from dpfp_jax.ops.fast_weight.context_parallel import context_plan, fast_weight_context_parallel

    count = int(sys.argv[1])
    full, quick = "--full" in sys.argv, "--quick" in sys.argv
    assert jax.device_count() == count, f"expected {count} host devices, got {jax.device_count()}"
    batch, length, heads, key_dim, value_dim, chunk = 2, 48, 2, 8, 4, 5
    keys = jax.random.split(jax.random.key(count), 6)
    q = dj.sum_norm(jax.nn.relu(jax.random.normal(keys[0], (batch, length, heads, key_dim))))
    k = dj.sum_norm(jax.nn.relu(jax.random.normal(keys[1], (batch, length, heads, key_dim))))
    v = jax.random.normal(keys[2], (batch, length, heads, value_dim))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, length, heads)))
    w0 = jax.random.normal(keys[4], (batch, heads, key_dim, value_dim))
    scale = jnp.float32(0.7)
    shard = length // count
    # Row 0: a reset exactly on the first shard boundary and one just after it; row 1: a document
    # from mid first shard across the boundary, another starting on the last step. (One device:
    # the same ids, no boundary.)
    starts = [[shard, shard + 3], [shard // 2, length - 1]]
    ids = jnp.array([[sum(t >= s for s in row) for t in range(length)] for row in starts], jnp.int32)

    def run(impl, rule, with_state, segment_ids, context_axis=None):
        """Value, results and gradients of a loss on both results, wrt q, k, v, beta, w0, scale."""
        def loss(q, k, v, beta, w0, scale):
            out, state = dj.fast_weight(q, k, v, beta if rule == "delta" else None, rule=rule, scale=scale,
                                        initial_state=w0 if with_state else None, impl=impl, chunk_size=chunk,
                                        segment_ids=segment_ids, context_axis=context_axis)
            return jnp.sum(out * jnp.sin(out)) + 0.3 * jnp.sum(state * jnp.cos(state)), (out, state)
        return jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)

    def run_scheme(scheme, rule, with_state, segment_ids):
        """As ``run("auto", ..., context_axis="seq")`` with the scheme given, not chosen."""
        def loss(q, k, v, beta, w0, scale):
            out, state = fast_weight_context_parallel(
                q, k, v, beta if rule == "delta" else None, w0 if with_state else jnp.zeros_like(w0), rule=rule,
                scale=scale, chunk_size=chunk, segment_ids=segment_ids, plan=context_plan(q, "seq", "chunk"),
                scheme=scheme)
            return jnp.sum(out * jnp.sin(out)) + 0.3 * jnp.sum(state * jnp.cos(state)), (out, state)
        return jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)

    def check(name, got, want):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)

    args = (q, k, v, beta, w0, scale)
    meshes = [("seq",)]
    if count >= 4:
        meshes.append(("data", "seq"))
    if count >= 8:
        meshes.append(("data", "seq", "heads"))
    cases = list(itertools.product(("delta", "sum"), (True, False), (True, False)))
    if not full:  # a covering subset: each rule with both options on, and both options off once
        cases = [("delta", True, True), ("sum", True, True), ("delta", False, False)]
    if quick:  # both rules with every option on
        cases = cases[:2]
    checked = 0
    for rule, with_state, with_ids in cases:
        fn = run("reference", rule, with_state, ids if with_ids else None)
        want = jax.jit(fn)(*args)
        for names in meshes:
            shape = tuple(2 if n != "seq" else count // 2 ** (len(names) - 1) for n in names)
            time_spec = P("data" if "data" in names else None, "seq", "heads" if "heads" in names else None)
            for axis_type in (AxisType.Explicit, AxisType.Auto):
                if not full and (names != meshes[-1] and axis_type == AxisType.Auto):
                    continue
                mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
                name = f"{rule} state={with_state} ids={with_ids} mesh={names} {axis_type}"
                if axis_type == AxisType.Explicit:
                    spec_of = {4: time_spec, 3: P(*time_spec[:3]), 2: P(*time_spec[:2])}

                    def put(x, spec_of=spec_of, mesh=mesh):
                        if x.ndim == 0:
                            return jax.device_put(x, NamedSharding(mesh, P()))
                        if x.shape == w0.shape:  # the state: replicated, as a model's parameters would be
                            return jax.device_put(x, NamedSharding(mesh, P()))
                        return jax.device_put(x, NamedSharding(mesh, spec_of[x.ndim]))

                    fn = run("chunk", rule, with_state, put(ids) if with_ids else None)
                    got = jax.jit(fn)(*(put(x) for x in args))
                    out = got[0][1][0]
                    assert out.sharding.spec[1] == "seq", (name, out.sharding)
                else:
                    fn = run("auto", rule, with_state, ids if with_ids else None, context_axis="seq")
                    with jax.set_mesh(mesh):
                        got = jax.jit(fn)(*args)
                check(name, got, want)
                checked += 1
        # The scheme dj.fast_weight does not pick for this call, on a (seq,) Auto mesh: every case with
        # --full, the first (delta, every option on) otherwise, to keep make test's compiles few.
        if count > 1 and (full or (rule, with_state, with_ids) == cases[0]):
            chosen = choose_scheme(rule, count, chunk, key_dim, value_dim)
            for scheme in (s for s in SCHEMES if s != chosen):
                with jax.set_mesh(jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))):
                    got = jax.jit(run_scheme(scheme, rule, with_state, ids if with_ids else None))(*args)
                check(f"{rule} state={with_state} ids={with_ids} scheme={scheme}", got, want)
                checked += 1

    check_key_sum_and_layers(count, ids)
    if full or (count == 4 and not quick):
        check_layers_on_an_auto_mesh(count, ids, full)
    if count == 2:
        check_pallas_engine()

    # The compiled program's collectives: none carries the global T (here 48; no other
    # dimension of these arrays is 48).
    mesh = jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))
    fn = run("auto", "delta", True, ids, context_axis="seq")
    with jax.set_mesh(mesh):
        along_t = NamedSharding(mesh, P(None, "seq"))
        sharded = tuple(jax.device_put(x, along_t) if x.ndim >= 3 and x.shape[1] == length else x for x in args)
        hlo = jax.jit(fn).lower(*sharded).compile().as_text()
        bad = collectives_with_length(hlo, length)
        assert not bad, "collectives with the global T:\n" + "\n".join(bad)
        if count > 1:
            assert collectives_with_length(hlo, None), "expected the states passed between the shards"
        if count > 1:
            # The check can fail: a replicating constraint on a sequence-sharded input gathers T.
            gather = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, P()))
            assert collectives_with_length(gather.lower(sharded[0]).compile().as_text(), length)
    print(f"checked {checked} sharded runs")

    # Errors, each naming its argument.
    expect_error(lambda: dj.fast_weight(q, k, v, beta, context_axis="nope"), "context_axis", mesh)
    expect_error(lambda: dj.fast_weight(q, k, v, beta, context_axis="seq", impl="scan"), "chunk", mesh)
    if count > 1:  # the TPU kernel per shard: only on a TPU or in interpret mode
        expect_error(lambda: dj.fast_weight(q, k, v, beta, context_axis="seq", impl="pallas"), "pallas", mesh)
    if count > 1:
        odd = q[:, : count + 1]
        expect_error(lambda: dj.fast_weight(odd, odd, v[:, : count + 1], beta[:, : count + 1], context_axis="seq"),
                     "divisible", mesh)
    if count >= 4:
        both = jax.make_mesh((count // 2, 2), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
        xs = [jax.device_put(x, NamedSharding(both, P("seq"))) for x in (q, k, v, beta)]
        expect_error(lambda: dj.fast_weight(*xs, context_axis="seq"), "context_axis", None)
    print("OK")


def check_key_sum_and_layers(count, ids) -> None:
    """The ``attention`` normalisation's running key sum with T sharded (explicit and Auto meshes),
    value and gradients; and a DPFPformer taking sequence-sharded activations under an explicit mesh
    (the op finds the sharded T itself), outputs and parameter gradients."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj
    from dpfp_jax.core.segments import running_key_sum
    from dpfp_jax.ops.fast_weight.context_parallel import running_key_sum_context_parallel
    from dpfp_jax.ops.fast_weight.segments import resets_of

    phi = jax.random.uniform(jax.random.key(0), (*ids.shape, 2, 3))
    start = jax.random.normal(jax.random.key(1), (ids.shape[0], 2, 3))

    def loss(phi, start, key_sum, **options):
        z, last = key_sum(phi, start, ids_of[0], **options)
        return jnp.sum(jnp.sin(z)) + jnp.sum(jnp.cos(last))

    def oracle(phi, start, ids):
        z = running_key_sum(phi, start, resets_of(ids))
        return z, z[:, -1]

    ids_of = [ids]
    grad = functools.partial(jax.value_and_grad(loss, argnums=(0, 1)))
    want = grad(phi, start, oracle)
    explicit = jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Explicit,))
    along_t = NamedSharding(explicit, P(None, "seq"))
    ids_of[0] = jax.device_put(ids, along_t)
    got = jax.jit(lambda p, s: grad(p, s, running_key_sum_context_parallel))(jax.device_put(phi, along_t), start)
    ids_of[0] = ids
    with jax.set_mesh(jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))):
        got_auto = jax.jit(lambda p, s: grad(p, s, running_key_sum_context_parallel, context_axis="seq"))(phi, start)
    # phi's gradient sums cos(z) over up to 48 later steps (values up to ~30), in another order on
    # each side: float32 rounding of such sums is ~1e-5 (seen: 1.5e-5 on 8 devices).
    for result in (got, got_auto):
        for g, w in zip(jax.tree.leaves(result), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=5e-5, err_msg="key sum")

    model = dj.DPFPformer(16, 2, num_heads=2, head_dim=4, nu=2)
    x = jax.random.normal(jax.random.key(2), (2, 16 * count, 16))
    variables = model.init(jax.random.key(3), x)

    def model_loss(params, x):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    want = jax.jit(jax.value_and_grad(model_loss))(variables["params"], x)
    x_sharded = jax.device_put(x, along_t)
    params = jax.device_put(variables["params"], NamedSharding(explicit, P()))
    got = jax.jit(jax.value_and_grad(model_loss))(params, x_sharded)
    assert jax.jit(model.apply)({"params": params}, x_sharded).sharding.spec[1] == "seq"
    # The final LayerNorm's gradients (hundreds) set the round-off of all others: float32's own
    # error against a float64 run was up to 2e-4 on one device, the same on four.
    largest = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=2e-6 * largest, err_msg="DPFPformer")


def check_layers_on_an_auto_mesh(count, ids, full) -> None:
    """Layers with ``context_axis="seq"`` under an Auto mesh (``jax.set_mesh``) against the same
    layer without it on one device: linen ``FastWeightAttention`` (outputs, memory and the
    gradients wrt parameters and input, from a carried memory), for the delta rule with sum
    normalisation and for the sum rule with ``normalization="attention"`` (its key sum carried
    across shards; with segment ids, so documents cross a shard boundary), and NNX's the same; a
    linen DPFPformer (delta rule, sum normalisation). Each sharded program is compiled with x
    sharded along T and checked: none of its collectives carries the global T. Without ``full``
    the layers run only the sum rule's case (the DPFPformer covers the delta rule), to keep the
    compile time small."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj
    import dpfp_jax.nnx as djnnx

    length = ids.shape[1]
    mesh = jax.make_mesh((count,), ("seq",), axis_types=(AxisType.Auto,))
    # Inputs from numpy and initialisation under jit: each eager op would be a compile of its own.
    rng = np.random.default_rng(count)
    x, prefix, wide = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                       ((2, length, 8), (2, 7, 8), (2, length, 16)))

    def scalar(y, memory):
        return jnp.sum(y * jnp.sin(y)) + sum(jnp.sum(jnp.cos(m)) for m in jax.tree.leaves(memory))

    def check(name, got, want):
        # 3e-5 relative: the layers' parameter gradients sum over every step, of both batch rows,
        # through the attention normalisation's division, which the shards' key sums reach in
        # another order of additions (seen: 1.2e-5 at gradients of ~400 on 2 and 8 devices, and an
        # entry of -0.87 off by 2.2e-4 = 1.2e-6 of the largest, 186, where its sum cancels).
        got, want = jax.device_get((got, want))
        largest = max(np.max(np.abs(w)) for w in jax.tree.leaves(want))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=3e-5, atol=5e-6 * largest, err_msg=name)

    def sharded_run(fn, *args):
        """``fn(*args)`` with x sharded along T, as a context-parallel model's activations are,
        after checking that no collective of the compiled program carries the global T."""
        along_t = NamedSharding(mesh, P(None, "seq"))
        args = [jax.device_put(a, along_t) if getattr(a, "ndim", 0) == 3 and a.shape[1] == length else a
                for a in args]
        compiled = jax.jit(fn).lower(*args).compile()
        bad = collectives_with_length(compiled.as_text(), length)
        assert not bad, "collectives with the global T:\n" + "\n".join(bad)
        return compiled(*args)

    cases = [("delta", "sum", None), ("sum", "attention", ids)]
    for rule, normalization, segment_ids in cases if full else cases[1:]:
        options = dict(nu=2, rule=rule, normalization=normalization, chunk_size=5)
        name = f"{rule}/{normalization}"
        # linen
        plain = dj.FastWeightAttention(2, 4, **options)
        variables = jax.jit(plain.init)(jax.random.key(7), x)
        _, memory = jax.jit(plain.apply)(variables, prefix)

        def linen_loss(params, x, layer, memory=memory, segment_ids=segment_ids):
            y, new_memory = layer.apply({"params": params}, x, memory, segment_ids=segment_ids)
            return scalar(y, new_memory), (y, new_memory)

        def grads(layer):
            return jax.value_and_grad(lambda p, x: linen_loss(p, x, layer), argnums=(0, 1), has_aux=True)

        want = jax.jit(grads(plain))(variables["params"], x)
        with jax.set_mesh(mesh):
            check(f"linen {name}", sharded_run(grads(plain.clone(context_axis="seq")), variables["params"], x), want)
        # NNX: the same initialisation with and without context_axis.
        layers = [nnx.jit(lambda extra=extra, options=options: djnnx.FastWeightAttention(
                      2, 4, in_features=8, rngs=nnx.Rngs(7), **options, **extra))()
                  for extra in ({}, {"context_axis": "seq"})]
        results = []
        for layer, where in zip(layers, (None, mesh), strict=True):
            graphdef, params, rest = nnx.split(layer, nnx.Param, ...)  # rest: the dropout's rng

            def nnx_loss(params, x, graphdef=graphdef, rest=rest, memory=memory, segment_ids=segment_ids):
                y, new_memory = nnx.merge(graphdef, params, rest)(x, memory, segment_ids=segment_ids)
                return scalar(y, new_memory), (y, new_memory)

            fn = jax.value_and_grad(nnx_loss, argnums=(0, 1), has_aux=True)
            if where is None:
                results.append(jax.jit(fn)(params, x))
            else:
                with jax.set_mesh(where):
                    results.append(sharded_run(fn, params, x))
        check(f"nnx {name}", results[1], results[0])

    model = dj.DPFPformer(16, 2, num_heads=2, head_dim=4, nu=2, chunk_size=5)
    params = jax.jit(model.init)(jax.random.key(9), wide)["params"]

    def grads(model):
        return jax.value_and_grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2), argnums=(0, 1))

    want = jax.jit(grads(model))(params, wide)
    with jax.set_mesh(mesh):
        got = sharded_run(grads(model.clone(context_axis="seq")), params, wide)
    # As in check_key_sum_and_layers: the final LayerNorm's gradients set the round-off.
    got, want = jax.device_get((got, want))
    largest = max(np.max(np.abs(w)) for w in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6 * largest,
                                   err_msg="DPFPformer on an Auto mesh")


def check_pallas_engine() -> None:
    """``impl="pallas"`` with T sharded over 2 devices: the TPU kernel (interpreted) runs each shard's
    forward and backward from its entering state; results and gradients (values up to ~50) against
    the oracle to float32 round-off."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.pallas import tpu as pltpu
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import dpfp_jax as dj
    from dpfp_devtools.workloads import make_inputs

    inputs = make_inputs(0, batch=1, time=64, heads=2, key_dim=16, value_dim=64, with_state=True)
    args = [inputs[n] for n in ("q", "k", "v", "beta", "initial_state")]

    from dpfp_jax.ops.fast_weight.context_parallel import context_plan, fast_weight_context_parallel

    def grads(impl, scheme=None):
        def loss(q, k, v, beta, w0):
            if scheme is None:
                out, state = dj.fast_weight(q, k, v, beta, initial_state=w0, impl=impl, chunk_size=16)
            else:  # the scheme given, not chosen
                out, state = fast_weight_context_parallel(q, k, v, beta, w0, rule="delta", scale=1.0, chunk_size=16,
                                                          segment_ids=None, plan=context_plan(q, None, impl),
                                                          impl=impl, scheme=scheme)
            return jnp.sum(out * jnp.sin(out)) + jnp.sum(state**2), (out, state)
        return jax.jit(jax.grad(loss, argnums=tuple(range(5)), has_aux=True))

    want = grads("reference")(*args)
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Explicit,))
    sharded = [jax.device_put(x, NamedSharding(mesh, P() if x.shape == args[4].shape else P(None, "seq")))
               for x in args]
    largest = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    for scheme in (None, "transition"):  # dj.fast_weight picks "relay" at P = 2
        with pltpu.force_tpu_interpret_mode():
            got = grads("pallas", scheme)(*sharded)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6 * largest,
                                       err_msg=f"pallas scheme={scheme}")


def expect_error(call, words, mesh) -> None:
    import contextlib

    import jax

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        try:
            call()
        except ValueError as error:
            assert words in str(error), (words, str(error))
            return
    raise AssertionError(f"expected a ValueError about {words}")


if __name__ == "__main__":
    main()
