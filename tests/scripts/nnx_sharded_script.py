"""Run by test_nnx.py in a fresh process with 8 host CPU devices (XLA_FLAGS set there).

Trains the NNX regressor of test_nnx.py a few steps with an ``nnx.Optimizer`` under ``nnx.jit``
on one device, then data-parallel (batch over 8 devices, parameters replicated; an explicit
mesh) and data x head-parallel (explicit and automatic meshes: batch over 2, heads and the
feed-forward's hidden width over 4, the parameters sharded as ``KernelAxes`` annotates them,
made sharded by flax under ``jax.set_mesh``): the losses and the trained parameters must equal
one device's. Prints OK on success.
"""

from __future__ import annotations


def main() -> None:
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from dpfp_jax import nnx as djnnx
    from tests.helpers import Regressor, regression_batch, train_step

    assert jax.device_count() == 8, f"expected 8 host devices, got {jax.device_count()}"
    x, target = regression_batch()

    def train(model, x, target, steps=3):
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        losses = [float(train_step(model, optimizer, x, target)) for _ in range(steps)]
        return losses, nnx.to_pure_dict(nnx.state(model, nnx.Param))

    want_losses, want_params = train(Regressor(rngs=nnx.Rngs(0)), *jax.device_put((x, target), jax.devices()[0]))

    runs = {}
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        model = Regressor(rngs=nnx.Rngs(0))
        nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, PartitionSpec())))
        batch = jax.device_put((x, target), NamedSharding(mesh, PartitionSpec("data")))
        runs["data-parallel"] = train(model, *batch)

    # Explicit meshes need the output projections' sharding given (the heads they sum over are
    # split); automatic ones find it.
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        axes = djnnx.KernelAxes(embed=None, heads="model", mlp="model")
        with jax.set_mesh(mesh):
            model = Regressor(kernel_axes=axes, rngs=nnx.Rngs(0))
            heads_sharded = NamedSharding(mesh, PartitionSpec(None, "model", None))
            kernel = model.body.attention_0.qkv.kernel[...]
            assert kernel.sharding.is_equivalent_to(heads_sharded, 3), kernel.sharding
            batch = jax.device_put((x, target), NamedSharding(mesh, PartitionSpec("data")))
            losses, params = train(model, *batch)
            kernel = model.body.attention_0.qkv.kernel[...]
            assert kernel.sharding.is_equivalent_to(heads_sharded, 3), kernel.sharding  # stays sharded
            runs[f"data x heads {axis_type}"] = losses, params

    for name, (losses, params) in runs.items():
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)
    print("OK")


if __name__ == "__main__":
    main()
