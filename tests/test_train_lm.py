"""The language-model example: training, resuming, data parallelism, decoding."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import train_lm
from examples.lm import checkpoints, input_pipeline, models, plotting, sampling, train
from tests.helpers import REPO_ROOT, SCRIPTS, run_with_host_devices

TINY = ["--depth", "1", "--dim", "32", "--heads", "2", "--head-dim", "8", "--ff-dim", "64", "--seq-len", "32",
        "--batch-size", "8", "--corpus-bytes", "200000", "--no-progress", "--warmup", "5"]


def test_twenty_steps_lower_the_loss_and_log_bits_per_byte(tmp_path):
    result = train_lm.main([*TINY, "--steps", "20", "--eval-every", "10", "--log-every", "4", "--out", str(tmp_path)])
    losses = result["losses"]
    assert sorted(losses) == list(range(1, 21))
    assert np.mean([losses[s] for s in (18, 19, 20)]) < 0.8 * np.mean([losses[s] for s in (1, 2, 3)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == result["metrics"]
    # A row every 4 steps and at each evaluation; each holds the mean of the steps since the previous row.
    assert [r["step"] for r in records] == [4, 8, 10, 12, 16, 20]
    for previous, record in zip([0] + [r["step"] for r in records], records, strict=False):
        evaluated = record["step"] in (10, 20)
        assert set(record) == {"step", "train_bpb", "tokens_per_s"} | ({"valid_bpb"} if evaluated else set())
        interval = [losses[s] for s in range(previous + 1, record["step"] + 1)]
        np.testing.assert_allclose(record["train_bpb"], np.mean(interval) / math.log(2), rtol=1e-12)
        assert record["tokens_per_s"] > 0
    # The logged losses are the model's, in nats: step 1's is the initial parameters' on the first
    # batch; valid_bpb is the final parameters' validation loss in bits.
    args = train_lm.parse_args([*TINY, "--out", str(tmp_path)])
    _, trainer = train.build(args)
    train_data, valid = input_pipeline.split(input_pipeline.load_corpus(None, args.corpus_bytes))
    eval_loss = trainer.make_eval_step()
    initial = trainer.init(args.seed, args.batch_size, args.seq_len)
    first = input_pipeline.random_windows(train_data, 0, args.seed, args.batch_size, args.seq_len)
    np.testing.assert_allclose(float(eval_loss(initial["params"], first)), losses[1], rtol=1e-5)
    windows = input_pipeline.validation_windows(valid, args.seq_len, args.eval_windows)
    final = float(eval_loss(result["state"]["params"], windows)) / math.log(2)
    np.testing.assert_allclose(records[-1]["valid_bpb"], final, rtol=1e-5)
    assert records[-1]["valid_bpb"] < records[2]["valid_bpb"] < 9
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_loss_plot_shows_every_logged_step_and_the_run_settings():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    records = [dict(step=s, train_bpb=8 - s / 10 + rng.normal(0, 0.3), tokens_per_s=1.0) for s in range(1, 61)]
    for record in records[5::6]:
        record["valid_bpb"] = 8 - record["step"] / 10
    args = train_lm.parse_args(["--out", "unused", "--steps", "60", "--carry"])
    title = train.describe(args, devices=2)
    for words in ("dpfp-1 delta rule, carried", "2 layers", "width 64", "4 heads of 16", "ff 256", "batch 16 x 64",
                  "lr 0.003", "60 steps", "2 devices"):
        assert words in title
    fig = plotting.plot_losses(records, title)
    try:
        (ax,) = fig.axes
        assert ax.get_title() == title
        raw, smoothed, valid = ax.get_lines()
        assert list(raw.get_xdata()) == list(smoothed.get_xdata()) == list(range(1, 61))
        assert list(valid.get_xdata()) == list(range(6, 61, 6))
        # Smoothed: a fraction of the logged rows' step-to-step noise.
        assert np.std(np.diff(smoothed.get_ydata())) < 0.5 * np.std(np.diff(raw.get_ydata()))
    finally:
        plt.close(fig)


def test_evaluation_and_logging_intervals_scale_with_the_run():
    for steps, eval_every, log_every in ((60, 6, 1), (300, 30, 3), (20_000, 2000, 200), (5, 1, 1)):
        args = train_lm.parse_args(["--out", "unused", "--steps", str(steps)])
        assert (args.eval_every, args.log_every) == (eval_every, log_every)
    args = train_lm.parse_args(["--out", "unused", "--steps", "60", "--eval-every", "50", "--log-every", "7"])
    assert (args.eval_every, args.log_every) == (50, 7)
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--out", "unused", "--log-every", "0"])


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", text[text.index("options:"):])[1:]
    assert len(blocks) == len(train_lm.build_parser()._actions)
    for block in blocks:
        assert block.startswith("-h") or "default" in block or "(required)" in block, block
    flat = " ".join(text.split())
    for shown in ("(default: 300)", "(default: 'def '; with --sample)", "cpu 2, paper-small 16", "--steps // 10"):
        assert shown in flat


@pytest.mark.slow  # trains twice; the throughput comparison test checks the printed figures in make test
def test_tokens_per_s_counts_training_steps_only(tmp_path, monkeypatch):
    pause = 0.5  # every evaluation and every checkpoint call made that much slower
    make_eval_step = train.Trainer.make_eval_step

    def slow_eval_step(self):
        eval_loss = make_eval_step(self)

        def slow(*args):
            time.sleep(pause)
            return eval_loss(*args)

        return slow

    saves = []

    class SlowSaves:
        def __init__(self, manager):
            self.manager = manager

        def save(self, *args, **kwargs):
            saves.append(args[0])
            time.sleep(pause)
            return self.manager.save(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.manager, name)

    monkeypatch.setattr(train.Trainer, "make_eval_step", slow_eval_step)
    checkpoint_manager = checkpoints.checkpoint_manager
    monkeypatch.setattr(checkpoints, "checkpoint_manager", lambda *args: SlowSaves(checkpoint_manager(*args)))
    train_lm.main([*TINY, "--steps", "6", "--eval-every", "2", "--log-every", "2", "--out", str(tmp_path)])
    assert saves == [1, 2, 3, 4, 5, 6]  # every save went through the slow manager
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    tokens_per_step = 8 * 32
    for record in records:
        # A step of this tiny model takes milliseconds; counting one pause would give < 2 steps/s.
        assert record["tokens_per_s"] > tokens_per_step / 0.25, record


@pytest.mark.jax_sensitive
def test_sharded_step_on_eight_devices_equals_one_device():
    result = run_with_host_devices(SCRIPTS / "lm_sharded_step_script.py")
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


@pytest.mark.slow  # about a minute on 4 host devices; make test's context-parallel scripts check the op and the layers
def test_context_parallel_training_on_four_devices_gives_the_unsharded_losses():
    # On the pinned jax only (about 50 s): the op's own 4-device test runs on the newest jax too.
    # --context-parallel 2 and 4 (and 2 with --pack) against the batch over all 4 devices, step by
    # step; the step's compiled collectives carry no global T (the script's docstring).
    result = run_with_host_devices(SCRIPTS / "lm_context_parallel_script.py", count=4)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def usage_error(capsys, main, argv) -> str:
    """The one-line argparse error ``main(argv)`` exits with (status 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("usage: ") and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_crash_continues_exactly_and_logs_each_step_once(tmp_path):
    run = [*TINY, "--steps", "6", "--save-every", "3", "--log-every", "1", "--eval-every", "3"]
    straight = train_lm.main([*run, "--out", str(tmp_path / "a")])
    train_lm.main([*run, "--stop-at", "5", "--out", str(tmp_path / "b")])
    # What a crash after logging step 5 and before its checkpoint leaves: rows 1-5, checkpoint 3.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "5")
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5]
    resumed = train_lm.main([*run, "--resume", "--out", str(tmp_path / "b")])
    assert sorted(resumed["losses"]) == [4, 5, 6]  # it did not start over
    for step in (4, 5, 6):
        np.testing.assert_allclose(resumed["losses"][step], straight["losses"][step], rtol=1e-6)
    # Rows 4 and 5 of the crashed run were dropped, not doubled: one row per step, as straight's.
    rows = read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row, expected in zip(rows, straight["metrics"], strict=True):
        np.testing.assert_allclose(row["train_bpb"], expected["train_bpb"], rtol=1e-6)


@pytest.mark.slow  # trains twice; make test's resume test covers the checkpoints
def test_a_fresh_run_refuses_another_runs_checkpoints_unless_overwrite(tmp_path, capsys):
    run = [*TINY, "--steps", "2", "--save-every", "1", "--out", str(tmp_path)]
    first = train_lm.main(run)
    old_rows = (tmp_path / "metrics.jsonl").read_text()
    assert checkpoints.saved_steps(tmp_path / "checkpoints") == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["dim"] == 32
    error = usage_error(capsys, train_lm.main, [*run, "--steps", "1", "--seed", "1"])
    assert "--overwrite" in error and "--resume" in error
    assert (tmp_path / "metrics.jsonl").read_text() == old_rows  # nothing was touched
    assert checkpoints.saved_steps(tmp_path / "checkpoints") == [1, 2]
    # --overwrite deletes the old run: a later --resume finds this run's step 1, not the old step 2.
    second = train_lm.main([*run, "--steps", "1", "--seed", "1", "--overwrite"])
    assert checkpoints.saved_steps(tmp_path / "checkpoints") == [1]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
    resumed = train_lm.main([*run, "--steps", "1", "--seed", "1", "--resume"])
    assert int(resumed["state"]["step"]) == 1
    for a, b in zip(jax.tree.leaves(resumed["state"]["params"]), jax.tree.leaves(second["state"]["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(first["state"]["params"]["head"]["kernel"], second["state"]["params"]["head"]["kernel"])
    # --resume with another model width: one line naming the setting, before orbax is asked.
    error = usage_error(capsys, train_lm.main, [*run, "--steps", "1", "--seed", "1", "--resume", "--dim", "48"])
    assert "--dim 32 there, --dim 48 here" in error


def test_carrying_fast_weights_across_segments(tmp_path):
    data = np.arange(1000)
    first, reset0 = input_pipeline.stream_windows(data, 0, 4, 10)
    second, reset1 = input_pipeline.stream_windows(data, 1, 4, 10)
    np.testing.assert_array_equal(second[:, 0], first[:, -1])  # segment s + 1 continues segment s
    assert reset0.all() and not reset1.any()
    result = train_lm.main([*TINY, "--steps", "4", "--carry", "--out", str(tmp_path)])
    memory = result["state"]["memory"]
    assert len(memory) == 1 and float(jnp.abs(memory[0]).max()) > 0


# Two processes start and compile a model each: with the slow tests only, to keep `make test` within CI's time.
@pytest.mark.slow
@pytest.mark.parametrize("context_parallel", ["1", "4"])
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, context_parallel):
    # jax's multi-controller engine on the CPU: two processes of 2 host devices each (CPU
    # collectives over gloo, jax's default), launched as the README says. With --context-parallel
    # 4 every sequence is split over all four devices, between the two processes.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    run = [*TINY, "--steps", "4", "--log-every", "1", "--eval-every", "2", "--save-every", "2"]
    two_run = [*run, "--context-parallel", context_parallel]
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONPATH": path}
    processes = [
        subprocess.Popen([sys.executable, str(REPO_ROOT / "examples" / "train_lm.py"), *two_run, "--out",
                          str(tmp_path / "two"), "--coordinator-address", f"localhost:{port}", "--num-processes",
                          "2", "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (out, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out + err[-5000:]
    one = train_lm.main([*run, "--out", str(tmp_path / "one")])  # this process: one device
    assert len(one["state"]["params"]["head"]["kernel"].sharding.device_set) == 1

    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # written once
    for a, b in zip(two, one["metrics"], strict=True):
        assert set(a) == set(b)
        for key in ("train_bpb", "valid_bpb"):
            if key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    assert "4 steps:" in outputs[0][0] and "4 steps:" not in outputs[1][0]  # process 0 alone prints
    assert (tmp_path / "two" / "loss.png").exists()
    # The checkpoint both processes wrote together restores here to the one-process parameters.
    args = train_lm.parse_args([*run, "--out", str(tmp_path / "two")])
    _, trainer = train.build(args)
    manager = checkpoints.checkpoint_manager(tmp_path / "two" / "checkpoints", args.save_every)
    restored = checkpoints.restore(manager, trainer.init(args.seed, args.batch_size, args.seq_len))
    assert int(restored["step"]) == 4
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(one["state"]["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_local_rows_of_the_global_batch():
    args = train_lm.parse_args([*TINY, "--out", "unused"])
    _, trainer = train.build(args)
    np.testing.assert_array_equal(trainer.local_rows(8), np.arange(8))
    data = np.arange(5000)
    np.testing.assert_array_equal(input_pipeline.random_windows(data, 3, 0, 8, 16, rows=np.array([2, 5])),
                                  input_pipeline.random_windows(data, 3, 0, 8, 16)[[2, 5]])
    windows, reset = input_pipeline.stream_windows(data, 0, 8, 16, rows=np.array([6, 7]))
    np.testing.assert_array_equal(windows, input_pipeline.stream_windows(data, 0, 8, 16)[0][6:])
    assert reset.shape == (2,) and reset.all()


def test_greedy_decoding_with_cache_equals_full_forward_argmax():
    model = models.ByteLM(depth=2, dim=32, heads=2, head_dim=8, ff_dim=64, nu=2)
    params = model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
    prompt = b"def f(x):"
    sample = sampling.generate(model, params, prompt, 12)
    assert len(sample) == 12
    tokens = jnp.asarray(list(prompt + sample))[None]
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    predicted = jnp.argmax(logits[0, len(prompt) - 1 :], axis=-1)
    np.testing.assert_array_equal(np.asarray(predicted), np.frombuffer(sample, np.uint8))


def test_gated_model_decodes_as_its_full_forward():
    model = models.ByteLM(depth=1, dim=32, heads=2, head_dim=8, ff_dim=64, gate="gated_deltanet")
    params = model.init(jax.random.key(4), jnp.zeros((1, 8), jnp.int32))["params"]
    assert params["transformer"]["attention_0"]["gate_a_log"].shape == (2,)
    prompt = b"def f(x):"
    sample = sampling.generate(model, params, prompt, 6)
    tokens = jnp.asarray(list(prompt + sample))[None]
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    predicted = jnp.argmax(logits[0, len(prompt) - 1 :], axis=-1)
    np.testing.assert_array_equal(np.asarray(predicted), np.frombuffer(sample, np.uint8))


def test_softmax_baseline_trains_and_samples_under_a_labelled_header(tmp_path, capsys):
    result = train_lm.main([*TINY, "--attention", "softmax", "--steps", "3", "--sample", "4", "--out", str(tmp_path)])
    assert len(result["sample"]) == 4
    header, text = capsys.readouterr().out.splitlines()[-2:]
    assert header == "--- sample at step 3: prompt 'def ' + 4 bytes, greedy ---"
    assert text == "def " + result["sample"].decode("utf-8", errors="replace")


def test_default_corpus_is_fixed_and_capped():
    a, b = input_pipeline.default_corpus(50_000), input_pipeline.default_corpus(50_000)
    assert a == b and len(a) == 50_000


def test_packed_segment_ids_change_exactly_at_document_separators():
    documents = input_pipeline.default_documents(30_000)
    corpus = input_pipeline.load_corpus(None, 30_000, pack=True)
    ids = input_pipeline.document_ids(corpus)
    starts = np.flatnonzero(corpus == input_pipeline.SEPARATOR)
    # Every file is a document led by one separator, in order, and nothing else holds the byte.
    lengths = [len(data) + 1 for _, data in documents]
    np.testing.assert_array_equal(starts, np.cumsum([0, *lengths[:-1]]))
    for (_, data), start in zip(documents[:-1], starts, strict=False):
        assert corpus[start + 1 : start + len(data) + 1].astype(np.uint8).tobytes() == data
    assert len(corpus) == 30_000  # capped like the unpacked corpus
    # In the training rows the id changes exactly where a separator byte sits.
    windows = input_pipeline.random_windows(corpus, 3, 0, 64, 512)
    segments = input_pipeline.random_windows(ids, 3, 0, 64, 512)
    changes = segments[:, 1:] != segments[:, :-1]
    np.testing.assert_array_equal(changes, windows[:, 1:] == input_pipeline.SEPARATOR)
    assert changes.any()
    # Without --pack the corpus is unchanged: the files' bytes joined, no separators.
    assert input_pipeline.load_corpus(None, 30_000).astype(np.uint8).tobytes() == input_pipeline.default_corpus(30_000)


def test_data_file_separators_start_documents(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes((b"\x1e" + b"a" * 700) + (b"\x1e" + b"b" * 500))
    corpus = input_pipeline.load_corpus(path, 10_000, pack=True)
    np.testing.assert_array_equal(input_pipeline.document_ids(corpus), np.repeat([1, 2], [701, 501]))


@pytest.mark.parametrize("attention", ["dpfp", "softmax"])
def test_a_packed_document_does_not_see_the_previous_one(attention):
    model = models.ByteLM(attention, depth=2, dim=32, heads=2, head_dim=8, ff_dim=64)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    sep = input_pipeline.SEPARATOR
    first, second = list(b"import os\nx = 1\n"), list(b"def f(y):\n    return y")
    other = list(b"class C: pass  #")  # another previous document, same length
    rows = np.array([[sep, *first, sep, *second], [sep, *other, sep, *second]], np.int32)
    ids = input_pipeline.document_ids(rows.reshape(-1)).reshape(rows.shape)  # ids of the flat text: 1, 2 | 3, 4
    boundary = 1 + len(first)
    packed, _ = models.apply_lm(model, params, rows, segment_ids=ids)
    np.testing.assert_allclose(packed[0, boundary:], packed[1, boundary:], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(packed[0, :boundary] - packed[1, :boundary]).max()) > 1e-3
    # Without segment ids the second document's logits depend on the first's bytes.
    unpacked, _ = models.apply_lm(model, params, rows)
    assert float(jnp.abs(unpacked[0, boundary:] - unpacked[1, boundary:]).max()) > 1e-3


def test_packed_run_trains_with_segment_ids_and_validates_per_document(tmp_path):
    # Short documents (a --data file with its own separators), so every batch crosses documents.
    data = tmp_path / "docs.txt"
    data.write_bytes(b"".join(b"\x1e" + f"def f{i}(x):\n    return x * {i % 7}\n".encode() for i in range(3000)))
    run = [*TINY, "--pack", "--data", str(data)]
    result = train_lm.main([*run, "--steps", "6", "--eval-every", "3", "--log-every", "3",
                            "--out", str(tmp_path / "out")])
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records == result["metrics"] and [r["step"] for r in records] == [3, 6]
    assert all(math.isfinite(r["train_bpb"]) and math.isfinite(r["valid_bpb"]) for r in records)
    # Step 1's loss is the initial parameters' on the first packed batch with its segment ids, and
    # not what the same bytes give without them: the training step gets the ids.
    args = train_lm.parse_args([*run, "--out", "unused"])
    _, trainer = train.build(args)
    corpus = input_pipeline.load_corpus(data, args.corpus_bytes, pack=True)
    train_data, valid = input_pipeline.split(corpus)
    train_ids, valid_ids = input_pipeline.split(input_pipeline.document_ids(corpus))
    eval_loss = trainer.make_eval_step()
    initial = trainer.init(args.seed, args.batch_size, args.seq_len)["params"]
    first = input_pipeline.random_windows(train_data, 0, args.seed, args.batch_size, args.seq_len)
    first_ids = input_pipeline.random_windows(train_ids, 0, args.seed, args.batch_size, args.seq_len)
    assert (first_ids[:, 1:] != first_ids[:, :-1]).any()  # the batch crosses documents
    np.testing.assert_allclose(float(eval_loss(initial, first, first_ids)), result["losses"][1], rtol=1e-5)
    assert abs(float(eval_loss(initial, first)) - result["losses"][1]) > 1e-5
    # valid_bpb is per document: the validation rows carry their segment ids.
    final = result["state"]["params"]
    windows = input_pipeline.validation_windows(valid, args.seq_len, args.eval_windows)
    ids = input_pipeline.validation_windows(valid_ids, args.seq_len, args.eval_windows)
    assert (ids[:, 1:] != ids[:, :-1]).any()
    np.testing.assert_allclose(records[-1]["valid_bpb"], float(eval_loss(final, windows, ids)) / math.log(2),
                               rtol=1e-5)
    assert abs(records[-1]["valid_bpb"] - float(eval_loss(final, windows)) / math.log(2)) > 1e-5


def test_pack_refuses_carry_and_shows_in_help(capsys):
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--out", "unused", "--pack", "--carry"])
    assert "--carry and --pack cannot be combined" in capsys.readouterr().err
    assert train_lm.parse_args(["--out", "unused"]).pack is False
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--pack" in flat and "0x1e" in flat


def no_separator_file(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_bytes(b"def f(x):\n    return x\n" * 100)
    return path


# Each bad command line, and the flag its one-line error must name. All fail before any training.
BAD_COMMANDS = {
    "negative steps": (["--steps", "-5"], "--steps"),
    "no steps without resume": (["--steps", "0"], "--steps"),
    "negative stop-at": (["--stop-at", "-3"], "--stop-at"),
    "stop-at past steps": (["--steps", "10", "--stop-at", "20"], "--stop-at"),
    "zero seq-len": (["--seq-len", "0"], "--seq-len"),
    "zero batch": (["--batch-size", "0"], "--batch-size"),
    "word for depth": (["--depth", "two"], "--depth"),
    "negative sample": (["--sample", "-1"], "--sample"),
    "negative temperature": (["--sample", "2", "--temperature", "-0.5"], "--temperature"),
    "negative lr": (["--lr", "-1e-3"], "--lr"),
    "nan lr": (["--lr", "nan"], "--lr"),
    "negative warmup": (["--warmup", "-1"], "--warmup"),
    "negative weight decay": (["--weight-decay", "-0.1"], "--weight-decay"),
    "zero clip": (["--clip", "0"], "--clip"),
    "zero eval windows": (["--eval-windows", "0"], "--eval-windows"),
    "zero save interval": (["--save-every", "0"], "--save-every"),
    "tiny corpus": (["--corpus-bytes", "100"], "--corpus-bytes"),
    "negative seed": (["--seed", "-1"], "--seed"),
    "rule with softmax": (["--attention", "softmax", "--rule", "sum"], "--rule"),
    "impl with softmax": (["--attention", "softmax", "--impl", "chunk"], "--impl"),
    "nu without dpfp": (["--attention", "linear", "--nu", "2"], "--nu"),
    "features without favor": (["--features", "32"], "--features"),
    "gate with the sum rule": (["--gate", "--rule", "sum"], "--gate"),
    "gate with softmax": (["--gate", "--attention", "softmax"], "--gate"),
    "temperature without sample": (["--temperature", "1.0"], "--temperature"),
    "prompt without sample": (["--prompt", "x"], "--prompt"),
    "empty prompt": (["--sample", "3", "--prompt", ""], "--prompt"),
    "resume and overwrite": (["--resume", "--overwrite"], "--overwrite"),
    "address without port": (["--coordinator-address", "localhost"], "--coordinator-address"),
    "process id out of range": (["--num-processes", "2", "--process-id", "2"], "--process-id"),
    "missing data file": (["--data", "{tmp}/absent.txt"], "--data"),
    "zero context parallel": (["--context-parallel", "0"], "--context-parallel"),
    "context parallel softmax": (["--attention", "softmax", "--context-parallel", "2"], "--context-parallel"),
    "seq-len not split in N": (["--context-parallel", "3"], "--seq-len 32 must be divisible by --context-parallel 3"),
    # Found once the data and the output folder are read, still before any state is built:
    "resume without a checkpoint": (["--resume"], "--resume"),
    "pack without separators": (["--pack", "--data", "{plain}"], "--pack"),
    "data shorter than a window": (["--data", "{plain}", "--seq-len", "2000"], "--seq-len"),
    "streams shorter than a segment": (["--carry", "--batch-size", "8000"], "--carry"),
    # Found once jax knows the devices (1 here, 16 not being a divisor of any usual count):
    "context parallel over more devices": (["--context-parallel", "16"], "--context-parallel 16 must divide the"),
}


@pytest.mark.parametrize("argv, flag", list(BAD_COMMANDS.values()), ids=list(BAD_COMMANDS))
def test_a_bad_command_line_is_one_argparse_error_naming_the_flag(tmp_path, capsys, argv, flag):
    plain = no_separator_file(tmp_path)
    argv = [arg.format(tmp=tmp_path, plain=plain) for arg in argv]
    error = usage_error(capsys, train_lm.main, [*TINY, *argv, "--out", str(tmp_path / "out")])
    assert flag in error
    if "--pack" in argv:
        assert "0x1e" in error
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()


def run_example(script, *argv, devices=1):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    return subprocess.run([sys.executable, str(REPO_ROOT / "examples" / script), *argv], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_scripts_exit_with_status_2_and_no_traceback(tmp_path):
    # A batch two devices cannot share is found after jax starts: still one line and status 2.
    result = run_example("train_lm.py", *TINY, "--batch-size", "3", "--out", str(tmp_path), devices=2)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--batch-size 3 must be a multiple of the 2 devices the batch is split over (jax.device_count())")
    result = run_example("associative_retrieval.py", "--setting", "1", "--feature-map", "softmax", "--rule", "delta",
                         "--S", "4", "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--rule" in result.stderr.strip().splitlines()[-1]


def test_docstring_examples_run():
    import doctest

    from examples import arguments, lm_throughput

    for module in (train_lm, arguments, lm_throughput, input_pipeline, checkpoints, plotting):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_throughput_comparison_prints_the_machine_the_load_and_the_ratio(tmp_path, capsys):
    from examples import lm_throughput

    result = lm_throughput.main(["--attentions", "dpfp:delta,linear:sum", *TINY, "--steps", "2"])
    out = capsys.readouterr().out
    assert set(result["runs"]) == {"dpfp delta", "linear sum"} and all(len(v) == 1 for v in result["runs"].values())
    assert result["ratios"]["dpfp delta"] == 1.0
    np.testing.assert_allclose(result["ratios"]["linear sum"],
                               result["runs"]["linear sum"][0] / result["runs"]["dpfp delta"][0])
    lines = out.splitlines()
    assert lines[0].startswith("machine: ") and f"jax {jax.__version__}" in lines[0]
    assert lines[1].startswith("load average at start: ") and "(1 / 5 / 15 min)" in lines[1]
    assert any(line.startswith("load average at end: ") for line in lines)
    assert f"| linear sum | 1 | {result['runs']['linear sum'][0]:,.0f} |" in out
    assert f"{result['ratios']['linear sum']:.2f}x" in out
    error = usage_error(capsys, lm_throughput.main, ["--out", str(tmp_path)])
    assert "--out" in error


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, script, argv)`` of every command line in the README, the docs pages, the
    examples' README and the Makefile that runs one of the example scripts."""
    import shlex

    pattern = re.compile(r"^\s*(?:python|\$\(PY\))\s+examples/(\w+)\.py((?:[^\n#\\]|\\\n)*)", re.M)
    # A Makefile's $(NAME) is its `NAME ?= default`, or nothing (a variable set only on demand).
    defaults = dict(re.findall(r"^(\w+) \?= (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M))
    found = []
    for path in [REPO_ROOT / "README.md", REPO_ROOT / "Makefile", *sorted(REPO_ROOT.glob("docs/**/*.md")),
                 *sorted(REPO_ROOT.glob("examples/**/*.md"))]:
        text = path.read_text()
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            argv = shlex.split(match.group(2).replace("\\\n", " ").rstrip().removesuffix("&"))
            argv = [defaults.get(a[2:-1], "") if re.fullmatch(r"\$\(\w+\)", a) else a for a in argv]
            argv = [a for a in argv if a]
            found.append((f"{path.relative_to(REPO_ROOT)}:{line}", match.group(1), argv))
    return found


def test_every_documented_command_line_is_accepted():
    from examples import associative_retrieval, lm_throughput, paper_figures

    parsers = dict(train_lm=train_lm.parse_args, associative_retrieval=associative_retrieval.parse_args,
                   lm_throughput=lm_throughput.parse_args, paper_figures=paper_figures.parse_args)
    commands = documented_commands()
    assert {script for _, script, _ in commands} == set(parsers), commands
    for where, script, argv in commands:
        try:
            parsers[script](argv)
        except SystemExit as exit_:  # --help exits with 0, a refused command line with 2
            if exit_.code not in (0, None):
                raise AssertionError(f"{where}: examples/{script}.py {' '.join(argv)} is refused") from exit_
