"""The oracle: the fast-weight recurrence as a plain ``lax.scan``, differentiated by autodiff.

A direct transcription of the math in docs/math.md, one time step at a time. It is slow and its
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
    resets: Array | None = None,
    log_decay: Array | None = None,
) -> tuple[Array, Array]:
    """The fast-weight op's contract, stated once here: every fast path computes this function.

    Per batch element and head, with the fast weights W ``[K, V]`` starting at ``initial_state``:

    - ``rule="sum"``: ``W_t = W_{t-1} + k_t v_t^T``
    - ``rule="delta"``: ``W_t = W_{t-1} + beta_t k_t (v_t - W_{t-1}^T k_t)^T``
    - output ``o_t = scale * W_t^T q_t`` (W after step t's write).
    - packed documents: where ``resets[b, t]``, W is zero before step t (``W_{t-1}`` above is then 0).
    - gated (``log_decay`` given): ``W_{t-1}`` above is first multiplied by ``alpha_t = exp(log_decay_t)``,
      so the delta rule is ``W_t = alpha_t (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T`` and the
      sum rule ``W_t = alpha_t W_{t-1} + k_t v_t^T``; a reset at t zeroes W whatever alpha_t is.

    Args:
      q: ``[B, T, H, K]`` queries, k: ``[B, T, H, K]`` keys (both already feature-mapped),
        v: ``[B, T, H, V]`` values, any float dtypes.
      beta: ``[B, T, H]`` write strengths for the delta rule; None for the sum rule.
      initial_state: ``[B, H, K, V]``, W before the first step.
      rule: ``"delta"`` or ``"sum"``.
      scale: a Python or numpy number or a 0-d array; it may be traced.
      resets: ``[B, T]`` bool, True where a new document starts (``segments.resets_of`` of the
        op's ``segment_ids``; never at step 0), or None for one document per row.
      log_decay: ``[B, T, H]`` float, ``log alpha_t <= 0`` (``-inf``: alpha = 0, a full forget), or None
        for no gate (the ungated recurrence, computed exactly as without the argument).

    The arguments are taken as they come: ``dj.fast_weight`` validates them first.

    Returns:
      ``(out, final_state)``: ``out [B, T, H, V]`` holds ``o_t`` for every step, in v's dtype;
      ``final_state [B, H, K, V]`` is ``W_T`` (``initial_state`` when T = 0) in the accumulation
      dtype, float32, or float64 when an input is float64. The recurrence accumulates in that
      dtype, never in bfloat16 or float16.

    Gradients flow to every array argument (q, k, v, beta, initial_state, log_decay) and to ``scale``, from
    losses on either output: this recurrence's gradients. Here autodiff through the scan gives
    them (storing W at every step); the fast paths give the same, to round-off, through backwards
    of their own that rebuild the states instead of storing them.

    Example:
        >>> import jax.numpy as jnp
        >>> k = jnp.eye(2)[None, :, None]  # [1, 2, 1, 2]: two orthogonal keys
        >>> out, w = fast_weight_reference(k, k, 3 * k, jnp.full((1, 2, 1), 0.5), jnp.zeros((1, 1, 2, 2)),
        ...                                rule="delta", scale=1.0)
        >>> out[0, :, 0].tolist(), w[0, 0].tolist()  # each key recalls half its value
        ([[1.5, 0.0], [0.0, 1.5]], [[1.5, 0.0], [0.0, 1.5]])
    """
    acc = accumulation_dtype(q, k, v, beta, initial_state, log_decay)
    scale = jnp.asarray(scale, acc)  # a float64 scale (x64) must not widen the outputs

    def step(w: Array, inputs: tuple[Array, ...]) -> tuple[Array, Array]:
        q_t, k_t, v_t, beta_t, reset_t, log_decay_t = inputs  # [B, H, K] x2, [B, H, V], [B, H] or None, [B] or None
        if reset_t is not None:
            w = jnp.where(reset_t[:, None, None, None], 0.0, w)
        if log_decay_t is not None:
            w = jnp.exp(log_decay_t)[..., None, None] * w
        if rule == "delta":
            v_bar = jnp.einsum("bhkv,bhk->bhv", w, k_t, precision=HIGHEST)
            w = w + beta_t[..., None, None] * k_t[..., :, None] * (v_t - v_bar)[..., None, :]
        else:
            w = w + k_t[..., :, None] * v_t[..., None, :]
        return w, scale * jnp.einsum("bhkv,bhk->bhv", w, q_t, precision=HIGHEST)

    inputs = (*(to_time_major(x, acc) for x in (q, k, v, beta)), to_time_major(resets, jnp.bool_),
              to_time_major(log_decay, acc))
    final_state, out = lax.scan(step, initial_state.astype(acc), inputs)
    return jnp.swapaxes(out, 0, 1).astype(v.dtype), final_state
