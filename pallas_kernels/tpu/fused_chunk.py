"""Fused chunked delta/sum rule for TPU (Pallas Mosaic): the state in VMEM across chunks, forward and backward.

The chunkwise WY form (docs/math.md): with ``T_beta = A^-1 diag(beta)``,
``A = I + diag(beta) strict_tril(K K^T)`` per chunk of C steps, a chunk that starts from state W0 does

    u = T_beta (V - K W0),   O = scale (Q W0 + tril(Q K^T) u),   W1 = W0 + K^T u

(the sum rule: ``u = V``). The grid is (batch row b, block n): b is "parallel" (split over a
chip's TensorCores where it has two), n "arbitrary", walked in order on one core. A block is L
steps of all H heads (``layout.py``: the arrays are read where XLA keeps them, no copies around
the kernel); the kernel takes each head in turn and each of the block's ``L / C`` chunks in turn,
with the ``[H, V, K]`` float32 states (transposed, ``W^T``) in a VMEM scratch across the row's
blocks. Mosaic's pipeline fetches the next block while this one computes; each chunk's step is a
handful of MXU matmuls. The outputs leave in v's dtype; when a gradient will be taken the
writes u leave too (float32).

The backward walks blocks, and the chunks in them, in reverse with two VMEM scratches, the
states and their gradients: it starts from the final state and rebuilds each chunk's start
state as ``W0 = W1 - K^T u`` from the stored writes, so no state per chunk is ever in HBM. A
head's whole V is in one program (V is at most a few lane tiles), so the products that sum over
V (dq, dk, dbeta) are complete there and written once; TPU Pallas has no atomic adds to spread
them over value blocks.

The triangular inverse ``A^-1`` is computed in the kernel, per chunk, by matmuls
(``unit_lower_inverse``: Horner's rule on the diagonal blocks, then a product of
``log2(C / 8)`` factors for the rest), and recomputed in the backward, which also differentiates
it in-kernel (``dA = -A^-T dA^-1 A^-T``, then beta and ``K K^T``). Why not from XLA, as the GPU
kernel takes it: compiled for v5e at B=8, T=4096, H=8, K=128, V=64, bfloat16, taking ``T_beta``
from XLA's triangular solve (a float32 ``[C, C]`` per chunk, its gradient by JAX's autodiff of
the solve) made the forward+backward's temporary memory 1.22 GB in an earlier version of this
kernel where computing it in-kernel made it 0.55 GB: no ``[C, C]`` array per chunk is written to
HBM, forward or backward, and k is not read a second time. It costs MXU work: 12
``[C, C] x [C, C]`` float32 products per chunk at C = 64 in the forward, the same again in the
backward (which recomputes the inverse rather than store it) and 3 more for its gradient, beside
the chunk step's ``[C, K] x [K, V]``-sized ones. No per-row loop: each Horner step is one matmul that
settles one more row of every diagonal block. Forward substitution row by row would be C
dependent vector steps per chunk; a plain Neumann product ``(I - L)(I + L^2)(I + L^4)...`` over
the whole chunk would form large powers of L (growing combinatorially for correlated keys, as
non-negative DPFP features are) that cancel in float32.

Products: bfloat16 operands (q, k) go to the MXU as they are with float32 accumulation; any
product with a float32 operand (the state, the writes, the gradients) is float32 at HIGHEST
precision, so bfloat16 and float32 inputs give the reference's float32 arithmetic up to summation
order. The transposed forms (``u^T = r^T T_beta^T``, ``O^T = W0^T Q^T + u^T tril(Q K^T)^T``, ...)
are the same matmuls with other contracted axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.autodiff import cotangent_array, primal_values
from pallas_kernels.padding import pad_to
from pallas_kernels.tpu.layout import (
    LANES,
    betas_to_kernel,
    block_steps,
    keys_to_kernel,
    padded_key_dim,
    values_from_kernel,
    values_to_kernel,
)
from pallas_kernels.validation import check_int, check_interpret, check_kernel_inputs, empty_result

Array = jax.Array
f32 = jnp.float32

# A chunk is a slice of a block's step axis (the sublanes of q's and k's blocks): whole bfloat16
# sublane tiles of 16 rows.
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


class Dims(NamedTuple):
    """The static sizes of one call (layout.py says how the arrays are laid out)."""

    batch: int
    heads: int
    chunk: int  # C, steps per chunk of the WY form
    block: int  # L, steps per grid step: whole chunks, whole lane tiles (or the whole padded T)
    num_blocks: int
    key_width: int  # K padded to whole lane tiles
    value_dim: int

    @property
    def values_on_lanes(self) -> bool:
        """Whether v, the outputs and their gradients are read as the caller's ``[B, T, H, V]`` (V a
        multiple of 128, which XLA keeps row-major), not as ``[B, H, V, T]`` (layout.py)."""
        return self.value_dim % LANES == 0

    @property
    def chunks_per_block(self) -> int:
        return self.block // self.chunk

    @property
    def padded_length(self) -> int:
        return self.num_blocks * self.block


def _load_t(ref, h: int, steps, dims: Dims) -> Array:
    """Head h's chunk of a value array, transposed: ``[V, C]`` float32 (layout.py)."""
    if dims.values_on_lanes:
        return ref[steps, h, :].astype(f32).T
    return ref[h, :, steps].astype(f32)


def _store_t(ref, h: int, steps, xt: Array, dims: Dims) -> None:
    """Write ``xt`` ``[V, C]`` as head h's chunk of a value array, in the array's dtype."""
    if dims.values_on_lanes:
        ref[steps, h, :] = xt.T.astype(ref.dtype)
    else:
        ref[h, :, steps] = xt.astype(ref.dtype)


def _forward_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, dims: Dims, delta: bool, keep_writes: bool):
    refs = list(refs)
    beta_ref = refs.pop(0) if delta else None
    w0_ref, out_ref = refs.pop(0), refs.pop(0)
    u_ref = refs.pop(0) if keep_writes else None
    final_ref, w_ref = refs
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        w_ref[...] = w0_ref[...]

    scale = scale_ref[0]
    for h in range(dims.heads):
        wt = w_ref[h]  # W^T [V, K]
        for j in range(dims.chunks_per_block):
            steps = pl.ds(j * dims.chunk, dims.chunk)
            q, k = q_ref[steps, h, :], k_ref[steps, h, :]
            vt = _load_t(v_ref, h, steps, dims)
            if delta:
                # u = T_beta (V - K W0), transposed: u^T = (V^T - W0^T K^T) T_beta^T
                ut = _mm_t(vt - _mm_t(wt, k), _wy(k, beta_ref[pl.ds(h, 1), steps]).t_beta)
                if keep_writes:
                    u_ref[h, :, steps] = ut
            else:
                ut = vt
            # O^T = scale (W0^T Q^T + u^T tril(Q K^T)^T); the output is linear in q, so the scale is applied last.
            out_t = scale * (_mm_t(wt, q) + _mm_t(ut, _tril(_mm_t(q, k))))
            _store_t(out_ref, h, steps, out_t, dims)
            wt = wt + _mm(ut, k)  # W1 = W0 + K^T u
        w_ref[h] = wt

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        final_ref[...] = w_ref[...]


def _wy_backward(k: Array, wy: _WY, dut: Array, rt: Array) -> tuple[Array, Array, Array]:
    """Through ``u = T_beta r`` (r = V - K W0), given ``du^T`` and ``r^T`` ``[V, C]``: ``(dL/dr^T,
    dL/dbeta [1, C], dL/dk [C, K])``, the last two only through ``T_beta = A^-1 diag(beta)``."""
    drt = _mm(dut, wy.t_beta)  # dr = T_beta^T du
    d_t = _t_mm(dut, rt)  # du r^T
    d_beta = jnp.sum(d_t * wy.inverse, axis=0, keepdims=True)  # T_beta's columns are scaled by beta
    d_inverse = d_t * _row_of(wy.beta_column)
    d_a = -_mm_t(_t_mm(wy.inverse, d_inverse), wy.inverse)  # dA = -A^-T dA^-1 A^-T
    # A's rows are scaled by beta: dL/dbeta_i = sum_j dA_ij S_ij, as a lane row (a [1, C] matmul).
    d_beta = d_beta + _mm_t(jnp.ones((1, d_a.shape[0]), f32), d_a * wy.gram)
    d_gram = _tril(wy.beta_column * d_a, strict=True)  # S = strict_tril(K K^T)
    return drt, d_beta, _mm(d_gram, k) + _t_mm(d_gram, k)


def _row_of(column: Array) -> Array:
    """A ``[C, 1]`` column as a ``[1, C]`` row: the diagonal of a broadcast, summed along the sublanes."""
    size = column.shape[0]
    rows, cols = _iotas(size)
    return jnp.sum(jnp.where(rows == cols, jnp.broadcast_to(column, (size, size)), 0.0), axis=0, keepdims=True)


def _backward_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, dims: Dims, delta: bool):
    refs = list(refs)
    beta_ref, u_ref = (refs.pop(0), refs.pop(0)) if delta else (None, None)
    d_out_ref, final_ref, d_final_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    dq_ref, dk_ref, dv_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    d_beta_ref = refs.pop(0) if delta else None
    d_w0_ref, d_scale_ref, w_ref, dw_ref = refs
    i = pl.program_id(1)  # this step's block is the i-th from the end

    @pl.when(i == 0)
    def _():
        w_ref[...] = final_ref[...]
        dw_ref[...] = d_final_ref[...]
        d_scale_ref[...] = jnp.zeros(d_scale_ref.shape, f32)

    scale = scale_ref[0]
    d_scale = jnp.zeros((1, 1), f32)
    for h in range(dims.heads):
        wt1, dwt1 = w_ref[h], dw_ref[h]  # W1^T and (dL/dW1)^T, [V, K]
        for j in reversed(range(dims.chunks_per_block)):
            steps = pl.ds(j * dims.chunk, dims.chunk)
            q, k = q_ref[steps, h, :], k_ref[steps, h, :]
            vt, d_out_t = _load_t(v_ref, h, steps, dims), _load_t(d_out_ref, h, steps, dims)
            ut = u_ref[h, :, steps] if delta else vt
            wt0 = wt1 - _mm(ut, k)  # the forward's W1 = W0 + K^T u, undone
            # Differentiated as a function of the scaled queries qs = scale q: O = qs W0 + tril(qs K^T) u.
            qs = scale * q.astype(f32)
            dut = _mm_t(dwt1, k) + _mm(d_out_t, _tril(_mm_t(qs, k)))  # through W1 and through O
            d_scores = _tril(_t_mm(d_out_t, ut))
            d_qs = _t_mm(d_out_t, wt0) + _mm(d_scores, k)
            dk = _t_mm(d_scores, qs) + _t_mm(ut, dwt1)
            dwt0 = dwt1 + _mm(d_out_t, qs)
            if delta:
                # r^T = V^T - W0^T K^T; dL/dr is also dL/dV
                drt, d_beta, dk_wy = _wy_backward(k, _wy(k, beta_ref[pl.ds(h, 1), steps]), dut,
                                                  vt - _mm_t(wt0, k))
                d_beta_ref[pl.ds(h, 1), steps] = d_beta
                dk = dk + dk_wy - _t_mm(drt, wt0)
                dwt0 = dwt0 - _mm(drt, k)
                dvt = drt
            else:
                dvt = dut
            dq_ref[steps, h, :] = (scale * d_qs).astype(dq_ref.dtype)
            dk_ref[steps, h, :] = dk.astype(dk_ref.dtype)
            _store_t(dv_ref, h, steps, dvt, dims)
            # dL/dscale = <q, dL/dqs>, summed over the row's heads and blocks in its resident output block.
            d_scale = d_scale + jnp.sum(q.astype(f32) * d_qs)
            wt1, dwt1 = wt0, dwt0
        w_ref[h] = wt1
        dw_ref[h] = dwt1
    d_scale_ref[...] += d_scale

    @pl.when(i == pl.num_programs(1) - 1)
    def _():
        d_w0_ref[...] = dw_ref[...]


class CallPlan(NamedTuple):
    """One ``pallas_call``'s grid and, per operand, its BlockSpec and the whole array's shape and dtype.

    The kernels are launched from these, and ``dpfp_devtools.tpu_traffic`` counts the HBM bytes
    they move from the same objects."""

    grid: tuple[int, int]
    inputs: tuple[tuple[pl.BlockSpec, jax.ShapeDtypeStruct], ...]
    outputs: tuple[tuple[pl.BlockSpec, jax.ShapeDtypeStruct], ...]


_SCALAR = (pl.BlockSpec(memory_space=pltpu.SMEM), jax.ShapeDtypeStruct((1,), f32))


def _block_index(dims: Dims, reverse: bool) -> Callable[[Any], Any]:
    return (lambda n: dims.num_blocks - 1 - n) if reverse else (lambda n: n)


def _keys(dims: Dims, dtype, reverse: bool = False):
    """q, k or a gradient of them: ``[B, T', H, K']``, an ``[L, H, K']`` block of all heads."""
    at = _block_index(dims, reverse)
    return (pl.BlockSpec((None, dims.block, dims.heads, dims.key_width), lambda b, n: (b, at(n), 0, 0)),
            jax.ShapeDtypeStruct((dims.batch, dims.padded_length, dims.heads, dims.key_width), dtype))


def _steps_on_lanes(dims: Dims, dtype, reverse: bool = False):
    """A per-step value array as ``[B, H, V, T']``, an ``[H, V, L]`` block: the steps on the lanes."""
    at = _block_index(dims, reverse)
    return (pl.BlockSpec((None, dims.heads, dims.value_dim, dims.block), lambda b, n: (b, 0, 0, at(n))),
            jax.ShapeDtypeStruct((dims.batch, dims.heads, dims.value_dim, dims.padded_length), dtype))


def _writes(dims: Dims, reverse: bool = False):
    """The stored writes u (only this kernel reads them): float32, the steps on the lanes at every V."""
    return _steps_on_lanes(dims, f32, reverse)


def _values(dims: Dims, dtype, reverse: bool = False):
    """v, the outputs or a gradient of them: ``[B, T', H, V]`` in ``[L, H, V]`` blocks when V is whole
    lane tiles, else the steps on the lanes."""
    if not dims.values_on_lanes:
        return _steps_on_lanes(dims, dtype, reverse)
    at = _block_index(dims, reverse)
    return (pl.BlockSpec((None, dims.block, dims.heads, dims.value_dim), lambda b, n: (b, at(n), 0, 0)),
            jax.ShapeDtypeStruct((dims.batch, dims.padded_length, dims.heads, dims.value_dim), dtype))


def _betas(dims: Dims, reverse: bool = False):
    """beta or its gradient: ``[B, H, T']`` float32, an ``[H, L]`` block."""
    at = _block_index(dims, reverse)
    return (pl.BlockSpec((None, dims.heads, dims.block), lambda b, n: (b, 0, at(n))),
            jax.ShapeDtypeStruct((dims.batch, dims.heads, dims.padded_length), f32))


def _states(dims: Dims):
    """A state or its gradient, transposed: ``[B, H, V, K']`` float32, the same block at every step."""
    return (pl.BlockSpec((None, dims.heads, dims.value_dim, dims.key_width), lambda b, n: (b, 0, 0, 0)),
            jax.ShapeDtypeStruct((dims.batch, dims.heads, dims.value_dim, dims.key_width), f32))


def forward_plan(dims: Dims, q_dtype, k_dtype, v_dtype, *, delta: bool, keep_writes: bool) -> CallPlan:
    """The forward kernel's operands: scale, q, k, v, (beta), W0^T -> out, (u), final state^T."""
    inputs = (_SCALAR, _keys(dims, q_dtype), _keys(dims, k_dtype), _values(dims, v_dtype),
              *([_betas(dims)] if delta else []), _states(dims))
    outputs = (_values(dims, v_dtype), *([_writes(dims)] if keep_writes else []), _states(dims))
    return CallPlan((dims.batch, dims.num_blocks), inputs, outputs)


def backward_plan(dims: Dims, q_dtype, k_dtype, v_dtype, *, delta: bool) -> CallPlan:
    """The backward kernel's operands, blocks in reverse: scale, q, k, v, (beta, u), d_out, final
    state^T, its gradient -> dq, dk, dv, (dbeta), dW0^T, dL/dscale per batch row."""
    keys = functools.partial(_keys, dims, reverse=True)
    values = functools.partial(_values, dims, reverse=True)
    per_row_scalar = (pl.BlockSpec((None, 1, 1), lambda b, n: (b, 0, 0)), jax.ShapeDtypeStruct((dims.batch, 1, 1), f32))
    inputs = (_SCALAR, keys(q_dtype), keys(k_dtype), values(v_dtype),
              *([_betas(dims, reverse=True), _writes(dims, reverse=True)] if delta else []), values(v_dtype),
              _states(dims), _states(dims))
    outputs = (keys(q_dtype), keys(k_dtype), values(v_dtype), *([_betas(dims, reverse=True)] if delta else []),
               _states(dims), per_row_scalar)
    return CallPlan((dims.batch, dims.num_blocks), inputs, outputs)


# Mosaic's default scoped VMEM (16 MiB on v5e) is less than the double-buffered blocks of all
# heads take at K = 1024; ask for what they need, with room for the chunk's temporaries.
_VMEM_HEADROOM = 16 * 2**20


def vmem_bytes(plan: CallPlan, scratch_bytes: int) -> int:
    """The VMEM a call asks Mosaic for: every blocked operand twice (the pipeline's two buffers, in
    whole VMEM tiles: 8 rows of 32 bits, 16 of bfloat16, by 128 lanes), its scratch, and
    ``_VMEM_HEADROOM``.

    Example (the backward at B=8, T=4096, H=8, K=1024, V=64, bfloat16: 32 MiB for q, k, dq and dk,
    whose 8 heads take a 16-row bfloat16 tile; 12 MiB for the state blocks; 4 MiB of scratch):
        >>> dims = call_dims((8, 4096, 8, 1024), 64, 64)
        >>> plan = backward_plan(dims, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, delta=True)
        >>> round(vmem_bytes(plan, 2 * 8 * 64 * 1024 * 4) / 2**20, 1)
        65.3
    """
    total = scratch_bytes + _VMEM_HEADROOM
    for spec, shape in (*plan.inputs, *plan.outputs):
        if spec.block_shape is None:
            continue
        itemsize = jnp.dtype(shape.dtype).itemsize
        block = [1 if d is None else d for d in spec.block_shape]
        block[-1] = -(-block[-1] // LANES) * LANES
        rows = 8 * 4 // itemsize
        block[-2] = -(-block[-2] // rows) * rows
        total += 2 * math.prod(block) * itemsize
    return total


def _launch(kernel: Callable, plan: CallPlan, scratch: list, interpret: Any, name: str, *args: Array):
    scratch_bytes = sum(math.prod(s.shape) * 4 for s in scratch)
    return pl.pallas_call(
        kernel,
        out_shape=tuple(shape for _, shape in plan.outputs),
        grid=plan.grid,
        in_specs=[spec for spec, _ in plan.inputs],
        out_specs=tuple(spec for spec, _ in plan.outputs),
        scratch_shapes=scratch,
        # Batch rows are independent; blocks carry the state in scratch, so they run in order on one core.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_bytes(plan, scratch_bytes)),
        interpret=interpret,
        name=name,
    )(*args)


def _state_scratch(dims: Dims) -> Any:
    return pltpu.VMEM((dims.heads, dims.value_dim, dims.key_width), f32)


def _forward(interpret, dims: Dims, scale, q, k, v, beta, w0, *, keep_writes: bool):
    delta = beta is not None
    keep_writes = keep_writes and delta
    plan = forward_plan(dims, q.dtype, k.dtype, v.dtype, delta=delta, keep_writes=keep_writes)
    kernel = functools.partial(_forward_kernel, dims=dims, delta=delta, keep_writes=keep_writes)
    results = _launch(kernel, plan, [_state_scratch(dims)], interpret, "fast_weight_tpu_chunk_fwd",
                      scale, q, k, v, *([beta] if delta else []), w0)
    return results[0], results[1] if keep_writes else None, results[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_chunk(interpret, dims: Dims, scale, q, k, v, beta, w0):
    """Kernel layouts in, ``(scale * out^T in v's dtype, final_state^T [B, H, V, K'] float32)`` out;
    ``scale`` float32 of shape (1,). Without a gradient to take, the writes u are not stored."""
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
    kernel = functools.partial(_backward_kernel, dims=dims, delta=delta)
    results = _launch(kernel, plan, [_state_scratch(dims), _state_scratch(dims)], interpret,
                      "fast_weight_tpu_chunk_bwd", scale, q, k, v, *([beta, u] if delta else []),
                      d_out.astype(v.dtype), final_state, d_final.astype(f32))
    dq, dk, dv = results[:3]
    d_beta = results[3] if delta else None
    d_w0, d_scale = results[-2], results[-1]
    return jnp.sum(d_scale).reshape(1), dq, dk, dv, d_beta, d_w0


_fused_chunk.defvjp(_fused_chunk_forward_rule, _fused_chunk_backward, symbolic_zeros=True)


def check_tpu_chunk_size(chunk_size: object) -> int:
    """``chunk_size`` must be 16, 32 or 64 (whole bfloat16 sublane tiles that divide a 128-lane
    block) or a multiple of 128 (layout.py: the value arrays' blocks are whole lane tiles of steps).

    Example:
        >>> check_tpu_chunk_size(48)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: chunk_size must be 16, 32, 64 or a multiple of 128 for the TPU kernel ...; got chunk_size=48
    """
    chunk_size = check_int("chunk_size", chunk_size)
    if chunk_size < CHUNK_MULTIPLE or (LANES % chunk_size if chunk_size < LANES else chunk_size % LANES):
        raise ValueError(f"chunk_size must be 16, 32, 64 or a multiple of 128 for the TPU kernel (whole "
                         f"bfloat16 sublane tiles, and whole chunks in a block of 128-lane tiles of steps); "
                         f"got chunk_size={chunk_size}")
    return chunk_size


def call_dims(q_shape: tuple[int, ...], value_dim: int, chunk_size: int) -> Dims:
    """The :class:`Dims` of a call with q of shape ``[B, T, H, K]``.

    Example:
        >>> dims = call_dims((8, 4096, 8, 200), 64, 64)
        >>> dims.block, dims.chunks_per_block, dims.num_blocks, dims.key_width
        (128, 2, 32, 256)
    """
    batch, length, heads, key_dim = q_shape
    block = block_steps(chunk_size, length)
    return Dims(batch, heads, chunk_size, block, -(-length // block), padded_key_dim(key_dim), value_dim)


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
    ``MAX_KEY_DIM``, ``chunk_size`` 16, 32, 64 or a multiple of 128 (T need not be a multiple of
    it: the last block is zero-padded), ``final_state`` float32, and no packed documents. The arguments are
    checked here (``pallas_kernels.validation``).

    The delta rule's per-chunk triangular inverse is computed in the kernel, by matmuls
    (``unit_lower_inverse``), forward and backward.

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
    chunk_size = check_tpu_chunk_size(chunk_size)
    check_interpret(interpret, pltpu.InterpretParams)
    if (empty := empty_result(v, initial_state, q)) is not None:
        return empty
    if interpret is True:
        interpret = pltpu.InterpretParams()
    batch, length, heads, key_dim = q.shape
    dims = call_dims(q.shape, v.shape[-1], chunk_size)
    qk, kk = (keys_to_kernel(x, dims.padded_length, dims.key_width) for x in (q, k))
    beta_k = betas_to_kernel(beta, dims.padded_length) if rule == "delta" else None
    # The state in the kernel's orientation, W^T [B, H, V, K'] (a few MB: the copies are small).
    w0 = jnp.swapaxes(pad_to(initial_state.astype(f32), 2, dims.key_width), 2, 3)
    out, final_state = _fused_chunk(interpret, dims, jnp.asarray(scale, f32).reshape(1), qk, kk,
                                    values_to_kernel(v, dims.padded_length, dims.values_on_lanes), beta_k, w0)
    return values_from_kernel(out, length, dims.values_on_lanes), jnp.swapaxes(final_state, 2, 3)[:, :, :key_dim]
