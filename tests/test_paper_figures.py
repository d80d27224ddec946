"""The paper-figures sweep (examples/paper_figures.py): the authors' protocol pieces, the resumable
driver on a tiny grid, the authors' logs, capacity, the table and the figures."""

import csv
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import associative_retrieval as ar
from examples import paper_figures as pf

# --- the authors' protocol ----------------------------------------------------------------------


@pytest.mark.parametrize("setting", [1, 2])
def test_paper_training_batch_asks_one_key_for_its_last_value(setting):
    batch = ar.make_paper_train_batch(np.random.default_rng(0), setting, 6, 40)
    assert batch.queries.shape == batch.targets.shape == batch.valid.shape == (40, 1) and batch.valid.all()
    for b in range(40):
        (query,), (target,) = batch.queries[b], batch.targets[b]
        positions = np.flatnonzero(batch.keys[b] == query)
        assert positions.size and batch.values[b, positions[-1]] == target  # the key occurs; its last value


def test_paper_eval_batch_has_s_pairs_and_at_most_200_queries():
    batch = ar.make_paper_eval_batch(np.random.default_rng(0), 2, 30, 5)
    assert batch.keys.shape == (5, 30)  # S pairs in setting 2 too (get_all_queries), not 2S
    for b in range(5):
        assert set(np.flatnonzero(batch.valid[b])) == set(batch.keys[b])  # every distinct key it holds
    big = ar.make_paper_eval_batch(np.random.default_rng(0), 1, 250, 2)
    assert big.valid.sum(axis=1).tolist() == [200, 200]
    assert big.valid[:, :200].all()  # the lowest key ids, as np.unique(...)[:200]


def test_paper_init_draws_key_and_query_weights_within_one_over_sqrt_d():
    batch = ar.make_batch(np.random.default_rng(0), 1, 10, 2)
    model = ar.RetrievalModel(10, "dpfp", "delta", paper_init=True)
    params = model.init(jax.random.key(0), batch.keys, batch.values, batch.queries)["params"]
    bound = 1 / math.sqrt(ar.KEY_DIM)
    for name in ("key", "query"):
        kernel = params[name]["kernel"]
        assert float(jnp.abs(kernel).max()) <= bound and float(jnp.abs(kernel).max()) > 0.9 * bound
    fan_in = params["beta"]["kernel"].shape[0]
    assert float(jnp.abs(params["beta"]["kernel"]).max()) <= 1 / math.sqrt(fan_in)


def authors_fwm(keys, values, betas):
    """The authors' update_rule="fwm" loop (linearAttention.py), in numpy: the oracle."""
    w = np.einsum("bv,bk->bvk", values[:, 0], keys[:, 0] * betas[:, 0])
    for i in range(1, keys.shape[1]):
        k, v, beta = keys[:, i], values[:, i], betas[:, i]
        old = np.einsum("bvk,bk->bv", w, k)
        w = w - np.einsum("bv,bk->bvk", old, k) + np.einsum("bv,bk->bvk", beta * v + (1 - beta) * old, k)
        norm = np.sqrt((w.reshape(len(w), -1) ** 2).sum(-1))
        w = w / (np.maximum(norm - 1, 0) + 1)[:, None, None]
    return w


# 9 steps: segments of 3 in fwm_memory's backward; 7 (a prime): segments of one step.
@pytest.mark.parametrize("memory, length", [(ar.fwm_memory, 9), (ar.fwm_memory, 7), (ar.fwm_memory_by_op, 9)])
def test_fwm_memory_is_the_authors_rule(memory, length):
    rng = np.random.default_rng(0)
    keys = 2 * np.abs(rng.normal(size=(2, length, 6))).astype(np.float32)
    keys[:, 0] = 1.0  # |k_0| = sqrt(6)
    values = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (2, length))]
    betas = rng.uniform(0.5, 1, size=(2, length, 1)).astype(np.float32)
    # The first write is larger than norm 1 and left so; every later state is scaled to norm 1.
    assert (betas[:, 0, 0] * np.linalg.norm(keys[:, 0], axis=-1) > 1.2).all()
    ours = memory(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(betas))  # [B, K, V]
    np.testing.assert_allclose(np.swapaxes(np.asarray(ours), 1, 2), authors_fwm(keys, values, betas),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fwm_memory_gradients_are_the_op_based_ones():
    # The direct steps with their segment-wise recomputation against the op one step at a time.
    rng = np.random.default_rng(1)
    keys, betas = jnp.asarray(rng.uniform(0, 1, (2, 9, 6)), jnp.float32), jnp.asarray(rng.uniform(0, 1, (2, 9, 1)),
                                                                                        jnp.float32)
    values = jnp.eye(4)[rng.integers(0, 4, (2, 9))]
    weights = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)

    def grads(memory):
        return jax.grad(lambda k, b: jnp.sum(memory(k, values, b) * weights), argnums=(0, 1))(keys, betas)

    for ours, op in zip(grads(ar.fwm_memory), grads(ar.fwm_memory_by_op), strict=True):
        np.testing.assert_allclose(ours, op, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the FWM rule is held to the authors' loop by a cheap test; this trains a whole model
def test_fwm_model_trains_a_step_with_finite_gradients():
    batch = ar.make_paper_train_batch(np.random.default_rng(0), 2, 5, 3)
    model = ar.RetrievalModel(5, "dpfp", "fwm", paper_init=True)
    params = model.init(jax.random.key(0), batch.keys, batch.values, batch.queries)["params"]

    def loss(params):
        readout = model.apply({"params": params}, batch.keys, batch.values, batch.queries)
        return ar.retrieval_loss(readout, batch.targets, batch.valid)

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value)) and all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_paper_config_is_the_authors_protocol():
    config = ar.paper_config(2, "dpfp", "delta", 40)
    assert (config.protocol, config.patience, config.max_steps, config.seed) == ("paper", 11, 100_000, 1)
    assert (config.batch_size, config.learning_rate, config.eval_every, config.eval_sequences) == (32, 1e-3, 100, 20)
    with pytest.raises(ValueError, match="protocol"):
        ar.RunConfig(1, "dpfp", "sum", 4, protocol="authors")


def test_full_runs_cover_every_method_at_every_size_of_the_paper():
    runs = list(ar.full_runs(0, None))
    assert len(runs) == 8 * 30 + 7 * 10 and {r.protocol for r in runs} == {"paper"}
    assert {r.max_steps for r in runs} == {ar.PAPER_MAX_STEPS}


# --- the sweep driver ---------------------------------------------------------------------------


def tiny_configs():
    return [pf.Method(1, "dpfp", nu=1).config(4, max_steps=3), pf.Method(2, "linear", "delta").config(3, max_steps=3)]


def test_tiny_sweep_writes_a_row_per_point_and_a_rerun_skips_them(tmp_path, monkeypatch):
    path = tmp_path / "sweep.csv"
    rows = pf.run_sweep(tiny_configs(), path, progress=False)
    with path.open() as f:
        written = list(csv.DictReader(f))
    assert [(r["setting"], r["method"], r["S"], r["seed"], r["steps"], r["max_steps"]) for r in written] == [
        ("1", "dpfp-1 sum", "4", "1", "3", "3"), ("2", "linear delta", "3", "1", "3", "3")]
    assert len(rows) == 2 and all(float(r["final_eval_loss"]) > 0 for r in written)

    def must_not_run(config):
        raise AssertionError(f"{config.label} S={config.num_symbols} is in the CSV and must be skipped")

    before = path.read_text()
    monkeypatch.setattr(pf, "run_point", must_not_run)
    assert len(pf.run_sweep(tiny_configs(), path, progress=False)) == 2
    assert path.read_text() == before


def test_a_sweep_resumes_after_the_rows_it_has(tmp_path, monkeypatch):
    path = tmp_path / "sweep.csv"
    first, second = tiny_configs()
    pf.run_sweep([first], path, progress=False)
    ran = []
    real = pf.run_point
    monkeypatch.setattr(pf, "run_point", lambda config: ran.append(config.label) or real(config))
    rows = pf.run_sweep([first, second], path, progress=False)
    assert ran == ["linear delta"] and len(rows) == 2
    assert [r["method"] for r in pf.read_rows(path)] == ["dpfp-1 sum", "linear delta"]


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="jobs"):
        pf.run_sweep(tiny_configs(), tmp_path / "x.csv", jobs=0)


@pytest.mark.slow
def test_parallel_sweep_gives_the_rows_of_a_serial_one(tmp_path):
    serial = pf.run_sweep(tiny_configs(), tmp_path / "serial.csv", progress=False)
    parallel = pf.run_sweep(tiny_configs(), tmp_path / "parallel.csv", jobs=2, progress=False)
    key = {r["method"]: r["final_eval_loss"] for r in serial}
    # One XLA thread per process may round differently; the points and step counts are the same.
    assert {r["method"]: r["steps"] for r in parallel} == {r["method"]: r["steps"] for r in serial}
    for row in parallel:
        assert float(row["final_eval_loss"]) == pytest.approx(float(key[row["method"]]), rel=1e-3)


def test_budget_grid_is_inside_the_papers_grid_and_includes_each_knee():
    points = pf.grid()
    assert len(points) == len(set(points))
    for method, size in points:
        assert size in pf.PAPER_SIZES[method.setting]
    full = pf.grid(full=True)
    assert set(points) <= set(full) and len(full) == 8 * 30 + 7 * 10
    authors = pf.authors_rows()
    for method in pf.METHODS:
        mine = {s for m, s in points if m == method}
        theirs = [r for r in authors if r["method"] == method.label and int(r["setting"]) == method.setting]
        for column in ("final_eval_loss", "loss_at_3000"):
            cap = pf.capacity(theirs, method.label, column)
            if cap is not None:  # the paper's capacity and the next S are both run, so the knee is seen
                assert cap in mine and (cap + 20 in mine or cap == max(pf.PAPER_SIZES[method.setting])), method


# --- the authors' logs --------------------------------------------------------------------------


def test_authors_log_names_map_to_methods():
    for method in pf.METHODS:
        length = 20 if method.setting == 1 else 40
        name = f"d64_{method.authors_name}_AssocSeq{length}N20R{method.setting - 1}.csv"
        assert pf.method_of_log(name) == (method, 20)
    assert pf.method_of_log("d64_tanh_fwm_AssocSeq40N20R1.csv") is None  # Schlag (2021) with tanh: not run here
    with pytest.raises(ValueError, match="log name"):
        pf.method_of_log("results.csv")


def test_committed_authors_csv_rows_name_their_log():
    rows = pf.authors_rows()
    assert len(rows) > 100
    for row in rows:
        method, size = pf.method_of_log(row["log"].removeprefix("synthetic/logs/"))
        assert (str(method.setting), method.label, str(size)) == (row["setting"], row["method"], row["S"])
        loss = float(row["final_eval_loss"])
        assert math.isnan(loss) or loss >= 0
        assert int(row["steps"]) % 100 == 0


# --- capacity, table, figures -------------------------------------------------------------------


def row(method, size, loss, setting=1, seed=1, seconds="1.0"):
    return dict(setting=setting, method=method, S=size, seed=seed, final_eval_loss=loss, steps=100, seconds=seconds)


def test_capacity_is_the_largest_s_below_the_threshold():
    rows = [row("dpfp-1 sum", 100, "0.0002"), row("dpfp-1 sum", 120, "0.0086"), row("dpfp-1 sum", 140, "0.05"),
            row("dpfp-1 sum", 160, "nan")]
    assert pf.capacity(rows, "dpfp-1 sum") == 120
    assert pf.capacity([row("favor-64 sum", 20, "0.13")], "favor-64 sum") is None


def test_table_says_which_points_are_missing_and_marks_an_open_capacity():
    method = pf.Method(1, "dpfp", nu=1)
    points = [(method, s) for s in (100, 120, 140)]
    ours = [row("dpfp-1 sum", 100, "0.0002", seconds="30.5")]
    authors = [dict(row("dpfp-1 sum", s, loss), loss_at_3000=capped)
               for s, loss, capped in ((100, "0.0002", "0.0002"), (120, "0.0086", "0.0126"), (140, "0.05", "0.056"))]
    table = pf.capacity_table(ours, authors, points, ours)
    line = next(x for x in table.splitlines() if "| dpfp-1 sum |" in x)
    assert line == "| 1 | dpfp-1 sum | 100 (incomplete) | 100 | 120 | 1/3 | 30 | 120, 140 |"
    assert "| 1 | linear sum | - | no log | no log | 0/0 | 0 | none |" in table


def test_extra_seeds_are_reported_not_drawn():
    rows = [row("dpfp-1 sum", 120, "0.02", seed=2), row("dpfp-1 sum", 120, "0.008", seed=1)]
    assert [r["seed"] for r in pf.first_seed_rows(rows)] == [1]


def test_figures_draw_ours_solid_and_the_paper_dashed_in_the_same_colour():
    import matplotlib.pyplot as plt

    ours = [row("dpfp-1 sum", 100, "0.0002"), row("dpfp-1 sum", 140, "0.06")]
    authors = [row("dpfp-1 sum", 100, "0.0003"), row("dpfp-1 sum", 140, "0.05")]
    ours2 = [row("dpfp-1 delta", 20, "0.0", setting=2), row("dpfp-1 delta", 40, "nan", setting=2)]
    fig1 = pf.plot_setting(1, ours, authors, {(1, "dpfp-1 sum"): [120]})
    fig2 = pf.plot_setting(2, ours2, [], {})
    try:
        lines = [line for line in fig1.axes[0].get_lines() if list(line.get_xdata()) == [100, 140]]
        (dashed,) = [x for x in lines if x.get_linestyle() == "--"]
        (solid,) = [x for x in lines if x.get_linestyle() == "-"]
        assert list(dashed.get_ydata()) == [0.0003, 0.05] and list(solid.get_ydata()) == [0.0002, 0.06]
        assert solid.get_color() == dashed.get_color()
        legend = [t.get_text() for t in fig1.axes[0].get_legend().get_texts()]
        assert legend.count("dpfp-1 sum (1 of its points missing)") == 1 and "the paper (authors' logs)" in legend
        assert fig1.axes[0].get_yscale() == "linear" and fig2.axes[0].get_yscale() == "log"
        (drawn,) = [x for x in fig2.axes[0].get_lines() if list(x.get_xdata()) == [20, 40]]
        assert drawn.get_ydata()[0] == ar.PLOT_FLOOR  # 0 on the log axis's floor
        (nan,) = [x for x in fig2.axes[0].get_lines() if x.get_marker() == "x" and list(x.get_xdata()) == [40]]
        assert nan.get_color() == drawn.get_color()  # the diverged point, at the top
    finally:
        plt.close(fig1)
        plt.close(fig2)


def test_draw_writes_both_figures_and_the_docs_table(tmp_path):
    sweep = tmp_path / "sweep.csv"
    pf.write_rows([row("linear sum", 40, "0.0008", seconds="5400")], sweep, pf.SWEEP_COLUMNS)
    page = tmp_path / "page.md"
    page.write_text(f"# title\n\n{pf.TABLE_BEGIN}\nold\n{pf.TABLE_END}\n\nafter\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# r\n{pf.README_BEGIN}\nold\n{pf.README_END}\n")
    table = pf.draw(sweep, tmp_path / "figures", pf.grid(), docs_page=page, readme=readme)
    short = readme.read_text()  # the short table: linear's capacity here, the rest not run yet
    assert "old" not in short and "| 1 | linear sum | 40 (so far) | 40 | 40 | 5400 |" in short, short
    assert "| 1 | dpfp-3 sum | - | 340 | 380 | 0 |" in short, short
    assert (tmp_path / "figures" / "setting1.png").stat().st_size > 10_000
    assert (tmp_path / "figures" / "setting2.png").stat().st_size > 10_000
    text = page.read_text()
    assert "old" not in text and table in text and text.endswith(f"{pf.TABLE_END}\n\nafter\n")
    assert table.startswith(f"1 of the grid's {len(pf.grid())} points have run (CSV rows, extra seeds included: 1).")
    assert f"| | all, one run after another | | | | 1/{len(pf.grid())} | 5400 | |" in table
    page.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        pf.write_docs_table(table, page)


def test_the_committed_tables_are_what_the_script_writes_from_the_committed_csv(tmp_path):
    # The tables in docs/paper_figures.md and the README are the script's output (the figures check
    # leaves such regions out), so they must be exactly what it writes from the committed CSV now.
    page, readme = tmp_path / "page.md", tmp_path / "README.md"
    shutil.copy(pf.DOCS_PAGE, page)
    shutil.copy(pf.ROOT / "README.md", readme)
    pf.draw(pf.SWEEP_CSV, tmp_path / "figures", pf.grid(), docs_page=page, readme=readme)
    assert page.read_text() == pf.DOCS_PAGE.read_text(), "run examples/paper_figures.py to redraw"
    assert readme.read_text() == (pf.ROOT / "README.md").read_text(), "run examples/paper_figures.py"


def test_fresh_needs_run(capsys):
    with pytest.raises(SystemExit):
        pf.parse_args(["--fresh"])
    assert "--run" in capsys.readouterr().err


def test_extra_seeds_of_chosen_points_and_their_table():
    args = pf.parse_args(["--run", "--setting", "1", "--method", "dpfp-1 sum", "--sizes", "120,140", "--seeds", "2,3"])
    configs = pf.chosen_configs(args)
    assert [(c.label, c.num_symbols, c.seed, c.setting) for c in configs] == [
        ("dpfp-1 sum", 120, 2, 1), ("dpfp-1 sum", 120, 3, 1), ("dpfp-1 sum", 140, 2, 1), ("dpfp-1 sum", 140, 3, 1)]
    assert len(pf.chosen_configs(pf.parse_args(["--run"]))) == len(pf.grid())
    rows = [row("dpfp-1 sum", 120, "0.0086", seed=1), row("dpfp-1 sum", 120, "0.02", seed=3),
            row("dpfp-1 sum", 120, "0.009", seed=2), row("dpfp-1 sum", 140, "0.05")]
    assert pf.seed_table(rows).splitlines()[-1] == "| 1 | dpfp-1 sum | 120 | 1: 0.0086, 2: 0.009, 3: 0.02 |"
    assert pf.seed_table(rows[-1:]) == ""


@pytest.mark.parametrize("argv, message", [
    (["--setting", "1", "--method", "dpfp-1 sum", "--sizes", "120"], "with --run"),
    (["--run", "--method", "dpfp-1 sum", "--sizes", "120"], "go together"),
    (["--run", "--seeds", "2"], "--seeds goes with"),
    (["--run", "--setting", "2", "--method", "dpfp-3 sum", "--sizes", "20"], "--method: setting 2 has"),
    (["--run", "--setting", "2", "--method", "dpfp-1 delta", "--sizes", "220"], "--sizes: setting 2"),
])
def test_bad_point_choices_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        pf.parse_args(argv)
    assert message in capsys.readouterr().err
