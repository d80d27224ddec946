"""Packed documents: where ``segment_ids`` change, the fast weights restart from zero.

Every implementation takes the same per-step flags, ``resets [B, T]`` (True where step t starts a
new document, so the state is zeroed before step t writes), made once by :func:`resets_of`. Step 0
never resets: ``initial_state`` belongs to the row's first document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
