"""Run by test_pallas.py with 8 host CPU devices: the Pallas adapter under jit with a
batch-sharded explicit mesh runs each kernel (chunked: chunk_size 16; fused recurrent:
chunk_size 64 > T) per shard in interpret mode, and matches the oracle, without and with packed
documents (whose resets [B, T] are sharded with the batch)."""

from __future__ import annotations


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import dpfp_jax as dj
    from dpfp_devtools.workloads import make_inputs
    from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas
    from dpfp_jax.ops.fast_weight.segments import resets_of

    inputs = make_inputs(0, batch=8, time=20, key_dim=8, value_dim=4, with_state=True)
    args = [inputs[n] for n in ("q", "k", "v", "beta", "initial_state")]
    mesh = jax.make_mesh((8,), ("batch",))
    sharded = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("batch"))) for a in args]
    # Row b has documents starting at steps 2b + 1 and 15 (inside and at the end of chunks of 16).
    segment_ids = jnp.asarray([[int(t >= 2 * b + 1) + int(t >= 15) for t in range(20)] for b in range(8)])
    sharded_resets = jax.device_put(resets_of(segment_ids), NamedSharding(mesh, PartitionSpec("batch")))

    # Packed documents once: both kernels take resets through the same shard_map.
    for chunk_size, packed in ((16, False), (64, False), (16, True)):
        ids = segment_ids if packed else None

        def oracle(*a, ids=ids):
            return dj.fast_weight(*a[:4], initial_state=a[4], impl="reference", segment_ids=ids)

        want = oracle(*args)
        want_grads = jax.grad(lambda *a, oracle=oracle: jnp.sum(oracle(*a)[0] ** 2), argnums=(0, 1, 2, 3, 4))(*args)

        @jax.jit
        def run(q, k, v, beta, state, resets, chunk_size=chunk_size):
            return fast_weight_pallas(q, k, v, beta, state, rule="delta", scale=1.0, chunk_size=chunk_size,
                                      interpret=True, resets=resets)

        resets = sharded_resets if packed else None
        text = run.lower(*sharded, resets).as_text()
        assert "shard_map" in text or "sdy.manual_computation" in text, "expected a per-shard kernel call"
        for g, w in zip(run(*sharded, resets), want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
        grads = jax.jit(jax.grad(lambda *a, run=run: jnp.sum(run(*a)[0] ** 2), argnums=(0, 1, 2, 3, 4)))(
            *sharded, resets)
        for g, w in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    print("OK")


if __name__ == "__main__":
    main()
