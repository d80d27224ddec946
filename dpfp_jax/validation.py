"""Argument checks shared across the package: feature maps, ops and linen modules.

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


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1: TypeError for a non-int, ValueError for an int below 1.

    Example:
        >>> check_positive_int("num_heads", 0)
        Traceback (most recent call last):
        ...
        ValueError: num_heads must be a positive int; got 0
    """
    # bool is an int subclass; `nu=True` is almost certainly a mistake, so refuse it too.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int; got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return value


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
