"""Whether Pallas TPU calls are being interpreted: ``pltpu.force_tpu_interpret_mode()`` (or
``pltpu.set_tpu_interpret_mode()``) is in effect.

Pallas reads that mode from a jax config value, ``pallas_tpu_interpret_mode_context_manager``,
that jax does not export (``jax.config`` has no option of that name): ``pallas_call`` takes it as
its ``interpret`` argument whenever it is set. The GPU interpreter's ``force_...`` sets the same
value with its own params class, so only a TPU ``InterpretParams`` counts here. A jax that moves
the value makes this return None, which tests/test_tpu_kernel.py checks.
"""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu


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
    from jax._src import config  # not exported: see the module docstring

    params = getattr(config, "pallas_tpu_interpret_mode_context_manager", None)
    value = None if params is None else params.value
    return value if isinstance(value, pltpu.InterpretParams) else None
