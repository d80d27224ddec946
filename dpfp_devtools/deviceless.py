"""Compile for an H100/H200 on a machine without a GPU: XLA's deviceless ahead-of-time compile.

XLA can compile a jitted program for a GPU it only knows by description (a "target config":
compute capability, shared memory, registers, ...). It runs the same passes as on the GPU machine:
fusion, buffer assignment, and the Pallas kernels through jaxlib's own Triton pipeline and
``ptxas``. What comes back is what the GPU run would get, minus the run: whether each kernel
compiles (shared memory, registers), what it costs on chip, and the program's temporary memory.

Needs the CUDA plugin's compiler parts on ``PYTHONPATH`` (``make triton-report`` puts them in
``.venv/cuda-compiler``: jax-cuda13-plugin and -pjrt, nvidia-cuda-nvcc for ``ptxas``,
nvidia-nvvm for libdevice; about 730 MB) and these environment variables set before jax is
imported, which :func:`prepare_environment` does for a script that calls it first:
``JAX_PLATFORMS=cpu`` (run on the CPU, compile for the GPU), ``TF_CPP_VMODULE`` and
``TF_CPP_MIN_LOG_LEVEL`` (XLA logs ``ptxas -v``, which holds registers and spills) and
``XLA_FLAGS=--xla_dump_to`` (XLA writes each program's kernel launches, with their shared memory).

Caveat: the ``ptxas`` here is the newest nvidia-cuda-nvcc 13.x on the package index, which may
be newer than the GPU machine's; registers and spills can differ a little between versions.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Spec-sheet figures of each GPU. Kernel compilation reads the compute capability and the
# shared-memory and register limits; the rest only feeds XLA's cost model (fusion choices).
GPUS = {
    "NVIDIA H200": dict(core_count=132, memory_bandwidth=4_800_000_000_000, device_memory_size=150_754_820_096),
    "NVIDIA H100": dict(core_count=132, memory_bandwidth=3_352_320_000_000, device_memory_size=84_929_347_584),
}
SHARED_MEMORY_PER_BLOCK_OPTIN = 232_448  # 227 KiB: what one program may ask for on sm_90
_DUMP_VARIABLE = "DPFP_JAX_XLA_DUMP"


def target_config(gpu: str) -> str:
    """XLA's GpuTargetConfigProto, as text, for a Hopper GPU named in ``GPUS``."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}; got {gpu!r}")
    spec = GPUS[gpu]
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: {SHARED_MEMORY_PER_BLOCK_OPTIN}
  threads_per_core_limit: 2048
  core_count: {spec['core_count']}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec['memory_bandwidth']}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {spec['device_memory_size']}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{gpu}"
"""


def prepare_environment() -> None:
    """Set what XLA reads at start-up; call before jax is imported. Raises if it already was."""
    if "jax" in sys.modules:
        raise RuntimeError("prepare_environment() must run before jax is imported")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    os.environ["TF_CPP_VMODULE"] = "subprocess_compilation=2"
    # One dump folder per process: XLA numbers its files per process, and tests run several at once.
    dump = tempfile.mkdtemp(prefix="dpfp_jax_xla_dump_")
    atexit.register(shutil.rmtree, dump, ignore_errors=True)
    os.environ[_DUMP_VARIABLE] = dump
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One GPU kernel of a compiled program, as XLA will launch it.

    Attributes:
      name: the kernel's name (a Pallas kernel's ``name=``; XLA's fusions have their own).
      grid: programs (thread blocks) launched along x, y, z.
      threads: threads per program.
      stages: a Pallas kernel's load-pipelining stages (None for XLA's fusions).
      shared: shared memory per program, bytes.
      registers: registers per thread (``ptxas -v``); None where XLA logged no ``ptxas`` report.
      spill_stores: bytes spilled to local memory per thread (None likewise).
      spill_loads: bytes read back from local memory per thread (None likewise).
    """

    name: str
    grid: tuple[int, int, int]
    threads: int
    stages: int | None
    shared: int
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What a deviceless compile tells.

    Attributes:
      temp_bytes: XLA's temporary (scratch) memory for one call.
      peak_bytes: temporaries + arguments + outputs (less what outputs alias): the most memory
        one call holds, comparable with PyTorch's ``max_memory_allocated`` around a call.
      kernels: the program's GPU kernels by name.
    """

    temp_bytes: int
    peak_bytes: int
    kernels: dict[str, Kernel]


@functools.cache
def gpu_device(gpu: str):
    """A device of a one-GPU topology built from ``target_config(gpu)``; no GPU needed."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="cuda", target_config=target_config(gpu), topology="1x1x1").devices[0]


@contextlib.contextmanager
def _stderr_into(path: Path) -> Iterator[None]:
    # XLA's C++ logger writes to file descriptor 2, which sys.stderr redirection does not reach.
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_LAUNCH = re.compile(r"\] (\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
                     r"shared_memory: (\d+) bytes")
_PTXAS = re.compile(r"Compiling entry function '([^']+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                    r".*?Used (\d+) registers", re.S)


def _dump_folder() -> Path:
    if _DUMP_VARIABLE not in os.environ:
        raise RuntimeError("call deviceless.prepare_environment() before jax is imported")
    return Path(os.environ[_DUMP_VARIABLE])


def _launches(dump: Path) -> dict[str, tuple[tuple[int, int, int], int, int]]:
    sequences = sorted(dump.glob("*thunk_sequence.txt"))
    if not sequences:
        raise RuntimeError(f"XLA wrote no thunk sequence under {dump}: was prepare_environment() called "
                           "before jax was imported?")
    launches = {}
    for match in _LAUNCH.finditer(sequences[-1].read_text()):
        name, *dims, shared = match.groups()
        grid, block = tuple(map(int, dims[:3])), tuple(map(int, dims[3:]))
        launches[name] = (grid, block[0] * block[1] * block[2], int(shared))
    return launches


def compile_for_gpu(fn: Callable, *args, gpu: str = "NVIDIA H200") -> Compiled:
    """``jax.jit(fn)`` compiled for ``gpu`` without one; raises XLA's error if it cannot compile.

    ``args`` are ``jax.ShapeDtypeStruct``s (or None); they are placed on the described GPU here.
    Every Pallas kernel is compiled to machine code, so a kernel that needs more shared memory
    than a program may have fails here as it would on the GPU.
    """
    import jax

    from dpfp_devtools.triton_lowering import calls_in, lower_for_gpu

    dump = _dump_folder()
    with _stderr_into(Path(dump, "topology.log")):  # the plugin logs its loading at level 0
        device = gpu_device(gpu)
    placed = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                           sharding=jax.sharding.SingleDeviceSharding(device))
              for a in args]
    for old in dump.glob("module_*"):
        # A program with a custom call can leave a folder of its stages too.
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder, "xla.log")
        with _stderr_into(log):
            lowered = lower_for_gpu(fn, *placed, gpu=gpu)
            compiled = lowered.compile()
        ptxas = {m.group(1): tuple(map(int, m.groups()[1:])) for m in _PTXAS.finditer(log.read_text())}
    stages = {call.name: call.num_stages for call in calls_in(lowered)}
    kernels = {}
    for name, (grid, threads, shared) in _launches(dump).items():
        stores, loads, registers = ptxas.get(name, (None, None, None))
        kernels[name] = Kernel(name, grid, threads, stages.get(name), shared, registers, stores, loads)
    return Compiled(compiled.memory_analysis().temp_size_in_bytes, peak_bytes(compiled), kernels)


def peak_bytes(compiled) -> int:
    """Temporaries + arguments + outputs, less aliased outputs, of a compiled jax program."""
    stats = compiled.memory_analysis()
    return (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes)


def ptxas_version() -> str:
    """The ``ptxas`` XLA finds (nvidia-cuda-nvcc on PYTHONPATH), e.g. "ptxas 13.5.37"."""
    import subprocess

    import nvidia.cu13

    ptxas = Path(list(nvidia.cu13.__path__)[0], "bin", "ptxas")
    text = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True, check=True).stdout
    return "ptxas " + re.search(r"V(\d+\.\d+\.\d+)", text).group(1)
