"""The language-model example: training, resuming, data parallelism, decoding."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import train_lm
from tests.test_multidevice import run_with_host_devices

TINY = ["--depth", "1", "--dim", "32", "--heads", "2", "--head-dim", "8", "--ff-dim", "64", "--seq-len", "32",
        "--batch-size", "8", "--corpus-bytes", "200000", "--no-progress", "--warmup", "5"]


def test_twenty_steps_lower_the_loss_and_write_metrics(tmp_path):
    result = train_lm.main([*TINY, "--steps", "20", "--eval-every", "10", "--out", str(tmp_path)])
    losses = result["losses"]
    assert sorted(losses) == list(range(1, 21))
    assert np.mean([losses[s] for s in (18, 19, 20)]) < 0.8 * np.mean([losses[s] for s in (1, 2, 3)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert set(records[0]) == {"step", "train_loss", "valid_bpb", "tokens_per_s"}
    assert records[1]["valid_bpb"] < records[0]["valid_bpb"] < 9
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_continues_exactly(tmp_path):
    straight = train_lm.main([*TINY, "--steps", "6", "--save-every", "3", "--out", str(tmp_path / "a")])
    train_lm.main([*TINY, "--steps", "6", "--stop-at", "3", "--save-every", "3", "--out", str(tmp_path / "b")])
    resumed = train_lm.main([*TINY, "--steps", "6", "--save-every", "3", "--resume", "--out", str(tmp_path / "b")])
    assert sorted(resumed["losses"]) == [4, 5, 6]  # it did not start over
    for step in (4, 5, 6):
        np.testing.assert_allclose(resumed["losses"][step], straight["losses"][step], rtol=1e-6)


def test_carrying_fast_weights_across_segments(tmp_path):
    data = np.arange(1000)
    first, reset0 = train_lm.stream_windows(data, 0, 4, 10)
    second, reset1 = train_lm.stream_windows(data, 1, 4, 10)
    np.testing.assert_array_equal(second[:, 0], first[:, -1])  # segment s + 1 continues segment s
    assert reset0.all() and not reset1.any()
    result = train_lm.main([*TINY, "--steps", "4", "--carry", "--out", str(tmp_path)])
    memory = result["state"]["memory"]
    assert len(memory) == 1 and float(jnp.abs(memory[0]).max()) > 0


@pytest.mark.jax_sensitive
def test_sharded_step_on_eight_devices_equals_one_device():
    result = run_with_host_devices(Path(__file__).with_name("lm_sharded_step_script.py"))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_greedy_decoding_with_cache_equals_full_forward_argmax():
    model = train_lm.ByteLM(depth=2, dim=32, heads=2, head_dim=8, ff_dim=64, nu=2)
    params = model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
    prompt = b"def f(x):"
    sample = train_lm.generate(model, params, prompt, 12)
    assert len(sample) == 12
    tokens = jnp.asarray(list(prompt + sample))[None]
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    predicted = jnp.argmax(logits[0, len(prompt) - 1 :], axis=-1)
    np.testing.assert_array_equal(np.asarray(predicted), np.frombuffer(sample, np.uint8))


def test_softmax_baseline_trains_and_samples(tmp_path):
    result = train_lm.main([*TINY, "--attention", "softmax", "--steps", "3", "--sample", "4", "--out", str(tmp_path)])
    assert len(result["sample"]) == 4


def test_default_corpus_is_fixed_and_capped():
    a, b = train_lm.default_corpus(50_000), train_lm.default_corpus(50_000)
    assert a == b and len(a) == 50_000
