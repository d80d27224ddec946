"""Fused chunked delta/sum rule for TPU (Pallas Mosaic): the state in VMEM across chunks, forward and backward.

The chunkwise WY form (docs/math.md): with ``T_beta = A^-1 diag(beta)``,
``A = I + diag(beta) strict_tril(K K^T)`` per chunk of C steps, a chunk that starts from state W0 does

    u = T_beta (V - K W0),   O = scale (Q W0 + tril(Q K^T) u),   W1 = W0 + K^T u

(the sum rule: ``u = V``). The grid is (program p, block n): a program is a batch row, or a group
of a row's heads (:class:`Dims`, :func:`spread_heads`: when a chip has more TensorCores than
batch rows); p is "parallel" (split over a chip's TensorCores where it has two), n "arbitrary",
walked in order on one core. A block is L steps (``layout.py``: the arrays are read where XLA
keeps them, no copies around the kernel); the kernel loops over the program's heads
(``lax.fori_loop``: Mosaic compiles one chunk step per chunk of a block, not one per head and
chunk) and takes each of the block's ``L / C`` chunks in turn, with the ``[heads, V, K]``
float32 states (transposed, ``W^T``) in a VMEM scratch across the program's blocks. Mosaic's
pipeline fetches the next block while this one computes; each chunk's step is a handful of MXU
matmuls. The outputs leave in v's dtype; when a gradient will be taken the writes u leave too,
in :func:`writes_dtype` (bfloat16 when v is, else float32). XLA is told the call's cost
(:func:`cost_estimate`).

The backward walks blocks, and the chunks in them, in reverse with two VMEM scratches, the
states and their gradients: it starts from the final state and rebuilds each chunk's start
state as ``W0 = W1 - K^T u`` from the stored writes, so no state per chunk is ever in HBM. So
that this subtraction undoes the forward's update exactly up to float32 round-off, the forward
rounds each chunk's u to the stored dtype and uses that rounded u for its outputs and its state,
with or without a gradient to take (docs/tpu_kernel.md, "The stored writes u in bfloat16"). A
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
precision, so float32 inputs give the reference's float32 arithmetic up to summation order, and
bfloat16 ones too but for the delta rule's writes u, rounded to bfloat16 once per chunk (above).
The transposed forms (``u^T = r^T T_beta^T``, ``O^T = W0^T Q^T + u^T tril(Q K^T)^T``, ...) are
the same matmuls with other contracted axes.

Gated (``log_decay``, one ``log alpha`` per step and head, laid out as beta): each chunk's decays
are computed in the kernel from its ``[1, C]`` row (:func:`_decays`: exps of differences of
cumulative log sums, as the library's chunk form takes them, docs/math.md "Gated"), and enter the
chunk step as factors (``exp(g_i)`` on what reads W0, ``D_ij`` on the scores and the Gram matrix,
``exp(g_C - g_i)`` on the writes that reach W1, ``exp(g_C)`` on the carried state). The backward
cannot rebuild ``W0`` from ``W1`` without dividing by ``exp(g_C)``, so the training forward also
writes the state entering each block (``[V, K']`` float32 per head and block) and the backward
walks each chunk's start state forward from it (:func:`_gated_chunk_starts`); the gradient of
``log alpha`` is assembled per chunk from those of the factors (:func:`_log_decay_gradient`).
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
from pallas_kernels.decays import LOG_DECAY_FLOOR, split_log_decay
from pallas_kernels.padding import pad_to
from pallas_kernels.tpu.feature_map import KernelFeatures, check_kernel_features, features_t, features_t_vjp
from pallas_kernels.tpu.layout import (
    LANES,
    betas_to_kernel,
    block_steps,
    keys_to_kernel,
    padded_key_dim,
    values_from_kernel,
    values_to_kernel,
)
from pallas_kernels.validation import (
    check_int,
    check_interpret,
    check_kernel_inputs,
    check_log_decay,
    check_positive_int,
    empty_result,
)

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


class _Decays(NamedTuple):
    """A gated chunk's decays from ``g_i``, its cumulative log decay (docs/math.md, "Gated"): each an
    exp of a difference of such sums (never positive), as rows ``[1, C]`` (lanes) and columns ``[C, 1]``."""

    within: Array  # [C, C] D_ij = exp(g_i - g_j) for j <= i, 1 above the diagonal (masked off by every user)
    start_row: Array  # [1, C] exp(g_i): what of the chunk's entering state step i sees
    start_column: Array  # [C, 1]
    end_row: Array  # [1, C] exp(g_C - g_i): what of step i's write reaches the chunk's end
    end_column: Array  # [C, 1]
    total: Array  # [1, 1] exp(g_C): what of the entering state reaches the chunk's end
    kept: Array  # [1, C] log alpha above LOG_DECAY_FLOOR, where it has a gradient


def _column_of(row: Array) -> Array:
    """A ``[1, C]`` row as a ``[C, 1]`` column: the diagonal of a broadcast, summed along the lanes."""
    size = row.shape[1]
    rows, cols = _iotas(size)
    return jnp.sum(jnp.where(rows == cols, jnp.broadcast_to(row, (size, size)), 0.0), axis=1, keepdims=True)


def _cumulative_column(row: Array) -> Array:
    """The running sum of a ``[1, C]`` row, ``sum_{s <= i} x_s``, as a ``[C, 1]`` column (a masked
    broadcast summed along the lanes: no matmul, so no bfloat16 pass rounds it)."""
    size = row.shape[1]
    rows, cols = _iotas(size)
    return jnp.sum(jnp.where(cols <= rows, jnp.broadcast_to(row, (size, size)), 0.0), axis=1, keepdims=True)


def _decays(log_decay_row: Array) -> _Decays:
    """:class:`_Decays` of a chunk's ``log alpha`` ``[1, C]`` float32, as ``chunk_decays`` of the library
    computes them: ``-inf`` clamped to ``LOG_DECAY_FLOOR``, each value split into a multiple of 1/16
    and a small rest (``split_log_decay``), so the differences of the cumulative sums are exact up
    to the rest's round-off (a chunk of large decays does not swamp a later small one)."""
    size = log_decay_row.shape[1]
    rows, cols = _iotas(size)
    hi, lo = split_log_decay(log_decay_row)
    hi_column, lo_column = _cumulative_column(hi), _cumulative_column(lo)
    hi_row, lo_row = _row_of(hi_column), _row_of(lo_column)
    hi_last, lo_last = jnp.sum(hi, axis=1, keepdims=True), jnp.sum(lo, axis=1, keepdims=True)
    # exp only of sums of log decays (<= 0); 0 above the diagonal before the exp, so never an inf.
    within = jnp.exp(jnp.where(rows >= cols, (hi_column - hi_row) + (lo_column - lo_row), 0.0))
    end_row = jnp.exp((hi_last - hi_row) + (lo_last - lo_row))
    end_column = jnp.exp((hi_last - hi_column) + (lo_last - lo_column))
    return _Decays(within, jnp.exp(hi_row + lo_row), jnp.exp(hi_column + lo_column), end_row, end_column,
                   jnp.exp(hi_last + lo_last), log_decay_row >= LOG_DECAY_FLOOR)


def _by(x: Array, decays: _Decays | None, factor: str) -> Array:
    """``x`` times the decay factor named ``factor`` (a :class:`_Decays` field); x itself ungated."""
    return x if decays is None else x * getattr(decays, factor)


def _log_decay_gradient(decays: _Decays, d_within: Array, d_start: Array, d_end: Array, d_total: Array) -> Array:
    """``dL/dlog alpha`` ``[1, C]`` from the gradients of the chunk's factors (d_start, d_end: columns).

    Each factor is the exp of a difference of the cumulative sums g: its gradient reaches ``g_i``
    as factor times gradient, plus for the later index and minus for the earlier, and ``g_i``'s
    reaches every ``log alpha_s`` with ``s <= i`` (a reverse running sum). The diagonal of
    ``d_within`` is left out (``exp(g_i - g_i)`` is constant); clamped steps get none.
    """
    size = d_within.shape[0]
    rows, cols = _iotas(size)
    h = jnp.where(rows > cols, d_within * decays.within, 0.0)
    dg = (jnp.sum(h, axis=1, keepdims=True) - _column_of(jnp.sum(h, axis=0, keepdims=True))
          + d_start * decays.start_column - d_end * decays.end_column)
    # g_C also enters every end factor and the total.
    last = jnp.sum(d_end * decays.end_column, axis=0, keepdims=True) + d_total * decays.total
    dg = dg + jnp.where(lax.broadcasted_iota(jnp.int32, (size, 1), 0) == size - 1, last, 0.0)
    gradient = jnp.sum(jnp.where(rows >= cols, jnp.broadcast_to(dg, (size, size)), 0.0), axis=0, keepdims=True)
    return jnp.where(decays.kept, gradient, 0.0)


class _WY(NamedTuple):
    """A chunk's WY pieces: ``A = I + diag(beta) S``, ``S = strict_tril(K K^T)``; ``T_beta = A^-1 diag(beta)``.
    Gated, ``S = strict_tril(K K^T) * D`` (the decays between steps, :class:`_Decays`) and ``raw_gram``
    is ``strict_tril(K K^T)``."""

    gram: Array  # S
    beta_column: Array  # [C, 1]
    inverse: Array  # A^-1
    t_beta: Array
    raw_gram: Array | None = None


def _wy(k: Array, beta_row: Array, decays: _Decays | None = None) -> _WY:
    """The WY pieces of a chunk from its keys ``[C, K]`` and write strengths ``[1, C]`` (a lane row),
    gated with ``decays``."""
    beta_column = _column_of(beta_row)  # beta as a column: it scales A's rows
    raw_gram = _tril(_mm_t(k, k), strict=True)
    gram = _by(raw_gram, decays, "within")
    inverse = unit_lower_inverse(beta_column * gram)
    return _WY(gram, beta_column, inverse, inverse * beta_row, None if decays is None else raw_gram)


class Dims(NamedTuple):
    """The static sizes of one call (layout.py says how the arrays are laid out) and how its heads
    are spread over programs.

    The grid is ``(batch * head_groups, num_blocks)``: program p takes batch row ``p // G`` and
    head group ``p % G`` (``heads / G`` heads, which it walks in a loop). ``keys_head_major``: q,
    k and their gradients are read from head-major ``[B, H, T', K']`` copies, each program's block
    only its own heads' steps (a chip whose VMEM cannot hold blocks of all heads: v4 at K >= 384);
    otherwise they are read where XLA keeps them, ``[B, T', H, K']``, in blocks whose head axis
    is the group's heads when that is whole sublane tiles (a multiple of 8) and all H heads else.
    """

    batch: int
    heads: int
    chunk: int  # C, steps per chunk of the WY form
    block: int  # L, steps per grid step: whole chunks, whole lane tiles (or the whole padded T)
    num_blocks: int
    key_width: int  # K padded to whole lane tiles
    value_dim: int
    head_groups: int = 1  # G: programs per batch row, each a contiguous group of heads
    keys_head_major: bool = False
    # The feature map the kernel computes from q, k read at width d (feature_map.py); None: q, k are phi(q), phi(k).
    features: KernelFeatures | None = None

    @property
    def raw_keys(self) -> Dims:
        """With :attr:`features`: the dims of the raw q, k and their gradients, which are read and
        written as value arrays of width d (``layout.py``: the steps on the lanes below 128, the
        caller's ``[B, T, H, d]`` at 128)."""
        return self._replace(value_dim=self.features.dim)

    @property
    def keys_per_group(self) -> bool:
        """Whether dq and dk are blocks of all heads on the sublanes, written as one copy per head
        group when :attr:`split_outputs` (:func:`_per_group`)."""
        return self.raw_keys.values_on_lanes if self.features is not None else not self.keys_head_major

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

    @property
    def group_heads(self) -> int:
        """The heads one program walks."""
        return self.heads // self.head_groups

    @property
    def split_outputs(self) -> bool:
        """Whether each head group writes its own copy of the outputs whose blocks hold all heads
        (dq and dk unless head-major, dbeta; with V a multiple of 128 the outputs and dv): a block is written back
        whole, so two programs writing their heads' rows of one block would overwrite each other.
        Each copy is zero but for its group's heads' rows, and they are summed after the call."""
        return self.head_groups > 1 and self.sublane_heads != self.group_heads

    @property
    def sublane_heads(self) -> int:
        """The head axis of a block of an array whose heads are its sublanes (``[B, T', H, D]`` keys
        and 128-wide values, ``[B, H, T']`` betas): the group's heads when they are whole sublane
        tiles or all of H, else all H heads (a block's second-to-last dim must be one or the other)."""
        return self.group_heads if self.group_heads % 8 == 0 or self.head_groups == 1 else self.heads


def _sublane_head(h, group, dims: Dims):
    """Where head h of the program's group sits in a block of :attr:`Dims.sublane_heads` heads."""
    return h if dims.sublane_heads == dims.group_heads else group * dims.group_heads + h


def _head_mask(shape: tuple[int, ...], axis: int, index) -> Array:
    return lax.broadcasted_iota(jnp.int32, shape, axis) == index


def _select_head(x: Array, axis: int, index) -> Array:
    """``x``'s row ``index`` along ``axis`` (the heads on the sublanes), index traced.

    Mosaic loads and stores at a sublane offset only where it can prove it tile-aligned (a head's
    row of a ``[L, H, D]`` block is not), and one branch per head (a switch) multiplied the
    kernels' loads and stores by H (its forward+backward compiled 2.2x slower at K = 1024). So the
    chunk's rows of all the block's heads are loaded, which reads the same VMEM tiles a one-head
    load reads, and the head's row is kept by a select and a sum over that axis (exact: one term
    is non-zero)."""
    wide = x.astype(f32)
    picked = jnp.sum(jnp.where(_head_mask(wide.shape, axis, index), wide, 0.0), axis=axis)
    return picked.astype(x.dtype)


def _load_head_rows(ref, h, group, steps, dims: Dims) -> Array:
    """Head h's chunk ``[C, D]`` of a ``[L, heads, D]`` block (heads on the sublanes)."""
    return _select_head(ref[steps, :, :], 1, _sublane_head(h, group, dims))


def _store_head_rows(ref, h, group, steps, x: Array, dims: Dims) -> None:
    """Write ``x`` ``[C, D]`` as head h's chunk of a ``[L, heads, D]`` block, the other heads' rows
    kept (read and written back)."""
    old = ref[steps, :, :]
    mask = _head_mask(old.shape, 1, _sublane_head(h, group, dims))
    ref[steps, :, :] = jnp.where(mask, x.astype(old.dtype)[:, None, :], old)


def _load_keys(ref, h, group, steps, dims: Dims) -> Array:
    """Head h's chunk of q, k or a gradient of them: ``[C, K']`` in the array's dtype."""
    if dims.keys_head_major:
        return ref[h, steps, :]
    return _load_head_rows(ref, h, group, steps, dims)


def _store_keys(ref, h, group, steps, x: Array, dims: Dims) -> None:
    if dims.keys_head_major:
        ref[h, steps, :] = x.astype(ref.dtype)
    else:
        _store_head_rows(ref, h, group, steps, x, dims)


def _load_mapped_keys(ref, h, group, steps, dims: Dims) -> Array:
    """Head h's chunk of phi(q) or phi(k), ``[C, K']`` in the array's dtype: read as it is, or with
    :attr:`Dims.features` read at width d and mapped here (in float32, then rounded to q's or k's
    dtype as the map applied before the kernel would leave it)."""
    if dims.features is None:
        return _load_keys(ref, h, group, steps, dims)
    phi_t = features_t(_load_t(ref, h, group, steps, dims.raw_keys), dims.features)
    if dims.key_width > phi_t.shape[0]:  # zero features up to whole lane tiles, as the padding of K
        phi_t = jnp.concatenate([phi_t, jnp.zeros((dims.key_width - phi_t.shape[0], phi_t.shape[1]), f32)], axis=0)
    return phi_t.T.astype(ref.dtype)


def _store_mapped_keys_grad(ref, x_ref, h, group, steps, d_phi: Array, dims: Dims) -> None:
    """Write dq or dk from ``d_phi`` ``[C, K']``, the gradient of phi(q) or phi(k): as it is, or
    with :attr:`Dims.features` through the map's VJP at width d (the raw chunk re-read from
    ``x_ref``, q's or k's block)."""
    if dims.features is None:
        _store_keys(ref, h, group, steps, d_phi, dims)
        return
    xt = _load_t(x_ref, h, group, steps, dims.raw_keys)
    dxt = features_t_vjp(xt, d_phi.T[:dims.features.width], dims.features)
    _store_t(ref, h, group, steps, dxt, dims.raw_keys)


def _load_t(ref, h, group, steps, dims: Dims) -> Array:
    """Head h's chunk of a value array, transposed: ``[V, C]`` float32 (layout.py)."""
    if dims.values_on_lanes:
        return _load_head_rows(ref, h, group, steps, dims).astype(f32).T
    return ref[h, :, steps].astype(f32)


def _store_t(ref, h, group, steps, xt: Array, dims: Dims) -> None:
    """Write ``xt`` ``[V, C]`` as head h's chunk of a value array, in the array's dtype."""
    if dims.values_on_lanes:
        _store_head_rows(ref, h, group, steps, xt.T, dims)
    else:
        ref[h, :, steps] = xt.astype(ref.dtype)


def _load_beta(ref, h, group, steps, dims: Dims) -> Array:
    """Head h's chunk of write strengths (or their gradient) from a ``[heads, L]`` block: a ``[1, C]`` lane row."""
    return _select_head(ref[:, steps], 0, _sublane_head(h, group, dims))[None, :]


def _store_beta(ref, h, group, steps, row: Array, dims: Dims) -> None:
    old = ref[:, steps]
    ref[:, steps] = jnp.where(_head_mask(old.shape, 0, _sublane_head(h, group, dims)), row, old)


def _forward_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, dims: Dims, delta: bool, keep_writes: bool,
                    gated: bool = False, keep_states: bool = False, writes: Any = f32):
    refs = list(refs)
    beta_ref = refs.pop(0) if delta else None
    gate_ref = refs.pop(0) if gated else None  # log alpha, laid out as beta
    w0_ref, out_ref = refs.pop(0), refs.pop(0)
    u_ref = refs.pop(0) if keep_writes else None
    states_ref = refs.pop(0) if keep_states else None  # gated: each block's start state, for the backward
    final_ref, w_ref = refs
    n, group = pl.program_id(1), pl.program_id(0) % dims.head_groups

    @pl.when(n == 0)
    def _():
        w_ref[...] = w0_ref[...]

    scale = scale_ref[0]
    if dims.split_outputs and dims.values_on_lanes:
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    # A loop over the group's heads (one compiled chunk step per chunk of a block, not one per
    # head and chunk): the chunks of a block stay unrolled, since their offsets on the value
    # arrays' lanes must be static.
    def head(h, carry):
        wt = w_ref[h]  # W^T [V, K]
        if keep_states:
            states_ref[h] = wt
        for j in range(dims.chunks_per_block):
            steps = pl.ds(j * dims.chunk, dims.chunk)
            q, k = _load_mapped_keys(q_ref, h, group, steps, dims), _load_mapped_keys(k_ref, h, group, steps, dims)
            vt = _load_t(v_ref, h, group, steps, dims)
            # Gated (docs/math.md): W0 reaches step i as exp(g_i) W0, step j's write as D_ij, W1 as exp(g_C).
            decays = _decays(_load_beta(gate_ref, h, group, steps, dims)) if gated else None
            if delta:
                # u = T_beta (V - K W0), transposed: u^T = (V^T - W0^T K^T) T_beta^T
                ut = _mm_t(vt - _by(_mm_t(wt, k), decays, "start_row"),
                           _wy(k, _load_beta(beta_ref, h, group, steps, dims), decays).t_beta)
                # Rounded as stored (writes_dtype), and only that u used below: the backward undoes
                # this chunk's update with the stored u.
                ut = ut.astype(writes).astype(f32)
                if keep_writes:
                    u_ref[h, :, steps] = ut.astype(u_ref.dtype)
            else:
                ut = vt
            # O^T = scale (W0^T Q^T + u^T tril(Q K^T)^T); the output is linear in q, so the scale is applied last.
            out_t = scale * (_by(_mm_t(wt, q), decays, "start_row")
                             + _mm_t(ut, _by(_tril(_mm_t(q, k)), decays, "within")))
            _store_t(out_ref, h, group, steps, out_t, dims)
            wt = _by(wt, decays, "total") + _mm(_by(ut, decays, "end_row"), k)  # W1 = W0 + K^T u
        w_ref[h] = wt
        return carry

    lax.fori_loop(0, dims.group_heads, head, 0)

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        final_ref[...] = w_ref[...]


def _wy_backward(k: Array, wy: _WY, dut: Array, rt: Array,
                 decays: _Decays | None = None) -> tuple[Array, Array, Array, Array | None]:
    """Through ``u = T_beta r`` (r = V - K W0), given ``du^T`` and ``r^T`` ``[V, C]``: ``(dL/dr^T,
    dL/dbeta [1, C], dL/dk [C, K], dL/dD [C, C] gated else None)``, the last three only through
    ``T_beta = A^-1 diag(beta)``."""
    drt = _mm(dut, wy.t_beta)  # dr = T_beta^T du
    d_t = _t_mm(dut, rt)  # du r^T
    d_beta = jnp.sum(d_t * wy.inverse, axis=0, keepdims=True)  # T_beta's columns are scaled by beta
    d_inverse = d_t * _row_of(wy.beta_column)
    d_a = -_mm_t(_t_mm(wy.inverse, d_inverse), wy.inverse)  # dA = -A^-T dA^-1 A^-T
    # A's rows are scaled by beta: dL/dbeta_i = sum_j dA_ij S_ij, as a lane row (a [1, C] matmul).
    d_beta = d_beta + _mm_t(jnp.ones((1, d_a.shape[0]), f32), d_a * wy.gram)
    d_gram = _tril(wy.beta_column * d_a, strict=True)  # S = strict_tril(K K^T)
    # Gated, S = strict_tril(K K^T) * D.
    d_within = None if decays is None else d_gram * wy.raw_gram
    d_gram = _by(d_gram, decays, "within")
    return drt, d_beta, _mm(d_gram, k) + _t_mm(d_gram, k), d_within


def _gated_chunk_starts(k_ref, v_ref, u_ref, gate_ref, states_ref, h, group, dims: Dims):
    """Head h's start state ``W0^T`` of each chunk of the block and the chunk's :class:`_Decays`:
    from the block's start state (``states_ref``, the forward's) by the forward's update
    ``W1 = exp(g_C) W0 + (diag(E) K)^T u`` (u the stored writes; the sum rule's are v)."""
    wt, starts, decays = states_ref[h], [], []
    for j in range(dims.chunks_per_block):
        steps = pl.ds(j * dims.chunk, dims.chunk)
        starts.append(wt)
        decays.append(_decays(_load_beta(gate_ref, h, group, steps, dims)))
        if j + 1 < dims.chunks_per_block:
            ut = u_ref[h, :, steps].astype(f32) if u_ref is not None else _load_t(v_ref, h, group, steps, dims)
            wt = decays[j].total * wt + _mm(ut * decays[j].end_row, _load_mapped_keys(k_ref, h, group, steps, dims))
    return starts, decays


def _row_of(column: Array) -> Array:
    """A ``[C, 1]`` column as a ``[1, C]`` row: the diagonal of a broadcast, summed along the sublanes."""
    size = column.shape[0]
    rows, cols = _iotas(size)
    return jnp.sum(jnp.where(rows == cols, jnp.broadcast_to(column, (size, size)), 0.0), axis=0, keepdims=True)


def _backward_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, dims: Dims, delta: bool, gated: bool = False):
    refs = list(refs)
    beta_ref, u_ref = (refs.pop(0), refs.pop(0)) if delta else (None, None)
    gate_ref, states_ref = (refs.pop(0), refs.pop(0)) if gated else (None, None)
    d_out_ref, final_ref, d_final_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    dq_ref, dk_ref, dv_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    d_beta_ref = refs.pop(0) if delta else None
    d_gate_ref = refs.pop(0) if gated else None
    d_w0_ref, d_scale_ref, w_ref, dw_ref = refs
    i = pl.program_id(1)  # this step's block is the i-th from the end
    group = pl.program_id(0) % dims.head_groups

    @pl.when(i == 0)
    def _():
        w_ref[...] = final_ref[...]
        dw_ref[...] = d_final_ref[...]
        d_scale_ref[...] = jnp.zeros(d_scale_ref.shape, f32)

    scale = scale_ref[0]
    if dims.split_outputs:
        split = ([dq_ref, dk_ref] if dims.keys_per_group else []) + ([dv_ref] if dims.values_on_lanes else [])
        for ref in split + ([d_beta_ref] if delta else []) + ([d_gate_ref] if gated else []):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    def head(h, d_scale):  # as in the forward: the heads in a loop, a block's chunks unrolled
        wt1, dwt1 = w_ref[h], dw_ref[h]  # W1^T and (dL/dW1)^T, [V, K]
        # Gated, W0 = (W1 - K^T u) / exp(g_C) would divide by the decay: each chunk's start state
        # comes from the block's, stored by the forward, walked forward over the block's chunks.
        starts, chunk_decays = _gated_chunk_starts(k_ref, v_ref, u_ref, gate_ref, states_ref, h, group, dims) \
            if gated else (None, None)
        for j in reversed(range(dims.chunks_per_block)):
            steps = pl.ds(j * dims.chunk, dims.chunk)
            q, k = _load_mapped_keys(q_ref, h, group, steps, dims), _load_mapped_keys(k_ref, h, group, steps, dims)
            vt, d_out_t = _load_t(v_ref, h, group, steps, dims), _load_t(d_out_ref, h, group, steps, dims)
            ut = u_ref[h, :, steps].astype(f32) if delta else vt
            decays = chunk_decays[j] if gated else None
            wt0 = starts[j] if gated else wt1 - _mm(ut, k)  # the forward's W1 = W0 + K^T u, undone
            # Differentiated as a function of the scaled queries qs = scale q: O = qs W0 + tril(qs K^T) u
            # (gated: O = diag(exp(g)) qs W0 + (tril(qs K^T) * D) u, W1 = exp(g_C) W0 + (diag(E) K)^T u).
            qs = scale * q.astype(f32)
            raw_scores = _tril(_mm_t(qs, k))
            # through W1 and through O
            dut = _by(_mm_t(dwt1, k), decays, "end_row") + _mm(d_out_t, _by(raw_scores, decays, "within"))
            d_scores = _tril(_t_mm(d_out_t, ut))
            d_qs_w0, dk_w1 = _t_mm(d_out_t, wt0), _t_mm(ut, dwt1)
            d_qs = _by(d_qs_w0, decays, "start_column") + _mm(_by(d_scores, decays, "within"), k)
            dk = _t_mm(_by(d_scores, decays, "within"), qs) + _by(dk_w1, decays, "end_column")
            dwt0 = _by(dwt1, decays, "total") + _mm(_by(d_out_t, decays, "start_row"), qs)
            if gated:  # the decay factors' gradients: D from the scores, exp(g) from Q W0, E from K^T u, exp(g_C)
                d_within, d_start = d_scores * raw_scores, jnp.sum(d_qs_w0 * qs, axis=1, keepdims=True)
                d_end, d_total = jnp.sum(dk_w1 * k.astype(f32), axis=1, keepdims=True), jnp.sum(
                    dwt1 * wt0, keepdims=True).reshape(1, 1)
            if delta:
                # r^T = V^T - W0^T K^T (gated: K's rows times exp(g)); dL/dr is also dL/dV
                kwt = _mm_t(wt0, k)
                drt, d_beta, dk_wy, d_within_wy = _wy_backward(
                    k, _wy(k, _load_beta(beta_ref, h, group, steps, dims), decays), dut,
                    vt - _by(kwt, decays, "start_row"), decays)
                _store_beta(d_beta_ref, h, group, steps, d_beta, dims)
                dk = dk + dk_wy - _by(_t_mm(drt, wt0), decays, "start_column")
                dwt0 = dwt0 - _mm(_by(drt, decays, "start_row"), k)
                if gated:
                    d_within = d_within + d_within_wy
                    d_start = d_start - _column_of(jnp.sum(drt * kwt, axis=0, keepdims=True))
                dvt = drt
            else:
                dvt = dut
            if gated:
                _store_beta(d_gate_ref, h, group, steps, _log_decay_gradient(decays, d_within, d_start, d_end,
                                                                             d_total), dims)
            _store_mapped_keys_grad(dq_ref, q_ref, h, group, steps, scale * d_qs, dims)
            _store_mapped_keys_grad(dk_ref, k_ref, h, group, steps, dk, dims)
            _store_t(dv_ref, h, group, steps, dvt, dims)
            # dL/dscale = <q, dL/dqs>, summed over the program's heads and blocks in its resident output block.
            d_scale = d_scale + jnp.sum(q.astype(f32) * d_qs)
            wt1, dwt1 = wt0, dwt0
        if not gated:
            w_ref[h] = wt1
        dw_ref[h] = dwt1
        return d_scale

    d_scale_ref[...] += lax.fori_loop(0, dims.group_heads, head, jnp.zeros((1, 1), f32))

    @pl.when(i == pl.num_programs(1) - 1)
    def _():
        d_w0_ref[...] = dw_ref[...]


class CallPlan(NamedTuple):
    """One ``pallas_call``'s grid, per operand its BlockSpec and the whole array's shape and dtype,
    and the MXU work of its chunk steps.

    The kernels are launched from these, and ``dpfp_devtools.tpu_traffic`` counts the HBM bytes
    they move from the same objects."""

    grid: tuple[int, int]
    inputs: tuple[tuple[pl.BlockSpec, jax.ShapeDtypeStruct], ...]
    outputs: tuple[tuple[pl.BlockSpec, jax.ShapeDtypeStruct], ...]
    flops: int = 0
    transcendentals: int = 0  # gated: the decays' exps


_SCALAR = (pl.BlockSpec(memory_space=pltpu.SMEM), jax.ShapeDtypeStruct((1,), f32))


def _program(dims: Dims) -> Callable[[Any], tuple[Any, Any]]:
    """Grid index p -> (batch row, head group)."""
    return lambda p: (p // dims.head_groups, p % dims.head_groups)


def _block_index(dims: Dims, reverse: bool) -> Callable[[Any], Any]:
    return (lambda n: dims.num_blocks - 1 - n) if reverse else (lambda n: n)


def _sublane_head_block(dims: Dims, group):
    """The block index along the head axis of a block of :attr:`Dims.sublane_heads` heads."""
    return group if dims.sublane_heads == dims.group_heads and dims.head_groups > 1 else 0


def _per_head_rows(dims: Dims, dtype, width: int, reverse: bool):
    """A per-step array ``[B, T', H, D]`` with the heads on the sublanes: ``[L, heads, D]`` blocks."""
    at, program = _block_index(dims, reverse), _program(dims)

    def index(p, n):
        b, g = program(p)
        return b, at(n), _sublane_head_block(dims, g), 0

    return (pl.BlockSpec((None, dims.block, dims.sublane_heads, width), index),
            jax.ShapeDtypeStruct((dims.batch, dims.padded_length, dims.heads, width), dtype))


def _keys(dims: Dims, dtype, reverse: bool = False):
    """q, k or a gradient of them: ``[B, T', H, K']`` in ``[L, heads, K']`` blocks, or head-major
    ``[B, H, T', K']`` in ``[group heads, L, K']`` blocks (:class:`Dims`)."""
    if not dims.keys_head_major:
        return _per_head_rows(dims, dtype, dims.key_width, reverse)
    at, program = _block_index(dims, reverse), _program(dims)
    return (pl.BlockSpec((None, dims.group_heads, dims.block, dims.key_width),
                         lambda p, n: (program(p)[0], program(p)[1], at(n), 0)),
            jax.ShapeDtypeStruct((dims.batch, dims.heads, dims.padded_length, dims.key_width), dtype))


def _query_keys(dims: Dims, dtype, reverse: bool = False):
    """q, k or a gradient of them as the kernel reads or writes them: K'-wide (:func:`_keys`), or
    with :attr:`Dims.features` the raw ones, width d, as value arrays of that width."""
    return _keys(dims, dtype, reverse) if dims.features is None else _values(dims.raw_keys, dtype, reverse)


def _steps_on_lanes(dims: Dims, dtype, reverse: bool = False):
    """A per-step value array as ``[B, H, V, T']``, a ``[group heads, V, L]`` block: the steps on the lanes."""
    at, program = _block_index(dims, reverse), _program(dims)
    return (pl.BlockSpec((None, dims.group_heads, dims.value_dim, dims.block),
                         lambda p, n: (program(p)[0], program(p)[1], 0, at(n))),
            jax.ShapeDtypeStruct((dims.batch, dims.heads, dims.value_dim, dims.padded_length), dtype))


def writes_dtype(v_dtype) -> jnp.dtype:
    """The dtype of the delta rule's writes u as the training forward stores them for the backward:
    bfloat16 when v is (so u moves half the bytes; the forward then uses that rounded u itself,
    docs/tpu_kernel.md, "The stored writes u in bfloat16"), else float32.

    Example:
        >>> writes_dtype(jnp.bfloat16), writes_dtype(jnp.float32), writes_dtype(jnp.float16)
        (dtype(bfloat16), dtype('float32'), dtype('float32'))
    """
    return jnp.dtype(jnp.bfloat16 if jnp.dtype(v_dtype) == jnp.bfloat16 else f32)


def _writes(dims: Dims, v_dtype, reverse: bool = False):
    """The stored writes u (only this kernel reads them): :func:`writes_dtype`, the steps on the lanes at every V."""
    return _steps_on_lanes(dims, writes_dtype(v_dtype), reverse)


def _values(dims: Dims, dtype, reverse: bool = False):
    """v, the outputs or a gradient of them: ``[B, T', H, V]`` in ``[L, heads, V]`` blocks when V is
    whole lane tiles, else the steps on the lanes."""
    if dims.values_on_lanes:
        return _per_head_rows(dims, dtype, dims.value_dim, reverse)
    return _steps_on_lanes(dims, dtype, reverse)


def _betas(dims: Dims, reverse: bool = False):
    """beta or its gradient: ``[B, H, T']`` float32, an ``[heads, L]`` block."""
    at, program = _block_index(dims, reverse), _program(dims)
    return (pl.BlockSpec((None, dims.sublane_heads, dims.block),
                         lambda p, n: (program(p)[0], _sublane_head_block(dims, program(p)[1]), at(n))),
            jax.ShapeDtypeStruct((dims.batch, dims.heads, dims.padded_length), f32))


def _block_states(dims: Dims, reverse: bool = False):
    """Gated: the state entering each block, transposed, ``[B, num_blocks, H, V, K']`` float32, a
    ``[group heads, V, K']`` block per grid step (the backward's chunk start states are walked from it)."""
    at, program = _block_index(dims, reverse), _program(dims)
    return (pl.BlockSpec((None, None, dims.group_heads, dims.value_dim, dims.key_width),
                         lambda p, n: (program(p)[0], at(n), program(p)[1], 0, 0)),
            jax.ShapeDtypeStruct((dims.batch, dims.num_blocks, dims.heads, dims.value_dim, dims.key_width), f32))


def _states(dims: Dims):
    """A state or its gradient, transposed: ``[B, H, V, K']`` float32, the same block at every step,
    so one buffer (``pl.Buffered(1)``): it is copied once per program, and a second buffer would
    only take VMEM."""
    program = _program(dims)
    return (pl.BlockSpec((None, dims.group_heads, dims.value_dim, dims.key_width),
                         lambda p, n: (program(p)[0], program(p)[1], 0, 0), pipeline_mode=pl.Buffered(1)),
            jax.ShapeDtypeStruct((dims.batch, dims.heads, dims.value_dim, dims.key_width), f32))


def inverse_products(size: int) -> int:
    """How many ``[C, C]`` matmuls :func:`unit_lower_inverse` does for C = ``size``.

    Example:
        >>> inverse_products(64), inverse_products(16), inverse_products(8)
        (12, 8, 8)
    """
    block = min(DIAGONAL_BLOCK, size)
    products, power = block - 2 + 1, 2
    while power < -(-size // block):
        products, power = products + 2, power * 2
    return products + 1


def chunk_flops(dims: Dims, *, delta: bool, backward: bool) -> int:
    """The MXU flops (2 per multiply-add) of one head's chunk step, forward or backward, as the
    kernels above do it (the delta rule's triangular inverse included; the float32 products count
    once, whatever passes the MXU makes of them)."""
    c, k, v = dims.chunk, dims.key_width, dims.value_dim
    ck, cv, cc, vk = 2 * c * k, 2 * c * v, 2 * c * c, 2 * v * k
    inverse = inverse_products(c) * cc * c
    if not backward:
        # W0^T Q^T, Q K^T, u^T tril(.)^T, K^T u; delta: W0^T K^T, K K^T, the inverse, r^T T_beta^T
        flops = c * vk + c * ck + c * cv + c * vk
        return flops + (c * vk + c * ck + inverse + c * cv if delta else 0)
    # K^T u undone, dL/du (2), the scores' gradient, dq (2), dk (2), dW0
    flops = c * vk + c * vk + (c * ck + c * cv) + c * cv + (c * vk + c * ck) + (c * ck + c * vk) + c * vk
    if delta:
        # K K^T and the inverse again, r, dr, du r^T, dA (2), dbeta's row sum, dS K and dS^T K, dk and dW0 through r
        flops += c * ck + inverse + c * vk + c * cv + c * cv + 2 * cc * c + cc + 2 * c * ck + c * vk + c * vk
    return flops


def gate_extras(dims: Dims, *, backward: bool) -> tuple[int, int]:
    """What a gate changes in one head's block of chunks: ``(flops, transcendentals)``. The decays
    are exps (``C^2 + 4 C + 1`` per chunk: D, exp(g) and E as rows and columns, exp(g_C)); the
    backward takes each chunk's start state from the block's by the forward's update (one
    ``[V, C] x [C, K]`` product per chunk but the last) instead of undoing every chunk's (one per
    chunk), so it does one product fewer per block."""
    c = dims.chunk
    exps = dims.chunks_per_block * (c * c + 4 * c + 1)
    return (-2 * c * dims.value_dim * dims.key_width if backward else 0), exps


def _plan(dims: Dims, inputs: tuple, outputs: tuple, *, delta: bool, backward: bool, gated: bool = False) -> CallPlan:
    chunks = dims.batch * dims.heads * dims.padded_length // dims.chunk
    flops, exps = gate_extras(dims, backward=backward) if gated else (0, 0)
    head_blocks = dims.batch * dims.heads * dims.num_blocks
    return CallPlan((dims.batch * dims.head_groups, dims.num_blocks), inputs, outputs,
                    chunks * chunk_flops(dims, delta=delta, backward=backward) + head_blocks * flops,
                    head_blocks * exps)


def _per_group(dims: Dims, operand):
    """An output whose blocks hold all heads, as one copy per head group when
    :attr:`Dims.split_outputs`: ``[G, ...]``, program p writing copy ``p % G``."""
    spec, shape = operand
    if not dims.split_outputs:
        return operand
    groups = dims.head_groups
    return (pl.BlockSpec((None, *spec.block_shape), lambda p, n: (p % groups, *spec.index_map(p, n))),
            jax.ShapeDtypeStruct((groups, *shape.shape), shape.dtype))


def forward_plan(dims: Dims, q_dtype, k_dtype, v_dtype, *, delta: bool, keep_writes: bool, gated: bool = False,
                 keep_states: bool = False) -> CallPlan:
    """The forward kernel's operands: scale, q, k, v, (beta), (log alpha), W0^T -> out, (u), (each
    block's start state^T), final state^T."""
    inputs = (_SCALAR, _query_keys(dims, q_dtype), _query_keys(dims, k_dtype), _values(dims, v_dtype),
              *([_betas(dims)] if delta else []), *([_betas(dims)] if gated else []), _states(dims))
    out = _per_group(dims, _values(dims, v_dtype)) if dims.values_on_lanes else _values(dims, v_dtype)
    outputs = (out, *([_writes(dims, v_dtype)] if keep_writes else []), *([_block_states(dims)] if keep_states else []),
               _states(dims))
    return _plan(dims, inputs, outputs, delta=delta, backward=False, gated=gated)


def backward_plan(dims: Dims, q_dtype, k_dtype, v_dtype, *, delta: bool, gated: bool = False) -> CallPlan:
    """The backward kernel's operands, blocks in reverse: scale, q, k, v, (beta, u), (log alpha, each
    block's start state^T), d_out, final state^T, its gradient -> dq, dk, dv, (dbeta), (dlog alpha),
    dW0^T, dL/dscale per program (summed after)."""
    keys = functools.partial(_query_keys, dims, reverse=True)
    values = functools.partial(_values, dims, reverse=True)
    programs = dims.batch * dims.head_groups
    per_program_scalar = (pl.BlockSpec((None, 1, 1), lambda p, n: (p, 0, 0)),
                          jax.ShapeDtypeStruct((programs, 1, 1), f32))
    inputs = (_SCALAR, keys(q_dtype), keys(k_dtype), values(v_dtype),
              *([_betas(dims, reverse=True), _writes(dims, v_dtype, reverse=True)] if delta else []),
              *([_betas(dims, reverse=True), _block_states(dims, reverse=True)] if gated else []), values(v_dtype),
              _states(dims), _states(dims))
    dv = _per_group(dims, values(v_dtype)) if dims.values_on_lanes else values(v_dtype)
    key_grads = (_per_group(dims, keys(q_dtype)), _per_group(dims, keys(k_dtype))) if dims.keys_per_group else (
        keys(q_dtype), keys(k_dtype))
    outputs = (*key_grads, dv,
               *([_per_group(dims, _betas(dims, reverse=True))] if delta else []),
               *([_per_group(dims, _betas(dims, reverse=True))] if gated else []), _states(dims), per_program_scalar)
    return _plan(dims, inputs, outputs, delta=delta, backward=True, gated=gated)


def _varies_with_block(spec: pl.BlockSpec) -> bool:
    """Whether an operand's block index changes with the block n (else it is one block per program)."""
    return spec.index_map(0, 0) != spec.index_map(0, 1)


def hbm_bytes(plan: CallPlan) -> int:
    """The HBM bytes one call moves, as the cost estimate gives them to XLA: every program copies
    each per-step operand's block once per block n (Mosaic's pipeline copies a block when its index
    changes, and every such index changes with n) and each per-program block once; the scalar in
    SMEM is read once. Blocks count their own bytes. (``dpfp_devtools.tpu_traffic`` counts the same
    by walking the grid; the tests hold the two together.)

    Example (one row, two heads, 256 steps in blocks of 128, K = 128, V = 64, the sum rule's
    forward in float32: q, k, v and the outputs once, the states once each, the 4-byte scale):
        >>> dims = call_dims((1, 256, 2, 128), 64, 64)
        >>> plan = forward_plan(dims, f32, f32, f32, delta=False, keep_writes=False)
        >>> hbm_bytes(plan) == 256 * 2 * (128 + 128 + 64 + 64) * 4 + 2 * (2 * 64 * 128 * 4) + 4
        True
    """
    programs, blocks = plan.grid
    total = 0
    for spec, shape in (*plan.inputs, *plan.outputs):
        if spec.block_shape is None:
            total += math.prod(shape.shape) * jnp.dtype(shape.dtype).itemsize
            continue
        block = math.prod(1 if d is None else d for d in spec.block_shape) * jnp.dtype(shape.dtype).itemsize
        if blocks > 1 and _varies_with_block(spec):
            total += programs * blocks * block
        else:  # one block per program, or per batch row where the programs of a row share it
            total += len({spec.index_map(p, 0) for p in range(programs)}) * block
    return total


def cost_estimate(plan: CallPlan) -> pl.CostEstimate:
    """What XLA is told a call costs: the chunk steps' MXU flops, the gate's exps, :func:`hbm_bytes`."""
    return pl.CostEstimate(flops=plan.flops, transcendentals=plan.transcendentals, bytes_accessed=hbm_bytes(plan))


# Mosaic's default scoped VMEM (16 MiB on v5e) is less than the double-buffered blocks of all
# heads take at K = 1024; ask for what they need, with room for the chunk's temporaries, up to
# what the chip has.
_VMEM_HEADROOM = 16 * 2**20


def vmem_block_bytes(plan: CallPlan, scratch_bytes: int) -> int:
    """The VMEM a call's blocks and scratch take: every blocked operand in as many buffers as its
    pipeline mode says (two by default), in whole VMEM tiles (8 rows of 32 bits, 16 of bfloat16, by
    128 lanes).

    Example (the backward at B=8, T=4096, H=8, K=1024, V=64, bfloat16: 16 MiB for q, k, dq and dk,
    6 MiB for the single-buffered state blocks, 4 MiB of scratch, 1.0 MiB for the value arrays and u):
        >>> dims = call_dims((8, 4096, 8, 1024), 64, 64)
        >>> plan = backward_plan(dims, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, delta=True)
        >>> round(vmem_block_bytes(plan, 2 * 8 * 64 * 1024 * 4) / 2**20, 1)
        27.0
    """
    total = scratch_bytes
    for spec, shape in (*plan.inputs, *plan.outputs):
        if spec.block_shape is None:
            continue
        itemsize = jnp.dtype(shape.dtype).itemsize
        block = [1 if d is None else d for d in spec.block_shape]
        block[-1] = -(-block[-1] // LANES) * LANES
        # A tile's rows: 8 of 32 bits, 16 of bfloat16 (two to a sublane), or 8 for a bfloat16 block
        # of fewer rows (Mosaic's (8, 128)(2, 1) tiling, which it takes for the 8 heads of a key block).
        rows = 8 * 4 // itemsize if block[-2] >= 8 * 4 // itemsize else 8
        block[-2] = -(-block[-2] // rows) * rows
        buffers = spec.pipeline_mode.buffer_count if spec.pipeline_mode is not None else 2
        total += buffers * math.prod(block) * itemsize
    return total


def _state_scratch(dims: Dims) -> Any:
    return pltpu.VMEM((dims.group_heads, dims.value_dim, dims.key_width), f32)


def _scratch(dims: Dims, backward: bool) -> list:
    return [_state_scratch(dims)] * (2 if backward else 1)


def _scratch_bytes(dims: Dims, backward: bool) -> int:
    return (2 if backward else 1) * dims.group_heads * dims.value_dim * dims.key_width * 4


def _launch(kernel: Callable, plan: CallPlan, dims: Dims, backward: bool, vmem_capacity: int | None, interpret: Any,
            name: str, *args: Array):
    limit = vmem_block_bytes(plan, _scratch_bytes(dims, backward)) + _VMEM_HEADROOM
    return pl.pallas_call(
        kernel,
        out_shape=tuple(shape for _, shape in plan.outputs),
        grid=plan.grid,
        in_specs=[spec for spec, _ in plan.inputs],
        out_specs=tuple(spec for spec, _ in plan.outputs),
        scratch_shapes=_scratch(dims, backward),
        # Programs (batch rows, head groups) are independent, split over a chip's TensorCores where
        # it has two; blocks carry the state in scratch, so they run in order on one core.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=limit if vmem_capacity is None else min(limit, vmem_capacity)),
        cost_estimate=cost_estimate(plan),
        interpret=interpret,
        name=name,
    )(*args)


class _Target(NamedTuple):
    """What the kernels are compiled for: the chip's VMEM per TensorCore (None: unknown, e.g. when
    interpreted) and its TensorCores per device."""

    vmem_capacity: int | None
    cores: int


def _forward(interpret, dims: Dims, target: _Target, scale, q, k, v, beta, w0, log_decay=None, *,
             keep_writes: bool):
    """``(out, u, block start states, final state)``; u None unless kept (delta rule), the states
    None unless gated and kept (for a backward)."""
    delta, gated = beta is not None, log_decay is not None
    keep_states = keep_writes and gated
    keep_writes = keep_writes and delta
    plan = forward_plan(dims, q.dtype, k.dtype, v.dtype, delta=delta, keep_writes=keep_writes, gated=gated,
                        keep_states=keep_states)
    kernel = functools.partial(_forward_kernel, dims=dims, delta=delta, keep_writes=keep_writes, gated=gated,
                               keep_states=keep_states, writes=writes_dtype(v.dtype))
    results = _launch(kernel, plan, dims, False, target.vmem_capacity, interpret, "fast_weight_tpu_chunk_fwd",
                      scale, q, k, v, *([beta] if delta else []), *([log_decay] if gated else []), w0)
    out = _sum_groups(dims, results[0]) if dims.values_on_lanes else results[0]
    return (out, results[1] if keep_writes else None, results[-2] if keep_states else None, results[-1])


def _sum_groups(dims: Dims, x: Array) -> Array:
    """An output of :func:`_per_group`'s, the head groups' copies added (each zero but for its own heads)."""
    return jnp.sum(x, axis=0, dtype=x.dtype) if dims.split_outputs else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_chunk(interpret, dims: Dims, target: _Target, scale, q, k, v, beta, w0, log_decay=None):
    """Kernel layouts in, ``(scale * out^T in v's dtype, final_state^T [B, H, V, K'] float32)`` out;
    ``scale`` float32 of shape (1,); ``log_decay`` (gated) laid out as beta. Without a gradient to
    take, the writes u (and gated, the blocks' start states) are not stored."""
    out, _, _, final_state = _forward(interpret, dims, target, scale, q, k, v, beta, w0, log_decay, keep_writes=False)
    return out, final_state


def _fused_chunk_forward_rule(interpret, dims, target, *primals):
    scale, q, k, v, beta, w0, log_decay = primal_values(*primals)
    out, u, states, final_state = _forward(interpret, dims, target, scale, q, k, v, beta, w0, log_decay,
                                           keep_writes=True)
    return (out, final_state), (scale, q, k, v, beta, u, final_state, log_decay, states)


def _fused_chunk_backward(interpret, dims, target, residuals, cotangents):
    scale, q, k, v, beta, u, final_state, log_decay, states = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    delta, gated = beta is not None, log_decay is not None
    plan = backward_plan(dims, q.dtype, k.dtype, v.dtype, delta=delta, gated=gated)
    kernel = functools.partial(_backward_kernel, dims=dims, delta=delta, gated=gated)
    results = _launch(kernel, plan, dims, True, target.vmem_capacity, interpret, "fast_weight_tpu_chunk_bwd",
                      scale, q, k, v, *([beta, u] if delta else []), *([log_decay, states] if gated else []),
                      d_out.astype(v.dtype), final_state, d_final.astype(f32))
    dq, dk = (_sum_groups(dims, results[0]), _sum_groups(dims, results[1])) if dims.keys_per_group else results[:2]
    dv = _sum_groups(dims, results[2]) if dims.values_on_lanes else results[2]
    d_beta = _sum_groups(dims, results[3]) if delta else None
    d_log_decay = _sum_groups(dims, results[-3]) if gated else None
    d_w0, d_scale = results[-2], results[-1]
    return jnp.sum(d_scale).reshape(1), dq, dk, dv, d_beta, d_w0, d_log_decay


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


def call_dims(q_shape: tuple[int, ...], value_dim: int, chunk_size: int, head_groups: int = 1,
              keys_head_major: bool = False, features: KernelFeatures | None = None) -> Dims:
    """The :class:`Dims` of a call with q of shape ``[B, T, H, K]`` (with ``features``, ``[B, T, H,
    d]`` and K the map's width).

    Example:
        >>> dims = call_dims((8, 4096, 8, 200), 64, 64)
        >>> dims.block, dims.chunks_per_block, dims.num_blocks, dims.key_width
        (128, 2, 32, 256)
    """
    batch, length, heads, key_dim = q_shape
    key_dim = key_dim if features is None else features.width
    if heads % head_groups:
        raise ValueError(f"head_groups must divide the number of heads {heads}; got head_groups={head_groups}")
    block = block_steps(chunk_size, length)
    return Dims(batch, heads, chunk_size, block, -(-length // block), padded_key_dim(key_dim), value_dim,
                head_groups, keys_head_major, features)


def _target(interpret: Any) -> _Target:
    """The chip being compiled for (``pltpu.get_tpu_info``: the abstract mesh's device in an
    ahead-of-time compile, else the default device); unknown when interpreted."""
    if interpret:
        return _Target(None, 1)
    try:
        info = pltpu.get_tpu_info()
    except (ValueError, RuntimeError):  # not a TPU: nothing to fit
        return _Target(None, 1)
    return _Target(info.vmem_capacity_bytes, info.num_cores)


def _vmem_need(dims: Dims, dtype, gated: bool = False) -> int:
    """A bound on the backward's VMEM (the larger kernel): its blocks and scratch, and room for a
    chunk step's temporaries (a dozen ``[V + C, K']`` float32 arrays: the states, their gradients
    and the chunk's float32 pieces; with the heads on the sublanes, four ``[C, heads, K']`` float32
    ones: the chunk's rows of all heads of q, k, dq and dk, of which one head's is taken; gated,
    every chunk's start state ``[V, K']`` and decays ``[C, C]``)."""
    plan = backward_plan(dims, dtype, dtype, dtype, delta=True, gated=gated)
    temporaries = 12 * (dims.value_dim + dims.chunk) * dims.key_width * 4
    if gated:
        temporaries += dims.chunks_per_block * (dims.value_dim * dims.key_width + dims.chunk * dims.chunk) * 4
    if not dims.keys_head_major:
        temporaries += 4 * dims.chunk * dims.sublane_heads * dims.key_width * 4
    return vmem_block_bytes(plan, _scratch_bytes(dims, True)) + temporaries


def spread_heads(dims: Dims, dtype, vmem_capacity: int | None, cores: int, gated: bool = False) -> Dims:
    """``dims`` with its heads spread over programs for a chip with ``vmem_capacity`` bytes of VMEM
    per TensorCore (None: no limit) and ``cores`` TensorCores per device (``gated``: for a call with
    ``log_decay``, whose backward holds more).

    Fewer batch rows than cores: the heads are split into ``cores`` groups, so that every core has
    a program (the grid's "parallel" axis is batch rows times head groups). Blocks of all heads
    that do not fit the VMEM (v4's 16 MiB at K >= 384): q, k and their gradients are read from
    head-major copies, with as few heads per program as it takes.

    Example (one row on a two-core chip; K = 1024 on a 16 MiB one):
        >>> spread_heads(call_dims((1, 4096, 8, 128), 64, 64), jnp.bfloat16, None, 2).head_groups
        2
        >>> dims = spread_heads(call_dims((8, 4096, 8, 1024), 64, 64), jnp.bfloat16, 16 * 2**20, 2)
        >>> dims.keys_head_major, dims.head_groups
        (True, 4)
    """
    groups = cores if dims.batch < cores and dims.heads % cores == 0 else dims.head_groups
    dims = dims._replace(head_groups=groups)
    if vmem_capacity is None or _vmem_need(dims, dtype, gated) <= vmem_capacity:
        return dims
    candidates = [dims._replace(head_groups=g, keys_head_major=dims.features is None)
                  for g in range(groups, dims.heads + 1)
                  if dims.heads % g == 0 and g % groups == 0]
    return next((c for c in candidates if _vmem_need(c, dtype, gated) <= vmem_capacity), candidates[-1])


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
    head_groups: int | None = None,
    keys_head_major: bool | None = None,
    log_decay: Array | None = None,
    features: KernelFeatures | None = None,
) -> tuple[Array, Array]:
    """The fast-weight op as fused chunked Pallas TPU kernels (Mosaic), forward and backward.

    The op's contract (shapes, dtypes, outputs, gradients) is stated by the library's oracle
    ``dpfp_jax.ops.fast_weight.naive.fast_weight_reference``; here on top of it: K <=
    ``MAX_KEY_DIM``, ``chunk_size`` 16, 32, 64 or a multiple of 128 (T need not be a multiple of
    it: the last block is zero-padded), ``final_state`` float32, and no packed documents. The arguments are
    checked here (``pallas_kernels.validation``).

    The delta rule's per-chunk triangular inverse is computed in the kernel, by matmuls
    (``unit_lower_inverse``), forward and backward.

    ``log_decay`` ``[B, T, H]`` (gated, the oracle's argument: ``W_{t-1}`` decays by
    ``exp(log_decay_t) <= 1`` before step t's write; ``-inf`` forgets it all, which is also how a
    caller starts a new document at step t): the decays within a chunk are exps of differences of
    cumulative log sums, computed in the kernel (docs/math.md, "Gated"), and gradients flow to it.
    The forward then keeps, beside the writes, the state entering each block of steps (``[V, K']``
    float32 per head and block of L steps), from which the backward walks each chunk's start state:
    rebuilding it backwards would divide by the decay.

    ``interpret``: run in Pallas's TPU interpret mode on any backend (True, or a
    ``pltpu.InterpretParams``, e.g. with ``detect_races=True``); inside
    ``pltpu.force_tpu_interpret_mode()`` every call is interpreted anyway.

    ``head_groups`` and ``keys_head_major`` (``Dims``) are chosen for the chip being
    compiled for (``spread_heads``: head groups when there are fewer batch rows than
    TensorCores, head-major keys when blocks of all heads do not fit its VMEM); given, they are
    used as they are (the tests interpret every layout on a CPU).

    ``features`` (a ``KernelFeatures``, ``feature_map.py``): q and k are the raw ``[B, T, H, d]``
    (d = ``features.dim``) and the kernels compute ``phi(q)``, ``phi(k)`` per chunk in VMEM,
    forward and backward (the map's VJP in-kernel: dq, dk come back at width d); K is
    ``features.width`` (``initial_state`` and the final state). The result is the op on
    ``phi(q), phi(k)``. The raw q, k are read as value arrays of width d (``layout.py``), never
    head-major.

    Example (interpret mode runs anywhere):
        >>> import jax.numpy as jnp
        >>> x = jnp.full((1, 20, 2, 128), 0.01)
        >>> out, w = fused_chunk_tpu(x, x, x[..., :64], None, jnp.zeros((1, 2, 128, 64)), rule="sum",
        ...                          chunk_size=16, interpret=True)
        >>> out.shape, w.shape, round(float(w[0, 0, 0, 0]), 6)
        ((1, 20, 2, 64), (1, 2, 128, 64), 0.002)
        >>> from pallas_kernels.tpu.feature_map import KernelFeatures
        >>> phi = KernelFeatures("dpfp", dim=32, nu=2, normalization="sum")  # K = 128 from q, k of width 32
        >>> out, w = jax.eval_shape(lambda x: fused_chunk_tpu(  # shapes only: tracing, nothing run
        ...     x[..., :32], x[..., :32], x[..., :64], None, jnp.zeros((1, 2, 128, 64)), rule="sum", chunk_size=16,
        ...     interpret=True, features=phi), x)
        >>> out.shape, w.shape
        ((1, 20, 2, 64), (1, 2, 128, 64))
    """
    if features is not None and not isinstance(features, KernelFeatures):
        raise TypeError(f"features must be a KernelFeatures or None; got {type(features).__name__}")
    check_kernel_inputs(q, k, v, beta, initial_state, rule, scale,
                        state_key_dim=None if features is None else features.width)
    check_log_decay(log_decay, q)
    if features is not None:
        check_kernel_features(features, q.shape[-1])
        if keys_head_major:
            raise ValueError("keys_head_major=True reads K-wide keys head-major; with features q and k are read at "
                             "width d as value arrays (layout.py): leave keys_head_major None or False")
    chunk_size = check_tpu_chunk_size(chunk_size)
    check_interpret(interpret, pltpu.InterpretParams)
    if (empty := empty_result(v, initial_state, q)) is not None:
        return empty
    if interpret is True:
        interpret = pltpu.InterpretParams()
    length, key_dim = q.shape[1], q.shape[3] if features is None else features.width
    target = _target(interpret)
    dims = spread_heads(call_dims(q.shape, v.shape[-1], chunk_size, features=features), q.dtype,
                        target.vmem_capacity, target.cores, log_decay is not None)
    if head_groups is not None or keys_head_major is not None:
        head_groups = dims.head_groups if head_groups is None else check_positive_int("head_groups", head_groups)
        dims = call_dims(q.shape, v.shape[-1], chunk_size, head_groups,
                         dims.keys_head_major if keys_head_major is None else bool(keys_head_major), features)
    if features is None:
        qk, kk = (keys_to_kernel(x, dims.padded_length, dims.key_width, dims.keys_head_major) for x in (q, k))
    else:
        qk, kk = (values_to_kernel(x, dims.padded_length, dims.raw_keys.values_on_lanes) for x in (q, k))
    beta_k = betas_to_kernel(beta, dims.padded_length) if rule == "delta" else None
    # The state in the kernel's orientation, W^T [B, H, V, K'] (a few MB: the copies are small).
    w0 = jnp.swapaxes(pad_to(initial_state.astype(f32), 2, dims.key_width), 2, 3)
    # Gated: padded steps get log alpha = 0 (alpha = 1) with zero keys and values, inert as ungated.
    log_decay_k = None if log_decay is None else betas_to_kernel(log_decay, dims.padded_length)
    out, final_state = _fused_chunk(interpret, dims, target, jnp.asarray(scale, f32).reshape(1), qk, kk,
                                    values_to_kernel(v, dims.padded_length, dims.values_on_lanes), beta_k, w0,
                                    log_decay_k)
    return values_from_kernel(out, length, dims.values_on_lanes), jnp.swapaxes(final_state, 2, 3)[:, :, :key_dim]
