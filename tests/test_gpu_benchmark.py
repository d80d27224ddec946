"""benchmarks/gpu.py measures like for like, checked on the CPU (its GPU run needs a lent GPU).

Run as the script it is (``python -m benchmarks.gpu``) at a tiny shape: every contender gets a
row (figures, or why not), the memory column is each side's allocator peak, JAX's taken in fresh
processes (which on a CPU, where XLA keeps no allocator statistics, say so instead of giving a
number), and a figure that is missing reads "n/a", never a number.
"""

import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

TINY = "1,32,1,8,4"


def run_benchmark(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # runs every contender and two fresh processes: about half a minute
def test_the_table_gives_every_contender_a_row_and_missing_figures_as_na():
    result = run_benchmark("--shapes", TINY, "--memory-shapes", TINY, "--repeats", "2")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("command: python -m benchmarks.gpu") and "load average at end:" in out, out
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in out.splitlines() if line.startswith("| "))}
    assert rows["FLA chunk_delta_rule"][1] == "not installed", out  # no PyTorch here
    chunk = rows["ours chunk"]
    assert float(chunk[1]) > 0 and float(chunk[2]) > 0, out  # forward and forward+backward ms
    # Runtime peak asked for at this shape: on a CPU the fresh process says there is none.
    assert chunk[3] == "n/a" and "- ours chunk: no runtime peak: measure failed: no allocator statistics on cpu" in out
    assert chunk[4] != "n/a" and float(chunk[4]) >= 0, out  # the compiled peak (GB) is there
    assert chunk[5] == "1.00x", out  # the time ratio over itself, the base row
    assert rows["ours scan"][5].endswith("x") and rows["ours scan"][6] == "n/a", out  # no runtime peak: no ratio


def test_shapes_are_checked_by_the_command_line():
    result = run_benchmark("--shapes", "8,4096,8,0,64")
    assert result.returncode == 2 and "five positive integers B,T,H,K,V" in result.stderr, result.stderr
