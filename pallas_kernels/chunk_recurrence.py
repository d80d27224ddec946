"""Chunked delta/sum rule: the sequential inter-chunk recurrence as Pallas kernels.

The chunkwise form (``dpfp_jax/ops/fast_weight/chunk.py``) splits into work that does not depend
on the state, batched matmuls over all chunks at once that XLA already runs well (scores, the
per-chunk WY inverse, ``U_tilde``, ``Y``, ``Q - S Y``), and a sequential walk over chunks that
XLA runs as a loop of small kernel launches. These kernels do the walk: one program per
(batch x head, block of BV value columns) keeps its ``[K, BV]`` slice of the state on chip and,
per chunk, does three [C, K] x [K, BV]-sized matmuls (``jnp.dot``, tensor cores for bf16/tf32
tiles; float32 accumulation). The backward walks chunks in reverse, rebuilding each chunk's
start state from its writes as the XLA path does; products that sum over V come back as one
partial per value block, summed outside.

K and V are padded as ``pallas_kernels.common`` says; zero padding is inert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import pad_state, pad_to, padded_sizes

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST


def _dot(a: Array, b: Array) -> Array:
    return jnp.dot(a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _forward_kernel(*refs, delta: bool):
    if delta:
        q_ref, k_ref, u_tilde_ref, y_ref, out_intra_ref, w0_ref, out_ref, u_ref, w_ref = refs
    else:
        q_ref, k_ref, u_tilde_ref, out_intra_ref, w0_ref, out_ref, w_ref = refs

    def step(n, w):
        u = u_tilde_ref[n] - _dot(y_ref[n], w) if delta else u_tilde_ref[n]
        if delta:
            u_ref[n] = u
        out_ref[n] = _dot(q_ref[n], w) + out_intra_ref[n]
        return w + _dot(k_ref[n].T, u)

    w_ref[...] = lax.fori_loop(0, q_ref.shape[0], step, w0_ref[...])


def _backward_kernel(*refs, delta: bool):
    if delta:
        (q_ref, k_ref, u_ref, y_ref, d_out_ref, w_ref, d_w_ref,
         dq_ref, dk_ref, du_ref, dy_ref, d_w0_ref) = refs
    else:
        q_ref, k_ref, u_ref, d_out_ref, w_ref, d_w_ref, dq_ref, dk_ref, du_ref, d_w0_ref = refs
    num_chunks = q_ref.shape[0]

    def step(i, carry):
        w1, dw1 = carry  # the state after chunk n and dL/d(that state)
        n = num_chunks - 1 - i
        u, d_out = u_ref[n], d_out_ref[n]
        w0 = w1 - _dot(k_ref[n].T, u)
        du = _dot(k_ref[n], dw1)
        dk_ref[n] = _dot(u, dw1.T)
        dq_ref[n] = _dot(d_out, w0.T)
        dw0 = dw1 + _dot(q_ref[n].T, d_out)
        if delta:
            dw0 = dw0 - _dot(y_ref[n].T, du)
            dy_ref[n] = -_dot(du, w0.T)
        du_ref[n] = du
        return w0, dw0

    _, dw0 = lax.fori_loop(0, num_chunks, step, (w_ref[...], d_w_ref[...]))
    d_w0_ref[...] = dw0


def _specs(num_chunks: int, chunk: int, key_dim: int, block: int):
    keys = pl.BlockSpec((num_chunks, None, chunk, key_dim), lambda g, j: (0, g, 0, 0))
    values = pl.BlockSpec((num_chunks, None, chunk, block), lambda g, j: (0, g, 0, j))
    state = pl.BlockSpec((None, key_dim, block), lambda g, j: (g, 0, j))
    partial_keys = pl.BlockSpec((None, num_chunks, None, chunk, key_dim), lambda g, j: (j, 0, g, 0, 0))
    return keys, values, state, partial_keys


def forward_recurrence(q_eff, k, u_tilde, y, out_intra, w0, *, interpret: bool = False):
    """Pallas version of ``chunk.forward_recurrence_xla``: same arguments and results."""
    num_chunks, groups, chunk, key_dim = q_eff.shape
    value_dim = u_tilde.shape[-1]
    k_pad, block, v_pad = padded_sizes(key_dim, value_dim)
    delta = y is not None
    pad_k = functools.partial(pad_to, axis=-1, size=k_pad)
    pad_v = functools.partial(pad_to, axis=-1, size=v_pad)
    keys, values, state, _ = _specs(num_chunks, chunk, k_pad, block)
    inputs = [pad_k(q_eff), pad_k(k), pad_v(u_tilde)] + ([pad_k(y)] if delta else []) + [
        pad_v(out_intra), pad_state(w0, k_pad, v_pad)]
    value_shape = jax.ShapeDtypeStruct((num_chunks, groups, chunk, v_pad), jnp.float32)
    out_shape = [value_shape] + ([value_shape] if delta else []) + [
        jax.ShapeDtypeStruct((groups, k_pad, v_pad), jnp.float32)]
    results = pl.pallas_call(
        functools.partial(_forward_kernel, delta=delta),
        out_shape=tuple(out_shape),
        grid=(groups, v_pad // block),
        in_specs=[keys, keys, values] + ([keys] if delta else []) + [values, state],
        out_specs=tuple([values] + ([values] if delta else []) + [state]),
        interpret=interpret,
        name="fast_weight_chunk_recurrence_fwd",
    )(*[x.astype(jnp.float32) for x in inputs])
    out, final_state = results[0], results[-1]
    u = results[1][..., :value_dim] if delta else None
    return out[..., :value_dim], u, final_state[:, :key_dim, :value_dim]


def backward_recurrence(q_eff, k, u, y, d_out, final_state, d_final, *, interpret: bool = False):
    """Pallas version of ``chunk.backward_recurrence_xla``: same arguments and results."""
    num_chunks, groups, chunk, key_dim = q_eff.shape
    value_dim = u.shape[-1]
    k_pad, block, v_pad = padded_sizes(key_dim, value_dim)
    num_blocks = v_pad // block
    delta = y is not None
    pad_k = functools.partial(pad_to, axis=-1, size=k_pad)
    pad_v = functools.partial(pad_to, axis=-1, size=v_pad)
    keys, values, state, partial_keys = _specs(num_chunks, chunk, k_pad, block)
    inputs = [pad_k(q_eff), pad_k(k), pad_v(u)] + ([pad_k(y)] if delta else []) + [
        pad_v(d_out), pad_state(final_state, k_pad, v_pad), pad_state(d_final, k_pad, v_pad)]
    partial_shape = jax.ShapeDtypeStruct((num_blocks, num_chunks, groups, chunk, k_pad), jnp.float32)
    out_shape = [partial_shape, partial_shape,
                 jax.ShapeDtypeStruct((num_chunks, groups, chunk, v_pad), jnp.float32)]
    out_shape += ([partial_shape] if delta else []) + [jax.ShapeDtypeStruct((groups, k_pad, v_pad), jnp.float32)]
    results = pl.pallas_call(
        functools.partial(_backward_kernel, delta=delta),
        out_shape=tuple(out_shape),
        grid=(groups, num_blocks),
        in_specs=[keys, keys, values] + ([keys] if delta else []) + [values, state, state],
        out_specs=tuple([partial_keys, partial_keys, values] + ([partial_keys] if delta else []) + [state]),
        interpret=interpret,
        name="fast_weight_chunk_recurrence_bwd",
    )(*[x.astype(jnp.float32) for x in inputs])
    dq, dk, du = results[0].sum(0), results[1].sum(0), results[2]
    dy = results[3].sum(0)[..., :key_dim] if delta else None
    return dq[..., :key_dim], dk[..., :key_dim], du[..., :value_dim], dy, results[-1][:, :key_dim, :value_dim]


def chunk_recurrences(interpret: bool = False):
    """The (forward, backward) pair that ``fast_weight_chunk(..., recurrence="pallas")`` uses."""
    return (functools.partial(forward_recurrence, interpret=interpret),
            functools.partial(backward_recurrence, interpret=interpret))
