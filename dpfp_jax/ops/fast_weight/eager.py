"""Eager calls of the op at jitted speed: an internal ``jax.jit`` used only outside a trace.

Called eagerly (no ``jit`` around it), the op would be traced afresh on every call: its scans and
``custom_vjp`` are staged each time, which on the CPU costs 0.2-1.2 s a call against a few ms
jitted (``python -m benchmarks.eager``). :func:`jit_when_eager` wraps the op so that an eager call
runs ``jax.jit(op)`` instead, with the array arguments dynamic and every other argument (``rule``,
``impl``, ``chunk_size``, flags) static: after the first call with given shapes, dtypes, shardings
and options, later ones reuse the compiled function.

What does not change:

- inside a trace (``jit``, ``grad``, ``vmap``, ``checkify``...: any argument is a tracer) the plain
  function is called, so an outer transformation sees exactly what it saw before;
- ``scale`` given as a Python or numpy number is passed as a dynamic (weakly typed) array, which is
  what the op makes of it anyway (``jnp.asarray(scale, acc)``), so a new scale does not recompile;
  a traced scale (``jax.grad`` with respect to it) takes the plain path and is differentiated;
- ``pltpu.force_tpu_interpret_mode()`` is part of ``jax.jit``'s cache key (jax keys its jit
  cache on that setting), so a call inside it compiles its own interpreted variant;
- explicit-mesh shardings are part of the inputs' types, which ``jax.jit`` keys on, and the
  target platform the op reads (``jax.sharding.get_abstract_mesh()``) is the same inside it;
- arguments the jit boundary would change are left to the plain function, which raises the
  same message it always did: anything other than a jax array, a numpy array of a dtype that
  jax keeps as it is, or None (and, for ``scale``, a number); options that cannot be hashed.

``check_stability=True`` reads values, which a jitted function cannot raise on: the eager call
then runs ``jax.jit(checkify.checkify(op))`` and raises the check's message as the ValueError the
plain eager call raises. Checks of values that every eager call makes (the op's ``log_decay <= 0``)
are passed as ``eager_check``, run on the concrete arguments before the jitted function.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import checkify

CHECK_OPTION = "check_stability"
"""The option that asks for a value check (:mod:`.stability`): run under ``checkify`` when eager."""


def _passes_jit_unchanged(x: object, number_ok: bool) -> bool:
    """Whether ``jax.jit`` takes x as a dynamic argument that the function sees as it is now."""
    if x is None:
        return True
    if isinstance(x, jax.core.Tracer):
        return False
    if isinstance(x, jax.Array):
        return True
    if isinstance(x, np.ndarray):
        # A numpy float64 array becomes float32 at the boundary without x64: the plain path makes
        # the same conversion in its first jnp op, but it names the dtype as given in its messages.
        return jax.dtypes.canonicalize_dtype(x.dtype) == x.dtype
    # bool is a Real; the plain path refuses scale=True with its own message.
    return number_ok and isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def jit_when_eager(fn: Callable[..., Any], *, dynamic: tuple[str, ...], numbers_ok: tuple[str, ...] = (),
                   eager_check: Callable[[dict[str, Any]], None] | None = None) -> Callable[..., Any]:
    """``fn`` that runs as ``jax.jit(fn)`` when called eagerly (this module's docstring).

    ``dynamic``: the parameters that are arrays (or None), traced by the jit; every other
    parameter is static (part of the cache key). ``numbers_ok``: dynamic parameters that may also
    be Python or numpy numbers. ``eager_check(arguments)``: called with the concrete arguments
    (by name) before the jitted function runs, to raise on values inside it cannot see. The
    wrapper's ``trace_count()`` says how many times the jitted path has traced ``fn`` (for tests:
    a second eager call with the same shapes must not retrace).

    Example:
        >>> import jax.numpy as jnp
        >>> def double(x, *, times=2):
        ...     return x * times
        >>> fast = jit_when_eager(double, dynamic=("x",))
        >>> _ = fast(jnp.ones(3)); _ = fast(jnp.zeros(3))
        >>> fast.trace_count(), fast(jnp.ones(2), times=3).tolist(), fast.trace_count()
        (1, [3.0, 3.0], 2)
    """
    signature = inspect.signature(fn)
    static = tuple(name for name in signature.parameters if name not in dynamic)
    traces = [0]

    @functools.wraps(fn)  # fn's signature, which jax.jit reads the static names from
    def counted(*args: Any, **kwargs: Any) -> Any:
        traces[0] += 1  # runs only while jax traces: once per new cache key
        return fn(*args, **kwargs)

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        return checkify.checkify(counted)(*args, **kwargs)

    jitted = jax.jit(counted, static_argnames=static)
    jitted_checked = jax.jit(checked, static_argnames=static)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
            hash(tuple(bound.arguments.get(name) for name in static))
        except TypeError:
            return fn(*args, **kwargs)  # a call fn itself refuses, or an unhashable option: fn's own message
        arguments = bound.arguments
        if not all(_passes_jit_unchanged(arguments.get(name), name in numbers_ok) for name in dynamic):
            return fn(*args, **kwargs)
        if eager_check is not None:
            eager_check(arguments)
        if isinstance(arguments.get(CHECK_OPTION), bool | np.bool_) and bool(arguments.get(CHECK_OPTION)):
            error, result = jitted_checked(**arguments)
            if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(error)):
                # Concrete arguments inside an outer trace (closed-over constants): the error is not
                # known yet; the plain function stages its checkify check, as under any jit.
                return fn(*args, **kwargs)
            message = error.get()
            if message is not None:
                raise ValueError(message.removesuffix(" (`check` failed)"))
            return result
        return jitted(**arguments)

    wrapper.trace_count = lambda: traces[0]  # type: ignore[attr-defined]
    return wrapper
