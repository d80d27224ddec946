"""What a context-parallel call costs under each scheme, and the per-call choice between them.

Counts are flops per chunk of C steps for one (batch, head) group, a multiply-add counted as 2 and
the C x C triangular inverse as C^3 (docs/context_parallel.md derives them; the
``benchmarks.context_parallel --check-counts`` table holds them to XLA's ``cost_analysis()``).

Two schemes run a sharded T (``context_parallel.py``):

- ``"transition"``: every shard at once computes its slice's transition ``(M, N)``, the states are
  relayed as ``M W + N`` (a K x K by K x V product a round), then every shard runs its forward; the
  backward likewise with ``G`` and ``M^T``. All shards busy; ``M``'s walk costs ``4 C K^2`` a chunk.
- ``"relay"``: shard p waits for shard p - 1's end state, walks its slice's state alone from it
  (no ``M``, no outputs), passes its end on; then every shard runs its forward at once. The
  backward walks the state gradient back shard by shard the same way. Fewer flops (no ``M``), but
  the walks of shards 0..P-2 run one after the other.

The time of a call is its critical path: the work of the chain of walks a chip waits on. The
choice takes the scheme with the shorter one; ``transition`` on a tie, and always for the sum
rule, whose ``M`` is a number.
"""

from __future__ import annotations

SCHEMES = ("transition", "relay")
"""The context-parallel schemes, by the name ``fast_weight_context_parallel(scheme=)`` takes."""


def chunk_forward(c: int, k: int, v: int) -> int:
    """The chunk form's forward: pieces (scores, Gram, inverse, U_tilde, Y, Q - S Y, S U_tilde) and
    the walk (Y W0, Q_eff W0, K^T U)."""
    return 8 * c * c * k + 4 * c * c * v + c**3 + 6 * c * k * v


def chunk_backward(c: int, k: int, v: int) -> int:
    """The chunk form's backward: pieces again (``8 C^2 K + 2 C^2 V + C^3``), the reverse walk (seven
    K x V products) and the pieces' own backward (seven ``C x C x K`` and four ``C x C x V`` products)."""
    return 22 * c * c * k + 10 * c * c * v + c**3 + 14 * c * k * v


def end_state_walk(c: int, k: int, v: int) -> int:
    """A slice's end state from a given start: Gram, inverse, U_tilde, Y and the walk over the
    state (``Y W`` and ``K^T U``), no outputs."""
    return 4 * c * c * k + 2 * c * c * v + c**3 + 4 * c * k * v


def transition(c: int, k: int, v: int) -> int:
    """(M, N) of a slice: the end-state walk over N plus the walk over M (K x K, from I)."""
    return end_state_walk(c, k, v) + 4 * c * k * k


def entering_gradient(c: int, k: int, v: int) -> int:
    """G of a slice (the gradient of the state entering it, from a given end-state gradient): scores,
    Gram, inverse, Y, Q - S Y, and the state-gradient walk (three K x V products)."""
    return 8 * c * c * k + c**3 + 6 * c * k * v


def critical_path(scheme: str, shards: int, chunks: int, c: int, k: int, v: int) -> int:
    """Flops on the critical path of a forward+backward with ``chunks`` chunks per shard: the work a
    chip does plus what it waits on. The rounds' small state products are left out (``2 K^2 V`` a
    round, nothing beside the walks)."""
    own = chunk_forward(c, k, v) + chunk_backward(c, k, v)
    if scheme == "transition":
        return chunks * (own + transition(c, k, v) + entering_gradient(c, k, v))
    if scheme == "relay":
        return chunks * (own + (shards - 1) * (end_state_walk(c, k, v) + entering_gradient(c, k, v)))
    raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}")


def flops_per_chip(scheme: str, c: int, k: int, v: int) -> int:
    """Flops per chunk a chip does itself (the busiest chip: relay's last shard walks nothing)."""
    own = chunk_forward(c, k, v) + chunk_backward(c, k, v)
    if scheme == "transition":
        return own + transition(c, k, v) + entering_gradient(c, k, v)
    if scheme == "relay":
        return own + end_state_walk(c, k, v) + entering_gradient(c, k, v)
    raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}")


def choose_scheme(rule: str, shards: int, chunk_size: int, key_dim: int, value_dim: int) -> str:
    """The scheme with the shorter critical path for a call (``"transition"`` on a tie and for the
    sum rule).

    Example:
        >>> choose_scheme("delta", 2, 64, 384, 64), choose_scheme("delta", 4, 64, 128, 64)
        ('relay', 'transition')
        >>> choose_scheme("sum", 2, 64, 1024, 64)
        'transition'
    """
    if rule != "delta" or shards < 2:
        return "transition"
    costs = {s: critical_path(s, shards, 1, chunk_size, key_dim, value_dim) for s in SCHEMES}
    return "relay" if costs["relay"] < costs["transition"] else "transition"
