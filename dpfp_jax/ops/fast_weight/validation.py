"""Trace-time checks shared by every implementation of the fast-weight op."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

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


def check_segment_ids(segment_ids: object, q: Array) -> None:
    """Raise unless ``segment_ids`` is an integer array ``[B, T]`` matching q's batch and time."""
    if segment_ids is None:
        return
    _check_array("segment_ids", segment_ids)
    expected = q.shape[:2]
    if segment_ids.shape != expected:
        raise ValueError(f"segment_ids must be [B, T] = {expected} (one id per batch row and step); "
                         f"got shape {segment_ids.shape}")
    # bool is refused too: ids name documents, and a two-valued id is almost surely a mask.
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must have an integer dtype (document ids); got {segment_ids.dtype}"
                        + ("; a boolean array looks like a padding mask, which the modules take as mask="
                           if segment_ids.dtype == jnp.bool_ else ""))
