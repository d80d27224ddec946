"""The paper-reproduction example: data, model shapes, a short training run, the CLI."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from examples import associative_retrieval as ar


def test_setting1_keys_and_values_are_permutations():
    batch = ar.make_batch(np.random.default_rng(0), 1, 12, 5)
    assert batch.keys.shape == batch.values.shape == (5, 12)
    for row in (*batch.keys, *batch.values):
        assert sorted(row) == list(range(12))  # every symbol exactly once: no replacement
    assert batch.valid.all()
    for b in range(5):
        for key, value in zip(batch.keys[b], batch.values[b], strict=True):
            assert batch.targets[b, key] == value


def test_setting2_targets_are_last_occurrences():
    batch = ar.make_batch(np.random.default_rng(1), 2, 6, 50)
    assert batch.keys.shape == (50, 12) and batch.queries.shape == (50, 6)
    repeats = 0
    for b in range(50):
        last = {}
        for key, value in zip(batch.keys[b], batch.values[b], strict=True):
            repeats += key in last
            last[key] = value
        assert set(np.flatnonzero(batch.valid[b])) == set(last)
        for key, value in last.items():
            assert batch.targets[b, key] == value
    assert repeats > 0  # with replacement, keys do repeat


def test_bad_setting_is_refused():
    with pytest.raises(ValueError, match="setting"):
        ar.make_batch(np.random.default_rng(0), 3, 4, 2)


@pytest.mark.parametrize(
    "feature_map, rule, nu, features, key_width",
    [("softmax", "sum", 1, 64, None), ("linear", "sum", 1, 64, 64), ("linear", "delta", 1, 64, 64),
     ("favor", "sum", 1, 16, 32), ("favor", "delta", 1, 16, 32), ("dpfp", "sum", 2, 64, 256),
     ("dpfp", "delta", 3, 64, 384)],
)
def test_model_shapes(feature_map, rule, nu, features, key_width):
    s = 7
    batch = ar.make_batch(np.random.default_rng(0), 2, s, 3)
    model = ar.RetrievalModel(s, feature_map, rule, nu, features)
    projection = jax.random.normal(jax.random.key(0), (features, ar.KEY_DIM)) if feature_map == "favor" else None
    variables = model.init(jax.random.key(1), batch.keys, batch.values, batch.queries, projection)
    assert variables["params"]["embed"]["embedding"].shape == (s, round(1.1 * 2 * s))
    assert ("beta" in variables["params"]) == (rule == "delta" and feature_map != "softmax")
    readout = model.apply(variables, batch.keys, batch.values, batch.queries, projection)
    assert readout.shape == (3, s, s) and jnp.isfinite(readout).all()
    if key_width is not None:
        assert ar.KEY_DIM == 64 and key_width == {"linear": 64, "favor": 2 * features, "dpfp": 128 * nu}[feature_map]


def test_delta_readout_overwrites_and_sum_readout_averages():
    # With one-hot keys (identity map), the delta rule with beta = 1 stores the last value; the
    # normalised sum rule stores the average of a repeated key's values.
    k = jnp.eye(3)[jnp.array([0, 1, 0])][None, :, None]
    v = jnp.eye(3)[jnp.array([2, 1, 0])][None, :, None]
    _, w_delta = dj.fast_weight(k, k, v, jnp.ones((1, 3, 1)), rule="delta")
    np.testing.assert_allclose(w_delta[0, 0, 0], [1.0, 0.0, 0.0])
    _, w_sum = dj.fast_weight(k, k, v, rule="sum")
    np.testing.assert_allclose(w_sum[0, 0, 0] / k[0, :, 0, 0].sum(), [0.5, 0.0, 0.5])


def test_sum_and_delta_readouts_are_the_final_fast_weights_read_by_the_queries():
    # W built step by step in numpy (the rules' definitions); the readouts never build it. The
    # model-level test against dj.fast_weight's final state is test_readout_without_the_op_is_the_ops.
    rng = np.random.default_rng(0)
    phi_k, phi_q = (rng.uniform(0, 1, shape).astype(np.float32) for shape in ((2, 11, 6), (2, 3, 6)))
    phi_k, phi_q = phi_k / phi_k.sum(-1, keepdims=True), phi_q / phi_q.sum(-1, keepdims=True)
    values = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (2, 11))]
    beta = rng.uniform(0, 1, (2, 11)).astype(np.float32)
    w_sum, w_delta = np.zeros((2, 6, 5)), np.zeros((2, 6, 5))
    for t in range(11):
        k, v, b = phi_k[:, t], values[:, t], beta[:, t, None]
        w_sum += np.einsum("bk,bv->bkv", k, v)
        w_delta += np.einsum("bk,bv->bkv", k, b * (v - np.einsum("bkv,bk->bv", w_delta, k)))
    normaliser = np.einsum("bqk,bk->bq", phi_q, phi_k.sum(1))[..., None] + 1e-6
    np.testing.assert_allclose(ar.sum_rule_readout(phi_k, values, phi_q),
                               np.einsum("bkv,bqk->bqv", w_sum, phi_q) / normaliser, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ar.delta_rule_readout(phi_k, values, beta, phi_q),
                               np.einsum("bkv,bqk->bqv", w_delta, phi_q), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("setting, feature_map, rule, nu", [(1, "dpfp", "sum", 2), (2, "linear", "delta", 1),
                                                           (2, "dpfp", "fwm", 1)])
def test_readout_without_the_op_is_the_ops(setting, feature_map, rule, nu):
    # The model's default readout (no per-step outputs) against dj.fast_weight's final state read
    # by the queries (via_op), in the model: the same loss and gradients, rounding aside, for one training query
    # per sequence and for the evaluation's many.
    s = 9
    rng = np.random.default_rng(0)
    fast = ar.RetrievalModel(s, feature_map, rule, nu, paper_init=True)
    reference = ar.RetrievalModel(s, feature_map, rule, nu, paper_init=True, via_op=True)
    train = ar.make_paper_train_batch(rng, setting, s, 4)
    params = fast.init(jax.random.key(0), train.keys, train.values, train.queries)["params"]
    for batch in (train, ar.make_paper_eval_batch(rng, setting, s, 3)):

        def loss(params, model, batch=batch):
            readout = model.apply({"params": params}, batch.keys, batch.values, batch.queries)
            return ar.retrieval_loss(readout, batch.targets, batch.valid)

        (ours, ours_grads), (theirs, their_grads) = (jax.value_and_grad(loss)(params, m) for m in (fast, reference))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)
        for g, h in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(their_grads), strict=True):
            np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6 * float(jnp.abs(h).max()))


def test_short_training_lowers_the_loss():
    config = ar.RunConfig(1, "dpfp", "sum", 8, nu=1, max_steps=200, eval_every=100, patience=100)
    first = ar.train(dataclass_replace(config, max_steps=1, eval_every=1), progress=False)
    trained = ar.train(config, progress=False)
    assert float(trained["final_eval_loss"]) < 0.8 * float(first["final_eval_loss"])
    assert trained["steps"] == 200


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_cli_writes_csv_table_and_plot(tmp_path):
    rows = ar.main(["--setting", "2", "--feature-map", "dpfp", "--rule", "delta", "--S", "4,6",
                    "--max-steps", "10", "--out", str(tmp_path), "--no-progress"])
    assert len(rows) == 2
    with (tmp_path / "results.csv").open() as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == list(ar.CSV_COLUMNS)
    assert [r["S"] for r in written] == ["4", "6"]
    assert all(r["setting"] == "2" and r["rule"] == "delta" and r["nu"] == "1" for r in written)
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert "dpfp-1 delta" in (tmp_path / "results.md").read_text()


def test_same_command_same_numbers(tmp_path):
    args = ["--setting", "1", "--feature-map", "linear", "--S", "5", "--max-steps", "20", "--no-progress"]
    first = ar.main([*args, "--out", str(tmp_path / "a")])
    second = ar.main([*args, "--out", str(tmp_path / "b")])
    assert first[0]["final_eval_loss"] == second[0]["final_eval_loss"]


def test_plot_has_a_floored_log_axis_integer_s_ticks_and_the_threshold():
    import matplotlib.pyplot as plt

    rows = [dict(setting=1, feature_map="linear", nu="", features="", rule="sum", S=s, final_eval_loss=loss)
            for s, loss in ((40, "0.025"), (100, "0.185"), (160, "0.000000"))]
    rows += [dict(setting=2, feature_map="dpfp", nu=1, features="", rule=rule, S=20, final_eval_loss=loss)
             for rule, loss in (("sum", "0.2064"), ("delta", "0.00008"))]
    fig = ar.plot_results(rows)
    try:
        for ax in fig.axes:
            assert ax.get_yscale() == "log"
            assert ax.get_ylim()[0] == pytest.approx(ar.PLOT_FLOOR)
            threshold = [line for line in ax.get_lines() if "threshold" in str(line.get_label())]
            assert len(threshold) == 1 and set(threshold[0].get_ydata()) == {ar.TARGET_LOSS}
            fig.canvas.draw()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)
        assert list(fig.axes[0].get_lines()[0].get_ydata()) == [0.025, 0.185, ar.PLOT_FLOOR]  # 0 on the floor
        assert list(fig.axes[0].get_xticks()) == [40, 100, 160]
        assert list(fig.axes[1].get_xticks()) == [20]  # one S: one tick, not 19.8, 19.9, ...
    finally:
        plt.close(fig)


BAD_COMMANDS = {
    "zero max steps": (["--quick", "--max-steps", "0"], "--max-steps"),
    "word in S": (["--setting", "1", "--feature-map", "dpfp", "--S", "5,abc"], "--S"),
    "zero in S": (["--setting", "1", "--feature-map", "dpfp", "--S", "5,0"], "--S"),
    "no run given": (["--setting", "1"], "--feature-map and --S are required"),
    "softmax with a rule": (["--setting", "1", "--feature-map", "softmax", "--rule", "delta", "--S", "4"], "--rule"),
    "nu without dpfp": (["--setting", "1", "--feature-map", "linear", "--nu", "2", "--S", "4"], "--nu"),
    "features without favor": (["--setting", "1", "--feature-map", "dpfp", "--features", "8", "--S", "4"],
                               "--features"),
    "zero nu": (["--setting", "1", "--feature-map", "dpfp", "--nu", "0", "--S", "4"], "--nu"),
    "single-run flag with quick": (["--quick", "--feature-map", "dpfp"], "--feature-map"),
    "quick and full": (["--quick", "--full"], "--full"),
    "negative seed": (["--quick", "--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("argv, flag", list(BAD_COMMANDS.values()), ids=list(BAD_COMMANDS))
def test_a_bad_command_line_is_one_argparse_error_naming_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        ar.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert flag in err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_required_flags_say_so_in_help(capsys):
    with pytest.raises(SystemExit):
        ar.parse_args(["--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "output folder (required)" in flat
    assert flat.count("(a single run: required unless --quick or --full)") == 3  # --setting, --feature-map, --S
    with pytest.raises(SystemExit):
        ar.parse_args(["--quick"])  # --out is required


def test_max_steps_caps_every_preset_run():
    assert {c.max_steps for c in ar.quick_runs(0, 7)} == {7}
    assert {c.max_steps for c in ar.quick_runs(0, None)} == {3000}
    assert {c.max_steps for c in ar.full_runs(0, 7)} == {7}
    args = ar.parse_args(["--setting", "2", "--feature-map", "favor", "--S", "20,40", "--out", "unused"])
    assert (args.S, args.rule, args.nu, args.features) == ([20, 40], "sum", 1, 64)


@pytest.mark.parametrize("change", [dict(max_steps=0), dict(num_symbols=0), dict(eval_every=0), dict(rule="hebb"),
                                    dict(feature_map="relu"), dict(learning_rate=float("nan"))])
def test_run_config_refuses_what_would_not_train(change):
    name = next(iter(change))
    with pytest.raises(ValueError, match=name):
        dataclass_replace(ar.RunConfig(1, "dpfp", "sum", 8), **change)


def test_symbol_dense_is_the_dense_layer_on_the_concatenated_step_input():
    import flax.linen as nn

    s, width, batch = 5, 7, ar.make_batch(np.random.default_rng(0), 2, 5, 3)
    table = jax.random.normal(jax.random.key(1), (s, width))
    inputs = jnp.concatenate([jax.nn.one_hot(batch.values, s), table[batch.keys]], axis=-1)
    lookup = ar.SymbolDense(4, s)
    params = lookup.init(jax.random.key(2), table, batch.keys, batch.values)
    dense_params = nn.Dense(4).init(jax.random.key(2), inputs)
    # The same parameters (names, shapes, initial values), so a seed gives the demo the same model.
    assert jax.tree.map(jnp.array_equal, params, dense_params) == jax.tree.map(lambda _: True, params)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
    np.testing.assert_allclose(lookup.apply(params, table, batch.keys, batch.values),
                               nn.Dense(4).apply(params, inputs), rtol=1e-5, atol=1e-6)
    queries_only = ar.SymbolDense(4).init(jax.random.key(3), table, batch.queries)
    np.testing.assert_allclose(ar.SymbolDense(4).apply(queries_only, table, batch.queries),
                               nn.Dense(4).apply(queries_only, table[batch.queries]), rtol=1e-5, atol=1e-6)
