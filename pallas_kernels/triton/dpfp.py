"""DPFP computed on chip by the fused chunk kernels: q and k are read at width d, never at K = 2·nu·d.

DPFP (Schlag et al. 2021, section 5.4) maps ``x [d]`` to ``phi(x) [2 nu d]``: with
``a = concat(relu(x), relu(-x))`` (width 2d), ``phi = concat(a * roll(a, 1), ..., a * roll(a, nu))``,
then optionally normalised over its K features: ``"sum"`` (``phi / (sum(phi) + eps)``), ``"l2"``
(``phi * rsqrt(sum(phi^2) + eps)``) or ``"none"``. :class:`DPFP` is the kernels' own description of
it (``pallas_kernels`` imports nothing of ``dpfp_jax``; the library translates its ``Features``).

The kernels use phi 64 columns at a time (one key tile of the state). Column ``c`` of phi is
``a[p] * a[m]`` with ``j = c // 2d + 1``, ``p = c mod 2d`` and ``m = (p - j) mod 2d``, and
``a[p] = relu(+x[p])`` for ``p < d``, ``relu(-x[p - d])`` above: so a tile is the product of two
``[C, 64]`` gathers from the chunk's ``[C, d]`` rows of x (:func:`tile_factors`). With ``d`` a
multiple of 32, 2d is a multiple of the 64-column tile and every tile lies in one ``j``.

The normalisation needs each row's sum over all K features before any tile is used: one more pass
over the tiles (elementwise, no dots) per chunk (:func:`row_scale`).

The backward (the map's VJP, in the kernel): with ``phi_n = s * phi`` (``s`` the row's
normalising factor) and ``g = dL/dphi_n`` given tile by tile,
``dL/dphi = s * (g - c * w)`` where ``c = <g, phi_n>`` per row and ``w = 1`` (sum) or ``phi_n``
(l2); for ``"none"`` ``dL/dphi = g``. As ``c`` is only known after the last tile, the kernels
scatter ``s * J^T g`` tile by tile as they go and ``-s * c * J^T w`` in a second pass over the
tiles (``J`` the Jacobian of the un-normalised map). ``J^T`` of one tile sends ``g * a[m]`` to
``a[p]`` and ``g * a[p]`` to ``a[m]`` (:func:`scatter_vjp`); the scatter is an atomic add into a
float32 buffer indexed by ``a``'s 2d positions (the relu's mask and sign already applied), and
``dx = buffer[..., :d] + buffer[..., d:]`` afterwards (:func:`input_gradient`). Within one scatter
the 64 indices ``p`` (and the 64 indices ``m``) are distinct, as 2d >= 64: no two lanes of one
atomic add meet (Pallas's interpreter would drop one of two such adds; the GPU would not).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Array = jax.Array

NORMALIZATIONS = ("sum", "l2", "none")
TILE = 64  # phi columns per key tile (tiles.KEY_TILE; repeated so this module stands alone)
DIM_MULTIPLE = TILE // 2  # d must be a multiple of this: 2d then holds whole tiles


@dataclasses.dataclass(frozen=True)
class DPFP:
    """DPFP-``nu`` with its normalisation, as the fused chunk kernels compute it: a static description.

    Attributes:
      nu: the number of rolled products, 1 to 4 (the kernels are tested on 1..4; more is refused
        because K = 2·nu·d soon leaves the kernels' K <= 1024 anyway).
      normalization: ``"sum"``, ``"l2"`` or ``"none"``, over the K features of each row.
      eps: the normalisation's epsilon, > 0: the steps that pad T to whole chunks are all-zero
        rows, whose features must come out zero (with eps = 0 they would be 0/0).

    ``DPFP(...)(x)`` is the map in plain jnp (``[..., d] -> [..., 2 nu d]``, float32): the oracle
    of the on-chip version and what the delta rule's per-chunk Gram matrix is computed from.

    Example:
        >>> import jax.numpy as jnp
        >>> phi = DPFP(nu=2, normalization="sum")
        >>> phi.key_dim(32), phi(jnp.ones((3, 32))).shape, float(phi(jnp.ones(32)).sum().round(4))
        (128, (3, 128), 1.0)
    """

    nu: int
    normalization: str = "none"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.nu, bool) or not isinstance(self.nu, numbers.Integral) or not 1 <= self.nu <= 4:
            raise ValueError(f"DPFP's nu must be an int from 1 to 4; got nu={self.nu!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"DPFP's normalization must be one of {NORMALIZATIONS}; got {self.normalization!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not 0 < self.eps < math.inf:
            raise ValueError(f"DPFP's eps must be a finite real number > 0 (zero rows pad T); got {self.eps!r}")

    def key_dim(self, dim: int) -> int:
        """K = 2·nu·d for inputs of width d."""
        return 2 * self.nu * dim

    def __call__(self, x: Array) -> Array:
        """phi(x) over the last axis, in float32."""
        x = jnp.asarray(x, jnp.float32)
        a = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
        phi = jnp.concatenate([a * jnp.roll(a, j, axis=-1) for j in range(1, self.nu + 1)], axis=-1)
        if self.normalization == "sum":
            return phi / (jnp.sum(phi, axis=-1, keepdims=True) + self.eps)
        if self.normalization == "l2":
            return phi * lax.rsqrt(jnp.sum(phi * phi, axis=-1, keepdims=True) + self.eps)
        return phi


def _a(x_ref, n, rows: Array, p: Array, dim: int) -> Array:
    """``a[p]`` for a-indices ``p [1, 64]`` of chunk n's ``rows [C, 1]``: ``relu(x[p])`` or ``relu(-x[p - d])``."""
    negative = p >= dim
    x = x_ref[n, rows, jnp.where(negative, p - dim, p)].astype(jnp.float32)
    return jnp.maximum(jnp.where(negative, -x, x), 0.0)


def tile_factors(x_ref, n, tile: int, dim: int) -> tuple[Array, Array, Array, Array, Array]:
    """``(a[p], a[m], p, m, rows)`` of key tile ``tile`` of chunk n (x_ref ``[N, C, d]``): the tile
    of the un-normalised phi is ``a[p] * a[m]`` (``[C, 64]``); the indices are ``[1, 64]`` (p, m)
    and ``[C, 1]`` (rows), which the loads and atomic adds broadcast."""
    chunk = x_ref.shape[1]
    width = 2 * dim
    start = tile * TILE
    shift = start // width + 1
    rows = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
    p = lax.broadcasted_iota(jnp.int32, (1, TILE), 1) + start % width
    m = p - shift
    m = jnp.where(m < 0, m + width, m)
    if dim % TILE == 0:
        # a[p] is 64 contiguous columns of x with one sign (a tile never straddles a's sign change
        # at d): a plain (vectorised) load, no gather. Otherwise (d = 32, 96, ...) it may: gathered.
        first = start % width
        x = x_ref[n, :, pl.ds(first % dim, TILE)].astype(jnp.float32)
        own = jnp.maximum(x if first < dim else -x, 0.0)
    else:
        own = _a(x_ref, n, rows, p, dim)
    return own, _a(x_ref, n, rows, m, dim), p, m, rows


def _looped_factors(x_ref, n, tile, dim: int) -> tuple[Array, Array, Array, Array, Array]:
    """:func:`tile_factors` for a traced ``tile`` (inside a loop over the tiles), both factors gathered."""
    width = 2 * dim
    start = tile * TILE
    rows = lax.broadcasted_iota(jnp.int32, (x_ref.shape[1], 1), 0)
    # lax.rem/div: start >= 0, and jnp's floor-mod correction does not lower to Triton for traced ints.
    p = lax.broadcasted_iota(jnp.int32, (1, TILE), 1) + lax.rem(start, width)
    m = p - (lax.div(start, width) + 1)
    m = jnp.where(m < 0, m + width, m)
    return _a(x_ref, n, rows, p, dim), _a(x_ref, n, rows, m, dim), p, m, rows


def row_scale(features: DPFP, x_ref, n, num_tiles: int) -> Array | None:
    """Chunk n's per-row normalising factor ``s [C, 1]`` (``phi_n = s * phi``), None for ``"none"``.
    A loop over the tiles, not unrolled: unrolled, all their loads were scheduled at once, and the
    forward spilled several hundred bytes more (docs/reports/triton_report_h200.md)."""
    if features.normalization == "none":
        return None
    dim = x_ref.shape[-1]

    def add_tile(tile, total):
        first, second = _looped_factors(x_ref, n, tile, dim)[:2]
        phi = first * second
        return total + jnp.sum(phi if features.normalization == "sum" else phi * phi, axis=1, keepdims=True)

    total = lax.fori_loop(0, num_tiles, add_tile, jnp.zeros((x_ref.shape[1], 1), jnp.float32))
    if features.normalization == "sum":
        return 1.0 / (total + features.eps)
    return lax.rsqrt(total + features.eps)


def feature_tile(x_ref, n, tile: int, scale: Array | None) -> Array:
    """Key tile ``tile`` of chunk n's normalised features ``phi_n``, float32 ``[C, 64]``."""
    first, second = tile_factors(x_ref, n, tile, x_ref.shape[-1])[:2]
    phi = first * second
    return phi if scale is None else phi * scale


def _scatter(g_ref, n, factors, dim: int, cotangent: Array) -> None:
    first, second, p, m, rows = factors
    for index, own, other in ((p, first, second), (m, second, first)):
        sign = jnp.where(index >= dim, -1.0, 1.0)
        pltriton.atomic_add(g_ref, (n, rows, index), jnp.where(own > 0.0, sign * cotangent * other, 0.0))


def scatter_vjp(g_ref, x_ref, n, tile: int, cotangent: Array) -> None:
    """Atomically add ``J^T cotangent`` of key tile ``tile`` into ``g_ref [N, C, 2d]`` (per a-index,
    the relu's mask and sign applied): ``cotangent [C, 64]`` is dL/d(un-normalised phi) there."""
    dim = x_ref.shape[-1]
    _scatter(g_ref, n, tile_factors(x_ref, n, tile, dim), dim, cotangent)


def scatter_normalization_vjp(features: DPFP, g_ref, x_ref, n, num_tiles: int, scale: Array | None,
                              dot_with_features: Array) -> None:
    """The second pass of the normalised map's VJP: ``-s * c * J^T w`` for every tile (``c =
    dot_with_features [C, 1]``, ``<g, phi_n>`` per row; ``w`` 1 for sum, phi_n for l2); nothing
    for ``"none"``. A loop over the tiles, as in :func:`row_scale`."""
    if features.normalization == "none":
        return
    dim = x_ref.shape[-1]
    factor = -scale * dot_with_features

    def scatter_tile(tile, carry):
        factors = _looped_factors(x_ref, n, tile, dim)
        weights = factor if features.normalization == "sum" else factor * (factors[0] * factors[1] * scale)
        _scatter(g_ref, n, factors, dim, jnp.broadcast_to(weights, (x_ref.shape[1], TILE)))
        return carry

    lax.fori_loop(0, num_tiles, scatter_tile, 0)


def input_gradient(g: Array) -> Array:
    """dL/dx from the scatter buffer ``[..., 2d]`` (per a-index): ``g[..., :d] + g[..., d:]``."""
    dim = g.shape[-1] // 2
    return g[..., :dim] + g[..., dim:]


def check_features(features: object, dim: int, max_key_dim: int) -> int:
    """K for inputs of width ``dim``; a TypeError unless ``features`` is a :class:`DPFP`, a ValueError
    unless ``dim`` is a multiple of 32 and K <= ``max_key_dim``."""
    if not isinstance(features, DPFP):
        raise TypeError(f"features must be a pallas_kernels DPFP (or None); got {type(features).__name__}")
    if dim % DIM_MULTIPLE:
        raise ValueError(f"q: with features the kernels take q and k of a width d that is a multiple of "
                         f"{DIM_MULTIPLE} (2d whole {TILE}-column tiles); got d={dim}")
    key_dim = features.key_dim(dim)
    if key_dim > max_key_dim:
        raise ValueError(f"features: the Pallas kernels take K <= {max_key_dim}; DPFP with nu={features.nu} on "
                         f"d={dim} makes K={key_dim}")
    return key_dim
