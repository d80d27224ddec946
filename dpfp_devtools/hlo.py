"""Collectives in compiled HLO text: which there are, which carry a given length, how many bytes.

Shared by the tests (no collective of a context-parallel program may carry the global T) and
``benchmarks/context_parallel.py`` (the collective bytes per chip), so both read the compiled
programs the same way.

Example:
    >>> hlo = "%ag = f32[4,8]{1,0} all-gather(f32[1,8]{1,0} %x), dimensions={0}"
    >>> collectives_with_length(hlo, 4) == [hlo], collectives_with_length(hlo, 5)
    (True, [])
    >>> collective_bytes(hlo)
    (1, 128)
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
"""The HLO op names of XLA's collectives (an async one adds ``-start``)."""


def collectives_with_length(hlo: str, length: int | None) -> list[str]:
    """The lines of compiled HLO text whose collective has an array with a dimension ``length``
    (every collective's with None)."""
    found = []
    for line in hlo.splitlines():
        op = re.search(r"=\s*\S+\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if op is None:
            # Tuple-shaped results put the shapes first: "= (f32[..], ..) all-gather-start(".
            op = re.search(r"\)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if op is None:
            continue
        dims = [int(d) for shape in re.findall(r"\[([\d,]*)\]", line) for d in shape.split(",") if d]
        if length is None or length in dims:
            found.append(line.strip())
    return found


def collective_bytes(hlo: str) -> tuple[int, int]:
    """(count, bytes) of the collectives in compiled HLO text: per collective its largest result
    buffer (an async ``-start`` op's result is a tuple that also holds its operand and context)."""
    count, total = 0, 0
    sizes = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "f16": 2, "u32": 4, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if match is None:
            continue
        count += 1
        total += max(sizes.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                     for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)))
    return count, total
