"""Fused chunked delta/sum rule (Pallas): the whole chunk step on chip, forward and backward.

The chunkwise form (``dpfp_jax/ops/fast_weight/chunk.py``) splits the sequence into chunks of C
steps. With ``T_beta = A^-1 diag(beta)``, ``A = I + diag(beta) strict_tril(K K^T)`` (the WY form),
a chunk that starts from state W0 does

    u = T_beta (V - K W0),   O = Q W0 + tril(Q K^T) u,   W1 = W0 + K^T u

(the sum rule: ``u = V``). ``chunk_recurrence.py`` puts only the walk over chunks in Pallas and
leaves the state-independent products to XLA, which writes several float32 ``[T, K]`` arrays
(``Y``, ``Q - S Y``, ...) to memory and reads them back. Here one program per (batch x head, block
of BV value columns) does the whole step per chunk on chip, reading q, k and v once, in their own
dtype and in the caller's ``[B, T, H, D]`` layout (no transposed copies), and writing only the
outputs (in v's dtype, scaled) and, when a gradient will be taken, the writes u. Only
``T_beta`` (a per-chunk [C, C] triangular inverse, state-independent) comes from outside: the
caller passes the function that computes ``A^-1`` (``wy_inverse``; the library passes its own, a
triangular solve in XLA), and its gradient goes back through JAX's autodiff of that function.

The backward walks chunks in reverse, rebuilding ``W0 = W1 - K^T u`` from the stored writes (no
state per chunk is kept) and recomputing the scores ``tril(Q K^T)`` and the residual
``V - K W0``. Products that sum over V (dq, dk, dT_beta) are accumulated across the value blocks'
programs with atomic adds (so their order, and the last bits of those gradients, can vary from
run to run when there are more than two blocks). With the feature map on chip (``features``) the
backward is two kernels: ``_scores_kernel`` first walks the chunks forward for dq and dk's term
through the scores, then the reverse walk adds dk's other terms (``_scores_kernel`` says why).

Packed documents (``resets``): each chunk step is the masked WY form, with the masks built on
chip from one int32 per step (how many documents have started in the chunk up to it); a chunk
in which a document starts does not carry its start state, so the backward rebuilds that one by
walking forward again from the stored writes (``fused_chunk``'s docstring says what it costs).

Gated (``log_decay``): the chunk step of docs/math.md's gated chunk form, its decay factors built
on chip from the chunk's cumulative log sums (``_decays``) in the places of the documents' masks;
the backward walks chunk start states forward from states the forward keeps every few chunks
(``fused_chunk``'s docstring says what it costs), since undoing an update would divide by alpha.

On-chip budget as in ``chunk_recurrence.py``: the state lives as ``K / 64`` tiles of
``[64, BV]``, every chunk is read 64 key columns at a time, loads are not pipelined (unless
``num_stages`` asks), and the dots are TF32 on tensor cores (three passes for float32 inputs, one
for bfloat16/float16).
``benchmarks/triton_report.py`` compiles these kernels for an H200 and reports what they need.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.autodiff import cotangent_array, primal_values
from pallas_kernels.decays import gate_with_resets, split_log_decay
from pallas_kernels.triton.dpfp import (
    DPFP,
    check_features,
    feature_dots,
    feature_tile,
    map_gradient,
    row_scale,
    scatter_vjp,
    scatter_width,
)
from pallas_kernels.triton.tiles import (
    KEY_TILE,
    NUM_WARPS,
    compiler_params,
    float32_or_wider,
    key_tiles,
    pad_state,
    pad_to,
    padded_sizes,
    tile_dot,
    value_block,
    walk_in_reverse,
)
from pallas_kernels.validation import (
    MAX_KEY_DIM,
    check_chunk_size,
    check_interpret,
    check_kernel_inputs,
    check_log_decay,
    check_positive_int,
    check_wy_inverse,
    check_wy_inverse_result,
    empty_result,
)

Array = jax.Array

# Floats of state per program. Besides its [K, BV] state slice a program holds [C, C] scores (and,
# for the delta rule, T_beta and in the backward dL/dscores), so the value blocks are narrower than
# chunk_recurrence.py's: BV = 32 at K = 128, 16 from K = 256. A wider forward block spills more
# (docs/reports/triton_report_h200.md, "The fused chunk kernel: value blocks, spills, atomic adds", from
# ``benchmarks/triton_report.py``). Narrower blocks also mean more programs: B * H = 64 heads
# fill 128 of an H200's 132 SMs with two blocks, 64 with one.
FORWARD_STATE_BUDGET = 4_096
BACKWARD_STATE_BUDGET = 4_096
# With features, XLA's K-wide and 2d-wide work (the WY inverse's phi(k), the map's VJP after the
# backward kernels) is done this many chunks at a time (512 steps at the default chunk size, the
# XLA chunk form's span): over every chunk at once, an H200 training step at B=8, T=4096, H=8,
# d=64, nu=3 needed 2529.2 MB of temporaries, span by span 872.9 MB (reports/features_memory.md).
SPAN_CHUNKS = 8


def _span_by_span(fn: Callable, args, axis: int):
    """``fn(*args)`` computed ``SPAN_CHUNKS`` chunks at a time (``lax.map``): every array in
    ``args`` (a pytree; None is no array) has its chunks on axis ``axis``, and so has every result.
    fn sees one chunk's slices (vmapped over a span)."""
    results = lax.map(lambda xs: fn(*xs), jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), args),
                      batch_size=SPAN_CHUNKS)
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, axis), results)


def _tril(scores: Array, same: Array | None = None) -> Array:
    """``jnp.tril(scores)``, from iotas (what a kernel can build): step i of a chunk reads the
    writes of steps j <= i, and with packed documents (``same``, ``[C, C]`` bool) only those of its
    own document. The same mask as ``tril`` of the library's chunk form (which this package does
    not import)."""
    rows = lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    mask = rows >= cols
    return jnp.where(mask if same is None else mask & same, scores, 0.0)


class _Documents(NamedTuple):
    """Packed documents within one chunk (the masked WY form, docs/math.md "Packed documents")."""

    same: Array  # [C, C] steps i and j in one document
    first: Array  # [C, 1] step in the document the chunk began in: it reads the chunk's start state
    last: Array  # [C, 1] step in the chunk's last document: its write reaches the chunk's end state
    keep: Array  # scalar: no document starts in the chunk, so its end state carries its start state


def _documents(docs_ref, n) -> _Documents:
    """Chunk n's masks from ``docs`` (per step, how many documents have started in the chunk up to it)."""
    docs = docs_ref[n]
    final = jnp.max(docs)  # docs never decrease within a chunk: the last step's
    return _Documents(docs[:, None] == docs[None, :], (docs == 0)[:, None], (docs == final)[:, None], final == 0)


class _Decays(NamedTuple):
    """A gated chunk's decays (docs/math.md, "Gated fast weights"), each the exp of a difference of
    the chunk's cumulative log decays ``g`` (never positive, so no factor exceeds 1). They take the
    places of the documents' masks: ``within`` of ``same``, ``start`` of ``first``, ``end`` of
    ``last``, ``total`` of ``keep``."""

    within: Array  # [C, C] D_ij = exp(g_i - g_j) for j <= i; 1 above the diagonal (masked off by _tril)
    start: Array  # [C, 1] exp(g_i): what of the chunk's start state step i sees
    end: Array  # [C, 1] exp(g_C - g_i): what of step i's write reaches the chunk's end
    total: Array  # scalar exp(g_C): what of the start state reaches the chunk's end


def _decays(hi_ref, lo_ref, n) -> _Decays:
    """Chunk n's :class:`_Decays` from its cumulative log decays, split as ``g = hi + lo``
    (``gate_cumsums``: hi's sums exact, lo's small), so each difference is exact up to lo's
    round-off however large the sums are."""
    hi, lo = hi_ref[n], lo_ref[n]
    size = hi.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    # exp only where j <= i (a sum of log decays, <= 0): 0 above the diagonal before the exp, never an inf.
    within = jnp.exp(jnp.where(rows >= cols, (hi[:, None] - hi[None, :]) + (lo[:, None] - lo[None, :]), 0.0))
    last = lax.broadcasted_iota(jnp.int32, (size,), 0) == size - 1
    hi_last, lo_last = jnp.sum(jnp.where(last, hi, 0.0)), jnp.sum(jnp.where(last, lo, 0.0))
    return _Decays(within, jnp.exp(hi + lo)[:, None], jnp.exp((hi_last - hi) + (lo_last - lo))[:, None],
                   jnp.exp(hi_last + lo_last))


def _decay_gradient(decays: _Decays, d_within: Array, d_start: Array, d_end: Array, d_total: Array) -> Array:
    """``dL/dg [C]``, g the chunk's cumulative log decays, from the gradients of its factors
    (``d_start``, ``d_end`` ``[C, 1]``, ``d_total`` a scalar): each factor is the exp of a difference
    of g's, so its gradient reaches the later index as factor times gradient and the earlier one
    with a minus. ``d_within``'s diagonal and upper part are left out (constants)."""
    size = d_within.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    h = jnp.where(rows > cols, d_within * decays.within, 0.0)
    ends = (d_end * decays.end).reshape(size)
    dg = jnp.sum(h, axis=1) - jnp.sum(h, axis=0) + (d_start * decays.start).reshape(size) - ends
    # g_C also enters every end factor and the total. (Sums over one axis at a time: Triton's
    # lowering of a sum over two fails under an explicit mesh, as in ahead-of-time GPU compiles.)
    last = jnp.sum(ends) + d_total * decays.total
    return dg + jnp.where(lax.broadcasted_iota(jnp.int32, (size,), 0) == size - 1, last, 0.0)


def _rows(weights: Array | None, x: Array) -> Array:
    """x with its steps (rows) weighted: zeroed where a bool mask (documents) is False, scaled by
    float factors (decays); x itself given None."""
    if weights is None:
        return x
    return jnp.where(weights, x, 0.0) if weights.dtype == jnp.bool_ else weights * x


def _end_state(w, k_ref, n, u, docs: _Documents | None, dot, features: DPFP | None = None,
               k_scale: Array | None = None, decays: _Decays | None = None):
    """A chunk's end state from its start state w (key tiles): ``W0 + K^T u``; with documents
    ``keep W0 + (diag(last) K)^T u``, gated ``exp(g_C) W0 + (diag(E) K)^T u``. The forward and the
    backward's rebuild share it, so the rebuilt states are the forward's bit for bit. With
    ``features``, ``k_scale`` is the chunk's ``_row_scale`` of k."""
    tiles = key_tiles(sum(w_tile.shape[0] for w_tile in w))
    if docs is not None:
        u = _rows(docs.last, u)
    if decays is not None:
        u = _rows(decays.end, u)

    def carried(w_tile):
        if docs is not None:
            return jnp.where(docs.keep, w_tile, 0.0)
        return w_tile if decays is None else decays.total * w_tile

    # k's tiles are loaded again rather than kept from the step's first loop: holding all of them
    # alongside the state would cost K / 64 more [C, 64] tiles of registers.
    return tuple(carried(w_tile) + dot(_tile(k_ref, n, rows, features, k_scale).T, u)
                 for rows, w_tile in zip(tiles, w, strict=True))


def _tile(ref, n, rows: slice, features: DPFP | None = None, scale: Array | None = None) -> Array:
    """Chunk n's columns ``rows`` of q or k, as float32 (the ref keeps the inputs' dtype); with
    ``features`` the ref holds the raw inputs (width d) and the tile of phi is computed on chip
    (``scale``: the rows' normalising factor, from ``_row_scale``)."""
    if features is None:
        return ref[n, :, rows].astype(jnp.float32)
    return feature_tile(ref, n, rows.start // KEY_TILE, scale)


def _row_scale(features: DPFP | None, ref, n, num_tiles: int) -> Array | None:
    """Chunk n's per-row normalising factor of phi (``[C, 1]``), None without features or normalisation."""
    return None if features is None else row_scale(features, ref, n, num_tiles)


def _forward_kernel(*refs, delta: bool, keep_writes: bool, packed: bool, dot, features: DPFP | None,
                    gated: bool = False, checkpoint_chunks: int = 0):
    refs = iter(refs)
    scale_ref, q_ref, k_ref, v_ref = (next(refs) for _ in range(4))
    tb_ref = next(refs) if delta else None
    docs_ref = next(refs) if packed else None
    hi_ref, lo_ref = (next(refs), next(refs)) if gated else (None, None)
    w0_ref, out_ref = next(refs), next(refs)
    u_ref = next(refs) if delta and keep_writes else None
    states_ref = next(refs) if checkpoint_chunks else None
    w_ref = next(refs)
    tiles = key_tiles(w0_ref.shape[0])
    scale = scale_ref[0]
    num_chunks, chunk, block = v_ref.shape

    def step(n, w):
        docs = _documents(docs_ref, n) if packed else None
        decays = _decays(hi_ref, lo_ref, n) if gated else None
        # With documents only the chunk's first document reads W0 (through Q W0 and the recall K W0);
        # gated, step i reads it decayed by exp(g_i).
        first, same = (None, None) if docs is None else (docs.first, docs.same)
        if decays is not None:
            first = decays.start
        q_scale, k_scale = (_row_scale(features, ref, n, len(tiles)) for ref in (q_ref, k_ref))
        # Everything that sums over K, one key tile at a time.
        scores = jnp.zeros((chunk, chunk), jnp.float32)
        q_w = jnp.zeros((chunk, block), jnp.float32)
        recall = jnp.zeros((chunk, block), jnp.float32)
        for rows, w_tile in zip(tiles, w, strict=True):
            q_tile, k_tile = _tile(q_ref, n, rows, features, q_scale), _tile(k_ref, n, rows, features, k_scale)
            scores += dot(q_tile, k_tile.T)
            q_w += dot(q_tile, w_tile)
            if delta:
                recall += dot(k_tile, w_tile)
        if decays is not None:
            scores = scores * decays.within
        v = v_ref[n].astype(jnp.float32)
        u = dot(tb_ref[n], v - _rows(first, recall)) if delta else v
        if delta and keep_writes:
            u_ref[n] = u
        # Scores and Q W0 are linear in q: scaling the output equals scaling the queries.
        out_ref[n] = (scale * (_rows(first, q_w) + dot(_tril(scores, same), u))).astype(out_ref.dtype)
        return _end_state(w, k_ref, n, u, docs, dot, features, k_scale, decays)

    w = tuple(w0_ref[rows, :] for rows in tiles)
    if checkpoint_chunks:
        # Gated, for the backward: the state entering every checkpoint_chunks-th chunk (it cannot
        # undo a chunk's update without dividing by the decay).
        def span(c, w):
            for rows, w_tile in zip(tiles, w, strict=True):
                states_ref[c, rows, :] = w_tile
            begin = c * checkpoint_chunks
            return lax.fori_loop(begin, jnp.minimum(begin + checkpoint_chunks, num_chunks), step, w)

        w = lax.fori_loop(0, states_ref.shape[0], span, w)
    else:
        w = lax.fori_loop(0, num_chunks, step, w)
    for rows, w_tile in zip(tiles, w, strict=True):
        w_ref[rows, :] = w_tile


def _backward_kernel(*refs, delta: bool, packed: bool, dot, features: DPFP | None, checkpoint_chunks: int = 0):
    gated = checkpoint_chunks > 0
    refs = iter(refs)
    scale_ref, q_ref, k_ref, v_ref = (next(refs) for _ in range(4))
    tb_ref, u_ref = (next(refs), next(refs)) if delta else (None, None)
    d_out_ref, w_ref, d_w_ref = next(refs), next(refs), next(refs)
    docs_ref, origin_ref, w0_ref = (next(refs), next(refs), next(refs)) if packed else (None,) * 3
    hi_ref, lo_ref, states_ref = (next(refs), next(refs), next(refs)) if gated else (None,) * 3
    # The inputs the outputs alias come last: dq (without features), dk (with features already
    # holding _scores_kernel's part; zero-filled otherwise), dT_beta (delta), dL/dg (gated). Unused
    # as inputs.
    for _ in range(1 + (features is None) + delta + gated):
        next(refs)
    dq_ref = next(refs) if features is None else None
    dk_ref = next(refs)
    dtb_ref = next(refs) if delta else None
    d_gate_ref = next(refs) if gated else None
    dv_ref, d_w0_ref = next(refs), next(refs)
    num_chunks, chunk, block = v_ref.shape
    tiles = key_tiles(w_ref.shape[0])
    # The output is linear in q, so the kernel differentiates it as a function of the scaled
    # queries scale * q: d_out is used as it comes, q is scaled where it multiplies d_out, and dq
    # is the gradient w.r.t. scale * q (the caller rescales it, and takes dL/dscale = <q, dq> from it).
    scale = scale_ref[0]

    def writes(n):
        return u_ref[n] if delta else v_ref[n].astype(jnp.float32)

    def walk(origin, n, begin, documents: bool):
        """The state entering chunk n, walked forward from ``begin`` (the state entering chunk
        ``origin``) over the stored writes, with the forward's own arithmetic (``_end_state``)."""
        def chunk_step(m, w):
            return _end_state(w, k_ref, m, writes(m), _documents(docs_ref, m) if documents else None, dot, features,
                              _row_scale(features, k_ref, m, len(tiles)), _decays(hi_ref, lo_ref, m) if gated else None)

        return lax.fori_loop(origin, n, chunk_step, begin)

    def rebuilt_start_state(n):
        """Chunk n's start state where a document starts in it (its end state no longer holds it):
        the chunks since the last one in which a document started (``origin``; -1: none, walk from
        the initial state), walked forward again from the stored writes."""
        origin = origin_ref[n]
        begin = tuple(jnp.where(origin < 0, w0_ref[rows, :], 0.0) for rows in tiles)
        return walk(jnp.maximum(origin, 0), n, begin, documents=True)

    def gated_start_state(n):
        """Gated, chunk n's start state from the forward's state entering its span of
        ``checkpoint_chunks`` chunks, walked forward: undoing the chunk's update would divide by its decay."""
        span = n // checkpoint_chunks
        return walk(span * checkpoint_chunks, n, tuple(states_ref[span, rows, :] for rows in tiles), documents=False)

    def step(i, carry):
        w1, dw1 = carry  # per key tile: the state after chunk n and dL/d(that state)
        n = num_chunks - 1 - i
        v = v_ref[n].astype(jnp.float32)
        u = writes(n)
        d_out = d_out_ref[n].astype(jnp.float32)
        docs = _documents(docs_ref, n) if packed else None
        decays = _decays(hi_ref, lo_ref, n) if gated else None
        first, last, same = (None,) * 3 if docs is None else (docs.first, docs.last, docs.same)
        if decays is not None:  # the decays take the masks' places (_Decays says which)
            first, last = decays.start, decays.end
        q_scale, k_scale = (_row_scale(features, ref, n, len(tiles)) for ref in (q_ref, k_ref))
        if packed:
            w1 = lax.cond(docs.keep, lambda: tuple(w_tile - dot(_tile(k_ref, n, rows, features, k_scale).T, u)
                                                   for rows, w_tile in zip(tiles, w1, strict=True)),
                          lambda: rebuilt_start_state(n))
        if gated:
            w1 = gated_start_state(n)
        # Rebuild W0 (without documents or a gate; with them it is w1 now) and everything that sums
        # over K, one key tile at a time.
        scores = jnp.zeros((chunk, chunk), jnp.float32)
        du = jnp.zeros((chunk, block), jnp.float32)  # dL/du through W1 = W0 + K^T u
        recall = jnp.zeros((chunk, block), jnp.float32)
        w0 = []
        for rows, w_tile, dw_tile in zip(tiles, w1, dw1, strict=True):
            q_tile, k_tile = _tile(q_ref, n, rows, features, q_scale), _tile(k_ref, n, rows, features, k_scale)
            scores += dot(q_tile, k_tile.T)
            du += dot(k_tile, dw_tile)
            if not packed and not gated:
                w_tile = w_tile - dot(k_tile.T, u)
            if delta:
                recall += dot(k_tile, w_tile)
            w0.append(w_tile)
        scores = scale * scores
        if gated:
            # dL/d(the factors): E from W1's writes, D from the scores (exp(g) and exp(g_C) below).
            d_end = jnp.sum(du * u, axis=1, keepdims=True)
            d_within = scores
            scores = scores * decays.within
        # With documents only the last one's writes reach W1 and only the first one's steps read W0.
        du = _rows(last, du)
        du += dot(_tril(scores, same).T, d_out)  # through O = scale (Q W0 + tril(Q K^T) u)
        d_scores = _tril(dot(d_out, u.T), same)
        if gated:
            d_within = d_scores * d_within
            d_scores = d_scores * decays.within
            # Through the recall r = V - diag(exp(g)) K W0: dL/dexp(g)_i = -<dr_i, (K W0)_i>, below.
            d_start = jnp.zeros((chunk, 1), jnp.float32)
            d_total = jnp.zeros((block,), jnp.float32)  # summed over the value columns last
        d_out_first, u_last = _rows(first, d_out), _rows(last, u)
        if delta:
            dr = dot(tb_ref[n].T, du)  # dL/d(V - K W0), which is also dL/dV
            if gated:
                d_start -= jnp.sum(dr * recall, axis=1, keepdims=True)
            recall = _rows(first, recall)
            pltriton.atomic_add(dtb_ref, (n, slice(None), slice(None)), dot(du, (v - recall).T))
            dv_ref[n] = dr.astype(dv_ref.dtype)
            dr_first = _rows(first, dr)
        else:
            dv_ref[n] = du.astype(dv_ref.dtype)
        dw0 = []
        for rows, w_tile, dw_tile in zip(tiles, w0, dw1, strict=True):
            q_tile, k_tile = scale * _tile(q_ref, n, rows, features, q_scale), _tile(k_ref, n, rows, features, k_scale)
            if gated:
                d_out_w0 = dot(d_out, w_tile.T)
                d_start += jnp.sum(d_out_w0 * q_tile, axis=1, keepdims=True)
                d_total += jnp.sum(dw_tile * w_tile, axis=0)
            if features is None:
                dq = _rows(first, d_out_w0) if gated else dot(d_out_first, w_tile.T)
                pltriton.atomic_add(dq_ref, (n, slice(None), rows), dq + dot(d_scores, k_tile))
                dk = dot(d_scores.T, q_tile) + dot(u_last, dw_tile.T)
            else:  # _scores_kernel has added dq and dk's term through the scores
                dk = dot(u_last, dw_tile.T)
            if packed:
                dw_tile = jnp.where(docs.keep, dw_tile, 0.0)
            if gated:
                dw_tile = decays.total * dw_tile
            dw_tile = dw_tile + dot(q_tile.T, d_out_first)
            if delta:
                dk -= dot(dr_first, w_tile.T)
                dw_tile -= dot(k_tile.T, dr_first)
            if features is None:
                pltriton.atomic_add(dk_ref, (n, slice(None), rows), dk)
            else:
                scatter_vjp(dk_ref, k_ref, n, rows.start // KEY_TILE, dk, k_scale)
            dw0.append(dw_tile)
        if gated:
            pltriton.atomic_add(d_gate_ref, (n, slice(None)), _decay_gradient(decays, d_within, d_start, d_end,
                                                                               jnp.sum(d_total)))
        return tuple(w0), tuple(dw0)

    walk_in_reverse(step, num_chunks, tiles, w_ref, d_w_ref, d_w0_ref)


def _scores_kernel(*refs, packed: bool, gated: bool, dot, features: DPFP):
    """With features, the backward's part that needs each chunk's start state but not dL/dW: dq
    (through ``O = scale (Q W0 + tril(Q K^T) u)``) and dk's term through the scores, each scattered
    through the map's VJP into its buffer (``scatter_vjp``).

    It walks the chunks forward from the initial state over the stored writes (the forward's own
    arithmetic, ``_end_state``): ``dq = diag(first) dO W0^T + S K`` and ``dk = S^T (scale Q)``
    with ``S = tril(dO u^T)``, gated with the decays in the masks' places. ``_backward_kernel``
    then adds dk's other terms into the same buffer. One kernel doing all of it spilled 1.2 / 0.9
    KiB (delta / sum rule) more on an H200 than the kernel given phi(q), phi(k)
    (docs/reports/triton_report_h200.md)."""
    refs = iter(refs)
    scale_ref, q_ref, k_ref, u_ref, d_out_ref = (next(refs) for _ in range(5))
    docs_ref = next(refs) if packed else None
    hi_ref, lo_ref = (next(refs), next(refs)) if gated else (None, None)
    w0_ref = next(refs)
    next(refs), next(refs)  # the zero-filled buffers the results alias
    dq_ref, dk_ref = next(refs), next(refs)
    tiles = key_tiles(w0_ref.shape[0])
    num_chunks = d_out_ref.shape[0]
    scale = scale_ref[0]

    def step(n, w):
        docs = _documents(docs_ref, n) if packed else None
        decays = _decays(hi_ref, lo_ref, n) if gated else None
        first, same = (None, None) if docs is None else (docs.first, docs.same)
        u, d_out = u_ref[n].astype(jnp.float32), d_out_ref[n].astype(jnp.float32)
        d_scores = _tril(dot(d_out, u.T), same)
        if decays is not None:
            first, d_scores = decays.start, d_scores * decays.within
        d_out_first = _rows(first, d_out)
        q_scale, k_scale = (_row_scale(features, ref, n, len(tiles)) for ref in (q_ref, k_ref))
        for rows, w_tile in zip(tiles, w, strict=True):
            q_tile, k_tile = _tile(q_ref, n, rows, features, q_scale), _tile(k_ref, n, rows, features, k_scale)
            dq = dot(d_out_first, w_tile.T) + dot(d_scores, k_tile)
            dk = dot(d_scores.T, scale * q_tile)
            tile = rows.start // KEY_TILE
            scatter_vjp(dq_ref, q_ref, n, tile, dq, q_scale)
            scatter_vjp(dk_ref, k_ref, n, tile, dk, k_scale)
        return _end_state(w, k_ref, n, u, docs, dot, features, k_scale, decays)

    lax.fori_loop(0, num_chunks, step, tuple(w0_ref[rows, :] for rows in tiles))


def _specs(heads: int, num_chunks: int, chunk: int, key_dim: int, block: int, input_dim: int | None = None):
    """BlockSpecs over the grid (batch x head g, value block j).

    Per-step arrays stay in the caller's ``[B, T, H, D]`` layout, viewed as ``[B, N, C, H, D]``
    (a free reshape), so no transposed copy of q, k, v, the outputs or the gradients is made: a
    program reads its head's rows with a stride of H * D. Per-chunk ``T_beta`` is ``[G, N, C, C]``
    and states ``[G, K, V]``. q and k are ``input_dim`` wide (d, with features; K otherwise).
    """
    def head(g, column_block=0):  # block index of head g's rows
        return g // heads, 0, 0, g % heads, column_block

    keys = pl.BlockSpec((None, num_chunks, chunk, None, input_dim or key_dim), lambda g, j: head(g))
    values = pl.BlockSpec((None, num_chunks, chunk, None, block), lambda g, j: head(g, j))
    square = pl.BlockSpec((None, num_chunks, chunk, chunk), lambda g, j: (g, 0, 0, 0))
    state = pl.BlockSpec((None, key_dim, block), lambda g, j: (g, 0, j))
    return keys, values, square, state


def _document_specs(heads: int, num_chunks: int, chunk: int):
    """BlockSpecs of the packed documents' per-row arrays, shared by the row's heads: ``docs
    [B, N, C]`` and the backward's ``origin [B, N]``."""
    per_step = pl.BlockSpec((None, num_chunks, chunk), lambda g, j: (g // heads, 0, 0))
    per_chunk = pl.BlockSpec((None, num_chunks), lambda g, j: (g // heads, 0))
    return per_step, per_chunk


class _Launch(NamedTuple):
    """Static settings of the kernels: value columns per program, forward and backward, Triton's
    load-pipelining stages, the feature map computed on chip (None: q and k come as features), and,
    gated, how many chunks apart the forward keeps a state for the backward."""

    forward_block: int
    backward_block: int
    num_stages: int
    features: DPFP | None = None
    checkpoint_chunks: int = 1


# The output scale reaches the kernels as a runtime operand, a float32 array of shape (1,) that
# every program reads once, so a traced scale (a learned one, or a jit argument) costs no
# recompilation; it is applied on chip, before the output is rounded to v's dtype.
_SCALAR = pl.BlockSpec((1,), lambda g, j: (0,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_chunk(interpret: bool, precise: bool, launch: _Launch, scale, q, k, v, tb, w0, docs, gate):
    """``[B, N, C, H, ...]`` padded chunks -> ``(scale * out [B, N, C, H, V] in v's dtype,
    final_state [G, K, V] float32)``; ``scale`` float32 of shape (1,); ``docs [B, N, C]`` int32
    (packed documents: how many have started in the chunk up to each step) or None; ``gate``
    (gated) the pair ``(hi, lo)`` of ``[G, N, C]`` float32 whose sum is each chunk's cumulative log
    decay (``gate_cumsums``), or None. Without a gradient to take, the writes u and the
    gated states are not stored."""
    out, _, _, final_state = _forward(interpret, precise, launch, scale, q, k, v, tb, w0, docs, gate,
                                      keep_writes=False)
    return out, final_state


def _fused_chunk_forward(interpret, precise, launch, scale, q, k, v, tb, w0, docs, gate):
    out, u, states, final_state = _forward(interpret, precise, launch, scale, q, k, v, tb, w0, docs, gate,
                                           keep_writes=True)
    # w0 is kept only with documents (the backward rebuilds start states after a reset from it) or
    # features (_scores_kernel walks the states forward from it).
    keep_w0 = docs is not None or launch.features is not None
    return (out, final_state), (scale, q, k, v, tb, u, final_state, docs, w0 if keep_w0 else None, gate, states)


def _forward(interpret, precise, launch, scale, q, k, v, tb, w0, docs, gate, *, keep_writes: bool):
    """The forward kernel: ``(out, u or None, states or None, final_state)``; u (float32) only if
    ``keep_writes`` and the rule is delta (the backward rebuilds states from it); gated and
    ``keep_writes``, ``states [G, ceil(N / launch.checkpoint_chunks), K, V]``, the state entering
    every ``checkpoint_chunks``-th chunk."""
    batch, num_chunks, chunk, heads, input_dim = q.shape
    groups, key_dim, value_dim = batch * heads, w0.shape[1], v.shape[-1]
    block = launch.forward_block
    delta, packed, gated = tb is not None, docs is not None, gate is not None
    checkpoints = -(-num_chunks // launch.checkpoint_chunks) if gated and keep_writes else 0
    keep_writes = keep_writes and delta
    keys, values, square, state = _specs(heads, num_chunks, chunk, key_dim, block, input_dim)
    per_step, _ = _document_specs(heads, num_chunks, chunk)
    per_head_step = pl.BlockSpec((None, num_chunks, chunk), lambda g, j: (g, 0, 0))
    states = pl.BlockSpec((None, checkpoints, key_dim, block), lambda g, j: (g, 0, 0, j))
    results = pl.pallas_call(
        functools.partial(_forward_kernel, delta=delta, keep_writes=keep_writes, packed=packed,
                          dot=tile_dot(interpret, precise), features=launch.features, gated=gated,
                          checkpoint_chunks=launch.checkpoint_chunks if checkpoints else 0),
        out_shape=(jax.ShapeDtypeStruct(v.shape, v.dtype),
                   *([jax.ShapeDtypeStruct(v.shape, jnp.float32)] if keep_writes else []),
                   *([jax.ShapeDtypeStruct((groups, checkpoints, key_dim, value_dim), jnp.float32)]
                     if checkpoints else []),
                   jax.ShapeDtypeStruct((groups, key_dim, value_dim), jnp.float32)),
        grid=(groups, value_dim // block),
        in_specs=[_SCALAR, keys, keys, values, *([square] if delta else []), *([per_step] if packed else []),
                  *([per_head_step] * 2 if gated else []), state],
        out_specs=(values, *([values] if keep_writes else []), *([states] if checkpoints else []), state),
        compiler_params=compiler_params(NUM_WARPS, num_stages=launch.num_stages),
        interpret=interpret,
        name="fast_weight_fused_chunk_fwd",
    )(scale, q, k, v, *([tb] if delta else []), *([docs] if packed else []), *(gate if gated else ()), w0)
    results = list(results)
    out, final_state = results.pop(0), results.pop()
    u = results.pop(0) if keep_writes else None
    return out, u, results.pop(0) if checkpoints else None, final_state


def _fused_chunk_forward_rule(interpret, precise, launch, *primals):
    return _fused_chunk_forward(interpret, precise, launch, *primal_values(*primals))


def _fused_chunk_backward(interpret, precise, launch, residuals, cotangents):
    scale, q, k, v, tb, u, final_state, docs, w0, gate, checkpoints = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    batch, num_chunks, chunk, heads, input_dim = q.shape
    groups, key_dim, value_dim = batch * heads, final_state.shape[1], v.shape[-1]
    block = launch.backward_block
    num_blocks = value_dim // block
    delta, packed, gated = tb is not None, docs is not None, gate is not None
    features = launch.features
    keys, values, square, state = _specs(heads, num_chunks, chunk, key_dim, block, input_dim)
    per_step, per_chunk = _document_specs(heads, num_chunks, chunk)
    f32 = jnp.float32
    documents = []
    if packed:
        # Per chunk, the last earlier chunk in which a document starts (-1: none): where the walk
        # that rebuilds a start state after a reset begins.
        chunks = jnp.arange(num_chunks, dtype=jnp.int32)
        started = lax.cummax(jnp.where(docs[..., -1] > 0, chunks, -1), axis=1)
        origin = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), started[:, :-1]], axis=1)
        documents = [docs, origin, w0]
    per_head_step = pl.BlockSpec((None, num_chunks, chunk), lambda g, j: (g, 0, 0))
    gate_inputs, gate_specs = [], []
    if gated:
        gate_inputs = [*gate, checkpoints]
        gate_specs = [per_head_step, per_head_step,
                      pl.BlockSpec((None, checkpoints.shape[1], key_dim, block), lambda g, j: (g, 0, 0, j))]
    # Gradients that sum over V are accumulated by every value block's program with atomic adds
    # into zero-filled buffers, instead of one partial per block summed afterwards: at K = 512
    # (4 blocks) the partials of dq and dk alone would be 8 float32 copies of k.
    gradients, gradient_specs = q.shape, keys
    if features is not None:
        # dq, dk come back per position of a = [relu(x), relu(-x)] (width 2d, scatter_vjp), dx
        # computed from them below.
        gradients = (*q.shape[:-1], scatter_width(input_dim))
        gradient_specs = _specs(heads, num_chunks, chunk, key_dim, block, scatter_width(input_dim))[0]
    compiler = compiler_params(NUM_WARPS, num_stages=launch.num_stages)
    # The buffers the kernels add dq and dk into (with features, scatter buffers of a's positions).
    dq_buffer, dk_buffer = jnp.zeros(gradients, f32), jnp.zeros(gradients, f32)
    if features is not None:
        # dq and dk's term through the scores first; the main backward adds dk's other terms to it.
        scores_inputs = [scale, q, k, u if delta else v, d_out, *([docs] if packed else []),
                         *(gate if gated else ()), w0]
        dq_buffer, dk_buffer = pl.pallas_call(
            functools.partial(_scores_kernel, packed=packed, gated=gated, dot=tile_dot(interpret, precise),
                              features=features),
            out_shape=(jax.ShapeDtypeStruct(gradients, f32),) * 2,
            grid=(groups, num_blocks),
            in_specs=[_SCALAR, keys, keys, values, values, *([per_step] if packed else []),
                      *([per_head_step] * 2 if gated else []), state, gradient_specs, gradient_specs],
            out_specs=(gradient_specs, gradient_specs),
            input_output_aliases={len(scores_inputs): 0, len(scores_inputs) + 1: 1},
            compiler_params=compiler,
            interpret=interpret,
            name="fast_weight_fused_chunk_bwd_scores",
        )(*scores_inputs, dq_buffer, dk_buffer)
    summed = [*([dq_buffer] if features is None else []), dk_buffer, *([jnp.zeros(tb.shape, f32)] if delta else []),
              *([jnp.zeros((groups, num_chunks, chunk), f32)] if gated else [])]
    summed_specs = [*([gradient_specs] if features is None else []), gradient_specs, *([square] if delta else []),
                    *([per_head_step] if gated else [])]
    inputs = [scale, q, k, v, *([tb, u] if delta else []), d_out, final_state, d_final, *documents, *gate_inputs]
    results = list(pl.pallas_call(
        functools.partial(_backward_kernel, delta=delta, packed=packed, dot=tile_dot(interpret, precise),
                          features=features, checkpoint_chunks=launch.checkpoint_chunks if gated else 0),
        out_shape=(*[jax.ShapeDtypeStruct(x.shape, f32) for x in summed],
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(final_state.shape, f32)),
        grid=(groups, num_blocks),
        in_specs=[_SCALAR, keys, keys, values, *([square, values] if delta else []), values, state, state,
                  *([per_step, per_chunk, state] if packed else []), *gate_specs, *summed_specs],
        out_specs=(*summed_specs, values, state),
        input_output_aliases={len(inputs) + i: i for i in range(len(summed))},
        compiler_params=compiler,
        interpret=interpret,
        name="fast_weight_fused_chunk_bwd",
    )(*inputs, *summed))
    dv, d_w0 = results[-2], results[-1]
    d_gate = (results[len(summed) - 1],) * 2 if gated else None  # g = hi + lo: both halves get g's gradient
    if features is None:
        dq, dk = results[0], results[1]
        dtb = results[2] if delta else None
        # results[0] is dL/d(scale * q): the output is linear in q, so dL/dscale = <q, dL/d(scale * q)>.
        d_scale = jnp.sum(q.astype(f32) * dq).reshape(1)
        dq, dk = (scale[0] * dq).astype(q.dtype), dk.astype(k.dtype)
    else:
        dk_buffer, dtb = results[0], (results[1] if delta else None)

        def map_back(dq_buffer, dk_buffer, q, k):
            # dL/d(scale phi_n(q)) came back as a scatter buffer: <phi_n(q), it> per step from the
            # buffer (feature_dots, which gives dL/dscale), and the rest of the map's VJP at width 2d.
            q_dots = feature_dots(dq_buffer, q)
            dq = (scale[0] * map_gradient(features, dq_buffer, q, q_dots)).astype(q.dtype)
            return dq, map_gradient(features, dk_buffer, k).astype(k.dtype), q_dots

        dq, dk, q_dots = _span_by_span(map_back, (dq_buffer, dk_buffer, q, k), axis=1)
        d_scale = jnp.sum(q_dots).reshape(1)
    return d_scale, dq, dk, dv, dtb, d_w0, None, d_gate


_fused_chunk.defvjp(_fused_chunk_forward_rule, _fused_chunk_backward, symbolic_zeros=True)


def gate_cumsums(log_decay: Array) -> tuple[Array, Array]:
    """``(hi, lo)``: the cumulative sums along the last axis (a chunk) of ``log_decay`` (float32),
    clamped at ``LOG_DECAY_FLOOR`` and split into multiples of 1/16 (``hi``, whose sums are exact)
    and small rests (``lo``) by ``split_log_decay``, so ``(hi_i - hi_j) + (lo_i - lo_j)`` is
    ``g_i - g_j`` to a few ulps of its own size however large g is (docs/math.md, "Differences of
    cumulative sums, exactly").
    Differentiable: lo carries all of the gradient (zero where clamped).

    Example: alpha = 0.5 three times, and a zero alpha (``-inf``) that stays finite.
        >>> import jax.numpy as jnp
        >>> hi, lo = gate_cumsums(jnp.log(jnp.array([0.5, 0.5, 0.5, 0.0])))
        >>> [round(float(x), 4) for x in hi + lo][:3], bool(jnp.isfinite(hi + lo).all())
        ([-0.6931, -1.3863, -2.0794], True)
    """
    hi, lo = split_log_decay(log_decay)
    return jnp.cumsum(hi, axis=-1), jnp.cumsum(lo, axis=-1)


def _within(hi: Array, lo: Array) -> Array:
    """``D_ij = exp(g_i - g_j)`` for ``j <= i`` (0 above the diagonal) from ``gate_cumsums``
    ``[..., C]``: the decays the WY inverse's Gram matrix is weighted by (the kernels compute the
    same factors on chip, ``_decays``)."""
    size = hi.shape[-1]
    lower = jnp.tril(jnp.ones((size, size), bool))
    pairwise = (hi[..., :, None] - hi[..., None, :]) + (lo[..., :, None] - lo[..., None, :])
    return jnp.where(lower, jnp.exp(jnp.where(lower, pairwise, 0.0)), 0.0)


def _to_chunks_bnch(x: Array, chunk_size: int, size: int | None = None) -> Array:
    """``[B, T, H, ...] -> [B, N, C, H, ...]``: T zero-padded to whole chunks, the last axis to
    ``size``; a reshape, no copy, when nothing needs padding."""
    x = pad_to(x, 1, -(-x.shape[1] // chunk_size) * chunk_size)
    if size is not None:
        x = pad_to(x, x.ndim - 1, size)
    return x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])


def fused_chunk(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    *,
    rule: str,
    scale: float | Array = 1.0,
    chunk_size: int = 64,
    interpret: bool = False,
    num_stages: int = 1,
    wy_inverse: Callable[..., Array] | None = None,
    resets: Array | None = None,
    features: DPFP | None = None,
    log_decay: Array | None = None,
    checkpoint_chunks: int = 4,
) -> tuple[Array, Array]:
    """The fast-weight op as fused chunked Pallas kernels.

    The op's contract (shapes, dtypes, outputs, gradients) is stated once, by the library's oracle
    ``dpfp_jax.ops.fast_weight.naive.fast_weight_reference``; here on top of it: K <= ``MAX_KEY_DIM``,
    ``chunk_size`` a power of two >= 16 (the smallest tile a tensor-core dot takes), and the
    kernels compute in float32, so ``final_state`` is float32. The arguments are checked here
    (``pallas_kernels.validation``): a bad call raises a ValueError/TypeError naming the argument.

    ``num_stages``: Triton's software pipelining of the per-chunk loads; 1 (the default) turns it
    off. More stages keep more loads in flight in shared memory, which the backward then outgrows
    from some K on (sooner with float32 inputs): which K fit on an H200, per input dtype, is in
    docs/reports/triton_report_h200.md ("Two load stages", from ``benchmarks/triton_report.py``). Whether
    they pay is for the GPU benchmark to say.

    ``wy_inverse``: for the delta rule (required; refused for the sum rule), the function
    ``(k [..., C, K], beta [..., C]) -> A^-1 [..., C, C]`` with ``A = I + diag(beta) strict_tril(K K^T)``,
    every chunk at once (k zero-padded to whole key tiles, beta float32); it must be
    differentiable by JAX. ``dpfp_jax`` passes ``dpfp_jax.ops.fast_weight.wy.wy_inverse``. With
    ``resets`` it is called as ``wy_inverse(k, beta, same_document)``, ``same_document`` a bool
    ``[..., C, C]`` (True where steps i and j of a chunk belong to one document), and must mask the
    Gram matrix with it: ``A = I + diag(beta) (strict_tril(K K^T) * same_document)``.

    ``resets``: packed documents, a bool ``[B, T]`` that is True where a step starts a new document
    (the library makes it from ``segment_ids``, never True at step 0): the state is zero before
    that step, as the oracle's ``resets`` says. Documents may start
    anywhere in a chunk: each chunk step is the masked WY form (docs/math.md, "Packed documents":
    scores and Gram matrix kept within a document, only the chunk's first document reads its start
    state, only its last document's writes reach its end state). The backward cannot rebuild a
    chunk's start state from its end state across a reset; instead it walks forward again from the
    last earlier chunk in which a document started (or from the initial state), re-adding the
    stored writes with the forward's own arithmetic, so the rebuilt state is the forward's bit for
    bit. Over the whole backward that costs at most one more ``[C, 64] x [C, BV]`` product per chunk
    and key tile (a backward chunk step does about a dozen) and, in chunks where a document starts,
    a second read of k; no
    state per chunk is kept, unlike ``impl="chunk"``'s ``T / C`` states of ``K x V`` per head (at
    K = V = 128, C = 64 twice the stored writes), because the fused kernels' point is to keep
    memory traffic and footprint at the outputs and the writes.

    ``features``: a :class:`~pallas_kernels.triton.dpfp.DPFP`: q and k are then the raw inputs
    ``[B, T, H, d]`` (d a multiple of 32) and the kernels compute ``phi(q)``, ``phi(k)`` (K =
    2·nu·d, the state's K) tile by tile on chip, forward and backward (``dpfp.py`` says how); dq,
    dk come back at width d. For the delta rule the per-chunk Gram matrices that ``wy_inverse``
    takes are still computed by XLA, from ``features(k)``, ``SPAN_CHUNKS`` chunks at a time
    (recomputed in the backward, not kept), as is the map's VJP after the backward kernels.
    The backward is then two kernels, to spill fewer registers (``_scores_kernel``): it keeps
    ``initial_state`` for the first one's forward walk over the stored writes, and reads q, k, the
    writes and the output's cotangent twice, building phi's tiles (and k's once more per chunk to
    walk the state) in both.

    ``log_decay``: gated fast weights, ``log alpha [B, T, H]`` float (``-inf``: alpha = 0), as the
    oracle takes it: ``W_{t-1}`` decays by ``alpha_t`` before step t's write. Each chunk's decays
    come from its cumulative log sums (``gate_cumsums``), only as exps of their differences
    (docs/math.md, "Gated fast weights"): on chip for the scores, the start state's reads and the
    end state, and in XLA for the Gram matrix the WY inverse takes, which ``wy_inverse`` is then
    given already weighted: it is called as ``wy_inverse(k, beta, gram=G)`` with
    ``G = (K K^T) * D`` and must use G in place of ``K K^T``. With ``resets`` too, a reset wins
    over the gate: it is taken as ``log alpha = -inf`` at that step. The backward cannot undo a
    chunk's update without dividing by its decay, so the forward (when a gradient will be taken)
    also writes the state entering every ``checkpoint_chunks``-th chunk, and the backward walks
    each chunk's start state forward from the last of those with the forward's arithmetic: exact
    for every alpha, 0 included. That costs ``ceil(N / checkpoint_chunks)`` float32 states of
    ``K x V`` per head (at K = V = 128, C = 64 and the default 4, half the delta rule's stored
    writes; at K = 1024, 4 times them) and on average ``(checkpoint_chunks - 1) / 2`` more chunk
    end-state updates per backward chunk step (one ``[64, C] x [C, BV]`` product per key tile
    each, against about a dozen in the step itself); ``checkpoint_chunks=1`` keeps every chunk's
    start state and walks nothing. The gradient reaches ``log_decay`` through the kernel's
    ``dL/dg`` per step and the WY inverse's autodiff (zero where alpha = 0, as the oracle's).

    Example (interpret mode runs anywhere):
        >>> import jax.numpy as jnp
        >>> from jax.scipy.linalg import solve_triangular
        >>> def inverse(k, beta):
        ...     eye = jnp.eye(k.shape[-2])
        ...     a = eye + beta[..., :, None] * jnp.tril(k @ jnp.swapaxes(k, -1, -2), -1)
        ...     return solve_triangular(a, jnp.broadcast_to(eye, a.shape), lower=True, unit_diagonal=True)
        >>> x = jnp.full((1, 20, 2, 4), 0.25)
        >>> out, w = fused_chunk(x, x, x, jnp.full((1, 20, 2), 0.5), jnp.zeros((1, 2, 4, 4)),
        ...                      rule="delta", chunk_size=16, interpret=True, wy_inverse=inverse)
        >>> out.shape, w.shape
        ((1, 20, 2, 4), (1, 2, 4, 4))
    """
    key_dim = None
    if features is not None and len(getattr(q, "shape", ())) == 4:  # else check_kernel_inputs says what q is
        key_dim = check_features(features, q.shape[-1], MAX_KEY_DIM)
    check_kernel_inputs(q, k, v, beta, initial_state, rule, scale, resets, state_key_dim=key_dim)
    chunk_size = check_chunk_size(chunk_size)
    num_stages = check_positive_int("num_stages", num_stages)
    check_interpret(interpret)
    check_log_decay(log_decay, q)
    checkpoint_chunks = check_positive_int("checkpoint_chunks", checkpoint_chunks)
    gated = log_decay is not None
    if gated and resets is not None:
        log_decay, resets = gate_with_resets(log_decay, resets), None
    check_wy_inverse(rule, wy_inverse, packed=resets is not None, gated=gated)
    if (empty := empty_result(v, initial_state, q)) is not None:
        return empty
    batch, length, heads, input_dim = q.shape
    key_dim = key_dim or input_dim
    value_dim = v.shape[-1]
    k_pad, forward_block, v_pad = padded_sizes(key_dim, value_dim, FORWARD_STATE_BUDGET, min_block=16,
                                                key_tile=KEY_TILE)
    # Powers of two, the backward's no wider than the forward's: v_pad is a multiple of both.
    backward_block = value_block(k_pad, value_dim, BACKWARD_STATE_BUDGET, min_block=16)
    f32 = jnp.float32
    # With features q and k stay at width d (2d is whole key tiles, so K needs no padding).
    input_pad = k_pad if features is None else None
    qc, kc = _to_chunks_bnch(q, chunk_size, input_pad), _to_chunks_bnch(k, chunk_size, input_pad)
    vc = _to_chunks_bnch(v, chunk_size, v_pad)
    docs = None
    if resets is not None:
        # Per step, how many documents have started in its chunk up to it (padding starts none).
        docs = jnp.cumsum(_to_chunks_bnch(resets, chunk_size), axis=-1, dtype=jnp.int32)
    gate = None
    if gated:
        # [B, T, H] -> [B, H, N, C]; padded steps decay nothing (alpha = 1), as they write nothing.
        gate = gate_cumsums(jnp.moveaxis(_to_chunks_bnch(log_decay.astype(f32), chunk_size), 3, 1))
    tb = None
    if rule == "delta":
        # A^-1 diag(beta) per chunk, [B, H, N, C, C] -> [G, N, C, C]: batched over heads, so k is
        # read head-major here (the one transposition left, done by XLA for its matmuls).
        beta_c = jnp.moveaxis(_to_chunks_bnch(beta.astype(f32), chunk_size), 3, 1)
        masks = []
        if docs is not None:
            same = docs[:, None, :, :, None] == docs[:, None, :, None, :]  # [B, 1, N, C, C]
            masks = [jnp.broadcast_to(same, (*beta_c.shape, chunk_size))]

        def inverse_of(keys, beta_c, masks, gate):
            # keys [..., H, C, D] (head-major), the rest [..., H, C, ...]; any leading axes.
            keys = keys if features is None else features(keys)
            if gate is not None:  # the Gram matrix weighted by the decays between the steps
                gram = jnp.einsum("...ik,...jk->...ij", keys, keys, precision=lax.Precision.HIGHEST,
                                  preferred_element_type=f32)
                return wy_inverse(keys, beta_c, gram=gram * _within(*gate))
            return wy_inverse(keys, beta_c, *masks)

        keys = jnp.moveaxis(kc, 3, 1)  # [B, H, N, C, D]
        if features is None:
            inverse = inverse_of(keys, beta_c, masks, gate)
        else:
            # The Gram matrices need phi(k), K wide: XLA computes it a span of chunks at a time, and
            # again in the backward (each span checkpointed), so no K-wide array outlives its span.
            inverse = _span_by_span(jax.checkpoint(inverse_of), (keys, beta_c, masks, gate), axis=2)
        check_wy_inverse_result(inverse, (*beta_c.shape, chunk_size))
        tb = inverse * beta_c[..., None, :]
        tb = tb.reshape(batch * heads, *tb.shape[2:])
    w0 = pad_state(initial_state.astype(f32).reshape(batch * heads, key_dim, value_dim), k_pad, v_pad)
    launch = _Launch(forward_block, backward_block, num_stages, features, checkpoint_chunks)
    scale = jnp.asarray(scale, f32).reshape(1)
    if gate is not None:
        gate = tuple(x.reshape(batch * heads, *x.shape[2:]) for x in gate)
    out, final_state = _fused_chunk(interpret, float32_or_wider(q, k, v), launch, scale, qc, kc, vc, tb, w0, docs,
                                    gate)
    out = out.reshape(batch, -1, heads, v_pad)[:, :length, :, :value_dim]
    final_state = final_state[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    return out, final_state
