"""Feature maps phi for linear (fast-weight) attention.

Every map is a pure function on the last axis: ``[..., d] -> [..., feature_dim(name, d)]``.
DPFP is the paper's deterministic parameter-free projection; the others are the baselines the
paper compares against (Sec. 5 and 6).

Example:
    >>> import jax.numpy as jnp
    >>> import dpfp_jax as dj
    >>> dj.dpfp(jnp.ones((4, 3, 8)), nu=2).shape
    (4, 3, 32)
    >>> dj.feature_dim("dpfp", 64, nu=3)
    384
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

FEATURE_MAPS = ("dpfp", "linear", "favor", "relu", "identity")
"""Names accepted by :func:`feature_dim` and the linen modules' ``feature_map`` attribute."""


def check_positive_int(name: str, value: object) -> int:
    """TypeError for a non-int, ValueError for an int below 1; shared with the linen modules."""
    # bool is an int subclass; `nu=True` is almost certainly a mistake, so refuse it too.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int; got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return value


def dpfp(x: Array, nu: int = 1) -> Array:
    """DPFP-nu projection (Schlag et al. 2021, Sec. 5.4), element for element as the seed.

    ``a = concat(relu(x), relu(-x))`` in R^{2d}; ``b_j = a * roll(a, j)`` for ``j = 1..nu``;
    the result is ``concat(b_1, ..., b_nu)`` in R^{2 nu d}, non-negative.

    Args:
      x: ``[..., d]`` input, any leading shape.
      nu: the number of rolled products, a positive int.

    Returns:
      ``[..., 2 * nu * d]`` features in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> dpfp(jnp.array([1.0, -2.0]))  # a = [1, 0, 0, 2]; roll(a, 1) = [2, 1, 0, 0]
        Array([2., 0., 0., 0.], dtype=float32)
    """
    nu = check_positive_int("nu", nu)
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"x must have a feature axis; got a scalar of shape {x.shape}")
    a = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
    return jnp.concatenate([a * jnp.roll(a, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


def sum_norm(x: Array, eps: float = 1e-6) -> Array:
    """Divide by the sum over the last axis: ``x / (sum(x) + eps)``.

    Meant for non-negative features; ``eps`` keeps an all-zero row finite (it maps to zeros),
    which the seed's plain division does not.

    Example:
        >>> import jax.numpy as jnp
        >>> sum_norm(jnp.array([1.0, 3.0])).round(4)
        Array([0.25, 0.75], dtype=float32)
    """
    return x / (jnp.sum(x, axis=-1, keepdims=True) + eps)


def l2_norm(x: Array, eps: float = 1e-6) -> Array:
    """Scale to unit L2 norm over the last axis: ``x * rsqrt(sum(x^2) + eps)``.

    For features with negative entries (``identity``, a learned projection), where
    :func:`sum_norm` is no normaliser (the sum can be zero or negative). The squared norm of
    the result is ``s / (s + eps)`` for ``s = sum(x^2)``, so at most 1 (up to rounding): the
    delta rule's ``beta * |k|^2`` stays in ``[0, 1]`` for ``beta`` in ``[0, 1]``. An all-zero
    row maps to zeros with finite gradients (``eps`` sits under the square root; ``x / norm(x)``
    would give NaN). The sum of squares is taken in float32 at least; the result has ``x``'s
    dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([3.0, -4.0])
        >>> bool(jnp.allclose(l2_norm(x), x / 5))
        True
        >>> l2_norm(jnp.zeros(2))
        Array([0., 0.], dtype=float32)
    """
    x = jnp.asarray(x)
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (wide * jax.lax.rsqrt(jnp.sum(wide * wide, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def elu_plus_one(x: Array) -> Array:
    """The linear transformer's map ``elu(x) + 1`` (Katharopoulos et al. 2020); width d.

    Example:
        >>> import jax.numpy as jnp
        >>> elu_plus_one(jnp.array([0.0, 1.0]))
        Array([1., 2.], dtype=float32)
    """
    return jax.nn.elu(x) + 1.0


def relu(x: Array) -> Array:
    """``max(x, 0)``; width d.

    Example:
        >>> import jax.numpy as jnp
        >>> relu(jnp.array([-1.0, 2.0]))
        Array([0., 2.], dtype=float32)
    """
    return jax.nn.relu(x)


def identity(x: Array) -> Array:
    """No feature map (plain, unnormalised linear attention); width d.

    Example:
        >>> import jax.numpy as jnp
        >>> identity(jnp.array([-1.0, 2.0]))
        Array([-1.,  2.], dtype=float32)
    """
    return x


def favor_projection(key: Array, num_features: int, dim: int, *, orthogonal: bool = True) -> Array:
    """Draw the ``[num_features, dim]`` random projection of FAVOR+ (Choromanski et al. 2021).

    With ``orthogonal=True`` rows come in blocks of ``dim`` mutually orthogonal directions
    (QR of a Gaussian matrix), each rescaled by the norm of an independent Gaussian vector so
    that every row is still marginally ``N(0, I)``: the lower-variance estimator Performer uses.

    Example:
        >>> import jax
        >>> favor_projection(jax.random.key(0), 64, 16).shape
        (64, 16)
    """
    num_features = check_positive_int("num_features", num_features)
    dim = check_positive_int("dim", dim)
    key_dirs, key_norms = jax.random.split(key)
    if not orthogonal:
        return jax.random.normal(key_dirs, (num_features, dim))
    num_blocks = math.ceil(num_features / dim)
    gaussian = jax.random.normal(key_dirs, (num_blocks, dim, dim))
    q, _ = jnp.linalg.qr(gaussian)  # columns of each block are orthonormal
    directions = jnp.swapaxes(q, -1, -2).reshape(num_blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(key_norms, (num_features, dim)), axis=-1)
    return directions * norms[:, None]


def favor(x: Array, projection: Array) -> Array:
    """FAVOR+ positive random features, two-sided (hyperbolic) as the paper compares against.

    ``phi(x) = exp(-|x|^2 / 2) / sqrt(2m) * concat(exp(R x), exp(-R x))`` for ``R`` of shape
    ``[m, d]``, so ``E[phi(x) . phi(y)] = exp(x . y)``: an unbiased softmax-kernel estimate.

    Args:
      x: ``[..., d]``.
      projection: ``[m, d]`` from :func:`favor_projection`.

    Returns:
      ``[..., 2 * m]`` positive features.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> favor(jnp.ones((2, 8)), favor_projection(jax.random.key(0), 16, 8)).shape
        (2, 32)
    """
    if projection.ndim != 2 or projection.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"projection must be [num_features, {x.shape[-1]}] to match x's last axis; "
            f"got {projection.shape}"
        )
    num_features = projection.shape[0]
    wx = jnp.einsum("...d,md->...m", x, projection.astype(x.dtype))
    half_sq_norm = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    features = jnp.concatenate([wx - half_sq_norm, -wx - half_sq_norm], axis=-1)
    return jnp.exp(features) / math.sqrt(2 * num_features)


def feature_dim(feature_map: str, dim: int, *, nu: int = 1, num_features: int | None = None) -> int:
    """Output width of ``feature_map`` for an input width ``dim``.

    Args:
      feature_map: one of :data:`FEATURE_MAPS`.
      dim: input width d.
      nu: DPFP's nu (used by ``"dpfp"`` only).
      num_features: FAVOR+'s number of random projections m (required by ``"favor"``).

    Example:
        >>> feature_dim("favor", 64, num_features=128)
        256
    """
    dim = check_positive_int("dim", dim)
    if feature_map == "dpfp":
        return 2 * check_positive_int("nu", nu) * dim
    if feature_map == "favor":
        if num_features is None:
            raise ValueError("feature_map 'favor' needs num_features (m, the random projections)")
        return 2 * check_positive_int("num_features", num_features)
    if feature_map in ("linear", "relu", "identity"):
        return dim
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {feature_map!r}")


_ELEMENTWISE: dict[str, Callable[[Array], Array]] = {
    "linear": elu_plus_one,
    "relu": relu,
    "identity": identity,
}


def apply_feature_map(
    feature_map: str, x: Array, *, nu: int = 1, projection: Array | None = None
) -> Array:
    """Apply the feature map called ``feature_map`` (one of :data:`FEATURE_MAPS`) to ``x``.

    ``projection`` is required for ``"favor"`` and refused elsewhere.

    Example:
        >>> import jax.numpy as jnp
        >>> apply_feature_map("dpfp", jnp.ones((3, 4)), nu=2).shape
        (3, 16)
    """
    if projection is not None and feature_map != "favor":
        raise ValueError(f"projection is only used by feature_map 'favor'; got it for {feature_map!r}")
    if feature_map == "dpfp":
        return dpfp(x, nu)
    if feature_map == "favor":
        if projection is None:
            raise ValueError("feature_map 'favor' needs a projection from favor_projection()")
        return favor(x, projection)
    if feature_map in _ELEMENTWISE:
        return _ELEMENTWISE[feature_map](x)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {feature_map!r}")
