"""The Pallas TPU kernel (pallas_kernels/tpu) in Pallas's TPU interpret mode on the CPU, against the oracle.

Through the public path: inside ``pltpu.force_tpu_interpret_mode`` (with race detection on)
``dj.fast_weight(..., impl="pallas")`` runs the TPU kernel interpreted. Interpret mode is slow, so
``make test`` runs a few small cases and the rest (K = 1024, bfloat16 sweeps) are marked slow.
Compiles for real TPUs are in tests/test_tpu_compile.py; the HBM traffic count is checked here.
"""

import functools
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental.pallas import tpu as pltpu

import dpfp_jax as dj
from dpfp_devtools import tpu_writes_error
from dpfp_devtools.tpu_traffic import kernel_bytes, minimum_bytes
from dpfp_devtools.workloads import make_inputs
from pallas_kernels.tpu import (
    backward_plan,
    call_dims,
    cost_estimate,
    forward_plan,
    fused_chunk_tpu,
    hbm_bytes,
    spread_heads,
    tpu_interpret_params,
)
from tests.helpers import DIFF_ARGS as ARGS
from tests.helpers import assert_relative_error, bad_kernel_calls, log_decays, packed_ids, value_and_grads

SLOW = pytest.mark.slow
f32 = jnp.float32
# Two simulated cores: the "parallel" batch axis is split between them, so the race detector
# sees two batch rows' programs run concurrently (where a test has two).
RACES = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)


def scaled_value_and_grads(fn, inputs, scale):
    """(out, final state) and the gradients of a loss on both w.r.t. ``scale`` and every input given."""
    return value_and_grads(lambda x: fn(*(x[n] for n in ARGS), x["scale"]), {**inputs, "scale": jnp.float32(scale)},
                           names=("scale", *ARGS))


def public(impl, rule, chunk_size):
    def fn(q, k, v, beta, state, scale):
        return dj.fast_weight(q, k, v, beta, rule=rule, initial_state=state, scale=scale, impl=impl,
                              chunk_size=chunk_size)
    return fn


def assert_races_not_found():
    races = interpret_pallas_call.races
    assert races is not None and not races.races_found


def kernel(rule, chunk_size, **spread):
    """The TPU kernel called directly with its heads spread as ``spread`` says (head_groups,
    keys_head_major), interpreted with the race detector."""
    def fn(q, k, v, beta, state, scale):
        return fused_chunk_tpu(q, k, v, beta, state, rule=rule, scale=scale, chunk_size=chunk_size, interpret=RACES,
                               **spread)
    return fn


def check_against_reference(rule, dtype, key_dim, with_state, *, value_dim=64, time=40, chunk_size=16, heads=2,
                            batch=1, **spread):
    # T = 40 is two whole chunks of 16 and a partial one, in one block of 48 steps.
    inputs = make_inputs(3, batch=batch, time=time, heads=heads, key_dim=key_dim, value_dim=value_dim, rule=rule,
                         dtype=dtype, with_state=with_state)
    if with_state:  # the state stays float32
        inputs["initial_state"] = 0.1 * inputs["initial_state"].astype(jnp.float32)
    want = scaled_value_and_grads(public("reference", rule, chunk_size), inputs, 0.7)
    pallas = kernel(rule, chunk_size, **spread) if spread else public("pallas", rule, chunk_size)
    with pltpu.force_tpu_interpret_mode(RACES):
        got = jax.jit(lambda: scaled_value_and_grads(pallas, inputs, 0.7))()
        jax.block_until_ready(got)
    assert_races_not_found()
    (out, state), _ = got
    assert out.dtype == dtype and state.dtype == jnp.float32
    assert_relative_error(got, want, 2e-5 if dtype == jnp.float32 else 2e-2)


CHEAP = {("delta", jnp.float32, 128, True), ("sum", jnp.bfloat16, 128, False), ("delta", jnp.bfloat16, 384, True)}


@pytest.mark.parametrize("rule, dtype, key_dim, with_state", [
    pytest.param(*case, marks=() if case in CHEAP else SLOW)
    for case in [(rule, dtype, key_dim, with_state) for rule in dj.RULES for dtype in (jnp.float32, jnp.bfloat16)
                 for key_dim in (128, 384, 1024) for with_state in (True, False)]],
    ids=lambda x: getattr(x, "__name__", str(x)))
def test_matches_reference_in_interpret_mode(rule, dtype, key_dim, with_state):
    check_against_reference(rule, dtype, key_dim, with_state)


@pytest.mark.parametrize("key_dim, value_dim", [(128, 128), pytest.param(200, 64, marks=SLOW),
                                                pytest.param(64, 32, marks=SLOW)])
def test_other_layouts_match_reference(key_dim, value_dim):
    # K = 200 and 64 are padded to whole lane tiles; V = 128 is a whole lane tile (read as the
    # caller's [B, T, H, V], chunks transposed in the kernel), V = 32 a quarter. T = 300 in chunks of
    # 128: three blocks of one chunk each.
    check_against_reference("delta", jnp.float32, key_dim, True, value_dim=value_dim, time=300, chunk_size=128)


def test_several_blocks_of_several_chunks_match_reference():
    # T = 300 in chunks of 64: three grid steps of two chunks each (the fifth chunk holds 44 steps,
    # the sixth is all padding): the state passes between chunks of a block and between blocks,
    # forward and backward. Two batch rows: the race detector's two cores run one each, concurrently.
    check_against_reference("delta", jnp.float32, 128, True, time=300, chunk_size=64, batch=2)


@pytest.mark.parametrize("heads, value_dim, spread", [
    # Two groups of two heads: each program's heads sit at offset 2g of the all-heads blocks of q, k
    # and beta (a group of 2 is not whole sublane tiles). The race detector's two cores run a group each.
    (4, 64, dict(head_groups=2)),
    # One head per program from head-major copies of q and k (what v4 takes at K >= 384).
    (4, 64, dict(head_groups=4, keys_head_major=True)),
    # Groups of 8 heads: whole sublane tiles, so each program's blocks hold its own heads only.
    pytest.param(16, 64, dict(head_groups=2), marks=SLOW),
    # 128-wide values are read with the heads on the sublanes too, like q and k.
    pytest.param(4, 128, dict(head_groups=2), marks=SLOW),
], ids=["two groups", "head-major, one head per program", "groups of 8 heads", "two groups, V=128"])
def test_heads_spread_over_programs_match_reference(heads, value_dim, spread):
    # One batch row, its heads over several programs (fused_chunk_tpu picks this for a one-row call
    # on a chip with two TensorCores); two blocks of two chunks (the last one partial).
    check_against_reference("delta", jnp.float32, 128, True, time=200, chunk_size=64, heads=heads,
                            value_dim=value_dim, **spread)


def test_head_groups_must_divide_the_heads():
    inputs = make_inputs(0, time=16, heads=4, key_dim=128, rule="sum")
    for groups, message in ((3, "head_groups must divide the number of heads 4; got head_groups=3"),
                            (0, "head_groups must be a positive int; got head_groups=0")):
        with pytest.raises(ValueError, match=message):
            fused_chunk_tpu(inputs["q"], inputs["k"], inputs["v"], None, jnp.zeros((2, 4, 128, 4)), rule="sum",
                            chunk_size=16, interpret=True, head_groups=groups)


def test_heads_are_spread_for_the_chip():
    # One row on a chip of two TensorCores: two programs per row; blocks of all heads beyond the
    # chip's VMEM: head-major keys, as few heads per program as fit.
    dims = call_dims((1, 4096, 8, 128), 64, 64)
    assert spread_heads(dims, jnp.bfloat16, None, 1) == dims
    assert spread_heads(dims, jnp.bfloat16, None, 2).head_groups == 2
    assert spread_heads(call_dims((2, 4096, 8, 128), 64, 64), jnp.bfloat16, None, 2).head_groups == 1
    assert spread_heads(call_dims((1, 4096, 3, 128), 64, 64), jnp.bfloat16, None, 2).head_groups == 1
    v4 = 16 * 2**20
    assert not spread_heads(call_dims((8, 4096, 8, 256), 64, 64), jnp.bfloat16, v4, 2).keys_head_major
    for key_dim in (384, 512, 1024):
        spread = spread_heads(call_dims((8, 4096, 8, key_dim), 64, 64), jnp.bfloat16, v4, 2)
        assert spread.keys_head_major and spread.head_groups in (1, 2, 4, 8), (key_dim, spread)


@SLOW
def test_many_chunks_of_the_default_size_match_reference():
    # 16 chunks of 64: the backward rebuilds 15 start states in a row from the stored writes.
    check_against_reference("delta", jnp.float32, 128, True, time=1000, chunk_size=64, heads=1)


def delta_rule_rounding_writes(q, k, v, beta, state, scale, chunk_size, out_dtype):
    """The delta rule chunk by chunk in float32 (the WY form, docs/math.md), each chunk's writes u
    rounded to bfloat16 as the TPU kernel rounds them for bfloat16 v (writes_dtype), and that u
    used for the chunk's outputs and its state update; the rounding is straight-through (the
    gradient reaches u as if it were not rounded), which is what the kernel's backward takes. The
    outputs leave in ``out_dtype`` (their gradient arrives rounded to it, as the kernel's does)."""
    batch, time, heads, _ = q.shape
    pad = -time % chunk_size

    def chunks(x):  # [B, T, H, ...] float32 -> [T/C, B, H, C, ...], zero steps padded (inert: k = 0, beta = 0)
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(batch, -1, chunk_size, heads, *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)

    highest = jax.lax.Precision.HIGHEST
    strict = jnp.tril(jnp.ones((chunk_size, chunk_size), bool), -1)

    def step(w, xs):
        qc, kc, vc, bc = xs
        a = jnp.eye(chunk_size) + jnp.where(strict, bc[..., :, None] * jnp.einsum(
            "bhik,bhjk->bhij", kc, kc, precision=highest), 0.0)
        r = bc[..., None] * (vc - jnp.einsum("bhck,bhkv->bhcv", kc, w, precision=highest))
        u = jax.scipy.linalg.solve_triangular(a, r, lower=True, unit_diagonal=True)
        u = u + jax.lax.stop_gradient(u.astype(jnp.bfloat16).astype(f32) - u)
        scores = jnp.where(strict | jnp.eye(chunk_size, dtype=bool),
                           jnp.einsum("bhik,bhjk->bhij", qc, kc, precision=highest), 0.0)
        out = scale * (jnp.einsum("bhck,bhkv->bhcv", qc, w, precision=highest)
                       + jnp.einsum("bhij,bhjv->bhiv", scores, u, precision=highest))
        return w + jnp.einsum("bhck,bhcv->bhkv", kc, u, precision=highest), out

    final, outs = jax.lax.scan(step, state.astype(f32), (chunks(q), chunks(k), chunks(v), chunks(beta)))
    out = jnp.moveaxis(jnp.moveaxis(outs, 0, 1), 3, 2).reshape(batch, -1, heads, v.shape[-1])[:, :time]
    return out.astype(out_dtype), final


@SLOW  # about 20 s interpreted here
def test_bfloat16_writes_are_rounded_and_used_as_stored():
    # bfloat16 v: u is stored in bfloat16 (half the bytes), and the forward's outputs and state use
    # that rounded u, so the backward's W0 = W1 - K^T u undoes the forward's update. Against an
    # oracle that rounds u alike. A few of u's elements round the other way than the oracle's (the
    # two float32 u differ by round-off), so the outputs, the final state and dL/dscale are held in
    # norm: about 1e-4 of it with u rounded as stored, about 1e-3 (out, state, dL/dscale: 2.2e-3,
    # 8.2e-4, 9.2e-4) for a kernel that kept u unrounded. The bfloat16 gradients to their rounding.
    inputs = make_inputs(9, batch=1, time=64, heads=2, key_dim=128, value_dim=64, dtype=jnp.bfloat16,
                         with_state=True)
    inputs["initial_state"] = 0.1 * inputs["initial_state"].astype(f32)
    oracle = functools.partial(delta_rule_rounding_writes, chunk_size=16, out_dtype=jnp.bfloat16)
    want = scaled_value_and_grads(oracle, {n: x.astype(f32) for n, x in inputs.items()}, 0.7)
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda: scaled_value_and_grads(public("pallas", "delta", 16), inputs, 0.7))()
    ((out, state), (d_scale, *grads)), ((want_out, want_state), (want_d_scale, *want_grads)) = got, want

    def norm_error(x, y):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        return np.linalg.norm(x - y) / np.linalg.norm(y)

    errors = [norm_error(out, want_out), norm_error(state, want_state), norm_error(d_scale, want_d_scale)]
    assert max(errors) <= 2e-4, errors
    assert_relative_error(grads[-1], want_grads[-1], 1e-5)  # dL/dW0, float32
    assert_relative_error(grads[:-1], want_grads[:-1], 8e-3)  # dq, dk, dv, dbeta in bfloat16


@SLOW  # interpreted at T = 128, about 40 s here under load
def test_the_writes_error_tool_tells_the_kernel_from_the_chunk_form():
    # dpfp_devtools.tpu_writes_error (docs/reports/tpu_writes_error.md) at a small T: the chunk form
    # keeps u in float32, so its final state is the reference's to float32 round-off; the kernel's
    # bfloat16 u shows there, at bfloat16's scale.
    errors = tpu_writes_error.measure(time=128)
    assert set(errors) == {"pallas", "chunk"} and all(len(e) == len(tpu_writes_error.NAMES) for e in errors.values())
    final_state = tpu_writes_error.NAMES.index("final state")
    assert errors["chunk"][final_state] < 1e-5 < errors["pallas"][final_state] < 1e-2, errors


def test_forward_alone_matches_reference():
    # Without a gradient the writes u are not stored: the forward kernel's other variant.
    inputs = make_inputs(4, batch=1, time=20, heads=2, key_dim=128, value_dim=64)
    want = dj.fast_weight(**inputs, impl="reference")
    with pltpu.force_tpu_interpret_mode(RACES):
        got = dj.fast_weight(**inputs, impl="pallas", chunk_size=16)
    assert_races_not_found()
    assert_relative_error(got, want, 2e-5)


# --- gated (log_decay): the decays inside the kernel, forward and backward ------------------------


def gated(impl, rule, chunk_size, **options):
    """The gated op on an inputs' dict (scale 0.7), for :func:`value_and_grads`."""
    def fn(x):
        return dj.fast_weight(x["q"], x["k"], x["v"], x["beta"], rule=rule, initial_state=x["initial_state"],
                              log_decay=x["log_decay"], scale=0.7, impl=impl, chunk_size=chunk_size, **options)
    return fn


def gated_kernel(rule, chunk_size, **spread):
    """The TPU kernel called directly (heads spread as ``spread`` says), interpreted with the race detector."""
    def fn(x):
        return fused_chunk_tpu(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], rule=rule, scale=0.7,
                               chunk_size=chunk_size, interpret=RACES, log_decay=x["log_decay"], **spread)
    return fn


def check_gated_against_reference(rule, dtype, regime, *, time=40, chunk_size=16, batch=2, heads=2, value_dim=64,
                                  segment_ids=None, **spread):
    """Outputs, final state and the gradients of q, k, v, beta, initial_state and log_decay of
    ``impl="pallas"`` (interpreted; ``spread``: the kernel called directly) against the oracle's."""
    inputs = make_inputs(8, batch=batch, time=time, heads=heads, key_dim=128, value_dim=value_dim, rule=rule,
                         dtype=dtype, with_state=True)
    inputs["initial_state"] = 0.1 * inputs["initial_state"].astype(jnp.float32)
    inputs["log_decay"] = log_decays(9, regime, (batch, time, heads), chunk_size).astype(dtype)
    names = (*ARGS, "log_decay")
    options = {} if segment_ids is None else {"segment_ids": segment_ids}
    want = value_and_grads(gated("reference", rule, chunk_size, **options), inputs, names)
    pallas = gated_kernel(rule, chunk_size, **spread) if spread else gated("pallas", rule, chunk_size, **options)
    with pltpu.force_tpu_interpret_mode(RACES):
        got = jax.jit(lambda: value_and_grads(pallas, inputs, names))()
        jax.block_until_ready(got)
    assert_races_not_found()
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(got))
    (out, state), _ = got
    assert out.dtype == dtype and state.dtype == jnp.float32
    assert_relative_error(got, want, 2e-5 if dtype == jnp.float32 else 2e-2)
    return got


@pytest.mark.parametrize("rule, dtype, regime", [
    # make test's case: T = 40 in chunks of 16 (the last one partial), alpha = 0 on and off chunk
    # boundaries, 1e-30 and 1 - 1e-6 among typical decays, an initial state.
    ("delta", f32, "mixed"),
    *(pytest.param("delta", f32, regime, marks=SLOW) for regime in ("typical", "near_one", "near_zero", "zero")),
    *(pytest.param("sum", f32, regime, marks=SLOW) for regime in ("mixed", "near_one", "zero")),
    pytest.param("delta", jnp.bfloat16, "mixed", marks=SLOW),
    pytest.param("sum", jnp.bfloat16, "mixed", marks=SLOW),
], ids=lambda x: getattr(x, "__name__", str(x)))
def test_gated_matches_reference_in_interpret_mode(rule, dtype, regime):
    check_gated_against_reference(rule, dtype, regime)


@SLOW
@pytest.mark.parametrize("rule", dj.RULES)
def test_gated_several_blocks_of_several_chunks_match_reference(rule):
    # T = 300 in chunks of 64: three blocks of two chunks (the fifth chunk partial, the sixth all
    # padding); the backward walks each block's chunk start states from the block's stored one.
    check_gated_against_reference(rule, f32, "mixed", time=300, chunk_size=64)


@SLOW
@pytest.mark.parametrize("rule", dj.RULES)
def test_gated_with_segment_ids_a_reset_wins_over_the_gate(rule):
    # Documents start on and off chunk boundaries: a reset is alpha = 0 whatever log_decay says,
    # and that log_decay gets no gradient.
    ids = packed_ids(40, seed=3, chunk=16)
    (_, grads) = check_gated_against_reference(rule, f32, "typical", segment_ids=ids)
    resets = np.asarray(ids[:, 1:] != ids[:, :-1])
    d_log_decay = np.asarray(grads[-1])[:, 1:]
    assert resets.any() and np.max(np.abs(d_log_decay[resets])) == 0.0


@SLOW
@pytest.mark.parametrize("value_dim, spread", [(128, dict()), (64, dict(head_groups=2)),
                                               (64, dict(head_groups=4, keys_head_major=True))],
                         ids=["V=128", "two groups", "head-major"])
def test_gated_other_layouts_match_reference(value_dim, spread):
    # 128-wide values are read with the heads on the sublanes; two head groups write their copies of
    # the gradient of log_decay (summed after); head-major keys, one head per program.
    check_gated_against_reference("delta", f32, "mixed", time=200, chunk_size=64, heads=4, value_dim=value_dim,
                                  **spread)


@SLOW
def test_gated_forward_alone_matches_reference():
    # Without a gradient neither the writes nor the blocks' start states are stored.
    inputs = make_inputs(4, batch=2, time=40, heads=2, key_dim=128, value_dim=64)
    inputs["log_decay"] = log_decays(5, "mixed", (2, 40, 2))
    want = dj.fast_weight(**inputs, impl="reference")
    with pltpu.force_tpu_interpret_mode(RACES):
        got = dj.fast_weight(**inputs, impl="pallas", chunk_size=16)
    assert_races_not_found()
    assert_relative_error(got, want, 2e-5)


def test_interpret_mode_is_detected():
    assert tpu_interpret_params() is None
    with pltpu.force_tpu_interpret_mode(RACES):
        assert tpu_interpret_params() is RACES
    assert tpu_interpret_params() is None


def test_pallas_outside_interpret_mode_on_cpu_keeps_its_error():
    inputs = make_inputs(0, time=16, key_dim=128)
    with pytest.raises(ValueError, match="need a GPU or a TPU and the target platform is 'cpu'.*"
                                         "force_tpu_interpret_mode"):
        dj.fast_weight(**inputs, impl="pallas")


@SLOW
@pytest.mark.parametrize("rule", dj.RULES)
def test_packed_documents_without_a_gate_match_reference(rule):
    # Ungated, the op runs the gated kernel with log alpha = 0 but at the resets (-inf there):
    # outputs, final state and every gradient as the oracle's; documents start on and off the
    # chunk boundaries of T = 40 (chunks of 16), in both batch rows.
    inputs = make_inputs(8, batch=2, time=40, heads=1, key_dim=128, value_dim=64, rule=rule, with_state=True)
    ids = packed_ids(40, seed=3, chunk=16)

    def op(impl):
        def fn(q, k, v, beta, state):
            return dj.fast_weight(q, k, v, beta, rule=rule, initial_state=state, scale=0.7, impl=impl, chunk_size=16,
                                  segment_ids=ids)
        return lambda x: fn(*(x[n] for n in ARGS))

    want = value_and_grads(op("reference"), inputs)
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda: value_and_grads(op("pallas"), inputs))()
    assert_relative_error(got, want, 2e-5)


TPU_BAD_CALLS = [case for case in bad_kernel_calls()[0] if "resets" not in case[1]]  # it takes no resets


@pytest.mark.parametrize("case", TPU_BAD_CALLS, ids=[c[0] for c in TPU_BAD_CALLS])
def test_kernel_refuses_what_the_dispatcher_refuses(case):
    # Called directly, the TPU kernel checks its arguments at trace time as the GPU kernels do.
    _, changes, error, message = case
    kwargs = {**bad_kernel_calls()[1], **changes}
    args = [kwargs.pop(n) for n in ARGS]
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda *a: fused_chunk_tpu(*a, **kwargs, chunk_size=16, interpret=True), *args)


@pytest.mark.parametrize("chunk_size", [8, 24, 48, 96, 144, 192, 200])
def test_bad_chunk_size_is_refused(chunk_size):
    inputs = make_inputs(0, time=16, key_dim=128, rule="sum")
    message = f"chunk_size must be 16, 32, 64 or a multiple of 128 .*got chunk_size={chunk_size}"
    with pytest.raises(ValueError, match=message):
        fused_chunk_tpu(inputs["q"], inputs["k"], inputs["v"], None, jnp.zeros((2, 2, 128, 4)), rule="sum",
                        chunk_size=chunk_size, interpret=True)


def test_blocks_are_whole_lane_tiles_of_steps_or_the_whole_sequence():
    # The value arrays' blocks have the steps on the lanes: 128 of them (two chunks of 64, eight of
    # 16), a chunk of 256, or all of a sequence shorter than that.
    assert [call_dims((1, 4096, 8, 128), 64, c)[3:5] for c in (16, 64, 128, 256)] == [
        (128, 32), (128, 32), (128, 32), (256, 16)]
    assert call_dims((1, 40, 2, 128), 64, 16)[3:5] == (48, 1)
    assert call_dims((1, 300, 2, 200), 64, 64)[3:7] == (128, 3, 256, 64)


def test_hbm_traffic_of_a_hand_counted_case():
    # One row, two heads, 256 steps in two blocks of 128 (chunks of 64), K = 128, V = 64, bfloat16;
    # the delta rule with the writes kept (a training forward). Per block: q, k [128 steps, 2
    # heads, 128] bf16 each; v, the output and u [2 heads, 64, 128 steps] bf16 (u in v's dtype,
    # writes_dtype), beta [2, 128] float32. Per row: W0^T and the final state^T [2, 64, 128]
    # float32; the scale 4 bytes.
    dims = call_dims((1, 256, 2, 128), 64, 64)
    assert (dims.block, dims.num_blocks, dims.chunks_per_block) == (128, 2, 2)
    bf16 = jnp.bfloat16
    plan = forward_plan(dims, bf16, bf16, bf16, delta=True, keep_writes=True)
    state = 2 * 64 * 128 * 4
    per_block = 2 * 128 * 2 * 128 * 2 + 3 * 2 * 64 * 128 * 2 + 2 * 128 * 4
    assert kernel_bytes(plan) == 4 + 2 * per_block + 2 * state
    # In whole HBM tiles (8 rows by 128 lanes): a step's two heads of q and k fill two of a tile's 8
    # rows, and so do beta's two heads; the value arrays and states are whole tiles.
    per_block_tiled = 2 * 128 * 8 * 128 * 2 + 3 * 2 * 64 * 128 * 2 + 8 * 128 * 4
    assert kernel_bytes(plan, tiled=True) == 4 + 2 * per_block_tiled + 2 * state
    # The backward reads q, k, v, beta, u and d_out and writes dq, dk, dv and dbeta per block; per
    # row it reads the final state and its gradient and writes W0's, and a 4-byte dL/dscale.
    plan = backward_plan(dims, bf16, bf16, bf16, delta=True)
    per_block_backward = 4 * 128 * 2 * 128 * 2 + 4 * 2 * 64 * 128 * 2 + 2 * 2 * 128 * 4
    assert kernel_bytes(plan) == 4 + 2 * per_block_backward + 3 * state + 4
    # The least any implementation moves: q, k, v, beta and the states (2 bytes per beta).
    steps = 256 * 2
    assert minimum_bytes(1, 256, 2, 128, 64, 2, delta=True, backward=False) == (
        steps * (2 * 128 * 2 + 64 * 2 + 2 + 64 * 2) + 2 * 2 * 128 * 64 * 4)


SPREADS = [dict(), dict(head_groups=2), dict(head_groups=4, keys_head_major=True), dict(head_groups=2, heads=16)]


@pytest.mark.parametrize("spread", SPREADS, ids=["one program per row", "two groups", "head-major", "groups of 8"])
@pytest.mark.parametrize("value_dim, time, chunk_size", [(64, 4096, 64), (128, 300, 16), (64, 100, 128)])
def test_cost_estimate_bytes_are_the_traffic_count(spread, value_dim, time, chunk_size):
    # The kernel tells XLA its HBM bytes (hbm_bytes, a closed form) as the traffic count walks them
    # from the same plans; T = 100 in a chunk of 128 is one block (each program's blocks read once).
    spread = dict(spread)
    heads = spread.pop("heads", 4)
    dims = call_dims((2, time, heads, 256), value_dim, chunk_size, **spread)
    bf16 = jnp.bfloat16
    for plan in (forward_plan(dims, bf16, bf16, bf16, delta=True, keep_writes=False),
                 forward_plan(dims, bf16, bf16, bf16, delta=False, keep_writes=False),
                 forward_plan(dims, bf16, bf16, bf16, delta=True, keep_writes=True),
                 backward_plan(dims, bf16, bf16, bf16, delta=True), backward_plan(dims, bf16, bf16, bf16, delta=False),
                 # gated: log alpha read as beta is, each block's start state written and read back
                 forward_plan(dims, bf16, bf16, bf16, delta=True, keep_writes=True, gated=True, keep_states=True),
                 forward_plan(dims, bf16, bf16, bf16, delta=False, keep_writes=False, gated=True, keep_states=True),
                 backward_plan(dims, bf16, bf16, bf16, delta=True, gated=True),
                 backward_plan(dims, bf16, bf16, bf16, delta=False, gated=True)):
        assert hbm_bytes(plan) == kernel_bytes(plan)


def dot_flops(jaxpr) -> int:
    """The flops (2 per multiply-add) of a jaxpr's dot_generals, loops' bodies times their trip count."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    # scan (a fori_loop with static bounds) repeats its body; pl.when branches hold no matmuls
                    total += dot_flops(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


@pytest.mark.parametrize("rule, chunk_size, gate", [("delta", 64, False), ("sum", 64, False), ("delta", 16, False),
                                                   pytest.param("delta", 64, True, marks=SLOW),
                                                   pytest.param("sum", 16, True, marks=SLOW)])
def test_cost_estimate_flops_are_the_kernels_matmuls(rule, chunk_size, gate):
    # The estimate's flops against the dot_generals the kernels trace to: per grid step (the loop
    # over a program's heads times its trip count), times the grid's steps. Gated, the backward
    # walks a block's chunk start states forward (one product per chunk but the last) instead of
    # undoing each chunk's update.
    inputs = make_inputs(5, batch=2, time=256, heads=4, key_dim=128, value_dim=64, rule=rule, with_state=True)
    inputs["initial_state"] = inputs["initial_state"].astype(jnp.float32)
    log_decay = jnp.full((2, 256, 4), -0.1) if gate else None

    def loss(q, k, v, beta, state):
        out, final = fused_chunk_tpu(q, k, v, beta, state, rule=rule, chunk_size=chunk_size, interpret=True,
                                     head_groups=2, log_decay=log_decay)
        return jnp.sum(out) + jnp.sum(final)

    calls = [e for e in jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*inputs.values()).eqns
             if e.primitive.name == "pallas_call"]
    dims = call_dims((2, 256, 4, 128), 64, chunk_size, head_groups=2)
    plans = (forward_plan(dims, f32, f32, f32, delta=rule == "delta", keep_writes=rule == "delta", gated=gate,
                          keep_states=gate),
             backward_plan(dims, f32, f32, f32, delta=rule == "delta", gated=gate))
    assert len(calls) == 2
    for call, plan in zip(calls, plans, strict=True):
        steps = math.prod(call.params["grid_mapping"].grid)
        assert steps * dot_flops(call.params["jaxpr"]) == plan.flops > 0
        assert call.params["cost_estimate"] == cost_estimate(plan)
        assert cost_estimate(plan).bytes_accessed == kernel_bytes(plan)


@pytest.mark.slow  # the benchmark's --run path end to end; the kernel itself is checked by the tests above
def test_tpu_benchmark_run_path_in_interpret_mode():
    # benchmarks/tpu.py --run times impls on a TPU; --interpret takes that path on this CPU.
    command = [sys.executable, "-m", "benchmarks.tpu", "--run", "--interpret", "--keys", "128", "--batch", "1",
               "--time", "32", "--heads", "1", "--repeats", "1", "--impls", "chunk", "pallas"]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                          for line in result.stdout.splitlines() if line.startswith("| "))}
    # Every row's ratio column is its own forward+backward time over chunk's (the baseline).
    chunk_ms, pallas_ms = float(rows["chunk"][2]), float(rows["pallas"][2])
    assert pallas_ms > 0 and chunk_ms > 0, result.stdout
    assert rows["pallas"][5].endswith("x") and abs(float(rows["pallas"][5][:-1]) - pallas_ms / chunk_ms) <= 0.01 * (
        1 + pallas_ms / chunk_ms), result.stdout
    # Without a TPU and without --interpret, --run refuses.
    refused = subprocess.run(command[:4] + command[5:], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode != 0 and "--run needs a TPU" in refused.stderr
