"""The PyTorch side of the GPU benchmark (``benchmarks/gpu.py``): FLA's kernels called on the same
inputs as ours, timed and measured like for like. Dev-only; PyTorch is imported where it is used,
so this module loads without it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np


def to_torch(a, requires_grad: bool):
    """A JAX array as a bfloat16 CUDA tensor (through float32 on the host)."""
    import torch

    tensor = torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda().to(torch.bfloat16)
    return tensor.requires_grad_(requires_grad)


def torch_calls(fn: Callable, args: tuple) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward+backward) of a PyTorch contender, each synchronising the GPU before it returns.

    The forward runs without autograd (``torch.no_grad`` on inputs that do not require grad), as
    JAX's jitted forward keeps nothing for a backward; forward+backward runs on inputs that require
    grad and ends with their gradients, as JAX's ``grad`` does.
    """
    import torch

    plain = [to_torch(a, False) for a in args]
    grads = [to_torch(a, True) for a in args]

    def forward():
        with torch.no_grad():
            fn(*plain)
        torch.cuda.synchronize()

    def forward_backward():
        for t in grads:
            t.grad = None
        out, state = fn(*grads)
        (out.float().sum() + state.float().sum()).backward()
        torch.cuda.synchronize()

    return forward, forward_backward


def torch_runtime_peak_bytes(fn: Callable, args: tuple) -> int:
    """PyTorch's allocator peak over one forward+backward of ``fn`` with one copy of the inputs:
    the figure ``jax_runtime_peak_bytes`` reads on the JAX side.

    PyTorch cannot be given a fresh process per contender as cheaply as JAX is (the timing calls and
    other contenders' tensors stay allocated), so the figure is what the call allocates above
    everything alive before it (the peak minus the bytes allocated when the peak was reset), plus
    the inputs' own bytes once: what a process holding only those inputs would peak at.
    """
    import torch

    inputs = [to_torch(a, True) for a in args]

    def run():
        out, state = fn(*inputs)
        (out.float().sum() + state.float().sum()).backward()
        torch.cuda.synchronize()

    run()  # first call: Triton autotuning and compilation are not part of the figure
    for t in inputs:
        t.grad = None  # the gradients are the call's own allocations, so none may be alive before it
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    return torch.cuda.max_memory_allocated() - before + input_bytes
