"""DPFP computed on chip by the fused kernels: q and k are read at width d, never at K = 2·nu·d.

DPFP (Schlag et al. 2021, section 5.4) maps ``x [d]`` to ``phi(x) [2 nu d]``: with
``a = concat(relu(x), relu(-x))`` (width 2d), ``phi = concat(a * roll(a, 1), ..., a * roll(a, nu))``,
then optionally normalised over its K features: ``"sum"`` (``phi / (sum(phi) + eps)``), ``"l2"``
(``phi * rsqrt(sum(phi^2) + eps)``) or ``"none"``. :class:`DPFP` is the kernels' own description of
it (``pallas_kernels`` imports nothing of ``dpfp_jax``; the library translates its ``Features``).

The kernels use phi 64 columns at a time (one key tile of the state). Column ``c`` of phi is
``a[p] * a[m]`` with ``j = c // 2d + 1``, ``p = c mod 2d`` and ``m = (p - j) mod 2d``, and
``a[p] = relu(+x[p])`` for ``p < d``, ``relu(-x[p - d])`` above: so a tile is the product of two
``[C, 64]`` reads of the chunk's ``[C, d]`` rows of x (:func:`_factors`): ``a[p]`` a plain slice
when d is a multiple of 64, ``a[m]`` a gather (the roll wraps around). With ``d`` a multiple of
32, 2d is a multiple of the 64-column tile and every tile lies in one ``j``.

The normalisation needs each row's sum over all K features before any tile is used: one more pass
over the tiles (elementwise, no dots) per chunk (:func:`row_scale`).

The backward (the map's VJP): with ``phi_n = s * phi`` (``s`` the row's normalising factor) and
``h = dL/dphi_n`` given tile by tile, ``dL/dphi = s * (h - c * w)`` where ``c = <h, phi_n>`` per
row and ``w = 1`` (sum) or ``phi_n`` (l2); for ``"none"`` ``dL/dphi = h``. The kernels scatter
``J^T (s h)`` tile by tile as they go (``J`` the Jacobian of the un-normalised map w.r.t. a):
``J^T`` of one tile sends ``y * a[m]`` to positions p and ``y * a[p]`` to positions m
(:func:`scatter_vjp`), each an atomic add of one contiguous ``[C, 64]`` slice of a float32 buffer
``[N, C, MARGIN + 2d]`` indexed by a's positions: m is left unwrapped (``p - j`` reaches down to
-nu, into the buffer's ``MARGIN`` columns), so no index tensor is built. Within one atomic add the
64 positions are distinct (Pallas's interpreter would drop one of two adds that meet; the GPU would
not). Everything else is XLA's, at width 2d, after the kernel (:func:`map_gradient`): the relu's
mask and sign (:func:`input_gradient`), and ``-s * c * J^T w``, which needs ``c``, known only
after the last tile. No kernel sums ``c``: phi is a homogeneous quadratic in a, so
``<J^T (s h), a> = 2 <h, phi_n>`` and ``c`` is read off the buffer (:func:`feature_dots`); and
``-s * c * J^T w`` depends on x only through a and its rolls, ``J^T 1 = sum_j (roll(a, j) +
roll(a, -j))`` and ``J^T phi = a * sum_j (roll(a, j)^2 + roll(a, -j)^2)``
(:func:`normalization_gradient`). In the kernels, a second scatter pass over the tiles for that
part, and the sums of ``c``, cost spilled registers on an H200 (docs/reports/triton_report_h200.md).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Array = jax.Array

NORMALIZATIONS = ("sum", "l2", "none")
TILE = 64  # phi columns per key tile (tiles.KEY_TILE; repeated so this module stands alone)
DIM_MULTIPLE = TILE // 2  # d must be a multiple of this: 2d then holds whole tiles
MAX_NU = 4  # the largest nu the kernels take (and are tested on)
MARGIN = MAX_NU  # the scatter buffer's columns before a's position 0: the VJP's m = p - j reaches -nu


def relus(x: Array) -> Array:
    """``a = [relu(x), relu(-x)]`` over the last axis (width 2d), float32: what DPFP's products are of."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)


@dataclasses.dataclass(frozen=True)
class DPFP:
    """DPFP-``nu`` with its normalisation, as the fused kernels compute it: a static description.

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
        if isinstance(self.nu, bool) or not isinstance(self.nu, numbers.Integral) or not 1 <= self.nu <= MAX_NU:
            raise ValueError(f"DPFP's nu must be an int from 1 to {MAX_NU}; got nu={self.nu!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"DPFP's normalization must be one of {NORMALIZATIONS}; got {self.normalization!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not 0 < self.eps < math.inf:
            raise ValueError(f"DPFP's eps must be a finite real number > 0 (zero rows pad T); got {self.eps!r}")

    def key_dim(self, dim: int) -> int:
        """K = 2·nu·d for inputs of width d."""
        return 2 * self.nu * dim

    def __call__(self, x: Array) -> Array:
        """phi(x) over the last axis, in float32."""
        a = relus(x)
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


class _Factors(NamedTuple):
    """Key tile ``tile``'s two factors (the un-normalised phi tile is ``own * other``, ``[C, 64]``)
    and where they sit in a: ``own`` is ``a[first + c]``, ``other`` is ``a[first + c - shift]``
    (mod 2d), for the tile's columns c."""

    own: Array
    other: Array
    first: Array | int
    shift: Array | int


def _factors(x_ref, n, tile, dim: int) -> _Factors:
    """:class:`_Factors` of key tile ``tile`` (a Python int, or traced inside a loop over the tiles)."""
    width = 2 * dim
    start = tile * TILE
    if isinstance(start, int):
        first, shift = start % width, start // width + 1
    else:  # lax.rem/div: start >= 0, and jnp's floor-mod correction does not lower to Triton for traced ints
        first, shift = lax.rem(start, width), lax.div(start, width) + 1
    rows = lax.broadcasted_iota(jnp.int32, (x_ref.shape[1], 1), 0)
    p = lax.broadcasted_iota(jnp.int32, (1, TILE), 1) + first
    m = p - shift
    m = jnp.where(m < 0, m + width, m)
    if dim % TILE == 0:
        # a[p] is 64 contiguous columns of x with one sign (a tile never straddles a's sign change
        # at d): a plain (vectorised) load, no gather. Otherwise (d = 32, 96, ...) it may: gathered.
        x = x_ref[n, :, pl.ds(first % dim if isinstance(first, int) else lax.rem(first, dim), TILE)]
        x = x.astype(jnp.float32)
        own = jnp.maximum(jnp.where(first < dim, x, -x), 0.0)
    else:
        own = _a(x_ref, n, rows, p, dim)
    return _Factors(own, _a(x_ref, n, rows, m, dim), first, shift)


def row_scale(features: DPFP, x_ref, n, num_tiles: int) -> Array | None:
    """Chunk n's per-row normalising factor ``s [C, 1]`` (``phi_n = s * phi``), None for ``"none"``.
    A loop over the tiles, not unrolled: unrolled, all their loads were scheduled at once, and the
    forward spilled several hundred bytes more (docs/reports/triton_report_h200.md)."""
    if features.normalization == "none":
        return None
    dim = x_ref.shape[-1]

    def add_tile(tile, total):
        factors = _factors(x_ref, n, tile, dim)
        phi = factors.own * factors.other
        return total + jnp.sum(phi if features.normalization == "sum" else phi * phi, axis=1, keepdims=True)

    total = lax.fori_loop(0, num_tiles, add_tile, jnp.zeros((x_ref.shape[1], 1), jnp.float32))
    if features.normalization == "sum":
        return 1.0 / (total + features.eps)
    return lax.rsqrt(total + features.eps)


def feature_tile(x_ref, n, tile: int, scale: Array | None) -> Array:
    """Key tile ``tile`` of chunk n's normalised features ``phi_n``, float32 ``[C, 64]``."""
    factors = _factors(x_ref, n, tile, x_ref.shape[-1])
    phi = factors.own * factors.other
    return phi if scale is None else phi * scale


def scatter_width(dim: int) -> int:
    """Columns of the VJP's scatter buffer for inputs of width d: a's 2d positions, after ``MARGIN``."""
    return MARGIN + 2 * dim


def _scatter(g_ref, n, factors: _Factors, cotangent: Array) -> None:
    # Both halves are 64 contiguous positions of a: p = first + c, and m = p - shift unwrapped (it
    # reaches down to -nu, the buffer's margin), so each is one plain slice of the buffer.
    own, other, first, shift = factors
    at = MARGIN + first
    pltriton.atomic_add(g_ref, (n, slice(None), pl.ds(at, TILE)), cotangent * other)
    pltriton.atomic_add(g_ref, (n, slice(None), pl.ds(at - shift, TILE)), cotangent * own)


def scatter_vjp(g_ref, x_ref, n, tile: int, cotangent: Array, scale: Array | None) -> None:
    """Atomically add ``J^T (s h)`` of key tile ``tile`` into ``g_ref [N, C, scatter_width(d)]``, per
    position of a: ``cotangent [C, 64]`` is h = dL/dphi_n there and ``scale`` the rows' ``s``
    ([C, 1], :func:`row_scale`; None for ``"none"``). The relu's mask and sign, and the
    normalisation's part, are XLA's afterwards (:func:`map_gradient`)."""
    _scatter(g_ref, n, _factors(x_ref, n, tile, x_ref.shape[-1]), cotangent if scale is None else scale * cotangent)


def normalization_gradient(features: DPFP, x: Array, dots: Array) -> Array:
    """The normalisation's part of dL/dx, ``-s * c * J^T w`` (the module docstring's terms) passed
    through the relus, in plain jnp at width 2d: ``x [..., d]`` the raw inputs, ``dots [...]`` each
    row's ``c = <h, phi_n>`` (h = dL/dphi_n). With ``b_j = roll(a, j)`` and ``f_j = roll(a, -j)``
    (a's neighbours j before and after), ``J^T 1 = sum_j (b_j + f_j)`` and ``J^T phi = a * sum_j
    (b_j^2 + f_j^2)``, so no K-wide array is formed. Zero for ``"none"``.

    Example: it is the part of the normalised map's VJP that :class:`DPFP`'s autodiff adds.
        >>> import jax, jax.numpy as jnp
        >>> phi, x, g = DPFP(2, "l2"), jnp.linspace(-1.0, 1.0, 32), jnp.linspace(0.0, 1.0, 128)
        >>> raw = DPFP(2, "none")
        >>> s = jnp.linalg.norm(phi(x)) / jnp.linalg.norm(raw(x))  # phi_n = s * phi
        >>> _, vjp_raw = jax.vjp(raw, x)
        >>> _, vjp = jax.vjp(phi, x)
        >>> rest = vjp(g)[0] - vjp_raw(s * g)[0]
        >>> bool(jnp.allclose(normalization_gradient(phi, x, jnp.dot(g, phi(x))), rest, atol=1e-6))
        True
    """
    x = jnp.asarray(x, jnp.float32)
    if features.normalization == "none":
        return jnp.zeros_like(x)
    a = relus(x)
    before = [jnp.roll(a, j, axis=-1) for j in range(1, features.nu + 1)]
    after = [jnp.roll(a, -j, axis=-1) for j in range(1, features.nu + 1)]
    pairs = list(zip(before, after, strict=True))
    if features.normalization == "sum":
        scale = 1.0 / (sum(jnp.sum(a * b, axis=-1) for b in before) + features.eps)
        da = jnp.where(a > 0.0, (-scale * dots)[..., None] * sum(b + f for b, f in pairs), 0.0)
    else:
        scale = lax.rsqrt(sum(jnp.sum((a * b) ** 2, axis=-1) for b in before) + features.eps)
        da = (-scale * scale * dots)[..., None] * a * sum(b * b + f * f for b, f in pairs)
    dim = x.shape[-1]
    return da[..., :dim] - da[..., dim:]


def _positions(g: Array) -> Array:
    """The scatter buffer ``[..., scatter_width(d)]`` per position of a (``[..., 2d]``): the
    margin's columns are a's last positions (m = -j is 2d - j)."""
    dim = (g.shape[-1] - MARGIN) // 2
    return g[..., MARGIN:].at[..., 2 * dim - MARGIN:].add(g[..., :MARGIN])


def input_gradient(g: Array, x: Array) -> Array:
    """``J^T (s h)`` passed through the relus, from the scatter buffer ``g``: ``dx = da[..., :d] -
    da[..., d:]`` (the second half is the relu of -x)."""
    da = _positions(g)
    dim = x.shape[-1]
    return jnp.where(x > 0, da[..., :dim], 0.0) - jnp.where(x < 0, da[..., dim:], 0.0)


def feature_dots(g: Array, x: Array) -> Array:
    """Each row's ``c = <h, phi_n>`` (``[...]``) from the scatter buffer ``g`` of ``J^T (s h)``,
    h = dL/dphi_n, and the raw inputs ``x [..., d]``: phi is a homogeneous quadratic in a, so
    ``<J^T y, a> = 2 <y, phi>`` for any y (Euler), and ``<J^T (s h), a> / 2 = <h, s phi>``. No
    kernel sums ``<h, phi_n>`` over the tiles as it goes."""
    return 0.5 * jnp.sum(_positions(g) * relus(x), axis=-1)


def map_gradient(features: DPFP, g: Array, x: Array, dots: Array | None = None) -> Array:
    """dL/dx, float32, from the scatter buffer ``g [..., scatter_width(d)]`` the kernels filled with
    ``J^T (s h)`` (h = dL/dphi_n) and the raw inputs ``x [..., d]``: :func:`input_gradient` plus the
    normalisation's part (:func:`normalization_gradient` of ``dots``, :func:`feature_dots` unless
    the caller has them already).

    Example: the scatter buffer of one row, filled tile by tile as the kernels do, gives the map's VJP.
        >>> import jax, jax.numpy as jnp
        >>> phi, x, h = DPFP(1, "sum"), jnp.linspace(-1.0, 1.0, 32), jnp.linspace(0.0, 1.0, 64)
        >>> raw = DPFP(1, "none")
        >>> s = 1.0 / (raw(x).sum() + phi.eps)
        >>> a = relus(x)
        >>> g = jnp.zeros(scatter_width(32)).at[MARGIN:].add(s * h * jnp.roll(a, 1))
        >>> g = g.at[MARGIN - 1:MARGIN + 63].add(s * h * a)  # m = p - 1, unwrapped into the margin
        >>> bool(jnp.allclose(map_gradient(phi, g, x), jax.vjp(phi, x)[1](h)[0], atol=1e-6))
        True
    """
    return input_gradient(g, x) + normalization_gradient(features, x, feature_dots(g, x) if dots is None else dots)


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
