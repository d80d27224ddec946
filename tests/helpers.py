"""What the test files share, in one module: markers, array makers and comparisons, the delta
rule's state bound, and the runner of multi-device scripts (``tests/scripts/``).

Test files import from here (``from tests.helpers import ...``, with pytest's ``pythonpath``
``["."]``), never from one another.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dpfp_jax as dj
from dpfp_devtools.workloads import make_inputs
from dpfp_jax import nnx as djnnx
from pallas_kernels import MAX_KEY_DIM

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"

JAX_SENSITIVE = pytest.mark.jax_sensitive
"""The ops, modules, multi-device and sharded-step tests that `make test` also runs on the newest
jax and flax admitted (.venv-newest); the marker is registered in pyproject.toml."""


def normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    """``scale`` times a standard Gaussian of ``shape`` drawn from ``jax.random.key(seed)``."""
    return scale * jax.random.normal(jax.random.key(seed), shape)


def random_like(seed: int, x: jax.Array) -> jax.Array:
    """Gaussian of x's shape and dtype; drawn in float32 so every dtype sees the same numbers."""
    return jax.random.normal(jax.random.key(seed), x.shape, jnp.float32).astype(x.dtype)


def close(a, b, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Two pytrees equal leaf for leaf (in order, compared in float32) within ``rtol``/``atol``."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


def assert_close(got, want, rtol: float, atol: float = 0.0) -> None:
    """Leaf by leaf, whatever containers hold them (a list of gradients against jax.grad's tuple)."""
    chex.assert_trees_all_close(jax.tree.leaves(got), jax.tree.leaves(want), rtol=rtol, atol=atol)


def assert_relative_error(got, want, tolerance: float) -> None:
    """Every leaf within ``tolerance`` of the reference, relative to the leaf's largest magnitude."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape
        error = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-6)
        assert error <= tolerance, (error, g.shape)


def assert_close_to_scale(got, want, tolerances: tuple[float, float]) -> None:
    """One array: ``rtol`` as given, ``atol`` relative to ``1 + max |want|``."""
    rtol, atol = tolerances
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    scale = 1.0 + (float(np.abs(want).max()) if want.size else 0.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


# --- the fast-weight op: its differentiable inputs, a loss on both results, and memory ------------

DIFF_ARGS = ("q", "k", "v", "beta", "initial_state")


def log_decays(seed: int, regime: str, shape: tuple[int, int, int], chunk: int = 16) -> jax.Array:
    """``log alpha [B, T, H]`` of a regime: ``typical`` (alpha mostly 0.3 to 1), ``near_one``
    (1 - 1e-4 and closer), ``near_zero`` (alpha about 1e-30), ``zero`` (-inf everywhere) or
    ``mixed`` (typical, with steps of alpha = 0, 1e-30 and 1 - 1e-6, on and off the boundaries of
    chunks of ``chunk`` steps)."""
    noise = jax.random.normal(jax.random.key(seed), shape)
    if regime == "typical":
        return -0.5 * jax.nn.softplus(noise)
    if regime == "near_one":
        return -1e-4 * jax.nn.sigmoid(noise)
    if regime == "near_zero":
        return jnp.log(1e-30) + 0.1 * noise
    if regime == "zero":
        return jnp.full(shape, -jnp.inf)
    assert regime == "mixed"
    x = -0.5 * jax.nn.softplus(noise)
    steps = shape[1]
    for t, value in ((chunk - 1, -jnp.inf), (chunk, -jnp.inf), (5, jnp.log(1e-30)), (2 * chunk + 3, -jnp.inf),
                     (chunk + 4, -1e-6), (steps - 1, jnp.log(1e-30))):
        if 0 <= t < steps:
            x = x.at[0, t].set(value).at[1, t, 0].set(value)
    return x


def cast_inputs(inputs: dict, dtype) -> dict:
    """Every array of an inputs dict (``make_inputs``'s) as ``dtype``; absent ones (None) stay None."""
    return {n: None if x is None else x.astype(dtype) for n, x in inputs.items()}


def assert_bfloat16_agrees(got, want) -> None:
    """``((out, state), grads)`` of bfloat16 inputs against the oracle's on the same values in
    float32: the output and gradients to bfloat16's rounding, the float32 state to float32's."""
    (out, state), grads = got
    (want_out, want_state), want_grads = want
    assert_relative_error(out, want_out, 1e-2)
    assert_relative_error(state, want_state, 1e-5)
    assert_relative_error(grads, want_grads, 1e-2)


def gated_inputs(seed: int, *, rule: str, time: int, value_dim: int, regime: str = "mixed", key_dim: int = 8,
                 batch: int = 2, heads: int = 2, with_state: bool = True, dtype=jnp.float32, chunk: int = 16,
                 decay_seed: int | None = None) -> dict:
    """:func:`make_inputs` with a gate: ``log_decay [B, T, H]`` of ``regime`` (:func:`log_decays`,
    its special steps placed for chunks of ``chunk``; drawn from ``decay_seed``, by default
    ``seed + 100``), every array cast to ``dtype``."""
    inputs = make_inputs(seed, batch=batch, time=time, heads=heads, key_dim=key_dim, value_dim=value_dim, rule=rule,
                         with_state=with_state)
    inputs["log_decay"] = log_decays(seed + 100 if decay_seed is None else decay_seed, regime, (batch, time, heads),
                                     chunk)
    return cast_inputs(inputs, dtype)


def value_and_grads(fn, inputs, names=DIFF_ARGS):
    """``(out, state) = fn(inputs)`` and the gradients, w.r.t. each input of ``names`` that is given
    (not None), in that order, of a fixed random linear loss on both results (in float32)."""
    given = [n for n in names if inputs.get(n) is not None]

    def loss(*args):
        out, state = fn({**inputs, **dict(zip(given, args, strict=True))})
        return (jnp.sum(out.astype(jnp.float32) * random_like(1, out).astype(jnp.float32))
                + jnp.sum(state.astype(jnp.float32) * random_like(2, state).astype(jnp.float32)), (out, state))

    (_, values), grads = jax.value_and_grad(loss, argnums=tuple(range(len(given))), has_aux=True)(
        *[inputs[n] for n in given])
    return values, grads


def positional(fn):
    """``fn(q, k, v, beta, initial_state)`` as a function of the inputs' dict, for :func:`value_and_grads`."""
    return lambda inputs: fn(*(inputs[n] for n in DIFF_ARGS))


def temp_bytes_of_grad(impl, batch=2, time=2048, heads=4, key_dim=128, value_dim=64):
    """XLA's temp bytes of the compiled gradient of a loss on both of the op's results."""
    inputs = make_inputs(0, batch=batch, time=time, heads=heads, key_dim=key_dim, value_dim=value_dim)

    def loss(q, k, v, beta):
        out, state = dj.fast_weight(q, k, v, beta, impl=impl)
        return jnp.sum(out**2) + jnp.sum(state**2)

    args = [inputs[n] for n in ("q", "k", "v", "beta")]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def run_with_host_devices(script: Path, count: int = 8) -> subprocess.CompletedProcess:
    """Run a script in a fresh Python with ``count`` host CPU devices; the repo root is importable
    (``tests.*``, ``examples.*``) as it is for pytest itself."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)


def sharded_feature_inputs(seed: int, phi: dj.Features, *, count: int, length: int, heads: int = 2,
                           value_dim: int) -> tuple[tuple, jax.Array]:
    """The context-parallel feature-map scripts' inputs, two batch rows, T = ``length`` over ``count`` shards:
    ``(q, k, v, beta, initial_state, scale, log_decay)`` (raw Gaussian q, k of width ``phi.dim``, a
    small state of width K, scale 0.7, alpha = 0 on the first shard boundary in row 0 and three
    steps after it in row 1) and ``segment_ids [B, T]`` (row 0: a reset exactly on the first shard
    boundary; row 1: a document from mid first shard across the boundary, another starting on the
    last step)."""
    shard, batch = length // count, 2
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (batch, length, heads, phi.dim))
    k = jax.random.normal(keys[1], (batch, length, heads, phi.dim))
    v = jax.random.normal(keys[2], (batch, length, heads, value_dim))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, length, heads)))
    w0 = 0.3 * jax.random.normal(keys[4], (batch, heads, phi.key_dim, value_dim))
    log_decay = -0.4 * jax.nn.softplus(jax.random.normal(keys[5], (batch, length, heads)))
    log_decay = log_decay.at[0, shard].set(-jnp.inf).at[1, shard + 3].set(-jnp.inf)
    starts = [[shard], [shard // 2, length - 1]]
    ids = jnp.array([[sum(t >= s for s in row) for t in range(length)] for row in starts], jnp.int32)
    return (q, k, v, beta, w0, jnp.float32(0.7), log_decay), ids


def delta_column_bound(k, v, beta):
    """``sum_{s<=t} beta_s v_sj^2 / (2 - beta_s |k_s|^2)``, ``[B, T, H, V]``: bounds ``|W_t[:, j]|^2``.

    One step changes W's column j only along k_t (c = its component there, a = beta |k|^2):
    ``c' = (1 - a) c + beta |k| v_j``, and for 0 <= a <= 2 the largest ``c'^2 - c^2`` over c is
    ``beta v_j^2 / (2 - a)``. From zeros the squared column norm is at most the running sum: no
    key sequence makes it grow faster than sqrt(t), where raw keys grow it exponentially.
    """
    a = beta * jnp.sum(k.astype(jnp.float32) ** 2, axis=-1)
    return jnp.cumsum((beta / (2.0 - a))[..., None] * v.astype(jnp.float32) ** 2, axis=1)


def assert_bounded_and_not_drifting(out, state, k, v, beta, window=4096):
    """The bound above on the final state, and the outputs of the last window no larger than those
    of an early one."""
    assert jnp.isfinite(out).all() and jnp.isfinite(state).all()
    bound = delta_column_bound(k, v, beta) * (1 + 1e-4)  # float32 rounding
    column_sq = jnp.sum(state.astype(jnp.float32) ** 2, axis=-2)  # [B, H, V]
    assert (column_sq <= bound[:, -1]).all()
    # Stationary, not slowly growing: after the memory has filled, a late window of outputs is no
    # larger than an early one (random keys: both about max |v| * max |q|).
    early = float(jnp.abs(out[:, window : 2 * window]).max())
    late = float(jnp.abs(out[:, -window:]).max())
    assert late <= 1.5 * early, (early, late)


def pallas_calls(jaxpr):
    """Every ``pallas_call`` equation of a jaxpr, nested jaxprs (jit, custom_vjp, ...) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from pallas_calls(inner)


def kernel_key_widths(fn, *args, kernel: str) -> list[int]:
    """The widths of q and k as the forward of ``kernel`` (``"fused_chunk"`` or ``"fused_recurrent"``,
    any variant) reads them, in the jaxpr of ``fn(*args)``, which must call that forward once: with
    DPFP on chip they are d, else the width of phi, padded as the kernel pads it."""
    calls = [eqn for eqn in pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)
             if eqn.params["name"].startswith(f"fast_weight_{kernel}_") and eqn.params["name"].endswith("_fwd")]
    assert len(calls) == 1, [eqn.params["name"] for eqn in calls]
    # q and k are the first operands but for the fused chunk kernel's output scale, of shape (1,).
    q, k = [var.aval.shape[-1] for var in calls[0].invars if var.aval.ndim > 1][:2]
    return [q, k]


# --- packed documents (segment_ids): ids, and the oracle running each document alone -------------

PACKED_CHUNK = 8
"""The chunk size of the packed-document cases: their lengths and document starts follow it."""


def document_ids(length: int, starts: list[int], first_id: int = 5) -> np.ndarray:
    """Ids for one row whose documents start at ``starts`` (besides 0): unsorted, negative ones too,
    and an id may come back later (a new document all the same)."""
    count = np.zeros(length, np.int32)
    for start in starts:
        count[start:] += 1
    # 7 is coprime to 11: consecutive documents always differ.
    return (count * 7 + first_id) % 11 - 3


def packed_ids(length: int, seed: int, chunk: int = PACKED_CHUNK) -> jnp.ndarray:
    """Two rows: the first has documents starting at positions C-1, C and C+1 of a chunk (C =
    ``chunk``; a document of length 1 among them), at a chunk's first step 2C, and at T-1 (length
    1 at the end); the second has random lengths."""
    rng = np.random.default_rng(seed)
    first = document_ids(length, [chunk - 1, chunk, chunk + 1, 2 * chunk, length - 1])
    cuts = sorted(set(rng.choice(np.arange(1, length), size=length // 6, replace=False).tolist()))
    return jnp.asarray(np.stack([first, document_ids(length, cuts, first_id=2)]))


def documents(ids: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of equal ids in one row."""
    starts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def run_separately(inputs, rule, segment_ids):
    """The oracle, each document alone: every document zero-padded to a row of its own (zero k, v
    and beta after its end write nothing), one reference run over those rows, then the outputs
    gathered back and each row's last document's final state. It never meets a reset."""
    rows = [documents(ids) for ids in np.asarray(segment_ids)]
    spans = [(b, p, e) for b, row in enumerate(rows) for p, e in row]
    longest = max(e - p for _, p, e in spans)
    # [documents, longest] indices into the packed [B, T]; padding points at a zeroed copy below.
    batch_of = np.array([[b] * longest for b, _, _ in spans])
    time_of = np.array([[min(p + i, e - 1) for i in range(longest)] for _, p, e in spans])
    real = np.array([[i < e - p for i in range(longest)] for _, p, e in spans])

    def unpack(x):
        picked = x[batch_of, time_of]
        return jnp.where(real.reshape(real.shape + (1,) * (x.ndim - 2)), picked, 0)

    starts = inputs["initial_state"]
    first = np.array([p == 0 for _, p, _ in spans])
    alone = {name: None if x is None else unpack(x) for name, x in inputs.items() if name != "initial_state"}
    if starts is not None:
        alone["initial_state"] = jnp.where(first[:, None, None, None], starts[batch_of[:, 0]], 0)
    out, state = dj.fast_weight(**alone, rule=rule, impl="reference")
    # Back to [B, T]: step (b, t) is at (its document, t - p); the last document of row b holds its state.
    where = {(b, p + i): (n, i) for n, (b, p, e) in enumerate(spans) for i in range(e - p)}
    length = segment_ids.shape[1]
    index = np.array([[where[b, t] for t in range(length)] for b in range(len(rows))])
    last = [max(n for n, span in enumerate(spans) if span[0] == b) for b in range(len(rows))]
    return out[index[..., 0], index[..., 1]], state[np.array(last)]


def packed_length(chunk: int) -> int:
    return 5 * chunk - 3  # not a whole number of chunks


def loss_and_grads(fn, inputs):
    """:func:`value_and_grads`, jitted."""
    return jax.jit(functools.partial(value_and_grads, fn))(inputs)


@functools.cache
def packed_case(rule: str, dtype: str, chunk: int = PACKED_CHUNK):
    """Inputs, ids and the separate runs' results and gradients (the oracle, computed once per case),
    for chunks of ``chunk`` steps (which set T and where the first row's documents start)."""
    length = packed_length(chunk)
    inputs = make_inputs(3, time=length, rule=rule, dtype=jnp.dtype(dtype), with_state=True)
    segment_ids = packed_ids(length, seed=3, chunk=chunk)
    return inputs, segment_ids, loss_and_grads(lambda x: run_separately(x, rule, segment_ids), inputs)


# --- the fused kernels' argument checks ------------------------------------------------------------

def bad_kernel_calls():
    """(what is wrong, keyword changes to a good fused-kernel call, error type, message), for both fused kernels."""
    x, wide = jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, MAX_KEY_DIM + 1))
    beta, state = jnp.full((1, 4, 2), 0.5), jnp.zeros((1, 2, 8, 8))
    return [
        ("bogus rule", dict(rule="bogus"), ValueError, "rule must be one of \\('delta', 'sum'\\); got 'bogus'"),
        ("delta without beta", dict(beta=None), ValueError, "beta is required for rule='delta'"),
        ("sum with beta", dict(rule="sum"), ValueError, "beta is only used by rule='delta'; got beta of shape"),
        ("K over the bound", dict(q=wide, k=wide, initial_state=jnp.zeros((1, 2, MAX_KEY_DIM + 1, 8))),
         ValueError, f"K <= {MAX_KEY_DIM}; got K={MAX_KEY_DIM + 1}"),
        ("k unlike q", dict(k=jnp.ones((1, 4, 2, 4))), ValueError, "k must have q's shape"),
        ("3-D q", dict(q=x[0]), ValueError, "q must be 4-D"),
        ("v of another T", dict(v=jnp.ones((1, 5, 2, 8))), ValueError, "v must be \\[B, T, H, V\\] with q's B, T, H"),
        ("beta per head missing", dict(beta=beta[..., :1]), ValueError, "beta must be \\[B, T, H\\] = \\(1, 4, 2\\)"),
        ("state of another V", dict(initial_state=jnp.zeros((1, 2, 8, 4))), ValueError,
         "initial_state must be \\[B, H, K, V\\] = \\(1, 2, 8, 8\\); got \\(1, 2, 8, 4\\)"),
        ("no state", dict(initial_state=None), ValueError, "initial_state must be .* got None"),
        ("integer q", dict(q=x.astype(jnp.int32)), TypeError, "q must have a floating dtype; got int32"),
        ("scale per head", dict(scale=jnp.ones(2)), ValueError, "scale must be a scalar \\(0-d\\); got shape \\(2,\\)"),
        ("resets of another T", dict(resets=jnp.zeros((1, 5), bool)), ValueError,
         "resets must be \\[B, T\\] = \\(1, 4\\) .*got shape \\(1, 5\\)"),
        ("integer resets", dict(resets=jnp.zeros((1, 4), jnp.int32)), TypeError,
         "resets must be a bool array \\[B, T\\] \\(True where a new document starts\\); got dtype int32"),
        ("resets as a list", dict(resets=[[False] * 4]), TypeError, "resets must be a bool array .*got list"),
    ], dict(q=x, k=x, v=x, beta=beta, initial_state=state, rule="delta")


# --- an NNX model that needs memory of the past, trained in tests and in a multi-device script ----

class Regressor(nnx.Module):
    """Predict the running mean of the inputs so far (needs memory of the past)."""

    def __init__(self, kernel_axes=None, *, rngs):
        self.embed = nnx.Linear(4, 16, rngs=rngs)
        self.body = djnnx.DPFPformer(16, 1, num_heads=4, head_dim=4, kernel_axes=kernel_axes, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(self.body(self.embed(x)))


def regression_batch():
    """Inputs and their running mean."""
    x = normal(0, (8, 12, 4))
    return x, jnp.cumsum(x, axis=1) / jnp.arange(1, 13)[None, :, None]


@nnx.jit
def train_step(model, optimizer, x, target):
    """One Adam step on the mean squared error; the loss."""

    def loss_fn(model):
        return jnp.mean((model(x) - target) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


# --- a TPU program to compile ----------------------------------------------------------------------

def op_program(impl: str, rule: str, key_dim: int, dtype=jnp.bfloat16, *, batch: int = 1, time: int = 128,
               heads: int = 2, value_dim: int = 64):
    """fn(q, k, v, beta) -> ((out, final state), gradients of a loss on both) and its abstract args.

    T = 128 is two chunks: the chunk form's walk runs over more than one."""

    def run(q, k, v, beta):
        return dj.fast_weight(q, k, v, beta, rule=rule, impl=impl)

    def loss(*args):
        out, state = run(*args)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)

    delta = rule == "delta"

    def fn(*args):
        return run(*args), jax.grad(loss, argnums=(0, 1, 2, 3) if delta else (0, 1, 2))(*args)

    keys = jax.ShapeDtypeStruct((batch, time, heads, key_dim), dtype)
    args = (keys, keys, jax.ShapeDtypeStruct((batch, time, heads, value_dim), dtype),
            jax.ShapeDtypeStruct((batch, time, heads), dtype) if delta else None)
    return fn, args


def raw_dpfp_inputs(rule: str, dim: int, nu: int, time: int, batch: int = 1, heads: int = 2, value_dim: int = 16,
                    spread: float = 1.0):
    """Raw q, k (width d, Gaussian of scale ``spread``), v, beta, and a small random initial state of
    K = 2 nu d: the inputs of the GPU kernels that compute DPFP on chip."""
    q, k = normal(0, (batch, time, heads, dim), spread), normal(1, (batch, time, heads, dim), spread)
    v = normal(2, (batch, time, heads, value_dim))
    beta = jax.nn.sigmoid(normal(3, (batch, time, heads))) if rule == "delta" else None
    state = normal(4, (batch, heads, 2 * nu * dim, value_dim), 0.1)
    return q, k, v, beta, state


def scaled_results_and_grads(fn, rule, args, scale=0.7):
    """``fn(q, k, v, beta, state, scale)``'s (out, state) and the gradients of a nonlinear loss on both
    w.r.t. q, k, v, the initial state, scale (and beta)."""
    names = (0, 1, 2, 4, 5) + ((3,) if rule == "delta" else ())

    def loss(q, k, v, beta, state, scale):
        out, final = fn(q, k, v, beta, state, scale)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(final * final), (out, final)

    (_, results), grads = jax.value_and_grad(loss, argnums=names, has_aux=True)(*args, scale)
    return results, grads


def dpfp_then_reference(rule, dim, nu, normalization):
    """The oracle of the kernels that compute DPFP on chip: the library's ``Features`` applied first,
    then ``impl="reference"``; called as ``fn(q, k, v, beta, state, scale)``."""
    phi = dj.Features("dpfp", dim=dim, nu=nu, normalization=normalization)

    def fn(q, k, v, beta, state, scale):
        return dj.fast_weight(phi(q), phi(k), v, beta, rule=rule, initial_state=state, scale=scale, impl="reference")
    return fn
