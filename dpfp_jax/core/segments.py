"""Packed documents in the layers: what restarts, besides the fast weights, where a document starts.

The op restarts W itself (``fast_weight(..., segment_ids=)``). The layers add two carried
things: ``normalization="attention"``'s running key sum z, which restarts with W
(:func:`running_key_sum`, which lives with the op's segments so that the context-parallel
op can use it too), and the decode cache, which remembers each row's last segment id so
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

from dpfp_jax.ops.fast_weight.segments import running_key_sum

Array = jax.Array

__all__ = ["SEGMENT_ID_DTYPE", "decode_restart", "last_segment_id", "restart_rows", "running_key_sum"]

SEGMENT_ID_DTYPE = jnp.int32
"""The decode cache keeps each row's last segment id as int32 (ids of 32 bits or fewer compare exactly)."""


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
