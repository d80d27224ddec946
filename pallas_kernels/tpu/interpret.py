"""Whether Pallas TPU calls are being interpreted: ``pltpu.force_tpu_interpret_mode()`` (or
``pltpu.set_tpu_interpret_mode()``) is in effect.

Pallas keeps that mode in a jax config value that jax does not export (``jax.config`` has no
option of that name, and this package imports nothing private of jax), and ``pallas_call`` takes
it as its ``interpret`` argument whenever it is set, at trace time. So the mode is read back from
there: the ``interpret`` parameter of a one-block copy kernel, traced (not run) to a jaxpr. The GPU
interpreter's ``force_...`` sets the same value with its own params class, so only a TPU
``InterpretParams`` counts here. A jax that stops recording it makes this return None, which
tests/test_tpu_kernel.py checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_BLOCK = jax.ShapeDtypeStruct((8, 128), jnp.float32)  # one float32 tile


def _copy(x_ref, o_ref):
    o_ref[...] = x_ref[...]


def tpu_interpret_params() -> pltpu.InterpretParams | None:
    """The ``InterpretParams`` Pallas TPU calls are interpreted with right now, or None (compiled).

    Example:
        >>> from jax.experimental.pallas import tpu as pltpu
        >>> tpu_interpret_params() is None
        True
        >>> with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(detect_races=True)):
        ...     tpu_interpret_params().detect_races
        True
    """
    eqns = jax.make_jaxpr(pl.pallas_call(_copy, out_shape=_BLOCK))(_BLOCK).eqns
    value = eqns[0].params.get("interpret") if len(eqns) == 1 else None
    return value if isinstance(value, pltpu.InterpretParams) else None
