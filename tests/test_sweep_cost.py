"""What the paper-figures sweep costs (benchmarks/sweep_cost.py): the estimate's arithmetic, the
evaluation count it assumes against train()'s own loop, the capacity table's idle-machine column,
and the script itself on a tiny CSV (run as the script it is, ``python -m benchmarks.sweep_cost``)."""

import subprocess
import sys

import pytest

from examples import associative_retrieval as ar
from examples import paper_figures as pf
from tests.helpers import REPO_ROOT

# --- the arithmetic -----------------------------------------------------------------------------


def test_evaluations_are_one_per_interval_and_one_at_an_early_end():
    assert [ar.evaluations_made(steps, 100) for steps in (1, 99, 100, 101, 2350, 3000)] == [1, 1, 1, 2, 24, 30]
    assert ar.evaluations_made(7, 3) == 3
    with pytest.raises(ValueError, match="steps and eval_every must be at least 1; got steps=0"):
        ar.evaluations_made(0, 100)


class CountingTrainer:
    """Stands in for ar.Trainer in train(): no model, a constant evaluation loss, calls counted."""

    evaluations = 0

    def __init__(self, config):
        CountingTrainer.evaluations = 0

    def step(self):
        return 0.5

    def evaluation_loss(self):
        CountingTrainer.evaluations += 1
        return 0.5


@pytest.mark.parametrize("max_steps, patience, steps", [(250, 100, 250), (1000, 3, 400), (3000, 100, 3000)])
def test_train_makes_the_evaluations_the_estimate_counts(monkeypatch, max_steps, patience, steps):
    monkeypatch.setattr(ar, "Trainer", CountingTrainer)
    config = ar.RunConfig(1, "linear", "sum", 4, max_steps=max_steps, patience=patience, eval_every=100)
    row = ar.train(config, progress=False)
    assert row["steps"] == steps  # a constant loss: no new best after the first, so patience stops it
    assert CountingTrainer.evaluations == ar.evaluations_made(steps, config.eval_every)


def test_the_estimate_is_the_first_step_then_the_steady_steps_and_evaluations():
    # 1 first (compiles) + 2999 steps of 2 ms + 29 more evaluations of 50 ms
    assert pf.estimated_seconds(1.0, 0.002, 0.05, steps=3000, eval_every=100) == pytest.approx(1 + 5.998 + 1.45)
    assert pf.estimated_seconds(3.0, 0.5, 9.0, steps=1, eval_every=100) == 3.0  # one step: the first alone


def test_two_workers_take_the_runs_in_order_when_free():
    assert pf.makespan([3, 3, 3, 3], jobs=2) == 6
    assert pf.makespan([1, 1, 8], jobs=2) == 9  # the long run last waits for nothing but starts late
    assert pf.makespan([8, 1, 1], jobs=2) == 8
    assert pf.makespan([2, 5, 1], jobs=1) == 8
    with pytest.raises(ValueError, match="jobs must be at least 1; got 0"):
        pf.makespan([1], jobs=0)


# --- the capacity table -------------------------------------------------------------------------


def sweep_row(method, size, seed=1, seconds="10.0", setting=1):
    return dict(setting=setting, method=method, S=size, seed=seed, final_eval_loss="0.0005", steps=300,
                seconds=seconds, max_steps=3000)


def test_the_table_gives_the_idle_estimate_beside_the_shared_runtime():
    method = pf.Method(1, "dpfp", nu=1)
    points = [(method, s) for s in (100, 120)]
    rows = [sweep_row("dpfp-1 sum", 100, seconds="30.5"), sweep_row("dpfp-1 sum", 120, seconds="40.0"),
            sweep_row("dpfp-1 sum", 120, seed=2, seconds="50.0")]
    without = pf.capacity_table(rows[:2], [], points, rows)
    assert without.splitlines()[0].count("|") == 9 and "runtime, shared machine (s)" in without
    assert "idle estimate" not in without
    costs = {pf.row_key(rows[0]): 3.25, pf.row_key(rows[1]): 4.0}
    table = pf.capacity_table(rows[:2], [], points, rows, costs)
    assert "| runtime, shared machine (s) | idle estimate (s) | missing S |" in table.splitlines()[0]
    line = next(x for x in table.splitlines() if "| dpfp-1 sum |" in x)
    assert line == "| 1 | dpfp-1 sum | 120 | no log | no log | 2/2 | 120 | 7 (2 of 3 rows) | none |"
    assert table.splitlines()[-1] == "| | all, one run after another | | | | 2/2 | 120 | 7 (2 of 3 rows) | |"
    costs[pf.row_key(rows[2])] = 5.0
    short = pf.readme_table(rows[:2], [], points, rows, costs)
    assert "| 1 | dpfp-1 sum | 120 | no log | no log | 120 | 12 |" in short
    assert "| 1 | linear sum | - | no log | no log | 0 | - |" in short


def test_the_committed_sweep_is_drawn_with_the_committed_costs(tmp_path, monkeypatch):
    sweep, cost = tmp_path / "sweep.csv", tmp_path / "cost.csv"
    monkeypatch.setattr(pf, "SWEEP_CSV", sweep)  # stand-ins for the committed CSVs
    monkeypatch.setattr(pf, "COST_CSV", cost)
    rows = [sweep_row("linear sum", 40, seconds="5400")]
    pf.write_rows(rows, sweep, pf.SWEEP_COLUMNS)
    pf.write_rows([dict(rows[0], steps=300, evaluations=3, setup_s="2.0", first_s="3.0", step_ms="1.0",
                        eval_ms="2.0", estimate_s="3.3", threads="all")], cost, pf.COST_COLUMNS)
    table = pf.draw(sweep, tmp_path / "figures", pf.grid(), docs_page=None)  # no cost_csv: the committed one
    line = next(x for x in table.splitlines() if "| linear sum |" in x)
    assert "| 1/8 | 5400 | 3 | 20, 60," in line, line
    assert "| 5400 | 3 | |" in table.splitlines()[-1]
    # The row rerun since (another step count): its estimate is stale, so none is shown.
    pf.write_rows([dict(rows[0], steps=400)], sweep, pf.SWEEP_COLUMNS)
    table = pf.draw(sweep, tmp_path / "figures", pf.grid(), docs_page=None)
    assert "idle estimate" not in table and table.splitlines()[-1].endswith("| 5400 | |")


# --- the script ---------------------------------------------------------------------------------


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.sweep_cost", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


def tiny_sweep(path):
    rows = [dict(sweep_row("linear sum", 3, seconds="12.5"), steps=150, max_steps=3),
            dict(sweep_row("linear sum", 3, seed=2, seconds="1.5"), steps=50, max_steps=3)]
    pf.write_rows(rows, path, pf.SWEEP_COLUMNS)


@pytest.mark.slow  # a process that imports jax and compiles a model: 4 to 6 s
def test_the_script_estimates_each_row_and_writes_its_csv_and_report(tmp_path):
    sweep, cost, report = tmp_path / "sweep.csv", tmp_path / "cost.csv", tmp_path / "report.md"
    tiny_sweep(sweep)
    result = run_script("--csv", str(sweep), "--rounds", "1", "--round-seconds", "0.001", "--out-csv", str(cost),
                        "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("command: python -m benchmarks.sweep_cost") and "load average at end:" in out, out
    first, second = pf.read_rows(cost)
    assert [(r["S"], r["seed"], r["steps"], r["evaluations"], r["threads"]) for r in (first, second)] == [
        ("3", "1", "150", "2", "all"), ("3", "2", "50", "1", "all")]
    for r in (first, second):  # the estimate is the CSV's arithmetic on the measured pieces
        pieces = [float(r[k]) for k in ("first_s", "step_ms", "eval_ms")]
        assert all(p > 0 for p in pieces) and float(r["setup_s"]) > 0
        want = pf.estimated_seconds(pieces[0], pieces[1] / 1e3, pieces[2] / 1e3, int(r["steps"]), 100)
        assert float(r["estimate_s"]) == pytest.approx(want, abs=0.06)
    # seed 2 reuses seed 1's measurement (the same shapes)
    pieces = ("setup_s", "first_s", "step_ms", "eval_ms")
    assert [first[k] for k in pieces] == [second[k] for k in pieces]
    total = float(first["estimate_s"]) + float(second["estimate_s"])
    assert f"Total, 2 rows: estimate {total:.0f} s" in out and "the CSV's seconds (shared machine): 14 s" in out, out
    assert "| 1 | linear sum | 2 |" in out and "With --jobs 2: not estimated" in out, out
    text = report.read_text()
    assert text.startswith("# What the paper-figures sweep costs") and "**a subset**" not in text
    assert "```text\ncommand: python -m benchmarks.sweep_cost" in text and "| 1 | linear sum | 3 | 2 | 50 | 1 |" in text
    assert "measured setting" not in text  # progress lines stay out of the report


@pytest.mark.slow  # two processes that import jax to say no
def test_a_filter_that_matches_nothing_a_missing_output_and_a_bad_check_are_refused(tmp_path):
    sweep = tmp_path / "sweep.csv"
    tiny_sweep(sweep)
    result = run_script("--csv", str(sweep), "--method", "dpfp-1 sum", "--out-csv", str(tmp_path / "c.csv"),
                        "--report", str(tmp_path / "r.md"))
    assert result.returncode == 1 and "no row of" in result.stderr, result.stderr
    # a part of the sweep, or another CSV, must not overwrite the committed measurement
    result = run_script("--csv", str(sweep))
    assert result.returncode == 2 and "--out-csv is required" in result.stderr, result.stderr
    result = run_script("--csv", str(sweep), "--check", "1,linear sum")
    assert result.returncode == 2 and "SETTING,METHOD,S" in result.stderr, result.stderr


@pytest.mark.slow  # a point run to the end in a second process: a few compiles more
def test_one_thread_gives_the_two_job_figure_and_check_runs_the_point(tmp_path):
    sweep, cost, report = tmp_path / "sweep.csv", tmp_path / "cost.csv", tmp_path / "report.md"
    tiny_sweep(sweep)
    result = run_script("--csv", str(sweep), "--rounds", "1", "--round-seconds", "0.001", "--threads", "1",
                        "--sizes", "3", "--check", "1,linear sum,3", "--out-csv", str(cost), "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    assert {r["threads"] for r in pf.read_rows(cost)} == {"1"}
    assert "With --jobs 2 (these rows in the sweep's order, each process with its XLA flags" in out, out
    # the check: 3 steps (the row's cap), measured and estimated
    assert "run to the end with train() in a fresh process: 3 steps (the CSV's: 150)" in out, out
    line = next(x for x in out.splitlines() if x.startswith("| train()'s seconds |"))
    measured, estimated, ratio = (float(c) for c in line.strip("|").split("|")[1:])
    assert measured >= 0 and estimated > 0 and ratio == pytest.approx(measured / estimated, abs=0.01 + 0.1 / estimated)
    assert "**a subset**" in report.read_text()
