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

from dpfp_jax.ops.fast_weight.common import HIGHEST, accumulation_dtype, batch_head_axes_of, zeros_like_sharded
from dpfp_jax.ops.fast_weight.wy import to_chunks_nbhc, tril, wy_inverse, wy_writes
from pallas_kernels.autodiff import cotangent_array, primal_values

Array = jax.Array

DEFAULT_CHUNK_SIZE = 64


def _mm(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, precision=HIGHEST)


def forward_recurrence_xla(q_eff, k, u_tilde, y, out_intra, w0, keep=None, *, matmul=_mm):
    """The sequential part of the forward: per chunk ``U = U_tilde - Y W0``,
    ``O = (Q - S Y) W0 + S U_tilde``, ``W1 = W0 + K^T U``. Arrays ``[N, G, C, ...]``, state ``[G, K, V]``.

    With packed documents, ``keep [N, G]`` is False for a chunk in which a document starts: its
    W1 is then ``K^T U`` alone (k already masked to the chunk's last document), and since W0 can
    no longer be rebuilt from W1, every chunk's W0 is returned for the backward.

    Returns ``(out, u, final_state, states)``; u is None for the sum rule (y None), whose writes
    are v; states (``[N, G, K, V]``) is None without ``keep``.
    ``matmul(spec, a, b)``: the einsum every product is, as ``xla_walk`` says.
    """

    def step(w, chunk):
        q_c, k_c, u_tilde_c, y_c, out_intra_c, keep_c = chunk
        u = u_tilde_c if y_c is None else u_tilde_c - matmul("gck,gkv->gcv", y_c, w)
        out = matmul("gck,gkv->gcv", q_c, w) + out_intra_c
        carried = w if keep_c is None else jnp.where(keep_c[:, None, None], w, 0.0)
        return carried + matmul("gck,gcv->gkv", k_c, u), (out, u if y_c is not None else None,
                                                          None if keep_c is None else w)

    final_state, (out, u, states) = lax.scan(step, w0, (q_eff, k, u_tilde, y, out_intra, keep))
    return out, u, final_state, states


def backward_recurrence_xla(q_eff, k, u, y, d_out, final_state, d_final, keep=None, states=None, *,
                            matmul=_mm):
    """The sequential part of the backward: chunks in reverse, rebuilding ``W0 = W1 - K^T U``, or
    taking it from ``states`` (with ``keep``, packed documents).

    Returns ``(dq_eff, dk, du, dy, d_w0)`` (dk only through the state path; dy None for the sum rule).
    """

    def step(carry, chunk):
        w1, dw1 = carry  # the state after this chunk and dL/d(that state)
        q_c, k_c, u_c, y_c, do_c, keep_c, w0 = chunk
        if w0 is None:
            w0 = w1 - matmul("gck,gcv->gkv", k_c, u_c)
        du = matmul("gck,gkv->gcv", k_c, dw1)
        dk = matmul("gcv,gkv->gck", u_c, dw1)
        dq_eff = matmul("gcv,gkv->gck", do_c, w0)
        dw0 = (dw1 if keep_c is None else jnp.where(keep_c[:, None, None], dw1, 0.0)) + matmul(
            "gck,gcv->gkv", q_c, do_c)
        if y_c is None:
            return (w0, dw0), (dq_eff, dk, du, None)
        dw0 = dw0 - matmul("gck,gcv->gkv", y_c, du)
        return (w0, dw0), (dq_eff, dk, du, -matmul("gcv,gkv->gck", du, w0))

    (_, dw0), (dq, dk, du, dy) = lax.scan(
        step, (final_state, d_final), (q_eff, k, u, y, d_out, keep, states), reverse=True)
    return dq, dk, du, dy, dw0


class Walk(NamedTuple):
    """The chunk form's sequential walk over chunks, what ``fast_weight_chunk(..., walk=...)`` runs.

    ``forward(q_eff, k, u_tilde, y, out_intra, w0, keep=None) -> (out, u, final_state, states)`` and
    ``backward(q_eff, k, u, y, d_out, final_state, d_final, keep=None, states=None) -> (dq_eff, dk,
    du, dy, d_w0)``, as ``forward_recurrence_xla`` and ``backward_recurrence_xla`` say (``keep``
    and ``states``: packed documents). Any pair of such functions is
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


class Documents(NamedTuple):
    """Packed documents within each chunk, from ``document [N, G, C]``: how many documents have
    started in the chunk up to each step (0: still the one the chunk began in)."""

    same: Array  # [N, G, C, C] steps i and j in one document
    first: Array  # [N, G, C] step in the document the chunk began in: it reads W0
    last: Array  # [N, G, C] step in the chunk's last document: its write reaches W1
    keep: Array  # [N, G] no document starts in the chunk: W1 carries W0


def documents_of(document: Array | None) -> Documents | None:
    if document is None:
        return None
    return Documents(document[..., :, None] == document[..., None, :], document == 0,
                     document == document[..., -1:], document[..., -1] == 0)


def _rows(mask: Array | None, x: Array) -> Array:
    """x with the steps (rows) where mask is False zeroed, by selection."""
    return x if mask is None else jnp.where(mask[..., None], x, 0.0)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(rule: str, walk: Walk, q: Array, k: Array, v: Array, beta: Array | None, w0: Array,
             document: Array | None):
    """Chunked core on ``[N, G, C, ...]`` arrays; returns ``(out [N, G, C, V], final_state)``."""
    (out, final_state), _ = _chunked_forward(rule, walk, q, k, v, beta, w0, document)
    return out, final_state


def _chunked_forward(rule, walk, q, k, v, beta, w0, document):
    # Everything that does not depend on the state is done for all chunks at once; with
    # U = U_tilde - Y W0 the output O = Q W0 + S U is (Q - S Y) W0 + S U_tilde, so the sequential
    # loop is left with three [C, K] x [K, V]-sized matmuls per chunk.
    # Packed documents (docs/math.md): S and the Gram matrix keep same-document pairs only, steps
    # of the chunk's first document alone read W0 (Y and Q's rows), and only the last document's
    # writes reach W1 (K's rows in the walk).
    docs = documents_of(document)
    same, first, last, keep = (None,) * 4 if docs is None else docs
    scores = tril(_mm("...ik,...jk->...ij", q, k), 0, same)  # S, [N, B, H, C, C]
    if rule == "delta":
        inverse = wy_inverse(k, beta, same)
        u_tilde, y = wy_writes(inverse, k, v, beta)
        y = _rows(first, y)
        q_eff = _rows(first, q) - _mm("...ij,...jk->...ik", scores, y)
    else:
        inverse, u_tilde, y, q_eff = None, v, None, _rows(first, q)
    out_intra = _mm("...ij,...jv->...iv", scores, u_tilde)

    options = {} if keep is None else {"keep": keep}
    out, u, final_state, states = walk[0](q_eff, _rows(last, k), u_tilde, y, out_intra, w0, **options)
    # The sum rule's writes are v itself; nothing more to keep.
    return (out, final_state), (q, k, v, beta, document, scores, inverse, u_tilde, y, q_eff, u, final_state,
                                states)


def _chunked_forward_rule(rule, walk, *primals):
    return _chunked_forward(rule, walk, *primal_values(*primals))


def _chunked_backward(rule, walk, residuals, cotangents):
    q, k, v, beta, document, scores, inverse, u_tilde, y, q_eff, u, final_state, states = residuals
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    docs = documents_of(document)
    same, first, last, keep = (None,) * 4 if docs is None else docs
    if rule != "delta":
        u = v

    options = {} if keep is None else {"keep": keep, "states": states}
    dq_eff, dk, du_tilde, dy, dw0 = walk[1](q_eff, _rows(last, k), u, y, d_out, final_state, d_final, **options)
    dk = _rows(last, dk)
    # Back through out_intra = S U_tilde, q_eff = Q - S Y and S = tril(Q K^T), all chunks at once.
    d_scores = _mm("...iv,...jv->...ij", d_out, u_tilde)
    du_tilde = du_tilde + _mm("...ij,...iv->...jv", scores, d_out)
    if rule == "delta":
        d_scores = d_scores - _mm("...ik,...jk->...ij", dq_eff, y)
        dy = _rows(first, dy - _mm("...ij,...ik->...jk", scores, dq_eff))
    d_scores = tril(d_scores, 0, same)
    dk = dk + _mm("...ij,...ik->...jk", d_scores, q)
    dq = _rows(first, dq_eff) + _mm("...ij,...jk->...ik", d_scores, k)
    if rule != "delta":
        return dq, dk, du_tilde, None, dw0, None

    # Back through U_tilde, Y = A^-1 diag(beta) (V, K) and A = I + diag(beta) strict_tril(K K^T).
    # (With documents y holds the first document's rows only; the rows it lacks meet zero rows of
    # d_scaled_k below, as A^-1 is block-diagonal by document.)
    d_scaled_v = _mm("...ji,...jd->...id", inverse, du_tilde)  # A^-T dU_tilde: d(diag(beta) V)
    d_scaled_k = _mm("...ji,...jd->...id", inverse, dy)
    dv = beta[..., None] * d_scaled_v
    dk = dk + beta[..., None] * d_scaled_k
    dbeta = jnp.sum(d_scaled_v * v, axis=-1) + jnp.sum(d_scaled_k * k, axis=-1)
    # d(A^-1 X) / dA = -A^-T dR (A^-1 X)^T, strict lower part (of the same document) only.
    d_a = -tril(
        _mm("...id,...jd->...ij", d_scaled_v, u_tilde) + _mm("...id,...jd->...ij", d_scaled_k, y), -1, same
    )
    dbeta = dbeta + jnp.sum(d_a * _mm("...ik,...jk->...ij", k, k), axis=-1)
    d_gram = beta[..., :, None] * d_a
    dk = dk + _mm("...ij,...jk->...ik", d_gram, k) + _mm("...ji,...jk->...ik", d_gram, k)
    return dq, dk, dv, dbeta, dw0, None


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
    resets: Array | None = None,
) -> tuple[Array, Array]:
    """The op whose contract (shapes, dtypes, outputs, gradients) :func:`.naive.fast_weight_reference`
    states, in chunks of ``chunk_size`` steps as this module describes.

    ``walk`` runs the sequential inter-chunk part: ``lax.scan`` by default (``XLA_WALK``;
    ``xla_walk(matmul)`` for other products), or any other ``(forward, backward)`` pair such as
    ``pallas_kernels.chunk_walk()``, the Pallas kernels.

    With a :class:`Walk` (``XLA_WALK``, ``xla_walk(...)``) a ``chunk_size`` above T acts as T (one
    chunk, no padding): the work follows T, not ``chunk_size``. Any other pair gets the
    ``chunk_size`` it was given (a Triton walk's chunk is a block, which must be a power of two).

    ``resets [B, T]`` (packed documents, ``segments.resets_of``) may fall anywhere in a chunk: the
    masked WY form (docs/math.md) handles them, and the backward then takes each chunk's start
    state from the forward instead of rebuilding it (T / C states of K x V per head kept).
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
    document = None
    if resets is not None:
        # Per head as beta is ([B, T, H], with q's sharding), then the documents started so far in each chunk.
        resets = jnp.logical_or(resets[:, :, None], zeros_like_sharded(q[..., 0], jnp.bool_))
        resets = to_chunks_nbhc(resets, chunk_size, jnp.int32)
        document = jnp.cumsum(reshape(resets, (resets.shape[0], batch * heads, chunk_size), None, group_axes),
                              axis=-1, dtype=jnp.int32)
    # Scaled in acc: a float64 scale (x64) would otherwise widen q past the state's dtype.
    out, final_state = _chunked(rule, walk, qc * jnp.asarray(scale, acc), kc, vc, bc, w0, document)
    # [N, G, C, V] -> [N, B, H, C, V] -> [B, T, H, V] (T padded to whole chunks)
    out = reshape(out, (out.shape[0], batch, heads, chunk_size, value_dim), None, batch_axis, head_axis)
    out = rearrange(out, "n b h c v -> b (n c) h v")
    final_state = reshape(final_state, (batch, heads, key_dim, value_dim), batch_axis, head_axis)
    return out[:, :length].astype(out_dtype), final_state
