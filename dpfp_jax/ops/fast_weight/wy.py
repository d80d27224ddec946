"""The chunkwise form's state-independent pieces: chunking, the causal masks and the WY writes.

Within a chunk of C steps the delta rule's writes satisfy ``A U = diag(beta) (V - K W0)`` with
``A = I + diag(beta) strict_tril(K K^T)`` unit lower-triangular (the WY representation, see
``chunk.py``). Nothing here depends on the state W0, so it is computed for every chunk at once.
Both users take these pieces from here: the XLA chunk form (``chunk.py``) and the Pallas adapter
(``pallas.py``), which hands ``wy_inverse`` to ``pallas_kernels.fused_chunk``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

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
