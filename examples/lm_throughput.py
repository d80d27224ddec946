"""Training-step throughput of the language-model example's attentions, side by side, and their ratios.

    python examples/lm_throughput.py                      # one run each: 300 steps, cpu preset
    python examples/lm_throughput.py --repeats 3          # three runs each, median and spread
    python examples/lm_throughput.py --steps 100 --attentions dpfp:delta,linear:sum

Each run is ``examples/train_lm.py --attention A --rule R --steps 300 --eval-every 100`` (the
``cpu`` preset, the default corpus; any other ``train_lm.py`` flag given here is passed on, except
``--out``, ``--attention`` and ``--rule``), in this process, into a temporary folder. Its figure is
what ``train_lm.py`` prints last: tokens over the time of the training steps alone (compilation,
evaluation and checkpoints excluded). The runs are interleaved (A, B, C, A, B, C, ...) so that a
change in the machine's load falls on every attention alike. Printed: the machine (CPU model,
cores, platform, jax version and devices), the load average at the start and at the end (a
loaded machine gives lower and noisier figures: compare only runs made together), every run, and
per attention the median tokens/s, the spread and the ratio to the first attention.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import jax

if __package__:  # imported as examples.lm_throughput (the tests), or run with python -m
    from . import train_lm
    from .arguments import HelpFormatter, integer
else:  # python examples/lm_throughput.py: Python puts examples/ first on the module path
    import train_lm
    from arguments import HelpFormatter, integer

# The examples page's figures: DPFP with the delta rule, linear attention with the sum rule, softmax.
DEFAULT_ATTENTIONS = "dpfp:delta,linear:sum,softmax"
DEFAULT_RUN = ["--steps", "300", "--eval-every", "100"]
OWN_FLAGS = ("--out", "--attention", "--rule")


def attention_list(text: str) -> list[tuple[str, str | None]]:
    """``ATTENTION[:RULE]`` pairs, comma-separated.

    >>> attention_list("dpfp:delta,softmax")
    [('dpfp', 'delta'), ('softmax', None)]
    """
    pairs = []
    for item in text.split(","):
        attention, _, rule = item.partition(":")
        if attention not in train_lm.ATTENTIONS or (rule and rule not in ("delta", "sum")) \
                or (attention == "softmax" and rule):
            raise argparse.ArgumentTypeError(f"expected ATTENTION[:RULE] items (attention one of "
                                             f"{', '.join(train_lm.ATTENTIONS)}; rule delta or sum, not for "
                                             f"softmax); got {item!r}")
        pairs.append((attention, rule or None))
    return pairs


def command(run: list[str], attention: str, rule: str | None, out: str) -> list[str]:
    """``train_lm.py``'s command line for one run."""
    return [*run, "--attention", attention, *(["--rule", rule] if rule else []), "--out", out]


def label(attention: str, rule: str | None) -> str:
    return attention if rule is None else f"{attention} {rule}"


def machine() -> str:
    """The CPU model and core count, the platform, the jax version and the devices it trains on."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    devices = jax.devices()
    return (f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; jax {jax.__version__}, "
            f"{len(devices)} {devices[0].platform} device{'s' * (len(devices) > 1)} ({devices[0].device_kind})")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def summarize(runs: dict[str, list[float]]) -> list[str]:
    """One table row per attention: median tokens/s, min-max, and the ratio of medians to the first.

    >>> print("\\n".join(summarize({"dpfp delta": [100.0, 120.0, 110.0], "linear sum": [500.0, 560.0, 540.0]})))
    | attention | runs | tokens/s, median | min - max | ratio to dpfp delta (median; min - max) |
    |---|---:|---:|---:|---:|
    | dpfp delta | 3 | 110 | 100 - 120 | 1.00x |
    | linear sum | 3 | 540 | 500 - 560 | 4.91x (4.17x - 5.60x) |
    """
    first, base = next(iter(runs.items()))
    lines = [f"| attention | runs | tokens/s, median | min - max | ratio to {first} (median; min - max) |",
             "|---|---:|---:|---:|---:|"]
    for name, values in runs.items():
        ratio = statistics.median(values) / statistics.median(base)
        spread = "" if name == first else f" ({min(values) / max(base):.2f}x - {max(values) / min(base):.2f}x)"
        lines.append(f"| {name} | {len(values)} | {statistics.median(values):,.0f} | {min(values):,.0f} - "
                     f"{max(values):,.0f} | {ratio:.2f}x{spread} |")
    return lines


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, and the ``train_lm.py`` command line every run shares (checked for
    each attention by ``train_lm.py``'s own parser: a bad flag is an argparse error before any run)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--attentions", type=attention_list, default=attention_list(DEFAULT_ATTENTIONS),
                        help=f"ATTENTION[:RULE] items, comma-separated (default: {DEFAULT_ATTENTIONS})")
    parser.add_argument("--repeats", type=integer(1), default=1, help="runs per attention, interleaved")
    args, run = parser.parse_known_args(argv)
    own = [flag for flag in OWN_FLAGS if any(arg == flag or arg.startswith(flag + "=") for arg in run)]
    if own:
        parser.error(f"{own[0]} is set by this script for each run; give --attentions instead")
    run = [*DEFAULT_RUN, *run, "--no-progress"]  # later flags win: the caller's --steps over the default
    for attention, rule in args.attentions:
        train_lm.parse_args(command(run, attention, rule, "unused"))
    return args, run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print, and return ``runs`` (label -> tokens/s of each run) and ``ratios`` (label -> ratio
    of medians to the first attention)."""
    args, run = parse_args(argv)
    print(f"machine: {machine()}")
    print(f"load average at start: {load_average()}", flush=True)
    runs: dict[str, list[float]] = {label(*pair): [] for pair in args.attentions}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for attention, rule in args.attentions:
                name = label(attention, rule)
                argv = command(run, attention, rule, str(Path(folder) / f"{attention}-{rule}-{repeat}"))
                print(f"--- {name}, run {repeat + 1} of {args.repeats}: train_lm.py {' '.join(argv[:-2])}", flush=True)
                result = train_lm.main(argv)
                runs[name].append(result["tokens_per_s"])
    print(f"load average at end: {load_average()}")
    print("\n".join(summarize(runs)))
    first = next(iter(runs.values()))
    ratios = {name: statistics.median(values) / statistics.median(first) for name, values in runs.items()}
    return dict(runs=runs, ratios=ratios)


if __name__ == "__main__":
    main()
