"""Fused chunked delta/sum rule (Pallas): the whole chunk step in one kernel, forward and backward.

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
run to run when there are more than two blocks).

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
    check_chunk_size,
    check_kernel_inputs,
    check_positive_int,
    check_wy_inverse,
    check_wy_inverse_result,
)

Array = jax.Array

# Floats of state per program. Besides its [K, BV] state slice a program holds [C, C] scores (and,
# for the delta rule, T_beta and in the backward dL/dscores), so the value blocks are narrower than
# chunk_recurrence.py's: BV = 32 at K = 128, 16 from K = 256. A wider forward block spills more
# (docs/triton_report_h200.md, "The fused chunk kernel: value blocks, spills, atomic adds", from
# ``benchmarks/triton_report.py``). Narrower blocks also mean more programs: B * H = 64 heads
# fill 128 of an H200's 132 SMs with two blocks, 64 with one.
FORWARD_STATE_BUDGET = 4_096
BACKWARD_STATE_BUDGET = 4_096


def _tril(scores: Array) -> Array:
    """``jnp.tril(scores)``, from iotas (what a kernel can build): step i of a chunk reads the
    writes of steps j <= i. The same mask as ``tril`` of the library's chunk form (which this
    package does not import)."""
    rows = lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    return jnp.where(rows >= cols, scores, 0.0)


def _tile(ref, n, rows: slice) -> Array:
    """Chunk n's columns ``rows`` of a per-step ref, as float32 (the ref keeps the inputs' dtype)."""
    return ref[n, :, rows].astype(jnp.float32)


def _forward_kernel(*refs, delta: bool, keep_writes: bool, dot):
    if delta and keep_writes:
        scale_ref, q_ref, k_ref, v_ref, tb_ref, w0_ref, out_ref, u_ref, w_ref = refs
    elif delta:
        scale_ref, q_ref, k_ref, v_ref, tb_ref, w0_ref, out_ref, w_ref = refs
    else:
        scale_ref, q_ref, k_ref, v_ref, w0_ref, out_ref, w_ref = refs
    tiles = key_tiles(w0_ref.shape[0])
    scale = scale_ref[0]
    chunk, block = v_ref.shape[1], v_ref.shape[2]

    def step(n, w):
        # Everything that sums over K, one key tile at a time.
        scores = jnp.zeros((chunk, chunk), jnp.float32)
        q_w = jnp.zeros((chunk, block), jnp.float32)
        recall = jnp.zeros((chunk, block), jnp.float32)
        for rows, w_tile in zip(tiles, w, strict=True):
            q_tile, k_tile = _tile(q_ref, n, rows), _tile(k_ref, n, rows)
            scores += dot(q_tile, k_tile.T)
            q_w += dot(q_tile, w_tile)
            if delta:
                recall += dot(k_tile, w_tile)
        v = v_ref[n].astype(jnp.float32)
        u = dot(tb_ref[n], v - recall) if delta else v
        if delta and keep_writes:
            u_ref[n] = u
        # Scores and Q W0 are linear in q: scaling the output equals scaling the queries.
        out_ref[n] = (scale * (q_w + dot(_tril(scores), u))).astype(out_ref.dtype)
        # k's tiles are loaded again rather than kept from the loop above: holding all of them
        # alongside the state would cost K / 64 more [C, 64] tiles of registers.
        return tuple(w_tile + dot(_tile(k_ref, n, rows).T, u) for rows, w_tile in zip(tiles, w, strict=True))

    w = lax.fori_loop(0, q_ref.shape[0], step, tuple(w0_ref[rows, :] for rows in tiles))
    for rows, w_tile in zip(tiles, w, strict=True):
        w_ref[rows, :] = w_tile


def _backward_kernel(*refs, delta: bool, dot):
    # The zero-filled buffers that dq, dk (and dT_beta) alias come last among the inputs; unused.
    if delta:
        (scale_ref, q_ref, k_ref, v_ref, tb_ref, u_ref, d_out_ref, w_ref, d_w_ref, _, _, _,
         dq_ref, dk_ref, dtb_ref, dv_ref, d_w0_ref) = refs
    else:
        (scale_ref, q_ref, k_ref, v_ref, d_out_ref, w_ref, d_w_ref, _, _,
         dq_ref, dk_ref, dv_ref, d_w0_ref) = refs
    num_chunks, chunk, block = v_ref.shape
    tiles = key_tiles(w_ref.shape[0])
    # The output is linear in q, so the kernel differentiates it as a function of the scaled
    # queries scale * q: d_out is used as it comes, q is scaled where it multiplies d_out, and dq
    # is the gradient w.r.t. scale * q (the caller rescales it, and takes dL/dscale = <q, dq> from it).
    scale = scale_ref[0]

    def step(i, carry):
        w1, dw1 = carry  # per key tile: the state after chunk n and dL/d(that state)
        n = num_chunks - 1 - i
        v = v_ref[n].astype(jnp.float32)
        u = u_ref[n] if delta else v
        d_out = d_out_ref[n].astype(jnp.float32)
        # Rebuild W0 and everything that sums over K, one key tile at a time.
        scores = jnp.zeros((chunk, chunk), jnp.float32)
        du = jnp.zeros((chunk, block), jnp.float32)  # dL/du through W1 = W0 + K^T u
        recall = jnp.zeros((chunk, block), jnp.float32)
        w0 = []
        for rows, w_tile, dw_tile in zip(tiles, w1, dw1, strict=True):
            q_tile, k_tile = _tile(q_ref, n, rows), _tile(k_ref, n, rows)
            scores += dot(q_tile, k_tile.T)
            du += dot(k_tile, dw_tile)
            w_tile = w_tile - dot(k_tile.T, u)
            if delta:
                recall += dot(k_tile, w_tile)
            w0.append(w_tile)
        du += dot(_tril(scale * scores).T, d_out)  # through O = scale (Q W0 + tril(Q K^T) u)
        d_scores = _tril(dot(d_out, u.T))
        if delta:
            dr = dot(tb_ref[n].T, du)  # dL/d(V - K W0), which is also dL/dV
            pltriton.atomic_add(dtb_ref, (n, slice(None), slice(None)), dot(du, (v - recall).T))
            dv_ref[n] = dr.astype(dv_ref.dtype)
        else:
            dv_ref[n] = du.astype(dv_ref.dtype)
        dw0 = []
        for rows, w_tile, dw_tile in zip(tiles, w0, dw1, strict=True):
            q_tile, k_tile = scale * _tile(q_ref, n, rows), _tile(k_ref, n, rows)
            pltriton.atomic_add(dq_ref, (n, slice(None), rows), dot(d_out, w_tile.T) + dot(d_scores, k_tile))
            dk = dot(d_scores.T, q_tile) + dot(u, dw_tile.T)
            dw_tile = dw_tile + dot(q_tile.T, d_out)
            if delta:
                dk -= dot(dr, w_tile.T)
                dw_tile -= dot(k_tile.T, dr)
            pltriton.atomic_add(dk_ref, (n, slice(None), rows), dk)
            dw0.append(dw_tile)
        return tuple(w0), tuple(dw0)

    walk_in_reverse(step, num_chunks, tiles, w_ref, d_w_ref, d_w0_ref)


def _specs(heads: int, num_chunks: int, chunk: int, key_dim: int, block: int):
    """BlockSpecs over the grid (batch x head g, value block j).

    Per-step arrays stay in the caller's ``[B, T, H, D]`` layout, viewed as ``[B, N, C, H, D]``
    (a free reshape), so no transposed copy of q, k, v, the outputs or the gradients is made: a
    program reads its head's rows with a stride of H * D. Per-chunk ``T_beta`` is ``[G, N, C, C]``
    and states ``[G, K, V]``.
    """
    def head(g, column_block=0):  # block index of head g's rows
        return g // heads, 0, 0, g % heads, column_block

    keys = pl.BlockSpec((None, num_chunks, chunk, None, key_dim), lambda g, j: head(g))
    values = pl.BlockSpec((None, num_chunks, chunk, None, block), lambda g, j: head(g, j))
    square = pl.BlockSpec((None, num_chunks, chunk, chunk), lambda g, j: (g, 0, 0, 0))
    state = pl.BlockSpec((None, key_dim, block), lambda g, j: (g, 0, j))
    return keys, values, square, state


class _Launch(NamedTuple):
    """Static settings of the kernels: value columns per program, forward and backward, and
    Triton's load-pipelining stages."""

    forward_block: int
    backward_block: int
    num_stages: int


# The output scale reaches the kernels as a runtime operand, a float32 array of shape (1,) that
# every program reads once, so a traced scale (a learned one, or a jit argument) costs no
# recompilation; it is applied on chip, before the output is rounded to v's dtype.
_SCALAR = pl.BlockSpec((1,), lambda g, j: (0,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_chunk(interpret: bool, precise: bool, launch: _Launch, scale, q, k, v, tb, w0):
    """``[B, N, C, H, ...]`` padded chunks -> ``(scale * out [B, N, C, H, V] in v's dtype,
    final_state [G, K, V] float32)``; ``scale`` float32 of shape (1,). Without a gradient to take,
    the writes u are not stored."""
    out, _, final_state = _forward(interpret, precise, launch, scale, q, k, v, tb, w0, keep_writes=False)
    return out, final_state


def _fused_chunk_forward(interpret, precise, launch, scale, q, k, v, tb, w0):
    out, u, final_state = _forward(interpret, precise, launch, scale, q, k, v, tb, w0, keep_writes=True)
    return (out, final_state), (scale, q, k, v, tb, u, final_state)


def _forward(interpret, precise, launch, scale, q, k, v, tb, w0, *, keep_writes: bool):
    """The forward kernel: ``(out, u or None, final_state)``; u (float32) only if ``keep_writes``
    and the rule is delta (the backward rebuilds states from it)."""
    batch, num_chunks, chunk, heads, key_dim = q.shape
    groups, value_dim = batch * heads, v.shape[-1]
    block = launch.forward_block
    delta = tb is not None
    keep_writes = keep_writes and delta
    keys, values, square, state = _specs(heads, num_chunks, chunk, key_dim, block)
    results = pl.pallas_call(
        functools.partial(_forward_kernel, delta=delta, keep_writes=keep_writes, dot=tile_dot(interpret, precise)),
        out_shape=(jax.ShapeDtypeStruct(v.shape, v.dtype),
                   *([jax.ShapeDtypeStruct(v.shape, jnp.float32)] if keep_writes else []),
                   jax.ShapeDtypeStruct((groups, key_dim, value_dim), jnp.float32)),
        grid=(groups, value_dim // block),
        in_specs=[_SCALAR, keys, keys, values, *([square] if delta else []), state],
        out_specs=(values, *([values] if keep_writes else []), state),
        compiler_params=compiler_params(NUM_WARPS, num_stages=launch.num_stages),
        interpret=interpret,
        name="fast_weight_fused_chunk_fwd",
    )(scale, q, k, v, *([tb] if delta else []), w0)
    return results[0], results[1] if keep_writes else None, results[-1]


def _fused_chunk_forward_rule(interpret, precise, launch, *primals):
    return _fused_chunk_forward(interpret, precise, launch, *primal_values(*primals))


def _fused_chunk_backward(interpret, precise, launch, residuals, cotangents):
    scale, q, k, v, tb, u, final_state = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    batch, num_chunks, chunk, heads, key_dim = q.shape
    groups, value_dim = batch * heads, v.shape[-1]
    block = launch.backward_block
    num_blocks = value_dim // block
    delta = tb is not None
    keys, values, square, state = _specs(heads, num_chunks, chunk, key_dim, block)
    f32 = jnp.float32
    # Gradients that sum over V are accumulated by every value block's program with atomic adds
    # into zero-filled buffers, instead of one partial per block summed afterwards: at K = 512
    # (4 blocks) the partials of dq and dk alone would be 8 float32 copies of k.
    summed = [jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), *([jnp.zeros(tb.shape, f32)] if delta else [])]
    inputs = [scale, q, k, v, *([tb, u] if delta else []), d_out, final_state, d_final]
    results = pl.pallas_call(
        functools.partial(_backward_kernel, delta=delta, dot=tile_dot(interpret, precise)),
        out_shape=(*[jax.ShapeDtypeStruct(x.shape, f32) for x in summed],
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(final_state.shape, f32)),
        grid=(groups, num_blocks),
        in_specs=[_SCALAR, keys, keys, values, *([square, values] if delta else []), values, state, state,
                  keys, keys, *([square] if delta else [])],
        out_specs=(keys, keys, *([square] if delta else []), values, state),
        input_output_aliases={len(inputs) + i: i for i in range(len(summed))},
        compiler_params=compiler_params(NUM_WARPS, num_stages=launch.num_stages),
        interpret=interpret,
        name="fast_weight_fused_chunk_bwd",
    )(*inputs, *summed)
    # results[0] is dL/d(scale * q): the output is linear in q, so dL/dscale = <q, dL/d(scale * q)>.
    d_scale = jnp.sum(q.astype(f32) * results[0]).reshape(1)
    dq, dk = (scale[0] * results[0]).astype(q.dtype), results[1].astype(k.dtype)
    return d_scale, dq, dk, results[-2], results[2] if delta else None, results[-1]


_fused_chunk.defvjp(_fused_chunk_forward_rule, _fused_chunk_backward, symbolic_zeros=True)


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
    wy_inverse: Callable[[Array, Array], Array] | None = None,
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
    docs/triton_report_h200.md ("Two load stages", from ``benchmarks/triton_report.py``). Whether
    they pay is for the GPU benchmark to say.

    ``wy_inverse``: for the delta rule (required; refused for the sum rule), the function
    ``(k [..., C, K], beta [..., C]) -> A^-1 [..., C, C]`` with ``A = I + diag(beta) strict_tril(K K^T)``,
    every chunk at once (k zero-padded to whole key tiles, beta float32); it must be
    differentiable by JAX. ``dpfp_jax`` passes ``dpfp_jax.ops.fast_weight.wy.wy_inverse``.

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
    check_kernel_inputs(q, k, v, beta, initial_state, rule, scale)
    check_chunk_size(chunk_size)
    check_positive_int("num_stages", num_stages)
    check_wy_inverse(rule, wy_inverse)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    k_pad, forward_block, v_pad = padded_sizes(key_dim, value_dim, FORWARD_STATE_BUDGET, min_block=16,
                                                key_tile=KEY_TILE)
    # Powers of two, the backward's no wider than the forward's: v_pad is a multiple of both.
    backward_block = value_block(k_pad, value_dim, BACKWARD_STATE_BUDGET, min_block=16)
    f32 = jnp.float32
    qc, kc = _to_chunks_bnch(q, chunk_size, k_pad), _to_chunks_bnch(k, chunk_size, k_pad)
    vc = _to_chunks_bnch(v, chunk_size, v_pad)
    tb = None
    if rule == "delta":
        # A^-1 diag(beta) per chunk, [B, H, N, C, C] -> [G, N, C, C]: batched over heads, so k is
        # read head-major here (the one transposition left, done by XLA for its matmuls).
        beta_c = jnp.moveaxis(_to_chunks_bnch(beta.astype(f32), chunk_size), 3, 1)
        inverse = wy_inverse(jnp.moveaxis(kc, 3, 1), beta_c)
        check_wy_inverse_result(inverse, (*beta_c.shape, chunk_size))
        tb = inverse * beta_c[..., None, :]
        tb = tb.reshape(batch * heads, *tb.shape[2:])
    w0 = pad_state(initial_state.astype(f32).reshape(batch * heads, key_dim, value_dim), k_pad, v_pad)
    launch = _Launch(forward_block, backward_block, num_stages)
    scale = jnp.asarray(scale, f32).reshape(1)
    out, final_state = _fused_chunk(interpret, float32_or_wider(q, k, v), launch, scale, qc, kc, vc, tb, w0)
    out = out.reshape(batch, -1, heads, v_pad)[:, :length, :, :value_dim]
    final_state = final_state[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
    return out, final_state
