"""An opt-in run-time check of the delta rule's stability condition, ``0 <= beta_t |k_t|^2 <= 2``.

A delta-rule step is ``W_t = (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T``; ``I - beta k k^T``
has the eigenvalue ``1 - beta |k|^2`` along k and 1 elsewhere, so it is non-expanding exactly
while ``0 <= beta |k|^2 <= 2``. Keys that break it make the state grow exponentially: raw Gaussian
keys of width 64 with beta in (0, 1) overflow float32 within about a hundred steps and the outputs
turn to NaN, with no error. Normalised keys (``dpfp_jax.sum_norm`` for non-negative features,
``dpfp_jax.l2_norm`` for any sign) and beta in [0, 1] keep the condition at every step.

The check depends on values, not shapes, so it cannot run at trace time. Design:

- concrete (eager) ``k`` and ``beta``: computed on the device, read back, and a ValueError names
  the first offending (batch, head, step) before any of the op runs;
- traced (inside ``jax.jit``, ``vmap``, ``grad``): a :func:`jax.experimental.checkify.check`,
  JAX's mechanism for value checks in staged code. The caller functionalises it with
  ``checkify.checkify`` (``err, out = checkify.checkify(jax.jit(f))(...)``; ``err.throw()``), which
  carries the same message; under a plain ``jax.jit`` without it JAX refuses to lower the
  function and says to use ``checkify.checkify``, so the check is never silently dropped.

It costs nothing unless asked for (``dj.fast_weight(..., check_stability=True)``): nothing of it is
traced otherwise.

Tolerance: a step is flagged when ``beta |k|^2 > 2 (1 + STABILITY_RTOL)`` or ``beta |k|^2 < 0``
(or is NaN), with ``beta |k|^2`` computed in float32 (float64 for float64 inputs).
``STABILITY_RTOL = 1e-4`` covers the float32 rounding of a sum of up to 1024 squares (at most
``K * 2^-24``, 6e-5 at K = 1024) and of the product with beta, so keys on the boundary
(``beta = 2``, ``|k| = 1``, a reflection) are not flagged, while a growth of ``1 + 2e-4`` per step
at most goes through unflagged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from dpfp_jax.ops.fast_weight.common import accumulation_dtype

Array = jax.Array

STABILITY_RTOL = 1e-4
"""Relative tolerance on the bound 2 (module docstring: float32 rounding of ``beta |k|^2``)."""

_MESSAGE = ("the delta rule's step I - beta k k^T is expanding (beta |k|^2 outside [0, 2]) first at batch {b}, "
            "head {h}, step {t}: beta |k|^2 = {value} (beta = {beta}); {count} of {total} (batch, head, step) "
            "triples break 0 <= beta |k|^2 <= 2, so the fast weights can grow exponentially (NaN within about "
            "a hundred steps for raw Gaussian keys). Normalise the keys (dpfp_jax.sum_norm for non-negative "
            "features, dpfp_jax.l2_norm for any sign) and keep beta in [0, 1], e.g. a sigmoid")


def stability_products(k: Array, beta: Array) -> Array:
    """``beta_t |k_t|^2`` per (batch, step, head), ``[B, T, H]``, in float32 (float64 for float64 inputs).

    Example:
        >>> import jax.numpy as jnp
        >>> stability_products(jnp.full((1, 2, 1, 4), 0.5), jnp.array([[[1.0], [3.0]]]))[0, :, 0].tolist()
        [1.0, 3.0]
    """
    acc = accumulation_dtype(k, beta)
    return beta.astype(acc) * jnp.sum(jnp.square(k.astype(acc)), axis=-1)


def _first_violation(k: Array, beta: Array) -> tuple[Array, ...]:
    """(any, count, b, h, t, value, beta) of the first step, in time order, that breaks the condition."""
    product = stability_products(k, beta)
    # NaN fails both comparisons: a NaN key or beta is flagged too.
    ok = (product >= 0) & (product <= 2 * (1 + STABILITY_RTOL))
    bad = jnp.moveaxis(~ok, 1, 0)  # [T, B, H]: the first flat index is the earliest step
    first = jnp.argmax(bad.reshape(-1))
    t, b, h = jnp.unravel_index(first, bad.shape)
    return jnp.any(bad), jnp.sum(bad), b, h, t, product[b, t, h], beta[b, t, h]


def check_delta_stability(k: Array, beta: Array) -> None:
    """Raise unless ``0 <= beta_t |k_t|^2 <= 2`` at every (batch, head, step), up to ``STABILITY_RTOL``.

    ``k [B, T, H, K]`` (feature-mapped, as :func:`dpfp_jax.fast_weight` takes it) and ``beta [B, T, H]``.
    With concrete arrays: a ValueError naming the first offending (batch, head, step), the value
    and how many break it. With traced ones: a :func:`jax.experimental.checkify.check` with that
    message, for ``checkify.checkify`` to report (this module's docstring).

    Example: raw Gaussian keys break it at once, sum-normalised non-negative ones never do.
        >>> import jax, jax.numpy as jnp
        >>> k = jax.random.normal(jax.random.key(0), (1, 8, 2, 64))
        >>> beta = jnp.full((1, 8, 2), 0.5)
        >>> check_delta_stability(k, beta)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the delta rule's step I - beta k k^T is expanding ... first at batch 0, head 0, step 0: ...
        >>> check_delta_stability(jax.nn.softmax(k), beta)  # sums to 1, so |k| <= 1
    """
    if k.size == 0:
        return  # no step to check (and argmax has nothing to take)
    found = _first_violation(k, beta)
    if any(isinstance(x, jax.core.Tracer) for x in found):
        bad, count, b, h, t, value, beta_t = found
        checkify.check(~bad, _MESSAGE, b=b, h=h, t=t, value=value, beta=beta_t, count=count,
                       total=jnp.asarray(beta.size))
        return
    bad, count, b, h, t, value, beta_t = (np.asarray(x) for x in found)
    if bad:
        raise ValueError(_MESSAGE.format(b=int(b), h=int(h), t=int(t), value=float(value), beta=float(beta_t),
                                         count=int(count), total=beta.size))
