"""The chunkwise form's state-independent pieces: chunking, the causal masks and the WY writes.

Within a chunk of C steps the delta rule's writes satisfy ``A U = diag(beta) (V - K W0)`` with
``A = I + diag(beta) strict_tril(K K^T)`` unit lower-triangular (the WY representation, see
``chunk.py``). Nothing here depends on the state W0, so it is computed for every chunk at once.
Both users take these pieces from here: the XLA chunk form (``chunk.py``) and the Pallas adapter
(``pallas.py``), which hands ``wy_inverse`` to ``pallas_kernels.fused_chunk``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax

from dpfp_jax.ops.fast_weight.common import HIGHEST, zeros_like_sharded

Array = jax.Array


def tril(x: Array, k: int = 0, same_document: Array | None = None) -> Array:
    """``jnp.tril`` of the last two axes, as a select: step i of a chunk sees steps j <= i + k
    (``k=-1``: strictly earlier ones), and with ``same_document`` (bool ``[..., C, C]``) only
    those of its own document.

    Example:
        >>> import jax.numpy as jnp
        >>> tril(jnp.ones((3, 3)), -1).astype(int).tolist()
        [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
    """
    size = x.shape[-1]
    keep = jnp.tril(jnp.ones((size, size), bool), k)
    return jnp.where(keep if same_document is None else keep & same_document, x, 0.0)


def to_chunks_nbhc(x: Array | None, chunk_size: int, dtype: jnp.dtype, num_chunks: int | None = None) -> Array | None:
    """``[B, T, H, ...] -> [N, B, H, C, ...]`` in ``dtype``, zero-padding T up to N whole chunks
    (``num_chunks``; by default as few as hold T).

    Chunks lead (``lax.scan`` walks them) and steps sit next to the features, for the per-chunk
    matmuls. Zero-padded steps are inert: a zero key writes nothing under either rule, and their
    outputs are sliced off.

    Example:
        >>> import jax.numpy as jnp
        >>> to_chunks_nbhc(jnp.ones((2, 5, 3, 4)), 2, jnp.float32).shape  # N = 3: T padded to 6
        (3, 2, 3, 2, 4)
    """
    if x is None:
        return None
    if num_chunks is None:
        num_chunks = -(-x.shape[1] // chunk_size)
    pad = num_chunks * chunk_size - x.shape[1]
    if pad < 0:
        raise ValueError(f"num_chunks={num_chunks} chunks of {chunk_size} steps cannot hold T={x.shape[1]}")
    x = jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return rearrange(x, "b (n c) h ... -> n b h c ...", c=chunk_size)


_BASE_BLOCK = 8  # unit_lower_inverse's smallest blocks, inverted by a product of powers


def unit_lower_inverse(strict_lower: Array) -> Array:
    """``(I + L)^-1`` for a strictly lower-triangular ``L [..., C, C]``, by doubling diagonal blocks.

    With X1, X2 the inverses of the two diagonal halves of a block and L21 its lower-left part,
    ``[[I + L11, 0], [L21, I + L22]]^-1 = [[X1, 0], [-X2 L21 X1, X2]]``. The matrix is halved
    down to blocks of 8 (C padded to a power of two with zeros, which invert to the identity);
    those, nilpotent, invert as ``(I - L)(I + L^2)(I + L^4) = sum_j (-L)^j``; then each level
    doubles the block size with two batched matmuls. All matmuls, slices and reshapes: a batched
    triangular solve on the CPU ran at a fraction of a matmul's speed and, multi-threaded,
    stalled for up to seconds on a loaded machine. Round-off within a few times a solve's.

    Example:
        >>> import jax.numpy as jnp
        >>> lower = jnp.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
        >>> (unit_lower_inverse(lower) @ (jnp.eye(3) + lower)).tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    size = strict_lower.shape[-1]
    padded = 1 << max(size - 1, 0).bit_length()
    lead = strict_lower.shape[:-2]
    # Padded only when C is not a power of two (a pad of nothing is still an op, and a copy).
    blocks = strict_lower if padded == size else jnp.pad(strict_lower, [(0, 0)] * len(lead) + [(0, padded - size)] * 2)
    blocks = blocks[..., None, :, :]
    lower_lefts = []  # per level, [..., n, h, h]: the lower-left quarter of each of the n diagonal blocks
    while blocks.shape[-1] > _BASE_BLOCK:
        half = blocks.shape[-1] // 2
        lower_lefts.append(blocks[..., half:, :half])
        halves = jnp.stack([blocks[..., :half, :half], blocks[..., half:, half:]], axis=-3)
        blocks = halves.reshape(*lead, 2 * blocks.shape[-3], half, half)
    # (I + L)^-1 = sum_{j < b} (-L)^j for L strictly lower of size b, as a product of (I + L^(2^i)).
    identity = zeros_like_sharded(blocks, blocks.dtype) + jnp.eye(blocks.shape[-1], dtype=blocks.dtype)
    inverse, power, done = identity - blocks, blocks, 2
    while done < blocks.shape[-1]:
        power = jnp.einsum("...ij,...jk->...ik", power, power, precision=HIGHEST)
        inverse = inverse + jnp.einsum("...ij,...jk->...ik", inverse, power, precision=HIGHEST)
        done *= 2
    for lower_left in reversed(lower_lefts):
        half = lower_left.shape[-1]
        pairs = inverse.reshape(*lead, lower_left.shape[-3], 2, half, half)
        first, second = pairs[..., 0, :, :], pairs[..., 1, :, :]
        # 0 - x, not -x: a zero block stays +0.
        mixed = 0.0 - jnp.einsum("...ij,...jk,...kl->...il", second, lower_left, first, precision=HIGHEST)
        top = jnp.concatenate([first, zeros_like_sharded(first, first.dtype)], axis=-1)
        inverse = jnp.concatenate([top, jnp.concatenate([mixed, second], axis=-1)], axis=-2)
    return inverse.reshape(*lead, padded, padded)[..., :size, :size]


def wy_inverse(k: Array, beta: Array, same_document: Array | None = None, gram: Array | None = None) -> Array:
    """``A^-1`` for ``A = I + diag(beta) strict_tril(K K^T)``, every chunk at once: [..., C, C].

    With packed documents (``same_document [..., C, C]``, True where steps i and j belong to one
    document) a step's write sees only earlier writes of its own document: the Gram matrix is
    masked to them, so A and its inverse are block-diagonal by document.

    Computed in beta's dtype. k may be narrower (bfloat16 keys for the Pallas kernels): products
    of bfloat16 numbers are exact in float32, so the Gram matrix loses nothing by taking them as
    they are, and runs on bfloat16 tensor cores on the GPU. ``gram``: ``K K^T`` when the caller
    has it already (in beta's dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> k = jnp.eye(2)[None]  # one chunk of two orthogonal keys: A = I
        >>> wy_inverse(k, jnp.full((1, 2), 0.5)).tolist()
        [[[1.0, 0.0], [0.0, 1.0]]]
    """
    if gram is None:
        gram = jnp.einsum("...ik,...jk->...ij", k, k, precision=HIGHEST, preferred_element_type=beta.dtype)
    return unit_lower_inverse(beta[..., :, None] * tril(gram, -1, same_document))


def wy_writes(inverse: Array, k: Array, v: Array, beta: Array) -> tuple[Array, Array]:
    """``U_tilde = A^-1 diag(beta) V`` and ``Y = A^-1 diag(beta) K``, each [..., C, V or K]:
    the writes are then ``U = U_tilde - Y W0``."""
    scaled_inverse = inverse * beta[..., None, :]  # A^-1 diag(beta): scale columns, not the wider rows
    return (jnp.einsum("...ij,...jd->...id", scaled_inverse, v, precision=HIGHEST),
            jnp.einsum("...ij,...jd->...id", scaled_inverse, k, precision=HIGHEST))


class ChunkDecays(NamedTuple):
    """A gated chunk's decays, ``g_i = sum_{s <= i} log alpha_s`` the within-chunk cumulative log decay
    (docs/math.md, "Gated"); every factor is the exp of a difference of such sums, never positive."""

    within: Array  # [..., C, C] exp(g_i - g_j) for j <= i (1 above the diagonal, where it is masked off)
    start: Array  # [..., C] exp(g_i): what of the chunk's entering state step i still sees
    end: Array  # [..., C] exp(g_C - g_i): what of step i's write reaches the chunk's end
    total: Array  # [...] exp(g_C): what of the entering state reaches the chunk's end
    kept: Array  # [..., C] bool: log alpha above LOG_DECAY_FLOOR, where it has a gradient


def log_decay_floor(dtype: jnp.dtype) -> float:
    """The log decay below which alpha is taken as exactly 0 by the chunk form: ``exp`` of it is 0
    in ``dtype`` (16 below the log of the smallest subnormal), so clamping there changes no value,
    and keeps ``-inf`` out of the cumulative sums (``-inf - -inf`` would be NaN).

    Example:
        >>> import jax.numpy as jnp
        >>> floor = log_decay_floor(jnp.float32)
        >>> round(floor, 1), float(jnp.exp(jnp.float32(floor)))
        (-119.3, 0.0)
    """
    return float(np.log(np.finfo(dtype).smallest_subnormal)) - 16.0


_DECAY_QUANTUM = 16  # log decays split into multiples of 1/16 (summed exactly) and a rest in [-1/32, 1/32]


def split_log_decay(log_decay: Array) -> tuple[Array, Array]:
    """``(hi, lo)`` of ``log_decay`` clamped at :func:`log_decay_floor`: ``hi`` the nearest multiple of
    1/16 (ties to even), ``lo`` the exact rest in ``[-1/32, 1/32]``, as :func:`chunk_decays` sums them.

    The kernels' twin is ``split_log_decay`` of ``pallas_kernels/decays.py`` (float32 only; the ops
    import nothing from ``pallas_kernels`` outside the Pallas dispatch, and this one takes float64
    with its own floor); tests/test_gated.py holds the two to the same bits, ties included.

    Example:
        >>> import jax.numpy as jnp
        >>> hi, lo = split_log_decay(jnp.array([-3 / 32, -0.7]))
        >>> (hi * 16).tolist(), lo.tolist()
        ([-2.0, -11.0], [0.03125, -0.012499988079071045])
    """
    clamped = jnp.maximum(log_decay, log_decay_floor(log_decay.dtype))
    hi = jnp.round(clamped * _DECAY_QUANTUM) / _DECAY_QUANTUM
    return hi, clamped - hi


def chunk_decays(log_decay: Array) -> ChunkDecays:
    """:class:`ChunkDecays` of ``log_decay [..., C]`` (float32 or float64), the chunk along the last axis.

    The differences ``g_i - g_j`` of one cumulative sum lose ``eps * |g_i|`` where a chunk holds
    large decays (a sum near -4000 keeps only 1e-3 of a difference of -0.1, in float32). So each
    log decay is split as ``hi + lo``, ``hi`` a multiple of 1/16 and ``|lo| <= 1/32``: the cumulative
    sums of ``hi`` are exact (multiples of 1/16 below 2^20 in size, for C up to 8192 in float32)
    and their differences too, and those of ``lo`` are small, so every difference is within a few
    ulps of its own size. ``-inf`` (alpha = 0) and anything below :func:`log_decay_floor` are first
    clamped to it, where exp is 0 all the same.

    Example: alpha = 0.5 at every step of a chunk of 3.
        >>> import jax.numpy as jnp
        >>> d = chunk_decays(jnp.log(jnp.full(3, 0.5)))
        >>> d.start.tolist(), d.end.tolist(), float(d.total)
        ([0.5, 0.25, 0.125], [0.25, 0.5, 1.0], 0.125)
        >>> d.within.tolist()
        [[1.0, 1.0, 1.0], [0.5, 1.0, 1.0], [0.25, 0.5, 1.0]]
    """
    kept = log_decay >= log_decay_floor(log_decay.dtype)
    hi, lo = split_log_decay(log_decay)
    g_hi, g_lo = jnp.cumsum(hi, axis=-1), jnp.cumsum(lo, axis=-1)

    def difference(a_hi: Array, a_lo: Array, b_hi: Array, b_lo: Array) -> Array:
        return (a_hi - b_hi) + (a_lo - b_lo)

    size = log_decay.shape[-1]
    lower = jnp.tril(jnp.ones((size, size), bool))
    pairwise = difference(g_hi[..., :, None], g_lo[..., :, None], g_hi[..., None, :], g_lo[..., None, :])
    # exp only where j <= i (a sum of log decays, <= 0); 1 elsewhere, which every user masks off.
    within = jnp.exp(jnp.where(lower, pairwise, 0.0))
    last_hi, last_lo = g_hi[..., -1:], g_lo[..., -1:]
    end = jnp.exp(difference(last_hi, last_lo, g_hi, g_lo))
    return ChunkDecays(within, jnp.exp(g_hi + g_lo), end, jnp.exp(last_hi[..., 0] + last_lo[..., 0]), kept)


def log_decay_gradient(decays: ChunkDecays, d_within: Array | None, d_start: Array | None, d_end: Array | None,
                       d_total: Array | None) -> Array:
    """The gradient of ``log_decay [..., C]`` from those of the :class:`ChunkDecays` factors (None: zero).

    Each factor is ``exp`` of a difference of the cumulative sums g, so its gradient reaches g as
    factor times gradient, with a plus for the later index and a minus for the earlier; g's
    reaches each log decay as the sum over the steps at and after it (a reverse cumulative sum).
    ``d_within``'s diagonal is ignored (``exp(g_i - g_i)`` is constant).
    """
    dg = 0.0
    if d_within is not None:
        h = jnp.tril(d_within * decays.within, -1)
        dg = dg + jnp.sum(h, axis=-1) - jnp.sum(h, axis=-2)
    if d_start is not None:
        dg = dg + d_start * decays.start
    last = 0.0
    if d_end is not None:
        h = d_end * decays.end
        dg = dg - h
        last = last + jnp.sum(h, axis=-1)
    if d_total is not None:
        last = last + d_total * decays.total
    dg = dg + jnp.zeros(decays.start.shape, decays.start.dtype)
    dg = dg.at[..., -1].add(last)
    d_log_decay = lax.cumsum(dg, axis=dg.ndim - 1, reverse=True)
    return jnp.where(decays.kept, d_log_decay, 0.0)
