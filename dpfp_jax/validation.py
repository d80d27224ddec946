"""Argument checks shared across the package: feature maps, ops and linen modules (dropout rates, masks).

Each check raises at trace time with the argument's name, what was seen and what was expected.
Checks that belong to one op's contract stay with that op (``dpfp_jax/ops/fast_weight/validation.py``).

Example:
    >>> from dpfp_jax.validation import check_choice, check_positive_int
    >>> check_positive_int("nu", 3)
    3
    >>> check_choice("rule", "delta", ("delta", "sum"))
    'delta'
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int if it is an integer >= 1 (a Python int or a numpy integer such as
    ``np.int64(32)``): TypeError for a non-integer (bools and floats included), ValueError below 1.

    Example:
        >>> check_positive_int("num_heads", 0)
        Traceback (most recent call last):
        ...
        ValueError: num_heads must be a positive int; got 0
    """
    # bool is an int subclass; `nu=True` is almost certainly a mistake, so refuse it too.
    # numbers.Integral: int and numpy's integers (np.bool_ is not one); a float 32.0 is refused, not truncated.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int; got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return int(value)


def check_choice[T](name: str, value: T, choices: tuple[str, ...]) -> T:
    """Return ``value`` if it is one of ``choices``, else a ValueError naming ``name`` and the choices.

    Example:
        >>> check_choice("normalization", "softmax", ("sum", "none"))
        Traceback (most recent call last):
        ...
        ValueError: normalization must be one of ('sum', 'none'); got 'softmax'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_dropout_rate(name: str, value: Any) -> float:
    """A dropout rate must be a real number in [0, 1): TypeError for a non-number, ValueError outside."""
    # bool is a Real; `dropout_rate=True` is a slip, not a rate of 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1); got {value!r} of type {type(value).__name__}")
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1); got {value!r}")
    return float(value)


def check_mask(mask: Any, batch: int, length: int) -> Array | None:
    """The padding mask ``[B, T]`` as booleans (True: a real token); None passes through.

    A boolean mask is taken as it is; an integer mask must hold 0 and 1 (checked when its values
    are concrete, i.e. not traced under ``jit``) and is read as ``mask != 0``. A float mask is
    refused: a mask selects tokens, it is not a weight to multiply them by. So is a list (a
    TypeError, as for ``segment_ids``): ``jnp.asarray`` would give it a shape and dtype of its own.

    Example:
        >>> check_mask([[1, 0]], 1, 2)
        Traceback (most recent call last):
        ...
        TypeError: mask must be an array (jax.Array or numpy.ndarray); got list
    """
    if mask is None:
        return None
    if not isinstance(mask, jax.Array | np.ndarray):
        raise TypeError(f"mask must be an array (jax.Array or numpy.ndarray); got {type(mask).__name__}")
    if mask.shape != (batch, length):
        raise ValueError(f"mask must be [B, T] = {(batch, length)}; got {mask.shape}")
    if mask.dtype == jnp.bool_:
        return jnp.asarray(mask)
    if not jnp.issubdtype(mask.dtype, jnp.integer):
        raise TypeError(
            f"mask must be boolean or integer 0/1 (True or 1 for a real token); got dtype {mask.dtype}: "
            "a float mask is refused rather than used as a weight"
        )
    if not isinstance(mask, jax.core.Tracer):
        values = np.asarray(mask)
        stray = np.unique(values[(values != 0) & (values != 1)])
        if stray.size:
            raise ValueError(f"an integer mask must hold only 0 and 1; got the values {stray[:8].tolist()}")
    return jnp.asarray(mask != 0)
