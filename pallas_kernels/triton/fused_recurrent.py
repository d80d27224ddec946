"""Fused recurrent fast-weight kernels (Pallas): the counterpart of the paper's CUDA kernel.

One program per (batch x head, block of BV value columns) keeps its ``[K, BV]`` slice of the fast
weights on chip and walks time. The forward stores only the outputs, the final state and, when a
gradient will be taken (the custom VJP's forward rule), the delta rule's writes ``u_t``; the
backward walks time in reverse, rebuilding ``W_{t-1} = W_t - k_t u_t^T`` in-kernel, so nothing of
size T x K x V is ever stored. The value axis splits across programs because W's columns evolve
independently (each column of the delta rule only reads itself through ``W^T k``); gradients that
sum over V (dq, dk, dbeta) come back as one partial per value block and are summed outside the
kernel.

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

Gated (``log_decay``, ``alpha_t = exp(log_decay_t)``; delta: ``W_t = alpha_t (I - beta_t k_t k_t^T)
W_{t-1} + beta_t k_t v_t^T``, sum: ``W_t = alpha_t W_{t-1} + k_t v_t^T``): undoing a decayed step
would divide by alpha_t (round-off grows as 1 / alpha, and alpha = 0 has no inverse), so the reverse
walk by subtraction is not used. The forward (for a gradient) also stores the state entering every
block of ``N = checkpoint_block(T) = ceil(sqrt(T))`` steps; the backward, block by block in reverse,
replays the block's N states from its checkpoint (re-adding the stored writes, decayed as in the
forward) into a per-program scratch buffer in global memory, and walks them in reverse. Costs beside
the ungated kernel: memory ``(T / N + N) K V`` floats per head (checkpoints and the scratch:
O(sqrt(T)) states), time one more forward pass without the recall (a scale and a rank-1 update per
step) and two block-wide barriers per block. The gradient of log alpha_t is ``<dL/dW_a, W_a>`` with
``W_a = alpha_t W_{t-1}``: exact at alpha = 0, no division. A reset wins over the gate: it is passed
as alpha = 0 (``log alpha = -inf``), whose gradient is then zero.

DPFP on chip (``features``): q and k are read at width d as one-row chunks ``[T, 1, d]`` and the
kernels build phi(q_t), phi(k_t) 64 columns at a time with ``dpfp.py``'s helpers, holding the state
as ``K / 64`` tiles of ``[64, BV]``; the backward scatters the map's VJP per step into
``[T, 1, scatter_width(d)]`` (4 + 2d) buffers with atomic adds (every value block's program adds into
the same ones), and ``dpfp.map_gradient`` adds the rest in XLA.

Reached through ``dpfp_jax.fast_weight(..., impl="pallas")`` on a GPU, or directly with
``fused_recurrent(..., interpret=True)`` anywhere (Pallas's interpreter, for tests on the CPU).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.autodiff import cotangent_array, primal_values
from pallas_kernels.decays import gate_with_resets
from pallas_kernels.triton.dpfp import (
    DPFP,
    check_features,
    feature_tile,
    map_gradient,
    row_scale,
    scatter_vjp,
    scatter_width,
)
from pallas_kernels.triton.tiles import (
    compiler_params,
    key_tiles,
    pad_state,
    pad_to,
    padded_sizes,
    total,
    value_block,
    walk_in_reverse,
    warps_for_state,
)
from pallas_kernels.validation import (
    MAX_KEY_DIM,
    check_interpret,
    check_kernel_inputs,
    check_log_decay,
    empty_result,
)

Array = jax.Array


def _starts_document(starts_ref, t) -> Array:
    """Whether step t starts a document: the state is zero before it."""
    return starts_ref[t] == t


def _forward_step(t, w, q_ref, k_ref, v_ref, beta_ref, out_ref, u_ref, delta: bool) -> Array:
    """Step t's write into ``w`` (already reset or decayed) and its output: ``W_t``; the write u_t is
    stored when ``u_ref`` is given (the delta rule, for a backward)."""
    k_t = k_ref[t, :].astype(jnp.float32)
    v_t = v_ref[t, :].astype(jnp.float32)
    if delta:
        recall = jnp.sum(w * k_t[:, None], axis=0)
        u_t = beta_ref[t].astype(jnp.float32) * (v_t - recall)
        if u_ref is not None:
            u_ref[t, :] = u_t
    else:
        u_t = v_t
    w = w + k_t[:, None] * u_t[None, :]
    out_ref[t, :] = jnp.sum(w * q_ref[t, :].astype(jnp.float32)[:, None], axis=0).astype(out_ref.dtype)
    return w


def _forward_kernel(*refs, delta: bool, packed: bool, keep_writes: bool):
    refs = iter(refs)
    q_ref, k_ref, v_ref, beta_ref = (next(refs) for _ in range(4))
    starts_ref = next(refs) if packed else None
    w0_ref, out_ref = next(refs), next(refs)
    u_ref = next(refs) if keep_writes else None
    w_ref = next(refs)
    length = q_ref.shape[0]

    def step(t, w):
        if packed:
            w = jnp.where(_starts_document(starts_ref, t), 0.0, w)
        return _forward_step(t, w, q_ref, k_ref, v_ref, beta_ref, out_ref, u_ref, delta)

    w_ref[...] = lax.fori_loop(0, length, step, w0_ref[...].astype(jnp.float32))


def _gated_forward_kernel(*refs, delta: bool, keep_writes: bool, block: int | None):
    """The gated forward: ``W_{t-1}`` decays by ``alpha_t = exp(log_decay_t)`` before step t's write;
    for the backward, the state entering every block of ``block`` steps is stored (``checkpoints``;
    none when ``block`` is None) and with ``keep_writes`` the writes u."""
    refs = iter(refs)
    q_ref, k_ref, v_ref, beta_ref, log_decay_ref, w0_ref, out_ref = (next(refs) for _ in range(7))
    u_ref = next(refs) if keep_writes else None
    checkpoints_ref = next(refs) if block is not None else None
    w_ref = next(refs)
    w0 = w0_ref[...].astype(jnp.float32)

    def step(t, w):
        w = jnp.exp(log_decay_ref[t]) * w
        return _forward_step(t, w, q_ref, k_ref, v_ref, beta_ref, out_ref, u_ref, delta)

    if checkpoints_ref is None:
        w_ref[...] = lax.fori_loop(0, q_ref.shape[0], step, w0)
        return

    def block_step(b, w):
        checkpoints_ref[b] = w
        return lax.fori_loop(b * block, (b + 1) * block, step, w)

    w_ref[...] = lax.fori_loop(0, q_ref.shape[0] // block, block_step, w0)


class _Steps(NamedTuple):
    """The backward kernels' per-step refs (the ``[T, ...]`` blocks of one program)."""

    q: object
    k: object
    v: object
    beta: object
    u: object
    d_out: object
    dq: object
    dk: object
    dv: object
    dbeta: object

    def write(self, s, delta: bool) -> Array:
        """Step s's write ``k_s u_s^T`` (this program's value columns)."""
        k_s = self.k[s, :].astype(jnp.float32)
        u_s = self.u[s, :] if delta else self.v[s, :].astype(jnp.float32)
        return k_s[:, None] * u_s[None, :]


def _step_back(refs: _Steps, t, g: Array, states, delta: bool) -> tuple[Array, Array]:
    """Step t of a reverse walk: stores dq_t, dk_t, dv_t (and dbeta_t); returns ``(dL/dW_p, W_p)``.

    ``g`` is dL/dW_t less o_t's share; ``states(k_t, u_t)`` gives ``(W_t, W_p)``, W_p the state
    step t's write saw (``W_{t-1}``; zero after a reset; ``alpha_t W_{t-1}`` gated).
    """
    q_t = refs.q[t, :].astype(jnp.float32)
    k_t = refs.k[t, :].astype(jnp.float32)
    v_t = refs.v[t, :].astype(jnp.float32)
    do_t = refs.d_out[t, :].astype(jnp.float32)
    u_t = refs.u[t, :] if delta else v_t
    w, w_p = states(k_t, u_t)
    refs.dq[t, :] = jnp.sum(w * do_t[None, :], axis=1)
    g = g + q_t[:, None] * do_t[None, :]
    dk_t = jnp.sum(g * u_t[None, :], axis=1)
    du_t = jnp.sum(g * k_t[:, None], axis=0)
    if delta:
        residual = v_t - jnp.sum(w_p * k_t[:, None], axis=0)
        refs.dbeta[t] = jnp.sum(du_t * residual)
        dv_t = refs.beta[t].astype(jnp.float32) * du_t
        dk_t = dk_t - jnp.sum(w_p * dv_t[None, :], axis=1)  # through the recall W_p^T k
        g = g - k_t[:, None] * dv_t[None, :]
    else:
        dv_t = du_t
    refs.dk[t, :] = dk_t
    refs.dv[t, :] = dv_t
    return g, w_p


def _backward_kernel(*refs, delta: bool, packed: bool):
    if packed:
        (q_ref, k_ref, v_ref, beta_ref, u_ref, w_ref, d_out_ref, d_w_ref, starts_ref, w0_ref,
         dq_ref, dk_ref, dv_ref, dbeta_ref, d_w0_ref) = refs
    else:
        (q_ref, k_ref, v_ref, beta_ref, u_ref, w_ref, d_out_ref, d_w_ref,
         dq_ref, dk_ref, dv_ref, dbeta_ref, d_w0_ref) = refs
    steps = _Steps(q_ref, k_ref, v_ref, beta_ref, u_ref, d_out_ref, dq_ref, dk_ref, dv_ref, dbeta_ref)
    length = q_ref.shape[0]

    def previous_document_final_state(t):
        """The state a reset at step t discarded: the previous document walked forward from its start
        (the initial state for the row's first document, else zero), re-adding its writes."""
        start = starts_ref[jnp.maximum(t - 1, 0)]
        begin = jnp.where(start < 0, w0_ref[...], 0.0)
        return lax.fori_loop(jnp.maximum(start, 0), t, lambda s, w: w + steps.write(s, delta), begin)

    def step(i, carry):
        w, g = carry  # W_t and dL/dW_t (this program's value columns)
        t = length - 1 - i
        reset = _starts_document(starts_ref, t) if packed else None

        def states(k_t, u_t):
            w_p = w - k_t[:, None] * u_t[None, :]
            # What step t read: exactly zero after a reset.
            return w, w_p if reset is None else jnp.where(reset, 0.0, w_p)

        g, w = _step_back(steps, t, g, states, delta)
        if packed:
            # The state before a reset reaches nothing after it: no cotangent flows back through it.
            w = lax.cond(reset, lambda: previous_document_final_state(t), lambda: w)
            g = jnp.where(reset, 0.0, g)
        return w, g

    _, g = lax.fori_loop(0, length, step, (w_ref[...], d_w_ref[...].astype(jnp.float32)))
    d_w0_ref[...] = g


def _gated_backward_kernel(q_ref, k_ref, v_ref, beta_ref, log_decay_ref, u_ref, checkpoints_ref, d_out_ref,
                           d_w_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, d_log_decay_ref, d_w0_ref, states_ref, *,
                           delta: bool, block: int, interpret: bool):
    """The gated backward, blocks in reverse: a block's states are replayed from its checkpoint into
    ``states_ref`` (this program's ``[block, K, BV]`` scratch in global memory, re-adding the stored
    writes), then read back step by step in reverse. Nothing divides by alpha."""
    steps = _Steps(q_ref, k_ref, v_ref, beta_ref, u_ref, d_out_ref, dq_ref, dk_ref, dv_ref, dbeta_ref)
    num_blocks = q_ref.shape[0] // block

    def alpha(t):
        return jnp.exp(log_decay_ref[t])

    def block_back(i, g):
        begin = (num_blocks - 1 - i) * block

        def replay(j, w):  # W_{t-1} of each step of the block, as the forward computed it
            states_ref[j] = w
            return alpha(begin + j) * w + steps.write(begin + j, delta)

        lax.fori_loop(0, block, replay, checkpoints_ref[num_blocks - 1 - i])
        if not interpret:
            pltriton.debug_barrier()  # every thread's replayed states are in memory before any is read

        def step(jj, g):  # g = dL/dW_t (this program's value columns), less o_t's share
            j = block - 1 - jj
            t = begin + j
            w_a = alpha(t) * states_ref[j]  # alpha_t W_{t-1}: what step t's write sees

            def states(k_t, u_t):
                return w_a + k_t[:, None] * u_t[None, :], w_a

            g, _ = _step_back(steps, t, g, states, delta)
            # g is now dL/dW_a; W_a = alpha W_{t-1}, so d log alpha = <dL/dW_a, W_a> (zero at alpha = 0).
            d_log_decay_ref[t] = total(g * w_a)
            return alpha(t) * g

        g = lax.fori_loop(0, block, step, g)
        if not interpret:
            pltriton.debug_barrier()  # the next block's replay overwrites the states read here
        return g

    d_w0_ref[...] = lax.fori_loop(0, num_blocks, block_back, d_w_ref[...].astype(jnp.float32))


def _dpfp_tiles(x_ref, t, features: DPFP, num_tiles: int) -> tuple[list[Array], Array | None]:
    """Step t's features as key-tile columns: ``(columns [64, 1] of phi_n, s)``, computed from the
    raw ``x_ref [T, 1, d]`` (``dpfp.py``'s tiles of a one-row chunk)."""
    scale = row_scale(features, x_ref, t, num_tiles)
    rows = [feature_tile(x_ref, t, tile, scale) for tile in range(num_tiles)]
    return [row.T for row in rows], scale


def _dpfp_forward_kernel(*refs, delta: bool, keep_writes: bool, features: DPFP):
    """The forward with DPFP on chip: q, k read at width d (``[T, 1, d]``), the state as key tiles;
    the writes u stored with ``keep_writes``."""
    refs = iter(refs)
    q_ref, k_ref, v_ref, beta_ref, w0_ref, out_ref = (next(refs) for _ in range(6))
    u_ref = next(refs) if keep_writes else None
    w_ref = next(refs)
    tiles = key_tiles(w0_ref.shape[0])

    def step(t, w):
        k_cols = _dpfp_tiles(k_ref, t, features, len(tiles))[0]
        v_t = v_ref[t, :].astype(jnp.float32)
        if delta:
            recall = sum(jnp.sum(w_tile * k_col, axis=0) for w_tile, k_col in zip(w, k_cols, strict=True))
            u_t = beta_ref[t].astype(jnp.float32) * (v_t - recall)
            if u_ref is not None:
                u_ref[t, :] = u_t
        else:
            u_t = v_t
        w = tuple(w_tile + k_col * u_t[None, :] for w_tile, k_col in zip(w, k_cols, strict=True))
        q_cols = _dpfp_tiles(q_ref, t, features, len(tiles))[0]
        out_ref[t, :] = sum(jnp.sum(w_tile * q_col, axis=0) for w_tile, q_col in zip(w, q_cols, strict=True))
        return w

    w = lax.fori_loop(0, q_ref.shape[0], step, tuple(w0_ref[rows, :] for rows in tiles))
    for rows, w_tile in zip(tiles, w, strict=True):
        w_ref[rows, :] = w_tile


def _map_back(g_ref, x_ref, t, scale: Array | None, cotangents: list[Array]) -> None:
    """The map's VJP for step t: ``cotangents`` (``[64]`` per key tile, dL/dphi_n) scattered into
    ``g_ref [T, 1, scatter_width(d)]`` per position of ``a = [relu(x), relu(-x)]``; the caller adds
    the normalisation's part in XLA (``dpfp.map_gradient``)."""
    for tile, cotangent in enumerate(cotangents):
        scatter_vjp(g_ref, x_ref, t, tile, cotangent[None, :], scale)


def _dpfp_backward_kernel(q_ref, k_ref, v_ref, beta_ref, u_ref, w_ref, d_out_ref, d_w_ref, _dq_in, _dk_in,
                          dq_ref, dk_ref, dv_ref, dbeta_ref, d_w0_ref, *, delta: bool, features: DPFP):
    """The backward with DPFP on chip: phi(q_t), phi(k_t) recomputed per step, dq and dk scattered per
    position of ``a`` with atomic adds (every value block's program adds into the same zeroed buffers)."""
    tiles = key_tiles(w_ref.shape[0])
    count = len(tiles)

    def step(i, carry):
        w, g = carry  # key tiles of W_t and of dL/dW_t (this program's value columns)
        t = q_ref.shape[0] - 1 - i
        q_cols, q_scale = _dpfp_tiles(q_ref, t, features, count)
        k_cols, k_scale = _dpfp_tiles(k_ref, t, features, count)
        v_t = v_ref[t, :].astype(jnp.float32)
        do_t = d_out_ref[t, :].astype(jnp.float32)
        u_t = u_ref[t, :] if delta else v_t
        dq = [jnp.sum(w_tile * do_t[None, :], axis=1) for w_tile in w]
        g = tuple(g_tile + q_col * do_t[None, :] for g_tile, q_col in zip(g, q_cols, strict=True))
        dk = [jnp.sum(g_tile * u_t[None, :], axis=1) for g_tile in g]
        du_t = sum(jnp.sum(g_tile * k_col, axis=0) for g_tile, k_col in zip(g, k_cols, strict=True))
        w = tuple(w_tile - k_col * u_t[None, :] for w_tile, k_col in zip(w, k_cols, strict=True))
        if delta:
            recall = sum(jnp.sum(w_tile * k_col, axis=0) for w_tile, k_col in zip(w, k_cols, strict=True))
            dbeta_ref[t] = jnp.sum(du_t * (v_t - recall))
            dv_t = beta_ref[t].astype(jnp.float32) * du_t
            dk = [dk_tile - jnp.sum(w_tile * dv_t[None, :], axis=1) for dk_tile, w_tile in zip(dk, w, strict=True)]
            g = tuple(g_tile - k_col * dv_t[None, :] for g_tile, k_col in zip(g, k_cols, strict=True))
        else:
            dv_t = du_t
        dv_ref[t, :] = dv_t
        _map_back(dq_ref, q_ref, t, q_scale, dq)
        _map_back(dk_ref, k_ref, t, k_scale, dk)
        return w, g

    walk_in_reverse(step, q_ref.shape[0], tiles, w_ref, d_w_ref, d_w0_ref)


def _heads_major(x: Array, size: int | None = None) -> Array:
    """``[B, T, H, D] -> [B * H, T, D_padded]`` (``[B, T, H] -> [B * H, T]`` for a per-step array)."""
    batch, length, heads = x.shape[:3]
    x = jnp.moveaxis(x, 2, 1).reshape(batch * heads, length, *x.shape[3:])
    return x if size is None else pad_to(x, 2, size)


class _Specs(NamedTuple):
    """One program's blocks over the grid (batch x head i, value block j)."""

    block: int  # value columns per program
    blocks: int  # value blocks
    keys: pl.BlockSpec  # [T, K]
    values: pl.BlockSpec  # [T, BV]
    per_step: pl.BlockSpec  # [T]
    state: pl.BlockSpec  # [K, BV]
    partial_keys: pl.BlockSpec  # [T, K], one per value block (summed outside)
    partial_steps: pl.BlockSpec  # [T], one per value block

    def states(self, slots: int) -> pl.BlockSpec:
        """``slots`` states ``[slots, K, BV]`` (the gated kernels' checkpoints, or the replayed block)."""
        return pl.BlockSpec((None, slots, self.state.block_shape[1], self.block), lambda i, j: (i, 0, 0, j))


def _specs(length: int, key_dim: int, value_dim: int) -> _Specs:
    block = value_block(key_dim, value_dim)
    return _Specs(block, value_dim // block,
                  pl.BlockSpec((None, length, key_dim), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, length, block), lambda i, j: (i, 0, j)),
                  pl.BlockSpec((None, length), lambda i, j: (i, 0)),
                  pl.BlockSpec((None, key_dim, block), lambda i, j: (i, 0, j)),
                  pl.BlockSpec((None, None, length, key_dim), lambda i, j: (j, i, 0, 0)),
                  pl.BlockSpec((None, None, length), lambda i, j: (j, i, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(rule: str, interpret: bool, q, k, v, beta, w0, starts):
    """``starts [B * H, T]`` int32 (the step each step's document starts at, -1 in the row's first
    document) or None. Without a gradient to take, the writes u are not stored."""
    out, _, final_state = _forward(rule, interpret, q, k, v, beta, w0, starts, keep_writes=False)
    return out, final_state


def _fused_forward(rule, interpret, q, k, v, beta, w0, starts):
    out, u, final_state = _forward(rule, interpret, q, k, v, beta, w0, starts, keep_writes=True)
    # w0 is kept only with documents: the backward walks the row's first one forward from it.
    return (out, final_state), (q, k, v, beta, u, final_state, starts, w0 if starts is not None else None)


def _forward(rule, interpret, q, k, v, beta, w0, starts, *, keep_writes: bool):
    """The forward kernel: ``(out, u or None, final_state)``; u (the writes, float32) only if
    ``keep_writes`` and the rule is delta (the backward rebuilds states from it)."""
    delta, packed = rule == "delta", starts is not None
    keep_writes = keep_writes and delta
    bh, length, key_dim = q.shape
    value_dim = v.shape[-1]
    specs = _specs(length, key_dim, value_dim)
    keys, values, per_step, state = specs.keys, specs.values, specs.per_step, specs.state
    beta_in = beta if delta else jnp.zeros((bh, length), jnp.float32)
    results = pl.pallas_call(
        functools.partial(_forward_kernel, delta=delta, packed=packed, keep_writes=keep_writes),
        out_shape=(jax.ShapeDtypeStruct((bh, length, value_dim), jnp.float32),
                   *([jax.ShapeDtypeStruct((bh, length, value_dim), jnp.float32)] if keep_writes else []),
                   jax.ShapeDtypeStruct((bh, key_dim, value_dim), jnp.float32)),
        grid=(bh, specs.blocks),
        in_specs=[keys, keys, values, per_step, *([per_step] if packed else []), state],
        out_specs=(values, *([values] if keep_writes else []), state),
        compiler_params=compiler_params(warps_for_state(key_dim * specs.block)),
        interpret=interpret,
        name="fast_weight_fused_recurrent_fwd",
    )(q, k, v, beta_in, *([starts] if packed else []), w0)
    return results[0], results[1] if keep_writes else None, results[-1]


def _fused_forward_rule(rule, interpret, *primals):
    return _fused_forward(rule, interpret, *primal_values(*primals))


def _fused_backward(rule, interpret, residuals, cotangents):
    q, k, v, beta, u, final_state, starts, w0 = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    delta, packed = rule == "delta", starts is not None
    bh, length, key_dim = q.shape
    value_dim = v.shape[-1]
    specs = _specs(length, key_dim, value_dim)
    num_blocks, keys, values, per_step, state = specs.blocks, specs.keys, specs.values, specs.per_step, specs.state
    partial_keys, partial_steps = specs.partial_keys, specs.partial_steps
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
        compiler_params=compiler_params(warps_for_state(2 * key_dim * specs.block)),  # W and dL/dW
        interpret=interpret,
        name="fast_weight_fused_recurrent_bwd",
    )(q, k, v, beta if delta else placeholder, u if delta else jnp.zeros_like(v), final_state,
      d_out, d_final, *([starts, w0] if packed else []))
    return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv.astype(v.dtype),
            dbeta.sum(0) if delta else None, d_w0, None)


_fused.defvjp(_fused_forward_rule, _fused_backward, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_dpfp(rule: str, interpret: bool, features: DPFP, q, k, v, beta, w0):
    """DPFP on chip: q, k raw ``[B * H, T, 1, d]`` (a one-row chunk per step, as ``dpfp.py``'s tiles
    read them), the state ``[B * H, K, V]`` with K = 2·nu·d. Without a gradient to take, the writes u
    are not stored."""
    out, _, final_state = _dpfp_forward(rule, interpret, features, q, k, v, beta, w0, keep_writes=False)
    return out, final_state


def _raw_spec(length: int, width: int) -> pl.BlockSpec:
    """A row's raw q or k ``[T, 1, width]``, the same block for every value block."""
    return pl.BlockSpec((None, length, 1, width), lambda i, j: (i, 0, 0, 0))


def _fused_dpfp_forward(rule, interpret, features, q, k, v, beta, w0):
    out, u, final_state = _dpfp_forward(rule, interpret, features, q, k, v, beta, w0, keep_writes=True)
    return (out, final_state), (q, k, v, beta, u, final_state)


def _dpfp_forward(rule, interpret, features, q, k, v, beta, w0, *, keep_writes: bool):
    """The DPFP forward kernel: ``(out, u or None, final_state)``, u only if ``keep_writes`` and the
    rule is delta."""
    delta = rule == "delta"
    keep_writes = keep_writes and delta
    bh, length, _, dim = q.shape
    key_dim, value_dim = w0.shape[1:]
    specs = _specs(length, key_dim, value_dim)
    raw = _raw_spec(length, dim)
    f32 = jnp.float32
    results = pl.pallas_call(
        functools.partial(_dpfp_forward_kernel, delta=delta, keep_writes=keep_writes, features=features),
        out_shape=(jax.ShapeDtypeStruct((bh, length, value_dim), f32),
                   *([jax.ShapeDtypeStruct((bh, length, value_dim), f32)] if keep_writes else []),
                   jax.ShapeDtypeStruct((bh, key_dim, value_dim), f32)),
        grid=(bh, specs.blocks),
        in_specs=[raw, raw, specs.values, specs.per_step, specs.state],
        out_specs=(specs.values, *([specs.values] if keep_writes else []), specs.state),
        compiler_params=compiler_params(warps_for_state(key_dim * specs.block)),
        interpret=interpret,
        name="fast_weight_fused_recurrent_dpfp_fwd",
    )(q, k, v, beta if delta else jnp.zeros((bh, length), f32), w0)
    return results[0], results[1] if keep_writes else None, results[-1]


def _fused_dpfp_forward_rule(rule, interpret, features, *primals):
    return _fused_dpfp_forward(rule, interpret, features, *primal_values(*primals))


def _fused_dpfp_backward(rule, interpret, features, residuals, cotangents):
    q, k, v, beta, u, final_state = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    delta = rule == "delta"
    bh, length, _, dim = q.shape
    key_dim, value_dim = final_state.shape[1:]
    specs = _specs(length, key_dim, value_dim)
    raw, scattered = _raw_spec(length, dim), _raw_spec(length, scatter_width(dim))
    f32 = jnp.float32
    # dq, dk per position of a = [relu(x), relu(-x)] (width 2d): every value block's program adds
    # into the same zero-filled buffers.
    buffers = [jnp.zeros((bh, length, 1, scatter_width(dim)), f32) for _ in range(2)]
    inputs = [q, k, v, beta if delta else jnp.zeros((bh, length), f32), u if delta else jnp.zeros_like(v),
              final_state, d_out, d_final]
    dq, dk, dv, dbeta, d_w0 = pl.pallas_call(
        functools.partial(_dpfp_backward_kernel, delta=delta, features=features),
        out_shape=(*[jax.ShapeDtypeStruct(x.shape, f32) for x in buffers],
                   jax.ShapeDtypeStruct((bh, length, value_dim), f32),
                   jax.ShapeDtypeStruct((specs.blocks, bh, length), f32),
                   jax.ShapeDtypeStruct((bh, key_dim, value_dim), f32)),
        grid=(bh, specs.blocks),
        in_specs=[raw, raw, specs.values, specs.per_step, specs.values, specs.state, specs.values, specs.state,
                  scattered, scattered],
        out_specs=(scattered, scattered, specs.values, specs.partial_steps, specs.state),
        input_output_aliases={len(inputs): 0, len(inputs) + 1: 1},
        compiler_params=compiler_params(warps_for_state(2 * key_dim * specs.block)),  # W and dL/dW
        interpret=interpret,
        name="fast_weight_fused_recurrent_dpfp_bwd",
    )(*inputs, *buffers)
    dq, dk = (map_gradient(features, x, y).astype(y.dtype) for x, y in ((dq, q), (dk, k)))
    return dq, dk, dv.astype(v.dtype), dbeta.sum(0) if delta else None, d_w0


_fused_dpfp.defvjp(_fused_dpfp_forward_rule, _fused_dpfp_backward, symbolic_zeros=True)


def checkpoint_block(length: int) -> int:
    """Steps per checkpointed block of the gated kernels: ``ceil(sqrt(T))`` (at least 1), which
    minimises the ``T / N`` checkpoints plus the ``N`` replayed states of one block.

    Example:
        >>> checkpoint_block(4096), checkpoint_block(17), checkpoint_block(1)
        (64, 5, 1)
    """
    root = math.isqrt(length)
    return max(1, root + (root * root < length))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_gated(rule: str, interpret: bool, block: int, q, k, v, beta, log_decay, w0):
    """Gated, T a multiple of ``block``: ``log_decay [B * H, T]`` float32 (``-inf`` at a reset).
    Without a gradient to take, the writes u and the checkpointed states are not stored."""
    out, _, _, final_state = _gated_forward(rule, interpret, block, q, k, v, beta, log_decay, w0, keep_writes=False)
    return out, final_state


def _fused_gated_forward(rule, interpret, block, q, k, v, beta, log_decay, w0):
    out, u, checkpoint_states, final_state = _gated_forward(rule, interpret, block, q, k, v, beta, log_decay, w0,
                                                            keep_writes=True)
    return (out, final_state), (q, k, v, beta, log_decay, u, checkpoint_states)


def _gated_forward(rule, interpret, block, q, k, v, beta, log_decay, w0, *, keep_writes: bool):
    """The gated forward kernel: ``(out, u or None, checkpoints or None, final_state)``; with
    ``keep_writes`` the checkpointed states ``[B * H, T / block, K, V]`` and, delta rule, u."""
    delta = rule == "delta"
    keep_states, keep_writes = keep_writes, keep_writes and delta
    bh, length, key_dim = q.shape
    value_dim = v.shape[-1]
    num_checkpoints = length // block
    specs = _specs(length, key_dim, value_dim)
    keys, values, per_step, state = specs.keys, specs.values, specs.per_step, specs.state
    beta_in = beta if delta else jnp.zeros((bh, length), jnp.float32)
    f32 = jnp.float32
    checkpoints = [specs.states(num_checkpoints)] if keep_states else []
    results = list(pl.pallas_call(
        functools.partial(_gated_forward_kernel, delta=delta, keep_writes=keep_writes,
                          block=block if keep_states else None),
        out_shape=(jax.ShapeDtypeStruct((bh, length, value_dim), f32),
                   *([jax.ShapeDtypeStruct((bh, length, value_dim), f32)] if keep_writes else []),
                   *([jax.ShapeDtypeStruct((bh, num_checkpoints, key_dim, value_dim), f32)] if keep_states else []),
                   jax.ShapeDtypeStruct((bh, key_dim, value_dim), f32)),
        grid=(bh, specs.blocks),
        in_specs=[keys, keys, values, per_step, per_step, state],
        out_specs=(values, *([values] if keep_writes else []), *checkpoints, state),
        compiler_params=compiler_params(warps_for_state(key_dim * specs.block)),
        interpret=interpret,
        name="fast_weight_fused_recurrent_gated_fwd",
    )(q, k, v, beta_in, log_decay, w0))
    out, final_state = results.pop(0), results.pop()
    u = results.pop(0) if keep_writes else None
    return out, u, results.pop(0) if keep_states else None, final_state


def _fused_gated_forward_rule(rule, interpret, block, *primals):
    return _fused_gated_forward(rule, interpret, block, *primal_values(*primals))


def _fused_gated_backward(rule, interpret, block, residuals, cotangents):
    q, k, v, beta, log_decay, u, checkpoint_states = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    delta = rule == "delta"
    bh, length, key_dim = q.shape
    value_dim = v.shape[-1]
    specs = _specs(length, key_dim, value_dim)
    num_blocks, keys, values, per_step, state = specs.blocks, specs.keys, specs.values, specs.per_step, specs.state
    partial_keys, partial_steps = specs.partial_keys, specs.partial_steps
    f32 = jnp.float32
    dq, dk, dv, dbeta, d_log_decay, d_w0, _ = pl.pallas_call(
        functools.partial(_gated_backward_kernel, delta=delta, block=block, interpret=interpret),
        out_shape=(jax.ShapeDtypeStruct((num_blocks, bh, length, key_dim), f32),
                   jax.ShapeDtypeStruct((num_blocks, bh, length, key_dim), f32),
                   jax.ShapeDtypeStruct((bh, length, value_dim), f32),
                   jax.ShapeDtypeStruct((num_blocks, bh, length), f32),
                   jax.ShapeDtypeStruct((num_blocks, bh, length), f32),
                   jax.ShapeDtypeStruct((bh, key_dim, value_dim), f32),
                   jax.ShapeDtypeStruct((bh, block, key_dim, value_dim), f32)),  # the replay's scratch
        grid=(bh, num_blocks),
        in_specs=[keys, keys, values, per_step, per_step, values, specs.states(length // block), values, state],
        out_specs=(partial_keys, partial_keys, values, partial_steps, partial_steps, state, specs.states(block)),
        compiler_params=compiler_params(warps_for_state(2 * key_dim * specs.block)),  # W_a and dL/dW
        interpret=interpret,
        name="fast_weight_fused_recurrent_gated_bwd",
    )(q, k, v, beta if delta else jnp.zeros((bh, length), f32), log_decay, u if delta else jnp.zeros_like(v),
      checkpoint_states, d_out, d_final)
    return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv.astype(v.dtype),
            dbeta.sum(0) if delta else None, d_log_decay.sum(0), d_w0)


_fused_gated.defvjp(_fused_gated_forward_rule, _fused_gated_backward, symbolic_zeros=True)


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
    log_decay: Array | None = None,
    features: DPFP | None = None,
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

    ``log_decay``: gated fast weights, float ``[B, T, H]``, ``log alpha_t <= 0``: ``W_{t-1}`` is
    multiplied by ``alpha_t`` before step t's write, as the oracle's ``log_decay`` says; a reset
    (``resets``) wins over it (alpha = 0 there, no gradient). The forward stores the state entering
    every block of ``checkpoint_block(T)`` steps; the backward replays each block from its
    checkpoint and walks it in reverse (this module's docstring: what it costs).

    ``features``: a :class:`~pallas_kernels.triton.dpfp.DPFP`: q and k are then the raw inputs
    ``[B, T, H, d]`` (d a multiple of 32) and the kernel computes phi(q_t), phi(k_t) (K = 2·nu·d,
    the state's K) from them on chip at each step, forward and backward (the map's VJP in the
    kernel, as ``dpfp.py`` says); dq and dk come back at width d. Not with ``resets`` or
    ``log_decay`` (the library then applies the map before the kernel).

    Example (interpret mode runs anywhere):
        >>> import jax.numpy as jnp
        >>> x = jnp.full((1, 3, 2, 4), 0.25)
        >>> out, w = fused_recurrent(x, x, x, jnp.full((1, 3, 2), 0.5), jnp.zeros((1, 2, 4, 4)),
        ...                          rule="delta", interpret=True)
        >>> out.shape, w.shape
        ((1, 3, 2, 4), (1, 2, 4, 4))
    """
    state_key_dim = None
    if features is not None:
        if len(getattr(q, "shape", ())) == 4:  # else check_kernel_inputs says what q is
            state_key_dim = check_features(features, q.shape[-1], MAX_KEY_DIM)
        if resets is not None or log_decay is not None:
            given = "resets" if resets is not None else "log_decay"
            raise ValueError(f"features: the fused recurrent kernel maps q, k itself only without resets and "
                             f"log_decay; got {given} (apply the map before the kernel)")
    check_kernel_inputs(q, k, v, beta, initial_state, rule, scale, resets, state_key_dim=state_key_dim)
    check_log_decay(log_decay, q)
    check_interpret(interpret)
    if (empty := empty_result(v, initial_state, q)) is not None:
        return empty
    if features is not None:
        return _dpfp_call(rule, interpret, scale, features, q, k, v, beta, initial_state)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    sizes = (batch, length, heads, key_dim, value_dim)
    k_pad, _, v_pad = padded_sizes(key_dim, value_dim)
    f32 = jnp.float32
    # q, k and v reach the kernel in their own dtype (bfloat16 stays bfloat16 in memory); it
    # computes in float32. The output is linear in q, so scaling it equals scaling the queries.
    qh, kh, vh = _heads_major(q, k_pad), _heads_major(k, k_pad), _heads_major(v, v_pad)
    betah = None if beta is None else _heads_major(beta.astype(f32))
    w0 = initial_state.astype(f32).reshape(batch * heads, key_dim, value_dim)
    w0 = pad_state(w0, k_pad, v_pad)
    if log_decay is not None:
        return _gated_call(rule, interpret, scale, qh, kh, vh, betah, w0, log_decay, resets, sizes)
    starts = None
    if resets is not None:
        # Per step, the step its document starts at (-1 in the row's first, which starts from
        # initial_state; a reset at step 0 drops it, as in the oracle), for each head of the row.
        steps = jnp.arange(length, dtype=jnp.int32)
        starts = lax.cummax(jnp.where(resets, steps, -1), axis=1)
        starts = jnp.repeat(starts, heads, axis=0)  # [B * H, T], as _heads_major orders rows
    return _unpadded_results(_fused(rule, interpret, qh, kh, vh, betah, w0, starts), scale, sizes, v.dtype)


def _unpadded_results(results: tuple[Array, Array], scale, sizes: tuple[int, ...], dtype) -> tuple[Array, Array]:
    """The kernels' heads-major padded ``(out, final_state)`` as :func:`fused_recurrent` returns them:
    ``(scale * out [B, T, H, V] in dtype, final_state [B, H, K, V])``; ``sizes = (B, T, H, K, V)``."""
    out, final_state = results
    batch, length, heads, key_dim, value_dim = sizes
    out = jnp.moveaxis((out[:, :length, :value_dim] * scale).reshape(batch, heads, length, value_dim), 1, 2)
    final_state = final_state[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    return out.astype(dtype), final_state


def _gated_call(rule, interpret, scale, qh, kh, vh, betah, w0, log_decay, resets, sizes):
    """:func:`fused_recurrent` with a gate, on the heads-major padded arrays."""
    length = qh.shape[1]
    log_decay = log_decay.astype(jnp.float32)
    if resets is not None:
        log_decay = gate_with_resets(log_decay, resets)
    log_decay = _heads_major(log_decay)
    block = checkpoint_block(length)
    padded = -(-length // block) * block
    # Padded steps are inert: zero q, k, v and beta, log alpha = 0 (alpha = 1).
    qh, kh, vh, betah, log_decay = (None if x is None else pad_to(x, 1, padded)
                                    for x in (qh, kh, vh, betah, log_decay))
    return _unpadded_results(_fused_gated(rule, interpret, block, qh, kh, vh, betah, log_decay, w0), scale, sizes,
                             vh.dtype)


def _dpfp_call(rule, interpret, scale, features, q, k, v, beta, initial_state):
    """:func:`fused_recurrent` with DPFP on chip: q, k stay ``[., d]`` (no padding; d is a multiple of 32)."""
    batch, length, heads, dim = q.shape
    key_dim, value_dim = initial_state.shape[2:]
    v_pad = padded_sizes(key_dim, value_dim)[2]
    qh, kh = (_heads_major(x).reshape(batch * heads, length, 1, dim) for x in (q, k))
    betah = None if beta is None else _heads_major(beta.astype(jnp.float32))
    w0 = pad_to(initial_state.astype(jnp.float32).reshape(batch * heads, key_dim, value_dim), 2, v_pad)
    return _unpadded_results(_fused_dpfp(rule, interpret, features, qh, kh, _heads_major(v, v_pad), betah, w0), scale,
                    (batch, length, heads, key_dim, value_dim), v.dtype)
