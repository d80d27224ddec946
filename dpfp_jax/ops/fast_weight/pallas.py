"""``impl="pallas"``: the Pallas kernels of the top-level ``pallas_kernels`` package, GPU or TPU.

Which kernels run follows the platform being compiled for (:func:`target_platform`):

- a TPU, or any host inside ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (where
  Pallas interprets every TPU kernel, which is how the tests and users check it on a CPU): the
  Mosaic kernel ``pallas_kernels.fused_chunk_tpu`` (``pallas_kernels/tpu/``), the chunkwise WY
  form with the state in VMEM across chunks and the triangular inverse computed in-kernel, for
  every T (the last block zero-padded) and ``chunk_size`` 16, 32, 64 or a multiple of 128
  (otherwise a ValueError says so); it reads q, k, v and writes its results in the layouts XLA
  keeps them in, with no copies around the kernel. Gated (``log_decay``) it takes the decays in
  the kernel, and packed documents as ``log alpha = -inf`` at each reset; ungated, packed documents
  run the gated kernel with ``log alpha = 0`` at every other step (exact; it keeps the gated
  kernel's block states for its backward, docs/tpu_kernel.md says what that costs). Given the op's
  ``features``, it computes the feature map itself (:func:`tpu_kernel_features`: DPFP, identity,
  relu and ``"linear"``, any normalisation, d in 32, 64, 128): q and k are read at width d, the
  map and its VJP run in VMEM. Other feature maps are applied before it, in XLA.
- a GPU: two Triton kernels, given ``phi(q)``, ``phi(k)`` except where they compute DPFP
  themselves (:func:`gpu_kernel_features`). The fused chunked one
  (``pallas_kernels.fused_chunk``: each chunk's
  whole step, matmuls on tensor cores, in one program per head and value block) for sequences of
  at least one chunk when ``chunk_size`` is a power of two >= 16 (what ``tl.dot`` tiles need), and
  the fused recurrent one (the paper's CUDA kernel redone) otherwise, e.g. for decoding steps.
  Gated (``log_decay``) the fused chunked one takes the decays (and then packed documents as
  ``log alpha = -inf`` at each reset), and the fused recurrent one a gated call below one chunk. A
  third, ``pallas_kernels.chunk_walk`` (only the inter-chunk walk in Pallas, the rest in XLA, gated
  too), is reached through ``fast_weight_chunk(..., walk=chunk_walk())`` for comparison on the GPU.
- anything else (a CPU outside interpret mode): a ValueError that says so.

The layers run one way: this library composes the kernels (it hands the fused chunked GPU kernel
the delta rule's per-chunk WY inverse, ``wy.wy_inverse``), and ``pallas_kernels`` imports nothing
of it. The kernels are imported where they are called: loading Pallas and its backends would
otherwise slow every ``import dpfp_jax``, also where no kernel ever runs.

This adapter says when the kernels can take a call (a GPU or a TPU, K <= 1024) and runs them
once per shard: XLA cannot partition a custom kernel, so under an explicit-sharding mesh with a
sharded batch or head axis the kernel is wrapped in ``jax.shard_map`` and each device runs it on
its own slice (packed documents' ``resets [B, T]`` sliced with the batch). Not part of
``impl="auto"``: the GPU kernels until they have passed the test suite on a GPU, the TPU kernel
until it has been timed on a TPU and found faster than ``chunk``.

The feature map on the GPU: with ``features`` the fused chunked kernel, and the fused recurrent
one without packed documents or a gate, compute DPFP themselves from the raw q, k
(:func:`gpu_kernel_features` says which settings); the walk, and other maps, are given
``features(q), features(k)``.

Packed documents on the GPU: both kernels take ``resets`` (``segments.resets_of`` of the op's
``segment_ids``); the fused chunked one gets ``wy.wy_inverse``, which takes the same-document
mask the kernel passes it. Neither kernel keeps a state per chunk or step for its backward: after
a reset they rebuild the state it discarded by walking the previous document forward again
(their docstrings say what that costs). Gated, a reset is a decay to zero (``log alpha = -inf``)
and the gated kernels keep states instead: the fused recurrent one every ``ceil(sqrt(T))`` steps
(its backward replays each block from them), the fused chunk one every ``checkpoint_chunks``
chunks (its backward walks each chunk's start state forward from the last kept one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dpfp_jax.feature_maps import FEATURE_MAPS, Features
from dpfp_jax.ops.fast_weight.chunk import DEFAULT_CHUNK_SIZE
from dpfp_jax.ops.fast_weight.common import (
    batch_head_axes_of,
    with_batch_head_sharding_of,
    zeros_like_sharded,
)
from dpfp_jax.ops.fast_weight.wy import wy_inverse

if TYPE_CHECKING:
    from pallas_kernels.tpu.feature_map import KernelFeatures

Array = jax.Array


def target_platform() -> str:
    """The platform being compiled for: an abstract mesh's device when one is set, as Pallas
    reads it (ahead-of-time compiles for a GPU from a CPU host set one), else jax's default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # where impl="pallas" runs the Triton kernels


def runs_tpu_kernel() -> bool:
    """Whether ``impl="pallas"`` takes the TPU kernel: compiled for a TPU, or inside
    ``pltpu.force_tpu_interpret_mode()`` (on any host: Pallas then interprets every TPU call)."""
    from pallas_kernels.tpu import tpu_interpret_params

    return target_platform() == "tpu" or tpu_interpret_params() is not None


# The registry's maps the TPU kernel computes itself, by the name its feature_map.py gives them.
_TPU_KERNEL_MAPS = {"dpfp": "dpfp", "identity": "identity", "relu": "relu", "linear": "elu_plus_one"}


def tpu_kernel_features(features: Features) -> KernelFeatures | str:
    """The TPU kernel's own description of ``features`` (a ``pallas_kernels.tpu.feature_map.KernelFeatures``),
    or why the kernel cannot compute that map itself (it is then applied before the kernel).

    The kernel computes DPFP (any nu up to K = 1024), the identity, relu and ``"linear"`` (elu + 1),
    each with any normalisation, for q, k of width d = 32, 64 or 128. A callable map is not
    fused (the kernel cannot trace arbitrary code on its transposed chunks).

    Example:
        >>> tpu_kernel_features(Features("dpfp", dim=64, nu=3, normalization="sum"))
        KernelFeatures(kind='dpfp', dim=64, nu=3, normalization='sum', eps=1e-06)
        >>> tpu_kernel_features(Features("dpfp", dim=48))
        'the TPU kernel maps q, k of width d in (32, 64, 128) itself; got d=48'
    """
    from pallas_kernels.tpu.feature_map import RAW_WIDTHS, KernelFeatures

    name = features.feature_map
    if not isinstance(name, str) or name not in _TPU_KERNEL_MAPS:
        fused = tuple(m for m in FEATURE_MAPS if m in _TPU_KERNEL_MAPS)
        return f"the TPU kernel computes the feature maps {fused} itself; got {name!r}"
    if features.dim not in RAW_WIDTHS:
        return f"the TPU kernel maps q, k of width d in {RAW_WIDTHS} itself; got d={features.dim}"
    return KernelFeatures(_TPU_KERNEL_MAPS[name], features.dim, features.nu, features.normalization,
                          float(features.eps))


def _fused_in_tpu_kernel(features: Features | None) -> bool:
    return features is not None and runs_tpu_kernel() and not isinstance(tpu_kernel_features(features), str)


def pallas_supports(q: Array, k: Array, v: Array, beta: Array | None, *, resets: Array | None = None,
                    features: Features | None = None, log_decay: Array | None = None, **_: object) -> str | None:
    """None, or why ``impl="pallas"`` cannot take this call. With ``features`` the kernels compute
    the map themselves where :func:`tpu_kernel_features` (the TPU kernel) or
    :func:`gpu_kernel_features` (the GPU kernels) says they can, and are otherwise given
    phi(q), phi(k), computed before them; either way K is the map's width. Packed documents on the
    TPU run the gated kernel (a reset is a decay to zero; ungated, ``log alpha = 0`` elsewhere). On a
    GPU a gate is taken by the fused chunk kernel (:func:`runs_fused_chunk`) and, below one chunk, by
    the fused recurrent one."""
    from pallas_kernels import MAX_KEY_DIM

    key_dim = q.shape[-1] if features is None else features.key_dim
    if key_dim > MAX_KEY_DIM:
        where = "computed in the TPU kernel" if _fused_in_tpu_kernel(features) else "the width of phi(q), phi(k)"
        given = "" if features is None else f" from features={features} ({where})"
        return f"the Pallas kernels take K <= {MAX_KEY_DIM}; got K={key_dim}{given}"
    if runs_tpu_kernel():
        return None
    platform = target_platform()
    if platform not in GPU_PLATFORMS:
        return (f"the Pallas kernels need a GPU or a TPU and the target platform is {platform!r}; "
                "pallas_kernels.fused_chunk or fused_recurrent(..., interpret=True) runs the GPU kernels anywhere, "
                "slowly, and inside jax.experimental.pallas.tpu.force_tpu_interpret_mode() impl='pallas' runs the "
                "TPU kernel interpreted")
    return None


def runs_fused_chunk(q: Array, chunk_size: int) -> bool:
    """Whether ``impl="pallas"`` on a GPU runs the fused chunk kernel (else the fused recurrent one):
    a sequence of at least one chunk, and ``chunk_size`` a power of two >= 16 (what ``tl.dot`` tiles need)."""
    return q.shape[1] >= chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0


def gpu_kernel_features(features: Features | None):
    """The GPU kernels' own description of ``features`` (``pallas_kernels.triton.dpfp.DPFP``), or None
    where they cannot compute the map themselves: DPFP with nu <= 4, eps > 0 and d a multiple of 32
    only (another map, or another d, is applied in XLA before the kernel). The fused chunk kernel
    takes it always, the fused recurrent one without packed documents and without a gate.

    Example:
        >>> gpu_kernel_features(Features("dpfp", dim=64, nu=3, normalization="sum"))
        DPFP(nu=3, normalization='sum', eps=1e-06)
        >>> gpu_kernel_features(Features("dpfp", dim=48)) is None, gpu_kernel_features(Features("relu", dim=64)) is None
        (True, True)
    """
    from pallas_kernels.triton.dpfp import DIM_MULTIPLE, DPFP, MAX_NU

    if (features is None or not isinstance(features.feature_map, str) or features.feature_map != "dpfp"
            or features.dim % DIM_MULTIPLE or features.nu > MAX_NU or features.eps <= 0):
        return None
    return DPFP(features.nu, features.normalization, features.eps)


def fast_weight_pallas(
    q: Array,
    k: Array,
    v: Array,
    beta: Array | None,
    initial_state: Array,
    *,
    rule: str,
    scale: float | Array,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    interpret: bool = False,
    resets: Array | None = None,
    log_decay: Array | None = None,
    features: Features | None = None,
) -> tuple[Array, Array]:
    """The op whose contract :func:`.naive.fast_weight_reference` states, by the chunked or the fused
    recurrent kernel, run per batch and head shard (the kernels compute in float32); ``resets``
    (packed documents) and ``log_decay`` (gated: the TPU kernel and both fused GPU kernels) as the
    oracle takes them.
    ``features``: q, k are raw; the TPU kernel (:func:`tpu_kernel_features`) and the fused GPU
    kernels (:func:`gpu_kernel_features`) map them themselves where they can, else phi(q), phi(k) are
    computed here for the kernels."""
    from pallas_kernels import fused_chunk, fused_chunk_tpu, fused_recurrent
    from pallas_kernels.decays import gate_with_resets

    if 0 in v.shape:
        # No output to compute (B, T, H or V is 0), and the final state is the initial one (T = 0)
        # or empty; a kernel cannot be launched over an empty grid.
        return zeros_like_sharded(v, v.dtype), initial_state.astype(jnp.float32)
    chunked = runs_fused_chunk(q, chunk_size)

    tpu = runs_tpu_kernel()
    # The map a kernel computes itself (q, k then stay at width d), or None: the kernels are given
    # phi(q), phi(k).
    kernel_features = None
    if features is not None and tpu:
        described = tpu_kernel_features(features)
        kernel_features = None if isinstance(described, str) else described
    elif features is not None and (chunked or (resets is None and log_decay is None)):
        # The fused chunk kernel maps q, k itself, and the fused recurrent one without documents or a gate.
        kernel_features = gpu_kernel_features(features)
    if features is not None and kernel_features is None:
        q, k = features(q), features(k)
    if tpu and interpret is False:
        from pallas_kernels.tpu import tpu_interpret_params

        # Inside pltpu.force_tpu_interpret_mode() Pallas reads the mode when each pallas_call is
        # traced, and the backward is traced when the gradient is taken, possibly after the
        # context has exited (a forward in `with force_tpu_interpret_mode():` under jax.grad): it
        # would then be compiled for the host's platform. Passing the mode now fixes it for both:
        # the kernel's custom_vjp keeps it as a non-differentiable argument.
        interpret = tpu_interpret_params() or False

    if tpu and resets is not None and log_decay is None:
        # Packed documents, ungated: the gated kernel with log alpha = 0 (alpha = 1, exact) but at the
        # resets; no gradient of this log_decay is returned (the caller gave none). What it costs
        # (the gated kernel's stored block states): docs/tpu_kernel.md.
        log_decay = zeros_like_sharded(q[..., 0], jnp.float32)
    if log_decay is not None and resets is not None:
        log_decay, resets = gate_with_resets(log_decay, resets), None

    def run(q, k, v, beta, initial_state, resets, log_decay):
        if tpu:
            return fused_chunk_tpu(q, k, v, beta, initial_state, rule=rule, scale=scale, chunk_size=chunk_size,
                                   interpret=interpret, log_decay=log_decay, features=kernel_features)
        if chunked:
            return fused_chunk(q, k, v, beta, initial_state, rule=rule, scale=scale, chunk_size=chunk_size,
                               interpret=interpret, wy_inverse=wy_inverse if rule == "delta" else None,
                               resets=resets, features=kernel_features, log_decay=log_decay)
        return fused_recurrent(q, k, v, beta, initial_state, rule=rule, scale=scale, interpret=interpret,
                               resets=resets, log_decay=log_decay, features=kernel_features)

    mesh, batch_axis, head_axis = batch_head_axes_of(q)
    if batch_axis is None and head_axis is None:
        return run(q, k, v, beta, initial_state, resets, log_decay)
    # Batch elements and heads are independent: each device runs the kernel on its own slice of both.
    per_step, state = PartitionSpec(batch_axis, None, head_axis), PartitionSpec(batch_axis, head_axis)
    initial_state = with_batch_head_sharding_of(initial_state, q)
    # Only the arrays given go through shard_map (None is not an array); resets [B, T] follow the batch.
    given = {name: (x, spec) for name, x, spec in (
        ("q", q, per_step), ("k", k, per_step), ("v", v, per_step), ("beta", beta, per_step),
        ("initial_state", initial_state, state), ("resets", resets, PartitionSpec(batch_axis, None)),
        ("log_decay", log_decay, per_step))
        if x is not None}

    def run_given(*arrays):
        named = dict(zip(given, arrays, strict=True))
        return run(*(named.get(name) for name in ("q", "k", "v", "beta", "initial_state", "resets", "log_decay")))

    # check_vma=False: pallas_call's out_shape carries no varying-axes annotation; every output is
    # per shard along the batch and head axes, which out_specs states.
    return jax.shard_map(run_given, mesh=mesh, in_specs=tuple(spec for _, spec in given.values()),
                         out_specs=(per_step, state), check_vma=False)(*(x for x, _ in given.values()))
