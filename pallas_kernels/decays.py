"""The gate's shared numerics (``log_decay``), for the GPU and the TPU kernels alike.

``log alpha`` at or below ``LOG_DECAY_FLOOR`` is alpha = 0 (its exp is 0 in float32: 16 below the
log of the smallest subnormal); the kernels clamp there so that no ``-inf`` enters a cumulative
sum (``-inf - -inf`` would be NaN). The library's chunk form (``dpfp_jax/ops/fast_weight/wy.py``)
takes the same floor. Log decays are split into multiples of ``1 / DECAY_QUANTUM``, whose running
sums are exact, and a rest in ``[-1/32, 1/32]`` (docs/math.md, "Differences of cumulative sums,
exactly"): ``split_log_decay``.
"""

import jax
import jax.numpy as jnp
import numpy as np

LOG_DECAY_FLOOR = float(np.log(np.finfo(np.float32).smallest_subnormal)) - 16.0
DECAY_QUANTUM = 16.0


def split_log_decay(log_decay: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo)`` of ``log_decay`` (float32, any shape) clamped at ``LOG_DECAY_FLOOR``: ``hi`` the
    nearest multiple of ``1 / DECAY_QUANTUM`` (ties to even), ``lo = clamped - hi`` in ``[-1/32, 1/32]``
    and exact (hi is within a factor 2 of the clamped value, or 0), so ``hi + lo`` is the clamped
    value. Elementwise, so the TPU kernel calls it on chip and the GPU kernels' wrapper in XLA.
    Differentiable: hi's rounding passes no gradient, lo carries all of it (zero where clamped).

    Example: ties (odd multiples of 1/32) go to the even multiple of 1/16; ``-inf`` stays finite.
        >>> import jax.numpy as jnp
        >>> hi, lo = split_log_decay(jnp.array([-1 / 32, -3 / 32, -0.7, -jnp.inf]))
        >>> (hi * DECAY_QUANTUM).tolist(), lo[:3].tolist()
        ([-0.0, -2.0, -11.0, -1908.0], [-0.03125, 0.03125, -0.012499988079071045])
    """
    clamped = jnp.maximum(log_decay, LOG_DECAY_FLOOR)
    # Any rounding to a whole number of 1/16ths keeps hi's running sums exact (multiples of 1/16 below
    # 2^20 in size for chunks up to 8192 steps); at a tie either neighbour leaves |lo| = 1/32, exact.
    # Half to even is jnp.round's, the library's chunk form's (dpfp_jax/ops/fast_weight/wy.py), and
    # lowers both in XLA and in Mosaic (math.roundeven); the Triton kernels take the split from XLA.
    hi = jnp.round(clamped * DECAY_QUANTUM) / DECAY_QUANTUM
    return hi, clamped - hi


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
