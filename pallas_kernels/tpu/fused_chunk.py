"""Fused chunked delta/sum rule for TPU (Pallas Mosaic): the state in VMEM across chunks, forward and backward.

The chunkwise WY form (docs/math.md): with ``T_beta = A^-1 diag(beta)``,
``A = I + diag(beta) strict_tril(K K^T)`` per chunk of C steps, a chunk that starts from state W0 does

    u = T_beta (V - K W0),   O = scale (Q W0 + tril(Q K^T) u),   W1 = W0 + K^T u

(the sum rule: ``u = V``). The grid is (batch x head g, chunk n): g is "parallel" (split over a
chip's TensorCores where it has two), n "arbitrary", walked in order on one core, with the
``[K, V]`` float32 state of head g in a VMEM scratch across its chunks. Each grid step reads its
chunk's ``[C, K]`` q and k and ``[C, V]`` v (Mosaic's pipeline fetches the next chunk's blocks
while this one computes), and beta as a ``[1, C]`` row, and does the step as MXU matmuls. The
outputs leave in v's dtype; when a gradient will be taken the writes u leave too (float32).

The backward walks chunks in reverse with two VMEM scratches, the state and its gradient: it
starts from the final state and rebuilds each chunk's start state as ``W0 = W1 - K^T u`` from the
stored writes, so no state per chunk is ever in HBM. Each head's whole V is one program (V is at
most a few lane tiles), so the products that sum over V (dq, dk, dbeta) are complete in one
program and written once; TPU Pallas has no atomic adds to spread them over value blocks.

The triangular inverse ``A^-1`` is computed in the kernel, per chunk, by matmuls
(:func:`unit_lower_inverse`: Horner's rule on the diagonal blocks, then a product of
``log2(C / 8)`` factors for the rest), and recomputed in the backward, which also differentiates
it in-kernel (``dA = -A^-T dA^-1 A^-T``, then beta and ``K K^T``). Why not from XLA, as the GPU
kernel takes it: compiled for v5e at B=8, T=4096, H=8, K=128, V=64, bfloat16, taking ``T_beta``
from XLA's triangular solve (a float32 ``[C, C]`` per chunk, its gradient by JAX's autodiff of
the solve) made the forward+backward's temporary memory 1.22 GB, 0.59x of ``impl="chunk"``'s then;
in-kernel it is 0.55 GB (0.26x of that chunk form's, before it worked in spans of steps): no
``[C, C]`` array per chunk is written to HBM, forward or backward, and k is not read a second
time. It costs MXU work: 12 ``[C, C] x [C, C]`` float32
products per chunk at C = 64 in the forward, the same again in the backward (which recomputes the
inverse rather than store it) and 3 more for its gradient, beside the chunk step's
``[C, K] x [K, V]``-sized ones. No per-row loop: each Horner step is one matmul that
settles one more row of every diagonal block. Forward substitution row by row would be C
dependent vector steps per chunk; a plain Neumann product ``(I - L)(I + L^2)(I + L^4)...`` over
the whole chunk would form large powers of L (growing combinatorially for correlated keys, as
non-negative DPFP features are) that cancel in float32.

Products: bfloat16 operands (q, k) go to the MXU as they are with float32 accumulation; any
product with a float32 operand (the state, the writes, the gradients) is float32 at HIGHEST
precision, so bfloat16 and float32 inputs give the reference's float32 arithmetic up to summation
order. Layout of q, k, v in HBM and V = 64: ``layout.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.autodiff import cotangent_array, primal_values
from pallas_kernels.tpu.layout import Layout, key_layout, value_layout
from pallas_kernels.validation import check_kernel_inputs

Array = jax.Array
f32 = jnp.float32

# A bfloat16 block's sublane tile is 16 rows: a chunk of C steps is the second-to-last block dim.
CHUNK_MULTIPLE = 16


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    """``a . b`` over axis ``contract[0]`` of a and ``contract[1]`` of b, accumulated in float32 on the
    MXU: bfloat16 pairs as they are, anything else in float32 at HIGHEST precision."""
    if a.dtype == b.dtype == jnp.bfloat16:
        precision = None
    else:
        a, b, precision = a.astype(f32), b.astype(f32), lax.Precision.HIGHEST
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                           preferred_element_type=f32)


def _mm(a, b):  # a @ b
    return _dot(a, b, (1, 0))


def _mm_t(a, b):  # a @ b^T
    return _dot(a, b, (1, 1))


def _t_mm(a, b):  # a^T @ b
    return _dot(a, b, (0, 0))


def _iotas(size: int) -> tuple[Array, Array]:
    return (lax.broadcasted_iota(jnp.int32, (size, size), 0), lax.broadcasted_iota(jnp.int32, (size, size), 1))


def _tril(x: Array, strict: bool = False) -> Array:
    """``jnp.tril(x)`` (``strict``: below the diagonal only) from iotas: step i of a chunk reads the
    writes of steps j <= i."""
    rows, cols = _iotas(x.shape[0])
    return jnp.where(rows > cols if strict else rows >= cols, x, 0.0)


# The triangular inverse's diagonal blocks: their inverse takes DIAGONAL_BLOCK - 1 matmuls.
DIAGONAL_BLOCK = 8


def unit_lower_inverse(lower: Array) -> Array:
    """``(I + L)^-1`` for a strictly lower-triangular ``[C, C]`` float32 L, by matmuls only.

    The diagonal blocks of ``DIAGONAL_BLOCK`` steps first: Horner's rule on the Neumann series,
    ``X <- I - L_d X`` repeated ``DIAGONAL_BLOCK - 1`` times, is exact there (``L_d`` is nilpotent
    of that order) and fixes one more row of each block per matmul, as forward substitution would,
    so its intermediates stay as small as the inverse's rows (no growing powers of L). Then, with
    D that block-diagonal inverse and ``L_o = L - L_d``, ``I + L = (I + L_d)(I + D L_o)``, and
    ``N = D L_o`` is nilpotent of order ``C / DIAGONAL_BLOCK``, so
    ``(I + N)^-1 = (I - N)(I + N^2)(I + N^4)...`` with as many factors as that order has bits.
    At C = 64: 6 + 1 + 2 x 2 + 1 = 12 products of ``[C, C]`` matrices.

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> lower = jnp.tril(jnp.asarray(np.random.default_rng(0).uniform(0, 1, (32, 32)), jnp.float32), -1)
        >>> want = np.linalg.inv(np.eye(32) + np.asarray(lower, np.float64))
        >>> bool(np.allclose(unit_lower_inverse(lower), want, atol=1e-3 * np.abs(want).max()))
        True
    """
    size = lower.shape[0]
    block = min(DIAGONAL_BLOCK, size)
    rows, cols = _iotas(size)
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(f32)
    diagonal = jnp.where(rows // block == cols // block, lower, 0.0)
    inverse = eye - diagonal
    for _ in range(block - 2):
        inverse = eye - _mm(diagonal, inverse)
    minus_n = -_mm(inverse, lower - diagonal)
    factor, power = eye + minus_n, 2
    while power < -(-size // block):
        minus_n = _mm(minus_n, minus_n)
        factor = _mm(factor, eye + minus_n)
        power *= 2
    return _mm(factor, inverse)


class _WY(NamedTuple):
    """A chunk's WY pieces: ``A = I + diag(beta) S``, ``S = strict_tril(K K^T)``; ``T_beta = A^-1 diag(beta)``."""

    gram: Array  # S
    beta_column: Array  # [C, 1]
    inverse: Array  # A^-1
    t_beta: Array


def _wy(k: Array, beta_row: Array) -> _WY:
    """The WY pieces of a chunk from its keys ``[C, K]`` and write strengths ``[1, C]`` (a lane row)."""
    size = k.shape[0]
    rows, cols = _iotas(size)
    # beta as a column (it scales A's rows): the diagonal of a broadcast, summed along the lanes.
    beta_column = jnp.sum(jnp.where(rows == cols, jnp.broadcast_to(beta_row, (size, size)), 0.0), axis=1,
                          keepdims=True)
    gram = _tril(_mm_t(k, k), strict=True)
    inverse = unit_lower_inverse(beta_column * gram)
    return _WY(gram, beta_column, inverse, inverse * beta_row)


def _forward_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, delta: bool, keep_writes: bool):
    refs = list(refs)
    beta_ref = refs.pop(0) if delta else None
    w0_ref, out_ref = refs.pop(0), refs.pop(0)
    u_ref = refs.pop(0) if keep_writes else None
    final_ref, w_ref = refs
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        w_ref[...] = w0_ref[...]

    q, k, w = q_ref[...], k_ref[...], w_ref[...]
    v = v_ref[...].astype(f32)
    u = _mm(_wy(k, beta_ref[...]).t_beta, v - _mm(k, w)) if delta else v
    if keep_writes:
        u_ref[...] = u
    # The output is linear in q: scaling it equals scaling the queries.
    out_ref[...] = (scale_ref[0] * (_mm(q, w) + _mm(_tril(_mm_t(q, k)), u))).astype(out_ref.dtype)
    w = w + _t_mm(k, u)
    w_ref[...] = w

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        final_ref[...] = w


def _wy_backward(k: Array, wy: _WY, du: Array, residual: Array) -> tuple[Array, Array, Array]:
    """Through ``u = T_beta r`` (r = V - K W0): ``(dL/dr, dL/dbeta [1, C], dL/dk [C, K])``, the last two
    only through ``T_beta = A^-1 diag(beta)``."""
    dr = _t_mm(wy.t_beta, du)
    d_t = _mm_t(du, residual)
    d_beta = jnp.sum(d_t * wy.inverse, axis=0, keepdims=True)  # T_beta's columns are scaled by beta
    d_inverse = d_t * _row_of(wy.beta_column)
    d_a = -_mm_t(_t_mm(wy.inverse, d_inverse), wy.inverse)  # dA = -A^-T dA^-1 A^-T
    # A's rows are scaled by beta: dL/dbeta_i = sum_j dA_ij S_ij, as a lane row (a [1, C] matmul).
    d_beta = d_beta + _mm_t(jnp.ones((1, d_a.shape[0]), f32), d_a * wy.gram)
    d_gram = _tril(wy.beta_column * d_a, strict=True)  # S = strict_tril(K K^T)
    return dr, d_beta, _mm(d_gram, k) + _t_mm(d_gram, k)


def _row_of(column: Array) -> Array:
    """A ``[C, 1]`` column as a ``[1, C]`` row: the diagonal of a broadcast, summed along the sublanes."""
    size = column.shape[0]
    rows, cols = _iotas(size)
    return jnp.sum(jnp.where(rows == cols, jnp.broadcast_to(column, (size, size)), 0.0), axis=0, keepdims=True)


def _backward_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, delta: bool):
    refs = list(refs)
    beta_ref, u_ref = (refs.pop(0), refs.pop(0)) if delta else (None, None)
    d_out_ref, final_ref, d_final_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    dq_ref, dk_ref, dv_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    d_beta_ref = refs.pop(0) if delta else None
    d_w0_ref, d_scale_ref, w_ref, dw_ref = refs
    i = pl.program_id(1)  # this step's chunk is the i-th from the end

    @pl.when(i == 0)
    def _():
        w_ref[...] = final_ref[...]
        dw_ref[...] = d_final_ref[...]
        d_scale_ref[...] = jnp.zeros(d_scale_ref.shape, f32)

    scale = scale_ref[0]
    q, k = q_ref[...], k_ref[...]
    v = v_ref[...].astype(f32)
    d_out = d_out_ref[...].astype(f32)
    u = u_ref[...] if delta else v
    w1, dw1 = w_ref[...], dw_ref[...]
    w0 = w1 - _t_mm(k, u)  # the forward's W1 = W0 + K^T u, undone
    # Differentiated as a function of the scaled queries qs = scale q: O = qs W0 + tril(qs K^T) u.
    qs = scale * q.astype(f32)
    du = _mm(k, dw1) + _t_mm(_tril(_mm_t(qs, k)), d_out)  # through W1 and through O
    d_scores = _tril(_mm_t(d_out, u))
    d_qs = _mm_t(d_out, w0) + _mm(d_scores, k)
    dk = _t_mm(d_scores, qs) + _mm_t(u, dw1)
    dw0 = dw1 + _t_mm(qs, d_out)
    if delta:
        dr, d_beta, dk_wy = _wy_backward(k, _wy(k, beta_ref[...]), du, v - _mm(k, w0))  # dr is also dL/dV
        d_beta_ref[...] = d_beta
        dk = dk + dk_wy - _mm_t(dr, w0)
        dw0 = dw0 - _t_mm(k, dr)
        dv = dr
    else:
        dv = du
    dq_ref[...] = (scale * d_qs).astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    # dL/dscale = <q, dL/dqs>, summed over the head's chunks in its resident output block.
    d_scale_ref[...] += jnp.sum(q.astype(f32) * d_qs)
    w_ref[...] = w0
    dw_ref[...] = dw0

    @pl.when(i == pl.num_programs(1) - 1)
    def _():
        d_w0_ref[...] = dw0


class Dims(NamedTuple):
    """The static sizes of one call: heads per batch row, chunks, and the layouts of q, k and of v."""

    batch: int
    heads: int
    num_chunks: int
    chunk: int
    keys: Layout
    values: Layout

    @property
    def groups(self) -> int:
        return self.batch * self.heads


class CallPlan(NamedTuple):
    """One ``pallas_call``'s grid and, per operand, its BlockSpec and the whole array's shape and dtype.

    The kernels are launched from these, and ``dpfp_devtools.tpu_traffic`` counts the HBM bytes
    they move from the same objects."""

    grid: tuple[int, int]
    inputs: tuple[tuple[pl.BlockSpec, jax.ShapeDtypeStruct], ...]
    outputs: tuple[tuple[pl.BlockSpec, jax.ShapeDtypeStruct], ...]


_SCALAR = (pl.BlockSpec(memory_space=pltpu.SMEM), jax.ShapeDtypeStruct((1,), f32))


def _per_head(dims: Dims, rows: int, columns: int, reverse: bool = False):
    """A per-head float32 array ``[G, N, rows, columns]`` read one chunk at a time (``rows=0``: a
    ``[G, K, columns]`` block per head, the same at every chunk: a state)."""
    num_chunks = dims.num_chunks
    if rows == 0:
        return (pl.BlockSpec((None, dims.keys.width, columns), lambda g, n: (g, 0, 0)),
                jax.ShapeDtypeStruct((dims.groups, dims.keys.width, columns), f32))
    return (pl.BlockSpec((None, None, rows, columns),
                         lambda g, n: (g, num_chunks - 1 - n if reverse else n, 0, 0)),
            jax.ShapeDtypeStruct((dims.groups, num_chunks, rows, columns), f32))


def _per_step(dims: Dims, layout: Layout, dtype, reverse: bool = False):
    padded = dims.num_chunks * dims.chunk
    return (layout.block(dims.chunk, dims.num_chunks, reverse),
            jax.ShapeDtypeStruct(layout.array_shape(dims.batch, padded), dtype))


def forward_plan(dims: Dims, q_dtype, k_dtype, v_dtype, *, delta: bool, keep_writes: bool) -> CallPlan:
    """The forward kernel's operands: scale, q, k, v, (beta), W0 -> out, (u), final state; beta is a
    ``[1, C]`` lane row per head and chunk (``[G, N, 1, C]`` float32)."""
    value_dim = dims.values.width
    state = _per_head(dims, 0, value_dim)
    inputs = (_SCALAR, _per_step(dims, dims.keys, q_dtype), _per_step(dims, dims.keys, k_dtype),
              _per_step(dims, dims.values, v_dtype), *([_per_head(dims, 1, dims.chunk)] if delta else []),
              state)
    outputs = (_per_step(dims, dims.values, v_dtype), *([_per_step(dims, dims.values, f32)] if keep_writes else []),
               state)
    return CallPlan((dims.groups, dims.num_chunks), inputs, outputs)


def backward_plan(dims: Dims, q_dtype, k_dtype, v_dtype, *, delta: bool) -> CallPlan:
    """The backward kernel's operands, chunks in reverse: scale, q, k, v, (beta, u), d_out, final
    state, its gradient -> dq, dk, dv, (dbeta), dW0, dL/dscale per head."""
    value_dim = dims.values.width
    state = _per_head(dims, 0, value_dim)
    keys = functools.partial(_per_step, dims, dims.keys, reverse=True)
    values = functools.partial(_per_step, dims, dims.values, reverse=True)
    betas = _per_head(dims, 1, dims.chunk, reverse=True)
    per_head_scalar = (pl.BlockSpec((None, 1, 1), lambda g, n: (g, 0, 0)),
                       jax.ShapeDtypeStruct((dims.groups, 1, 1), f32))
    inputs = (_SCALAR, keys(q_dtype), keys(k_dtype), values(v_dtype), *([betas, values(f32)] if delta else []),
              values(v_dtype), state, state)
    outputs = (keys(q_dtype), keys(k_dtype), values(v_dtype), *([betas] if delta else []), state, per_head_scalar)
    return CallPlan((dims.groups, dims.num_chunks), inputs, outputs)


def _launch(kernel: Callable, plan: CallPlan, scratch: list, interpret: Any, name: str, *args: Array):
    return pl.pallas_call(
        kernel,
        out_shape=tuple(shape for _, shape in plan.outputs),
        grid=plan.grid,
        in_specs=[spec for spec, _ in plan.inputs],
        out_specs=tuple(spec for spec, _ in plan.outputs),
        scratch_shapes=scratch,
        # Heads are independent; chunks carry the state in scratch, so they run in order on one core.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name=name,
    )(*args)


def _state_scratch(dims: Dims) -> Any:
    return pltpu.VMEM((dims.keys.width, dims.values.width), f32)


def _forward(interpret, dims: Dims, scale, q, k, v, beta, w0, *, keep_writes: bool):
    delta = beta is not None
    keep_writes = keep_writes and delta
    plan = forward_plan(dims, q.dtype, k.dtype, v.dtype, delta=delta, keep_writes=keep_writes)
    results = _launch(functools.partial(_forward_kernel, delta=delta, keep_writes=keep_writes), plan,
                      [_state_scratch(dims)], interpret, "fast_weight_tpu_chunk_fwd",
                      scale, q, k, v, *([beta] if delta else []), w0)
    return results[0], results[1] if keep_writes else None, results[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_chunk(interpret, dims: Dims, scale, q, k, v, beta, w0):
    """Kernel layouts in, ``(scale * out in v's dtype, final_state [G, K, V] float32)`` out; ``scale``
    float32 of shape (1,). Without a gradient to take, the writes u are not stored."""
    out, _, final_state = _forward(interpret, dims, scale, q, k, v, beta, w0, keep_writes=False)
    return out, final_state


def _fused_chunk_forward_rule(interpret, dims, *primals):
    scale, q, k, v, beta, w0 = primal_values(*primals)
    out, u, final_state = _forward(interpret, dims, scale, q, k, v, beta, w0, keep_writes=True)
    return (out, final_state), (scale, q, k, v, beta, u, final_state)


def _fused_chunk_backward(interpret, dims, residuals, cotangents):
    scale, q, k, v, beta, u, final_state = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    delta = beta is not None
    plan = backward_plan(dims, q.dtype, k.dtype, v.dtype, delta=delta)
    results = _launch(functools.partial(_backward_kernel, delta=delta), plan,
                      [_state_scratch(dims), _state_scratch(dims)], interpret, "fast_weight_tpu_chunk_bwd",
                      scale, q, k, v, *([beta, u] if delta else []), d_out.astype(v.dtype), final_state,
                      d_final.astype(f32))
    dq, dk, dv = results[:3]
    d_beta = results[3] if delta else None
    d_w0, d_scale = results[-2], results[-1]
    return jnp.sum(d_scale).reshape(1), dq, dk, dv, d_beta, d_w0


_fused_chunk.defvjp(_fused_chunk_forward_rule, _fused_chunk_backward, symbolic_zeros=True)


def check_tpu_chunk_size(chunk_size: object) -> None:
    """``chunk_size`` must be a positive int multiple of ``CHUNK_MULTIPLE`` (a bfloat16 block's sublane tile).

    Example:
        >>> check_tpu_chunk_size(24)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: chunk_size must be a positive multiple of 16 for the TPU kernel ...; got chunk_size=24
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int; got {type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size < CHUNK_MULTIPLE or chunk_size % CHUNK_MULTIPLE:
        raise ValueError(f"chunk_size must be a positive multiple of {CHUNK_MULTIPLE} for the TPU kernel "
                         f"(a bfloat16 block's sublane tile); got chunk_size={chunk_size}")


def call_dims(q_shape: tuple[int, ...], value_dim: int, chunk_size: int) -> Dims:
    """The :class:`Dims` of a call with q of shape ``[B, T, H, K]``."""
    batch, length, heads, key_dim = q_shape
    return Dims(batch, heads, -(-length // chunk_size), chunk_size, key_layout(heads, key_dim),
                value_layout(heads, value_dim))


def fused_chunk_tpu(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    *,
    rule: str,
    scale: float | Array = 1.0,
    chunk_size: int = 64,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[Array, Array]:
    """The fast-weight op as fused chunked Pallas TPU kernels (Mosaic), forward and backward.

    The op's contract (shapes, dtypes, outputs, gradients) is stated by the library's oracle
    ``dpfp_jax.ops.fast_weight.naive.fast_weight_reference``; here on top of it: K <=
    ``MAX_KEY_DIM``, ``chunk_size`` a multiple of 16 (T need not be a multiple of it: the last
    chunk is zero-padded), ``final_state`` float32, and no packed documents. The arguments are
    checked here (``pallas_kernels.validation``).

    The delta rule's per-chunk triangular inverse is computed in the kernel, by matmuls
    (:func:`unit_lower_inverse`), forward and backward.

    ``interpret``: run in Pallas's TPU interpret mode on any backend (True, or a
    ``pltpu.InterpretParams``, e.g. with ``detect_races=True``); inside
    ``pltpu.force_tpu_interpret_mode()`` every call is interpreted anyway.

    Example (interpret mode runs anywhere):
        >>> import jax.numpy as jnp
        >>> x = jnp.full((1, 20, 2, 128), 0.01)
        >>> out, w = fused_chunk_tpu(x, x, x[..., :64], None, jnp.zeros((1, 2, 128, 64)), rule="sum",
        ...                          chunk_size=16, interpret=True)
        >>> out.shape, w.shape, round(float(w[0, 0, 0, 0]), 6)
        ((1, 20, 2, 64), (1, 2, 128, 64), 0.002)
    """
    check_kernel_inputs(q, k, v, beta, initial_state, rule, scale)
    check_tpu_chunk_size(chunk_size)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dims = call_dims(q.shape, value_dim, chunk_size)
    qk, kk = dims.keys.to_kernel(q, chunk_size), dims.keys.to_kernel(k, chunk_size)
    vk = dims.values.to_kernel(v, chunk_size)
    beta_rows = None
    if rule == "delta":
        # [B, T, H] -> a [1, C] lane row per head and chunk, [G, N, 1, C] float32 (a few bytes per step).
        padded = dims.num_chunks * chunk_size
        beta_rows = jnp.pad(beta.astype(f32), ((0, 0), (0, padded - length), (0, 0)))
        beta_rows = jnp.swapaxes(beta_rows, 1, 2).reshape(dims.groups, dims.num_chunks, 1, chunk_size)
    w0 = initial_state.astype(f32).reshape(dims.groups, key_dim, value_dim)
    w0 = jnp.pad(w0, ((0, 0), (0, dims.keys.width - key_dim), (0, 0)))
    out, final_state = _fused_chunk(interpret, dims, jnp.asarray(scale, f32).reshape(1), qk, kk, vk, beta_rows, w0)
    out = dims.values.from_kernel(out, batch, length, value_dim)
    final_state = final_state[:, :key_dim].reshape(batch, heads, key_dim, value_dim)
    return out, final_state
