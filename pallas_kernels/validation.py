"""Trace-time argument checks of the kernels' public entry points.

The kernels are also called directly (benchmarks, tests, other libraries), not only through a
dispatcher that has checked the call already, so each entry point checks its own arguments here:
a bad call fails with a ValueError/TypeError naming the argument, what was seen and what was
expected, instead of an AttributeError deep in a kernel or, worse, a silently different op. This
module imports nothing outside ``pallas_kernels`` and JAX.
"""

from __future__ import annotations

import inspect
import numbers

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

RULES = ("delta", "sum")

# The largest key dimension any kernel takes. The fused recurrent kernel holds a [K, BV] slice of
# the state in registers with BV >= 16: beyond K = 1024 it would spill most of it. The chunked
# kernels walk K in tiles and share the bound, so every Pallas path accepts the same calls.
MAX_KEY_DIM = 1024

# The smallest chunk a tensor-core dot tiles (``tl.dot`` needs both sides >= 16).
MIN_CHUNK_SIZE = 16


def _check_array(name: str, x: object) -> None:
    """``x`` must be an array (anything with a shape and a dtype: jax, numpy, a tracer or a
    ``ShapeDtypeStruct``); the message names its type, never its contents (a list may be long).

    Example:
        >>> _check_array("q", [[1.0, 2.0]] * 1000)
        Traceback (most recent call last):
        ...
        TypeError: q must be an array (jax.Array or numpy.ndarray); got list of length 1000
    """
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        length = f" of length {len(x)}" if isinstance(x, list | tuple) else ""
        raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray); got {type(x).__name__}{length}")


def _check_float(name: str, x: Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")


def check_key_dim(key_dim: int, name: str = "q") -> None:
    """K (the last axis of ``name``) must be at most ``MAX_KEY_DIM``."""
    if key_dim > MAX_KEY_DIM:
        raise ValueError(f"{name}: the Pallas kernels take K <= {MAX_KEY_DIM}; got K={key_dim}")


def check_scale(scale: object) -> None:
    """``scale`` must be a real scalar: a Python number or a 0-d array (traced or not)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number, np.ndarray, jax.Array)):
        raise TypeError(f"scale must be a real number or a 0-d float array; got {type(scale).__name__}")
    if np.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar (0-d); got shape {np.shape(scale)}")
    dtype = jnp.result_type(scale)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"scale must be a real number; got dtype {dtype}")


def check_int(name: str, value: object) -> int:
    """``value`` as an int if it is an integer (a Python int or a numpy integer such as ``np.int64(32)``);
    a bool or a float is refused (TypeError), not converted.

    Example:
        >>> import numpy as np
        >>> check_int("chunk_size", np.int64(32)), type(check_int("chunk_size", np.int64(32))).__name__
        (32, 'int')
        >>> check_int("chunk_size", 32.0)
        Traceback (most recent call last):
        ...
        TypeError: chunk_size must be an int; got float 32.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    return int(value)


def check_chunk_size(chunk_size: object) -> int:
    """``chunk_size`` must be an int power of two >= ``MIN_CHUNK_SIZE``; returned as an int."""
    chunk_size = check_int("chunk_size", chunk_size)
    if chunk_size < MIN_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= {MIN_CHUNK_SIZE}; got chunk_size={chunk_size} "
                         f"({MIN_CHUNK_SIZE} is the smallest tile a tensor-core dot takes)")
    return chunk_size


def check_interpret(interpret: object, *params: type) -> None:
    """``interpret`` must be a bool (numpy's included), or an instance of one of ``params`` (the
    TPU kernel also takes a ``pltpu.InterpretParams``): a string such as ``"yes"`` is refused,
    not read by its truth value.

    Example:
        >>> check_interpret("yes")
        Traceback (most recent call last):
        ...
        TypeError: interpret must be a bool (True runs Pallas's interpreter); got 'yes' of type str
    """
    if not isinstance(interpret, (bool, np.bool_, *params)):
        also = "".join(f" or {p.__name__}" for p in params)
        raise TypeError(f"interpret must be a bool (True runs Pallas's interpreter){also}; got {interpret!r} of type "
                        f"{type(interpret).__name__}")


def empty_result(v: Array, initial_state: Array, q: Array) -> tuple[Array, Array] | None:
    """``(out, final_state)`` of a call with nothing to compute, else None.

    When B, T, H, K or V is 0 there is no step to take or no output element to compute, and a
    kernel cannot be launched over an empty grid: ``out`` is then zeros ``[B, T, H, V]`` in v's
    dtype (for K = 0, W^T q is a sum of no terms) and ``final_state`` the initial state in float32,
    as ``dpfp_jax.fast_weight`` returns for such calls.

    Example:
        >>> import jax.numpy as jnp
        >>> out, state = empty_result(jnp.ones((1, 0, 2, 4)), jnp.ones((1, 2, 8, 4)), jnp.ones((1, 0, 2, 8)))
        >>> out.shape, state.dtype, float(state.sum())
        ((1, 0, 2, 4), dtype('float32'), 64.0)
    """
    if 0 not in (*q.shape, *v.shape):
        return None
    return jnp.zeros(v.shape, v.dtype), initial_state.astype(jnp.float32)


def check_positive_int(name: str, value: object) -> int:
    """``value`` must be an int >= 1; returned as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {name}={value!r}")
    return int(value)


def check_wy_inverse(rule: str, wy_inverse: object, packed: bool = False, gated: bool = False) -> None:
    """The delta rule's per-chunk WY inverse comes from the caller as a function; the sum rule takes none.
    With packed documents (``packed``) it is also given the same-document mask, so it must take three
    arguments; gated (``gated``), the decay-weighted Gram matrix as ``gram=``.

    Example:
        >>> check_wy_inverse("sum", lambda k, beta: k)
        Traceback (most recent call last):
        ...
        ValueError: wy_inverse is only used by rule='delta'; got a function with rule='sum'
    """
    if rule == "delta" and wy_inverse is None:
        raise ValueError("wy_inverse is required for rule='delta': a function (k [..., C, K], beta [..., C]) -> "
                         "A^-1 [..., C, C] with A = I + diag(beta) strict_tril(K K^T); got None")
    if rule == "delta" and not callable(wy_inverse):
        raise TypeError(f"wy_inverse must be a function (k, beta) -> A^-1; got {type(wy_inverse).__name__}")
    if rule == "delta" and (packed or gated):
        try:
            signature = inspect.signature(wy_inverse)
        except (TypeError, ValueError):  # no signature to read (some builtins): the call will tell
            signature = None
        if signature is not None:
            if gated:
                args, kwargs = (None, None), {"gram": None}
                needs = ("with log_decay, wy_inverse is called as wy_inverse(k, beta, gram=G) and must use G "
                         "[..., C, C] (the Gram matrix times the decays) in place of K K^T")
            else:
                args, kwargs = (None, None, None), {}
                needs = ("with resets, wy_inverse is called as wy_inverse(k, beta, same_document) and must mask "
                         "the Gram matrix with same_document [..., C, C]")
            try:
                signature.bind(*args, **kwargs)
            except TypeError:
                raise TypeError(f"{needs}; got a function "
                                f"{getattr(wy_inverse, '__name__', type(wy_inverse).__name__)}{signature}") from None
    if rule != "delta" and wy_inverse is not None:
        seen = "a function" if callable(wy_inverse) else type(wy_inverse).__name__
        raise ValueError(f"wy_inverse is only used by rule='delta'; got {seen} with rule={rule!r}")


def check_wy_inverse_result(inverse: object, expected: tuple[int, ...]) -> None:
    """What ``wy_inverse`` returned must be a floating ``[..., C, C]`` array of the expected shape."""
    shape = getattr(inverse, "shape", None)
    if shape is None or tuple(shape) != expected:
        raise ValueError(f"wy_inverse must return A^-1 of shape [..., C, C] = {expected}; got "
                         f"{type(inverse).__name__ if shape is None else tuple(shape)}")
    _check_float("wy_inverse's result", inverse)


def check_resets(resets: object, q: Array) -> None:
    """``resets`` (packed documents) must be None or a bool array ``[B, T]`` with q's B and T: True
    where a step starts a new document.

    Example:
        >>> import jax.numpy as jnp
        >>> check_resets(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5, 1, 4)))
        Traceback (most recent call last):
        ...
        TypeError: resets must be a bool array [B, T] (True where a new document starts); got dtype int32
    """
    if resets is None:
        return
    shape = getattr(resets, "shape", None)
    if shape is None or not hasattr(resets, "dtype"):
        raise TypeError(f"resets must be a bool array [B, T] (True where a new document starts); "
                        f"got {type(resets).__name__}")
    if resets.dtype != jnp.bool_:
        raise TypeError(f"resets must be a bool array [B, T] (True where a new document starts); "
                        f"got dtype {resets.dtype}")
    if tuple(shape) != tuple(q.shape[:2]):
        raise ValueError(f"resets must be [B, T] = {tuple(q.shape[:2])} (one flag per batch row and step); "
                         f"got shape {tuple(shape)}")


def check_log_decay(log_decay: object, q: Array) -> None:
    """``log_decay`` (gated fast weights) must be None or a floating ``[B, T, H]`` array with q's B, T, H.

    Example:
        >>> import jax.numpy as jnp
        >>> check_log_decay(jnp.zeros((1, 4)), jnp.ones((1, 4, 2, 8)))
        Traceback (most recent call last):
        ...
        ValueError: log_decay must be [B, T, H] = (1, 4, 2) (log alpha per batch row, step and head); got shape (1, 4)
    """
    if log_decay is None:
        return
    _check_array("log_decay", log_decay)
    if tuple(log_decay.shape) != tuple(q.shape[:3]):
        raise ValueError(f"log_decay must be [B, T, H] = {tuple(q.shape[:3])} (log alpha per batch row, step and "
                         f"head); got shape {tuple(log_decay.shape)}")
    _check_float("log_decay", log_decay)


def check_kernel_inputs(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    rule: object,
    scale: object,
    resets: object = None,
    state_key_dim: int | None = None,
) -> None:
    """The fused kernels' contract: ``rule`` in ``RULES``; q, k ``[B, T, H, K]`` with K <=
    ``MAX_KEY_DIM``; v ``[B, T, H, V]``; beta ``[B, T, H]`` for the delta rule and None for the
    sum rule; initial_state ``[B, H, K, V]`` (K = ``state_key_dim`` when given: a kernel that maps
    q and k itself); all floating; ``scale`` a real scalar; ``resets`` None or bool ``[B, T]``
    (``check_resets``).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((1, 4, 2, 8))
        >>> check_kernel_inputs(x, x, x, None, jnp.zeros((1, 2, 8, 8)), rule="delta", scale=1.0)
        Traceback (most recent call last):
        ...
        ValueError: beta is required for rule='delta': the write strengths, [B, T, H] = (1, 4, 2); got None
    """
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("initial_state", initial_state)):
        if x is not None or name in ("q", "k", "v"):
            _check_array(name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name} must be 4-D [batch, time, heads, features]; got shape {tuple(x.shape)}")
        _check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K] = {q.shape}; got {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H = {q.shape[:3]}; got {v.shape}")
    if state_key_dim is None:  # a kernel that maps q, k itself checks its map's K (and names the map)
        check_key_dim(q.shape[-1])
    if rule == "delta":
        if beta is None:
            raise ValueError(f"beta is required for rule='delta': the write strengths, [B, T, H] = {q.shape[:3]}; "
                             "got None")
        if beta.shape != q.shape[:3]:
            raise ValueError(f"beta must be [B, T, H] = {q.shape[:3]}; got {beta.shape}")
        _check_float("beta", beta)
    elif beta is not None:
        raise ValueError(f"beta is only used by rule='delta'; got beta of shape {beta.shape} with rule='sum'")
    expected = (q.shape[0], q.shape[2], q.shape[3] if state_key_dim is None else state_key_dim, v.shape[3])
    if initial_state is None or initial_state.shape != expected:
        raise ValueError(f"initial_state must be [B, H, K, V] = {expected}; "
                         f"got {None if initial_state is None else initial_state.shape}")
    _check_float("initial_state", initial_state)
    check_scale(scale)
    check_resets(resets, q)


def check_recurrence_inputs(per_key: dict[str, Array | None], per_value: dict[str, Array],
                            states: dict[str, Array]) -> None:
    """The chunk recurrence's contract: chunked arrays ``[N, G, C, K]`` (``per_key``, None
    skipped) and ``[N, G, C, V]`` (``per_value``), states ``[G, K, V]``, K <= ``MAX_KEY_DIM``.

    The first ``per_key`` and ``per_value`` arrays set N, G, C, K and V.
    """
    (first_key, keys), (first_value, values) = next(iter(per_key.items())), next(iter(per_value.items()))
    if len(keys.shape) != 4:
        raise ValueError(f"{first_key} must be 4-D [chunks, batch x heads, chunk, K]; got shape {keys.shape}")
    if len(values.shape) != 4 or values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"{first_value} must be [N, G, C, V] with {first_key}'s N, G, C = {keys.shape[:3]}; "
                         f"got {values.shape}")
    for name, x in per_key.items():
        if x is not None and x.shape != keys.shape:
            raise ValueError(f"{name} must have {first_key}'s shape [N, G, C, K] = {keys.shape}; got {x.shape}")
    for name, x in per_value.items():
        if x.shape != values.shape:
            raise ValueError(f"{name} must have {first_value}'s shape [N, G, C, V] = {values.shape}; got {x.shape}")
    expected = (keys.shape[1], keys.shape[3], values.shape[3])
    for name, x in states.items():
        if x.shape != expected:
            raise ValueError(f"{name} must be [G, K, V] = {expected}; got {x.shape}")
    check_key_dim(keys.shape[-1], first_key)


def check_chunk_documents(keep: object, states: object, num_chunks: int, groups: int, key_dim: int,
                          value_dim: int, *, states_expected: bool, gated: bool = False) -> None:
    """The chunk recurrence's packed documents: ``keep`` None or bool ``[N, G]`` (False for a chunk
    in which a document starts); the backward's ``states`` (each chunk's start state, from the
    forward) float ``[N, G, K, V]``, given exactly when ``keep`` is, or the walk is ``gated`` (a ``decay``).

    Example:
        >>> import jax.numpy as jnp
        >>> check_chunk_documents(jnp.ones((2, 3), bool), None, 2, 3, 8, 4, states_expected=True)
        Traceback (most recent call last):
        ...
        ValueError: states is required with keep: the forward's chunk start states [N, G, K, V] = (2, 3, 8, 4); got None
    """
    if keep is not None:
        if not hasattr(keep, "shape") or getattr(keep, "dtype", None) != jnp.bool_:
            raise TypeError(f"keep must be a bool array [N, G] (False where a document starts in the chunk); got "
                            f"{getattr(keep, 'dtype', type(keep).__name__)}")
        if tuple(keep.shape) != (num_chunks, groups):
            raise ValueError(f"keep must be [N, G] = {(num_chunks, groups)}; got shape {tuple(keep.shape)}")
    if not states_expected:
        return
    expected = (num_chunks, groups, key_dim, value_dim)
    given = "decay" if gated else "keep"
    if (keep is not None or gated) and states is None:
        raise ValueError(f"states is required with {given}: the forward's chunk start states [N, G, K, V] = "
                         f"{expected}; got None")
    if keep is None and not gated and states is not None:
        raise ValueError("states is only used with keep (packed documents) or decay (gated); got states and neither")
    if states is not None:
        if getattr(states, "shape", None) is None or tuple(states.shape) != expected:
            raise ValueError(f"states must be [N, G, K, V] = {expected}; got {getattr(states, 'shape', states)}")
        _check_float("states", states)


def check_chunk_decay(decay: object, keep: object, num_chunks: int, groups: int) -> None:
    """The chunk recurrence's gate: ``decay`` None or a float ``[N, G]`` array (what each chunk's
    start state leaves in its end state), never together with ``keep`` (a reset is a decay of 0).

    Example:
        >>> import jax.numpy as jnp
        >>> check_chunk_decay(jnp.ones((2, 3)), jnp.ones((2, 3), bool), 2, 3)
        Traceback (most recent call last):
        ...
        ValueError: decay and keep are exclusive: gated, a chunk in which a document starts has decay 0; got both
    """
    if decay is None:
        return
    if keep is not None:
        raise ValueError("decay and keep are exclusive: gated, a chunk in which a document starts has decay 0; "
                         "got both")
    _check_array("decay", decay)
    if tuple(decay.shape) != (num_chunks, groups):
        raise ValueError(f"decay must be [N, G] = {(num_chunks, groups)}; got shape {tuple(decay.shape)}")
    _check_float("decay", decay)
