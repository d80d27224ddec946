"""Compile for a TPU on a machine without one: libtpu's compiler, ahead of time, on abstract devices.

``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")`` gives
the devices of a TPU slice by description; a program whose arguments are sharded over them is
lowered for TPU and compiled by libtpu's real TPU compiler on the CPU host. It refuses what a TPU
would refuse (an op with no TPU lowering, HBM or VMEM overflow, a kernel that cannot be
partitioned) and reports XLA's memory figures for one call. Nothing runs: no TPU speed comes
from here.

libtpu (the version jax's own ``tpu`` extra pins for this jax) is installed by ``make
tpu-compiler`` into ``.venv/tpu-compiler``, outside ``.venv``'s import path: importable, it makes
jax try to start a TPU runtime whenever a backend first initialises with ``JAX_PLATFORMS`` unset.
:func:`libtpu_path` finds it through ``DPFP_TPU_COMPILER`` (that folder; ``make test`` sets it),
else where jax itself would (``TPU_LIBRARY_PATH``, an importable ``libtpu``). The plugin is
loaded after the process's own backends have initialised, so the CPU backend is untouched and
jax never tries to run on the TPU it cannot find.

Memory figures are per device (per shard of an SPMD program), in bytes, from
``compiled.memory_analysis()``; libtpu reports no peak of its own, so ``peak_bytes`` is
temporaries + arguments + outputs - aliased outputs, as for the GPU (``deviceless.peak_bytes``).
They count arrays as the TPU lays them out, in whole tiles (the compiler picks each array's
layout): a large array takes its size, a small one at least a tile (a float32 scalar 512 bytes).

Example (skipped without libtpu; ``make tpu-compiler`` installs it):
    >>> import jax, jax.numpy as jnp
    >>> x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    >>> compiled = compile_for_tpu(lambda x: jnp.tanh(x @ x.T), x, topology="v5e:2x2")
    >>> figures = memory(compiled)
    >>> figures.argument_bytes, figures.output_bytes
    (262144, 131072)
    >>> mesh = tpu_mesh("v6e:2x2", (4,), ("batch",))
    >>> batch = place(x, mesh, jax.P("batch"))  # 64 rows on each of the 4 chips
    >>> figures = memory(compile_for_tpu(lambda x: jnp.tanh(x).sum(axis=1), batch, mesh=mesh))
    >>> figures.argument_bytes, figures.output_bytes  # 64 bfloat16 sums, padded to a TPU tile
    (65536, 512)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Small slices of each generation: v5e (v5litepod) and v6e (Trillium) 2x2 are four chips; v5p and
# v4 2x2x1 are four chips too, v4's with two TensorCores each (eight devices).
TOPOLOGIES = ("v5e:2x2", "v6e:2x2", "v5p:2x2x1", "v4:2x2x1")
COMPILER_VARIABLE = "DPFP_TPU_COMPILER"
_INSTALL_HINT = "`make tpu-compiler` installs libtpu into .venv/tpu-compiler; name that folder in DPFP_TPU_COMPILER"


def libtpu_path() -> Path | None:
    """The ``libtpu.so`` to compile with: from ``DPFP_TPU_COMPILER``'s folder (a ``pip install
    --target`` of libtpu), else ``TPU_LIBRARY_PATH``, else an importable ``libtpu`` package; None
    when there is none. A ``DPFP_TPU_COMPILER`` without libtpu in it raises: it was meant to be used."""
    folder = os.environ.get(COMPILER_VARIABLE)
    if folder:
        path = Path(folder, "libtpu", "libtpu.so")
        if not path.is_file():
            raise FileNotFoundError(f"{COMPILER_VARIABLE}={folder!r} holds no libtpu/libtpu.so; {_INSTALL_HINT}")
        return path.resolve()
    if os.environ.get("TPU_LIBRARY_PATH"):
        return Path(os.environ["TPU_LIBRARY_PATH"])
    spec = importlib.util.find_spec("libtpu")  # found, not imported: importing it sets TPU_LIBRARY_PATH
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).with_name("libtpu.so")
    return None


def libtpu_requirement() -> str:
    """The libtpu requirement of the installed jax's own ``tpu`` extra, e.g. "libtpu==0.0.48.*": the
    libtpu that jax release was built against (``make`` installs it for each environment's jax)."""
    import re

    extra = [r for r in importlib.metadata.requires("jax") or [] if re.match(r"libtpu\b", r) and 'extra == "tpu"' in r]
    if len(extra) != 1:
        raise RuntimeError(f"jax's metadata names {len(extra)} libtpu requirements for its tpu extra: {extra}")
    return re.sub(r"\s", "", extra[0].split(";")[0])


def libtpu_version() -> str:
    """The version of the libtpu :func:`libtpu_path` finds (its package metadata), e.g. "0.0.48.1";
    "unknown" for a bare ``TPU_LIBRARY_PATH`` outside a package."""
    path = libtpu_path()
    if path is None:
        raise RuntimeError(missing_compiler())
    found = list(importlib.metadata.distributions(name="libtpu", path=[str(path.parent.parent)]))
    return found[0].version if found else "unknown"


def missing_compiler() -> str | None:
    """None when libtpu can be found, else why not and how to install it (a test's skip reason)."""
    try:
        path = libtpu_path()
    except FileNotFoundError as err:
        return str(err)
    if path is None:
        return f"needs libtpu, the TPU compiler: {_INSTALL_HINT}"
    return None


@contextlib.contextmanager
def _environment(**values: str):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


@functools.cache
def tpu_topology(name: str):
    """The abstract devices of TPU slice ``name`` (one of ``TOPOLOGIES``, or any name libtpu knows,
    e.g. "v5e:4x4"), as ``jax.experimental.topologies.get_topology_desc`` returns them. A name
    ending in ``/megacore`` (``"v4:2x2x1/megacore"``) asks libtpu for that chip configuration: v4's
    two TensorCores as one device (four devices here, as jax gives them on a v4 host), where the
    plain name gives one device per TensorCore (eight); v5p's devices are whole chips either way.

    Loads libtpu on first use; raises RuntimeError (with the install hint) when it cannot be found.
    """
    import jax
    from jax.experimental import topologies

    path = libtpu_path()
    if path is None:
        raise RuntimeError(missing_compiler())
    # Several processes (pytest's workers) load libtpu at once: without this it takes a lock file
    # for one process, as a TPU runtime would; nothing here runs, so nothing needs the lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # One host, no TPU workers to find (libtpu logs an error when it cannot guess them).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # The process's backends first: once the TPU plugin is loaded, a backend initialisation with
    # JAX_PLATFORMS unset would try to start a TPU runtime on it.
    jax.devices()
    slice_name, _, chip_config = name.partition("/")
    options = {"chip_config_name": chip_config} if chip_config else {}
    with _environment(TPU_LIBRARY_PATH=str(path)):
        return topologies.get_topology_desc(platform="tpu", topology_name=slice_name, **options)


def tpu_mesh(topology_name: str, shape: Sequence[int] | None = None, axes: Sequence[str] = ("batch",),
             axis_types: Sequence[Any] | None = None):
    """A ``jax.sharding.Mesh`` over the first ``prod(shape)`` devices of ``topology_name``.

    ``shape`` defaults to one device (a single-chip program); ``axis_types`` to jax.make_mesh's
    default (Explicit). jax.make_mesh orders the devices along the slice's physical layout.
    """
    import math

    import jax

    shape = tuple(shape) if shape is not None else (1,) * len(axes)
    devices = tpu_topology(topology_name).devices
    if len(shape) != len(axes) or math.prod(shape) > len(devices):
        raise ValueError(f"shape {shape} with axes {tuple(axes)} does not fit {topology_name}'s {len(devices)} devices")
    kwargs = {} if axis_types is None else {"axis_types": tuple(axis_types)}
    return jax.make_mesh(shape, tuple(axes), devices=devices[: math.prod(shape)], **kwargs)


def place(tree: Any, mesh, spec: Any = None) -> Any:
    """``tree`` (arrays or ``jax.ShapeDtypeStruct``s; None leaves stay None) as ShapeDtypeStructs
    sharded over ``mesh`` by ``spec``: one PartitionSpec for every leaf (default: replicated) or a
    tree of them matching ``tree``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    def one(leaf, leaf_spec):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, leaf_spec))

    if spec is None or isinstance(spec, PartitionSpec):
        return jax.tree.map(lambda leaf: one(leaf, PartitionSpec() if spec is None else spec), tree)
    return jax.tree.map(one, tree, spec)


def lower_for_tpu(fn: Callable, *args: Any, topology: str = "v5e:2x2", mesh=None):
    """``jax.jit(fn)`` traced and lowered for TPU (a ``jax.stages.Lowered``), as
    :func:`compile_for_tpu` does before it compiles."""
    import jax

    if mesh is None:
        mesh = tpu_mesh(topology, axis_types=(jax.sharding.AxisType.Auto,))

    def with_sharding(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
            return leaf
        return place(leaf, mesh)

    placed = jax.tree.map(with_sharding, args)
    with jax.set_mesh(mesh):
        return jax.jit(fn).trace(*placed).lower()


def compile_for_tpu(fn: Callable, *args: Any, topology: str = "v5e:2x2", mesh=None):
    """``jax.jit(fn)`` traced, lowered and compiled for TPU by libtpu; no TPU needed.

    ``args`` are pytrees of ``jax.ShapeDtypeStruct``s (or arrays, or None). Leaves without a
    sharding are replicated over ``mesh``: by default one chip of ``topology`` on an Auto axis, so
    the program is the one a jit without any mesh gives (no explicit sharding in its types);
    otherwise ``mesh`` (e.g. from :func:`tpu_mesh`) is the slice the program is partitioned over.
    The trace runs under ``jax.set_mesh(mesh)``, so code that asks the abstract mesh which platform
    it is compiled for sees a TPU (``dj.fast_weight(impl="pallas")`` refuses it there).
    Returns the ``jax.stages.Compiled``; raises what libtpu raises when it cannot compile.
    """
    return lower_for_tpu(fn, *args, topology=topology, mesh=mesh).compile()


@dataclasses.dataclass(frozen=True)
class MosaicGrid:
    """The grid of one Pallas TPU kernel in a lowered program, as its Mosaic module states it.

    Attributes:
      name: the kernel's function name (``pallas_call``'s ``name``).
      iteration_bounds: the grid's size per axis.
      dimension_semantics: per axis, "parallel" (Mosaic may split it over a chip's TensorCores)
        or "arbitrary" (walked in order on one core).
    """

    name: str
    iteration_bounds: tuple[int, ...]
    dimension_semantics: tuple[str, ...]


def mosaic_grids(lowered) -> list[MosaicGrid]:
    """The :class:`MosaicGrid` of every Pallas TPU kernel in ``lowered`` (from :func:`lower_for_tpu`):
    each ``tpu_custom_call`` carries its Mosaic module serialized (MLIR bytecode, base64, in its
    backend config); it is read back with jax's own Mosaic dialect and serialization pass."""
    import base64
    import re

    from jax._src.interpreters import mlir
    from jax._src.lib import tpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.passmanager import PassManager

    text = lowered.as_text()
    bodies = re.findall(r'body(?:\\22|")\s*:\s*(?:\\22|")([A-Za-z0-9+/=]+)', text)
    grids = []
    for body in bodies:
        ctx = mlir.make_ir_context()
        tpu.register_dialect(ctx)
        with ctx, ir.Location.unknown():
            ctx.allow_unregistered_dialects = True
            module = ir.Module.parse(base64.b64decode(body))
            PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(module.operation)
            for op in module.body.operations:
                attributes = op.attributes
                if "iteration_bounds" not in attributes:
                    continue
                semantics = re.findall(r"dimension_semantics<(\w+)>", str(attributes["dimension_semantics"]))
                grids.append(MosaicGrid(ir.StringAttr(attributes["sym_name"]).value,
                                        tuple(ir.DenseI64ArrayAttr(attributes["iteration_bounds"])),
                                        tuple(semantics)))
    return grids


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's memory figures of one compiled call, per device, in bytes.

    Attributes:
      temp_bytes: temporaries (scratch) the program allocates in HBM.
      argument_bytes: its inputs.
      output_bytes: its outputs.
      alias_bytes: outputs that reuse an input's buffer (donation).
      code_bytes: the compiled program itself.
    """

    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    code_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Temporaries + arguments + outputs - aliased outputs: the most one call holds."""
        return self.temp_bytes + self.argument_bytes + self.output_bytes - self.alias_bytes


def memory(compiled) -> Memory:
    """The :class:`Memory` of a ``jax.stages.Compiled`` (e.g. from :func:`compile_for_tpu`)."""
    stats = compiled.memory_analysis()
    return Memory(stats.temp_size_in_bytes, stats.argument_size_in_bytes, stats.output_size_in_bytes,
                  stats.alias_size_in_bytes, stats.generated_code_size_in_bytes)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--libtpu-requirement"]:
        sys.exit("usage: python -m dpfp_devtools.tpu --libtpu-requirement  (prints jax's tpu extra's libtpu pin)")
    print(libtpu_requirement())
