"""The fast-weight recurrence in chunkwise-parallel form: a scan over T / C chunks of matmuls.

Within a chunk of C steps starting from state W0, the writes ``u_t = beta_t (v_t - W_{t-1}^T k_t)``
of the delta rule satisfy ``U = diag(beta) (V - K W0 - strict_tril(K K^T) U)``, i.e.

    A U = diag(beta) (V - K W0),   A = I + diag(beta) strict_tril(K K^T)

with A unit lower-triangular (Yang et al. 2024, the WY representation). Its inverse, computed
for all chunks at once since it does not depend on W0, gives ``U_tilde = A^-1 diag(beta) V`` and
``Y = A^-1 diag(beta) K``; then, sequentially per chunk,

    U = U_tilde - Y W0,   O = Q W0 + tril(Q K^T) U,   W1 = W0 + K^T U.

The sum rule is the special case U = V. Every step is a [C, K] x [K, V] or [C, C] matmul, which
is what accelerators are built for.

Backward memory: a ``custom_vjp`` keeps per-step vectors only (the writes U, ``U_tilde``, ``Y``,
``Q - S Y``: O(T * (K + V))), the per-chunk scores and inverses (O(T * C)) and the final state,
and walks the chunks in reverse rebuilding ``W0 = W1 - K^T U``. So no state per chunk is kept:
only the one being walked (O(K * V) per head), as in the scan's backward but with T / C
subtractions instead of T, hence less round-off. Autodiff through the batched triangular solve
was slower on CPU and kept every chunk's state.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax

from dpfp_jax.ops.fast_weight.common import HIGHEST, accumulation_dtype, batch_head_axes_of
from dpfp_jax.ops.fast_weight.wy import to_chunks_nbhc, tril, wy_inverse, wy_writes
from pallas_kernels.autodiff import cotangent_array, primal_values

Array = jax.Array

DEFAULT_CHUNK_SIZE = 64


def _mm(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, precision=HIGHEST)


def forward_recurrence_xla(q_eff, k, u_tilde, y, out_intra, w0, *, matmul=_mm):
    """The sequential part of the forward: per chunk ``U = U_tilde - Y W0``,
    ``O = (Q - S Y) W0 + S U_tilde``, ``W1 = W0 + K^T U``. Arrays ``[N, G, C, ...]``, state ``[G, K, V]``.

    Returns ``(out, u, final_state)``; u is None for the sum rule (y None), whose writes are v.
    ``matmul(spec, a, b)``: the einsum every product is, as ``xla_walk`` says.
    """

    def step(w, chunk):
        q_c, k_c, u_tilde_c, y_c, out_intra_c = chunk
        u = u_tilde_c if y_c is None else u_tilde_c - matmul("gck,gkv->gcv", y_c, w)
        out = matmul("gck,gkv->gcv", q_c, w) + out_intra_c
        return w + matmul("gck,gcv->gkv", k_c, u), (out, u if y_c is not None else None)

    final_state, (out, u) = lax.scan(step, w0, (q_eff, k, u_tilde, y, out_intra))
    return out, u, final_state


def backward_recurrence_xla(q_eff, k, u, y, d_out, final_state, d_final, *, matmul=_mm):
    """The sequential part of the backward: chunks in reverse, rebuilding ``W0 = W1 - K^T U``.

    Returns ``(dq_eff, dk, du, dy, d_w0)`` (dk only through the state path; dy None for the sum rule).
    """

    def step(carry, chunk):
        w1, dw1 = carry  # the state after this chunk and dL/d(that state)
        q_c, k_c, u_c, y_c, do_c = chunk
        w0 = w1 - matmul("gck,gcv->gkv", k_c, u_c)
        du = matmul("gck,gkv->gcv", k_c, dw1)
        dk = matmul("gcv,gkv->gck", u_c, dw1)
        dq_eff = matmul("gcv,gkv->gck", do_c, w0)
        dw0 = dw1 + matmul("gck,gcv->gkv", q_c, do_c)
        if y_c is None:
            return (w0, dw0), (dq_eff, dk, du, None)
        dw0 = dw0 - matmul("gck,gcv->gkv", y_c, du)
        return (w0, dw0), (dq_eff, dk, du, -matmul("gcv,gkv->gck", du, w0))

    (_, dw0), (dq, dk, du, dy) = lax.scan(step, (final_state, d_final), (q_eff, k, u, y, d_out), reverse=True)
    return dq, dk, du, dy, dw0


class Walk(NamedTuple):
    """The chunk form's sequential walk over chunks, what ``fast_weight_chunk(..., walk=...)`` runs.

    ``forward(q_eff, k, u_tilde, y, out_intra, w0) -> (out, u, final_state)`` and
    ``backward(q_eff, k, u, y, d_out, final_state, d_final) -> (dq_eff, dk, du, dy, d_w0)``, as
    ``forward_recurrence_xla`` and ``backward_recurrence_xla`` say. Any pair of such functions is
    a walk: ``pallas_kernels.chunk_walk()`` returns one as a plain tuple.
    """

    forward: Callable
    backward: Callable


def xla_walk(matmul: Callable[[str, Array, Array], Array] = _mm) -> Walk:
    """The walk as ``lax.scan`` over chunks, every product done by ``matmul(spec, a, b)``.

    ``matmul`` takes an einsum spec and two float arrays; the default is ``jnp.einsum`` at HIGHEST
    precision. Another (e.g. one emulating the GPU's TF32 dots) changes the walk's products only:
    the state-independent work around it keeps its own.

    Example:
        >>> import jax.numpy as jnp
        >>> calls = []
        >>> def counted(spec, a, b):
        ...     calls.append(spec)
        ...     return jnp.einsum(spec, a, b)
        >>> x = jnp.ones((1, 32, 1, 4))
        >>> _ = fast_weight_chunk(x, x, x, None, jnp.zeros((1, 1, 4, 4)), rule="sum", scale=1.0, chunk_size=16,
        ...                       walk=xla_walk(counted))
        >>> calls  # lax.scan traces its step once: two products per chunk for the sum rule
        ['gck,gkv->gcv', 'gck,gcv->gkv']
    """
    return Walk(partial(forward_recurrence_xla, matmul=matmul), partial(backward_recurrence_xla, matmul=matmul))


XLA_WALK = xla_walk()


def _check_walk(walk: object) -> None:
    if not (isinstance(walk, tuple) and len(walk) == 2 and all(callable(f) for f in walk)):
        raise TypeError("walk must be a (forward, backward) pair of functions, e.g. XLA_WALK or "
                        f"pallas_kernels.chunk_walk(); got {type(walk).__name__} {walk!r}")


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(rule: str, walk: Walk, q: Array, k: Array, v: Array, beta: Array | None, w0: Array):
    """Chunked core on ``[N, G, C, ...]`` arrays; returns ``(out [N, G, C, V], final_state)``."""
    (out, final_state), _ = _chunked_forward(rule, walk, q, k, v, beta, w0)
    return out, final_state


def _chunked_forward(rule, walk, q, k, v, beta, w0):
    # Everything that does not depend on the state is done for all chunks at once; with
    # U = U_tilde - Y W0 the output O = Q W0 + S U is (Q - S Y) W0 + S U_tilde, so the sequential
    # loop is left with three [C, K] x [K, V]-sized matmuls per chunk.
    scores = tril(_mm("...ik,...jk->...ij", q, k))  # S, [N, B, H, C, C]
    if rule == "delta":
        inverse = wy_inverse(k, beta)
        u_tilde, y = wy_writes(inverse, k, v, beta)
        q_eff = q - _mm("...ij,...jk->...ik", scores, y)
    else:
        inverse, u_tilde, y, q_eff = None, v, None, q
    out_intra = _mm("...ij,...jv->...iv", scores, u_tilde)

    out, u, final_state = walk[0](q_eff, k, u_tilde, y, out_intra, w0)
    # The sum rule's writes are v itself; nothing more to keep.
    return (out, final_state), (q, k, v, beta, scores, inverse, u_tilde, y, q_eff, u, final_state)


def _chunked_forward_rule(rule, walk, *primals):
    return _chunked_forward(rule, walk, *primal_values(*primals))


def _chunked_backward(rule, walk, residuals, cotangents):
    q, k, v, beta, scores, inverse, u_tilde, y, q_eff, u, final_state = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    if rule != "delta":
        u = v

    dq, dk, du_tilde, dy, dw0 = walk[1](q_eff, k, u, y, d_out, final_state, d_final)
    # Back through out_intra = S U_tilde, q_eff = Q - S Y and S = tril(Q K^T), all chunks at once.
    d_scores = _mm("...iv,...jv->...ij", d_out, u_tilde)
    du_tilde = du_tilde + _mm("...ij,...iv->...jv", scores, d_out)
    if rule == "delta":
        d_scores = d_scores - _mm("...ik,...jk->...ij", dq, y)
        dy = dy - _mm("...ij,...ik->...jk", scores, dq)
    d_scores = tril(d_scores)
    dk = dk + _mm("...ij,...ik->...jk", d_scores, q)
    dq = dq + _mm("...ij,...jk->...ik", d_scores, k)
    if rule != "delta":
        return dq, dk, du_tilde, None, dw0

    # Back through U_tilde, Y = A^-1 diag(beta) (V, K) and A = I + diag(beta) strict_tril(K K^T).
    d_scaled_v = _mm("...ji,...jd->...id", inverse, du_tilde)  # A^-T dU_tilde: d(diag(beta) V)
    d_scaled_k = _mm("...ji,...jd->...id", inverse, dy)
    dv = beta[..., None] * d_scaled_v
    dk = dk + beta[..., None] * d_scaled_k
    dbeta = jnp.sum(d_scaled_v * v, axis=-1) + jnp.sum(d_scaled_k * k, axis=-1)
    # d(A^-1 X) / dA = -A^-T dR (A^-1 X)^T, strict lower part only.
    d_a = -tril(
        _mm("...id,...jd->...ij", d_scaled_v, u_tilde) + _mm("...id,...jd->...ij", d_scaled_k, y), -1
    )
    dbeta = dbeta + jnp.sum(d_a * _mm("...ik,...jk->...ij", k, k), axis=-1)
    d_gram = beta[..., :, None] * d_a
    dk = dk + _mm("...ij,...jk->...ik", d_gram, k) + _mm("...ji,...jk->...ik", d_gram, k)
    return dq, dk, dv, dbeta, dw0


_chunked.defvjp(_chunked_forward_rule, _chunked_backward, symbolic_zeros=True)


def fast_weight_chunk(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    *,
    rule: str,
    scale: float | Array,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    walk: Walk = XLA_WALK,
) -> tuple[Array, Array]:
    """The op whose contract (shapes, dtypes, outputs, gradients) :func:`.naive.fast_weight_reference`
    states, in chunks of ``chunk_size`` steps as this module describes.

    ``walk`` runs the sequential inter-chunk part: ``lax.scan`` by default (``XLA_WALK``;
    ``xla_walk(matmul)`` for other products), or any other ``(forward, backward)`` pair such as
    ``pallas_kernels.chunk_walk()``, the Pallas kernels.

    With a :class:`Walk` (``XLA_WALK``, ``xla_walk(...)``) a ``chunk_size`` above T acts as T (one
    chunk, no padding): the work follows T, not ``chunk_size``. Any other pair gets the
    ``chunk_size`` it was given (a Triton walk's chunk is a block, which must be a power of two).
    """
    _check_walk(walk)
    batch, length, heads, _ = q.shape
    if isinstance(walk, Walk):
        # A chunk longer than the sequence would only add inert padding, at O(C^2) per chunk; the
        # result does not depend on C, so one chunk of the whole sequence does the same for less.
        # (Other walks keep the caller's C: a Triton walk's chunk is a block, a power of two.)
        chunk_size = min(chunk_size, length)
    # At least 1: T = 0 is then zero chunks.
    chunk_size = max(chunk_size, 1)
    acc, out_dtype = accumulation_dtype(q, k, v, beta, initial_state), v.dtype
    key_dim, value_dim = k.shape[-1], v.shape[-1]
    # Chunks as [N, G, C, ...] with G = B * H: one batch axis keeps XLA's batched matmuls simple.
    # Under an explicit mesh the merged and split axes are given their sharding: G over the batch
    # and head mesh axes together, then batch and head axes as they came in. That is what
    # ``reshape`` is for: einops' rearrange cannot pass an ``out_sharding``, so it only moves and
    # splits the unsharded chunk and step axes, and B and H are merged and split here.
    mesh, batch_axis, head_axis = batch_head_axes_of(q)
    # A dimension may be sharded over several mesh axes (a tuple); G takes them all, in order.
    group_axes = tuple(n for a in (batch_axis, head_axis) if a is not None
                       for n in ((a,) if isinstance(a, str) else a)) or None

    def reshape(x: Array, shape: tuple[int, ...], *spec: object) -> Array:
        if mesh is None or not all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
            return x.reshape(shape)
        return jnp.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    qc, kc, vc, bc = (
        None if x is None else reshape(x, (x.shape[0], batch * heads, *x.shape[3:]), None, group_axes)
        for x in (to_chunks_nbhc(x, chunk_size, acc) for x in (q, k, v, beta))
    )
    w0 = reshape(initial_state.astype(acc), (batch * heads, key_dim, value_dim), group_axes)
    # Scaled in acc: a float64 scale (x64) would otherwise widen q past the state's dtype.
    out, final_state = _chunked(rule, walk, qc * jnp.asarray(scale, acc), kc, vc, bc, w0)
    # [N, G, C, V] -> [N, B, H, C, V] -> [B, T, H, V] (T padded to whole chunks)
    out = reshape(out, (out.shape[0], batch, heads, chunk_size, value_dim), None, batch_axis, head_axis)
    out = rearrange(out, "n b h c v -> b (n c) h v")
    final_state = reshape(final_state, (batch, heads, key_dim, value_dim), batch_axis, head_axis)
    return out[:, :length].astype(out_dtype), final_state
