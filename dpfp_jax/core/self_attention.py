"""What the drop-in causal self-attention layers accept in place of Flax's dot-product attention.

Flax's ``MultiHeadDotProductAttention`` takes a query, key and value input and a ``mask``
broadcastable to ``[B, H, T_q, T_k]`` (True: may attend). A fast-weight layer is causal
self-attention: one input, each token reading the tokens up to itself. So the drop-ins take the
key and value inputs only when they are the query input itself, and a mask only when it is a
padding mask; these functions decide that.

**A padding mask** says which tokens are real (``p [B, T]``, read on the mask's diagonal: a real
token attends to itself) and nothing else: every real query's row is ``p`` (Flax's
``make_attention_mask(pad, pad)``: the layer is causal all the same) or ``p`` up to the query
(that combined with ``make_causal_mask``) — one of the two forms throughout — and a padded
query's row is empty or of that same form (key-only padding, ``make_attention_mask(ones, pad)``).
Heads may not differ. Anything else (sliding windows, prefixes attending ahead, per-head masks,
a token that is read by others but does not read itself) is refused: the layer cannot compute it.

Example:
    >>> import jax.numpy as jnp
    >>> import flax.linen as nn
    >>> pad = jnp.array([[True, True, True, False]])
    >>> mask = nn.combine_masks(nn.make_attention_mask(pad, pad), nn.make_causal_mask(pad))
    >>> padding, valid = padding_of_mask(mask, batch=1, num_heads=2, length=4)
    >>> padding.tolist(), valid
    ([[True, True, True, False]], None)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpfp_jax.validation import check_positive_int

Array = jax.Array


def check_self_inputs(inputs_q: Array, inputs_k: Array | None, inputs_v: Array | None,
                      inputs_kv: Array | None = None) -> None:
    """A ValueError naming ``inputs_k``, ``inputs_v`` or ``inputs_kv`` if one is given and is not the
    query input itself (the same array object: values cannot be compared under ``jit``)."""
    for name, other in (("inputs_k", inputs_k), ("inputs_v", inputs_v), ("inputs_kv", inputs_kv)):
        if other is not None and other is not inputs_q:
            raise ValueError(
                f"{name} must be None or inputs_q itself: this layer is causal self-attention (fast weights "
                "written and read by the same sequence), it does not attend from one sequence to another; "
                f"got a different array of shape {getattr(other, 'shape', type(other).__name__)}"
            )


def check_sow_weights(sow_weights: bool) -> None:
    """``sow_weights=True`` asks for attention weights, which a fast-weight layer never forms."""
    if sow_weights:
        raise ValueError("sow_weights=True: a fast-weight layer forms no [T, T] attention weights to sow")


def qkv_head_dim(qkv_features: int, num_heads: int) -> int:
    """``qkv_features // num_heads``, a ValueError unless it divides evenly."""
    check_positive_int("num_heads", num_heads)
    check_positive_int("qkv_features", qkv_features)
    if qkv_features % num_heads:
        raise ValueError(f"qkv_features ({qkv_features}) must be divisible by num_heads ({num_heads})")
    return qkv_features // num_heads


def _as_4d(mask: Array, batch: int, num_heads: int, length: int) -> Array | np.ndarray:
    """The mask as booleans ``[B or 1, H or 1, T, T]``: numpy when its values are known (so it is
    checked while tracing, also inside ``jit``), else the traced array."""
    mask = mask if isinstance(mask, jax.Array | np.ndarray) else np.asarray(mask)
    expected = (f"[B or 1, H or 1, T, T] = [{batch} or 1, {num_heads} or 1, {length}, {length}] "
                "(leading 1s may be left out)")
    if not 2 <= mask.ndim <= 4:
        raise ValueError(f"mask must be {expected}; got shape {mask.shape}")
    shape = (1,) * (4 - mask.ndim) + mask.shape
    if shape[0] not in (1, batch) or shape[1] not in (1, num_heads) or shape[2:] != (length, length):
        raise ValueError(f"mask must be {expected}; got shape {mask.shape}")
    # Flax's make_attention_mask and make_causal_mask give float32 0/1 by default, so floats are
    # taken too, as long as they hold nothing but 0 and 1 (read as mask != 0, as Flax does).
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)
            or jnp.issubdtype(mask.dtype, jnp.floating)):
        raise TypeError(f"mask must hold booleans or 0/1 (True: may attend); got dtype {mask.dtype}")
    if isinstance(mask, jax.core.Tracer):
        return mask.reshape(shape) != 0
    values = np.asarray(mask).reshape(shape)
    stray = np.unique(values[(values != 0) & (values != 1)])
    if stray.size:
        raise ValueError(f"mask must hold only 0 and 1 (or booleans); got the values {stray[:8].tolist()}")
    return values != 0


def padding_of_mask(
    mask: Array | None, *, batch: int, num_heads: int, length: int
) -> tuple[Array | None, Array | None]:
    """``(padding [B, T] bool, valid)`` of a Flax attention mask, or ``(None, None)`` without one.

    A mask whose values are known (not traced: made outside ``jit``, or a constant inside it)
    that is not a padding mask (see the module docstring) is a ValueError naming ``mask``. A
    traced one cannot be checked while tracing: ``valid [B]`` then says which rows' masks are
    padding masks, and the layer makes the other rows' outputs NaN rather than read them as
    something they are not. ``valid`` is None when checked here.
    """
    if mask is None:
        return None, None
    m = _as_4d(mask, batch, num_heads, length)
    xp = np if isinstance(m, np.ndarray) else jnp
    steps = xp.arange(length)
    padding = xp.diagonal(m[:, 0], axis1=-2, axis2=-1)  # [B or 1, T]: a real token attends to itself
    real_query = padding[:, None, :, None]
    empty_row = ~m.any(axis=-1, keepdims=True)
    valid = xp.zeros(m.shape[:1], bool)
    # The rows of every real query either all read the whole padding or all read it up to themselves.
    for form in (padding[:, None, None, :], padding[:, None, None, :] & (steps[None, :] <= steps[:, None])):
        rows_ok = xp.where(real_query, m == form, (m == form) | empty_row)
        valid = valid | rows_ok.all(axis=(1, 2, 3))
    padding = jnp.broadcast_to(jnp.asarray(padding), (batch, length))
    if xp is jnp:
        return padding, jnp.broadcast_to(valid, (batch,))
    bad = np.flatnonzero(~valid)
    if bad.size:
        raise ValueError(
            f"mask must be a padding mask (this layer is causal self-attention; it honours which tokens are "
            f"real, nothing else): the mask of batch row {int(bad[0])} is not. A padding mask is "
            "nn.make_attention_mask(pad, pad), alone or combined with nn.make_causal_mask, the same for every "
            "head; sliding windows, prefixes attending ahead and per-head masks cannot be computed here"
        )
    return padding, None


def poison_invalid_rows(y: Array, valid: Array | None) -> Array:
    """``y [B, ...]`` with the rows whose traced mask was not a padding mask set to NaN."""
    if valid is None:
        return y
    return jnp.where(valid.reshape(valid.shape + (1,) * (y.ndim - 1)), y, jnp.asarray(jnp.nan, y.dtype))
