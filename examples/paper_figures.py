"""The paper's synthetic figures in full (Schlag et al. 2021, Sec. 6.1, Figures 2 and 3).

Final evaluation loss against the number of keys S for every feature map and update rule the
paper compares, trained with the authors' protocol (``RunConfig(protocol="paper")`` of
``associative_retrieval.py``; docs/paper_figures.md says what it is and where each part comes
from), one run per (setting, method, S), drawn beside the authors' own final losses (their
published logs, ``docs/reports/paper_figures/authors_final.csv``).

The sweep is resumable: every finished run is a row of ``--csv`` (written after each run), and a
rerun skips the rows it finds. Points run in ``--jobs`` processes; a progress bar gives an ETA
weighted by each point's expected cost (the authors' step count times the work of one step).

    python examples/paper_figures.py                    # redraw figures and table from the CSV (seconds)
    python examples/paper_figures.py --run --jobs 2     # run the grid's missing points, then redraw
    python examples/paper_figures.py --run --fresh      # forget the CSV's rows and rerun everything
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

if __package__:  # imported as examples.paper_figures (the tests), or run with python -m
    from . import associative_retrieval as ar
    from .arguments import HelpFormatter, integer, integers
else:  # python examples/paper_figures.py: Python puts examples/ first on the module path
    import associative_retrieval as ar
    from arguments import HelpFormatter, integer, integers

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "docs" / "reports" / "paper_figures"
SWEEP_CSV = REPORTS / "sweep.csv"
# benchmarks/sweep_cost.py's estimate of each sweep row's seconds on an idle machine.
COST_CSV = REPORTS / "cost.csv"
AUTHORS_CSV = REPORTS / "authors_final.csv"
DOCS_PAGE = ROOT / "docs" / "paper_figures.md"
TABLE_BEGIN = "<!-- capacity table: written by examples/paper_figures.py from the CSVs; edits here are overwritten -->"
TABLE_END = "<!-- end of the capacity table -->"
README_BEGIN = "<!-- capacities: written by examples/paper_figures.py from the CSVs; edits here are overwritten -->"
README_END = "<!-- end of the capacities -->"

# Capacity: the largest S whose final evaluation loss is below this (the definition).
CAPACITY_LOSS = 0.01
# The step cap of the budget sweep (the authors': 100 000). Their runs near a knee took up to
# 14 400 steps, which at S = 400 is hours each on a 2-core CPU; the authors' loss at this step is
# in their CSV's loss_at_3000, so both sides are compared under the same cap.
BUDGET_MAX_STEPS = 3000

SWEEP_COLUMNS = ("setting", "method", "S", "seed", "final_eval_loss", "steps", "seconds", "max_steps")
# loss_at_3000: the log's evaluation loss at step 3000 (its last for a shorter run), what the
# authors' run would have ended with under this sweep's step cap.
AUTHORS_COLUMNS = ("setting", "method", "S", "final_eval_loss", "steps", "loss_at_3000", "log")
# A point's estimated cost (benchmarks/sweep_cost.py): setup (model, parameters, first batch:
# before train()'s clock starts), the first step and first evaluation (compiles included), the
# median step and evaluation after them, the evaluations train() makes in `steps` steps, the
# estimate of train()'s seconds, and the XLA threads it was measured with ("all" or "1").
COST_COLUMNS = ("setting", "method", "S", "seed", "steps", "evaluations", "setup_s", "first_s", "step_ms", "eval_ms",
                "estimate_s", "threads")
# What run_sweep gives each process when it runs points in parallel: Eigen's thread pool off, so
# the jobs share the cores instead of each taking all of them.
ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"


@dataclasses.dataclass(frozen=True)
class Method:
    """One line of a figure: a feature map and update rule in one setting."""

    setting: int
    feature_map: str
    rule: str = "sum"
    nu: int = 1
    features: int = 64

    @property
    def label(self) -> str:
        return self.config(20).label

    @property
    def authors_name(self) -> str:
        """How the authors' log files name it (``d64_<this>_AssocSeq<L>N<S>R<0|1>.csv``)."""
        if self.feature_map == "softmax":
            return "softmax_cat"
        name = {"dpfp": f"dpfp{self.nu}", "favor": f"favor{self.features}"}.get(self.feature_map, self.feature_map)
        return f"{name}_{'ours' if self.rule == 'delta' else self.rule}"

    def config(self, num_symbols: int, *, seed: int = ar.PAPER_SEED, max_steps: int = ar.PAPER_MAX_STEPS
               ) -> ar.RunConfig:
        return ar.paper_config(self.setting, self.feature_map, self.rule, num_symbols, self.nu, self.features,
                               seed=seed, max_steps=max_steps)

    def rows(self, rows: Iterable[dict]) -> list[dict]:
        """The CSV rows (ours or the authors') of this method."""
        label = self.label
        return [r for r in rows if r["method"] == label and int(r["setting"]) == self.setting]


METHODS: tuple[Method, ...] = tuple(Method(*m) for m in ar.PAPER_METHODS)
PAPER_SIZES = ar.PAPER_SIZES


def sizes_between(low: int, high: int, step: int = 20) -> tuple[int, ...]:
    return tuple(range(low, high + 1, step))


# The grid run here: every S the paper has, except where a method's curve is flat far from its
# knee (the authors' logs say where it is): there every other S (40 apart) or every fifth (100
# apart). DPFP-2 at 220 and DPFP-3 at 320 are in it because our runs fail one grid step below the
# authors' knee at 3000 steps, and DPFP-2 with the delta rule at 160 and 180 because ours solves
# 140 but not 200 (the authors' capacity). docs/paper_figures.md lists what each method leaves out.
BUDGET_GRID: dict[tuple[int, str], tuple[int, ...]] = {
    # setting 1
    (1, "softmax"): (20, 100, 200, 300, 400, *sizes_between(440, 600)),
    (1, "linear sum"): (*sizes_between(20, 120), 200, 300),
    (1, "favor-64 sum"): (20, 40, 60, 100),
    (1, "favor-128 sum"): (20, 40, 60, 100),
    (1, "favor-512 sum"): (20, 40, 60, 100),
    (1, "dpfp-1 sum"): (20, 60, *sizes_between(100, 160), 200, 300),
    (1, "dpfp-2 sum"): (20, 100, *sizes_between(200, 300)),
    (1, "dpfp-3 sum"): (20, 100, 200, *sizes_between(300, 400)),
    # setting 2
    (2, "dpfp-1 sum"): (20, 60, 100, 140, 200),
    (2, "dpfp-1 delta"): (*sizes_between(20, 160), 200),
    (2, "dpfp-2 delta"): (20, 60, 100, *sizes_between(140, 200)),
    (2, "linear delta"): (*sizes_between(20, 120), 160, 200),
    (2, "favor-64 delta"): (20, 60, 100),
    (2, "favor-128 delta"): (20, 60, 100),
    (2, "dpfp-1 fwm"): (20, 60, 100, 200),
}


def method_named(setting: int, label: str) -> Method:
    """The method of ``setting`` whose label is ``label`` (e.g. ``"dpfp-1 sum"``); a ValueError
    naming the setting's labels otherwise."""
    found = [m for m in METHODS if m.setting == setting and m.label == label]
    if not found:
        labels = [m.label for m in METHODS if m.setting == setting]
        raise ValueError(f"setting {setting} has {labels}; got {label!r}")
    return found[0]


def budget_sizes(method: Method) -> tuple[int, ...]:
    return BUDGET_GRID.get((method.setting, method.label), PAPER_SIZES[method.setting])


def grid(full: bool = False) -> list[tuple[Method, int]]:
    """The sweep's points in the order they run: by S (so a partial sweep has whole columns of the
    smaller S), FAVOR+ last (its curves have no knee: it fails at every S in the authors' logs)."""
    points = [(m, s) for m in METHODS for s in (PAPER_SIZES[m.setting] if full else budget_sizes(m))]
    return sorted(points, key=lambda p: (p[0].feature_map == "favor", p[1], p[0].setting, METHODS.index(p[0])))


# --- CSVs ---------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(rows: Iterable[dict], path: Path, columns: Sequence[str]) -> None:
    """Write sorted by setting, method (the figures' order) and S, through a temporary file, so
    an interrupted write never leaves a half CSV."""
    order = {m.label: i for i, m in enumerate(METHODS)}
    rows = sorted(rows, key=lambda r: (int(r["setting"]), order.get(r["method"], len(order)), r["method"],
                                       int(r["S"]), int(r.get("seed") or 0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def point_key(setting: object, method: str, size: object, seed: object) -> tuple[int, str, int, int]:
    return int(setting), method, int(size), int(seed)


def row_key(row: dict) -> tuple[int, str, int, int]:
    return point_key(row["setting"], row["method"], row["S"], row["seed"])


# --- running ------------------------------------------------------------------------------------


def run_point(config: ar.RunConfig) -> dict:
    """Train one point; its sweep row."""
    row = ar.train(config, progress=False)
    return dict(setting=config.setting, method=config.label, S=config.num_symbols, seed=config.seed,
                final_eval_loss=row["final_eval_loss"], steps=row["steps"], seconds=row["seconds"],
                max_steps=config.max_steps)


def expected_cost(config: ar.RunConfig, authors_steps: dict[tuple[int, str, int], int]) -> float:
    """A point's relative cost for the ETA: the authors' step count (2000 where they have no log)
    times the work of a step, the memory write ``L x K x S`` plus a fixed overhead."""
    length = config.num_symbols * (1 if config.setting == 1 else 2)
    width = {"softmax": 64, "linear": 64, "favor": 2 * config.num_features,
             "dpfp": 2 * config.nu * ar.KEY_DIM}[config.feature_map]
    steps = min(authors_steps.get((config.setting, config.label, config.num_symbols), 2000), config.max_steps)
    per_step = 1.0 + length * width * config.num_symbols / 2e6 * (4 if config.rule == "fwm" else 1)
    return steps * per_step


def run_sweep(configs: Sequence[ar.RunConfig], csv_path: Path, jobs: int = 1, progress: bool = True,
              authors_steps: dict[tuple[int, str, int], int] | None = None) -> list[dict]:
    """Run the configs without a row in ``csv_path`` (resume), ``jobs`` at a time, adding each
    finished one's row to the CSV at once; returns the CSV's rows after the sweep."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1; got {jobs}")
    rows = read_rows(csv_path)
    done = {row_key(r) for r in rows}
    todo = [c for c in configs if point_key(c.setting, c.label, c.num_symbols, c.seed) not in done]
    costs = [expected_cost(c, authors_steps or {}) for c in todo]
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(costs), disable=not progress or not todo, file=sys.stderr, smoothing=0,
               bar_format="{percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")
    finished = 0
    bar.set_postfix_str(f"0/{len(todo)} points ({len(configs) - len(todo)} already in {csv_path.name})")

    def record(config: ar.RunConfig, cost: float, row: dict) -> None:
        nonlocal finished
        rows.append(row)
        write_rows(rows, csv_path, SWEEP_COLUMNS)
        finished += 1
        bar.update(cost)
        bar.set_postfix_str(f"{finished}/{len(todo)} points; last: setting {config.setting} {config.label} "
                            f"S={config.num_symbols} loss {float(row['final_eval_loss']):.4f} "
                            f"({row['steps']} steps, {row['seconds']} s)")

    if jobs == 1:
        for config, cost in zip(todo, costs, strict=True):
            record(config, cost, run_point(config))
    else:
        env_flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{env_flags} {ONE_THREAD_XLA_FLAGS}"
        try:
            context = multiprocessing.get_context("spawn")  # jax is not fork-safe
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
                futures = {pool.submit(run_point, c): (c, cost) for c, cost in zip(todo, costs, strict=True)}
                for future in concurrent.futures.as_completed(futures):
                    record(*futures[future], future.result())
        finally:
            os.environ["XLA_FLAGS"] = env_flags
    bar.close()
    return rows


# --- what the sweep costs (benchmarks/sweep_cost.py measures the pieces) -------------------------


def estimated_seconds(first: float, step: float, evaluation: float, steps: int, eval_every: int) -> float:
    """A run's seconds as :func:`ar.train` counts them, from its pieces: the first step and first
    evaluation (``first``, compiles included), then the other ``steps - 1`` steps and the other
    evaluations (``ar.evaluations_made``) at the steady ``step`` and ``evaluation`` seconds.

    Example:
        >>> estimated_seconds(first=4.0, step=0.01, evaluation=0.1, steps=250, eval_every=100)
        6.69
    """
    evaluations = ar.evaluations_made(steps, eval_every)
    return round(first + (steps - 1) * step + (evaluations - 1) * evaluation, 6)


def makespan(costs: Sequence[float], jobs: int) -> float:
    """The wall time of running ``costs`` in this order on ``jobs`` workers that each take the next
    one when free (as ``run_sweep``'s process pool does), every run at its own cost.

    Example:
        >>> makespan([5, 1, 1, 1, 4], jobs=2)
        7.0
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1; got {jobs}")
    free = [0.0] * jobs
    for cost in costs:
        first_free = free.index(min(free))
        free[first_free] += cost
    return max(free)


def cost_estimates(path: Path | None,
                   sweep_rows: Iterable[dict] | None = None) -> dict[tuple[int, str, int, int], float]:
    """Each measured row's estimated seconds (benchmarks/sweep_cost.py's CSV), by sweep row key;
    given ``sweep_rows``, only the estimates made for a row's present step count (a row rerun since
    it was measured has none: its estimate would be stale)."""
    if path is None:
        return {}
    steps = None if sweep_rows is None else {row_key(r): int(r["steps"]) for r in sweep_rows}
    return {row_key(r): float(r["estimate_s"]) for r in read_rows(path)
            if steps is None or steps.get(row_key(r)) == int(r["steps"])}


def estimate_text(rows: Sequence[dict], costs: dict[tuple[int, str, int, int], float]) -> str:
    """The summed estimate of ``rows`` ("-" when none has one; "(k of n rows)" when some lack one)."""
    known = [costs[row_key(r)] for r in rows if row_key(r) in costs]
    if not known:
        return "-"
    return f"{sum(known):.0f}" + ("" if len(known) == len(rows) else f" ({len(known)} of {len(rows)} rows)")


# --- the authors' logs --------------------------------------------------------------------------

LOG_NAME = re.compile(r"d64_(?P<name>.+)_AssocSeq(?P<length>\d+)N(?P<S>\d+)R(?P<replace>[01])\.csv")


def method_of_log(file_name: str) -> tuple[Method, int] | None:
    """The method and S of one of the authors' log files, or None for a method not in METHODS."""
    match = LOG_NAME.fullmatch(file_name)
    if match is None:
        raise ValueError(f"not an authors' log name (d64_<method>_AssocSeq<L>N<S>R<0|1>.csv): {file_name!r}")
    setting = 2 if match["replace"] == "1" else 1
    for method in METHODS:
        if method.setting == setting and method.authors_name == match["name"]:
            return method, int(match["S"])
    return None


def authors_rows(path: Path = AUTHORS_CSV) -> list[dict]:
    return read_rows(path)


def authors_steps(rows: Iterable[dict]) -> dict[tuple[int, str, int], int]:
    return {(int(r["setting"]), r["method"], int(r["S"])): int(r["steps"]) for r in rows}


# --- capacity, figures, table -------------------------------------------------------------------


def finite_loss(row: dict, column: str = "final_eval_loss") -> float:
    value = float(row[column])
    return value if math.isfinite(value) else math.nan


def capacity(rows: Iterable[dict], method: str, column: str = "final_eval_loss") -> int | None:
    """The largest S whose loss (``column``) is below CAPACITY_LOSS (None: no such S)."""
    solved = [int(r["S"]) for r in rows if r["method"] == method and finite_loss(r, column) < CAPACITY_LOSS]
    return max(solved) if solved else None


def first_seed_rows(rows: Iterable[dict]) -> list[dict]:
    """One row per (setting, method, S): the one of the lowest seed (extra seeds are reported, not drawn)."""
    chosen: dict[tuple[int, str, int], dict] = {}
    for row in rows:
        key = (int(row["setting"]), row["method"], int(row["S"]))
        if key not in chosen or int(row["seed"]) < int(chosen[key]["seed"]):
            chosen[key] = row
    return list(chosen.values())


def missing_points(rows: Iterable[dict], points: Iterable[tuple[Method, int]]) -> dict[tuple[int, str], list[int]]:
    """The grid's S without a row, per (setting, method label)."""
    have = {(int(r["setting"]), r["method"], int(r["S"])) for r in rows}
    missing: dict[tuple[int, str], list[int]] = {}
    for method, size in points:
        if (method.setting, method.label, size) not in have:
            missing.setdefault((method.setting, method.label), []).append(size)
    return missing


def plot_setting(setting: int, ours: list[dict], authors: list[dict], missing: dict[tuple[int, str], list[int]]):
    """Final evaluation loss against S, one colour per method: ours solid with dots, the
    authors' dashed; a NaN loss (a diverged run) is an x at the top. Setting 2 on a log axis (as
    the paper), losses below ``PLOT_FLOOR`` on the floor. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    fig, ax = plt.subplots(figsize=(11, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["#000000", "#7f7f00", "#00007f"]
    at_top = blended_transform_factory(ax.transData, ax.transAxes)
    floor = ar.PLOT_FLOOR
    for i, method in enumerate(m for m in METHODS if m.setting == setting):
        colour = colours[i % len(colours)]
        gaps = missing.get((setting, method.label), [])
        label = method.label + (f" ({len(gaps)} of its points missing)" if gaps else "")
        for rows, style in ((authors, "--."), (ours, "-o")):
            points = sorted((int(r["S"]), finite_loss(r)) for r in method.rows(rows))
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [max(y, floor) if setting == 2 and not math.isnan(y) else y for _, y in points]
            ax.plot(xs, ys, style, color=colour, label=label, markersize=3 if style == "-o" else 2,
                    linewidth=1.6 if style == "-o" else 1.0)
            label = "_nolegend_"  # one legend entry per method, whichever of its lines comes first
            diverged = [x for x, y in points if math.isnan(y)]
            if diverged:
                ax.plot(diverged, [0.97] * len(diverged), "x", color=colour, transform=at_top,
                        markersize=7 if style == "-o" else 5, label="_nolegend_")
    ax.axhline(CAPACITY_LOSS, color="0.4", linestyle=":", linewidth=1)
    if setting == 2:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("number of unique keys S")
    ax.set_ylabel("final evaluation loss" + (f" (floor {floor:g})" if setting == 2 else ""))
    ax.set_title(f"setting {setting}: " + ("keys once, length S" if setting == 1 else "keys repeat, length 2S"))
    ax.grid(alpha=0.3)
    keys = [Line2D([], [], color="0.2", marker="o", markersize=3, label="dpfp-jax (this sweep)"),
            Line2D([], [], color="0.2", linestyle="--", label="the paper (authors' logs)"),
            Line2D([], [], color="0.2", marker="x", linestyle="none", label="NaN (diverged)"),
            Line2D([], [], color="0.4", linestyle=":", label=f"capacity threshold {CAPACITY_LOSS:g}")]
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + keys, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def capacity_table(ours: list[dict], authors: list[dict], points: Sequence[tuple[Method, int]],
                   all_rows: list[dict], costs: dict[tuple[int, str, int, int], float] | None = None) -> str:
    """Markdown: per method, ours and the paper's capacity, the runtime of our runs (as the CSV
    has it, on the shared machine; and, when ``costs`` holds any, the idle-machine estimate of
    the same rows: :func:`cost_estimates`), what is missing."""
    missing = missing_points(ours, points)
    idle = ["idle estimate (s)"] if costs else []
    lines = ["| " + " | ".join(["setting", "method", "capacity: ours", "paper, at 3000 steps", "paper, final",
                                "points run", "runtime, shared machine (s)", *idle, "missing S"]) + " |",
             "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(idle) + "---|"]
    for method in METHODS:
        planned = [s for m, s in points if m == method]
        mine = method.rows(ours)
        theirs = method.rows(authors)
        runs = method.rows(all_rows)
        seconds = sum(float(r["seconds"]) for r in runs)
        estimate = f" {estimate_text(runs, costs)} |" if costs else ""
        ours_cap = capacity(mine, method.label)
        paper_cap = capacity(theirs, method.label)
        paper_capped = capacity(theirs, method.label, "loss_at_3000")
        gaps = missing.get((method.setting, method.label), [])
        text_ours = "-" if not mine else ("none" if ours_cap is None else str(ours_cap))
        if gaps and (ours_cap is None or any(s > ours_cap for s in gaps)):
            text_ours += " (incomplete)"
        text_paper, text_capped = ("no log" if not theirs else ("none" if cap is None else str(cap))
                                   for cap in (paper_cap, paper_capped))
        gap_text = ", ".join(map(str, gaps)) if gaps else "none"
        lines.append(f"| {method.setting} | {method.label} | {text_ours} | {text_capped} | {text_paper} "
                     f"| {len(mine)}/{len(planned)} | {seconds:.0f} |{estimate} {gap_text} |")
    # Every row's seconds, extra seeds included: the sweep's runtime so far, one run after another.
    total = sum(float(r["seconds"]) for r in all_rows)
    done = len(points) - sum(map(len, missing.values()))
    estimate = f" {estimate_text(all_rows, costs)} |" if costs else ""
    lines.append(f"| | all, one run after another | | | | {done}/{len(points)} | {total:.0f} |{estimate} |")
    return "\n".join(lines) + "\n"


def readme_table(ours: list[dict], authors: list[dict], points: Sequence[tuple[Method, int]],
                 all_rows: list[dict], costs: dict[tuple[int, str, int, int], float] | None = None) -> str:
    """Markdown for the README: per method, ours and the paper's capacity (at 3000 steps and final)
    and the seconds our runs took here (on the shared machine; and the idle-machine estimate when
    ``costs`` holds any); "(so far)" where a grid point above ours has not run yet."""
    missing = missing_points(ours, points)
    idle = " idle estimate (s) |" if costs else ""
    lines = [f"| setting | method | ours | paper, 3000 steps | paper, final | runtime, shared machine (s) |{idle}",
             "|---:|---|---:|---:|---:|---:|" + ("---:|" if costs else "")]
    for method in METHODS:
        mine = method.rows(ours)
        theirs = method.rows(authors)
        cap = capacity(mine, method.label)
        gaps = missing.get((method.setting, method.label), [])
        text = "-" if not mine else ("none" if cap is None else str(cap))
        if mine and gaps and (cap is None or any(s > cap for s in gaps)):
            text += " (so far)"
        paper, capped = (("none" if c is None else str(c)) if theirs else "no log"
                         for c in (capacity(theirs, method.label), capacity(theirs, method.label, "loss_at_3000")))
        runs = method.rows(all_rows)
        seconds = sum(float(r["seconds"]) for r in runs)
        estimate = f" {estimate_text(runs, costs)} |" if costs else ""
        lines.append(f"| {method.setting} | {method.label} | {text} | {capped} | {paper} | {seconds:.0f} |{estimate}")
    return "\n".join(lines) + "\n"


def seed_table(rows: Iterable[dict]) -> str:
    """Markdown: the final losses of every point run with more than one seed ("" when none is)."""
    by_point: dict[tuple[int, str, int], dict[int, str]] = {}
    for row in rows:
        by_point.setdefault((int(row["setting"]), row["method"], int(row["S"])), {})[int(row["seed"])] = (
            row["final_eval_loss"])
    order = {(m.setting, m.label): i for i, m in enumerate(METHODS)}
    several = sorted((k for k, v in by_point.items() if len(v) > 1), key=lambda k: (order.get(k[:2], 99), k[2]))
    if not several:
        return ""
    lines = ["", "Points run with more than one seed (the figures and the capacity above use the lowest):", "",
             "| setting | method | S | final loss by seed |", "|---:|---|---:|---|"]
    for key in several:
        losses = ", ".join(f"{seed}: {loss}" for seed, loss in sorted(by_point[key].items()))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {losses} |")
    return "\n".join(lines) + "\n"


def write_docs_table(table: str, page: Path = DOCS_PAGE, begin: str = TABLE_BEGIN, end: str = TABLE_END) -> None:
    """Put the table between the page's markers (the rest of the page is written by hand)."""
    text = page.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{page} has no capacity-table markers ({begin!r} ... {end!r})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{table}{end}{tail}")


def draw(csv_path: Path, out: Path, points: Sequence[tuple[Method, int]], authors_csv: Path = AUTHORS_CSV,
         docs_page: Path | None = DOCS_PAGE, readme: Path | None = None, cost_csv: Path | None = None) -> str:
    """Figures (``out/setting1.png``, ``setting2.png``) and the capacity table from the CSVs (into
    ``docs_page``; the short one into ``readme`` when given); the idle-machine estimates from
    ``cost_csv`` when it is there (by default, for the committed sweep CSV, the committed COST_CSV)."""
    import matplotlib.pyplot as plt

    all_rows = read_rows(csv_path)
    ours = first_seed_rows(all_rows)
    authors = authors_rows(authors_csv)
    if cost_csv is None and csv_path.resolve() == SWEEP_CSV.resolve():
        cost_csv = COST_CSV
    costs = cost_estimates(cost_csv, all_rows)
    missing = missing_points(ours, points)
    out.mkdir(parents=True, exist_ok=True)
    for setting in (1, 2):
        fig = plot_setting(setting, ours, authors, missing)
        fig.savefig(out / f"setting{setting}.png", dpi=110)
        plt.close(fig)
    done = len(points) - sum(len(gaps) for gaps in missing.values())
    status = (f"{done} of the grid's {len(points)} points have run (CSV rows, extra seeds included: "
              f"{len(all_rows)}).\n\n")
    table = status + capacity_table(ours, authors, points, all_rows, costs) + seed_table(all_rows)
    if docs_page is not None:
        write_docs_table(table, docs_page)
    if readme is not None:
        write_docs_table(readme_table(ours, authors, points, all_rows, costs), readme, README_BEGIN, README_END)
    return table


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the grid's points missing from --csv, then draw")
    parser.add_argument("--fresh", action="store_true", help="with --run: forget --csv's rows first (rerun all)")
    parser.add_argument("--full-grid", action="store_true",
                        help="every S the paper has (20..600 and 20..200 in steps of 20), not the budget grid")
    parser.add_argument("--jobs", type=integer(1), default=1, help="points run in parallel processes")
    parser.add_argument("--max-steps", type=integer(1), default=BUDGET_MAX_STEPS,
                        help=f"step cap of every run (the authors': {ar.PAPER_MAX_STEPS})")
    parser.add_argument("--csv", type=Path, default=SWEEP_CSV, help="the sweep's rows (read, and written by --run)")
    parser.add_argument("--out", type=Path, default=REPORTS, help="folder of the figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    chosen = "with --run: instead of the grid, run"
    parser.add_argument("--setting", type=int, choices=(1, 2), help=f"{chosen} this setting's --method")
    parser.add_argument("--method", help=f"{chosen} this method (its label, e.g. 'dpfp-1 sum') at --sizes")
    parser.add_argument("--sizes", type=integers(1), help=f"{chosen} --method at these S (comma-separated)")
    parser.add_argument("--seeds", type=integers(0), default=[ar.PAPER_SEED],
                        help="with --method: the seeds (e.g. 2,3 for two more runs of a point)")
    args = parser.parse_args(argv)
    if args.fresh and not args.run:
        parser.error("--fresh reruns the sweep: give --run with it")
    given = [f"--{name}" for name in ("setting", "method", "sizes") if getattr(args, name) is not None]
    if given and (len(given) < 3 or not args.run):
        parser.error("--setting, --method and --sizes go together, with --run")
    if args.seeds != [ar.PAPER_SEED] and not given:
        parser.error("--seeds goes with --setting, --method and --sizes")
    if given:
        try:
            method_named(args.setting, args.method)
        except ValueError as error:
            parser.error(f"--method: {error}")
        outside = [s for s in args.sizes if s not in PAPER_SIZES[args.setting]]
        if outside:
            parser.error(f"--sizes: setting {args.setting}'s S are 20 to {max(PAPER_SIZES[args.setting])} in steps "
                         f"of 20; got {outside}")
    return args


def chosen_configs(args: argparse.Namespace) -> list[ar.RunConfig]:
    """The runs --run makes: the grid's points, or --method at --sizes with each of --seeds."""
    if args.method is None:
        return [m.config(s, max_steps=args.max_steps) for m, s in grid(full=args.full_grid)]
    method = method_named(args.setting, args.method)
    return [method.config(s, seed=seed, max_steps=args.max_steps) for s in args.sizes for seed in args.seeds]


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    points = grid(full=args.full_grid)
    committed = args.csv.resolve() == SWEEP_CSV.resolve()  # only the committed sweep writes the pages
    docs_page, readme = (DOCS_PAGE, ROOT / "README.md") if committed else (None, None)
    if args.run:
        if args.fresh and args.csv.exists():
            args.csv.unlink()
        start = time.perf_counter()
        run_sweep(chosen_configs(args), args.csv, args.jobs, progress=not args.no_progress,
                  authors_steps=authors_steps(authors_rows()))
        print(f"sweep: {time.perf_counter() - start:.0f} s", flush=True)
    table = draw(args.csv, args.out, points, docs_page=docs_page, readme=readme)
    print(table)
    print(f"wrote {args.out / 'setting1.png'}, {args.out / 'setting2.png'}"
          + (f" and the table in {docs_page}" if docs_page else ""))
    return table


if __name__ == "__main__":
    main()
