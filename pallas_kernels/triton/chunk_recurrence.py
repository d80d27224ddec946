"""Chunked delta/sum rule: the sequential inter-chunk recurrence as Pallas kernels.

The chunkwise form (``dpfp_jax/ops/fast_weight/chunk.py``) splits into work that does not depend
on the state, batched matmuls over all chunks at once that XLA already runs well (scores, the
per-chunk WY inverse, ``U_tilde``, ``Y``, ``Q - S Y``), and a sequential walk over chunks that
XLA runs as a loop of small kernel launches. These kernels do the walk: one program per
(batch x head, block of BV value columns) keeps its ``[K, BV]`` slice of the state on chip and,
per chunk, does three [C, K] x [K, BV]-sized matmuls (``jnp.dot``: tensor cores on the GPU, see
``tiles.PRECISE_DOT``; float32 accumulation). The backward walks chunks in reverse, rebuilding
each chunk's start state from its writes as the XLA path does; products that sum over V come
back as one partial per value block, summed outside.

Packed documents (``keep``, as ``chunk.forward_recurrence_xla`` takes it): a chunk in which a
document starts does not carry its start state into its end state (k comes masked to the chunk's
last document, by the caller), so the backward could not rebuild that start state by
subtraction; as the XLA walk does, the forward then also stores every chunk's start state
(``states``, ``T / C`` states of ``[K, V]`` per head) and the backward reads them instead of
subtracting.

Gated (``decay``, one factor per chunk, in place of ``keep``: ``W1 = decay W0 + K^T U``), the walk
does the same: the forward stores every chunk's start state, and the backward reads it rather than
rebuilding it (which would divide by the decay) and also returns ``d_decay = <dL/dW1, W0>`` per
chunk (one partial per value block, summed outside). The chunk form computes the decays within a
chunk itself (``dpfp_jax``'s ``wy.chunk_decays``) and hands the walk keys already scaled by them.

On-chip budget (checked for H100/H200 by ``benchmarks/triton_report.py``): the state is held as
``K / 64`` separate ``[64, BV]`` tiles and every chunk is read 64 key columns at a time, so no
``[C, K]`` operand is ever materialised whole: Triton stages such operands through shared
memory, and whole ones at large K overflowed what a program may use (each kernel's shared memory
against the H200's limit: docs/reports/triton_report_h200.md). Loads are not software-pipelined
(``num_stages=1``) for the same reason: pipelining keeps every load of the loop body in flight
several times over.

K and V are padded as ``tiles`` says; zero padding is inert.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.triton.tiles import (
    KEY_TILE,
    NUM_WARPS,
    compiler_params,
    key_tiles,
    pad_state,
    pad_to,
    padded_sizes,
    tile_dot,
    total,
    walk_in_reverse,
)
from pallas_kernels.validation import (
    check_chunk_decay,
    check_chunk_documents,
    check_interpret,
    check_recurrence_inputs,
)

Array = jax.Array

# Floats of state per program: the backward holds W and dL/dW and more temporaries, so its value
# blocks are narrower (K = 128: BV = 32; K >= 256: BV = 16), which keeps spills small
# (docs/reports/triton_report_h200.md, from ``benchmarks/triton_report.py``); the forward holds W alone.
FORWARD_STATE_BUDGET = 16_384
BACKWARD_STATE_BUDGET = 4_096


def _forward_kernel(*refs, delta: bool, packed: bool, gated: bool, dot):
    refs = iter(refs)
    q_ref, k_ref, u_tilde_ref = next(refs), next(refs), next(refs)
    y_ref = next(refs) if delta else None
    out_intra_ref = next(refs)
    keep_ref = next(refs) if packed else None
    w0_ref, out_ref = next(refs), next(refs)
    u_ref = next(refs) if delta else None
    states_ref = next(refs) if packed else None
    w_ref = next(refs)
    tiles = key_tiles(w0_ref.shape[0])

    def step(n, w):
        def times_state(x_ref):  # x[n] @ W, summed over key tiles
            return sum(dot(x_ref[n, :, rows], w_tile) for rows, w_tile in zip(tiles, w, strict=True))

        u = u_tilde_ref[n] - times_state(y_ref) if delta else u_tilde_ref[n]
        if delta:
            u_ref[n] = u
        out_ref[n] = times_state(q_ref) + out_intra_ref[n]
        if packed:
            for rows, w_tile in zip(tiles, w, strict=True):
                states_ref[n, rows, :] = w_tile
            if gated:  # keep_ref holds each chunk's decay: W1 = decay W0 + K^T U
                w = tuple(keep_ref[n] * w_tile for w_tile in w)
            else:
                w = tuple(jnp.where(keep_ref[n] != 0, w_tile, 0.0) for w_tile in w)
        return tuple(w_tile + dot(k_ref[n, :, rows].T, u) for rows, w_tile in zip(tiles, w, strict=True))

    w = lax.fori_loop(0, q_ref.shape[0], step, tuple(w0_ref[rows, :] for rows in tiles))
    for rows, w_tile in zip(tiles, w, strict=True):
        w_ref[rows, :] = w_tile


def _backward_kernel(*refs, delta: bool, packed: bool, gated: bool, dot):
    refs = iter(refs)
    q_ref, k_ref, u_ref = next(refs), next(refs), next(refs)
    y_ref = next(refs) if delta else None
    d_out_ref, w_ref, d_w_ref = next(refs), next(refs), next(refs)
    keep_ref, states_ref = (next(refs), next(refs)) if packed else (None, None)
    dq_ref, dk_ref, du_ref = next(refs), next(refs), next(refs)
    dy_ref = next(refs) if delta else None
    d_decay_ref = next(refs) if gated else None
    d_w0_ref = next(refs)
    num_chunks = q_ref.shape[0]
    tiles = key_tiles(w_ref.shape[0])

    def step(i, carry):
        w1, dw1 = carry  # per key tile: the state after chunk n and dL/d(that state)
        n = num_chunks - 1 - i
        u, d_out = u_ref[n], d_out_ref[n]
        du = sum(dot(k_ref[n, :, rows], dw) for rows, dw in zip(tiles, dw1, strict=True))
        du_ref[n] = du
        w0, dw0, d_decay = [], [], 0.0
        for rows, w, dw in zip(tiles, w1, dw1, strict=True):
            # With documents the start state is the forward's (a reset in the chunk discarded it).
            w = states_ref[n, rows, :] if packed else w - dot(k_ref[n, :, rows].T, u)
            dk_ref[n, :, rows] = dot(u, dw.T)
            dq_ref[n, :, rows] = dot(d_out, w.T)
            if gated:  # W1 = decay W0 + K^T U: d decay = <dL/dW1, W0>, no division by the decay
                d_decay += total(dw * w)
                dw = keep_ref[n] * dw
            elif packed:
                dw = jnp.where(keep_ref[n] != 0, dw, 0.0)
            dw = dw + dot(q_ref[n, :, rows].T, d_out)
            if delta:
                dw = dw - dot(y_ref[n, :, rows].T, du)
                dy_ref[n, :, rows] = -dot(du, w.T)
            w0.append(w)
            dw0.append(dw)
        if gated:
            d_decay_ref[n] = d_decay
        return tuple(w0), tuple(dw0)

    walk_in_reverse(step, num_chunks, tiles, w_ref, d_w_ref, d_w0_ref)


def _per_chunk(keep: Array | None, decay: Array | None) -> Array:
    """The kernels' per-chunk ``[G, N]`` input: the decays (float32) when gated, else keep as int32."""
    return decay.T.astype(jnp.float32) if decay is not None else keep.T.astype(jnp.int32)


def _specs(num_chunks: int, chunk: int, key_dim: int, block: int):
    keys = pl.BlockSpec((num_chunks, None, chunk, key_dim), lambda g, j: (0, g, 0, 0))
    values = pl.BlockSpec((num_chunks, None, chunk, block), lambda g, j: (0, g, 0, j))
    state = pl.BlockSpec((None, key_dim, block), lambda g, j: (g, 0, j))
    partial_keys = pl.BlockSpec((None, num_chunks, None, chunk, key_dim), lambda g, j: (j, 0, g, 0, 0))
    return keys, values, state, partial_keys


def _document_specs(num_chunks: int, key_dim: int, block: int):
    """Packed documents: ``keep`` as int32 ``[G, N]`` and the chunks' start states ``[N, G, K, V]``."""
    per_chunk = pl.BlockSpec((None, num_chunks), lambda g, j: (g, 0))
    states = pl.BlockSpec((num_chunks, None, key_dim, block), lambda g, j: (0, g, 0, j))
    return per_chunk, states


def forward_recurrence(q_eff, k, u_tilde, y, out_intra, w0, keep=None, decay=None, *, interpret: bool = False,
                       precise: bool = True):
    """Pallas version of ``chunk.forward_recurrence_xla``: same arguments and results.

    ``precise``: three-pass TF32 dots (float32 inputs) rather than one (bfloat16/float16 inputs).
    Shapes (checked, with K <= ``MAX_KEY_DIM``): q_eff, k and y (None for the sum rule)
    ``[N, G, C, K]``; u_tilde, out_intra ``[N, G, C, V]``; w0 ``[G, K, V]``; ``keep`` (packed
    documents) None or bool ``[N, G]``, with which every chunk's start state comes back too
    (``states [N, G, K, V]``, else None). Gated, ``decay`` (float ``[N, G]``, in place of ``keep``)
    multiplies what each chunk's start state leaves in its end state, and the states come back too.
    """
    check_interpret(interpret)
    check_recurrence_inputs({"q_eff": q_eff, "k": k, "y": y}, {"u_tilde": u_tilde, "out_intra": out_intra},
                            {"w0": w0})
    num_chunks, groups, chunk, key_dim = q_eff.shape
    value_dim = u_tilde.shape[-1]
    check_chunk_documents(keep, None, num_chunks, groups, key_dim, value_dim, states_expected=False)
    check_chunk_decay(decay, keep, num_chunks, groups)
    k_pad, block, v_pad = padded_sizes(key_dim, value_dim, FORWARD_STATE_BUDGET, min_block=16,
                                        key_tile=KEY_TILE)
    # Gated, the walk stores every chunk's start state as with documents, and carries decay W0.
    delta, gated = y is not None, decay is not None
    packed = keep is not None or gated
    pad_k = functools.partial(pad_to, axis=-1, size=k_pad)
    pad_v = functools.partial(pad_to, axis=-1, size=v_pad)
    keys, values, state, _ = _specs(num_chunks, chunk, k_pad, block)
    per_chunk, states = _document_specs(num_chunks, k_pad, block)
    inputs = [pad_k(q_eff), pad_k(k), pad_v(u_tilde)] + ([pad_k(y)] if delta else []) + [pad_v(out_intra)]
    inputs = [x.astype(jnp.float32) for x in inputs]
    inputs += ([_per_chunk(keep, decay)] if packed else []) + [pad_state(w0, k_pad, v_pad).astype(jnp.float32)]
    value_shape = jax.ShapeDtypeStruct((num_chunks, groups, chunk, v_pad), jnp.float32)
    out_shape = [value_shape] + ([value_shape] if delta else []) + (
        [jax.ShapeDtypeStruct((num_chunks, groups, k_pad, v_pad), jnp.float32)] if packed else []) + [
        jax.ShapeDtypeStruct((groups, k_pad, v_pad), jnp.float32)]
    results = pl.pallas_call(
        functools.partial(_forward_kernel, delta=delta, packed=packed, gated=gated, dot=tile_dot(interpret, precise)),
        out_shape=tuple(out_shape),
        grid=(groups, v_pad // block),
        in_specs=[keys, keys, values] + ([keys] if delta else []) + [values] + ([per_chunk] if packed else []) + [
            state],
        out_specs=tuple([values] + ([values] if delta else []) + ([states] if packed else []) + [state]),
        compiler_params=compiler_params(NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="fast_weight_chunk_recurrence_fwd",
    )(*inputs)
    out, final_state = results[0], results[-1]
    u = results[1][..., :value_dim] if delta else None
    # Without documents no chunk states: the backward rebuilds them by subtraction.
    chunk_states = results[-2][..., :key_dim, :value_dim] if packed else None
    return out[..., :value_dim], u, final_state[:, :key_dim, :value_dim], chunk_states


def backward_recurrence(q_eff, k, u, y, d_out, final_state, d_final, keep=None, states=None, decay=None, *,
                        interpret: bool = False, precise: bool = True):
    """Pallas version of ``chunk.backward_recurrence_xla``: same arguments and results; ``precise`` as
    in ``forward_recurrence``. Shapes (checked): q_eff, k and y (None for the sum rule) ``[N, G, C, K]``;
    u, d_out ``[N, G, C, V]``; final_state, d_final ``[G, K, V]``; with packed documents ``keep``
    (bool ``[N, G]``) and the forward's ``states`` (``[N, G, K, V]``) together, or neither; gated,
    ``decay`` (``[N, G]``) in place of ``keep``, with ``states``, and a sixth result ``d_decay [N, G]``."""
    check_interpret(interpret)
    check_recurrence_inputs({"q_eff": q_eff, "k": k, "y": y}, {"u": u, "d_out": d_out},
                            {"final_state": final_state, "d_final": d_final})
    num_chunks, groups, chunk, key_dim = q_eff.shape
    value_dim = u.shape[-1]
    delta, gated = y is not None, decay is not None
    check_chunk_decay(decay, keep, num_chunks, groups)
    check_chunk_documents(keep, states, num_chunks, groups, key_dim, value_dim, states_expected=True, gated=gated)
    k_pad, block, v_pad = padded_sizes(key_dim, value_dim, BACKWARD_STATE_BUDGET, min_block=16,
                                        key_tile=KEY_TILE)
    num_blocks = v_pad // block
    packed = keep is not None or gated
    pad_k = functools.partial(pad_to, axis=-1, size=k_pad)
    pad_v = functools.partial(pad_to, axis=-1, size=v_pad)
    keys, values, state, partial_keys = _specs(num_chunks, chunk, k_pad, block)
    per_chunk, chunk_states = _document_specs(num_chunks, k_pad, block)
    inputs = [pad_k(q_eff), pad_k(k), pad_v(u)] + ([pad_k(y)] if delta else []) + [
        pad_v(d_out), pad_state(final_state, k_pad, v_pad), pad_state(d_final, k_pad, v_pad)]
    inputs = [x.astype(jnp.float32) for x in inputs]
    if packed:
        inputs += [_per_chunk(keep, decay), pad_to(pad_to(states, 2, k_pad), 3, v_pad).astype(jnp.float32)]
    partial_shape = jax.ShapeDtypeStruct((num_blocks, num_chunks, groups, chunk, k_pad), jnp.float32)
    out_shape = [partial_shape, partial_shape,
                 jax.ShapeDtypeStruct((num_chunks, groups, chunk, v_pad), jnp.float32)]
    out_shape += ([partial_shape] if delta else []) + (
        [jax.ShapeDtypeStruct((num_blocks, groups, num_chunks), jnp.float32)] if gated else []) + [
        jax.ShapeDtypeStruct((groups, k_pad, v_pad), jnp.float32)]
    partial_chunks = pl.BlockSpec((None, None, num_chunks), lambda g, j: (j, g, 0))
    results = pl.pallas_call(
        functools.partial(_backward_kernel, delta=delta, packed=packed, gated=gated, dot=tile_dot(interpret, precise)),
        out_shape=tuple(out_shape),
        grid=(groups, num_blocks),
        in_specs=[keys, keys, values] + ([keys] if delta else []) + [values, state, state] + (
            [per_chunk, chunk_states] if packed else []),
        out_specs=tuple([partial_keys, partial_keys, values] + ([partial_keys] if delta else []) + (
            [partial_chunks] if gated else []) + [state]),
        compiler_params=compiler_params(NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="fast_weight_chunk_recurrence_bwd",
    )(*inputs)
    dq, dk, du = results[0].sum(0), results[1].sum(0), results[2]
    dy = results[3].sum(0)[..., :key_dim] if delta else None
    grads = (dq[..., :key_dim], dk[..., :key_dim], du[..., :value_dim], dy, results[-1][:, :key_dim, :value_dim])
    return grads if not gated else (*grads, results[-2].sum(0).T)


@functools.cache
def chunk_walk(interpret: bool = False, precise: bool = True) -> tuple[Callable, Callable]:
    """The ``(forward, backward)`` pair of these kernels, a walk for ``fast_weight_chunk(..., walk=...)``.

    ``precise`` as in ``forward_recurrence``: pass ``tiles.float32_or_wider(q, k, v)`` of the op's
    inputs (the walk itself only sees float32 arrays). The same settings give the same pair.

    Example (interpret mode runs anywhere): the sum rule over two chunks of 16 steps.
        >>> import jax.numpy as jnp
        >>> forward, backward = chunk_walk(interpret=True)
        >>> keys, values = jnp.ones((2, 1, 16, 4)), jnp.ones((2, 1, 16, 4))
        >>> out, u, state, _ = forward(keys, keys, values, None, values, jnp.zeros((1, 4, 4)))
        >>> out.shape, u, float(state[0, 0, 0]), chunk_walk(interpret=True) == (forward, backward)
        ((2, 1, 16, 4), None, 32.0, True)
    """
    check_interpret(interpret)
    return (functools.partial(forward_recurrence, interpret=interpret, precise=precise),
            functools.partial(backward_recurrence, interpret=interpret, precise=precise))
