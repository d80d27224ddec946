"""The gate's shared numerics (``log_decay``), for the GPU and the TPU kernels alike.

``log alpha`` at or below ``LOG_DECAY_FLOOR`` is alpha = 0 (its exp is 0 in float32: 16 below the
log of the smallest subnormal); the kernels clamp there so that no ``-inf`` enters a cumulative
sum (``-inf - -inf`` would be NaN). The library's chunk form (``dpfp_jax/ops/fast_weight/wy.py``)
takes the same floor. Log decays are split into multiples of ``1 / DECAY_QUANTUM``, whose running
sums are exact, and a rest in ``[-1/32, 1/32]`` (docs/math.md, "Differences of cumulative sums,
exactly").
"""

import jax
import jax.numpy as jnp
import numpy as np

LOG_DECAY_FLOOR = float(np.log(np.finfo(np.float32).smallest_subnormal)) - 16.0
DECAY_QUANTUM = 16.0


def gate_with_resets(log_decay: jax.Array, resets: jax.Array) -> jax.Array:
    """``log_decay [B, T, H]`` with ``-inf`` (alpha = 0) at each step where ``resets [B, T]`` is
    True: a reset zeroes the state whatever alpha is, and alpha = 0 there has a zero gradient, as
    the oracle's log_decay has at a reset. So a gated kernel needs no document masks.

    Example:
        >>> import jax.numpy as jnp
        >>> gate_with_resets(jnp.full((1, 3, 1), -0.5), jnp.array([[False, True, False]]))[0, :, 0].tolist()
        [-0.5, -inf, -0.5]
    """
    return jnp.where(resets[:, :, None], -jnp.inf, log_decay)
