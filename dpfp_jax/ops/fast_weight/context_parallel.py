"""Context parallelism: the fast-weight op with the time axis T sharded over a mesh axis.

Over a shard of L steps every rule is affine in the state that enters it,
``W_end = M W_in + N`` (``N``: the shard's end state from zero; ``M``: the product of
``I - beta_t k_t k_t^T`` over the shard for the delta rule, ``I`` for the sum rule, ``0`` when a
document starts inside the shard). docs/context_parallel.md derives two schemes and counts their
cost; ``context_cost.choose_scheme`` picks one per call, the one with the shorter critical path.

``"transition"``, forward, every shard at once:
  1. ``(M, N)`` of its own slice: the chunk form's walk over the pair from ``(0, I)``, no outputs
     (the sum rule needs only ``N``, a sum; its ``M`` is a per-row 1, or 0 after a reset);
  2. the entering states, passed shard to shard: P - 1 rounds in which every shard sends
     ``M W + N`` of the state it holds to the next (a ``[B, H, K, V]`` ppermute and one small
     product per round), and a psum of the last shard's end: the final state;
  3. the chunk form over its slice from its true entering state: the outputs, and the chunk
     form's own residuals for the backward.

backward, every shard at once (the state's gradient flows the other way):
  1. ``G``: the gradient of the shard's entering state from its own outputs alone, by the chunk
     form's state-gradient walk (no input gradients);
  2. the end-state gradients, passed back shard to shard: ``dW_in = M^T dW_end + G``;
  3. the chunk form's backward over the slice with its end state's true gradient.

``"relay"`` needs no ``M``: in round r shard r alone walks its slice's state from its true
entering state and passes the end on (P - 1 walks in a row, the others waiting); then every shard
runs its forward at once. The backward walks the state gradient back the same way, then every
shard runs its backward. Fewer flops, a longer critical path once P > 2.

Only state-sized arrays cross devices (``[B, H, K, V]`` ppermutes and psums, a ``[B, 1]`` shift of
document ids); nothing of length T is ever exchanged. docs/context_parallel.md compares these with
gathering every shard's ``(M, N)`` and with running the shards one after the other.

With ``features`` (raw q, k of width d) every walk above maps one span of the shard's q, k where
it uses it, through the chunk form's ``_Spans.mapped``, and the backward applies phi's VJP: a shard
keeps its q, k d wide, never phi(q), phi(k) whole.

With ``impl="pallas"`` the Pallas TPU kernel takes step 3 of either scheme's forward and backward
(the walks stay in XLA): it is given the shard's raw q, k with the map (which it computes in VMEM),
its slice of ``log_decay`` and its local resets (without a gate, the gated kernel runs with
``log alpha = 0`` but at them), and its pullback returns every input's gradient, log_decay's too.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

from dpfp_jax.feature_maps import Features
from dpfp_jax.ops.fast_weight.chunk import (
    DEFAULT_SPAN_SIZE,
    XLA_WALK,
    _chunked_backward,
    _chunked_forward,
    _pieces,
    _rows,
    _scaled_rows,
    _Spans,
    _walk_keys,
    _walk_options,
    documents_of,
)
from dpfp_jax.ops.fast_weight.common import HIGHEST, accumulation_dtype, batch_head_axes_of
from dpfp_jax.ops.fast_weight.context_cost import SCHEMES, choose_scheme
from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas, pallas_supports, runs_tpu_kernel
from dpfp_jax.ops.fast_weight.segments import resets_of, running_key_sum
from dpfp_jax.ops.fast_weight.wy import chunk_decays, to_chunks_nbhc, wy_inverse, wy_writes
from pallas_kernels.padding import pad_to

Array = jax.Array

CONTEXT_IMPLS = ("chunk", "auto", "pallas")
"""The ``impl`` values that run with a sharded T: the chunk form on every shard, or with ``"pallas"``
the Pallas TPU kernel for each shard's forward and backward from its entering state."""


class ContextPlan(NamedTuple):
    """How a call's T is sharded: the mesh (concrete or abstract), the axis over T, its size, and
    the mesh axes of the batch and head dimensions when every other axis is manual too (explicit
    meshes) or None (Auto meshes: only the T axis is manual, the rest is left to the partitioner)."""

    mesh: object
    axis: str
    shards: int
    explicit: bool
    batch_axis: object
    head_axis: object

    def spec(self, *dims: str | None) -> PartitionSpec:
        """A PartitionSpec from logical dims: "T" (or "P", a leading per-shard axis), "B", "H", None."""
        names = {"T": self.axis, "P": self.axis}
        if self.explicit:
            names |= {"B": self.batch_axis, "H": self.head_axis}
        return PartitionSpec(*(names.get(d) for d in dims))

    @property
    def data_axes(self) -> tuple[str, ...]:
        """The manual mesh axes a sum over the whole batch must reduce (d_scale)."""
        axes = [self.axis]
        if self.explicit:
            for a in (self.batch_axis, self.head_axis):
                axes += [] if a is None else [a] if isinstance(a, str) else list(a)
        return tuple(axes)


def _sharding_of(x: Array):
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None, None
    return mesh, tuple(sharding.spec) + (None,) * x.ndim


def _single_axis(entry: object) -> str | None:
    if entry is None or isinstance(entry, str):
        return entry
    entry = tuple(entry)
    if len(entry) == 1:
        return entry[0]
    raise ValueError(f"q's time axis is sharded over several mesh axes {entry}; context parallelism takes one "
                     "mesh axis over T (context_axis)")


def context_plan(q: Array, context_axis: str | None, impl: str) -> ContextPlan | None:
    """The :class:`ContextPlan` of a call, or None when T is not sharded (the single-device op).

    Under an explicit mesh T's sharding is read from q's type; ``context_axis`` names it under an
    Auto mesh (the mesh of ``jax.set_mesh``). Raises a ValueError naming the argument for an
    axis that is not in the mesh, that also shards the batch or heads, that does not divide T, or
    an ``impl`` that cannot run sharded.
    """
    mesh, spec = _sharding_of(q)
    explicit = mesh is not None and all(t == AxisType.Explicit for t in mesh.axis_types)
    time_axis = _single_axis(spec[1]) if explicit else None
    if context_axis is None and time_axis is None:
        return None
    if context_axis is not None and not isinstance(context_axis, str):
        raise TypeError(f"context_axis must be a mesh axis name (str) or None; got {context_axis!r}")
    if not explicit:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            raise ValueError(f"context_axis={context_axis!r} needs a mesh: call under `with jax.set_mesh(mesh):` "
                             "(or pass inputs sharded over an explicit mesh)")
    if context_axis is not None and time_axis is not None and context_axis != time_axis:
        raise ValueError(f"context_axis={context_axis!r} but q's time axis is sharded over {time_axis!r}")
    axis = time_axis if time_axis is not None else context_axis
    if axis not in mesh.axis_names:
        raise ValueError(f"context_axis={axis!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
    batch_axis, head_axis = (spec[0], spec[2]) if explicit else (None, None)
    for name, entry in (("batch", batch_axis), ("heads", head_axis)):
        if entry is not None and axis in ((entry,) if isinstance(entry, str) else tuple(entry)):
            raise ValueError(f"context_axis={axis!r} also shards q's {name} axis; the axis over T must be "
                             "another mesh axis")
    if impl not in CONTEXT_IMPLS:
        raise ValueError(f"impl={impl!r} cannot run with T sharded over mesh axis {axis!r}: use impl='chunk' (or "
                         "'auto'), the chunkwise form every shard runs (or 'pallas' on a TPU)")
    shards = mesh.shape[axis]
    if q.shape[1] == 0:  # no step to shard: the single-device op returns the initial state
        return None
    if q.shape[1] % shards:
        raise ValueError(f"q's time axis T={q.shape[1]} must be divisible by the {shards} shards of context_axis="
                         f"{axis!r}")
    if explicit and mesh.shape[axis] > 1 and time_axis is None:
        raise ValueError(f"context_axis={axis!r}: under an explicit mesh shard q, k, v (and beta, segment_ids) over "
                         f"{axis!r} on their time axis, e.g. jax.sharding.reshard(q, P(None, {axis!r}))")
    return ContextPlan(mesh, axis, shards, explicit, batch_axis, head_axis)


# ---------------------------------------------------------------------------------------------
# Per-shard pieces (run inside shard_map: arrays are one shard's slice, [B, L, H, ...]).


def _local_resets(segment_ids: Array | None, axis: str, shards: int) -> Array | None:
    """This shard's ``resets [B, L]``: ``resets_of`` within the slice, and at its first step a
    comparison with the previous shard's last id (a ``[B, 1]`` shift: the only T-side exchange)."""
    if segment_ids is None:
        return None
    within = resets_of(segment_ids)
    previous = lax.ppermute(segment_ids[:, -1:], axis, [(i, i + 1) for i in range(shards - 1)])
    boundary = (segment_ids[:, :1] != previous) & (lax.axis_index(axis) > 0)
    return jnp.concatenate([boundary, within[:, 1:]], axis=1)


def _apply(rule: str, m: Array, w: Array) -> Array:
    """``M W``: a K x K product for the delta rule, a per-row factor ``[B, 1, 1, 1]`` for the sum rule."""
    return jnp.einsum("bhij,bhjv->bhiv", m, w, precision=HIGHEST) if rule == "delta" else m * w


def _apply_transposed(rule: str, m: Array, d: Array) -> Array:
    return jnp.einsum("bhji,bhjv->bhiv", m, d, precision=HIGHEST) if rule == "delta" else m * d


def _mm(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, precision=HIGHEST)


class _Chunked(NamedTuple):
    """A shard's slice cut as the chunk form cuts it: ``spans`` of chunks, T padded to ``padded``
    steps, ``document [M, S, G, C]`` (documents started so far in each chunk) or None."""

    spans: _Spans
    padded: int
    document: Array | None

    @property
    def count(self) -> int:
        return self.padded // self.spans.steps

    def pad(self, x: Array | None) -> Array | None:
        return None if x is None else pad_to(x, 1, self.padded)


def _chunked(q: Array, resets: Array | None, chunk_size: int, span_size: int = DEFAULT_SPAN_SIZE,
             features: Features | None = None) -> _Chunked:
    """The chunk form's layout (``chunk.fast_weight_chunk``) of a ``[B, L, H, ...]`` slice; with
    ``features`` its spans map a span of raw q or k where it is used (``_Spans.mapped``)."""
    batch, length, heads, _ = q.shape
    chunk_size = max(min(chunk_size, length), 1)
    num_chunks = -(-length // chunk_size)
    num_spans = -(-num_chunks // max(span_size // chunk_size, 1))
    spans = _Spans(-(-num_chunks // num_spans), chunk_size, *batch_head_axes_of(q), features)
    document = None
    if resets is not None:
        per_head = jnp.broadcast_to(resets[:, :, None], (batch, length, heads))
        per_head = to_chunks_nbhc(per_head, chunk_size, jnp.int32, num_chunks=num_spans * spans.chunks)
        per_head = per_head.reshape(num_spans, spans.chunks, batch * heads, chunk_size)
        document = jnp.cumsum(per_head, axis=-1, dtype=jnp.int32)
    return _Chunked(spans, num_spans * spans.steps, document)


def _group(x: Array) -> Array:
    """``[B, H, ...] -> [B * H, ...]``, the chunk form's group axis."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _after_last_reset(resets: Array | None, length: int, batch: int) -> Array:
    """``[B, L]`` True for the steps whose writes reach the shard's end (after its last reset)."""
    if resets is None:
        return jnp.ones((batch, length), bool)
    return jnp.cumsum(resets, axis=1) == jnp.sum(resets, axis=1, keepdims=True)


def _transition(rule, k, v, beta, resets, acc, chunk_size, log_decay=None, features=None):
    """The shard's ``(M, N)``: ``W_end = M W_in + N`` (module docstring).

    The sum rule: ``N`` sums ``k_t v_t^T`` over the steps after the shard's last reset, ``M`` is 1
    per row without a reset, 0 with one. The delta rule: the chunk form's walk over the pair
    ``(N, M)`` from ``(0, I)`` with its writes ``U = U_tilde - Y N`` and ``-Y M`` (the values of
    ``M``'s part are zero), no outputs: ``2 C K (V + K)`` per chunk, the WY pieces shared.
    Gated (``log_decay``), both rules take that walk with the chunk form's decays: each chunk
    multiplies the pair by its ``exp(g_C)`` (an exp of a log sum) before adding its writes, so the
    sum rule's ``M`` is ``[B, H, 1, 1]``, the product of the chunks' factors.
    With ``features`` (raw k, width d) both rules take the walk too, which maps one span of k at a
    time: the sum rule's closed form would need ``phi(k)`` of the whole slice.
    """
    batch, length, heads, _ = k.shape
    key_dim = _key_dim(k, features)
    if rule == "sum" and log_decay is None and features is None:
        reach = _after_last_reset(resets, length, batch)
        n = _mm("blhk,blhv->bhkv", jnp.where(reach[:, :, None, None], k.astype(acc), 0.0), v.astype(acc))
        return _kept_without_reset(resets, batch, acc), n
    start = jnp.zeros((batch, heads, key_dim, v.shape[-1]), acc)
    m0 = (jnp.ones((batch, heads, 1, 1), acc) if rule == "sum"
          else jnp.broadcast_to(jnp.eye(key_dim, dtype=acc), (batch, heads, key_dim, key_dim)))
    return _state_walk(rule, k, v, beta, resets, acc, chunk_size, start, m0, log_decay, features)


def _key_dim(k: Array, features: Features | None) -> int:
    """K: k's width, or the feature map's when k is raw."""
    return k.shape[-1] if features is None else features.key_dim


def _kept_without_reset(resets: Array | None, batch: int, acc) -> Array:
    """The sum rule's ``M``: ``[B, 1, 1, 1]``, 1 for a row without a reset in the shard, else 0."""
    no_reset = jnp.ones((batch,), bool) if resets is None else ~jnp.any(resets, axis=1)
    return no_reset.astype(acc)[:, None, None, None]


def _end_state(rule, k, v, beta, resets, w_in, chunk_size, log_decay=None, features=None):
    """The state leaving the shard when ``w_in [B, H, K, V]`` enters it, without outputs: the relay
    scheme's walk (the delta rule's state walk alone, ``C K V`` a chunk less than the transition's
    ``(M, N)`` by ``M``'s ``4 C K^2``)."""
    if rule == "sum":
        m, n = _transition(rule, k, v, beta, resets, w_in.dtype, chunk_size, log_decay, features)
        return m * w_in + n
    return _state_walk(rule, k, v, beta, resets, w_in.dtype, chunk_size, w_in, None, log_decay, features)[1]


def _state_walk(rule, k, v, beta, resets, acc, chunk_size, n, m=None, log_decay=None, features=None):
    """The walk over the slice from the state ``n [B, H, K, V]`` (its end state from there) and,
    given ``m`` (``[B, H, K, K]``, or ``[B, H, 1, 1]`` for the gated sum rule), the same walk over
    ``m`` with zero values alongside (the transition's ``M`` from ``I``): ``(m or None, n)`` at the
    slice's end. The WY pieces and the decays are shared. With ``features`` k is raw and each span
    of it is mapped where it is used."""
    batch, _, heads, _ = k.shape
    layout = _chunked(k, resets, chunk_size, features=features)
    spans = layout.spans
    k, v, beta, log_decay = (layout.pad(x) for x in (k, v, beta, log_decay))

    def span(carry, xs):
        index, document = xs
        k_s = spans.mapped(spans.take(k, index))[0].astype(acc)
        v_s, beta_s, log_decay_s = (None if x is None else spans.take(x, index).astype(acc)
                                    for x in (v, beta, log_decay))
        docs = documents_of(document)
        decays = None if log_decay_s is None else chunk_decays(log_decay_s)
        same = None if docs is None else docs.same
        if rule == "delta":
            gram = None if decays is None else _mm("...ik,...jk->...ij", k_s, k_s) * decays.within
            inverse = wy_inverse(k_s, beta_s, same, gram=gram)
            u_tilde, y = wy_writes(inverse, _scaled_rows(None if decays is None else decays.start, k_s), v_s, beta_s)
            y = y if docs is None else _rows(docs.first, y)
        else:
            u_tilde, y = v_s, None
        options = _walk_options(docs, decays)

        def chunk(state, xs):
            (n, m), (k_c, u_c, y_c, keep_c, decay_c) = state, xs
            u_n = u_c if y_c is None else u_c - _mm("gck,gkv->gcv", y_c, n)
            u_m = None if m is None or y_c is None else _mm("gck,gkj->gcj", y_c, m)
            if decay_c is not None:  # gated: what entered the chunk decays by exp(g_C) (0 after a reset)
                n, m = (None if x is None else decay_c[:, None, None] * x for x in (n, m))
            elif keep_c is not None:  # a document starts in the chunk: what entered it is gone
                n, m = (None if x is None else jnp.where(keep_c[:, None, None], x, 0.0) for x in (n, m))
            if u_m is not None:
                m = m - _mm("gck,gcj->gkj", k_c, u_m)
            return (n + _mm("gck,gcv->gkv", k_c, u_n), m), None

        carry, _ = lax.scan(chunk, carry, (_walk_keys(k_s, docs, decays), u_tilde, y, options.get("keep"),
                                           options.get("decay")))
        return carry, None

    start = (_group(n), None if m is None else _group(m))
    (n, m), _ = lax.scan(span, start, (jnp.arange(layout.count), layout.document))
    n = n.reshape(batch, heads, *n.shape[1:])
    return None if m is None else m.reshape(batch, heads, *m.shape[1:]), n


def _entering_gradient(rule, q, k, beta, resets, scale, d_out, chunk_size, log_decay=None, d_end=None,
                       features=None):
    """``G``: the gradient of the state entering the shard from the shard's own outputs alone
    (its end state's gradient taken as zero), ``[B, H, K, V]``; given ``d_end``, the end state's
    gradient, the whole gradient of the entering state (the relay scheme's backward walk).

    The sum rule: ``scale * sum q_t dout_t^T`` over the steps before the shard's first reset.
    The delta rule: the chunk form's backward walk of the state gradient alone, chunks in reverse,
    ``dW0 = dW1 + Q_eff^T dO - Y^T K dW1`` (``Q_eff = Q - S Y``), no input gradients.
    Gated, both rules take that walk with the chunk form's decays (``dW0 = exp(g_C) dW1 + ...``);
    with ``features`` (raw q, k) too, mapping a span of them at a time.
    """
    acc = scale.dtype
    batch, length, heads, _ = q.shape
    key_dim = _key_dim(k, features)
    d_out = d_out.astype(acc)
    if rule == "sum" and log_decay is None and features is None:
        first = jnp.ones((batch, length), bool) if resets is None else jnp.cumsum(resets, axis=1) == 0
        g = scale * _mm("blhk,blhv->bhkv", jnp.where(first[:, :, None, None], q.astype(acc), 0.0), d_out)
        return g if d_end is None else g + _kept_without_reset(resets, batch, acc) * d_end
    layout = _chunked(q, resets, chunk_size, features=features)
    spans = layout.spans
    q, k, beta, d_out, log_decay = (layout.pad(x) for x in (q, k, beta, d_out, log_decay))
    no_values = jnp.zeros((*k.shape[:3], 0), acc)  # _pieces' U_tilde is not needed: zero-wide

    def span(dw, xs):
        index, document = xs
        q_s, k_s = (spans.mapped(spans.take(x, index))[0].astype(acc) for x in (q, k))
        beta_s, do_s, log_decay_s = (None if x is None else spans.take(x, index).astype(acc)
                                     for x in (beta, d_out, log_decay))
        docs = documents_of(document)
        p = _pieces(rule, q_s * scale, k_s, spans.take(no_values, index), beta_s, docs, log_decay_s)
        options = _walk_options(docs, p.decays)

        def chunk(dw1, xs):
            q_c, k_c, y_c, do_c, keep_c, decay_c = xs
            if decay_c is not None:
                dw0 = decay_c[:, None, None] * dw1
            else:
                dw0 = dw1 if keep_c is None else jnp.where(keep_c[:, None, None], dw1, 0.0)
            dw0 = dw0 + _mm("gck,gcv->gkv", q_c, do_c)
            if y_c is None:
                return dw0, None
            return dw0 - _mm("gck,gcv->gkv", y_c, _mm("gck,gkv->gcv", k_c, dw1)), None

        dw, _ = lax.scan(chunk, dw, (p.q_eff, _walk_keys(k_s, docs, p.decays), p.y, do_s, options.get("keep"),
                                     options.get("decay")), reverse=True)
        return dw, None

    start = jnp.zeros((batch * heads, key_dim, d_out.shape[-1]), acc) if d_end is None else _group(d_end)
    dw, _ = lax.scan(span, start, (jnp.arange(layout.count), layout.document), reverse=True)
    return dw.reshape(batch, heads, key_dim, d_out.shape[-1])


def _fold(rule: str, ms: Array, ns: Array, w0: Array) -> tuple[Array, Array]:
    """States entering each shard ``[P, B, H, K, V]`` and the final state, from the gathered (M, N)."""

    def step(w, mn):
        return _apply(rule, mn[0], w) + mn[1], w

    final, starts = lax.scan(step, w0, (ms, ns))
    return starts, final


def _relay(rule: str, m: Array, n: Array, w0: Array, axis: str, shards: int,
           with_final: bool = True) -> tuple[Array, Array | None]:
    """The state entering this shard, and the final state (on every shard; None unless
    ``with_final``), passed shard to shard: P - 1 rounds of a ``[B, H, K, V]`` ppermute, each shard
    sending ``M W + N`` of what it holds. A round costs every shard one ``K x K`` by ``K x V``
    product; shard r + 1 holds its true entering state after round r."""
    index = lax.axis_index(axis)
    w, shift = w0, [(i, i + 1) for i in range(shards - 1)]
    for r in range(shards - 1):
        received = lax.ppermute(_apply(rule, m, w) + n, axis, shift)
        w = jnp.where(index == r + 1, received, w)
    if not with_final:
        return w, None
    final = lax.psum(jnp.where(index == shards - 1, _apply(rule, m, w) + n, 0.0), axis)
    return w, final


def _relay_back(rule: str, m: Array, g: Array, d_final: Array, axis: str, shards: int) -> tuple[Array, Array]:
    """The gradient of this shard's end state, and initial_state's (on the first shard, zero on the
    others), passed the other way: shard p sends ``M^T dW_end + G``, its entering state's gradient."""
    index = lax.axis_index(axis)
    d, shift = d_final, [(i + 1, i) for i in range(shards - 1)]
    for r in range(shards - 1):
        received = lax.ppermute(_apply_transposed(rule, m, d) + g, axis, shift)
        d = jnp.where(index == shards - 2 - r, received, d)
    return d, jnp.where(index == 0, _apply_transposed(rule, m, d) + g, 0.0)


def _relay_walk(walk, w0: Array, axis: str, shards: int) -> Array:
    """The relay scheme's forward: the state entering this shard. In round r shard r alone walks its
    slice from its entering state (``walk(w)``: its end state; the others skip it) and passes the end
    to shard r + 1: P - 1 walks in a row, a ``[B, H, K, V]`` ppermute after each."""
    index = lax.axis_index(axis)
    w, shift = w0, [(i, i + 1) for i in range(shards - 1)]
    for r in range(shards - 1):
        end = lax.cond(index == r, walk, lambda w: w, w)
        w = jnp.where(index == r + 1, lax.ppermute(end, axis, shift), w)
    return w


def _relay_walk_back(walk, d_final: Array, axis: str, shards: int) -> Array:
    """The relay scheme's backward: the gradient of this shard's end state. In round r (from the last
    shard down) shard r alone walks the state gradient back over its slice from its end state's
    (``walk(d)``: its entering state's) and passes it to shard r - 1."""
    index = lax.axis_index(axis)
    d, shift = d_final, [(i + 1, i) for i in range(shards - 1)]
    for r in range(shards - 1, 0, -1):
        entering = lax.cond(index == r, walk, lambda d: d, d)
        d = jnp.where(index == r - 1, lax.ppermute(entering, axis, shift), d)
    return d


def _chunk_forward(rule, q, k, v, beta, w_in, resets, scale, chunk_size, log_decay=None, features=None):
    """The chunk form's forward over the slice from ``w_in``: its outputs, end state ``[B, H, K, V]``
    and residuals (its custom_vjp's own: the inputs, the writes U and each span's end state), so
    the backward needs no recompute (with ``features`` the raw q, k: phi is recomputed there)."""
    layout = _chunked(q, resets, chunk_size, features=features)
    batch, length, heads, _ = q.shape
    w0 = w_in.reshape(batch * heads, *w_in.shape[2:])
    (out, end), residuals = _chunked_forward(rule, XLA_WALK, layout.spans, *(layout.pad(x) for x in (q, k, v, beta)),
                                             w0, layout.document, scale, layout.pad(log_decay))
    return out[:, :length], end.reshape(w_in.shape), residuals


def _chunk_backward(rule, q, resets, chunk_size, residuals, d_out, d_end, features=None):
    """The chunk form's backward over the slice: ``(dq, dk, dv, dbeta, d_log_decay)``, the entering
    state's gradient ``[B, H, K, V]`` and scale's (dq, dk at q's width: through phi's VJP with
    ``features``)."""
    layout = _chunked(q, resets, chunk_size, features=features)
    length = q.shape[1]
    dq, dk, dv, dbeta, d_in, _, d_scale, d_log_decay = _chunked_backward(rule, XLA_WALK, layout.spans, residuals,
                                                                         (layout.pad(d_out), _group(d_end)))
    grads = tuple(None if x is None else x[:, :length] for x in (dq, dk, dv, dbeta, d_log_decay))
    return grads, d_in.reshape(d_end.shape), d_scale


class _Static(NamedTuple):
    rule: str
    chunk_size: int
    plan: ContextPlan
    engine: str  # "chunk" (XLA) or "pallas" (the TPU kernel) for each shard's forward and backward
    scheme: str  # "transition" or "relay" (context_cost.py)
    # q, k raw (width d), every walk mapping a span of them where it is used, the backward
    # recomputing phi and applying its VJP: a shard keeps them d wide. None: q, k are K wide.
    features: Features | None = None
    # Pallas's TPU interpret mode makes each kernel call a barrier of all the shards (threads of one
    # process), so a collective that one shard runs before its kernel and another after can
    # deadlock them: the shard's collectives are then ordered around the kernel (_shard_forward).
    ordered: bool = False


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _shard_op(static: _Static, q, k, v, beta, w0, segment_ids, scale, log_decay=None):
    """One shard's part of the op (inside shard_map): ``(out, final_state)`` of the whole sequence."""
    (out, final), _ = _shard_forward(static, q, k, v, beta, w0, segment_ids, scale, log_decay)
    return out, final


def _shard_forward(static: _Static, q, k, v, beta, w0, segment_ids, scale, log_decay=None):
    rule, chunk_size, plan, engine, scheme, features, ordered = static
    acc = w0.dtype
    resets = _local_resets(segment_ids, plan.axis, plan.shards)
    m = None
    if scheme == "transition":
        m, n = _transition(rule, k, v, beta, resets, acc, chunk_size, log_decay, features)
        w_in, final = _relay(rule, m, n, w0, plan.axis, plan.shards, with_final=engine != "pallas")
    else:
        walk = partial(_end_state, rule, k, v, beta, resets, chunk_size=chunk_size, log_decay=log_decay,
                       features=features)
        w_in = _relay_walk(walk, w0, plan.axis, plan.shards)
    if engine == "pallas":
        # The kernel's own custom_vjp keeps what its backward needs; its pullback is the residual.
        # It gets the shard's resets (ungated, it runs gated with log alpha = 0 but at them) and the
        # map, which it computes itself where tpu_kernel_features says it can: q, k stay d wide.
        def kernel(q, k, v, beta, w_in, scale, log_decay):
            return fast_weight_pallas(q, k, v, beta, w_in, rule=rule, scale=scale, chunk_size=chunk_size,
                                      resets=resets, log_decay=log_decay, features=features)

        (out, end), residuals = jax.vjp(kernel, q, k, v, beta, w_in, scale, log_decay)
    else:
        out, end, residuals = _chunk_forward(rule, q, k, v, beta, w_in, resets, scale, chunk_size, log_decay,
                                             features)
    if scheme == "relay" or engine == "pallas":
        # The last shard's end, from its own forward (with the kernel, so that every collective of
        # the forward but this one comes before the kernel: see _Static.ordered).
        final = lax.psum(jnp.where(lax.axis_index(plan.axis) == plan.shards - 1, end, 0.0), plan.axis)
    return (out, final), (q, k, beta, segment_ids, scale, m, residuals, log_decay, end if ordered else None)


def _shard_backward(static: _Static, saved, cotangents):
    rule, chunk_size, plan, engine, scheme, features, ordered = static
    q, k, beta, segment_ids, scale, m, residuals, log_decay, end = saved
    d_out, d_final = cotangents
    if ordered:  # the backward's collectives after the forward's kernel (_Static.ordered)
        (d_out, d_final), _ = lax.optimization_barrier(((d_out, d_final), end))
    # The final state is replicated over the shards: differentiating the shard_map hands its
    # cotangent over in parts (summing to the whole), which the fold needs whole on every shard.
    d_final = lax.psum(d_final, plan.axis)
    resets = _local_resets(segment_ids, plan.axis, plan.shards)
    entering = partial(_entering_gradient, rule, q, k, beta, resets, scale, d_out, chunk_size, log_decay,
                       features=features)
    if scheme == "transition":
        # Differentiating the shard_map sums the cotangents of its replicated inputs over the shards:
        # initial_state's gradient comes from the first shard alone, scale's is each shard's own part.
        d_end, d_w0 = _relay_back(rule, m, entering(), d_final, plan.axis, plan.shards)
    else:
        d_end = _relay_walk_back(lambda d: entering(d_end=d), d_final, plan.axis, plan.shards)
    if engine == "pallas":
        dq, dk, dv, dbeta, d_in, d_scale, d_log_decay = residuals((d_out, d_end))
    else:
        (dq, dk, dv, dbeta, d_log_decay), d_in, d_scale = _chunk_backward(rule, q, resets, chunk_size, residuals,
                                                                          d_out, d_end, features)
    if scheme == "relay":  # the first shard's backward gives initial_state's gradient
        d_w0 = jnp.where(lax.axis_index(plan.axis) == 0, d_in, 0.0)
    grads = dq, dk, dv, dbeta, d_w0, None, d_scale.astype(scale.dtype), d_log_decay
    # The sums over the shards that differentiating the shard_map adds (initial_state's, scale's)
    # after the backward's kernel (_Static.ordered).
    return lax.optimization_barrier(grads) if ordered else grads


_shard_op.defvjp(_shard_forward, _shard_backward)


def _interpreted() -> bool:
    """Whether the TPU kernel runs interpreted (``pltpu.force_tpu_interpret_mode()``); Pallas is
    imported here, not with the module, as in ``pallas.py``."""
    from pallas_kernels.tpu import tpu_interpret_params

    return tpu_interpret_params() is not None


def _specs(plan: ContextPlan, beta: Array | None, segment_ids: Array | None):
    seq, state = plan.spec("B", "T", "H"), plan.spec("B", "H")
    beta_spec = None if beta is None else seq
    ids_spec = None if segment_ids is None else plan.spec("B", "T")
    return seq, beta_spec, ids_spec, state


def _resharded(plan: ContextPlan, args: tuple, specs: tuple) -> tuple:
    """Under an explicit mesh, ``args`` resharded to ``specs`` where they differ (a replicated
    ``initial_state`` takes the inputs' batch and head sharding, say); under an Auto mesh as they are."""
    if not plan.explicit:
        return args
    return tuple(x if x is None or jax.typeof(x).sharding.spec == spec
                 else jax.sharding.reshard(x, jax.sharding.NamedSharding(plan.mesh, spec))
                 for x, spec in zip(args, specs, strict=True))


def _shard_map(plan: ContextPlan, body, in_specs, out_specs):
    """``body`` over the shards: under an explicit mesh every axis is manual (the inputs come sharded
    as ``in_specs`` say, after :func:`_resharded`), under an Auto mesh only the T axis is, the others
    being left to the partitioner. Autodiff goes through it: the residuals the custom_vjp keeps
    stay on their shards, and the cotangents of replicated inputs are summed over the shards."""
    axis_names = set(plan.mesh.axis_names) if plan.explicit else {plan.axis}
    return jax.shard_map(body, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs, axis_names=axis_names,
                         check_vma=False)


def fast_weight_context_parallel(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    *,
    rule: str,
    scale: float | Array,
    chunk_size: int,
    segment_ids: Array | None,
    plan: ContextPlan,
    impl: str = "chunk",
    log_decay: Array | None = None,
    scheme: str | None = None,
    features: Features | None = None,
) -> tuple[Array, Array]:
    """The op whose contract :func:`.naive.fast_weight_reference` states, with T sharded as ``plan``
    says (:func:`context_plan`), every shard running the chunk form on its slice (module docstring).

    ``initial_state`` enters the first shard; the final state (the last shard's end) and its
    gradient are replicated over the T axis. ``impl="pallas"``: the Pallas TPU kernel runs each
    shard's forward and backward (on a TPU, or inside ``pltpu.force_tpu_interpret_mode()``).
    ``scheme``: ``"transition"`` or ``"relay"`` (``context_cost.py``); None picks the one with the
    shorter critical path for the call (:func:`.context_cost.choose_scheme`).
    ``features`` (:class:`dpfp_jax.Features`): q, k are raw (width d) and every shard maps them
    where it uses them and keeps them d wide for its backward (``_Static``); with
    ``impl="pallas"`` each shard's TPU kernel is given them raw with the map (it computes the maps
    :func:`.pallas.tpu_kernel_features` names itself, and is given others mapped per shard).
    ``initial_state`` is then ``[B, H, features.key_dim, V]``. ``log_decay`` and ``segment_ids``
    (each shard's local resets) go to either engine; the TPU kernel runs gated with them.
    """
    if scheme is None:
        chunk = max(min(chunk_size, q.shape[1] // plan.shards), 1)
        scheme = choose_scheme(rule, plan.shards, chunk, _key_dim(k, features), v.shape[-1])
    elif scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES} or None; got {scheme!r}")
    engine = "pallas" if impl == "pallas" else "chunk"
    if engine == "pallas":
        if not runs_tpu_kernel():
            # The GPU kernels have not run on a GPU yet, and not as a shard's engine anywhere.
            raise ValueError("impl='pallas' with a sharded T runs the Pallas TPU kernel per shard: on a TPU, or on a "
                             "CPU inside pltpu.force_tpu_interpret_mode(); elsewhere use impl='chunk'")
        reason = pallas_supports(q, k, v, beta, features=features, log_decay=log_decay)
        if reason is not None:
            raise ValueError(f"impl='pallas' cannot take this call: {reason}")
    acc = accumulation_dtype(q, k, v, beta, initial_state, log_decay)
    static = _Static(rule, chunk_size, plan, engine, scheme, features, ordered=engine == "pallas" and _interpreted())
    seq, beta_spec, ids_spec, state = _specs(plan, beta, segment_ids)
    specs = (seq, seq, seq, beta_spec, state, ids_spec)
    args = _resharded(plan, (q, k, v, beta, initial_state.astype(acc), segment_ids), specs)
    if log_decay is None:
        run = _shard_map(plan, partial(_shard_op, static), (*specs, PartitionSpec()), (seq, state))
        return run(*args, jnp.asarray(scale, acc))
    # Gated: log_decay [B, T, H] is sharded as beta is.
    (log_decay,) = _resharded(plan, (log_decay,), (plan.spec("B", "T", "H"),))
    run = _shard_map(plan, partial(_shard_op, static), (*specs, PartitionSpec(), plan.spec("B", "T", "H")),
                     (seq, state))
    return run(*args, jnp.asarray(scale, acc), log_decay)


def running_key_sum_context_parallel(phi_k: Array, start: Array, segment_ids: Array | None = None, *,
                                     context_axis: str | None = None) -> tuple[Array, Array]:
    """The ``attention`` normalisation's running key sum with T sharded as :func:`context_plan`
    finds it: ``(z [B, T, H, K], z_T [B, H, K])``, float32, ``z_t`` the sum of ``phi_k`` over the
    steps of t's document up to t (the row's first document adding ``start [B, H, K]``) and
    ``z_T`` the last step's (``start`` when T = 0), replicated over the T axis.

    ``dpfp_jax.core.segments.running_key_sum`` with the ids instead of the resets, and the last
    step's sum returned, not indexed (indexing a sharded T is refused under an explicit mesh).
    Each shard sums its own slice, the shards all-gather their totals (and whether a document
    starts in them: ``[P, B, H, K]``, never the sequence) and add what enters them. Without a
    sharded T it is that function itself.

    Example:
        >>> import jax.numpy as jnp
        >>> z, last = running_key_sum_context_parallel(jnp.ones((1, 4, 1, 1)), jnp.full((1, 1, 1), 10.0))
        >>> z[0, :, 0, 0].tolist(), last[0, 0].tolist()
        ([11.0, 12.0, 13.0, 14.0], [14.0])
    """

    start = start.astype(jnp.float32)
    plan = context_plan(phi_k, context_axis, "chunk")
    if plan is None:
        z = running_key_sum(phi_k, start, None if segment_ids is None else resets_of(segment_ids))
        return z, z[:, -1] if z.shape[1] else start
    seq, _, ids_spec, state = _specs(plan, None, segment_ids)

    def body(phi_k, start, segment_ids):
        resets = _local_resets(segment_ids, plan.axis, plan.shards)
        local = running_key_sum(phi_k, jnp.zeros_like(start), resets)
        keep = jnp.ones(phi_k.shape[:1], bool) if resets is None else ~jnp.any(resets, axis=1)
        keeps = lax.all_gather(keep.astype(jnp.float32)[:, None, None], plan.axis)
        totals = lax.all_gather(local[:, -1], plan.axis)
        starts, last = _fold("sum", keeps, totals, start)
        index = lax.axis_index(plan.axis)
        entering = lax.dynamic_index_in_dim(starts, index, keepdims=False)
        first = jnp.ones(phi_k.shape[:2], bool) if resets is None else jnp.cumsum(resets, axis=1) == 0
        return local + jnp.where(first[:, :, None, None], entering[:, None], 0.0), last

    run = jax.shard_map(body, mesh=plan.mesh, in_specs=(seq, state, ids_spec), out_specs=(seq, state),
                        check_vma=False, axis_names=set(plan.mesh.axis_names) if plan.explicit else {plan.axis})
    return run(*_resharded(plan, (phi_k, start, segment_ids), (seq, state, ids_spec)))
