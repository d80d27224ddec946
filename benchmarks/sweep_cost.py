"""What the committed paper-figures sweep costs on this machine, with the code as it is now.

The sweep CSV's ``seconds`` (docs/reports/paper_figures/sweep.csv) are what each point took while
the machine was shared, some of them with an older, slower form of the model; this estimates
each row's seconds afresh without running it to the end. For every row (every seed) it builds the
point's trainer (``associative_retrieval.Trainer``, the pieces ``train()`` runs) and times:

- setup: the model, its parameters and Adam state, the first batch (before ``train()``'s clock);
- first: the first training step and the first evaluation, each waited for (compiles included);
- step: the median over ``--rounds`` rounds of the seconds per step, a round being as many steps
  as take ``--round-seconds`` (one at least), dispatched back to back as ``train()`` does (batch
  drawing included, waited for at the round's end);
- evaluation: the median of ``--rounds`` evaluations (the authors' protocol draws new data for each).

The row's estimate of ``train()``'s seconds is ``first + (steps - 1) step + (evaluations - 1)
evaluation`` (``paper_figures.estimated_seconds``), ``steps`` from the CSV row. Rows of the same
(setting, method, S) with other seeds reuse the first one's measurement (a step does the same work
whatever its random numbers). ``--threads 1`` measures with the XLA flags ``--jobs 2`` gives each of
its processes (``paper_figures.ONE_THREAD_XLA_FLAGS``: Eigen's thread pool off); only then is the
two-job wall time printed (the rows' costs packed in the
sweep's order onto two workers, assuming the two single-threaded processes do not slow each other).
``--check`` also runs one point to the end with ``train()`` and prints its seconds beside the estimate.

    python -m benchmarks.sweep_cost                                   # every row: CSV and report
    python -m benchmarks.sweep_cost --threads 1                       # the same, as each of --jobs 2's processes
    python -m benchmarks.sweep_cost --setting 1 --method "linear sum" --sizes 20,40 \\
        --check "1,linear sum,20" --out-csv /tmp/cost.csv --report /tmp/sweep_cost.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import math
import multiprocessing
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

import jax

from benchmarks.common import reported_run
from examples import associative_retrieval as ar
from examples import paper_figures as pf
from examples.arguments import integer, integers

REPORT = pf.ROOT / "docs" / "reports" / "sweep_cost.md"
# With --threads 1 (what each of --jobs 2's processes runs) the measurement has files of its own:
# the capacity tables' idle estimate is the default run's, as `make paper-figures` runs one job.
JOBS2_CSV = pf.REPORTS / "cost_jobs2.csv"
JOBS2_REPORT = pf.ROOT / "docs" / "reports" / "sweep_cost_jobs2.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=pf.SWEEP_CSV, help="the sweep's rows (default: the committed CSV)")
    parser.add_argument("--setting", type=int, choices=(1, 2), help="only this setting's rows")
    parser.add_argument("--method", help="only this method's rows (its label, e.g. 'dpfp-1 sum')")
    parser.add_argument("--sizes", type=integers(1), help="only these S (comma-separated)")
    parser.add_argument("--rounds", type=integer(1), default=3, help="timed rounds of steps, and timed evaluations")
    parser.add_argument("--round-seconds", type=float, default=0.2,
                        help="a round has as many steps as take this long (one at least)")
    parser.add_argument("--threads", choices=("all", "1"), default="all",
                        help="all: XLA's default threads (as one job runs); 1: the XLA flags each of --jobs 2's "
                             "processes gets")
    parser.add_argument("--check", type=_point, metavar="SETTING,METHOD,S",
                        help="also run this row's point with train() and print its seconds beside the estimate")
    parser.add_argument("--out-csv", type=Path,
                        help=f"the estimates, one row per sweep row (default, for every row of the committed "
                             f"CSV only: {pf.COST_CSV.relative_to(pf.ROOT)}, with --threads 1 "
                             f"{JOBS2_CSV.relative_to(pf.ROOT)})")
    parser.add_argument("--report", type=Path,
                        help=f"the markdown report (default, for every row of the committed CSV only: "
                             f"{REPORT.relative_to(pf.ROOT)}, with --threads 1 {JOBS2_REPORT.relative_to(pf.ROOT)})")
    args = parser.parse_args(argv)
    if args.round_seconds <= 0:
        parser.error(f"--round-seconds must be above 0; got {args.round_seconds}")
    # The committed files hold a measurement of the whole committed sweep: a part of it, or
    # another CSV, must say where its results go instead of overwriting them.
    whole = args.csv.resolve() == pf.SWEEP_CSV.resolve() and (args.setting, args.method, args.sizes) == (None,) * 3
    defaults = (pf.COST_CSV, REPORT) if args.threads == "all" else (JOBS2_CSV, JOBS2_REPORT)
    for name, default in zip(("out_csv", "report"), defaults, strict=True):
        if getattr(args, name) is None:
            if not whole:
                parser.error(f"--{name.replace('_', '-')} is required unless every row of the committed sweep CSV "
                             f"is measured (--csv, --setting, --method or --sizes was given)")
            setattr(args, name, default)
    return args


def _point(text: str) -> tuple[int, str, int]:
    parts = text.split(",")
    if len(parts) != 3 or not parts[0].strip().isdigit() or not parts[2].strip().isdigit():
        raise argparse.ArgumentTypeError(f"SETTING,METHOD,S, e.g. '1,linear sum,20'; got {text!r}")
    return int(parts[0]), parts[1].strip(), int(parts[2])


def row_config(row: dict) -> ar.RunConfig:
    """The run a sweep row is: its method at its S, seed and step cap, under the authors' protocol."""
    return pf.method_named(int(row["setting"]), row["method"]).config(int(row["S"]), seed=int(row["seed"]),
                                                                max_steps=int(row["max_steps"]))


def measure(config: ar.RunConfig, rounds: int, round_seconds: float) -> dict[str, float]:
    """Seconds of a point's pieces (module docstring): setup, first, step, evaluation."""
    start = time.perf_counter()
    trainer = ar.Trainer(config)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(trainer.step())
    trainer.evaluation_loss()
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(trainer.step())
    per_round = max(1, math.ceil(round_seconds / (time.perf_counter() - start)))
    steps = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            loss = trainer.step()  # not waited for, as in train(): the next batch is drawn meanwhile
        jax.block_until_ready(loss)
        steps.append((time.perf_counter() - start) / per_round)
    evaluations = []
    for _ in range(rounds):
        start = time.perf_counter()
        trainer.evaluation_loss()
        evaluations.append(time.perf_counter() - start)
    return dict(setup=setup, first=first, step=statistics.median(steps), evaluation=statistics.median(evaluations))


def cost_row(row: dict, config: ar.RunConfig, pieces: dict[str, float], threads: str) -> dict:
    steps = int(row["steps"])
    return dict(setting=row["setting"], method=row["method"], S=row["S"], seed=row["seed"], steps=steps,
                evaluations=ar.evaluations_made(steps, config.eval_every), setup_s=f"{pieces['setup']:.2f}",
                first_s=f"{pieces['first']:.2f}", step_ms=f"{pieces['step'] * 1e3:.2f}",
                eval_ms=f"{pieces['evaluation'] * 1e3:.2f}",
                estimate_s=f"{pf.estimated_seconds(pieces['first'], pieces['step'], pieces['evaluation'], steps,
                                                   config.eval_every):.1f}", threads=threads)


def chosen_rows(args: argparse.Namespace) -> list[dict]:
    rows = [r for r in pf.read_rows(args.csv)
            if (args.setting is None or int(r["setting"]) == args.setting)
            and (args.method is None or r["method"] == args.method)
            and (args.sizes is None or int(r["S"]) in args.sizes)]
    if not rows:
        raise SystemExit(f"no row of {args.csv} matches --setting/--method/--sizes")
    return rows


def sweep_order(rows: list[dict]) -> list[dict]:
    """The rows in the order ``--run`` takes the grid's points (extra seeds and points off the grid after)."""
    order = {(m.setting, m.label, s): i for i, (m, s) in enumerate(pf.grid())}
    return sorted(rows, key=lambda r: (int(r["seed"]) != ar.PAPER_SEED,
                                       order.get((int(r["setting"]), r["method"], int(r["S"])), len(order))))


def print_tables(rows: list[dict], costs: list[dict], threads: str) -> None:
    shared = {pf.row_key(r): float(r["seconds"]) for r in rows}
    print("\nPer row (s: seconds; the last column is the sweep CSV's, on the shared machine):\n")
    print("| setting | method | S | seed | steps | evaluations | setup s | first step + evaluation s | step ms "
          "| evaluation ms | estimate s | CSV seconds |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in costs:
        print(f"| {c['setting']} | {c['method']} | {c['S']} | {c['seed']} | {c['steps']} | {c['evaluations']} "
              f"| {c['setup_s']} | {c['first_s']} | {c['step_ms']} | {c['eval_ms']} | {c['estimate_s']} "
              f"| {shared[pf.row_key(c)]:.1f} |")
    print("\nPer method:\n")
    print("| setting | method | rows | first steps + evaluations s (compiles) | estimate s | CSV seconds |")
    print("|---:|---|---:|---:|---:|---:|")
    by_method: dict[tuple[int, str], list[dict]] = {}
    for c in costs:
        by_method.setdefault((int(c["setting"]), c["method"]), []).append(c)
    order = {(m.setting, m.label): i for i, m in enumerate(pf.METHODS)}
    for (setting, method), group in sorted(by_method.items(), key=lambda item: order.get(item[0], len(order))):
        print(f"| {setting} | {method} | {len(group)} | {sum(float(c['first_s']) for c in group):.0f} "
              f"| {sum(float(c['estimate_s']) for c in group):.0f} "
              f"| {sum(shared[pf.row_key(c)] for c in group):.0f} |")
    estimate = sum(float(c["estimate_s"]) for c in costs)
    setup = sum(float(c["setup_s"]) for c in costs)
    thread_text = "XLA's default threads" if threads == "all" else "with --jobs 2's XLA flags"
    print(f"\nTotal, {len(costs)} rows: estimate {estimate:.0f} s ({estimate / 3600:.2f} hours) of train()'s "
          f"seconds, one run after another, {thread_text}; setup (outside train()'s seconds) {setup:.0f} s more; "
          f"the CSV's seconds (shared machine): {sum(shared.values()):.0f} s.")
    # What `make paper-figures FRESH=1` reruns: the grid's points, first seed only.
    grid = {(m.setting, m.label, size) for m, size in pf.grid()}
    fresh = [c for c in costs if int(c["seed"]) == ar.PAPER_SEED
             and (int(c["setting"]), c["method"], int(c["S"])) in grid]
    fresh_estimate = sum(float(c["estimate_s"]) for c in fresh)
    print(f"Of these, the grid's points with the first seed (what a fresh sweep runs), {len(fresh)} rows: "
          f"estimate {fresh_estimate:.0f} s ({fresh_estimate / 3600:.2f} hours), setup "
          f"{sum(float(c['setup_s']) for c in fresh):.0f} s more.")
    if threads == "1":
        for text, chosen in (("these rows", costs), ("the grid's first-seed rows", fresh)):
            ordered = sweep_order(chosen)
            wall = pf.makespan([float(c["estimate_s"]) + float(c["setup_s"]) for c in ordered], jobs=2)
            print(f"With --jobs 2 ({text} in the sweep's order, each process with its XLA flags, setup included, "
                  f"the two processes assumed not to slow each other): {wall:.0f} s ({wall / 3600:.2f} hours) "
                  "of wall time.")
    else:
        print("With --jobs 2: not estimated (measure with --threads 1, as each of its processes runs).")


def timed_train(config: ar.RunConfig) -> tuple[dict, float]:
    """train()'s row for ``config`` and the seconds of the whole call (setup included)."""
    start = time.perf_counter()
    row = ar.train(config, progress=False)
    return row, time.perf_counter() - start


def check(point: tuple[int, str, int], args: argparse.Namespace, measured: dict[tuple[int, str, int], dict]) -> None:
    """Run one row's point to the end with train(), in a fresh process (so that nothing of it is
    compiled already, as in the sweep), and print its seconds beside the estimate."""
    setting, label, size = point
    matching = [r for r in pf.read_rows(args.csv) if (int(r["setting"]), r["method"], int(r["S"])) == point]
    if not matching:
        raise SystemExit(f"--check: no row of {args.csv} is setting {setting}, {label!r}, S = {size}")
    row = min(matching, key=lambda r: int(r["seed"]))
    config = row_config(row)
    if point not in measured:
        measured[point] = measure(config, args.rounds, args.round_seconds)
    pieces = measured[point]
    context = multiprocessing.get_context("spawn")  # jax is not fork-safe; the child gets this XLA_FLAGS
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        result, wall = pool.submit(timed_train, config).result()
    steps = int(result["steps"])
    estimate = pf.estimated_seconds(pieces["first"], pieces["step"], pieces["evaluation"], steps, config.eval_every)
    measured_s = float(result["seconds"])
    print(f"\nCheck: setting {setting}, {label}, S = {size}, seed {row['seed']}, run to the end with train() in a "
          f"fresh process: {steps} steps (the CSV's: {row['steps']}), final loss {result['final_eval_loss']} (the "
          f"CSV's: {row['final_eval_loss']}); estimated for {steps} steps from this run's measurement.\n")
    print("| | train() measured s | estimated s | measured / estimated |")
    print("|---|---:|---:|---:|")
    print(f"| train()'s seconds | {measured_s:.1f} | {estimate:.1f} | {measured_s / estimate:.2f} |")
    print(f"| the whole call (setup included) | {wall:.1f} | {estimate + pieces['setup']:.1f} "
          f"| {wall / (estimate + pieces['setup']):.2f} |")


class _Tee(io.TextIOBase):
    """Writes to stdout and keeps a copy (the report is what was printed)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        return self.copy.write(text)

    def flush(self) -> None:
        self.stream.flush()


def report_text(printed: str, args: argparse.Namespace) -> str:
    """The markdown report: a header, then what was printed (the run's header lines as text)."""
    lines = printed.splitlines()
    head = [x for x in lines if x.split(":", 1)[0] in ("command", "machine", "date")
            or x.startswith("load average (1 / 5 / 15 min) at start")]
    tail = [x for x in lines if x.startswith("load average at end")]
    body = [x for x in lines if x not in head and x not in tail and not x.startswith("measured ")]
    whole = args.setting is None and args.method is None and args.sizes is None
    scope = ("every row of the sweep CSV" if whole
             else "**a subset** of the sweep CSV's rows (the command's --setting, --method, --sizes), not all")
    intro = textwrap.fill(
        "Output of `python -m benchmarks.sweep_cost`, kept as printed: for " + scope + " "
        "([the paper's figures](../paper_figures.md)), the estimate of the seconds `train()` takes for the row's "
        "steps with the code as it is now, from its first step and evaluation (compiles included) and the median "
        "of its later steps and evaluations (`benchmarks/sweep_cost.py` says how). The load average below says "
        "whether the machine was idle; the CSV's seconds, beside, were measured while it was shared.", width=100,
        break_long_words=False, break_on_hyphens=False)
    return "\n".join(["# What the paper-figures sweep costs", "", intro, "", "```text", *head, "```", *body, "",
                      "```text", *tail, "```", ""])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads == "1":
        from jax._src import xla_bridge  # the flags are read when the backend starts: it must not have yet

        if xla_bridge.backends_are_initialized():
            raise RuntimeError("--threads 1: the XLA backend has started; the flags would not apply")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {pf.ONE_THREAD_XLA_FLAGS}".strip()
    rows = chosen_rows(args)
    for row in rows:
        pf.method_named(int(row["setting"]), row["method"])  # every row names a method before any is timed
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee), reported_run():
        costs, measured = [], {}  # a point's pieces, by (setting, method, S)
        for row in rows:
            config = row_config(row)
            point = (config.setting, config.label, config.num_symbols)
            if point not in measured:
                measured[point] = measure(config, args.rounds, args.round_seconds)
                print(f"measured setting {point[0]} {point[1]} S={point[2]}: "
                      f"{cost_row(row, config, measured[point], args.threads)['estimate_s']} s", flush=True)
            costs.append(cost_row(row, config, measured[point], args.threads))
        pf.write_rows(costs, args.out_csv, pf.COST_COLUMNS)
        print_tables(rows, costs, args.threads)
        if args.check is not None:
            check(args.check, args, measured)
        print()
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report_text(tee.copy.getvalue(), args))
    print(f"wrote {args.out_csv} and {args.report}")


if __name__ == "__main__":
    main()
