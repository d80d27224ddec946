"""Run by test_train_lm.py with 4 host CPU devices: ``examples/train_lm.py --context-parallel N``
(a ``(batch, seq)`` mesh of ``(4 / N, N)``, each window's sequence split over ``seq``) gives the
losses of the same run without it (the batch over all 4 devices), step by step, within float32
round-off (1e-5 relative), for N = 2 and 4, and for N = 2 with packed documents (segment ids
split with the sequence) and with ``--carry`` (the memory carried between steps enters the first
shard); and the context-parallel step compiles to a program whose activations are split over
``seq`` and none of whose collectives carries the global T. Prints OK on success."""

from __future__ import annotations

import tempfile
from pathlib import Path


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpfp_devtools.hlo import collectives_with_length
    from examples import train_lm
    from examples.lm import train

    assert jax.device_count() == 4, jax.device_count()
    tiny = ["--depth", "1", "--dim", "16", "--heads", "2", "--head-dim", "8", "--ff-dim", "32", "--seq-len", "24",
            "--batch-size", "4", "--corpus-bytes", "20000", "--no-progress", "--warmup", "1", "--steps", "3",
            "--eval-windows", "2"]
    with tempfile.TemporaryDirectory() as folder:
        def run(*extra: str) -> dict:
            return train_lm.main([*tiny, *extra, "--out", str(Path(folder) / "-".join(extra))])

        def losses(result: dict) -> list[float]:
            return [result["losses"][step] for step in sorted(result["losses"])]

        for extra in ([], ["--pack"], ["--carry"]):
            want = losses(run(*extra))
            for parts in (2, 4) if not extra else (2,):
                # --sample once: decoding (one byte a call) runs without the sequence axis.
                sample = ["--sample", "4"] if parts == 4 else []
                result = run(*extra, *sample, "--context-parallel", str(parts))
                np.testing.assert_allclose(losses(result), want, rtol=1e-5,
                                           err_msg=f"--context-parallel {parts} {extra}")
                if sample:
                    assert len(result["sample"]) == 4, result["sample"]

    # The step's compiled program: the sequence stays split (only parameter-sized and state-sized
    # collectives; T = 24 is no other dimension of this model).
    args = train_lm.parse_args([*tiny, "--context-parallel", "2", "--out", "unused"])
    _, trainer = train.build(args)
    assert dict(trainer.mesh.shape) == {"batch": 2, "seq": 2}, trainer.mesh.shape
    state = trainer.init(0, args.batch_size, args.seq_len)
    windows = jax.ShapeDtypeStruct((args.batch_size, args.seq_len + 1), jnp.int32)
    reset = jax.ShapeDtypeStruct((args.batch_size,), jnp.bool_)
    hlo = trainer.make_train_step().lower(state, windows, reset, None).compile().as_text()
    bad = collectives_with_length(hlo, args.seq_len)
    assert not bad, "collectives with the global T:\n" + "\n".join(bad)
    # And the sequence is split at all (without context parallelism no collective carries T
    # either, every device running whole rows): each device's embeddings are 2 rows of 12 bytes,
    # never of 24.
    assert "f32[2,12,16]" in hlo and "f32[2,24,16]" not in hlo, "the activations are not split over seq"
    print("OK")


if __name__ == "__main__":
    main()
