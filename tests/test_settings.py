"""The fast-weight settings live in one place (``FastWeightSettings``) and reach every layer, linen
and NNX; ``chunk_size`` reaches the op; signed feature maps are refused where sum or attention
normalisation needs non-negative features."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dpfp_jax as dj
import dpfp_jax.core.attention as core_attention
from dpfp_jax import nnx as djnnx
from dpfp_jax.core.settings import FastWeightSettings
from tests.helpers import SCRIPTS, normal, run_with_host_devices

B, T, D, H = 2, 8, 8, 2

# One value per setting, none of them its default, all usable together: every layer must carry
# each one to the op's spec. A new setting without a value here fails the first test.
NON_DEFAULT = dict(feature_map="relu", nu=2, num_features=8, favor_seed=3, rule="sum", normalization="l2",
                   eps=1e-5, allow_unbounded_delta=True, impl="scan", chunk_size=4, context_axis="seq",
                   fuse_features=False, gate="gated_deltanet")

LINEN = {
    "FastWeightAttention": lambda **s: dj.FastWeightAttention(num_heads=H, head_dim=D // H, **s),
    "DPFPAttention": lambda **s: dj.DPFPAttention(D, num_heads=H, head_dim=D // H, **s),
    "DPFPformer": lambda **s: dj.DPFPformer(D, 1, num_heads=H, head_dim=D // H, **s),
    "DPFPSelfAttention": lambda **s: dj.nn.DPFPSelfAttention(num_heads=H, **s),
}
NNX = {
    "FastWeightAttention": lambda **s: djnnx.FastWeightAttention(H, D // H, in_features=D, rngs=nnx.Rngs(0), **s),
    "DPFPAttention": lambda **s: djnnx.DPFPAttention(D, H, D // H, rngs=nnx.Rngs(0), **s),
    "DPFPformer": lambda **s: djnnx.DPFPformer(D, 1, H, D // H, rngs=nnx.Rngs(0), **s),
    "DPFPSelfAttention": lambda **s: djnnx.DPFPSelfAttention(H, D, rngs=nnx.Rngs(0), **s),
}


def test_every_setting_has_a_non_default_value_here():
    fields = {f.name: f.default for f in dataclasses.fields(FastWeightSettings)}
    assert set(NON_DEFAULT) == set(fields)
    assert all(NON_DEFAULT[name] != default for name, default in fields.items())


class _Reached(Exception):
    """Raised by the spy of ``specs_attended(..., stop=True)`` once the math is reached."""


def specs_attended(run, stop: bool = False):
    """The AttentionSpecs whose ``attend`` ran while ``run()`` did (spied, the math unchanged); with
    ``stop``, the first one only, the run stopped there (for settings that cannot run together,
    e.g. impl="scan" with a context_axis)."""
    seen = []
    attend = core_attention.AttentionSpec.attend

    def spy(self, *args, **kwargs):
        seen.append(self)
        if stop:
            raise _Reached
        return attend(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core_attention.AttentionSpec, "attend", spy)
        try:
            run()
        except _Reached:
            pass
    return seen


@pytest.mark.parametrize("framework, name", [("linen", n) for n in LINEN] + [("nnx", n) for n in NNX])
def test_every_setting_reaches_the_math_of_every_layer(framework, name):
    x = normal(0, (B, T, D))
    if framework == "linen":
        layer = LINEN[name](**NON_DEFAULT)
        seen = specs_attended(lambda: jax.eval_shape(layer.init, jax.random.key(0), x), stop=True)
    else:
        seen = specs_attended(lambda: NNX[name](**NON_DEFAULT)(x), stop=True)
    assert seen, "the layer never reached the attention's math"
    got = seen[0].settings()
    assert got == NON_DEFAULT, {k: (got[k], v) for k, v in NON_DEFAULT.items() if got[k] != v}


def test_an_unknown_setting_is_a_type_error_naming_the_layer():
    with pytest.raises(TypeError, match="DPFPformer got an unexpected keyword argument 'chunksize'"):
        NNX["DPFPformer"](chunksize=16)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunksize'"):
        LINEN["DPFPformer"](chunksize=16)


def test_arguments_after_the_leading_ones_are_keyword_only_never_shifted():
    # feature_map was FastWeightAttention's third positional attribute: now refused, not read as
    # out_features.
    with pytest.raises(TypeError):
        dj.FastWeightAttention(H, D // H, "dpfp")
    with pytest.raises(TypeError):
        djnnx.FastWeightAttention(H, D // H, "dpfp", in_features=D, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError):
        dj.DPFPformer(D, 1, H, D // H, 2)  # nu was fifth


def test_formers_layers_draw_favor_projections_from_consecutive_seeds():
    x = normal(0, (B, T, D))
    model = dj.DPFPformer(D, 3, num_heads=H, head_dim=D // H, feature_map="favor", num_features=4, favor_seed=5)
    seeds = [spec.favor_seed for spec in specs_attended(lambda: jax.eval_shape(model.init, jax.random.key(0), x))]
    assert seeds == [5, 6, 7]


# --- chunk_size, the first setting added through the one place ---------------------------------

@pytest.mark.parametrize("layer", [LINEN["FastWeightAttention"], LINEN["DPFPSelfAttention"]])
def test_chunk_size_changes_the_program_not_the_function(layer):
    x = normal(0, (B, 16, D))
    small, large = layer(impl="chunk", chunk_size=4), layer(impl="chunk", chunk_size=8)
    variables = small.init(jax.random.key(1), x)

    def program(module):
        return str(jax.make_jaxpr(lambda v: module.apply(v, x))(variables))

    assert program(small) != program(large)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(small.apply(variables, x))[0]),
                               np.asarray(jax.tree.leaves(large.apply(variables, x))[0]), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("make", [*LINEN.values(), *NNX.values()])
def test_an_invalid_chunk_size_is_refused_by_every_layer(make):
    x = normal(0, (B, T, D))

    def run():
        layer = make(chunk_size=0)
        return layer.init(jax.random.key(0), x) if hasattr(layer, "init") else layer(x)

    with pytest.raises(ValueError, match="chunk_size must be a positive int; got 0"):
        run()


# --- signed feature maps with sum or attention normalisation -----------------------------------

def test_the_issues_repro_is_refused_not_divergent():
    layer = dj.FastWeightAttention(num_heads=2, head_dim=16, feature_map="identity", normalization="sum")
    x = normal(0, (2, 512, 32))
    with pytest.raises(ValueError, match=r"normalization='sum' needs a non-negative feature map.*beta \|k\|\^2 <= 2 "
                                         r"fails.*use normalization='l2'"):
        layer.init(jax.random.key(1), x)


@pytest.mark.parametrize("feature_map", ["identity", jnp.tanh, lambda x: jnp.concatenate([x, -x], axis=-1)])
@pytest.mark.parametrize("normalization, rule, why", [("sum", "delta", "beta"), ("sum", "sum", "beta"),
                                                      ("attention", "sum", r"z \. phi\(q\)")])
def test_signed_maps_are_refused_by_every_layer(feature_map, normalization, rule, why):
    x = normal(0, (B, T, D))
    settings = dict(feature_map=feature_map, normalization=normalization, rule=rule)
    match = rf"normalization='{normalization}' needs a non-negative feature map.*{why}.*'l2'"
    with pytest.raises(ValueError, match=match):
        dj.DPFPformer(D, 1, num_heads=H, head_dim=D // H, **settings).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=match):
        djnnx.FastWeightAttention(H, D // H, in_features=D, rngs=nnx.Rngs(0), **settings)
    # Also inside jit, where the probe's values are still known.
    layer = dj.FastWeightAttention(num_heads=H, head_dim=D // H, **settings)
    with pytest.raises(ValueError, match=match):
        jax.jit(layer.init)(jax.random.key(0), x)


@pytest.mark.parametrize("feature_map", [jax.nn.relu, dj.elu_plus_one, lambda x: jax.nn.elu(x) + 1,
                                         lambda x: dj.dpfp(x, 2), "dpfp", "linear", "relu", "favor"])
def test_non_negative_maps_are_accepted_with_sum_normalisation(feature_map):
    x = normal(0, (B, T, D))
    layer = dj.FastWeightAttention(num_heads=H, head_dim=D // H, feature_map=feature_map, normalization="sum")
    y, _ = layer.apply(layer.init(jax.random.key(1), x), x)
    assert np.isfinite(np.asarray(y)).all()


def test_identity_with_l2_is_accepted_and_stays_bounded():
    layer = dj.FastWeightAttention(num_heads=2, head_dim=16, feature_map="identity", normalization="l2")
    x = normal(0, (2, 512, 32))
    y, memory = jax.jit(layer.apply)(layer.init(jax.random.key(1), x), x)
    assert np.isfinite(np.asarray(y)).all()
    # |k| <= 1 and beta < 1: no column of W grows past the sum of its writes (the values' scale).
    assert float(jnp.abs(memory).max()) < 50.0, float(jnp.abs(memory).max())


# --- context_axis: the sequence sharded over devices (docs/context_parallel.md) -----------------

@pytest.mark.jax_sensitive
def test_context_axis_shards_the_sequence_but_not_a_decode_step():
    result = run_with_host_devices(SCRIPTS / "context_axis_decode_script.py", count=2)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-3000:]
