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

Memory: the op runs as a scan over spans of ``span_size`` steps (S = span_size / C chunks; 512
steps by default). Within a span, the state-independent pieces (scores ``S = tril(Q K^T)``, the
inverse, ``U_tilde``, ``Y``, ``Q - S Y``) are computed for its S chunks at once in float32, then
the walk runs over them. A ``custom_vjp`` keeps the inputs as they came (bfloat16 stays
bfloat16), the writes U (V floats per step) and the state at each span's end (K x V per span),
and nothing else: its backward takes the spans in reverse, recomputes a span's pieces (matmuls,
independent of the state) and walks its chunks in reverse from the span's end state, rebuilding
``W0 = W1 - K^T U`` per chunk. So the pieces only ever exist for one span, no state per chunk is
kept, and the rebuild subtracts at most S writes from a stored state (less round-off than the
scan's T). Spans are cut from the ``[B, T, H, ...]`` inputs and gradients written back in place,
so no chunk-major copy of a whole input is made either. Autodiff through the batched triangular
solve was slower on CPU and kept every chunk's state.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax

from dpfp_jax.feature_maps import Features
from dpfp_jax.ops.fast_weight.common import HIGHEST, accumulation_dtype, batch_head_axes_of, zeros_like_sharded
from dpfp_jax.ops.fast_weight.wy import (
    ChunkDecays,
    chunk_decays,
    log_decay_gradient,
    to_chunks_nbhc,
    tril,
    wy_inverse,
    wy_writes,
)
from dpfp_jax.validation import check_positive_int
from pallas_kernels.autodiff import cotangent_array, primal_values
from pallas_kernels.padding import pad_to

Array = jax.Array

DEFAULT_CHUNK_SIZE = 64
DEFAULT_SPAN_SIZE = 512


def _mm(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, precision=HIGHEST)


def forward_recurrence_xla(q_eff, k, u_tilde, y, out_intra, w0, keep=None, decay=None, *, matmul=_mm):
    """The sequential part of the forward: per chunk ``U = U_tilde - Y W0``,
    ``O = (Q - S Y) W0 + S U_tilde``, ``W1 = W0 + K^T U``. Arrays ``[N, G, C, ...]``, state ``[G, K, V]``.

    With packed documents, ``keep [N, G]`` is False for a chunk in which a document starts: its
    W1 is then ``K^T U`` alone (k already masked to the chunk's last document), and since W0 can
    no longer be rebuilt from W1, every chunk's W0 is returned for the backward.
    Gated, ``decay [N, G]`` multiplies what W0 leaves in W1 (``W1 = decay W0 + K^T U``; 0 where a
    document starts, in place of ``keep``); rebuilding W0 would divide by it, so every chunk's W0
    is returned as with ``keep``.

    Returns ``(out, u, final_state, states)``; u is None for the sum rule (y None), whose writes
    are v; states (``[N, G, K, V]``) is None without ``keep``.
    ``matmul(spec, a, b)``: the einsum every product is, as ``xla_walk`` says.
    """

    def step(w, chunk):
        q_c, k_c, u_tilde_c, y_c, out_intra_c, keep_c, decay_c = chunk
        u = u_tilde_c if y_c is None else u_tilde_c - matmul("gck,gkv->gcv", y_c, w)
        out = matmul("gck,gkv->gcv", q_c, w) + out_intra_c
        if decay_c is not None:
            carried = decay_c[:, None, None] * w
        else:
            carried = w if keep_c is None else jnp.where(keep_c[:, None, None], w, 0.0)
        kept = None if keep_c is None and decay_c is None else w
        return carried + matmul("gck,gcv->gkv", k_c, u), (out, u if y_c is not None else None, kept)

    final_state, (out, u, states) = lax.scan(step, w0, (q_eff, k, u_tilde, y, out_intra, keep, decay))
    return out, u, final_state, states


def backward_recurrence_xla(q_eff, k, u, y, d_out, final_state, d_final, keep=None, states=None, decay=None, *,
                            matmul=_mm):
    """The sequential part of the backward: chunks in reverse, rebuilding ``W0 = W1 - K^T U``, or
    taking it from ``states`` (with ``keep``, packed documents, or ``decay``, gated).

    Returns ``(dq_eff, dk, du, dy, d_w0)`` (dk only through the state path; dy None for the sum rule),
    and with ``decay`` a sixth, ``d_decay [N, G]``.
    """

    def step(carry, chunk):
        w1, dw1 = carry  # the state after this chunk and dL/d(that state)
        q_c, k_c, u_c, y_c, do_c, keep_c, w0, decay_c = chunk
        if w0 is None:
            w0 = w1 - matmul("gck,gcv->gkv", k_c, u_c)
        du = matmul("gck,gkv->gcv", k_c, dw1)
        dk = matmul("gcv,gkv->gck", u_c, dw1)
        dq_eff = matmul("gcv,gkv->gck", do_c, w0)
        if decay_c is not None:
            carried, d_decay = decay_c[:, None, None] * dw1, jnp.sum(dw1 * w0, axis=(-2, -1))
        else:
            carried, d_decay = dw1 if keep_c is None else jnp.where(keep_c[:, None, None], dw1, 0.0), None
        dw0 = carried + matmul("gck,gcv->gkv", q_c, do_c)
        if y_c is None:
            return (w0, dw0), (dq_eff, dk, du, None, d_decay)
        dw0 = dw0 - matmul("gck,gcv->gkv", y_c, du)
        return (w0, dw0), (dq_eff, dk, du, -matmul("gcv,gkv->gck", du, w0), d_decay)

    (_, dw0), (dq, dk, du, dy, d_decay) = lax.scan(
        step, (final_state, d_final), (q_eff, k, u, y, d_out, keep, states, decay), reverse=True)
    return (dq, dk, du, dy, dw0) if decay is None else (dq, dk, du, dy, dw0, d_decay)


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


class _Pieces(NamedTuple):
    """The state-independent pieces of a span of chunks (``[S, G, C, ...]``, float32 or wider)."""

    scores: Array  # S = tril(Q K^T), masked to same-document pairs (gated: times the decays D)
    gram: Array | None  # K K^T (delta rule)
    inverse: Array | None  # A^-1 (delta rule)
    u_tilde: Array  # A^-1 diag(beta) V (the sum rule: V)
    y: Array | None  # A^-1 diag(beta) K, the rows of the chunk's first document (delta rule; gated: Gamma K)
    q_eff: Array  # Q - S Y (first document's rows of Q; gated: of Gamma Q)
    decays: ChunkDecays | None = None  # gated: the chunk's decay factors
    raw_scores: Array | None = None  # gated: tril(Q K^T) before the decays


def _scaled_rows(factor: Array | None, x: Array) -> Array:
    return x if factor is None else factor[..., None] * x


def _pieces(rule: str, q: Array, k: Array, v: Array, beta: Array | None, docs: Documents | None,
            log_decay: Array | None = None) -> _Pieces:
    # Packed documents (docs/math.md): S and the Gram matrix keep same-document pairs only, steps
    # of the chunk's first document alone read W0 (Y and Q's rows). Gated (docs/math.md, "Gated"):
    # S and the Gram matrix take D_ij = exp(g_i - g_j), the rows that read W0 take exp(g_i).
    same, first = (None, None) if docs is None else docs[:2]
    decays = None if log_decay is None else chunk_decays(log_decay)
    raw_scores = tril(_mm("...ik,...jk->...ij", q, k), 0, same)
    scores = raw_scores if decays is None else raw_scores * decays.within
    start = None if decays is None else decays.start
    if rule != "delta":
        return _Pieces(scores, None, None, v, None, _rows(first, _scaled_rows(start, q)), decays, raw_scores)
    gram = _mm("...ik,...jk->...ij", k, k)
    inverse = wy_inverse(k, beta, same, gram=gram if decays is None else gram * decays.within)
    u_tilde, y = wy_writes(inverse, _scaled_rows(start, k), v, beta)
    y = _rows(first, y)
    q_eff = _rows(first, _scaled_rows(start, q)) - _mm("...ij,...jk->...ik", scores, y)
    return _Pieces(scores, gram, inverse, u_tilde, y, q_eff, decays, raw_scores)


class _Spans(NamedTuple):
    """How ``[B, T, H, ...]`` arrays are cut into spans of ``chunks`` chunks of ``chunk_size`` steps, one
    span ``[S, G, C, ...]`` at a time, with G = B * H: one batch axis keeps XLA's batched matmuls simple.

    Under an explicit mesh the merged and split axes are given their sharding: G over the batch and
    head mesh axes together, then batch and head axes as they came in. That is what ``reshape`` is
    for: einops' rearrange cannot pass an ``out_sharding``, so it only moves and splits the
    unsharded chunk and step axes, and B and H are merged and split here.

    ``features`` (a :class:`dpfp_jax.Features`, or None): q and k came raw, width d; a span of
    them is feature-mapped where it is used (:meth:`mapped`), forward and backward, so no
    K-wide copy of a whole q or k is ever made or kept.
    """

    chunks: int
    chunk_size: int
    mesh: object
    batch_axis: object
    head_axis: object
    features: Features | None = None

    @property
    def steps(self) -> int:
        return self.chunks * self.chunk_size

    @property
    def group_axes(self) -> tuple | None:
        # A dimension may be sharded over several mesh axes (a tuple); G takes them all, in order.
        return tuple(n for a in (self.batch_axis, self.head_axis) if a is not None
                     for n in ((a,) if isinstance(a, str) else a)) or None

    def reshape(self, x: Array, shape: tuple[int, ...], *spec: object) -> Array:
        mesh = self.mesh
        if mesh is None or not all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
            return x.reshape(shape)
        return jnp.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    def take(self, x: Array | None, index: Array) -> Array | None:
        """Span ``index`` of ``x [B, T, H, ...]`` as ``[S, G, C, ...]``."""
        if x is None:
            return None
        x = lax.dynamic_slice_in_dim(x, index * self.steps, self.steps, axis=1)
        x = rearrange(x, "b (s c) h ... -> s b h c ...", c=self.chunk_size)
        return self.reshape(x, (self.chunks, x.shape[1] * x.shape[2], *x.shape[3:]), None, self.group_axes)

    def mapped(self, x: Array) -> tuple[Array, Callable[[Array], Array]]:
        """``(phi(x), back)`` of a span of raw q or k (``back``: phi's VJP), or ``(x, identity)``
        without ``features``."""
        if self.features is None:
            return x, lambda ct: ct
        return self.features.with_vjp(x)

    def put(self, into: Array | None, x: Array | None, index: Array) -> Array | None:
        """``into [B, T, H, ...]`` with span ``index`` replaced by ``x [S, G, C, ...]`` (cast to into's dtype)."""
        if into is None:
            return None
        batch, _, heads = into.shape[:3]
        x = self.reshape(x, (self.chunks, batch, heads, *x.shape[2:]), None, self.batch_axis, self.head_axis)
        x = rearrange(x, "s b h c ... -> b (s c) h ...").astype(into.dtype)
        return lax.dynamic_update_slice_in_dim(into, x, index * self.steps, axis=1)


def _widen(acc: jnp.dtype, scale: Array, q: Array, k: Array, v: Array, beta: Array | None):
    """A span's inputs in the accumulation dtype, q scaled."""
    return q.astype(acc) * scale, k.astype(acc), v.astype(acc), None if beta is None else beta.astype(acc)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked(rule: str, walk: Walk, spans: _Spans, q: Array, k: Array, v: Array, beta: Array | None, w0: Array,
             document: Array | None, scale: Array, log_decay: Array | None = None):
    """Chunked core on ``[B, T, H, ...]`` inputs in their own dtypes, T a whole number M of spans,
    state ``[G, K, V]``, ``document [M, S, G, C]``, ``log_decay [B, T, H]`` or None; returns
    ``(out [B, T, H, V] in v's dtype, final_state)``."""
    (out, final_state), _ = _chunked_forward(rule, walk, spans, q, k, v, beta, w0, document, scale, log_decay)
    return out, final_state


def _num_spans(spans: _Spans, q: Array) -> int:
    return q.shape[1] // spans.steps


def _walk_options(docs: Documents | None, decays: ChunkDecays | None) -> dict:
    """The walk's keyword arguments: ``keep`` with documents, ``decay`` (in its place) when gated."""
    if decays is None:
        return {} if docs is None else {"keep": docs.keep}
    return {"decay": decays.total if docs is None else jnp.where(docs.keep, decays.total, 0.0)}


def _walk_keys(k: Array, docs: Documents | None, decays: ChunkDecays | None) -> Array:
    """The keys of the writes that reach W1: the chunk's last document's, gated times exp(g_C - g_i)."""
    return _scaled_rows(None if decays is None else decays.end, k if docs is None else _rows(docs.last, k))


def _chunked_forward(rule, walk, spans, q, k, v, beta, w0, document, scale, log_decay=None):
    # A lax.scan over spans of chunks. Within a span, everything that does not depend on the state
    # is done for all its chunks at once; with U = U_tilde - Y W0 the output O = Q W0 + S U is
    # (Q - S Y) W0 + S U_tilde, so the walk is left with three [C, K] x [K, V]-sized matmuls per
    # chunk. Only a span's worth of those pieces is ever alive, and the backward recomputes them
    # span by span: what is kept is the inputs as they came, the writes U and each span's end state
    # (gated: the backward walks a span forward again for its chunks' start states, as W0 cannot be
    # rebuilt backwards without dividing by the decay).
    acc = w0.dtype

    def span(carry, xs):
        w, out = carry
        index, document = xs
        q_s, k_s = (spans.mapped(spans.take(x, index))[0] for x in (q, k))
        q_s, k_s, v_s, beta_s = _widen(acc, scale, q_s, k_s, spans.take(v, index), spans.take(beta, index))
        log_decay_s = None if log_decay is None else spans.take(log_decay, index).astype(acc)
        docs = documents_of(document)
        p = _pieces(rule, q_s, k_s, v_s, beta_s, docs, log_decay_s)
        out_intra = _mm("...ij,...jv->...iv", p.scores, p.u_tilde)
        # Only the chunk's last document's writes reach W1 (K's rows in the walk).
        out_s, u, w1, states = walk[0](p.q_eff, _walk_keys(k_s, docs, p.decays), p.u_tilde, p.y, out_intra, w,
                                       **_walk_options(docs, p.decays))
        # The sum rule's writes are v itself (u None): nothing more to keep.
        return (w1, spans.put(out, out_s, index)), (u, w1, states)

    out = zeros_like_sharded(v, v.dtype)
    (final_state, out), (u, ends, states) = lax.scan(span, (w0, out), (jnp.arange(_num_spans(spans, q)), document))
    if log_decay is not None:
        # Gated, the backward recomputes each span's chunk start states from the span's start
        # (w0, or the previous span's end) rather than keeping them all: one more forward walk.
        return (out, final_state), (q, k, v, beta, document, scale, u, ends, None, log_decay, w0)
    return (out, final_state), (q, k, v, beta, document, scale, u, ends, states, None, None)


def _chunked_forward_rule(rule, walk, spans, *primals):
    return _chunked_forward(rule, walk, spans, *primal_values(*primals))


def _chunked_backward(rule, walk, spans, residuals, cotangents):
    q, k, v, beta, document, scale, u, ends, states, log_decay, w0 = residuals
    starts = None if w0 is None else jnp.concatenate([w0[None], ends[:-1]], axis=0)  # each span's start state
    d_out, d_final = (cotangent_array(ct) for ct in cotangents)
    acc = ends.dtype

    def span(carry, xs):
        dw1, dq_all, dk_all, dv_all, dbeta_all, d_log_decay_all, d_scale = carry
        index, document, u, w1, states, start = xs
        q_in, k_in, v_in, beta_in, d_out_s = (spans.take(x, index) for x in (q, k, v, beta, d_out))
        # With features phi(q), phi(k) of the span are recomputed here; their gradients go back through phi's VJP.
        (q_in, back_q), (k_in, back_k) = spans.mapped(q_in), spans.mapped(k_in)
        q_s, k_s, v_s, beta_s = _widen(acc, scale, q_in, k_in, v_in, beta_in)
        log_decay_s = None if log_decay is None else spans.take(log_decay, index).astype(acc)
        docs = documents_of(document)
        same, first, last, keep = (None,) * 4 if docs is None else docs
        scores, gram, inverse, u_tilde, y, q_eff, decays, raw_scores = _pieces(rule, q_s, k_s, v_s, beta_s, docs,
                                                                              log_decay_s)
        d_out_s = d_out_s.astype(acc)
        options = _walk_options(docs, decays)
        if docs is not None or decays is not None:
            if decays is not None:  # gated: the span's chunk start states again, from its start state
                states = walk[0](q_eff, _walk_keys(k_s, docs, decays), u_tilde, y, zeros_like_sharded(u_tilde, acc),
                                 start, **options)[3]
            options["states"] = states
        dq_eff, dk, du_tilde, dy, dw0, *d_total = walk[1](q_eff, _walk_keys(k_s, docs, decays),
                                                          v_s if u is None else u, y, d_out_s, w1, dw1, **options)
        dk = _rows(last, dk)
        d_within = d_start = d_end = None
        if decays is not None:
            # The walk's keys were exp(g_C - g_i) K (the last document's rows).
            d_end, dk = jnp.sum(dk * k_s, axis=-1), decays.end[..., None] * dk
            d_total = d_total[0] if docs is None else jnp.where(keep, d_total[0], 0.0)
        # Back through out_intra = S U_tilde, q_eff = Q - S Y and S = tril(Q K^T), all the span's chunks at once.
        d_scores = _mm("...iv,...jv->...ij", d_out_s, u_tilde)
        du_tilde = du_tilde + _mm("...ij,...iv->...jv", scores, d_out_s)
        if rule == "delta":
            d_scores = d_scores - _mm("...ik,...jk->...ij", dq_eff, y)
            dy = _rows(first, dy - _mm("...ij,...ik->...jk", scores, dq_eff))
        d_scores = tril(d_scores, 0, same)
        dq = _rows(first, dq_eff)
        if decays is not None:
            # S = D * tril(Q K^T) and the first document's rows of Q entered as exp(g_i) Q.
            d_within, d_scores = d_scores * raw_scores, d_scores * decays.within
            d_start, dq = jnp.sum(dq * q_s, axis=-1), decays.start[..., None] * dq
        dk = dk + _mm("...ij,...ik->...jk", d_scores, q_s)
        dq = dq + _mm("...ij,...jk->...ik", d_scores, k_s)
        dv, dbeta = du_tilde, None  # the sum rule's U_tilde is V
        if rule == "delta":
            # Back through U_tilde, Y = A^-1 diag(beta) (V, K) and A = I + diag(beta) strict_tril(K K^T).
            # (With documents y holds the first document's rows only; the rows it lacks meet zero
            # rows of d_scaled_k below, as A^-1 is block-diagonal by document.) Gated: Y's K is
            # exp(g_i) K and A's Gram matrix is D * K K^T.
            d_scaled_v = _mm("...ji,...jd->...id", inverse, du_tilde)  # A^-T dU_tilde: d(diag(beta) V)
            d_scaled_k = _mm("...ji,...jd->...id", inverse, dy)
            dv = beta_s[..., None] * d_scaled_v
            d_keys = beta_s[..., None] * d_scaled_k  # the gradient of the K in Y
            if decays is None:
                dk, keys, decayed_gram = dk + d_keys, k_s, gram
            else:
                keys, decayed_gram = decays.start[..., None] * k_s, gram * decays.within
                d_start = d_start + jnp.sum(d_keys * k_s, axis=-1)
                dk = dk + decays.start[..., None] * d_keys
            dbeta = jnp.sum(d_scaled_v * v_s, axis=-1) + jnp.sum(d_scaled_k * keys, axis=-1)
            # d(A^-1 X) / dA = -A^-T dR (A^-1 X)^T, strict lower part (of the same document) only.
            d_a = -tril(
                _mm("...id,...jd->...ij", d_scaled_v, u_tilde) + _mm("...id,...jd->...ij", d_scaled_k, y), -1, same
            )
            dbeta = dbeta + jnp.sum(d_a * decayed_gram, axis=-1)
            # The Gram matrix K K^T is symmetric in its two K's: dK = (dG + dG^T) K, one product.
            d_gram = beta_s[..., :, None] * d_a
            if decays is not None:
                d_within, d_gram = d_within + d_gram * gram, d_gram * decays.within
            dk = dk + _mm("...ij,...jk->...ik", d_gram + jnp.swapaxes(d_gram, -1, -2), k_s)
        # q entered scaled: dL/dscale is the sum of dL/d(scaled q) times q as it came.
        d_scale = d_scale + jnp.sum(dq * q_in.astype(acc))
        grads = (spans.put(dq_all, back_q(dq * scale), index), spans.put(dk_all, back_k(dk), index),
                 spans.put(dv_all, dv, index), spans.put(dbeta_all, dbeta, index))
        if decays is not None:
            d_log_decay = log_decay_gradient(decays, d_within, d_start, d_end, d_total)
            d_log_decay_all = spans.put(d_log_decay_all, d_log_decay, index)
        return (dw0, *grads, d_log_decay_all, d_scale), None

    zeros = tuple(None if x is None else zeros_like_sharded(x, x.dtype) for x in (q, k, v, beta, log_decay))
    (dw0, dq, dk, dv, dbeta, d_log_decay, d_scale), _ = lax.scan(
        span, (d_final, *zeros, jnp.zeros((), acc)), (jnp.arange(_num_spans(spans, q)), document, u, ends, states,
                                                           starts),
        reverse=True)
    return dq, dk, dv, dbeta, dw0, None, d_scale.astype(scale.dtype), d_log_decay


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
    span_size: int = DEFAULT_SPAN_SIZE,
    features: Features | None = None,
    log_decay: Array | None = None,
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

    ``log_decay [B, T, H]`` (gated): the decays within a chunk as exp of differences of
    cumulative log sums (``wy.chunk_decays``, docs/math.md "Gated"); the backward then walks each
    span's chunks forward again from the span's start state for every chunk's start state, as
    rebuilding it backwards would divide by the chunk's decay (nothing more kept than without a
    gate). The walk is then called with ``decay`` (``[N, G]``, per chunk) in place of ``keep``, as
    ``forward_recurrence_xla`` takes it; ``pallas_kernels.chunk_walk()`` takes it too.

    ``span_size``: steps per span, the unit of work and of recomputation (see the module
    docstring): as few spans of at most ``span_size`` steps (rounded down to whole chunks, at
    least one) as hold T, each of as few chunks as then hold T. The result does not depend on it;
    the backward's scratch memory grows with it (its pieces are alive for one span); its time on the
    CPU follows no clear order of span size (``python -m benchmarks.chunk --spans``:
    docs/reports/cpu_benchmarks.md).

    ``features`` (:class:`dpfp_jax.Features`): q, k are raw ``[B, T, H, d]`` and each span is
    feature-mapped where it is used; the backward keeps them at width d (``_Spans``). Padded
    steps then have nonzero keys phi(0) for some maps, inert all the same: their values and
    beta are zero, so their writes are.
    """
    _check_walk(walk)
    check_positive_int("span_size", span_size)
    batch, length, heads, _ = q.shape
    if isinstance(walk, Walk):
        # A chunk longer than the sequence would only add inert padding, at O(C^2) per chunk; the
        # result does not depend on C, so one chunk of the whole sequence does the same for less.
        # (Other walks keep the caller's C: a Triton walk's chunk is a block, a power of two.)
        chunk_size = min(chunk_size, length)
    # At least 1: T = 0 is then zero chunks.
    chunk_size = max(chunk_size, 1)
    acc = accumulation_dtype(q, k, v, beta, initial_state, log_decay)
    key_dim, value_dim = k.shape[-1] if features is None else features.key_dim, v.shape[-1]
    # M spans of S chunks, the unit the custom_vjp's scans work in: as few spans of at most span_size
    # steps as hold T, each of as few chunks as then hold T (so at most M - 1 chunks of padding
    # beyond the last partial chunk).
    num_chunks = -(-length // chunk_size)
    num_spans = -(-num_chunks // max(span_size // chunk_size, 1))
    spans = _Spans(-(-num_chunks // max(num_spans, 1)), chunk_size, *batch_head_axes_of(q), features)
    padded = num_spans * spans.steps

    def pad(x: Array | None) -> Array | None:
        # Zero-padded steps are inert: a zero key writes nothing under either rule, and their outputs are sliced off.
        return None if x is None else pad_to(x, 1, padded)

    if num_spans == 0:  # T = 0: no step to take (a span's slice would not fit)
        return zeros_like_sharded(v, v.dtype), initial_state.astype(acc)
    w0 = spans.reshape(initial_state.astype(acc), (batch * heads, key_dim, value_dim), spans.group_axes)
    document = None
    if resets is not None:
        # Per head as beta is ([B, T, H], with q's sharding), then the documents started so far in each chunk.
        resets = jnp.logical_or(resets[:, :, None], zeros_like_sharded(q[..., 0], jnp.bool_))
        resets = to_chunks_nbhc(resets, chunk_size, jnp.int32, num_chunks=num_spans * spans.chunks)
        resets = spans.reshape(resets, (num_spans, spans.chunks, batch * heads, chunk_size), None, None,
                               spans.group_axes)
        document = jnp.cumsum(resets, axis=-1, dtype=jnp.int32)
    # In acc: a float64 scale (x64) would otherwise widen q past the state's dtype.
    # Padded steps are inert gated too: log alpha = 0 there (alpha = 1) with a zero key.
    out, final_state = _chunked(rule, walk, spans, *(pad(x) for x in (q, k, v, beta)), w0, document,
                                jnp.asarray(scale, acc), pad(log_decay))
    final_state = spans.reshape(final_state, (batch, heads, key_dim, value_dim), spans.batch_axis, spans.head_axis)
    return out[:, :length], final_state
