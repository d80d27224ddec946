"""``fast_weight``: the fast-weight (linear-attention) op, with one dispatcher over its impls.

Side by side, one file each: ``naive`` (the oracle), ``recurrent`` (scan + memory-lean
custom backward), ``chunk`` (chunkwise parallel, with its state-independent WY pieces in
``wy``), ``pallas`` (the GPU kernels of ``pallas_kernels``, explicit only until they have passed
the tests on a GPU). Every implementation has a ``supports`` check that returns ``None`` or
the reason it cannot take a call; ``impl="auto"`` picks the first that accepts, an explicit impl
that cannot take the call raises that reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dpfp_jax.feature_maps import Features
from dpfp_jax.ops.fast_weight.chunk import DEFAULT_CHUNK_SIZE, fast_weight_chunk
from dpfp_jax.ops.fast_weight.common import with_batch_head_sharding_of, zero_state
from dpfp_jax.ops.fast_weight.context_parallel import context_plan, fast_weight_context_parallel
from dpfp_jax.ops.fast_weight.eager import jit_when_eager
from dpfp_jax.ops.fast_weight.forward_mode import refuse_forward_mode
from dpfp_jax.ops.fast_weight.naive import fast_weight_reference
from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas, pallas_supports
from dpfp_jax.ops.fast_weight.recurrent import fast_weight_scan
from dpfp_jax.ops.fast_weight.segments import resets_of
from dpfp_jax.ops.fast_weight.stability import check_delta_stability
from dpfp_jax.ops.fast_weight.validation import (
    RULES,
    check_bool,
    check_fast_weight_inputs,
    check_log_decay,
    check_log_decay_values,
    check_scale,
    check_segment_ids,
)
from dpfp_jax.validation import check_positive_int

Array = jax.Array

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "GATED_IMPLS",
    "IMPLS",
    "RULES",
    "check_delta_stability",
    "fast_weight",
    "fast_weight_chunk",
    "fast_weight_reference",
    "fast_weight_scan",
]

Impl = Callable[..., tuple[Array, Array]]


def _always(*args: object, **kwargs: object) -> str | None:
    return None


GATED_IMPLS = ("reference", "scan", "chunk")
"""The impls that take ``log_decay`` (gated fast weights) everywhere; ``"auto"`` picks among them.
``"pallas"`` takes it too, where it runs (the TPU kernel; on a GPU the fused chunk kernel where it
runs (runs_fused_chunk), the fused recurrent one otherwise)."""


def _check_log_decay_eagerly(arguments: dict) -> None:
    """``jit_when_eager``'s value check: a positive or NaN ``log_decay`` of an eager call is refused
    before the jitted op runs (inside it the values are traced). When it fails, q, k, v are
    checked first, so a malformed call gets the message of the check that concerns it."""
    log_decay, q = arguments.get("log_decay"), arguments.get("q")
    if log_decay is None or not hasattr(q, "shape"):
        return
    try:
        check_log_decay(log_decay, q)
        check_log_decay_values(log_decay)
    except (TypeError, ValueError):
        # Only on failure (this runs on every eager call): a malformed q, k or v is the error to report.
        check_fast_weight_inputs(q, arguments.get("k"), arguments.get("v"), arguments.get("beta"),
                                 arguments.get("rule", "delta"), arguments.get("initial_state"),
                                 arguments.get("features"))
        raise


# name -> (function, supports); "auto" tries them in the order auto_candidates gives.
_IMPLS: dict[str, tuple[Impl, Callable[..., str | None]]] = {
    "reference": (fast_weight_reference, _always),
    "scan": (fast_weight_scan, _always),
    "chunk": (fast_weight_chunk, _always),
    "pallas": (fast_weight_pallas, pallas_supports),
}
# The impls that take ``features`` themselves (fused; "pallas" where its TPU kernel or a fused GPU
# kernel computes the map, else it applies the map before its kernels); the others are
# given phi(q), phi(k).
_FUSE_FEATURES = ("scan", "chunk", "pallas")


def auto_candidates(q: Array, chunk_size: int) -> tuple[str, ...]:
    """``chunk`` from one full chunk of steps on, ``scan`` below (a decoding step, say).

    The choice optimises training (forward+backward), whether or not a backward follows.
    benchmarks/chunk.py --crossover on this project's CPU machine (docs/reports/cpu_benchmarks.md): chunk's
    forward+backward beats scan's at every T from one chunk on (T = 64 to 4096), at K = 128 and 512 and
    with a loss on the outputs alone or on both results (scan took 1.42x to 3.38x of its time); the
    forward alone is close at T <= 1024 (chunk's took 0.64x to 1.45x of scan's, slower in half the
    cases), so a forward-only CPU call there may be faster with ``impl="scan"``.
    Below one chunk (not measured there) the scan is kept, the chunk form being a single [T, T] block. On
    GPU and TPU the chunkwise form is the matmul-shaped one; that it is faster there is not measured yet.
    """
    return ("chunk", "scan") if q.shape[1] >= chunk_size else ("scan",)


IMPLS = (*_IMPLS, "auto")
"""Accepted values of ``impl``."""


@functools.partial(jit_when_eager,
                   dynamic=("q", "k", "v", "beta", "initial_state", "scale", "segment_ids", "log_decay"),
                   numbers_ok=("scale",), eager_check=_check_log_decay_eagerly)
def fast_weight(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None = None,
    *,
    rule: str = "delta",
    initial_state: Array | None = None,
    scale: float | Array = 1.0,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    segment_ids: Array | None = None,
    check_stability: bool = False,
    context_axis: str | None = None,
    features: Features | None = None,
    log_decay: Array | None = None,
) -> tuple[Array, Array]:
    """Run fast-weight memory over a sequence; returns ``(out, final_state)``.

    Per batch element and head, with W in R^{K x V} starting at ``initial_state`` (zeros when
    None):

    - ``rule="sum"`` (linear attention): ``W_t = W_{t-1} + k_t v_t^T``
    - ``rule="delta"`` (Schlag et al. 2021, Sec. 4.2):
      ``W_t = W_{t-1} + beta_t k_t (v_t - W_{t-1}^T k_t)^T``
    - output ``o_t = scale * W_t^T q_t``.

    Gated (``log_decay`` given, ``[B, T, H]``, alpha_t = exp(log_decay_t) in [0, 1]): W_{t-1} decays
    by alpha_t before step t's write, ``W_t = alpha_t (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T``
    (delta; the Gated DeltaNet form) or ``W_t = alpha_t W_{t-1} + k_t v_t^T`` (sum). None is the
    ungated op, computed exactly as without the argument. docs/contract.md says the rest.

    Packed documents: with ``segment_ids``, W is set to zero before step t wherever
    ``segment_ids[b, t] != segment_ids[b, t - 1]``, so each document (a run of equal ids) reads and
    writes only its own fast weights: outputs and gradients are those of running each document
    alone. ``initial_state`` belongs to the row's first document and ``final_state`` is the last
    one's.

    ``q`` and ``k`` are already feature-mapped (and, for the paper's delta-rule layers,
    sum-normalised), unless ``features`` is given: then they are the raw queries and keys and the
    op applies the feature map itself (below). The state and its accumulation are float32 for
    float32, bfloat16 or float16 inputs (float64 when an input is float64, with x64 enabled).

    Stability of the delta rule: a step is ``W_t = (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T``,
    and ``I - beta k k^T`` is non-expanding only while ``0 <= beta_t |k_t|^2 <= 2``. Keys that break
    it make the state grow exponentially (raw Gaussian keys of width 64 overflow float32 within about
    a hundred steps, and the outputs turn to NaN without an error); nothing checks it unless
    ``check_stability=True`` asks for it (below). Normalised keys keep it at every step, for any length:
    :func:`dpfp_jax.sum_norm` (non-negative features) or :func:`dpfp_jax.l2_norm` (any sign) give
    ``|k| <= 1``, and beta in ``[0, 1]`` (a sigmoid) then gives ``beta |k|^2 <= 1``. Then, whatever
    the keys, a column ``W[:, j]`` gains at most ``beta_t v_tj^2 / (2 - beta_t |k_t|^2)`` in squared
    norm per step: no exponential growth, at worst like sqrt(t).

    Where a non-finite input (NaN or inf) at step t reaches: a query ``q_t`` only the output
    ``o_t``; a key ``k_t``, value ``v_t`` or ``beta_t`` (its write) ``o_t``, every later output
    and the final state, within its batch element and head. ``"scan"`` and ``"reference"`` are
    strictly causal: nothing before t is touched. The chunked paths (``"chunk"``, ``"auto"``
    from one chunk on, ``"pallas"`` from one chunk on with a power-of-two ``chunk_size`` >= 16)
    mix the ``chunk_size`` steps of a chunk in masked matmuls, where the masked zero times a NaN
    or inf is NaN, so a bad write can also reach the outputs of the steps of its own chunk before
    t; earlier chunks are untouched. To leave a token out (padding), give it zero ``k``, ``v`` and
    ``beta`` by selection (``jnp.where``), not by multiplying with a mask, as the linen modules'
    ``mask`` does.

    Args:
      q: ``[B, T, H, K]`` queries.
      k: ``[B, T, H, K]`` keys.
      v: ``[B, T, H, V]`` values.
      beta: ``[B, T, H]`` write strengths, required for the delta rule, refused for the sum rule.
      rule: ``"delta"`` or ``"sum"``.
      initial_state: ``[B, H, K, V]`` fast weights to start from (carried from a previous segment).
      scale: multiplies the outputs: a Python or numpy number or a 0-d array, which may be traced
        (a jit argument) and is differentiated, on every impl.
      impl: ``"reference"`` (plain scan, autodiff: the oracle), ``"scan"`` (scan with a backward
        that recomputes states, O(K*V) memory per head), ``"chunk"`` (chunkwise parallel:
        matmuls over chunks of ``chunk_size`` steps), ``"pallas"`` (on a GPU the Pallas Triton
        kernels: fused chunk from one chunk on when ``chunk_size`` is a power of two >= 16, fused
        recurrent otherwise; on a TPU, or on a CPU inside
        ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()``, the Pallas TPU kernel; a
        ValueError saying why anywhere else), or ``"auto"`` (``chunk`` when T >= chunk_size, else
        ``scan``: it optimises forward+backward time; the docs' benchmarks page says by how much).
      chunk_size: steps per chunk for ``impl="chunk"`` and ``"pallas"`` (the other impls compute
        the same function without chunks and do not use it); ``"chunk"`` takes one chunk of T
        steps when ``chunk_size`` is above T, so its cost follows T.
      segment_ids: ``[B, T]`` integer document ids (packed documents, see above); ids need not be
        sorted or start at zero, and padding may be a document of its own. Documents may start
        anywhere, chunk boundaries included or not. What each impl keeps for its backward with
        them: docs/math.md, "Packed documents".
      context_axis: the mesh axis that shards T (context parallelism, docs/context_parallel.md):
        every device runs the chunk form on its slice and only state-sized arrays are exchanged.
        Under an explicit mesh a T sharded in the inputs' types is found without it; under an
        Auto mesh (``jax.set_mesh``) name it here. ``impl`` must then be ``"chunk"``, ``"auto"`` or
        ``"pallas"`` (the TPU kernel per shard).
      check_stability: delta rule only: check ``0 <= beta_t |k_t|^2 <= 2`` at every step and raise a
        ValueError naming the first (batch, head, step) that breaks it, before the op runs
        (:func:`~dpfp_jax.check_delta_stability`, which says the tolerance); with ``log_decay``
        (either rule) also ``log_decay <= 0`` where it is traced. Under ``jax.jit`` the check is a
        ``jax.experimental.checkify`` check: wrap the jitted function in ``checkify.checkify`` to
        get its error. Off by default, and then nothing of it is computed or traced.
      features: a :class:`dpfp_jax.Features` (feature map, ``dim``, ``nu``, normalisation,
        ``eps``): q and k are then raw, ``[B, T, H, features.dim]``, and the op computes what it
        computes without ``features`` on ``features(q), features(k)`` (K = ``features.key_dim``
        in ``initial_state`` and the final state). ``"scan"`` and ``"chunk"`` (so ``"auto"``)
        apply the map where q and k are used and keep them at width d for the backward (a gated ``"scan"``,
        with ``log_decay``, is given phi(q), phi(k) mapped first), which
        recomputes phi and applies its VJP (docs/math.md); so does every shard of a sharded T
        (``context_axis``, the chunk form or the TPU kernel per shard); ``"pallas"``'s TPU kernel
        computes DPFP, identity, relu and ``"linear"`` itself (d in 32, 64, 128;
        docs/tpu_kernel.md) and its fused GPU kernels DPFP (d a multiple of 32, nu <= 4, eps > 0;
        the fused recurrent one without ``segment_ids`` or a gate; docs/gpu_kernels.md);
        ``"reference"`` and the other Pallas kernels are given phi(q), phi(k), computed first.
      log_decay: ``[B, T, H]`` float, ``log alpha_t <= 0`` (``-inf``: alpha = 0, a full forget), or None (no
        gate). Taken by ``"reference"``, ``"scan"``, ``"chunk"``, ``"auto"`` (which never picks
        ``"pallas"``) and ``"pallas"`` (the TPU kernel; on a GPU the fused chunk kernel where it runs, the
        fused recurrent one otherwise; on a CPU outside interpret mode ``impl="pallas"`` says it cannot
        run), with ``initial_state``, ``segment_ids`` (a reset at t zeroes W whatever alpha_t is) and
        ``context_axis``. Gradients flow to it. Positive or NaN values are refused with a ValueError when
        the values are known (an eager call); traced ones are used as given (an alpha above 1 grows the
        state) unless ``check_stability=True`` stages their check.

    Eager calls (no ``jit`` around the call) run an internal ``jax.jit`` keyed on the shapes, the
    dtypes and the options above, so only the first call with new ones traces (docs/op_checks.md).

    Forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) works with ``impl="reference"`` only: the
    other impls' memory-lean backward is a ``jax.custom_vjp``, which JAX differentiates in reverse
    mode only, and they raise a TypeError that says so. ``jax.hessian`` (forward over reverse)
    works with every impl.

    Returns:
      ``out [B, T, H, V]`` in v's dtype and ``final_state [B, H, K, V]`` float32 (float64 for
      float64 inputs). Gradients flow
      to every input, from losses on either. The oracle's docstring,
      ``dpfp_jax.ops.fast_weight.naive.fast_weight_reference``, states the precise contract.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import dpfp_jax as dj
        >>> B, T, H, d = 2, 16, 4, 8
        >>> x = jax.random.normal(jax.random.key(0), (3, B, T, H, d))
        >>> q, k = dj.sum_norm(dj.dpfp(x[0])), dj.sum_norm(dj.dpfp(x[1]))
        >>> beta = jax.nn.sigmoid(x[2, ..., 0])
        >>> out, state = dj.fast_weight(q, k, x[2], beta)
        >>> out.shape, state.shape
        ((2, 16, 4, 8), (2, 4, 16, 8))
        >>> phi = dj.Features("dpfp", dim=d, nu=1, normalization="sum")  # the same, phi inside the op
        >>> out_fused, state_fused = dj.fast_weight(x[0], x[1], x[2], beta, features=phi)
        >>> bool(jnp.allclose(out_fused, out, atol=1e-6)), state_fused.shape
        (True, (2, 4, 16, 8))
    """
    check_fast_weight_inputs(q, k, v, beta, rule, initial_state, features)
    check_scale(scale)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    check_segment_ids(segment_ids, q)
    check_log_decay(log_decay, q)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    checked = check_bool("check_stability", check_stability)
    if checked:
        if rule != "delta" and log_decay is None:
            raise ValueError(f"check_stability checks the delta rule's condition 0 <= beta |k|^2 <= 2 (and log_decay "
                             f"<= 0 when given); rule={rule!r} without log_decay has none")
        if rule == "delta":
            check_delta_stability(k if features is None else features(k), beta)
    check_log_decay_values(log_decay, traced_check=checked)
    plan = context_plan(q, context_axis, impl)
    if plan is not None:
        if initial_state is None:
            initial_state = zero_state(q, v, jnp.float32, None if features is None else features.key_dim)
        with refuse_forward_mode("pallas" if impl == "pallas" else "chunk", impl, q, k, v, beta, initial_state,
                                 scale, log_decay):
            return fast_weight_context_parallel(q, k, v, beta, initial_state, rule=rule, scale=scale,
                                                chunk_size=chunk_size, segment_ids=segment_ids, plan=plan, impl=impl,
                                                log_decay=log_decay, features=features)
    candidates = auto_candidates(q, chunk_size) if impl == "auto" else (impl,)
    reasons = []
    resets = None if segment_ids is None else resets_of(segment_ids)
    for name in candidates:
        fn, supports = _IMPLS[name]
        reason = supports(q, k, v, beta, rule=rule, initial_state=initial_state, resets=resets, features=features,
                          log_decay=log_decay)
        if reason is None:
            if initial_state is None:
                initial_state = zero_state(q, v, jnp.float32, None if features is None else features.key_dim)
            else:
                initial_state = with_batch_head_sharding_of(initial_state, q)
            options = {"chunk_size": chunk_size} if name in ("chunk", "pallas") else {}
            if features is not None and name in _FUSE_FEATURES:
                options["features"] = features
            elif features is not None:
                q, k = features(q), features(k)
            if log_decay is not None:
                options["log_decay"] = log_decay
            with refuse_forward_mode(name, impl, q, k, v, beta, initial_state, scale, log_decay):
                return fn(q, k, v, beta, initial_state, rule=rule, scale=scale, resets=resets, **options)
        reasons.append(f"{name}: {reason}")
    raise ValueError(f"impl={impl!r} cannot take this call: " + "; ".join(reasons))
