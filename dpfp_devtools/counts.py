"""The per-chunk flop counts of ``dpfp_jax/ops/fast_weight/context_cost.py`` next to XLA's own count
(``cost_analysis()``) of the programs they count, on one chunk (B = H = 1, T = C), where every scan
runs once, so XLA counting a loop's body once is exact.

Shared by tests/test_context_parallel.py (the walks' counts within 2% of XLA's) and
``benchmarks/context_parallel.py --check-counts`` (the table), so both compile the same programs.

Example:
    >>> import jax.numpy as jnp
    >>> xla_flops(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 2)))  # 4 * 2 * 8 multiply-adds
    128.0
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dpfp_jax.ops.fast_weight import context_cost
from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk
from dpfp_jax.ops.fast_weight.context_parallel import _end_state, _entering_gradient, _transition

Row = tuple[str, float, float]
"""(program, XLA's flops, the counted flops)."""


def xla_flops(fn: Callable, *args: object) -> float:
    """XLA's flop count of ``jax.jit(fn)`` compiled for ``args``."""
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def _one_chunk(c: int, k: int, v: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Keys (also the queries) ``[1, C, 1, K]``, values ``[1, C, 1, V]``, beta, a ``[1, 1, K, V]`` state."""
    return jnp.ones((1, c, 1, k)), jnp.ones((1, c, 1, v)), jnp.ones((1, c, 1)), jnp.zeros((1, 1, k, v))


def chunk_rows(c: int = 64, k: int = 128, v: int = 64) -> list[Row]:
    """The delta rule's chunk form on one chunk: its forward, and its forward+backward. In the latter
    XLA merges the backward's recomputed pieces with the forward's (the same computation, both alive
    in one program), so it is compared with the count less one set of pieces."""
    keys, values, beta, state = _one_chunk(c, k, v)

    def op(q, k, v, beta, w):
        return fast_weight_chunk(q, k, v, beta, w, rule="delta", scale=1.0, chunk_size=c)

    def pullback(q, k, v, beta, w, d_out, d_state):  # cotangents as inputs: nothing folds as a constant
        return jax.vjp(op, q, k, v, beta, w)[1]((d_out, d_state))

    pieces = 8 * c * c * k + 2 * c * c * v + c**3
    forward = context_cost.chunk_forward(c, k, v)
    return [(f"chunk forward, C={c} K={k} V={v}", xla_flops(op, keys, keys, values, beta, state), forward),
            ("chunk forward+backward (less one set of pieces)",
             xla_flops(pullback, keys, keys, values, beta, state, values, state),
             forward + context_cost.chunk_backward(c, k, v) - pieces)]


def walk_rows(c: int = 64, k: int = 128, v: int = 64) -> list[Row]:
    """The context-parallel walks of the delta rule on one chunk: the transition ``(M, N)``, the
    relay's end-state walk, ``G`` from zero (the transition scheme's) and from a given end-state
    gradient (the relay's)."""
    keys, values, beta, state = _one_chunk(c, k, v)
    one = jnp.float32(1)
    return [
        ("transition (M, N)", xla_flops(lambda k, v, b: _transition("delta", k, v, b, None, jnp.float32, c), keys,
                                        values, beta), context_cost.transition(c, k, v)),
        ("end-state walk (relay)", xla_flops(lambda k, v, b, w: _end_state("delta", k, v, b, None, w, c), keys,
                                             values, beta, state), context_cost.end_state_walk(c, k, v)),
        ("G", xla_flops(lambda q, k, b, d: _entering_gradient("delta", q, k, b, None, one, d, c), keys, keys, beta,
                        values), context_cost.entering_gradient(c, k, v)),
        ("G from an end-state gradient (relay)",
         xla_flops(lambda q, k, b, d, e: _entering_gradient("delta", q, k, b, None, one, d, c, d_end=e), keys, keys,
                   beta, values, state), context_cost.entering_gradient(c, k, v)),
    ]
