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
from jax.scipy.linalg import solve_triangular

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


def to_chunks_nbhc(x: Array | None, chunk_size: int, dtype: jnp.dtype) -> Array | None:
    """``[B, T, H, ...] -> [N, B, H, C, ...]`` in ``dtype``, zero-padding T up to a multiple of C.

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
    pad = -x.shape[1] % chunk_size
    x = jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return rearrange(x, "b (n c) h ... -> n b h c ...", c=chunk_size)


def wy_inverse(k: Array, beta: Array, same_document: Array | None = None) -> Array:
    """``A^-1`` for ``A = I + diag(beta) strict_tril(K K^T)``, every chunk at once: [..., C, C].

    With packed documents (``same_document [..., C, C]``, True where steps i and j belong to one
    document) a step's write sees only earlier writes of its own document: the Gram matrix is
    masked to them, so A and its inverse are block-diagonal by document.

    Computed in beta's dtype. k may be narrower (bfloat16 keys for the Pallas kernels): products
    of bfloat16 numbers are exact in float32, so the Gram matrix loses nothing by taking them as
    they are, and runs on bfloat16 tensor cores on the GPU.

    Example:
        >>> import jax.numpy as jnp
        >>> k = jnp.eye(2)[None]  # one chunk of two orthogonal keys: A = I
        >>> wy_inverse(k, jnp.full((1, 2), 0.5)).tolist()
        [[[1.0, 0.0], [0.0, 1.0]]]
    """
    size = k.shape[-2]
    gram = jnp.einsum("...ik,...jk->...ij", k, k, precision=HIGHEST, preferred_element_type=beta.dtype)
    a = jnp.eye(size, dtype=beta.dtype) + beta[..., :, None] * tril(gram, -1, same_document)
    # Built from a, not broadcast, so it carries a's batch sharding (explicit meshes require it).
    identity = zeros_like_sharded(a, a.dtype) + jnp.eye(size, dtype=a.dtype)
    return solve_triangular(a, identity, lower=True, unit_diagonal=True)


def wy_writes(inverse: Array, k: Array, v: Array, beta: Array) -> tuple[Array, Array]:
    """``U_tilde = A^-1 diag(beta) V`` and ``Y = A^-1 diag(beta) K``, each [..., C, V or K]:
    the writes are then ``U = U_tilde - Y W0``."""
    scaled_inverse = inverse * beta[..., None, :]  # A^-1 diag(beta): scale columns, not the wider rows
    return (jnp.einsum("...ij,...jd->...id", scaled_inverse, v, precision=HIGHEST),
            jnp.einsum("...ij,...jd->...id", scaled_inverse, k, precision=HIGHEST))
