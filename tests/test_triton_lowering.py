"""The GPU path without a GPU: the Pallas kernels lowered to Triton IR for an H200, and compiled.

Interpret mode (tests/test_pallas.py) checks what the kernels compute; these check that Pallas
can turn them into Triton kernels with the launch settings we chose, at the shapes the GPU
benchmark uses and at awkward ones (K and V padded, T not a multiple of anything).
tests/test_deviceless.py goes one step further, to machine code through XLA's own GPU compiler.
"""

import jax
import jax.numpy as jnp
import pytest

from dpfp_devtools.triton_lowering import triton_calls
from dpfp_devtools.workloads import op_gradient
from pallas_kernels.triton import tiles
from pallas_kernels.triton.dpfp import DPFP
from tests.helpers import pallas_calls

SLOW = pytest.mark.slow


def kernels_of(kernel, rule, key_dim, time, value_dim, dtype=jnp.bfloat16, num_stages=1, packed=False, gated=False):
    fn, args = op_gradient(kernel, rule, key_dim, time, value_dim, dtype, batch=2, heads=3,
                           num_stages=num_stages, packed=packed, gated=gated)
    calls = triton_calls(fn, *args)
    return {call.name.rsplit("_", 1)[-1]: call for call in calls}


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("key_dim, time, value_dim, programs, warps", [
    (128, 64, 64, 6, (4, 8)),  # [128, 64] state slice: 4 warps; the backward holds W and dL/dW
    (1024, 64, 64, 24, (8, 8)),  # value blocks of 16 columns, 8 warps
    pytest.param(12, 300, 5, 6, (4, 4), marks=SLOW),
    pytest.param(384, 300, 70, 18, (8, 8), marks=SLOW),  # K padded to 512: BV = 32, V to 96
])
def test_fused_recurrent_lowers_to_triton(rule, key_dim, time, value_dim, programs, warps):
    calls = kernels_of("fused_recurrent", rule, key_dim, time, value_dim)
    assert sorted(calls) == ["bwd", "fwd"]
    grid = calls["fwd"].grid
    assert grid[0] * grid[1] * grid[2] == programs  # (batch x head) x value blocks
    assert (calls["fwd"].num_warps, calls["bwd"].num_warps) == warps


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_gated_fused_recurrent_lowers_to_triton_with_barriers_around_its_replay(rule):
    calls = kernels_of("fused_recurrent", rule, 384, 300, 70, gated=True)
    assert sorted(calls) == ["bwd", "fwd"]
    # The backward's replayed states go through global memory: a block-wide barrier after the
    # replay and after the reverse walk of each block, none in the forward.
    assert calls["bwd"].ir.count("gpu.barrier") == 2 and "gpu.barrier" not in calls["fwd"].ir


CHUNKED = ["fused_chunk", "chunk_recurrence"]


@pytest.mark.parametrize("kernel", CHUNKED)
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("key_dim, time, value_dim", [
    (128, 256, 64), (512, 256, 64), (384, 300, 70), pytest.param(12, 300, 5, marks=SLOW),
])
def test_chunked_kernels_lower_to_triton_with_tensor_core_dots(kernel, rule, key_dim, time, value_dim):
    calls = kernels_of(kernel, rule, key_dim, time, value_dim)
    assert sorted(calls) == ["bwd", "fwd"]
    for call in calls.values():
        # Unpipelined loads (shared memory) and one-pass TF32 dots (tensor cores) for bf16 inputs.
        assert (call.num_warps, call.num_stages) == (tiles.NUM_WARPS, 1)
        assert "inputPrecision = tf32 " in call.ir
        assert "tf32x3" not in call.ir and "ieee" not in call.ir
        # The state is walked in [64, BV] tiles: no [C, K] operand is ever materialised whole.
        k_pad = tiles.padded_sizes(key_dim, value_dim, key_tile=tiles.KEY_TILE)[0]
        assert k_pad <= 64 or f"tensor<64x{k_pad}xf32>" not in call.ir


@pytest.mark.parametrize("kernel", CHUNKED)
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_chunked_kernels_take_three_tf32_passes_for_float32_inputs(kernel, rule):
    # One pass would leave 3e-4 relative error for float32 inputs (benchmarks/dot_precision.py).
    for call in kernels_of(kernel, rule, 128, 128, 64, jnp.float32).values():
        assert "inputPrecision = tf32x3" in call.ir
        assert "inputPrecision = tf32 " not in call.ir


def test_lowering_reports_what_pallas_cannot_lower():
    # A block whose shape is not a power of two cannot become a Triton tensor: the error comes
    # from lowering, on this machine, instead of from the first GPU run.
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def bad(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    with pytest.raises(Exception, match="power of 2|power-of-2|power of two"):
        triton_calls(bad, jax.ShapeDtypeStruct((3, 5), jnp.float32))


@pytest.mark.parametrize("key_dim, programs", [(128, 12), (512, 24)])
def test_fused_chunk_splits_values_into_narrow_blocks(key_dim, programs):
    # B * H = 6 heads; V = 64 in blocks of 32 at K = 128 and of 16 at K = 512, so the per-program
    # state slice stays near 4096 floats (fused_chunk.FORWARD_STATE_BUDGET).
    calls = kernels_of("fused_chunk", "delta", key_dim, 128, 64)
    for call in calls.values():
        assert call.grid[0] * call.grid[1] * call.grid[2] == programs, call.name
    # The backward's sums over V (dq, dk per key tile, dT_beta) are atomic adds, not partials.
    assert calls["bwd"].ir.count("tt.atomic_rmw fadd") == 2 * (key_dim // 64) + 1
    assert "atomic_rmw" not in calls["fwd"].ir


def test_fused_chunk_load_stages_are_a_launch_setting():
    for num_stages in (1, 2):
        calls = kernels_of("fused_chunk", "sum", 128, 128, 64, num_stages=num_stages)
        assert sorted(calls) == ["bwd", "fwd"]
        assert all(call.num_stages == num_stages for call in calls.values())
    with pytest.raises(ValueError, match="num_stages must be a positive int; got num_stages=0"):
        kernels_of("fused_chunk", "sum", 128, 128, 64, num_stages=0)


def test_impl_pallas_takes_a_gpu_compile_target_on_any_host():
    # An ahead-of-time compile for a GPU names its target with an abstract mesh (as triton_calls
    # and dpfp_devtools.deviceless do); impl="pallas" then lowers its kernels on a CPU host too.
    import dpfp_jax as dj

    keys = jax.ShapeDtypeStruct((1, 128, 2, 32), jnp.bfloat16)
    beta = jax.ShapeDtypeStruct((1, 128, 2), jnp.bfloat16)
    calls = triton_calls(lambda q, k, v, b: dj.fast_weight(q, k, v, b, impl="pallas"), keys, keys, keys, beta)
    assert [call.name for call in calls] == ["fast_weight_fused_chunk_fwd"]


@pytest.mark.parametrize("kernel", CHUNKED)
def test_chunked_kernels_pad_keys_to_whole_tiles_only(kernel):
    # They load K 64 rows at a time, so K = 384 stays 384 (six tiles), not the power of two 512:
    # no padded copy of q and k, and a quarter less work than eight tiles.
    fn, args = op_gradient(kernel, "delta", 384, 128)
    widths = {v.aval.shape[-1] for eqn in pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr) for v in eqn.invars
              if v.aval.shape}
    assert 384 in widths and 512 not in widths, widths


@pytest.mark.parametrize("kernel", ["fused_recurrent", *CHUNKED])
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_kernels_lower_to_triton_with_packed_documents(kernel, rule):
    # Packed documents reach every kernel as int32 operands (per step or per chunk); the fused
    # kernels' backwards branch (scf.if) at a reset to walk the previous document forward again.
    time = 64 if kernel == "fused_recurrent" else 256
    packed = kernels_of(kernel, rule, 128, time, 64, packed=True)
    plain = kernels_of(kernel, rule, 128, time, 64)
    assert sorted(packed) == ["bwd", "fwd"]
    for name, call in packed.items():
        assert "!tt.ptr<i32>" in call.ir and "!tt.ptr<i32>" not in plain[name].ir, name
        assert (call.num_warps, call.num_stages, call.grid) == (
            plain[name].num_warps, plain[name].num_stages, plain[name].grid), name
    if kernel != "chunk_recurrence":  # the walk alone reads the forward's chunk states instead
        assert "scf.if" in packed["bwd"].ir and "scf.if" not in plain["bwd"].ir


def test_impl_pallas_takes_segment_ids_on_a_gpu_compile_target():
    # dj.fast_weight hands the segment ids' resets to the kernels (both lowered with their packed operands).
    import dpfp_jax as dj

    keys, beta = jax.ShapeDtypeStruct((1, 128, 2, 32), jnp.bfloat16), jax.ShapeDtypeStruct((1, 128, 2), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)

    def loss(q, k, v, b, ids, chunk_size):
        out, state = dj.fast_weight(q, k, v, b, impl="pallas", chunk_size=chunk_size, segment_ids=ids)
        return out.astype(jnp.float32).sum() + state.sum()

    for chunk_size, kernel in ((64, "fused_chunk"), (256, "fused_recurrent")):
        calls = triton_calls(jax.grad(lambda *a, c=chunk_size: loss(*a, c)), keys, keys, keys, beta, ids)
        assert [call.name for call in calls] == [f"fast_weight_{kernel}_fwd", f"fast_weight_{kernel}_bwd"]
        assert all("!tt.ptr<i32>" in call.ir for call in calls)


@SLOW
@pytest.mark.parametrize("kernel, time", [("fused_chunk", 256), ("fused_recurrent", 64)])
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fused_kernels_with_dpfp_on_chip_lower_to_triton(kernel, time, rule):
    # q and k reach the kernels at width d = 64 (K = 384 on chip); the backward scatters the map's
    # VJP with atomic adds (the recurrent kernel per step; its forward has no dots, no atomics). The
    # chunk kernel's backward is two kernels, the scores kernel first (dq, and dk's scores term).
    fn, args = op_gradient(kernel, rule, 64, time, features=DPFP(3, "sum"))
    assert args[0].shape[-1] == 64 and args[4].shape[-2] == 384
    calls = triton_calls(fn, *args)
    kernels = {call.name.rsplit("_", 1)[-1]: call for call in calls}
    assert "tt.atomic_rmw" in kernels["bwd"].ir
    if kernel == "fused_chunk":
        assert [call.name.rsplit("_", 1)[-1] for call in calls] == ["fwd", "scores", "bwd"]
        assert "tt.dot" in kernels["fwd"].ir and "tt.atomic_rmw" in kernels["scores"].ir
    else:
        assert sorted(kernels) == ["bwd", "fwd"]
        assert "tt.atomic_rmw" not in kernels["fwd"].ir


@SLOW
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_gated_fused_chunk_lowers_to_triton(rule):
    # The gate reaches the kernels as two float32 [B·H, N, C] halves of the cumulative log decays;
    # the forward also writes the states the backward walks from, the backward adds dL/dg atomically.
    gated = kernels_of("fused_chunk", rule, 384, 300, 70, gated=True)
    plain = kernels_of("fused_chunk", rule, 384, 300, 70)
    assert sorted(gated) == ["bwd", "fwd"]
    for name, call in gated.items():
        assert (call.num_warps, call.num_stages, call.grid) == (
            plain[name].num_warps, plain[name].num_stages, plain[name].grid), name
        assert "__nv_expf" in call.ir and "__nv_expf" not in plain[name].ir, name  # the decays, on chip
    assert gated["bwd"].ir.count("tt.atomic_rmw") > plain["bwd"].ir.count("tt.atomic_rmw")
