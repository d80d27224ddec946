"""benchmarks/gpu.py measures like for like, checked on the CPU (its GPU run needs a lent GPU).

Both frameworks' contenders are timed in the same interleaved rounds, the memory column is an
allocator peak on both sides (JAX's from a fresh process loading its program from a compilation
cache), and a figure that is missing reads "n/a", never a number.
"""

import math

import pytest

from benchmarks import gpu
from dpfp_devtools.workloads import ours

TINY = (1, 32, 1, 8, 4)


def test_every_contender_is_timed_in_the_same_interleaved_rounds(monkeypatch, capsys):
    rounds = []

    def fake_interleaved(fns, *args, repeats):
        rounds.append(sorted(fns))
        return {name: float(i + 1) for i, name in enumerate(sorted(fns))}

    monkeypatch.setattr(gpu, "SHAPES", [TINY])
    monkeypatch.setattr(gpu, "time_interleaved_ms", fake_interleaved)
    monkeypatch.setattr(gpu, "contenders", lambda: {"ours chunk": ("jax", ours("chunk")),
                                                    "ours scan": ("jax", ours("scan")),
                                                    "FLA chunk_delta_rule": ("torch", None)})
    gpu.benchmark(repeats=3, memory_shapes=[])
    table = capsys.readouterr().out
    # one round of forwards, one of forward+backwards, both over every contender that runs
    assert rounds == [["ours chunk", "ours scan"]] * 2
    assert "| FLA chunk_delta_rule | not installed |" in table
    # no runtime peak was asked for: n/a, not a number; the compiled peak is there
    chunk_row = next(line for line in table.splitlines() if line.startswith("| ours chunk |"))
    cells = [c.strip() for c in chunk_row.strip("|").split("|")]
    assert cells[1:4] == ["1.00", "1.00", "n/a"]
    assert cells[4] != "n/a" and float(cells[4]) >= 0  # GB: a tiny program rounds to 0.00


def test_ratio_cells_of_a_missing_figure_read_na(capsys):
    gpu.print_ratio_table({"a": (1.0, math.nan), "b": (2.0, 4.0)}, ("x", "y"), {"x": 0, "y": 1}, ("a",), digits=1)
    out = capsys.readouterr().out
    assert "| b | 2.0 | 4.0 | 2.00x | n/a |" in out


@pytest.mark.slow
def test_jax_runtime_peak_comes_from_a_fresh_process_or_says_why():
    # On a CPU XLA keeps no allocator statistics: the figure is a reason, not a number.
    peak = gpu.jax_runtime_peak_bytes("ours chunk", TINY)
    assert isinstance(peak, str) and "no allocator statistics on cpu" in peak


def test_shapes_are_parsed_with_a_clear_error():
    assert gpu.parse_shape("8,4096,8,128,64") == (8, 4096, 8, 128, 64)
    with pytest.raises(Exception, match="five positive integers"):
        gpu.parse_shape("8,4096,8,0,64")
