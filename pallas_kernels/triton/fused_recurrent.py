"""Fused recurrent fast-weight kernels (Pallas): the counterpart of the paper's CUDA kernel.

One program per (batch x head, block of BV value columns) keeps its ``[K, BV]`` slice of the fast
weights on chip and walks time. The forward stores only the outputs, the delta rule's writes
``u_t`` and the final state; the backward walks time in reverse, rebuilding
``W_{t-1} = W_t - k_t u_t^T`` in-kernel, so nothing of size T x K x V is ever stored. The value
axis splits across programs because W's columns evolve independently (each column of the delta
rule only reads itself through ``W^T k``); gradients that sum over V (dq, dk, dbeta) come back as
one partial per value block and are summed outside the kernel.

K and BV are padded to powers of two (Triton's tensors need them); zero padding is inert, a zero
key or query entry neither writes nor reads anything.

Packed documents (``resets``): the forward sets its state to zero (by selection) before a step that
starts a document. The backward cannot rebuild the state before such a step by subtracting writes
(the reset discarded it), so there, walking back, it rebuilds the previous document's final state
by walking that document forward from its known start (``initial_state`` for the row's first
document, zero otherwise), re-adding the stored writes. The kernels read, per step, the step its
document starts at (``starts``, int32, made from ``resets`` by XLA; -1 in the row's first
document). Cost: each document but the row's last is walked once more, one rank-1 update per step
(at most T more per row, beside the reverse walk's T steps of several products each), and the
backward reads the initial state; nothing more is stored. The re-added writes are the forward's,
added in the forward's order, so the rebuilt states are the forward's bit for bit.

Reached through ``dpfp_jax.fast_weight(..., impl="pallas")`` on a GPU, or directly with
``fused_recurrent(..., interpret=True)`` anywhere (Pallas's interpreter, for tests on the CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.autodiff import cotangent_array, primal_values
from pallas_kernels.triton.tiles import compiler_params, pad_state, pad_to, padded_sizes, value_block, warps_for_state
from pallas_kernels.validation import check_interpret, check_kernel_inputs, empty_result

Array = jax.Array


def _starts_document(starts_ref, t) -> Array:
    """Whether step t starts a document: the state is zero before it."""
    return starts_ref[t] == t


def _forward_kernel(*refs, delta: bool, packed: bool):
    if packed:
        q_ref, k_ref, v_ref, beta_ref, starts_ref, w0_ref, out_ref, u_ref, w_ref = refs
    else:
        q_ref, k_ref, v_ref, beta_ref, w0_ref, out_ref, u_ref, w_ref = refs
    length = q_ref.shape[0]

    def step(t, w):
        if packed:
            w = jnp.where(_starts_document(starts_ref, t), 0.0, w)
        k_t = k_ref[t, :].astype(jnp.float32)
        v_t = v_ref[t, :].astype(jnp.float32)
        if delta:
            recall = jnp.sum(w * k_t[:, None], axis=0)
            u_t = beta_ref[t].astype(jnp.float32) * (v_t - recall)
            u_ref[t, :] = u_t
        else:
            u_t = v_t
        w = w + k_t[:, None] * u_t[None, :]
        out_ref[t, :] = jnp.sum(w * q_ref[t, :].astype(jnp.float32)[:, None], axis=0).astype(out_ref.dtype)
        return w

    w_ref[...] = lax.fori_loop(0, length, step, w0_ref[...].astype(jnp.float32))


def _backward_kernel(*refs, delta: bool, packed: bool):
    if packed:
        (q_ref, k_ref, v_ref, beta_ref, u_ref, w_ref, d_out_ref, d_w_ref, starts_ref, w0_ref,
         dq_ref, dk_ref, dv_ref, dbeta_ref, d_w0_ref) = refs
    else:
        (q_ref, k_ref, v_ref, beta_ref, u_ref, w_ref, d_out_ref, d_w_ref,
         dq_ref, dk_ref, dv_ref, dbeta_ref, d_w0_ref) = refs
    length = q_ref.shape[0]

    def write(s):
        """Step s's write ``k_s u_s^T`` (this program's value columns)."""
        k_s = k_ref[s, :].astype(jnp.float32)
        u_s = u_ref[s, :] if delta else v_ref[s, :].astype(jnp.float32)
        return k_s[:, None] * u_s[None, :]

    def previous_document_final_state(t):
        """The state a reset at step t discarded: the previous document walked forward from its start
        (the initial state for the row's first document, else zero), re-adding its writes."""
        start = starts_ref[jnp.maximum(t - 1, 0)]
        begin = jnp.where(start < 0, w0_ref[...], 0.0)
        return lax.fori_loop(jnp.maximum(start, 0), t, lambda s, w: w + write(s), begin)

    def step(i, carry):
        w, g = carry  # W_t and dL/dW_t (this program's value columns)
        t = length - 1 - i
        q_t = q_ref[t, :].astype(jnp.float32)
        k_t = k_ref[t, :].astype(jnp.float32)
        v_t = v_ref[t, :].astype(jnp.float32)
        do_t = d_out_ref[t, :].astype(jnp.float32)
        u_t = u_ref[t, :] if delta else v_t
        dq_ref[t, :] = jnp.sum(w * do_t[None, :], axis=1)
        g = g + q_t[:, None] * do_t[None, :]
        dk_t = jnp.sum(g * u_t[None, :], axis=1)
        du_t = jnp.sum(g * k_t[:, None], axis=0)
        w = w - k_t[:, None] * u_t[None, :]
        if packed:
            reset = _starts_document(starts_ref, t)
            w = jnp.where(reset, 0.0, w)  # what step t read: exactly zero after a reset
        if delta:
            residual = v_t - jnp.sum(w * k_t[:, None], axis=0)
            dbeta_ref[t] = jnp.sum(du_t * residual)
            dv_t = beta_ref[t].astype(jnp.float32) * du_t
            dk_t = dk_t - jnp.sum(w * dv_t[None, :], axis=1)  # through the recall W^T k
            g = g - k_t[:, None] * dv_t[None, :]
        else:
            dv_t = du_t
        dk_ref[t, :] = dk_t
        dv_ref[t, :] = dv_t
        if packed:
            # The state before a reset reaches nothing after it: no cotangent flows back through it.
            w = lax.cond(reset, lambda: previous_document_final_state(t), lambda: w)
            g = jnp.where(reset, 0.0, g)
        return w, g

    _, g = lax.fori_loop(0, length, step, (w_ref[...], d_w_ref[...].astype(jnp.float32)))
    d_w0_ref[...] = g


def _heads_major(x: Array, size: int | None = None) -> Array:
    """``[B, T, H, D] -> [B * H, T, D_padded]``."""
    batch, length, heads = x.shape[:3]
    x = jnp.moveaxis(x, 2, 1).reshape(batch * heads, length, *x.shape[3:])
    return x if size is None else pad_to(x, 2, size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(rule: str, interpret: bool, q, k, v, beta, w0, starts):
    """``starts [B * H, T]`` int32 (the step each step's document starts at, -1 in the row's first
    document) or None."""
    (out, final_state), _ = _fused_forward(rule, interpret, q, k, v, beta, w0, starts)
    return out, final_state


def _fused_forward(rule, interpret, q, k, v, beta, w0, starts):
    delta, packed = rule == "delta", starts is not None
    bh, length, key_dim = q.shape
    value_dim = v.shape[-1]
    block = value_block(key_dim, value_dim)
    grid = (bh, value_dim // block)
    keys = pl.BlockSpec((None, length, key_dim), lambda i, j: (i, 0, 0))
    values = pl.BlockSpec((None, length, block), lambda i, j: (i, 0, j))
    per_step = pl.BlockSpec((None, length), lambda i, j: (i, 0))
    state = pl.BlockSpec((None, key_dim, block), lambda i, j: (i, 0, j))
    beta_in = beta if delta else jnp.zeros((bh, length), jnp.float32)
    out, u, final_state = pl.pallas_call(
        functools.partial(_forward_kernel, delta=delta, packed=packed),
        out_shape=(jax.ShapeDtypeStruct((bh, length, value_dim), jnp.float32),
                   jax.ShapeDtypeStruct((bh, length, value_dim), jnp.float32),
                   jax.ShapeDtypeStruct((bh, key_dim, value_dim), jnp.float32)),
        grid=grid,
        in_specs=[keys, keys, values, per_step, *([per_step] if packed else []), state],
        out_specs=(values, values, state),
        compiler_params=compiler_params(warps_for_state(key_dim * block)),
        interpret=interpret,
        name="fast_weight_fused_recurrent_fwd",
    )(q, k, v, beta_in, *([starts] if packed else []), w0)
    # w0 is kept only with documents: the backward walks the row's first one forward from it.
    return (out, final_state), (q, k, v, beta, u if delta else None, final_state, starts,
                                w0 if packed else None)


def _fused_forward_rule(rule, interpret, *primals):
    return _fused_forward(rule, interpret, *primal_values(*primals))


def _fused_backward(rule, interpret, residuals, cotangents):
    q, k, v, beta, u, final_state, starts, w0 = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    delta, packed = rule == "delta", starts is not None
    bh, length, key_dim = q.shape
    value_dim = v.shape[-1]
    block = value_block(key_dim, value_dim)
    num_blocks = value_dim // block
    keys = pl.BlockSpec((None, length, key_dim), lambda i, j: (i, 0, 0))
    values = pl.BlockSpec((None, length, block), lambda i, j: (i, 0, j))
    per_step = pl.BlockSpec((None, length), lambda i, j: (i, 0))
    state = pl.BlockSpec((None, key_dim, block), lambda i, j: (i, 0, j))
    partial_keys = pl.BlockSpec((None, None, length, key_dim), lambda i, j: (j, i, 0, 0))
    partial_steps = pl.BlockSpec((None, None, length), lambda i, j: (j, i, 0))
    placeholder = jnp.zeros((bh, length), jnp.float32)
    dq, dk, dv, dbeta, d_w0 = pl.pallas_call(
        functools.partial(_backward_kernel, delta=delta, packed=packed),
        out_shape=(jax.ShapeDtypeStruct((num_blocks, bh, length, key_dim), jnp.float32),
                   jax.ShapeDtypeStruct((num_blocks, bh, length, key_dim), jnp.float32),
                   jax.ShapeDtypeStruct((bh, length, value_dim), jnp.float32),
                   jax.ShapeDtypeStruct((num_blocks, bh, length), jnp.float32),
                   jax.ShapeDtypeStruct((bh, key_dim, value_dim), jnp.float32)),
        grid=(bh, num_blocks),
        in_specs=[keys, keys, values, per_step, values, state, values, state, *([per_step, state] if packed else [])],
        out_specs=(partial_keys, partial_keys, values, partial_steps, state),
        compiler_params=compiler_params(warps_for_state(2 * key_dim * block)),  # W and dL/dW
        interpret=interpret,
        name="fast_weight_fused_recurrent_bwd",
    )(q, k, v, beta if delta else placeholder, u if delta else jnp.zeros_like(v), final_state,
      d_out, d_final, *([starts, w0] if packed else []))
    return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv.astype(v.dtype),
            dbeta.sum(0) if delta else None, d_w0, None)


_fused.defvjp(_fused_forward_rule, _fused_backward, symbolic_zeros=True)


def fused_recurrent(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    *,
    rule: str,
    scale: float | Array = 1.0,
    interpret: bool = False,
    resets: Array | None = None,
) -> tuple[Array, Array]:
    """The fast-weight op as one fused recurrent Pallas kernel.

    The op's contract (shapes, dtypes, outputs, gradients) is stated once, by the library's oracle
    ``dpfp_jax.ops.fast_weight.naive.fast_weight_reference``; here on top of it: K <= ``MAX_KEY_DIM``, and the
    kernel computes in float32, so ``final_state`` is float32. The arguments are checked here
    (``pallas_kernels.validation``): a bad call raises a ValueError/TypeError naming the argument.

    ``resets``: packed documents, a bool ``[B, T]`` that is True where a step starts a new document
    (the library makes it from ``segment_ids``, never True at step 0): the state is zero before that
    step, as the oracle's ``resets`` says. What the backward then does and costs: this module's
    docstring.

    Example (interpret mode runs anywhere):
        >>> import jax.numpy as jnp
        >>> x = jnp.full((1, 3, 2, 4), 0.25)
        >>> out, w = fused_recurrent(x, x, x, jnp.full((1, 3, 2), 0.5), jnp.zeros((1, 2, 4, 4)),
        ...                          rule="delta", interpret=True)
        >>> out.shape, w.shape
        ((1, 3, 2, 4), (1, 2, 4, 4))
    """
    check_kernel_inputs(q, k, v, beta, initial_state, rule, scale, resets)
    check_interpret(interpret)
    if (empty := empty_result(v, initial_state, q)) is not None:
        return empty
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    k_pad, _, v_pad = padded_sizes(key_dim, value_dim)
    f32 = jnp.float32
    # q, k and v reach the kernel in their own dtype (bfloat16 stays bfloat16 in memory); it
    # computes in float32. The output is linear in q, so scaling it equals scaling the queries.
    qh, kh, vh = _heads_major(q, k_pad), _heads_major(k, k_pad), _heads_major(v, v_pad)
    betah = None if beta is None else jnp.moveaxis(beta.astype(f32), 2, 1).reshape(batch * heads, length)
    w0 = initial_state.astype(f32).reshape(batch * heads, key_dim, value_dim)
    w0 = pad_state(w0, k_pad, v_pad)
    starts = None
    if resets is not None:
        # Per step, the step its document starts at (-1 in the row's first, which starts from
        # initial_state; a reset at step 0 drops it, as in the oracle), for each head of the row.
        steps = jnp.arange(length, dtype=jnp.int32)
        starts = lax.cummax(jnp.where(resets, steps, -1), axis=1)
        starts = jnp.repeat(starts, heads, axis=0)  # [B * H, T], as _heads_major orders rows
    out, final_state = _fused(rule, interpret, qh, kh, vh, betah, w0, starts)
    out = jnp.moveaxis((out[..., :value_dim] * scale).reshape(batch, heads, length, value_dim), 1, 2)
    final_state = final_state[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    return out.astype(v.dtype), final_state
