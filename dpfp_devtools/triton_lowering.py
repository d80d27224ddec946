"""Lower Pallas kernels to Triton IR for a named GPU, on any machine (no GPU needed).

Interpret mode checks what a kernel computes, not whether Pallas can turn it into Triton IR. JAX
lowers for a platform it does not have when told which device to aim at: an abstract mesh
carrying an ``AbstractDevice`` gives Pallas the GPU's compute capability, and
``Traced.lower(lowering_platforms=("cuda",))`` runs the real Pallas -> Triton lowering. What
comes back here is every Triton kernel of the lowered program: its Triton IR (the ``tt``
dialect, as text) and the launch settings XLA would use. Compiling that IR further, to PTX and
machine code, needs XLA's GPU compiler (``dpfp_devtools.deviceless`` runs it without a GPU).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from pallas_kernels import fused_recurrent
    >>> x = jax.ShapeDtypeStruct((1, 16, 1, 32), jnp.float32)
    >>> s = jax.ShapeDtypeStruct((1, 1, 32, 32), jnp.float32)
    >>> calls = triton_calls(lambda q, s: fused_recurrent(q, q, q, None, s, rule="sum"), x, s)
    >>> [(c.name, c.num_warps) for c in calls]
    [('fast_weight_fused_recurrent_fwd', 4)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
from jax._src.lib import triton as _triton_lib  # jaxlib's Triton dialect bindings: no public path
from jax._src.lib.mlir import ir

# Triton kernels reach XLA as custom calls with this target (jax.experimental.pallas.triton).
CUSTOM_CALL_TARGET = "__gpu$xla.gpu.triton"
DEFAULT_GPU = "NVIDIA H200"


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One Triton kernel of a lowered program.

    Attributes:
      name: the kernel's name (the ``name=`` of its ``pallas_call``).
      ir: its Triton IR as MLIR text.
      num_warps: warps per program.
      num_stages: software-pipelining stages Triton may use for loads in loops.
      grid: programs launched along x, y, z.
    """

    name: str
    ir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def _custom_calls(op: ir.Operation) -> Iterator[ir.Operation]:
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                inner = inner.operation
                if inner.name == "stablehlo.custom_call":
                    yield inner
                yield from _custom_calls(inner)


def _int(attr: ir.Attribute) -> int:
    return ir.IntegerAttr(attr).value


def lower_for_gpu(fn: Callable, *args: object, gpu: str = DEFAULT_GPU) -> jax.stages.Lowered:
    """``jax.jit(fn)`` lowered for ``gpu`` (e.g. "NVIDIA H100") on any host.

    The abstract mesh's device gives Pallas the GPU's compute capability (and tells
    ``dj.fast_weight``'s ``impl="pallas"`` that a GPU is the target). ``args`` may be arrays or
    ``jax.ShapeDtypeStruct``s. Raises what Pallas raises when a kernel cannot be lowered to Triton.
    """
    device = jax.sharding.AbstractDevice(device_kind=gpu, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("_",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def triton_calls(fn: Callable, *args: object, gpu: str = DEFAULT_GPU) -> list[TritonCall]:
    """The Triton kernels of ``jax.jit(fn)(*args)`` lowered for ``gpu``, as ``lower_for_gpu`` does."""
    return calls_in(lower_for_gpu(fn, *args, gpu=gpu))


def calls_in(lowered: jax.stages.Lowered) -> list[TritonCall]:
    """The Triton kernels of a program already lowered for a GPU."""
    module = lowered.compiler_ir("stablehlo")
    context = ir.Context()
    _triton_lib.dialect.register_dialect(context)
    # Only read back as text: ops of dialects jaxlib's bindings do not register here (the gated
    # kernels' ``gpu.barrier``, from pltriton.debug_barrier) need not be understood.
    context.allow_unregistered_dialects = True
    calls = []
    for op in _custom_calls(module.operation):
        if ir.StringAttr(op.attributes["call_target_name"]).value != CUSTOM_CALL_TARGET:
            continue
        config = op.attributes["mhlo.backend_config"]
        with context:
            kernel_ir = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
        calls.append(TritonCall(
            name=ir.StringAttr(config["name"]).value,
            ir=kernel_ir,
            num_warps=_int(config["num_warps"]),
            num_stages=_int(config["num_stages"]),
            grid=tuple(_int(config[f"grid_{axis}"]) for axis in "xyz"),
        ))
    return calls
