"""Feature maps phi for linear (fast-weight) attention.

Every map is a pure function on the last axis: ``[..., d] -> [..., feature_dim(name, d)]``.
DPFP is the paper's deterministic parameter-free projection; the others are the baselines the
paper compares against (Sec. 5 and 6). :data:`REGISTRY` holds one :class:`FeatureMap` per name
(the function and its output width); :func:`feature_dim` and :func:`apply_feature_map` read it.

Example:
    >>> import jax.numpy as jnp
    >>> import dpfp_jax as dj
    >>> dj.dpfp(jnp.ones((4, 3, 8)), nu=2).shape
    (4, 3, 32)
    >>> dj.feature_dim("dpfp", 64, nu=3)
    384
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np

from dpfp_jax.validation import check_choice, check_positive_int

Array = jax.Array


def dpfp(x: Array, nu: int = 1) -> Array:
    """DPFP-nu projection (Schlag et al. 2021, section 5.4), element for element as dpfp-pytorch's.

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
    which the original package's plain division does not.

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


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """One registered feature map: the function and how wide its output is.

    Attributes:
      name: the name :func:`apply_feature_map`, :func:`feature_dim` and the modules take.
      fn: the map, called as ``fn(x, **{o: value of o for o in options})``.
      width: the output width for an input width d, called as ``width(d, **{o: ... for o in width_options})``.
      options: the keywords of :func:`apply_feature_map` that ``fn`` takes (``"nu"``, ``"projection"``).
      width_options: the keywords of :func:`feature_dim` that ``width`` takes (``"nu"``, ``"num_features"``).
      non_negative: whether every feature is >= 0 for every input. Sum normalisation and the
        attention normalisation's denominator assume it (:func:`is_non_negative`); False, the
        default, is the safe answer for a map not known to be.

    Example:
        >>> REGISTRY["dpfp"].width(8, nu=2), REGISTRY["dpfp"].non_negative, REGISTRY["identity"].non_negative
        (32, True, False)
    """

    name: str
    fn: Callable[..., Array]
    width: Callable[..., int]
    options: tuple[str, ...] = ()
    width_options: tuple[str, ...] = ()
    non_negative: bool = False


def _dpfp_width(dim: int, nu: int) -> int:
    return 2 * check_positive_int("nu", nu) * dim


def _favor_width(dim: int, num_features: int) -> int:
    return 2 * check_positive_int("num_features", num_features)


def _same_width(dim: int) -> int:
    return dim


REGISTRY: Mapping[str, FeatureMap] = MappingProxyType({m.name: m for m in (
    FeatureMap("dpfp", dpfp, _dpfp_width, options=("nu",), width_options=("nu",), non_negative=True),
    FeatureMap("linear", elu_plus_one, _same_width, non_negative=True),  # elu(x) + 1 > 0
    FeatureMap("favor", favor, _favor_width, options=("projection",), width_options=("num_features",),
               non_negative=True),  # exp(.) > 0
    FeatureMap("relu", relu, _same_width, non_negative=True),
    FeatureMap("identity", identity, _same_width, non_negative=False),
)})
"""The feature maps by name (read-only); a new map is one :class:`FeatureMap` entry here."""

FEATURE_MAPS = tuple(REGISTRY)
"""Names accepted by :func:`feature_dim`, :func:`apply_feature_map` and the modules' ``feature_map``."""

# The options without a default (None until given), and what to give, for the error when a call leaves one out.
_REQUIRED_OPTIONS = {
    "num_features": "num_features (m, the random projections)",
    "projection": "a projection from favor_projection()",
}

FeatureMapLike = str | Callable[[Array], Array]
"""A name in :data:`FEATURE_MAPS`, or a pure callable ``[..., d] -> [..., K]`` (any K >= 1)."""


def _check_callable_output(fn: Callable[[Array], Array], in_shape: tuple[int, ...], out: object) -> int:
    """K, if ``out`` is floating ``[*in_shape[:-1], K]`` with K >= 1; else a ValueError/TypeError."""
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != len(in_shape) or tuple(shape[:-1]) != in_shape[:-1] or shape[-1] < 1:
        got = f"shape {tuple(shape)}" if shape is not None else f"a {type(out).__name__}"
        raise ValueError(
            f"a callable feature_map must map [..., d] to [..., K] (K >= 1), keeping the leading shape; "
            f"{fn!r} mapped an input of shape {in_shape} to {got}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"a callable feature_map must return floating features; {fn!r} returned {out.dtype}")
    return shape[-1]


def _callable_width(fn: Callable[[Array], Array], dim: int) -> int:
    # Only the output's shape is evaluated: nothing is computed.
    return _check_callable_output(fn, (dim,), jax.eval_shape(fn, jax.ShapeDtypeStruct((dim,), jnp.float32)))


def _apply_callable(fn: Callable[[Array], Array], x: Array) -> Array:
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"x must have a feature axis; got a scalar of shape {x.shape}")
    out = fn(x)
    width = _check_callable_output(fn, x.shape, out)
    # The modules size their memory from the width on one [d] vector; it must hold for every leading shape.
    vector_width = _callable_width(fn, x.shape[-1])
    if width != vector_width:
        raise ValueError(
            f"a callable feature_map's output width must depend on d alone; {fn!r} gave {vector_width} "
            f"features for an input of shape ({x.shape[-1]},) but {width} for one of shape {x.shape}"
        )
    return out


def _entry(feature_map: FeatureMapLike) -> FeatureMap:
    """The registry's entry for a name, or an unregistered one wrapping a callable."""
    if isinstance(feature_map, str):
        return REGISTRY[check_choice("feature_map", feature_map, FEATURE_MAPS)]
    if callable(feature_map):
        return FeatureMap(
            repr(feature_map),
            functools.partial(_apply_callable, feature_map),
            functools.partial(_callable_width, feature_map),
        )
    raise TypeError(
        f"feature_map must be one of {FEATURE_MAPS} or a callable [..., d] -> [..., K]; "
        f"got {feature_map!r} of type {type(feature_map).__name__}"
    )


def check_feature_map(feature_map: object) -> None:
    """ValueError for a name not in :data:`FEATURE_MAPS`, TypeError for neither a name nor a callable.

    Example:
        >>> check_feature_map("dpfp"); check_feature_map(lambda x: x ** 2)
        >>> check_feature_map(3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: feature_map must be one of (...) or a callable [..., d] -> [..., K]; got 3 of type int
    """
    _entry(feature_map)


def _options(entry: FeatureMap, names: tuple[str, ...], given: dict[str, object]) -> dict[str, object]:
    """The options ``entry`` takes out of ``given``; a ValueError for a required one that is None."""
    for name in names:
        if name in _REQUIRED_OPTIONS and given[name] is None:
            raise ValueError(f"feature_map {entry.name!r} needs {_REQUIRED_OPTIONS[name]}")
    return {name: given[name] for name in names}


def feature_dim(
    feature_map: FeatureMapLike, dim: int, *, nu: int = 1, num_features: int | None = None
) -> int:
    """Output width of ``feature_map`` for an input width ``dim``.

    Args:
      feature_map: one of :data:`FEATURE_MAPS`, or a callable ``[..., d] -> [..., K]``: its K
        is found by evaluating its output shape on a ``[dim]`` input (nothing is computed).
      dim: input width d.
      nu: DPFP's nu (used by ``"dpfp"`` only).
      num_features: FAVOR+'s number of random projections m (required by ``"favor"``).

    Example:
        >>> feature_dim("favor", 64, num_features=128)
        256
        >>> import jax.numpy as jnp
        >>> feature_dim(lambda x: jnp.concatenate([x, x ** 2], axis=-1), 64)
        128
    """
    dim = check_positive_int("dim", dim)
    entry = _entry(feature_map)
    return entry.width(dim, **_options(entry, entry.width_options, dict(nu=nu, num_features=num_features)))


def apply_feature_map(
    feature_map: FeatureMapLike, x: Array, *, nu: int = 1, projection: Array | None = None
) -> Array:
    """Apply the feature map called ``feature_map`` (one of :data:`FEATURE_MAPS`) to ``x``.

    ``projection`` is required for ``"favor"`` and refused elsewhere. A callable ``feature_map``
    is applied as it is (``nu`` is ignored, as by every map but DPFP); its output must be
    floating and keep ``x``'s leading shape, ``[..., d] -> [..., K]``, else a ValueError.

    Example:
        >>> import jax.numpy as jnp
        >>> apply_feature_map("dpfp", jnp.ones((3, 4)), nu=2).shape
        (3, 16)
        >>> apply_feature_map(lambda x: jnp.concatenate([x, -x], axis=-1), jnp.ones((3, 4))).shape
        (3, 8)
    """
    entry = _entry(feature_map)
    if projection is not None and "projection" not in entry.options:
        users = " or ".join(repr(m.name) for m in REGISTRY.values() if "projection" in m.options)
        raise ValueError(f"projection is only used by feature_map {users}; got it for {feature_map!r}")
    return entry.fn(x, **_options(entry, entry.options, dict(nu=nu, projection=projection)))


FEATURE_NORMALIZATIONS = ("sum", "l2", "none")
"""Accepted values of :class:`Features`' ``normalization``: :func:`sum_norm`, :func:`l2_norm`, none."""


def normalized(phi: Array, normalization: str, eps: float) -> Array:
    """``phi`` normalised over its last axis: :func:`sum_norm` for ``"sum"``, :func:`l2_norm` for
    ``"l2"``, as it is for any other value (``"none"``, and the layers' ``"attention"``, whose
    denominator is applied after the op).

    Example:
        >>> import jax.numpy as jnp
        >>> normalized(jnp.array([1.0, 3.0]), "sum", 0.0).tolist(), normalized(jnp.array([2.0]), "none", 0.0).tolist()
        ([0.25, 0.75], [2.0])
    """
    if normalization == "sum":
        return sum_norm(phi, eps)
    if normalization == "l2":
        return l2_norm(phi, eps)
    return phi


@dataclasses.dataclass(frozen=True)
class Features:
    """A feature map and its normalisation, as :func:`dpfp_jax.fast_weight` applies them itself.

    With ``dj.fast_weight(q, k, v, beta, features=Features(...))`` the op takes the raw queries and
    keys (width ``dim``) and computes ``phi(q)``, ``phi(k)`` (width :attr:`key_dim`) where it uses
    them: the ``scan`` and ``chunk`` impls keep q and k at width ``dim`` for their backward and
    recompute the features there (docs/math.md, "Feature maps inside the op"). A static
    description, hashable: what a kernel needs to compute the map itself.

    Attributes:
      feature_map: a name in :data:`FEATURE_MAPS` other than ``"favor"`` (its random projection
        is an array, which a static description does not carry: apply :func:`favor` before the
        op), or a pure callable ``[..., d] -> [..., K]``, differentiated by :func:`jax.vjp`.
      dim: d, the width of the raw q and k the op is given (checked against them).
      nu: DPFP's nu (``feature_map="dpfp"`` only; 1 for every other map).
      normalization: one of ``FEATURE_NORMALIZATIONS``: ``"sum"`` (:func:`sum_norm`, the paper's
        delta-rule layers), ``"l2"`` (:func:`l2_norm`) or ``"none"``, applied after the map.
      eps: the normalisation's epsilon.

    ``features(x)`` is ``phi`` itself, ``[..., dim] -> [..., key_dim]``: the op with ``features``
    computes what the op without it computes on ``features(q), features(k)``.

    Example:
        >>> import jax.numpy as jnp
        >>> phi = Features("dpfp", dim=8, nu=3, normalization="sum")
        >>> phi.key_dim, phi(jnp.ones((2, 8))).shape, float(phi(jnp.ones(8)).sum().round(4))
        (48, (2, 48), 1.0)
    """

    feature_map: FeatureMapLike
    dim: int
    nu: int = 1
    normalization: str = "none"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.feature_map, str) and self.feature_map == "favor":
            raise ValueError(
                "feature_map='favor' cannot be a Features: FAVOR+ needs its random projection, an array, which "
                "this static description does not carry; apply dj.favor(x, projection) to q and k before the op "
                "(the modules do so for feature_map='favor')")
        check_feature_map(self.feature_map)
        check_positive_int("dim", self.dim)
        if self.feature_map == "dpfp":
            check_positive_int("nu", self.nu)
        elif self.nu != 1:
            raise ValueError(f"nu is DPFP's option; feature_map={self.feature_map!r} takes none (leave nu=1), "
                             f"got nu={self.nu!r}")
        check_choice("normalization", self.normalization, FEATURE_NORMALIZATIONS)
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not 0 <= self.eps < math.inf:
            raise ValueError(f"eps must be a finite real number >= 0; got {self.eps!r}")
        self.key_dim  # noqa: B018 - a callable's output width, checked on one [dim] vector now

    @property
    def key_dim(self) -> int:
        """K, the width of ``phi(x)`` for an ``x`` of width :attr:`dim`."""
        return feature_dim(self.feature_map, self.dim, nu=self.nu)

    def __call__(self, x: Array) -> Array:
        """``phi(x)``: the map, then the normalisation, over the last axis, in x's dtype."""
        return normalized(apply_feature_map(self.feature_map, x, nu=self.nu), self.normalization, self.eps)

    def with_vjp(self, x: Array) -> tuple[Array, Callable[[Array], Array]]:
        """``(phi(x), back)``: ``back(ct)`` is the cotangent of x for a cotangent ``ct`` of phi(x),
        ``ct`` cast to phi(x)'s dtype first (a backward computes in float32 what a bfloat16 phi
        would have been given as bfloat16).

        Example:
            >>> import jax.numpy as jnp
            >>> phi, back = Features("relu", dim=2).with_vjp(jnp.array([-1.0, 2.0]))
            >>> phi.tolist(), back(jnp.ones(2)).tolist()
            ([0.0, 2.0], [0.0, 1.0])
        """
        phi, vjp = jax.vjp(self, x)
        return phi, lambda ct: vjp(ct.astype(phi.dtype))[0]


def sign_probe(dim: int) -> np.ndarray:
    """The fixed inputs ``[16, dim]`` float32 on which :func:`is_non_negative` evaluates a callable:
    a ramp over [-3, 3] and its reverse, constant rows from -3 to 3 (zero included), and eight
    fixed Gaussian rows of scale 1.5: the range a layer's pre-feature projections live in.

    Example:
        >>> sign_probe(4).shape, float(sign_probe(4).min()) <= -3.0
        ((16, 4), True)
    """
    dim = check_positive_int("dim", dim)
    ramp = np.linspace(-3.0, 3.0, dim)
    constants = np.array([-3.0, -1.0, -0.25, 0.0, 0.25, 1.0])[:, None] * np.ones(dim)
    gaussian = 1.5 * np.random.default_rng(0).standard_normal((8, dim))
    return np.concatenate([ramp[None], ramp[None, ::-1], constants, gaussian]).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _callable_non_negative(fn: Callable[[Array], Array], dim: int) -> bool:
    _callable_width(fn, dim)  # a [d] -> [K] map, or the error that says what it is instead
    # Values, not shapes: evaluated now even inside a jit trace (the probe is a constant). Row by
    # row (vmap): the map is only known to take [d] vectors here; other shapes are checked when applied.
    with jax.ensure_compile_time_eval():
        out = np.asarray(jax.vmap(fn)(jnp.asarray(sign_probe(dim))))
    return not bool(np.any(out < 0))  # NaN compares False: it is no evidence of a sign


def is_non_negative(feature_map: FeatureMapLike, dim: int) -> bool:
    """Whether ``feature_map``'s features are non-negative, as sum normalisation needs.

    A registered map answers from :data:`REGISTRY` (``"identity"`` is signed, every other one
    non-negative). A callable is evaluated on the fixed :func:`sign_probe` input of width
    ``dim`` (concrete values, also inside ``jit``): any negative feature makes it signed. That is
    evidence, not proof: a callable negative only far outside [-3, 3] passes. ``dim`` is the
    input width d (a registered map's sign depends on neither d nor its options).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> is_non_negative("dpfp", 8), is_non_negative("identity", 8)
        (True, False)
        >>> is_non_negative(jnp.tanh, 8), is_non_negative(jax.nn.relu, 8)
        (False, True)
    """
    entry = _entry(feature_map)
    if isinstance(feature_map, str):
        return entry.non_negative
    dim = check_positive_int("dim", dim)
    try:
        return _callable_non_negative(feature_map, dim)
    except TypeError as error:  # an unhashable callable: not cached
        if "unhashable" not in str(error):
            raise
        return _callable_non_negative.__wrapped__(feature_map, dim)
