"""Zero padding of one axis, shared by the GPU and TPU kernels and the library's XLA chunk form.

Backend-neutral (no Pallas backend is imported here), so the TPU kernel does not load Triton's
and the library takes it from the kernels' package, the lower layer, like ``autodiff``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad ``axis`` of x up to ``size`` (x itself when it is that size already).

    Example:
        >>> import jax.numpy as jnp
        >>> pad_to(jnp.ones((2, 3)), 1, 5).tolist()
        [[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]]
    """
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)
