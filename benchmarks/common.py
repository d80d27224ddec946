"""Timing and memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


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


def forward_and_backward(fn: Callable[..., tuple[jax.Array, jax.Array]], num_args: int) -> tuple[Callable, Callable]:
    """``jit(fn)`` and ``jit(grad)`` of a loss on both of fn's results (outputs and final state)."""

    def loss(*a):
        out, state = fn(*a)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)

    return jax.jit(fn), jax.jit(jax.grad(loss, argnums=tuple(range(num_args))))


Row = tuple[float, float, float, float]  # fwd ms, fwd+bwd ms, fwd temp MB, fwd+bwd temp MB


def measure_forward_backward(
    fns: dict[str, Callable[..., tuple[jax.Array, jax.Array]]], args: tuple, repeats: int
) -> dict[str, Row]:
    """Time (interleaved) and read the temp memory of jit(fn) and jit(grad of a loss on fn)."""
    forwards, backwards = {}, {}
    for name, fn in fns.items():
        forwards[name], backwards[name] = forward_and_backward(fn, len(args))
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


def worst_relative_error(got, want) -> float:
    """Largest ``|g - w| / |w|`` (Frobenius norms) over matching leaves, g compared in float32."""
    return max(float(jnp.linalg.norm(g.astype(jnp.float32) - w) / (jnp.linalg.norm(w) + 1e-30))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


def delta_rule_inputs(batch: int, time: int, heads: int, key_dim: int, value_dim: int, dtype=jnp.float32):
    """Sum-normalised non-negative q, k (as DPFP gives), Gaussian v, sigmoid beta."""
    ks = jax.random.split(jax.random.key(0), 4)
    shape = (batch, time, heads, key_dim)
    q = jax.nn.relu(jax.random.normal(ks[0], shape, jnp.float32))
    k = jax.nn.relu(jax.random.normal(ks[1], shape, jnp.float32))
    q, k = (x / (x.sum(-1, keepdims=True) + 1e-6) for x in (q, k))
    v = jax.random.normal(ks[2], (batch, time, heads, value_dim), jnp.float32)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (batch, time, heads), jnp.float32))
    return tuple(x.astype(dtype) for x in (q, k, v, beta))


def peer_deltanet(impl: str) -> tuple[Callable[..., tuple[jax.Array, jax.Array]] | None, str | None]:
    """jax-linear-attention's deltanet with our calling convention, or None and why not."""
    try:
        from jla.ops import linear_attention
    except ImportError as err:
        return None, f"jax-linear-attention not installed ({err}); `pip install -e '.[bench]'` adds it"

    def fn(q, k, v, beta):
        return linear_attention("deltanet", q, k, v, beta=beta, impl=impl, scale=1.0, output_final_state=True)

    return fn, None


def ours(impl: str, **options: object) -> Callable[..., tuple[jax.Array, jax.Array]]:
    import dpfp_jax as dj

    def fn(q, k, v, beta):
        return dj.fast_weight(q, k, v, beta, rule="delta", impl=impl, **options)

    return fn
