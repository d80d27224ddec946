"""Packed documents in the layers: what restarts, besides the fast weights, where a document starts.

The op restarts W itself (``fast_weight(..., segment_ids=)``). The layers add two carried
things: ``normalization="attention"``'s running key sum z, which restarts with W
(:func:`running_key_sum`), and the decode cache, which remembers each row's last segment id so
that a call whose first token starts a new document restarts W and z (:func:`decode_restart`,
:func:`last_segment_id`, :func:`restart_rows`).

Example:
    >>> import jax.numpy as jnp
    >>> phi_k = jnp.ones((1, 5, 1, 1))
    >>> resets = jnp.array([[False, False, True, False, True]])
    >>> running_key_sum(phi_k, jnp.full((1, 1, 1), 10.0), resets)[0, :, 0, 0].tolist()
    [11.0, 12.0, 1.0, 2.0, 1.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

SEGMENT_ID_DTYPE = jnp.int32
"""The decode cache keeps each row's last segment id as int32 (ids of 32 bits or fewer compare exactly)."""


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


def restart_rows(restart: Array, state: Array) -> Array:
    """``state [B, ...]`` with the rows where ``restart [B]`` is True set to zero (selected, so a
    NaN or inf left there by a finished document does not survive)."""
    flags = restart.reshape(restart.shape + (1,) * (state.ndim - 1))
    return jnp.where(flags, jnp.zeros((), state.dtype), state)


def decode_restart(cached_id: Array, segment_ids: Array | None) -> Array | None:
    """``[B]`` bool: True for a row whose call starts a new document (its first id differs from
    the cached last one); None when the call has no ids (it continues the current document) or
    no steps."""
    if segment_ids is None or segment_ids.shape[1] == 0:
        return None
    return segment_ids[:, 0].astype(SEGMENT_ID_DTYPE) != cached_id


def last_segment_id(cached_id: Array, segment_ids: Array | None) -> Array:
    """The id the decode cache keeps after a call: the call's last one, or the cached one when the
    call has no ids or no steps."""
    if segment_ids is None or segment_ids.shape[1] == 0:
        return cached_id
    return segment_ids[:, -1].astype(SEGMENT_ID_DTYPE)
