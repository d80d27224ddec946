"""A clear error for forward-mode autodiff of the impls whose backward is a ``jax.custom_vjp``.

``"scan"``, ``"chunk"`` and ``"pallas"`` (and so ``"auto"``, the modules' default) keep their
memory-lean backward in a ``jax.custom_vjp``. JAX differentiates those in reverse mode only
(``grad``, ``vjp``, ``jacrev``, and ``hessian``, which is forward over reverse); a ``jvp`` or
``jacfwd`` meets JAX's generic "can't apply forward-mode autodiff (jvp) to a custom_vjp
function", raised from deep inside JAX and, under ``jit``, only when the function is lowered.
:func:`refuse_forward_mode` raises instead, at the call, a TypeError that names the impl and
points to ``impl="reference"`` (plain autodiff of a scan, which takes every mode).

How a forward-mode call is told from a reverse-mode one: ``jax.jvp`` (and ``jacfwd``, a vmapped
jvp) hands the traced function ``JVPTracer`` inputs, while reverse mode hands it
``LinearizeTracer`` ones, with jax's default ``jax_use_direct_linearize``. Where that flag is off
reverse mode traces with ``JVPTracer`` too, so the early check is skipped and only JAX's own error,
when raised at the call (eagerly), is replaced by this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from jax.interpreters import ad

_JAX_MESSAGE = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


def forward_mode_message(name: str, impl: str) -> str:
    """The error for forward-mode autodiff of implementation ``name`` (asked for as ``impl``)."""
    picked = f"impl={name!r}" if name == impl else f"impl={name!r} (what impl={impl!r} picked)"
    return (f"dpfp_jax.fast_weight with {picked} cannot be differentiated in forward mode (jax.jvp, jax.jacfwd, "
            "jax.linearize of a jvp): its memory-lean backward is a jax.custom_vjp, which JAX differentiates in "
            "reverse mode only (jax.grad, jax.vjp, jax.jacrev, jax.hessian). For forward mode use "
            "impl='reference', the same function by plain autodiff (O(T K V) memory per head)")


def _direct_linearize() -> bool:
    # getattr: a jax without the flag linearizes directly (it became the only way).
    return bool(getattr(jax.config, "jax_use_direct_linearize", True))


def is_forward_mode(*xs: object) -> bool:
    """Whether any of ``xs`` is being differentiated in forward mode (this module's docstring).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> seen = []
        >>> def f(x):
        ...     seen.append(is_forward_mode(x))
        ...     return x * 2
        >>> _ = jax.jvp(f, (1.0,), (1.0,)); _ = jax.grad(f)(1.0); _ = f(jnp.ones(2))
        >>> seen
        [True, False, False]
    """
    return _direct_linearize() and any(isinstance(x, ad.JVPTracer) for x in xs)


@contextlib.contextmanager
def refuse_forward_mode(name: str, impl: str, *inputs: object) -> Iterator[None]:
    """Raise :func:`forward_mode_message`'s TypeError if implementation ``name`` is called on ``inputs``
    in forward mode, or if JAX raises its own forward-mode error for a custom_vjp inside the block.
    ``"reference"`` (no custom_vjp) passes through."""
    if name == "reference":
        yield
        return
    if is_forward_mode(*inputs):
        raise TypeError(forward_mode_message(name, impl))
    try:
        yield
    except TypeError as error:
        if _JAX_MESSAGE not in str(error):
            raise
        raise TypeError(forward_mode_message(name, impl)) from error
