"""DPFP computed inside the fused recurrent GPU kernel (``fused_recurrent(..., features=DPFP(...))``),
in interpret mode on the CPU, against the oracle: the library's ``Features`` applied first, then
``reference``. One small case runs in ``make test``; nu in 1..4 and d in {32, 64, 128}, both rules and
every normalisation are slow."""

import jax.numpy as jnp
import pytest

import dpfp_jax as dj
from dpfp_jax.ops.fast_weight.pallas import fast_weight_pallas
from pallas_kernels import fused_recurrent
from pallas_kernels.triton.dpfp import DPFP
from tests.helpers import assert_relative_error, kernel_key_widths
from tests.helpers import dpfp_then_reference as oracle
from tests.helpers import raw_dpfp_inputs as inputs
from tests.helpers import scaled_results_and_grads as results_and_grads

SLOW = pytest.mark.slow


def on_chip(rule, nu, normalization):
    def fn(q, k, v, beta, state, scale):
        return fused_recurrent(q, k, v, beta, state, rule=rule, scale=scale, interpret=True,
                               features=DPFP(nu, normalization))
    return fn


def cases():
    # The one make-test case: 3 steps, one head, K = 64 (one key tile), every gradient.
    yield "delta", 32, 1, "sum", 3, 1, []
    for rule in ("delta", "sum"):
        for dim, nu, normalization in ((32, 2, "l2"), (32, 4, "sum"), (64, 1, "none"), (64, 3, "sum"),
                                       (96, 2, "sum"), (128, 2, "l2"), (128, 4, "sum")):
            yield rule, dim, nu, normalization, 7, 2, [SLOW]


@pytest.mark.parametrize("rule, dim, nu, normalization, time, heads",
                         [pytest.param(*case[:6], marks=case[6]) for case in cases()])
def test_fused_recurrent_computes_dpfp_on_chip(rule, dim, nu, normalization, time, heads):
    # Unnormalised features of unit Gaussians break the delta rule's bound: smaller inputs keep it.
    args = inputs(rule, dim, nu, time, heads=heads, spread=0.3 if normalization == "none" else 1.0)
    got = results_and_grads(on_chip(rule, nu, normalization), rule, args)
    want = results_and_grads(oracle(rule, dim, nu, normalization), rule, args)
    assert_relative_error(got, want, 2e-5)


@pytest.mark.parametrize("with_resets, width", [(False, 64), pytest.param(True, 512, marks=SLOW)])
def test_the_dispatcher_hands_the_recurrent_kernel_dpfp_without_documents(with_resets, width):
    """Below one chunk impl="pallas" on a GPU runs the fused recurrent kernel: it reads q, k at width
    d and maps them itself; with packed documents it is given phi(q), phi(k) (K = 384, padded to 512)."""
    features = dj.Features("dpfp", dim=64, nu=3, normalization="sum")
    q, k, v, beta, state = inputs("delta", 64, 3, 5)
    resets = jnp.array([[False, False, True, False, False]]) if with_resets else None

    def run(q, k, v, beta, state):
        return fast_weight_pallas(q, k, v, beta, state, rule="delta", scale=1.0, chunk_size=16, interpret=True,
                                  features=features, resets=resets)

    assert kernel_key_widths(run, q, k, v, beta, state, kernel="fused_recurrent") == [width] * 2


@pytest.mark.parametrize("kwargs, dim, error, message", [
    (dict(features=DPFP(2)), 48, ValueError, r"multiple of 32 \(2d whole 64-column tiles\); got d=48"),
    (dict(features=DPFP(4)), 256, ValueError, "K <= 1024; DPFP with nu=4 on d=256 makes K=2048"),
    (dict(features=dj.Features("dpfp", dim=32)), 32, TypeError, "must be a pallas_kernels DPFP"),
    (dict(features=DPFP(1), resets=jnp.zeros((1, 4), bool)), 32, ValueError, "without resets and log_decay; got"),
])
def test_fused_recurrent_refuses_features_it_cannot_compute(kwargs, dim, error, message):
    x = jnp.ones((1, 4, 1, dim))
    state = jnp.zeros((1, 1, 2 * dim, 8))
    with pytest.raises(error, match=message):
        fused_recurrent(x, x, jnp.ones((1, 4, 1, 8)), None, state, rule="sum", interpret=True, **kwargs)
