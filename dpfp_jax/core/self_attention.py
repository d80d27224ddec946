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
A mask's query axis may be 1, broadcast over the queries as Flax does: Flax's key-padding mask
``pad[:, None, None, :]`` (``[B, 1, 1, T]``) is the padding ``pad``.

**While decoding** (one or more new tokens per call, the memory carried in a cache), Flax takes a
mask over the whole cache, ``[B, 1 or H, T or 1, max_len]``, and masks the cache positions after
the current one itself. There the layer reads each new token's own entry (at its position, the
cache's count of tokens so far, :func:`padding_of_decode_mask`): what earlier tokens wrote was
decided by the masks of the calls that wrote them, and the entries after it are ignored, as
Flax ignores them.

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


def self_attention_arguments(inputs_q: Array, inputs_k: object, inputs_v: object, mask: object,
                             deterministic: bool | None) -> tuple[object, object, object, bool | None]:
    """``(inputs_k, inputs_v, mask, deterministic)`` of a call made as ``nn.MultiHeadDotProductAttention``'s
    (``layer(x, inputs_k, inputs_v, mask=...)``) or as ``nn.SelfAttention``'s (``layer(x, mask,
    deterministic)``): a second positional argument that is no input but a mask (of rank 2 or 4, or
    boolean: an input is ``[B, T, D]`` floats) is ``nn.SelfAttention``'s mask, and a third one then its
    ``deterministic``. A mask given both ways is a ValueError.

    Example:
        >>> import jax.numpy as jnp
        >>> x, mask = jnp.ones((1, 3, 4)), jnp.ones((1, 1, 3, 3), bool)
        >>> k, v, m, deterministic = self_attention_arguments(x, mask, True, None, None)
        >>> k is None, v is None, m is mask, deterministic
        (True, True, True, True)
    """
    looks_like_mask = (isinstance(inputs_k, jax.Array | np.ndarray)
                       and (inputs_k.ndim in (2, 4) or inputs_k.dtype == jnp.bool_))
    if not looks_like_mask:
        return inputs_k, inputs_v, mask, deterministic
    if mask is not None:
        raise ValueError("mask given twice: as the second positional argument (nn.SelfAttention's call) and as "
                         "mask=; pass it once")
    if inputs_v is not None:
        if not isinstance(inputs_v, bool) or deterministic is not None:
            raise ValueError("after a positional mask (nn.SelfAttention's call: inputs_q, mask, deterministic) "
                             f"the third positional argument is deterministic, a bool; got {type(inputs_v).__name__}"
                             + (" and deterministic= too" if deterministic is not None else ""))
        deterministic = inputs_v
    return None, None, inputs_k, deterministic


def check_sow_weights(sow_weights: bool) -> None:
    """``sow_weights=True`` asks for attention weights, which a fast-weight layer never forms."""
    if sow_weights:
        raise ValueError("sow_weights=True: a fast-weight layer forms no [T, T] attention weights to sow")


def check_is_causal(is_causal: bool | None) -> None:
    """``nnx.MultiHeadAttention``'s ``is_causal``: True (or None, not given) is what this layer does
    anyway; False asks it to attend to later tokens too, which a causal layer cannot."""
    if is_causal is None or is_causal is True:
        return
    if is_causal is False:
        raise ValueError("is_causal=False asks for attention to later tokens as well (unless the mask forbids it), "
                         "which this causal layer cannot compute: leave is_causal out or pass True (a causal mask "
                         "given as mask= is honoured without it)")
    raise TypeError(f"is_causal must be a bool or None; got {is_causal!r}")


def qkv_head_dim(qkv_features: int, num_heads: int) -> int:
    """``qkv_features // num_heads``, a ValueError unless it divides evenly."""
    check_positive_int("num_heads", num_heads)
    check_positive_int("qkv_features", qkv_features)
    if qkv_features % num_heads:
        raise ValueError(f"qkv_features ({qkv_features}) must be divisible by num_heads ({num_heads})")
    return qkv_features // num_heads


def check_mask_array(mask: object) -> None:
    """A TypeError naming ``mask`` unless it is an array: a list (or a Python bool) would be read
    with whatever shape and dtype ``jnp.asarray`` gives it, so it is refused as ``segment_ids``
    are (:func:`dpfp_jax.fast_weight`'s check)."""
    if not isinstance(mask, jax.Array | np.ndarray):
        raise TypeError(f"mask must be an array (jax.Array or numpy.ndarray); got {type(mask).__name__}")


def _as_4d(mask: Array, batch: int, num_heads: int, length: int,
           key_length: int | None = None) -> Array | np.ndarray:
    """The mask as booleans ``[B or 1, H or 1, T, key_length]`` (key_length: T unless given), a
    query axis of 1 broadcast: numpy when its values are known (so it is checked while tracing,
    also inside ``jit``), else the traced array."""
    check_mask_array(mask)
    key_length = length if key_length is None else key_length
    expected = (f"[B or 1, H or 1, T or 1, {'T' if key_length == length else 'max_len'}] = "
                f"[{batch} or 1, {num_heads} or 1, {length} or 1, {key_length}] (leading 1s may be left out)")
    if not 2 <= mask.ndim <= 4:
        raise ValueError(f"mask must be {expected}; got shape {mask.shape}")
    shape = (1,) * (4 - mask.ndim) + mask.shape
    if (shape[0] not in (1, batch) or shape[1] not in (1, num_heads) or shape[2] not in (1, length)
            or shape[3] != key_length):
        raise ValueError(f"mask must be {expected}; got shape {mask.shape}")
    # Flax's make_attention_mask and make_causal_mask give float32 0/1 by default, so floats are
    # taken too, as long as they hold nothing but 0 and 1 (read as mask != 0, as Flax does).
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)
            or jnp.issubdtype(mask.dtype, jnp.floating)):
        raise TypeError(f"mask must hold booleans or 0/1 (True: may attend); got dtype {mask.dtype}")
    full = shape[:2] + (length, key_length)
    if isinstance(mask, jax.core.Tracer):
        return jnp.broadcast_to(mask.reshape(shape) != 0, full)
    values = np.asarray(mask).reshape(shape)
    stray = np.unique(values[(values != 0) & (values != 1)])
    if stray.size:
        raise ValueError(f"mask must hold only 0 and 1 (or booleans); got the values {stray[:8].tolist()}")
    return np.broadcast_to(values != 0, full)


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


def padding_of_decode_mask(
    mask: Array, *, batch: int, num_heads: int, length: int, index: Array | int
) -> tuple[Array, Array | None]:
    """``(padding [B, T] bool, valid)`` of a decode-time mask ``[B or 1, H or 1, T or 1, max_len]``
    over the whole cache, for the ``length`` new tokens at positions ``index, ..., index + T - 1``.

    A new token is real where its own entry (its row, its position) is set. Heads may not differ.
    A position past ``max_len`` is a ValueError when ``index`` is known; a traced ``index`` (the
    cache under ``jit``) cannot raise, so ``valid [B]`` then says which rows fit (all or none)
    and the layer makes the others NaN, as :func:`padding_of_mask` does for a traced mask.

    Example:
        >>> import numpy as np
        >>> pad = np.array([[True, True, False, True]])
        >>> padding, valid = padding_of_decode_mask(pad[:, None, None, :], batch=1, num_heads=2, length=1, index=2)
        >>> padding.tolist(), valid
        ([[False]], None)
    """
    max_len = np.shape(mask)[-1]
    m = _as_4d(mask, batch, num_heads, length, key_length=max_len)
    if isinstance(m, np.ndarray) and not (m == m[:, :1]).all():
        raise ValueError("mask must be the same for every head (a padding mask); the decode-time mask's heads differ")
    known = not isinstance(index, jax.core.Tracer)
    if known and int(index) + length > max_len:
        raise ValueError(f"the decode-time mask covers {max_len} positions (max_len), but this call's {length} "
                         f"token(s) are at positions {int(index)}..{int(index) + length - 1}")
    positions = jnp.minimum(jnp.asarray(index) + jnp.arange(length), max_len - 1)
    rows = jnp.asarray(m[:, 0])  # [B or 1, T, max_len]
    padding = jnp.take_along_axis(rows, jnp.broadcast_to(positions[None, :, None], (rows.shape[0], length, 1)),
                                  axis=-1)[..., 0]
    padding = jnp.broadcast_to(padding, (batch, length))
    if known and not isinstance(m, jax.core.Tracer):
        return padding, None
    valid = jnp.asarray(index) + length <= max_len
    if isinstance(m, jax.core.Tracer):
        valid = valid & (m == m[:, :1]).all(axis=(1, 2, 3))
    return padding, jnp.broadcast_to(valid, (batch,))


def poison_invalid_rows(y: Array, valid: Array | None) -> Array:
    """``y [B, ...]`` with the rows whose traced mask was not a padding mask set to NaN.

    Multiplied by NaN, not selected: a select would give those rows a zero gradient, so a loss that
    is NaN would still give finite parameter gradients and training would go on; multiplied, the
    NaN reaches the gradients too (``0 * nan`` is NaN, even where the loss ignores those rows).
    """
    if valid is None:
        return y
    poison = jnp.where(valid, 1.0, jnp.nan).astype(y.dtype)
    return y * poison.reshape(valid.shape + (1,) * (y.ndim - 1))
