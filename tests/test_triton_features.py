"""DPFP computed inside the fused chunk GPU kernel (``pallas_kernels/triton/dpfp.py``), in interpret
mode on the CPU, against the oracle: the library's ``Features`` applied first, then ``reference``.

Interpret mode is slow (every gather and atomic add of a tile is an XLA op): one small case runs in
``make test``; nu in 1..4 and d in {32, 64, 128}, both rules and every normalisation are slow.
The H200 compile of the same kernel is in tests/test_deviceless.py and the report.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpfp_jax as dj
from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas, gpu_kernel_features
from dpfp_jax.ops.fast_weight.wy import wy_inverse
from pallas_kernels import fused_chunk
from pallas_kernels.triton import fused_chunk as fused_chunk_module
from pallas_kernels.triton.dpfp import (
    DPFP,
    MARGIN,
    MAX_NU,
    NORMALIZATIONS,
    TILE,
    feature_dots,
    map_gradient,
    scatter_width,
)
from pallas_kernels.triton.fused_chunk import SPAN_CHUNKS
from tests.helpers import assert_relative_error, kernel_key_widths, normal
from tests.helpers import dpfp_then_reference as oracle
from tests.helpers import raw_dpfp_inputs as inputs
from tests.helpers import scaled_results_and_grads as results_and_grads

SLOW = pytest.mark.slow
CHUNK = 16


def on_chip(rule, nu, normalization):
    def fn(q, k, v, beta, state, scale):
        return fused_chunk(q, k, v, beta, state, rule=rule, scale=scale, chunk_size=CHUNK, interpret=True,
                           wy_inverse=wy_inverse if rule == "delta" else None, features=DPFP(nu, normalization))
    return fn


def cases():
    """``(rule, dim, nu, normalization, time, span, marks)``; ``span``: the WY inverse's
    SPAN_CHUNKS for the case (None: the module's)."""
    # The make-test cases, small: one head, K = 64 (one tile), every gradient. The delta rule's over
    # two chunks, so the backward's walks (the scores kernel's forward one, the main kernel's
    # reverse one) carry a state from one chunk to the next, and with spans of one chunk, so the
    # WY inverse's phi(k) (checkpointed) and the map's VJP go through lax.map's scan; the sum rule's, where
    # the scores kernel reads v for the writes, over one chunk.
    yield "delta", 32, 1, "sum", 2 * CHUNK, 1, []
    yield "sum", 32, 1, "sum", CHUNK, None, []
    # One whole span of SPAN_CHUNKS chunks and a shorter last one.
    yield "delta", 32, 1, "sum", (SPAN_CHUNKS + 1) * CHUNK + 5, None, [SLOW]
    for rule in ("delta", "sum"):
        # d = 96: 2d = 192 is three tiles, the middle one straddling a's sign change at d.
        for dim, nu, normalization in ((32, 2, "l2"), (32, 4, "sum"), (64, 1, "none"), (64, 3, "sum"),
                                       (96, 1, "l2"), (128, 2, "l2"), (128, 4, "sum")):
            yield rule, dim, nu, normalization, 37, None, [SLOW]


@pytest.mark.parametrize("rule, dim, nu, normalization, time, span",
                         [pytest.param(*case[:6], marks=case[6]) for case in cases()])
def test_fused_chunk_computes_dpfp_on_chip(rule, dim, nu, normalization, time, span, monkeypatch):
    if span is not None:  # read when the kernel's caller is traced
        monkeypatch.setattr(fused_chunk_module, "SPAN_CHUNKS", span)
    # Unnormalised features of unit Gaussians have beta |phi(k)|^2 far above the delta rule's bound
    # of 2 (the state, and every error, grows exponentially): smaller inputs keep it below 1.
    heads = 1 if time <= 2 * CHUNK else 2  # one head in the make-test cases
    args = inputs(rule, dim, nu, time, heads=heads, spread=0.3 if normalization == "none" else 1.0)
    got = results_and_grads(on_chip(rule, nu, normalization), rule, args)
    want = results_and_grads(oracle(rule, dim, nu, normalization), rule, args)
    # Outputs, final state and every gradient (dq, dk at width d), relative to each one's largest entry.
    assert_relative_error(got, want, 2e-5)


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fused_chunk_computes_dpfp_on_chip_with_packed_documents(rule):
    args = inputs(rule, 32, 2, 40)
    ids = jnp.array([[0] * 5 + [1] * 20 + [2] * 15])  # documents start inside chunks and on a boundary

    def on_chip_packed(q, k, v, beta, state, scale):
        resets = jnp.concatenate([jnp.zeros((1, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
        return fused_chunk(q, k, v, beta, state, rule=rule, scale=scale, chunk_size=CHUNK, interpret=True,
                           wy_inverse=wy_inverse if rule == "delta" else None, resets=resets,
                           features=DPFP(2, "sum"))

    phi = dj.Features("dpfp", dim=32, nu=2, normalization="sum")

    def packed_oracle(q, k, v, beta, state, scale):
        return dj.fast_weight(phi(q), phi(k), v, beta, rule=rule, initial_state=state, scale=scale,
                              impl="reference", segment_ids=ids)

    assert_relative_error(results_and_grads(on_chip_packed, rule, args),
                          results_and_grads(packed_oracle, rule, args), 2e-5)


@pytest.mark.parametrize("features, fused, width", [
    (dj.Features("dpfp", dim=64, nu=3, normalization="sum"), True, 64),  # the kernel reads q, k at width d
    # phi(q), phi(k) computed first: 2d = 96 is no whole number of tiles (K = 96, padded); nu > 4; another map.
    pytest.param(dj.Features("dpfp", dim=48, nu=1), False, 128, marks=SLOW),
    pytest.param(dj.Features("dpfp", dim=32, nu=5), False, 320, marks=SLOW),
    pytest.param(dj.Features("relu", dim=64), False, 64, marks=SLOW),
])
def test_the_dispatcher_hands_the_gpu_kernel_dpfp_it_can_compute(features, fused, width):
    q, k, v, beta, _ = inputs("delta", features.dim, 1, 32)
    state = jnp.zeros((1, 2, features.key_dim, v.shape[-1]))

    def run(q, k, v, beta, state):
        return fast_weight_pallas(q, k, v, beta, state, rule="delta", scale=1.0, chunk_size=CHUNK, interpret=True,
                                  features=features)

    assert kernel_key_widths(run, q, k, v, beta, state, kernel="fused_chunk") == [width] * 2
    assert (gpu_kernel_features(features) is not None) == fused


@pytest.mark.parametrize("kwargs, dim, error, message", [
    (dict(features=DPFP(2)), 48, ValueError, r"multiple of 32 \(2d whole 64-column tiles\); got d=48"),
    (dict(features=DPFP(4)), 256, ValueError, "K <= 1024; DPFP with nu=4 on d=256 makes K=2048"),
    (dict(features=dj.Features("dpfp", dim=32)), 32, TypeError, "must be a pallas_kernels DPFP"),
])
def test_fused_chunk_refuses_features_it_cannot_compute(kwargs, dim, error, message):
    x = jnp.ones((1, 32, 1, dim))
    state = jnp.zeros((1, 1, 2 * dim, 8))
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda: fused_chunk(x, x, x[..., :8], None, state, rule="sum", chunk_size=CHUNK,
                                           interpret=True, **kwargs))


def test_fused_chunk_with_features_checks_the_state_against_phi_width():
    x = jnp.ones((1, 32, 1, 32))
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, K, V\] = \(1, 1, 128, 8\)"):
        jax.eval_shape(lambda: fused_chunk(x, x, x[..., :8], None, jnp.zeros((1, 1, 32, 8)), rule="sum",
                                           chunk_size=CHUNK, interpret=True, features=DPFP(2)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(nu=0), "nu must be an int from 1 to 4; got nu=0"),
    (dict(nu=5), "nu must be an int from 1 to 4; got nu=5"),
    (dict(nu=1, normalization="max"), "normalization must be one of"),
    (dict(nu=1, eps=0.0), "eps must be a finite real number > 0"),
])
def test_dpfp_description_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPFP(**kwargs)


@pytest.mark.parametrize("normalization", ["sum", pytest.param("l2", marks=SLOW), pytest.param("none", marks=SLOW)])
def test_dpfp_description_is_the_librarys_map(normalization):
    x = normal(0, (3, 5, 32))
    assert_relative_error(DPFP(3, normalization)(x), dj.Features("dpfp", dim=32, nu=3, normalization=normalization)(x),
                          1e-6)


@pytest.mark.parametrize("dim, nu", [pytest.param(dim, nu, marks=[] if (dim, nu) == (96, MAX_NU) else [SLOW])
                                     for dim, nu in itertools.product((32, 64, 96, 128), range(1, MAX_NU + 1))])
def test_the_backward_layout_and_its_xla_parts_are_the_maps_vjp(dim, nu):
    """The fused chunk backward's DPFP VJP without a kernel: the scatter buffer filled as the kernel
    fills it (two contiguous 64-column adds per tile, m = p - j left unwrapped into the margin),
    then ``map_gradient`` (the margin folded back, the relus' masks, and ``-s·c·Jᵀw`` from the
    per-row dots ``feature_dots`` reads off the buffer), against autodiff of the map; every d the kernels take
    up to 128 (the straddling tiles of d = 32, 96), nu 1..4, each normalisation, and exact zeros in
    x (the relus' mask at 0). Pure jnp and numpy: the interpret-mode kernel tests cover few of these.
    make test runs d = 96 (a tile straddles a's sign change) with the largest nu (the whole margin)."""
    rng = np.random.default_rng(dim * 10 + nu)
    for normalization in NORMALIZATIONS:
        features, rows = DPFP(nu, normalization), 3
        x = rng.normal(size=(rows, dim)).astype(np.float32)
        x[0, :3] = 0.0
        cotangent = rng.normal(size=(rows, features.key_dim(dim))).astype(np.float32)
        phi_n, vjp = jax.vjp(features, jnp.asarray(x))
        want = np.asarray(vjp(jnp.asarray(cotangent))[0])
        phi = np.asarray(DPFP(nu, "none")(x))
        scale = (np.ones((rows, 1)) if normalization == "none" else
                 1.0 / (phi.sum(-1, keepdims=True) + features.eps) if normalization == "sum" else
                 1.0 / np.sqrt((phi**2).sum(-1, keepdims=True) + features.eps))
        a = np.concatenate([np.maximum(x, 0.0), np.maximum(-x, 0.0)], axis=-1)
        buffer = np.zeros((rows, scatter_width(dim)), np.float32)
        for start in range(0, features.key_dim(dim), TILE):
            first, shift = start % (2 * dim), start // (2 * dim) + 1
            own = np.arange(first, first + TILE)
            g = scale * cotangent[:, start:start + TILE]
            buffer[:, MARGIN + first + np.arange(TILE)] += g * a[:, (own - shift) % (2 * dim)]
            buffer[:, MARGIN + first - shift + np.arange(TILE)] += g * a[:, own]
        dots = np.sum(cotangent * np.asarray(phi_n), axis=-1)
        assert_relative_error(feature_dots(jnp.asarray(buffer), jnp.asarray(x)), dots, 1e-5)
        assert_relative_error(map_gradient(features, jnp.asarray(buffer), jnp.asarray(x)), want, 1e-5)
