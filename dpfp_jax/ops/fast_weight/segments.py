"""Packed documents: where ``segment_ids`` change, the fast weights restart from zero.

Every implementation takes the same per-step flags, ``resets [B, T]`` (True where step t starts a
new document, so the state is zeroed before step t writes), made once by :func:`resets_of`. Step 0
never resets: ``initial_state`` belongs to the row's first document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def resets_of(segment_ids: Array) -> Array:
    """``resets [B, T]`` bool: True at every step whose id differs from the step before.

    A document is a maximal run of equal ids, so ids need not be sorted or start at zero, and an
    id that comes back later (``[7, 7, 3, 7]``) starts a new document.

    Example:
        >>> import jax.numpy as jnp
        >>> resets_of(jnp.array([[7, 7, 3, 7, 7]])).astype(int).tolist()
        [[0, 0, 1, 1, 0]]
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    # Built from a slice of the ids, not from fresh zeros, so it keeps their batch sharding.
    first = segment_ids[:, :1] != segment_ids[:, :1]
    return jnp.concatenate([first, changed], axis=1)


def _segmented_add(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
    # Associative: the later run restarts the sum if it holds a reset, else adds to it.
    reset_a, sum_a = a
    reset_b, sum_b = b
    return reset_a | reset_b, jnp.where(reset_b, sum_b, sum_a + sum_b)


def running_key_sum(phi_k: Array, start: Array, resets: Array | None = None) -> Array:
    """``z_t`` ``[B, T, H, K]`` float32: the sum of ``phi_k`` over the steps of t's document up to t.

    The row's first document (the steps before its first reset) adds ``start [B, H, K]`` (the
    carried key sum); a reset at step t (``resets [B, T]`` True, as
    :func:`dpfp_jax.ops.fast_weight.segments.resets_of` makes them) drops everything before t.
    Without resets it is a plain cumulative sum; with them a segmented one, as a parallel
    (associative) scan, so no document's sum is made by subtracting another's.
    """
    x = phi_k.astype(jnp.float32)
    if resets is None or x.shape[1] == 0:
        return start[:, None] + jnp.cumsum(x, axis=1)
    flags = resets[:, :, None, None]
    _, within = lax.associative_scan(_segmented_add, (flags, x), axis=1)
    first_document = jnp.cumsum(resets, axis=1) == 0
    return within + jnp.where(first_document[:, :, None, None], start[:, None], 0)
