"""Run by test_train_lm.py with 8 host CPU devices: one data-parallel LM train step over all 8
equals the same step on one device. Prints OK on success."""

from __future__ import annotations


def main() -> None:
    import jax
    import numpy as np
    from jax.sharding import AxisType

    from examples import train_lm
    from examples.lm import input_pipeline, train

    assert jax.device_count() == 8, jax.device_count()
    args = train_lm.parse_args(["--out", "/tmp/unused", "--depth", "1", "--dim", "32", "--heads", "2",
                                "--head-dim", "8", "--ff-dim", "64", "--seq-len", "16", "--batch-size", "8"])
    _, trainer = train.build(args)
    assert trainer.mesh.size == 8
    single = train.Trainer(trainer.model, trainer.optimizer,
                              jax.make_mesh((1,), ("batch",), axis_types=(AxisType.Auto,),
                                            devices=jax.devices()[:1]), carry=False)
    windows = input_pipeline.random_windows(np.arange(5000) % 256, 0, 0, 8, 16).astype(np.int32)
    reset = np.zeros(8, bool)
    results = []
    for t in (trainer, single):
        state = t.init(0, 8, 16)
        state, loss = t.make_train_step()(state, jax.device_put(windows, t.batch_sharding),
                                          jax.device_put(reset, t.batch_sharding), None)
        results.append((loss, state["params"]))
    (loss8, params8), (loss1, params1) = results
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print("OK")


if __name__ == "__main__":
    main()
