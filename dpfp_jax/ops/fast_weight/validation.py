"""Trace-time checks shared by every implementation of the fast-weight op."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from dpfp_jax.feature_maps import Features
from dpfp_jax.validation import check_choice

Array = jax.Array

RULES = ("delta", "sum")


def _check_array(name: str, x: object) -> None:
    # A list or a Python number would be converted by jnp silently, with a dtype and shape the
    # caller may not have meant; tracers are jax.Arrays, so this holds under jit and vmap too.
    if not isinstance(x, jax.Array | np.ndarray):
        raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray); got {type(x).__name__}")


def check_scale(scale: object) -> None:
    """Raise a TypeError/ValueError unless ``scale`` is a real scalar: a Python or numpy number, or
    a 0-d jax/numpy array of a float or int dtype (traced under jit, too)."""
    if isinstance(scale, jax.Array | np.ndarray | np.generic):
        if not (jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer)):
            raise TypeError(f"scale must be a real number; got an array of dtype {scale.dtype}")
        if scale.ndim != 0:
            raise ValueError(f"scale must be a scalar (0-d); got an array of shape {scale.shape}")
    # bool is an int subclass; scale=True is almost certainly a mistake.
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or a 0-d array; got {scale!r} of type {type(scale).__name__}")


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool (Python or numpy), else a TypeError naming ``name``.

    Example:
        >>> check_bool("check_stability", "yes")
        Traceback (most recent call last):
        ...
        TypeError: check_stability must be a bool (True or False); got 'yes' of type str
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool (True or False); got {value!r} of type {type(value).__name__}")
    return bool(value)


def _check_float(name: str, x: Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")


def check_fast_weight_inputs(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    rule: str,
    initial_state: Array | None,
    features: Features | None = None,
) -> None:
    """Raise a ValueError/TypeError naming the argument if the call breaks the contract.

    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]`` (delta rule only);
    initial_state ``[B, H, K, V]``. With ``features`` q, k are raw, ``[B, T, H, features.dim]``,
    and K is ``features.key_dim``.
    """
    check_choice("rule", rule, RULES)
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("initial_state", initial_state)):
        if x is not None or name in ("q", "k", "v"):
            _check_array(name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D [batch, time, heads, features]; got shape {x.shape}")
        _check_float(name, x)
    key_dim = q.shape[3] if features is None else check_features(features, q, k)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K] = {q.shape}; got {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with q's B, T, H = {q.shape[:3]}; got {v.shape}"
        )
    if rule == "delta":
        if beta is None:
            raise ValueError("beta is required for rule='delta': the write strength, [B, T, H] in (0, 1)")
        if beta.shape != q.shape[:3]:
            raise ValueError(f"beta must be [B, T, H] = {q.shape[:3]}; got {beta.shape}")
        _check_float("beta", beta)
    elif beta is not None:
        raise ValueError(f"beta is only used by rule='delta'; got beta of shape {beta.shape} with rule='sum'")
    if initial_state is not None:
        expected = (q.shape[0], q.shape[2], key_dim, v.shape[3])
        if initial_state.shape != expected:
            with_features = "" if features is None else " (K = features.key_dim, phi's width)"
            raise ValueError(f"initial_state must be [B, H, K, V] = {expected}{with_features}; "
                             f"got {initial_state.shape}")
        _check_float("initial_state", initial_state)


def check_features(features: object, q: Array, k: Array) -> int:
    """K (``features.key_dim``) if ``features`` is a :class:`dpfp_jax.Features` whose input width
    is that of q and k; else a TypeError/ValueError naming the argument."""
    if not isinstance(features, Features):
        raise TypeError("features must be a dj.Features (the feature map the op applies to the raw q and k) or None; "
                        f"got {features!r} of type {type(features).__name__}")
    for name, x in (("q", q), ("k", k)):
        if x.shape[-1] != features.dim:
            already = (f"; {x.shape[-1]} is features.key_dim, phi's output width: give {name} before the feature map"
                       if x.shape[-1] == features.key_dim else "")
            raise ValueError(f"{name} must be [B, T, H, d] with d = features.dim = {features.dim} (with features the "
                             f"op takes the raw {name} and applies {features} itself); got shape {x.shape}{already}")
    if not isinstance(features.feature_map, str):
        # A callable is applied to a step or a span inside the impls: its errors (a width that depends
        # on the leading shape, ...) are raised here, on q's whole shape, shapes only.
        jax.eval_shape(features, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return features.key_dim


def _check_per_step(name: str, x: object, expected: tuple[int, ...], dims: str, meaning: str) -> None:
    """Raise unless ``x`` is an array of shape ``expected`` (q's leading axes, named ``dims``)."""
    _check_array(name, x)
    if x.shape != expected:
        raise ValueError(f"{name} must be [{dims}] = {expected} ({meaning}); got shape {x.shape}")


def check_segment_ids(segment_ids: object, q: Array) -> None:
    """Raise unless ``segment_ids`` is an integer array ``[B, T]`` matching q's batch and time."""
    if segment_ids is None:
        return
    _check_per_step("segment_ids", segment_ids, q.shape[:2], "B, T", "one id per batch row and step")
    # bool is refused too: ids name documents, and a two-valued id is almost surely a mask.
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must have an integer dtype (document ids); got {segment_ids.dtype}"
                        + ("; a boolean array looks like a padding mask, which the modules take as mask="
                           if segment_ids.dtype == jnp.bool_ else ""))


def check_log_decay(log_decay: object, q: Array) -> None:
    """Raise unless ``log_decay`` is None or a float array ``[B, T, H]`` matching q's batch, time and heads.

    Its values (``<= 0``) are checked by :func:`check_log_decay_values` where they are known.
    """
    if log_decay is None:
        return
    _check_per_step("log_decay", log_decay, q.shape[:3], "B, T, H", "one log alpha per batch row, step and head")
    _check_float("log_decay", log_decay)


LOG_DECAY_MESSAGE = ("log_decay must be <= 0 (alpha = exp(log_decay) in [0, 1]; -inf for alpha = 0); {count} of "
                     "{total} values are positive or NaN, the first at batch {b}, step {t}, head {h}: {value}")


def _first_bad_log_decay(log_decay: Array) -> tuple[Array, ...]:
    bad = ~(log_decay <= 0)  # NaN fails the comparison: flagged too
    b, t, h = jnp.unravel_index(jnp.argmax(bad.reshape(-1)), bad.shape)
    return jnp.any(bad), jnp.sum(bad), b, t, h, log_decay[b, t, h]


def check_log_decay_values(log_decay: Array | None, *, traced_check: bool = False) -> None:
    """Raise a ValueError if ``log_decay`` holds a positive or NaN value, when its values are known.

    Concrete arrays are read back (one reduction) and checked. Traced ones (under ``jax.jit``,
    ``grad``, ``vmap``) cannot be read: unchecked, they are used as given (a positive log decay is
    an alpha above 1, which grows the state and voids the delta rule's bound), unless
    ``traced_check`` stages a :func:`jax.experimental.checkify.check` with the same message (the
    op's ``check_stability=True``), for ``checkify.checkify`` to report.

    Example:
        >>> import jax.numpy as jnp
        >>> check_log_decay_values(jnp.array([[[0.0], [-jnp.inf]]]))  # alpha = 1, then alpha = 0: fine
        >>> check_log_decay_values(jnp.array([[[0.0], [0.5]]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: log_decay must be <= 0 ...; 1 of 2 values are positive or NaN, the first at batch 0, step 1, ...
    """
    if log_decay is None or log_decay.size == 0:
        return
    if isinstance(log_decay, jax.core.Tracer):
        if traced_check:
            bad, count, b, t, h, value = _first_bad_log_decay(log_decay)
            checkify.check(~bad, LOG_DECAY_MESSAGE, count=count, total=jnp.asarray(log_decay.size), b=b, t=t, h=h,
                           value=value)
        return
    # A concrete array inside a jit trace (closed over, say): evaluated now, not staged into the trace.
    with jax.ensure_compile_time_eval():
        bad, count, b, t, h, value = (np.asarray(x) for x in _first_bad_log_decay(jnp.asarray(log_decay)))
    if bad:
        raise ValueError(LOG_DECAY_MESSAGE.format(count=int(count), total=log_decay.size, b=int(b), t=int(t),
                                                  h=int(h), value=float(value)))
