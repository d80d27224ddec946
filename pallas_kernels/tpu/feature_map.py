"""The feature maps the TPU kernel computes itself from q and k read at width d, and their VJPs.

With a :class:`KernelFeatures` the kernel reads the raw queries and keys (width d) and computes
``phi(q)``, ``phi(k)`` per chunk in VMEM, forward and backward; the backward applies the map's
VJP there and writes dq, dk at width d. So q and k cross HBM at width d instead of K (DPFP-nu:
K = 2 nu d), and nothing K-wide is kept for the backward. This package imports nothing of
``dpfp_jax``: the dispatcher translates a ``dpfp_jax.Features`` into this description.

The maps work on a chunk's transpose ``x^T`` ``[d, C]`` (the features on the sublanes, the steps
on the lanes: how the kernel reads a value array, ``layout.py``), in float32, so that DPFP's
halves and rolled copies are sublane concatenations and rotations (``pltpu.roll``) at whole
tiles, and the normalisations sums over the sublanes. Each equals, element for element, what
``dpfp_jax.Features`` computes on ``x`` in float32:

- ``"dpfp"``: ``a = [relu(x); relu(-x)]`` ``[2d, C]``, ``b_j = a * roll(a, j)`` for j = 1..nu, stacked;
- ``"identity"``: ``x``; ``"relu"``: ``max(x, 0)``; ``"elu_plus_one"``: ``elu(x) + 1``;

then the normalisation over the features: ``"sum"`` ``phi / (sum(phi) + eps)``, ``"l2"``
``phi * rsqrt(sum(phi^2) + eps)``, ``"none"``.

Example (outside a kernel, as the kernel computes it: DPFP-1 of x = [1, -2] for one step; jitted,
as ``pltpu.roll`` has no eager rule):
    >>> import jax, jax.numpy as jnp
    >>> jax.jit(features_t, static_argnums=1)(jnp.array([[1.0], [-2.0]]), KernelFeatures("dpfp", dim=2)).ravel()
    Array([2., 0., 0., 0.], dtype=float32)
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.validation import MAX_KEY_DIM, check_positive_int

Array = jax.Array
f32 = jnp.float32

KINDS = ("dpfp", "identity", "relu", "elu_plus_one")
NORMALIZATIONS = ("sum", "l2", "none")
# The raw widths the kernel reads and maps (layout.py: below 128 with the steps on the lanes, 128
# row-major); the ones its tests and compiles cover.
RAW_WIDTHS = (32, 64, 128)


class KernelFeatures(NamedTuple):
    """A feature map the kernel computes itself: ``kind`` (one of ``KINDS``), the raw width
    ``dim`` (one of ``RAW_WIDTHS``), DPFP's ``nu`` (1 for the other kinds), the
    ``normalization`` (one of ``NORMALIZATIONS``) and its ``eps``. Static and hashable.

    Example:
        >>> KernelFeatures("dpfp", dim=64, nu=3, normalization="sum").width
        384
    """

    kind: str
    dim: int
    nu: int = 1
    normalization: str = "none"
    eps: float = 1e-6

    @property
    def width(self) -> int:
        """K, the width of phi(x)."""
        return 2 * self.nu * self.dim if self.kind == "dpfp" else self.dim


def check_kernel_features(features: object, dim: int) -> KernelFeatures:
    """``features`` if it is a :class:`KernelFeatures` the kernel computes for q, k of width ``dim``;
    else a TypeError/ValueError naming what is wrong.

    Example:
        >>> check_kernel_features(KernelFeatures("dpfp", dim=64, nu=9), 64)
        Traceback (most recent call last):
        ...
        ValueError: features: the Pallas kernels take K <= 1024; got K = 2 * nu * d = 1152 (nu=9, d=64)
    """
    if not isinstance(features, KernelFeatures):
        raise TypeError(f"features must be a KernelFeatures or None; got {type(features).__name__}")
    if features.kind not in KINDS:
        raise ValueError(f"features.kind must be one of {KINDS}; got {features.kind!r}")
    if features.dim not in RAW_WIDTHS:
        raise ValueError(f"features.dim must be one of {RAW_WIDTHS} (the raw widths the kernel maps); "
                         f"got {features.dim!r}")
    if features.dim != dim:
        raise ValueError(f"q and k must be [B, T, H, d] with d = features.dim = {features.dim}; got d = {dim}")
    check_positive_int("features.nu", features.nu)
    if features.kind != "dpfp" and features.nu != 1:
        raise ValueError(f"features.nu is DPFP's option; kind {features.kind!r} takes nu=1, got {features.nu}")
    if features.normalization not in NORMALIZATIONS:
        raise ValueError(f"features.normalization must be one of {NORMALIZATIONS}; got {features.normalization!r}")
    eps = features.eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"features.eps must be a finite real number >= 0; got {eps!r}")
    if features.width > MAX_KEY_DIM:
        raise ValueError(f"features: the Pallas kernels take K <= {MAX_KEY_DIM}; got K = 2 * nu * d = "
                         f"{features.width} (nu={features.nu}, d={features.dim})")
    return features


def _halves(xt: Array) -> Array:
    """DPFP's ``a = [relu(x); relu(-x)]``, ``[2d, C]``."""
    return jnp.concatenate([jnp.maximum(xt, 0.0), jnp.maximum(-xt, 0.0)], axis=0)


def _rolled(a: Array, shift: int) -> Array:
    """``roll(a, shift)`` along the features (a sublane rotation in the kernel); ``shift`` in [0, 2d)."""
    return pltpu.roll(a, shift % a.shape[0], 0)


def _unnormalized(xt: Array, features: KernelFeatures) -> Array:
    """The map before its normalisation, ``[K, C]`` float32."""
    if features.kind == "dpfp":
        a = _halves(xt)
        return jnp.concatenate([a * _rolled(a, j) for j in range(1, features.nu + 1)], axis=0)
    if features.kind == "relu":
        return jnp.maximum(xt, 0.0)
    if features.kind == "elu_plus_one":
        return jnp.where(xt > 0, xt + 1.0, jnp.exp(jnp.minimum(xt, 0.0)))
    return xt


def _norm_factor(raw: Array, features: KernelFeatures) -> Array:
    """``[1, C]``: what the normalisation multiplies each step's features by."""
    if features.normalization == "sum":
        return 1.0 / (jnp.sum(raw, axis=0, keepdims=True) + features.eps)
    return jax.lax.rsqrt(jnp.sum(raw * raw, axis=0, keepdims=True) + features.eps)


def features_t(xt: Array, features: KernelFeatures) -> Array:
    """``phi(x)^T`` ``[K, C]`` float32 for a chunk's transpose ``x^T`` ``[d, C]`` (float32).

    Example:
        >>> import jax.numpy as jnp
        >>> phi_t = features_t(jnp.array([[3.0], [-4.0]]), KernelFeatures("identity", 2, normalization="l2"))
        >>> [round(float(value), 4) for value in phi_t.ravel()]
        [0.6, -0.8]
    """
    raw = _unnormalized(xt, features)
    if features.normalization == "none":
        return raw
    return raw * _norm_factor(raw, features)


def features_t_vjp(xt: Array, gt: Array, features: KernelFeatures) -> Array:
    """``(dL/dx)^T`` ``[d, C]`` float32 from ``x^T`` ``[d, C]`` and ``(dL/dphi)^T`` ``gt`` ``[K, C]``
    (float32): the map is recomputed from x, then differentiated by hand.

    Normalisations (phi = raw * n, per step): sum, ``n = 1 / (sum(raw) + eps)``: ``d raw = n (g -
    <g, phi>)``; l2, ``n = rsqrt(sum(raw^2) + eps)``: ``d raw = n (g - phi <g, phi>)``. DPFP:
    ``b_j = a * roll(a, j)`` gives ``da = sum_j db_j * roll(a, j) + roll(db_j * a, -j)``, and
    ``dx = da[:d] [x > 0] - da[d:] [x < 0]`` (relu's derivative at 0 is 0, as JAX's).

    Example (sum normalisation: phi sums to 1 whatever x's scale, so a constant g gives dx = 0):
        >>> import jax, jax.numpy as jnp
        >>> spec = KernelFeatures("dpfp", dim=2, normalization="sum", eps=0.0)
        >>> jax.jit(features_t_vjp, static_argnums=2)(jnp.array([[1.0], [-2.0]]), jnp.ones((4, 1)), spec).ravel()
        Array([0., 0.], dtype=float32)
    """
    raw = _unnormalized(xt, features)
    if features.normalization == "sum":
        factor = _norm_factor(raw, features)
        d_raw = factor * (gt - jnp.sum(gt * raw, axis=0, keepdims=True) * factor)
    elif features.normalization == "l2":
        factor = _norm_factor(raw, features)
        phi = raw * factor
        d_raw = factor * (gt - phi * jnp.sum(gt * phi, axis=0, keepdims=True))
    else:
        d_raw = gt
    if features.kind == "relu":
        return jnp.where(xt > 0, d_raw, 0.0)
    if features.kind == "elu_plus_one":
        return jnp.where(xt > 0, d_raw, d_raw * jnp.exp(jnp.minimum(xt, 0.0)))
    if features.kind == "identity":
        return d_raw
    a, two_d = _halves(xt), 2 * features.dim
    da = jnp.zeros_like(a)
    for j in range(1, features.nu + 1):
        db = d_raw[(j - 1) * two_d:j * two_d]
        da = da + db * _rolled(a, j) + _rolled(db * a, -j)
    return jnp.where(xt > 0, da[:features.dim], 0.0) - jnp.where(xt < 0, da[features.dim:], 0.0)
