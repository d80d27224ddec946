"""Timing, memory and table helpers shared by the benchmark scripts (``python -m benchmarks.NAME``)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from dpfp_devtools.workloads import forward_and_backward, make_inputs


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


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. "0.12 / 0.30 / 0.41" (a quiet 2-core machine is < 1)."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def reported_run() -> Iterator[None]:
    """Print what a table needs beside it to be reproduced and weighed: the command, the machine,
    the date and the load average, before the run; the load average again after it.

    Example:
        >>> with reported_run():  # doctest: +ELLIPSIS
        ...     pass
        command: ...
        machine: ...
        date: ...
        load average (1 / 5 / 15 min) at start: ...
        load average at end: ...
    """
    module = sys.modules["__main__"].__spec__
    program = f"python -m {module.name}" if module is not None else f"python {sys.argv[0]}"
    print(f"command: {program} {shlex.join(sys.argv[1:])}".rstrip())
    print(f"machine: {machine_name()}")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"load average (1 / 5 / 15 min) at start: {load_average()}", flush=True)
    yield
    print(f"load average at end: {load_average()}", flush=True)


def time_interleaved_ms(
    fns: dict[str, Callable[..., object]], *args: object, repeats: int = 5
) -> dict[str, float]:
    """Median wall time of each function in ms, timed in rounds (one call of each per round).

    Interleaving spreads slow drifts of a shared machine (other load, clock changes) over all
    contenders instead of biasing whichever ran during them.
    """
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def temp_mb(jitted: Callable[..., object], *args: object) -> float:
    """Compiled temporary (scratch) memory of a jitted function, in MB."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes / 1e6


Row = tuple[float, float, float, float]  # fwd ms, fwd+bwd ms, fwd temp MB, fwd+bwd temp MB


def measure_forward_backward(
    fns: dict[str, Callable[..., tuple[jax.Array, jax.Array]]], args: tuple, repeats: int,
    loss: str = "outputs+state",
) -> dict[str, Row]:
    """Time (interleaved) and read the temp memory of jit(fn) and jit(grad of a loss on fn);
    ``loss`` as ``workloads.forward_and_backward`` takes it."""
    forwards, backwards = {}, {}
    for name, fn in fns.items():
        forwards[name], backwards[name] = forward_and_backward(fn, len(args), loss)
    fwd = time_interleaved_ms(forwards, *args, repeats=repeats)
    bwd = time_interleaved_ms(backwards, *args, repeats=repeats)
    return {n: (fwd[n], bwd[n], temp_mb(forwards[n], *args), temp_mb(backwards[n], *args)) for n in fns}


def print_table(rows: dict[str, Row], baseline: str) -> None:
    """A markdown table; the last two columns are each row over ``baseline``."""
    _, base_bwd, _, base_mem = rows[baseline]
    print(f"| impl | fwd ms | fwd+bwd ms | fwd temp MB | fwd+bwd temp MB | fwd+bwd time / {baseline} | "
          f"fwd+bwd temp / {baseline} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (fwd, bwd, fwd_mem, bwd_mem) in rows.items():
        print(f"| {name} | {fwd:.2f} | {bwd:.2f} | {fwd_mem:.1f} | {bwd_mem:.1f} | "
              f"{bwd / base_bwd:.2f}x | {bwd_mem / max(base_mem, 1e-6):.1f}x |")


def delta_rule_inputs(batch: int, time: int, heads: int, key_dim: int, value_dim: int,
                      dtype=jnp.float32) -> tuple[jax.Array, ...]:
    """(q, k, v, beta) of ``make_inputs`` (seed 0, delta rule), positional as the contenders take them."""
    inputs = make_inputs(batch=batch, time=time, heads=heads, key_dim=key_dim, value_dim=value_dim, dtype=dtype)
    return inputs["q"], inputs["k"], inputs["v"], inputs["beta"]


def peer_deltanet(impl: str, final_state: bool = True,
                  **options: object) -> tuple[Callable[..., tuple[jax.Array, jax.Array]] | None, str | None]:
    """jax-linear-attention's deltanet with our calling convention (``options`` passed on, e.g.
    ``segment_ids``), or None and why not. ``final_state=False`` runs it without one (its second
    result is then None), as for a loss on the outputs alone."""
    try:
        from jla.ops import linear_attention
    except ImportError as err:
        return None, f"jax-linear-attention not installed ({err}); `pip install -e '.[bench]'` adds it"

    def fn(q, k, v, beta):
        return linear_attention("deltanet", q, k, v, beta=beta, impl=impl, scale=1.0,
                                output_final_state=final_state, **options)

    return fn, None


def peer_gated_deltanet(final_state: bool = True, **options: object
                        ) -> tuple[Callable[..., tuple[jax.Array, jax.Array]] | None, str | None]:
    """jax-linear-attention's chunked Gated DeltaNet (plain JAX, so XLA's own chunked program; its
    gate applied before the write, as ours) taking ``(q, k, v, beta, log_decay)``, or None and why
    not. ``options`` are passed on (``scale``: its default is ``K**-0.5``, ours 1);
    ``final_state=False`` as for :func:`peer_deltanet`."""
    try:
        from jla.ops import linear_attention
    except ImportError as err:
        return None, f"jax-linear-attention not installed ({err}); `pip install -e '.[bench]'` adds it"

    def fn(q, k, v, beta, log_decay):
        return linear_attention("gated_deltanet", q, k, v, g=log_decay, beta=beta, impl="chunked",
                                output_final_state=final_state, **options)

    return fn, None
