"""Fused chunked delta/sum rule for TPU (Pallas Mosaic): the state in VMEM across chunks, forward and backward.

The chunkwise WY form (docs/math.md): with ``T_beta = A^-1 diag(beta)``,
``A = I + diag(beta) strict_tril(K K^T)`` per chunk of C steps, a chunk that starts from state W0 does

    u = T_beta (V - K W0),   O = scale (Q W0 + tril(Q K^T) u),   W1 = W0 + K^T u

(the sum rule: ``u = V``). The grid is (batch x head g, chunk n): g is "parallel" (split over a
chip's TensorCores where it has two), n "arbitrary", walked in order on one core, with the
``[K, V]`` float32 state of head g in a VMEM scratch across its chunks. Each grid step reads its
chunk's ``[C, K]`` q and k and ``[C, V]`` v (Mosaic's pipeline fetches the next chunk's blocks
while this one computes) and does the step as a handful of MXU matmuls; no per-row loop. The
outputs leave in v's dtype; when a gradient will be taken the writes u leave too (float32).

The backward walks chunks in reverse with two VMEM scratches, the state and its gradient: it
starts from the final state and rebuilds each chunk's start state as ``W0 = W1 - K^T u`` from the
stored writes, so no state per chunk is ever in HBM. Each head's whole V is one program (V is at
most a few lane tiles), so the products that sum over V (dq, dk, dT_beta) are complete in one
program and written once; TPU Pallas has no atomic adds to spread them over value blocks.

The triangular inverse comes from XLA: the caller passes ``wy_inverse`` (the library passes its
triangular solve, ``dpfp_jax.ops.fast_weight.wy.wy_inverse``), computed for every chunk at once
before the kernel, and its gradient goes back through JAX's autodiff of that function. Why
not in-kernel: it is state-independent, so nothing is gained by computing it inside the
sequential walk; a blocked in-kernel inverse needs either a per-row forward substitution on the
diagonal blocks (a loop of C vector steps per chunk, the kind of work the MXU cannot do) or a
Neumann product ``(I - L)(I + L^2)(I + L^4)...`` whose intermediate powers of ``L`` grow
combinatorially for correlated keys (non-negative DPFP features are) and cancel in float32. XLA's
TPU triangular solve is blocked and matmul-based, batched over all chunks. The price is HBM
traffic: one more read of k and a ``[C, C]`` float32 matrix per chunk written and read (at C =
64, 256 bytes per step and head, as much as a bfloat16 key of K = 128); ``docs/tpu_kernel.md``
counts it.

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
from pallas_kernels.validation import (
    check_kernel_inputs,
    check_wy_inverse,
    check_wy_inverse_result,
)

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


def _tril(x: Array) -> Array:
    """``jnp.tril(x)`` from iotas: step i of a chunk reads the writes of steps j <= i."""
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.where(rows >= cols, x, 0.0)


def _forward_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, delta: bool, keep_writes: bool):
    refs = list(refs)
    tb_ref = refs.pop(0) if delta else None
    w0_ref, out_ref = refs.pop(0), refs.pop(0)
    u_ref = refs.pop(0) if keep_writes else None
    final_ref, w_ref = refs
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        w_ref[...] = w0_ref[...]

    q, k, w = q_ref[...], k_ref[...], w_ref[...]
    v = v_ref[...].astype(f32)
    u = _mm(tb_ref[...], v - _mm(k, w)) if delta else v
    if keep_writes:
        u_ref[...] = u
    # The output is linear in q: scaling it equals scaling the queries.
    out_ref[...] = (scale_ref[0] * (_mm(q, w) + _mm(_tril(_mm_t(q, k)), u))).astype(out_ref.dtype)
    w = w + _t_mm(k, u)
    w_ref[...] = w

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        final_ref[...] = w


def _backward_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, delta: bool):
    refs = list(refs)
    tb_ref, u_ref = (refs.pop(0), refs.pop(0)) if delta else (None, None)
    d_out_ref, final_ref, d_final_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    dq_ref, dk_ref, dv_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    dtb_ref = refs.pop(0) if delta else None
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
        dr = _t_mm(tb_ref[...], du)  # dL/d(V - K W0), which is also dL/dV
        dtb_ref[...] = _mm_t(du, v - _mm(k, w0))
        dk = dk - _mm_t(dr, w0)
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


def _per_head(dims: Dims, rows: int, columns: int, reverse: bool = False, dtype=f32):
    """A per-head float32 array ``[G, N, rows, columns]`` read one chunk at a time (``rows=0``: a
    ``[G, rows, columns]`` block per head, the same at every chunk: a state)."""
    num_chunks = dims.num_chunks
    if rows == 0:
        return (pl.BlockSpec((None, dims.keys.width, columns), lambda g, n: (g, 0, 0)),
                jax.ShapeDtypeStruct((dims.groups, dims.keys.width, columns), dtype))
    return (pl.BlockSpec((None, None, rows, columns),
                         lambda g, n: (g, num_chunks - 1 - n if reverse else n, 0, 0)),
            jax.ShapeDtypeStruct((dims.groups, num_chunks, rows, columns), dtype))


def _per_step(dims: Dims, layout: Layout, dtype, reverse: bool = False):
    padded = dims.num_chunks * dims.chunk
    return (layout.block(dims.chunk, dims.num_chunks, reverse),
            jax.ShapeDtypeStruct(layout.array_shape(dims.batch, padded), dtype))


def forward_plan(dims: Dims, q_dtype, k_dtype, v_dtype, *, delta: bool, keep_writes: bool) -> CallPlan:
    """The forward kernel's operands: scale, q, k, v, (T_beta), W0 -> out, (u), final state."""
    value_dim = dims.values.width
    state = _per_head(dims, 0, value_dim)
    inputs = (_SCALAR, _per_step(dims, dims.keys, q_dtype), _per_step(dims, dims.keys, k_dtype),
              _per_step(dims, dims.values, v_dtype), *([_per_head(dims, dims.chunk, dims.chunk)] if delta else []),
              state)
    outputs = (_per_step(dims, dims.values, v_dtype), *([_per_step(dims, dims.values, f32)] if keep_writes else []),
               state)
    return CallPlan((dims.groups, dims.num_chunks), inputs, outputs)


def backward_plan(dims: Dims, q_dtype, k_dtype, v_dtype, *, delta: bool) -> CallPlan:
    """The backward kernel's operands, chunks in reverse: scale, q, k, v, (T_beta, u), d_out, final
    state, its gradient -> dq, dk, dv, (dT_beta), dW0, dL/dscale per head."""
    value_dim = dims.values.width
    state = _per_head(dims, 0, value_dim)
    keys = functools.partial(_per_step, dims, dims.keys, reverse=True)
    values = functools.partial(_per_step, dims, dims.values, reverse=True)
    square = _per_head(dims, dims.chunk, dims.chunk, reverse=True)
    per_head_scalar = (pl.BlockSpec((None, 1, 1), lambda g, n: (g, 0, 0)),
                       jax.ShapeDtypeStruct((dims.groups, 1, 1), f32))
    inputs = (_SCALAR, keys(q_dtype), keys(k_dtype), values(v_dtype), *([square, values(f32)] if delta else []),
              values(v_dtype), state, state)
    outputs = (keys(q_dtype), keys(k_dtype), values(v_dtype), *([square] if delta else []), state, per_head_scalar)
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


def _forward(interpret, dims: Dims, scale, q, k, v, tb, w0, *, keep_writes: bool):
    delta = tb is not None
    keep_writes = keep_writes and delta
    plan = forward_plan(dims, q.dtype, k.dtype, v.dtype, delta=delta, keep_writes=keep_writes)
    results = _launch(functools.partial(_forward_kernel, delta=delta, keep_writes=keep_writes), plan,
                      [_state_scratch(dims)], interpret, "fast_weight_tpu_chunk_fwd",
                      scale, q, k, v, *([tb] if delta else []), w0)
    return results[0], results[1] if keep_writes else None, results[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_chunk(interpret, dims: Dims, scale, q, k, v, tb, w0):
    """Kernel layouts in, ``(scale * out in v's dtype, final_state [G, K, V] float32)`` out; ``scale``
    float32 of shape (1,). Without a gradient to take, the writes u are not stored."""
    out, _, final_state = _forward(interpret, dims, scale, q, k, v, tb, w0, keep_writes=False)
    return out, final_state


def _fused_chunk_forward_rule(interpret, dims, *primals):
    scale, q, k, v, tb, w0 = primal_values(*primals)
    out, u, final_state = _forward(interpret, dims, scale, q, k, v, tb, w0, keep_writes=True)
    return (out, final_state), (scale, q, k, v, tb, u, final_state)


def _fused_chunk_backward(interpret, dims, residuals, cotangents):
    scale, q, k, v, tb, u, final_state = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    delta = tb is not None
    plan = backward_plan(dims, q.dtype, k.dtype, v.dtype, delta=delta)
    results = _launch(functools.partial(_backward_kernel, delta=delta), plan,
                      [_state_scratch(dims), _state_scratch(dims)], interpret, "fast_weight_tpu_chunk_bwd",
                      scale, q, k, v, *([tb, u] if delta else []), d_out.astype(v.dtype), final_state,
                      d_final.astype(f32))
    dq, dk, dv = results[:3]
    dtb = results[3] if delta else None
    d_w0, d_scale = results[-2], results[-1]
    return jnp.sum(d_scale).reshape(1), dq, dk, dv, dtb, d_w0


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
    wy_inverse: Callable[..., Array] | None = None,
) -> tuple[Array, Array]:
    """The fast-weight op as fused chunked Pallas TPU kernels (Mosaic), forward and backward.

    The op's contract (shapes, dtypes, outputs, gradients) is stated by the library's oracle
    ``dpfp_jax.ops.fast_weight.naive.fast_weight_reference``; here on top of it: K <=
    ``MAX_KEY_DIM``, ``chunk_size`` a multiple of 16 (T need not be a multiple of it: the last
    chunk is zero-padded), ``final_state`` float32, and no packed documents. The arguments are
    checked here (``pallas_kernels.validation``).

    ``wy_inverse``: for the delta rule (required; refused for the sum rule), the function
    ``(k [..., C, K], beta [..., C]) -> A^-1 [..., C, C]``, ``A = I + diag(beta) strict_tril(K K^T)``,
    every chunk at once (k zero-padded to whole lane tiles, beta float32), differentiable by JAX;
    ``dpfp_jax`` passes ``dpfp_jax.ops.fast_weight.wy.wy_inverse``.

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
    check_wy_inverse(rule, wy_inverse)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dims = call_dims(q.shape, value_dim, chunk_size)
    qk, kk = dims.keys.to_kernel(q, chunk_size), dims.keys.to_kernel(k, chunk_size)
    vk = dims.values.to_kernel(v, chunk_size)
    tb = None
    if rule == "delta":
        # A^-1 diag(beta) per chunk for every head at once: [B, H, N, C, C] -> [G, N, C, C].
        padded = dims.num_chunks * chunk_size
        chunks = kk.reshape(batch, dims.num_chunks, chunk_size, heads, dims.keys.width)
        keys = jnp.moveaxis(chunks, 3, 1)
        beta_c = jnp.moveaxis(jnp.pad(beta.astype(f32), ((0, 0), (0, padded - length), (0, 0))), 2, 1)
        beta_c = beta_c.reshape(batch, heads, dims.num_chunks, chunk_size)
        inverse = wy_inverse(keys, beta_c)
        check_wy_inverse_result(inverse, (*beta_c.shape, chunk_size))
        tb = (inverse * beta_c[..., None, :]).reshape(dims.groups, dims.num_chunks, chunk_size, chunk_size)
    w0 = initial_state.astype(f32).reshape(dims.groups, key_dim, value_dim)
    w0 = jnp.pad(w0, ((0, 0), (0, dims.keys.width - key_dim), (0, 0)))
    out, final_state = _fused_chunk(interpret, dims, jnp.asarray(scale, f32).reshape(1), qk, kk, vk, tb, w0)
    out = dims.values.from_kernel(out, batch, length, value_dim)
    final_state = final_state[:, :key_dim].reshape(batch, heads, key_dim, value_dim)
    return out, final_state
