"""benchmarks/gpu.py measures like for like, checked on the CPU (its GPU run needs a lent GPU).

Run as the script it is (``python -m benchmarks.gpu``) at a tiny shape: every contender gets a
row (figures, or why not), the memory column is each side's allocator peak, JAX's taken in fresh
processes (which on a CPU, where XLA keeps no allocator statistics, say so instead of giving a
number), and a figure that is missing reads "n/a", never a number.
"""

import subprocess
import sys
import types

import jax.numpy as jnp
import pytest

from tests.helpers import REPO_ROOT

TINY = "1,32,1,8,4"


def run_benchmark(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # runs every contender and two fresh processes: about half a minute
def test_the_table_gives_every_contender_a_row_and_missing_figures_as_na():
    result = run_benchmark("--shapes", TINY, "--memory-shapes", TINY, "--repeats", "2")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("command: python -m benchmarks.gpu") and "load average at end:" in out, out
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in out.splitlines() if line.startswith("| "))}
    assert rows["FLA chunk_delta_rule"][1] == "not installed", out  # no PyTorch here
    chunk = rows["ours chunk"]
    assert float(chunk[1]) > 0 and float(chunk[2]) > 0, out  # forward and forward+backward ms
    # Runtime peak asked for at this shape: on a CPU the fresh process says there is none.
    assert chunk[3] == "n/a" and "- ours chunk: no runtime peak: measure failed: no allocator statistics on cpu" in out
    assert chunk[4] != "n/a" and float(chunk[4]) >= 0, out  # the compiled peak (GB) is there
    assert chunk[5] == "1.00x", out  # the time ratio over itself, the base row
    assert rows["ours scan"][5].endswith("x") and rows["ours scan"][6] == "n/a", out  # no runtime peak: no ratio


@pytest.mark.slow  # four small training steps and a refusal: about 10 s
def test_the_feature_map_steps_run_where_they_can_and_say_why_not_elsewhere():
    assert run_benchmark("--features", "--feature-shape", "1,64,2,0,1").returncode == 2
    result = run_benchmark("--features", "--feature-shape", "1,64,2,32,1", "--repeats", "2")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in result.stdout.splitlines() if line.startswith("| "))}
    for where in ("layer", "op"):
        chunk = rows[f"chunk, map in the {where}"]
        assert float(chunk[1]) > 0 and chunk[3].endswith("x"), result.stdout  # time, and over the base row
        # On a CPU the Pallas kernels cannot run: the row says why instead of giving numbers.
        assert "need a GPU or a TPU" in rows[f"pallas, map in the {where}"][1], result.stdout


def test_shapes_are_checked_by_the_command_line():
    result = run_benchmark("--shapes", "8,4096,8,0,64")
    assert result.returncode == 2 and "five positive integers B,T,H,K,V" in result.stderr, result.stderr


FAKE_TORCH = '''
"""A stand-in for torch.cuda's allocator: tensors count their bytes while alive."""
import numpy as np

bfloat16 = "bfloat16"


class _Allocator:
    allocated = 0
    peak = 0

    @classmethod
    def add(cls, n):
        cls.allocated += n
        cls.peak = max(cls.peak, cls.allocated)


class Tensor:
    def __init__(self, shape):
        self.shape, self.grad = tuple(shape), None
        _Allocator.add(self.nbytes())

    def nbytes(self):
        return int(np.prod(self.shape)) * 2

    def __del__(self):
        _Allocator.allocated -= self.nbytes()

    def cuda(self):
        return self

    def to(self, dtype):
        return Tensor(self.shape)

    def requires_grad_(self, flag):
        return self

    def numel(self):
        return int(np.prod(self.shape))

    def element_size(self):
        return 2


def from_numpy(array):
    return Tensor(array.shape)


class cuda:
    synchronize = staticmethod(lambda: None)
    memory_allocated = staticmethod(lambda: _Allocator.allocated)
    max_memory_allocated = staticmethod(lambda: _Allocator.peak)

    @staticmethod
    def reset_peak_memory_stats():
        _Allocator.peak = _Allocator.allocated
'''

def test_the_pytorch_peak_counts_one_copy_of_the_inputs_and_what_the_call_allocates(monkeypatch):
    """Like the JAX side's fresh process: tensors alive before the call (the timing calls' copies,
    another contender's) are not counted; the inputs once, the activations and the gradients are."""
    torch = types.ModuleType("torch")
    exec(FAKE_TORCH, torch.__dict__)
    monkeypatch.setitem(sys.modules, "torch", torch)
    from dpfp_devtools.torch_peers import torch_calls, torch_runtime_peak_bytes

    class Result:  # the op's output: its loss's backward allocates one gradient per input
        def __init__(self, inputs, scratch):
            self.inputs, self.scratch = inputs, scratch

        def float(self):
            return self

        def sum(self):
            return self

        def __add__(self, other):
            return self

        def backward(self):
            for t in self.inputs:
                t.grad = torch.Tensor(t.shape)

    def op(*inputs):
        scratch = torch.Tensor((1000,))  # 2000 bytes of activations, alive until the backward is done
        return Result(inputs, scratch), Result(inputs, scratch)

    args = (jnp.zeros((10,)), jnp.zeros((20,)))  # 60 bytes of bfloat16 inputs
    timing = torch_calls(op, args)  # another contender's copies, alive: not part of this figure
    timing[1]()
    inputs, activations, gradients = 60, 2000, 60
    assert torch_runtime_peak_bytes(op, args) == inputs + activations + gradients
