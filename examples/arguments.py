"""argparse types for the example scripts: a bad value becomes argparse's own error, which names
the flag (``argument --steps: must be at least 0; got -5``) and exits with status 2."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written and every option's default; an option without a fixed
    default (``None``) says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def integer(minimum: int) -> Callable[[str], int]:
    """A whole number of at least ``minimum``.

    >>> integer(1)("3")
    3
    >>> integer(1)("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be at least 1; got 0
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}; got {value}")
        return value

    return parse


def integers(minimum: int) -> Callable[[str], list[int]]:
    """Comma-separated whole numbers, each at least ``minimum``.

    >>> integers(1)("20,40, 60")
    [20, 40, 60]
    >>> integers(1)("5,abc")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected comma-separated whole numbers; got '5,abc'
    """

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers; got {text!r}") from None
        for value in values:
            if value < minimum:
                raise argparse.ArgumentTypeError(f"each must be at least {minimum}; got {value} in {text!r}")
        return values

    return parse


def real(minimum: float, *, inclusive: bool = True) -> Callable[[str], float]:
    """A finite number of at least ``minimum`` (above it where not ``inclusive``).

    >>> real(0.0)("0"), real(0.0, inclusive=False)("1e-3")
    (0.0, 0.001)
    >>> real(0.0, inclusive=False)("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be above 0; got 0.0
    >>> real(0.0)("nan")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a finite number; got 'nan'
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {minimum:g}; got {value}")
        return value

    return parse
