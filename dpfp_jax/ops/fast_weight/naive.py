"""The oracle: the fast-weight recurrence as a plain ``lax.scan``, differentiated by autodiff.

A direct transcription of the math in DESIGN.md, one time step at a time. It is slow and its
backward stores W at every step (O(T * K * V) per head); tests hold every fast path to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dpfp_jax.ops.fast_weight.common import HIGHEST, accumulation_dtype, to_time_major

Array = jax.Array


def fast_weight_reference(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    *,
    rule: str,
    scale: float | Array,
) -> tuple[Array, Array]:
    """``(out [B, T, H, V] in v's dtype, final_state [B, H, K, V])``; inputs validated."""
    acc = accumulation_dtype(q, k, v, beta, initial_state)
    scale = jnp.asarray(scale, acc)  # a float64 scale (x64) must not widen the outputs

    def step(w: Array, inputs: tuple[Array, ...]) -> tuple[Array, Array]:
        q_t, k_t, v_t, beta_t = inputs  # [B, H, K], [B, H, K], [B, H, V], [B, H] or None
        if rule == "delta":
            v_bar = jnp.einsum("bhkv,bhk->bhv", w, k_t, precision=_HIGHEST)
            w = w + beta_t[..., None, None] * k_t[..., :, None] * (v_t - v_bar)[..., None, :]
        else:
            w = w + k_t[..., :, None] * v_t[..., None, :]
        return w, scale * jnp.einsum("bhkv,bhk->bhv", w, q_t, precision=_HIGHEST)

    inputs = tuple(to_time_major(x, acc) for x in (q, k, v, beta))
    final_state, out = lax.scan(step, initial_state.astype(acc), inputs)
    return jnp.swapaxes(out, 0, 1).astype(v.dtype), final_state
