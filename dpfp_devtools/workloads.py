"""What the tests and the benchmarks both run: inputs, the op's forward and backward, kernel programs.

One input maker serves both, so a benchmark's figures and a test's checks are about the same
kind of data: sum-normalised non-negative q and k (as DPFP gives), Gaussian v, sigmoid beta,
drawn in float32 and cast, so that every dtype sees the same numbers.

Example:
    >>> inputs = make_inputs(batch=1, time=5, heads=2, key_dim=4, value_dim=3, rule="sum")
    >>> {name: None if x is None else x.shape for name, x in inputs.items()}
    {'q': (1, 5, 2, 4), 'k': (1, 5, 2, 4), 'v': (1, 5, 2, 3), 'beta': None, 'initial_state': None}
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

import dpfp_jax as dj
from dpfp_jax.ops.fast_weight.chunk import fast_weight_chunk
from dpfp_jax.ops.fast_weight.common import zero_state
from dpfp_jax.ops.fast_weight.wy import wy_inverse
from pallas_kernels import chunk_walk, fused_chunk, fused_recurrent
from pallas_kernels.triton.dpfp import DPFP
from pallas_kernels.triton.tiles import float32_or_wider

FastWeightFn = Callable[..., tuple[jax.Array, jax.Array]]


def make_inputs(
    seed: int = 0,
    *,
    batch: int = 2,
    time: int = 17,
    heads: int = 2,
    key_dim: int = 8,
    value_dim: int = 4,
    rule: str = "delta",
    dtype=jnp.float32,
    with_state: bool = False,
) -> dict[str, jax.Array | None]:
    """Keyword arguments q, k, v, beta, initial_state for ``dj.fast_weight``, from ``seed``.

    beta is None for ``rule="sum"`` and initial_state is None unless ``with_state``; the other
    draws do not depend on either, so a sum-rule call sees the delta-rule call's q, k and v.

    Example:
        >>> inputs = make_inputs(batch=1, time=3, heads=1, key_dim=2, value_dim=2)
        >>> bool(inputs["q"].sum(-1).max() <= 1.0), inputs["beta"].shape
        (True, (1, 3, 1))
    """
    ks = jax.random.split(jax.random.key(seed), 5)
    shape = (batch, time, heads, key_dim)
    q = dj.sum_norm(jax.nn.relu(jax.random.normal(ks[0], shape, jnp.float32)))
    k = dj.sum_norm(jax.nn.relu(jax.random.normal(ks[1], shape, jnp.float32)))
    v = jax.random.normal(ks[2], (batch, time, heads, value_dim), jnp.float32)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (batch, time, heads), jnp.float32)) if rule == "delta" else None
    state = jax.random.normal(ks[4], (batch, heads, key_dim, value_dim), jnp.float32) if with_state else None
    return {name: None if x is None else x.astype(dtype)
            for name, x in dict(q=q, k=k, v=v, beta=beta, initial_state=state).items()}


def ours(impl: str, **options: object) -> FastWeightFn:
    """``fn(q, k, v, beta) -> (out, final state)``: ``dj.fast_weight``'s delta rule with ``impl``."""

    def fn(q, k, v, beta):
        return dj.fast_weight(q, k, v, beta, rule="delta", impl=impl, **options)

    return fn


def with_features(impl: str, features: dj.Features, *, fused: bool, **options: object) -> FastWeightFn:
    """``fn(q, k, v, beta)`` on raw q, k (width ``features.dim``): the delta rule with the op given
    ``features`` (``fused``) or given ``features(q), features(k)`` (the map applied before it)."""

    def fn(q, k, v, beta):
        if fused:
            return dj.fast_weight(q, k, v, beta, rule="delta", impl=impl, features=features, **options)
        return dj.fast_weight(features(q), features(k), v, beta, rule="delta", impl=impl, **options)

    return fn


def attention_training_step(fuse_features: bool, impl: str = "chunk", *, batch: int = 8, time: int = 4096,
                            heads: int = 8, head_dim: int = 64, nu: int = 3, dtype=jnp.bfloat16,
                            rule: str = "delta") -> tuple[Callable, tuple]:
    """``(fn, args)``: the gradient of a loss on a ``dj.DPFPAttention``'s output (width ``heads *
    head_dim``, V = ``head_dim``) with respect to its parameters, computing in ``dtype``, the
    parameters float32; ``args`` (parameters, input) as ShapeDtypeStructs. ``fuse_features``: the
    layer's attribute (the feature map inside the op, or applied by the layer); ``rule`` the layer's.

    Example:
        >>> fn, (params, x) = attention_training_step(True, batch=1, time=8, heads=2, head_dim=4, nu=1)
        >>> x.shape, jax.tree.structure(jax.eval_shape(fn, params, x)) == jax.tree.structure(params)
        ((1, 8, 8), True)
    """
    layer = dj.DPFPAttention(heads * head_dim, num_heads=heads, head_dim=head_dim, nu=nu, impl=impl, dtype=dtype,
                             fuse_features=fuse_features, rule=rule)
    x = jax.ShapeDtypeStruct((batch, time, heads * head_dim), dtype)
    # The parameters' shapes from impl="chunk": on a CPU host impl="pallas" is traced only in a compile for a TPU.
    params = jax.eval_shape(layer.clone(impl="chunk").init, jax.random.key(0), x)["params"]

    def grad(params, x):
        def loss(params):
            y, _ = layer.apply({"params": params}, x)
            return jnp.mean(jnp.square(y.astype(jnp.float32)))

        return jax.grad(loss)(params)

    return grad, (params, x)


LOSSES = ("outputs+state", "outputs")
"""What ``forward_and_backward``'s loss sums: both results, or the outputs alone (as a training loss does)."""


def forward_and_backward(fn: FastWeightFn, num_args: int, loss: str = "outputs+state") -> tuple[Callable, Callable]:
    """``jit(fn)`` and ``jit(grad)`` of a loss on fn's results: the sum of the outputs and of the final
    state (``loss="outputs+state"``), or of the outputs alone (``"outputs"``; fn's state is then
    ignored and may be None)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}")

    def loss_fn(*a):
        out, state = fn(*a)
        total = jnp.sum(out.astype(jnp.float32))
        return total if loss == "outputs" else total + jnp.sum(state)

    return jax.jit(fn), jax.jit(jax.grad(loss_fn, argnums=tuple(range(num_args))))


def worst_relative_error(got, want) -> float:
    """Largest ``|g - w| / |w|`` (Frobenius norms) over matching leaves, g compared in float32.

    Example:
        >>> worst_relative_error([jnp.array([1.0, 2.0])], [jnp.array([1.0, 2.5])]) < 0.2
        True
    """
    return max(float(jnp.linalg.norm(g.astype(jnp.float32) - w) / (jnp.linalg.norm(w) + 1e-30))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


# Kernel -> sequence length T it is compiled for (chunked kernels: four chunks of 64).
KERNELS = {"fused_recurrent": 64, "fused_chunk": 256, "chunk_recurrence": 256}


def op_gradient(kernel: str, rule: str, key_dim: int, time: int, value_dim: int = 64, dtype=jnp.bfloat16,
                batch: int = 1, heads: int = 2, num_stages: int = 1, packed: bool = False,
                features: DPFP | None = None, gated: bool = False):
    """(fn, args): forward and backward of one kernel through the op, args as ShapeDtypeStructs.

    ``kernel`` is one of ``KERNELS``; ``num_stages``: the fused chunk kernel's load-pipelining
    stages (the others ignore it); ``packed``: with packed documents, fn takes one more argument,
    ``resets [B, T]`` bool; ``features`` (the fused kernels only): the kernel computes DPFP on
    chip, ``key_dim`` is then the raw inputs' width d and the state's K is ``features.key_dim(d)``;
    ``gated``: fn takes ``log_decay [B, T, H]`` float32 last (after ``resets`` when packed), and its
    gradient is taken too.
    """
    if features is not None and kernel not in ("fused_chunk", "fused_recurrent"):
        raise ValueError(f"features: only the fused kernels compute the feature map; got kernel={kernel!r}")

    def run(q, k, v, beta, s, resets, log_decay):
        if kernel == "fused_recurrent":
            return fused_recurrent(q, k, v, beta, s, rule=rule, resets=resets, log_decay=log_decay, features=features)
        if kernel == "fused_chunk":
            return fused_chunk(q, k, v, beta, s, rule=rule, chunk_size=64, num_stages=num_stages,
                               wy_inverse=wy_inverse if rule == "delta" else None, resets=resets, features=features,
                               log_decay=log_decay)
        return fast_weight_chunk(q, k, v, beta, s, rule=rule, scale=1.0, chunk_size=64,
                                 walk=chunk_walk(precise=float32_or_wider(q, k, v)), resets=resets,
                                 log_decay=log_decay)

    def loss(q, k, v, beta, s, *extra):
        resets = extra[0] if packed else None
        log_decay = extra[-1] if gated else None
        out, state = run(q, k, v, beta, s, resets, log_decay)
        return out.astype(jnp.float32).sum() + state.sum()

    def shape(*dims, dtype=dtype):
        return jax.ShapeDtypeStruct(dims, dtype)

    keys = shape(batch, time, heads, key_dim)
    beta = shape(batch, time, heads) if rule == "delta" else None
    args = (keys, keys, shape(batch, time, heads, value_dim), beta,
            shape(batch, heads, key_dim if features is None else features.key_dim(key_dim), value_dim,
                  dtype=jnp.float32))
    if packed:
        args += (shape(batch, time, dtype=jnp.bool_),)
    if gated:
        args += (shape(batch, time, heads, dtype=jnp.float32),)
    return jax.grad(loss, argnums=(0, 1, 2, 4) + ((len(args) - 1,) if gated else ())), args


def chunk_with_pallas_walk(q, k, v, beta, rule="delta"):
    """``impl="chunk"`` with its inter-chunk walk in Pallas (``pallas_kernels.chunk_walk``)."""
    return fast_weight_chunk(q, k, v, beta, zero_state(q, v, jnp.float32), rule=rule, scale=1.0,
                             walk=chunk_walk(precise=float32_or_wider(q, k, v)))


def fused_chunk_two_stages(q, k, v, beta, rule="delta"):
    """The fused chunk kernel with Triton's load pipelining (2 stages) instead of none."""
    return fused_chunk(q, k, v, beta, zero_state(q, v, jnp.float32), rule=rule, num_stages=2,
                       wy_inverse=wy_inverse if rule == "delta" else None)


# Paths of ours that no ``impl=`` names: the walk-only kernel, and a launch variant of the fused one.
EXTRA_PATHS = {"chunk + pallas walk": chunk_with_pallas_walk,
               "pallas fused chunk, 2 load stages": fused_chunk_two_stages}


def fits_on_chip(path: Callable | None, key_dim: int, dtype) -> bool:
    """False where triton_report found a path over an H200 program's shared memory: two load
    stages from K = 384 (260 KiB) and with float32 inputs (240 KiB at K = 128)."""
    return path is not fused_chunk_two_stages or (key_dim <= 256 and dtype == jnp.bfloat16)
