"""Timing and memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def machine_name() -> str:
    """A one-line description of where the numbers came from."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"CPU: {cpu}, {os.cpu_count()} cores, jax {jax.__version__}"
    return f"{device.platform.upper()}: {device.device_kind} x{jax.device_count()}, jax {jax.__version__}"


def time_ms(fn: Callable[..., object], *args: object, repeats: int = 5) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds, after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def temp_mb(jitted: Callable[..., object], *args: object) -> float:
    """Compiled temporary (scratch) memory of a jitted function, in MB."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes / 1e6
