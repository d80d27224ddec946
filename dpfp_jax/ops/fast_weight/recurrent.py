"""The fast-weight recurrence as a ``lax.scan`` with a memory-lean ``custom_vjp``.

Autodiff through a time scan keeps W_t for every t: O(T * K * V) per (batch, head), which is
what runs long sequences out of memory (the paper calls the custom backward crucial). Here the
forward keeps only the final state and one V-vector per step (the write ``u_t``), and the
backward walks time in reverse, rebuilding ``W_{t-1} = W_t - k_t u_t^T`` from the stored
writes, as the paper's CUDA kernel does. Memory is O(K * V) per head plus O(T * (K + V)).

Why walking backwards rather than checkpointing W every C steps: checkpoints cost
O((T / C + C) * K * V) at best (``C ~ sqrt(T)``), which still grows with T, while the reverse
walk is exactly O(K * V). Its price is float32 round-off from the subtractions, which adds up
like a random walk (about ``sqrt(T) * eps * |W|``); the tests hold T = 4096 gradients to 1e-4
of the oracle. The writes ``u_t`` are stored rather than recomputed, so the rebuilt states never
feed back into the forward values, and the error does not compound.

Gated (``log_decay`` given): a decayed step ``W_t = alpha_t W_{t-1} + k_t u_t^T`` reverses only by
dividing by alpha_t, which amplifies round-off by ``1 / alpha_t`` per step and is undefined at
alpha = 0. That walk is not used then: the forward keeps the state entering every block of
``N = ceil(sqrt(T))`` steps, and the backward, block by block in reverse, recomputes the block's
states forward from its checkpoint (N states, alive for that block only) and steps back through
them. Memory O((T / N + N) K V) = O(sqrt(T) K V) per head, time one extra forward; the gradients
are those of the forward's own states, exact for any alpha in [0, 1] (docs/math.md, "Gated").
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from dpfp_jax.feature_maps import Features
from dpfp_jax.ops.fast_weight.common import HIGHEST, accumulation_dtype, to_time_major, zeros_like_sharded
from pallas_kernels.autodiff import cotangent_array, primal_values
from pallas_kernels.padding import pad_to

Array = jax.Array


def _outer(a: Array, b: Array) -> Array:
    return a[..., :, None] * b[..., None, :]


def _apply(w: Array, x: Array) -> Array:
    """``W^T x`` per (batch, head): ``[B, H, K, V] x [B, H, K] -> [B, H, V]``."""
    return jnp.einsum("bhkv,bhk->bhv", w, x, precision=HIGHEST)


def _apply_t(w: Array, y: Array) -> Array:
    """``W y`` per (batch, head): ``[B, H, K, V] x [B, H, V] -> [B, H, K]``."""
    return jnp.einsum("bhkv,bhv->bhk", w, y, precision=HIGHEST)


def _mapped(features: Features | None, x: Array, dtype: jnp.dtype) -> Array:
    """One step's query or key as the recurrence uses it: phi(x) in ``dtype`` with features, else x."""
    return x if features is None else features(x).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(rule: str, features: Features | None, q: Array, k: Array, v: Array, beta: Array | None, w0: Array,
                resets: Array | None):
    """Time-major core (float32 or float64): q, k ``[T, B, H, K]``, v ``[T, B, H, V]``, beta ``[T, B, H]``,
    resets ``[T, B]`` bool or None. With ``features`` q and k are raw ``[T, B, H, d]`` in their own
    dtype, mapped step by step, forward and backward (only they are kept, at width d)."""
    (out, final_state), _ = _forward(rule, features, q, k, v, beta, w0, resets)
    return out, final_state


def _forward(rule, features, q, k, v, beta, w0, resets):
    def step(w, inputs):
        q_t, k_t, v_t, beta_t, reset_t = inputs
        q_t, k_t = _mapped(features, q_t, w.dtype), _mapped(features, k_t, w.dtype)
        if reset_t is not None:
            w = jnp.where(reset_t[:, None, None, None], 0.0, w)
        # The delta rule writes beta * (v - W^T k): it replaces what k currently recalls.
        u_t = beta_t[..., None] * (v_t - _apply(w, k_t)) if rule == "delta" else v_t
        w = w + _outer(k_t, u_t)
        return w, (_apply(w, q_t), u_t)

    final_state, (out, u) = lax.scan(step, w0, (q, k, v, beta, resets))
    # For the sum rule u is v itself; keep nothing extra.
    writes = u if rule == "delta" else None
    # w0 is kept only with resets: without them the reverse walk ends at it by itself.
    return (out, final_state), (q, k, v, beta, writes, final_state, None if resets is None else w0, resets)


def _forward_rule(rule, features, *primals):
    return _forward(rule, features, *primal_values(*primals))


def _step_back(rule, w, g, q_t, k_t, v_t, beta_t, u_t, do_t, w_prev=None):
    """One reverse step from ``W_t`` and ``g = dL/dW_t`` (less o_t's share): the gradients of step t
    and ``(W_{t-1}, dL/dW_{t-1})``. ``w_prev`` when known; else rebuilt as ``W_t - k_t u_t^T``."""
    if u_t is None:
        u_t = v_t
    dq_t = _apply_t(w, do_t)
    g = g + _outer(q_t, do_t)
    dk_t = _apply_t(g, u_t)
    du_t = _apply(g, k_t)
    if w_prev is None:
        w_prev = w - _outer(k_t, u_t)
    if rule == "delta":
        residual = v_t - _apply(w_prev, k_t)
        dbeta_t = jnp.sum(du_t * residual, axis=-1)
        dv_t = beta_t[..., None] * du_t
        # u = beta * (v - W^T k) also depends on k and W through the recall W^T k.
        d_recall = -dv_t
        dk_t = dk_t + _apply_t(w_prev, d_recall)
        g = g + _outer(k_t, d_recall)
    else:
        dbeta_t, dv_t = None, du_t
    return (w_prev, g), (dq_t, dk_t, dv_t, dbeta_t)


def _step_back_mapped(rule, features, w, g, q_t, k_t, *rest, w_prev=None):
    """:func:`_step_back` on raw ``q_t``, ``k_t`` with features: phi recomputed, its VJP applied to dq and dk."""
    if features is None:
        return _step_back(rule, w, g, q_t, k_t, *rest, w_prev=w_prev)
    (q_t, back_q), (k_t, back_k) = features.with_vjp(q_t), features.with_vjp(k_t)
    carry, (dq_t, dk_t, dv_t, dbeta_t) = _step_back(rule, w, g, q_t.astype(w.dtype), k_t.astype(w.dtype), *rest,
                                                    w_prev=w_prev)
    return carry, (back_q(dq_t), back_k(dk_t), dv_t, dbeta_t)


def _backward(rule, features, residuals, cotangents):
    q, k, v, beta, writes, final_state, w0, resets = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    if resets is not None:
        return (*_backward_packed(rule, features, q, k, v, beta, writes, w0, resets, d_out, d_final), None)

    def step(carry, inputs):
        return _step_back_mapped(rule, features, *carry, *inputs)

    (_, d_w0), (dq, dk, dv, dbeta) = lax.scan(
        step, (final_state, d_final), (q, k, v, beta, writes, d_out), reverse=True
    )
    return dq, dk, dv, dbeta, d_w0, None


def segment_schedule(resets: Array) -> tuple[Array, ...]:
    """The backward's walk over packed documents: 2T virtual steps, per batch row.

    Each document of steps ``[p, e]`` (length L) takes the virtual steps ``[2p, 2e + 2)``: L
    forward steps ``p..e`` that re-add its writes to rebuild its final state, then L reverse steps
    ``e..p``. Takes time-major ``resets [T, B]``; returns ``[2T, B]`` arrays: the step ``t``
    visited, and bools ``forward``, ``begins`` (the first forward step: start from the document's
    initial state), ``turns`` (the first reverse step), ``ends`` (the last reverse step, at p),
    ``first_document`` and ``last_document`` (of the row).

    Example: two documents, steps [0, 1] and [2]:
        >>> import jax.numpy as jnp
        >>> t, forward, *_ = segment_schedule(jnp.array([[False], [False], [True]]))
        >>> t[:, 0].tolist(), forward[:, 0].astype(int).tolist()
        ([0, 1, 1, 0, 2, 2], [1, 1, 0, 0, 1, 0])
    """
    length = resets.shape[0]
    # Built from resets, not broadcast from a fresh arange: explicit sharding keeps the batch axis's.
    zeros = zeros_like_sharded(resets, jnp.int32)
    steps = zeros + jnp.arange(length)[:, None]
    start = lax.cummax(jnp.where(resets, steps, zeros), axis=0)  # p of each step's document
    last = jnp.concatenate([resets[1:], jnp.ones_like(resets[:1])], axis=0)  # the step before a reset
    end = lax.cummin(jnp.where(last, steps, zeros + length - 1), axis=0, reverse=True)  # e
    # Virtual step i lies in the document of step i // 2.
    p, e = jnp.repeat(start, 2, axis=0), jnp.repeat(end, 2, axis=0)
    size, j = e - p + 1, jnp.arange(2 * length)[:, None] - 2 * p
    forward = j < size
    t = jnp.where(forward, p + j, e - (j - size))
    return t, forward, j == 0, j == size, j == 2 * size - 1, p == 0, e == length - 1


# Batch-major [B, T, ...] arrays inside the walk: a gather or scatter along time per batch row is
# then one indexed access per row, where a time-major operand would be transposed at every step.
def _take(x: Array | None, t: Array) -> Array | None:
    """``x[b, t[b]]`` for every batch row b: x ``[B, T, ...]``, t ``[B]``."""
    if x is None:
        return None
    return jax.vmap(lambda xb, tb: lax.dynamic_index_in_dim(xb, tb, 0, keepdims=False))(x, t)


def _put(buffer: Array | None, t: Array, value: Array | None) -> Array | None:
    """``buffer[b, t[b]] = value[b]`` for every batch row b."""
    if buffer is None:
        return None
    return jax.vmap(lambda bb, vb, tb: lax.dynamic_update_index_in_dim(bb, vb, tb, 0))(buffer, value, t)


def _backward_packed(rule, features, q, k, v, beta, writes, w0, resets, d_out, d_final):
    """The reverse walk with documents: a reset discards the state before it, so ``W_{t-1}`` cannot
    be rebuilt by subtracting writes there. Instead each document is walked twice
    (``segment_schedule``): forward from its known start (``initial_state`` or zero) re-adding the
    stored writes, which rebuilds its final state exactly, then in reverse as without documents.
    Nothing more is kept than without documents (the initial state, and the resets): the price is
    time, 2T steps instead of T, each also doing one gather and one scatter per row.
    """
    zeros = zeros_like_sharded(w0, w0.dtype)
    q, k, v, beta, writes, d_out = (None if x is None else jnp.swapaxes(x, 0, 1)
                                    for x in (q, k, v, beta, writes, d_out))

    def step(carry, visit):
        w, g, d_w0, buffers = carry
        t, (forward, begins, turns, ends, first_document, last_document) = visit[0], (
            x[:, None, None, None] for x in visit[1:])
        q_t, k_t, v_t, beta_t, u_t, do_t = (_take(x, t) for x in (q, k, v, beta, writes, d_out))
        write = _outer(_mapped(features, k_t, w.dtype), v_t if u_t is None else u_t)
        start = jnp.where(first_document, w0, 0.0)  # the document's state before its first write
        # Forward visits re-add the writes from the document's start: at the turn, w is its final state.
        w_forward = jnp.where(begins, start, w) + write
        # Reverse visits: the first takes the final state's cotangent (the row's last document) or
        # zero (a later reset overwrites the state); the last steps back to the known start.
        g = jnp.where(turns, jnp.where(last_document, d_final, 0.0), g)
        w_prev = jnp.where(ends, start, w - write)
        (w_prev, g_prev), grads = _step_back_mapped(rule, features, w, g, q_t, k_t, v_t, beta_t, u_t, do_t,
                                                    w_prev=w_prev)
        d_w0 = jnp.where(~forward & ends & first_document, g_prev, d_w0)
        # A forward visit writes placeholders that the reverse visit of the same step overwrites later.
        buffers = tuple(_put(b, t, x) for b, x in zip(buffers, grads, strict=True))
        return (jnp.where(forward, w_forward, w_prev), jnp.where(forward, g, g_prev), d_w0, buffers), None

    def fill(x):
        return None if x is None else zeros_like_sharded(x, x.dtype)

    buffers = (fill(q), fill(k), fill(v), fill(beta))
    (_, _, d_w0, (dq, dk, dv, dbeta)), _ = lax.scan(step, (zeros, zeros, zeros, buffers),
                                                    segment_schedule(resets))
    dq, dk, dv, dbeta = (None if x is None else jnp.swapaxes(x, 0, 1) for x in (dq, dk, dv, dbeta))
    return dq, dk, dv, dbeta, d_w0


_recurrence.defvjp(_forward_rule, _backward, symbolic_zeros=True)


def gated_block_size(length: int) -> int:
    """Steps per checkpointed block of the gated backward: ``ceil(sqrt(T))`` (at least 1), which
    minimises the T / N checkpoints plus the N states of one block.

    Example:
        >>> gated_block_size(4096), gated_block_size(17), gated_block_size(0)
        (64, 5, 1)
    """
    root = math.isqrt(length)
    return max(1, root + (root * root < length))


def _gated_step(rule, w_prev, q_t, k_t, v_t, beta_t, reset_t, log_decay_t):
    """One gated step from ``W_{t-1}``: ``(W_t, o_t, W_a)``, ``W_a = alpha_t W_{t-1}`` (zero after a
    reset), the state the write sees."""
    w = w_prev if reset_t is None else jnp.where(reset_t[:, None, None, None], 0.0, w_prev)
    w_a = jnp.exp(log_decay_t)[..., None, None] * w
    u_t = beta_t[..., None] * (v_t - _apply(w_a, k_t)) if rule == "delta" else v_t
    w = w_a + _outer(k_t, u_t)
    return w, _apply(w, q_t), w_a, u_t


def _blocks(x: Array | None, size: int) -> Array | None:
    """Time-major ``[T, ...] -> [T / size, size, ...]``."""
    return None if x is None else x.reshape(x.shape[0] // size, size, *x.shape[1:])


def _unblocks(x: Array | None) -> Array | None:
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated_recurrence(rule: str, block: int, q, k, v, beta, w0, resets, log_decay):
    """Time-major gated core, T a multiple of ``block``: ``(out [T, B, H, V], final_state)``."""
    (out, final_state), _ = _gated_forward(rule, block, q, k, v, beta, w0, resets, log_decay)
    return out, final_state


def _gated_forward(rule, block, q, k, v, beta, w0, resets, log_decay):
    def block_step(w, xs):
        def step(w, inputs):
            w, out, _, _ = _gated_step(rule, w, *inputs)
            return w, out

        w_end, out = lax.scan(step, w, xs)
        return w_end, (out, w)  # the state entering the block: its checkpoint

    xs = tuple(_blocks(x, block) for x in (q, k, v, beta, resets, log_decay))
    final_state, (out, checkpoints) = lax.scan(block_step, w0, xs)
    out = _unblocks(out)
    return (out, final_state), (q, k, v, beta, resets, log_decay, checkpoints)


def _gated_forward_rule(rule, block, *primals):
    return _gated_forward(rule, block, *primal_values(*primals))


def _gated_backward(rule, block, residuals, cotangents):
    q, k, v, beta, resets, log_decay, checkpoints = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)

    def block_back(g, xs):
        w_in, inputs, do = xs[0], xs[1:-1], xs[-1]

        def replay(w, inputs):  # the block's states again, from its checkpoint: W_{t-1} of each step
            w_next, _, _, _ = _gated_step(rule, w, *inputs)
            return w_next, w

        _, w_prev = lax.scan(replay, w_in, inputs)

        def step_back(g, xs):
            w_prev_t, (q_t, k_t, v_t, beta_t, reset_t, log_decay_t), do_t = xs
            w, _, w_a, u_t = _gated_step(rule, w_prev_t, q_t, k_t, v_t, beta_t, reset_t, log_decay_t)
            (_, g_a), (dq_t, dk_t, dv_t, dbeta_t) = _step_back(rule, w, g, q_t, k_t, v_t, beta_t, u_t, do_t,
                                                               w_prev=w_a)
            # W_a = alpha W_{t-1}: d log alpha = <dW_a, W_a>, exact at alpha = 0 (W_a = 0), no division.
            d_log_decay_t = jnp.sum(g_a * w_a, axis=(-2, -1))
            g = jnp.exp(log_decay_t)[..., None, None] * g_a
            if reset_t is not None:
                g = jnp.where(reset_t[:, None, None, None], 0.0, g)
            return g, (dq_t, dk_t, dv_t, dbeta_t, d_log_decay_t)

        return lax.scan(step_back, g, (w_prev, inputs, do), reverse=True)

    xs = (checkpoints, *(_blocks(x, block) for x in (q, k, v, beta, resets, log_decay, d_out)))
    d_w0, grads = lax.scan(block_back, d_final, xs, reverse=True)
    dq, dk, dv, dbeta, d_log_decay = (_unblocks(x) for x in grads)
    return dq, dk, dv, dbeta, d_w0, None, d_log_decay


_gated_recurrence.defvjp(_gated_forward_rule, _gated_backward, symbolic_zeros=True)


def fast_weight_scan(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    *,
    rule: str,
    scale: float | Array,
    resets: Array | None = None,
    features: Features | None = None,
    log_decay: Array | None = None,
) -> tuple[Array, Array]:
    """The op whose contract (shapes, dtypes, outputs, gradients) :func:`.naive.fast_weight_reference`
    states, as a time scan with the memory-lean backward this module describes (with ``log_decay``:
    the checkpointed blocks of the module docstring).

    ``features`` (:class:`dpfp_jax.Features`): q, k are raw ``[B, T, H, d]``, mapped at each step
    where they are used and kept at width d in their own dtype for the backward, which maps them
    again step by step. With ``log_decay`` too, the gated scan is given phi(q), phi(k) mapped first
    (its checkpointed backward keeps them K-wide: not fused)."""
    acc, out_dtype = accumulation_dtype(q, k, v, beta, initial_state, log_decay), v.dtype
    if features is not None and log_decay is not None:
        q, k, features = features(q), features(k), None
    scale = jnp.asarray(scale, acc)
    resets = to_time_major(resets, jnp.bool_)
    if features is not None:
        # phi(q) exists only inside the scan: scale multiplies the outputs instead (W^T (s phi) = s W^T phi).
        v, beta = (to_time_major(x, acc) for x in (v, beta))
        q, k = (to_time_major(x, x.dtype) for x in (q, k))
        out, final_state = _recurrence(rule, features, q, k, v, beta, initial_state.astype(acc), resets)
        return jnp.swapaxes(out * scale, 0, 1).astype(out_dtype), final_state
    # Scaling q outside the custom_vjp lets autodiff handle scale (a traced value is fine); in acc,
    # as a float64 scale (x64) would otherwise widen q past the state's dtype.
    q, k, v, beta, log_decay = (to_time_major(x, acc) for x in (q, k, v, beta, log_decay))
    q = q * scale
    if log_decay is not None:
        length = q.shape[0]
        block = gated_block_size(length)
        padded = -(-length // block) * block
        # Padded steps are inert: zero q, k, v and beta, log alpha = 0 (alpha = 1), no reset.
        q, k, v, beta, resets, log_decay = (None if x is None else pad_to(x, 0, padded)
                                            for x in (q, k, v, beta, resets, log_decay))
        out, final_state = _gated_recurrence(rule, block, q, k, v, beta, initial_state.astype(acc), resets,
                                             log_decay)
        return jnp.swapaxes(out[:length], 0, 1).astype(out_dtype), final_state
    out, final_state = _recurrence(rule, None, q, k, v, beta, initial_state.astype(acc), resets)
    return jnp.swapaxes(out, 0, 1).astype(out_dtype), final_state
