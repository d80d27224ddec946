"""Synthetic associative retrieval (Schlag et al. 2021, Sec. 6.1), with dpfp-jax.

A sequence of (key, value) pairs over S key and S value symbols is written into a fast-weight
memory; a query key must then retrieve its value.

- Setting 1 (capacity): S pairs, every key once. The memory must hold S associations, so the
  feature width of phi bounds how large S can get (linear < dpfp-1 < dpfp-2 < dpfp-3).
- Setting 2 (updates): 2S pairs drawn with replacement, so keys repeat with new values; the
  target is the value of the key's last occurrence. The sum rule can only add, so it fails;
  the delta rule replaces the old value.

Model (as in the paper): keys embedded by a learned embedding of width ~1.1 x 2S; values are
fixed one-hot vectors; step input ``[one_hot(v_t), emb(k_t)]``; key ``phi(Dense(input))`` with
d = 64; beta = ``sigmoid(Dense(input))``; query ``phi(Dense(emb(q)))``. Sum rule readout
``W^T phi(q) / (z . phi(q) + 1e-6)``; delta rule with sum-normalised keys and query, readout
``W^T phi_bar(q)``. Loss ``0.5 * sum((readout - one_hot(target))^2)``, batch mean; Adam 1e-3,
batch 32. Every 100 steps: evaluate on 20 fresh sequences querying every distinct key; stop at
eval loss <= 0.001 (``TARGET_LOSS``, the success threshold: a solved run reaches it; the plot
draws it), after 10 evaluations without improvement, or at the step cap. Training
steps query every distinct key of each sequence too (the same expected loss as one random
query per sequence, with less gradient noise). ``RunConfig(protocol="paper")`` (``--full``) is the
authors' code instead: one training query per sequence, fresh evaluation sequences of S pairs at
every evaluation, their initialisers, 11 evaluations without improvement (docs/paper_figures.md).

    python examples/associative_retrieval.py --quick --out out/retrieval      # make demo
    python examples/associative_retrieval.py --setting 1 --feature-map dpfp --nu 2 --rule sum \\
        --S 20,40,60 --out out/s1
    python examples/associative_retrieval.py --full --out out/paper           # the paper's sweeps
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpfp_jax as dj

if __package__:  # imported as examples.associative_retrieval (the tests), or run with python -m
    from .arguments import HelpFormatter, integer, integers
else:  # python examples/associative_retrieval.py: Python puts examples/ first on the module path
    from arguments import HelpFormatter, integer, integers

MAPS = ("softmax", "linear", "favor", "dpfp")
# The update rules: the library's sum and delta rules, and the fast-weight memory rule of Schlag
# et al. (2021, "Learning associative inference using fast weight memory"): the delta rule's write
# with a norm bound after each step (fwm_memory; fwm_memory_by_op builds it from the library's op).
RULES = (*dj.RULES, "fwm")
# "demo": every distinct key is a training query, evaluation on sequences like the training ones,
# Flax's initialisers. "paper": the authors' code (ischlag/fast-weight-transformers, synthetic/):
# one training query per sequence, their evaluation set and their initialisers (docs/paper_figures.md).
PROTOCOLS = ("demo", "paper")
# The authors' evaluation asks at most this many distinct keys of a sequence (get_all_queries).
PAPER_MAX_QUERIES = 200
KEY_DIM = 64
CSV_COLUMNS = ("setting", "feature_map", "nu", "features", "rule", "S", "final_eval_loss", "steps", "seconds")
# Success: the evaluation loss a run must reach to count as solved (and where training stops).
TARGET_LOSS = 1e-3
# The plot's log axis starts here; lower losses are drawn on it. The CSV keeps six decimals, so
# 1e-5 is the smallest loss written with two significant digits.
PLOT_FLOOR = 1e-5


# --- data ---------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """``keys, values [B, L]``; ``queries, targets, valid [B, S]`` (query every key symbol; valid
    marks the keys that occur in the sequence). A NamedTuple, so jit takes it as a pytree."""

    keys: np.ndarray
    values: np.ndarray
    queries: np.ndarray
    targets: np.ndarray
    valid: np.ndarray


def make_batch(rng: np.random.Generator, setting: int, num_symbols: int, batch_size: int,
               length: int | None = None) -> Batch:
    """Sequences of the given setting; every key symbol is a query, valid where it occurs.

    ``length``: pairs per sequence, setting 2 only (default 2S; setting 1 has S, every key once).
    """
    if setting not in (1, 2):
        raise ValueError(f"setting must be 1 or 2; got {setting!r}")
    if num_symbols < 1:
        raise ValueError(f"num_symbols must be positive; got {num_symbols}")
    if length is not None and (setting == 1 or length < 1):
        raise ValueError(f"length is setting 2's (a positive number of pairs); got length={length!r} "
                         f"in setting {setting}")
    s = num_symbols
    if setting == 1:
        keys = np.argsort(rng.random((batch_size, s)), axis=1)  # a permutation: without replacement
        values = np.argsort(rng.random((batch_size, s)), axis=1)
    else:
        length = 2 * s if length is None else length
        keys = rng.integers(0, s, (batch_size, length))
        values = rng.integers(0, s, (batch_size, length))
    queries = np.broadcast_to(np.arange(s), (batch_size, s))
    targets = np.zeros((batch_size, s), np.int64)
    valid = np.zeros((batch_size, s), bool)
    rows = np.arange(batch_size)
    for t in range(keys.shape[1]):  # later writes win: the value of the last occurrence
        targets[rows, keys[:, t]] = values[:, t]
        valid[rows, keys[:, t]] = True
    return Batch(keys, values, np.array(queries), targets, valid)


def make_paper_train_batch(rng: np.random.Generator, setting: int, num_symbols: int, batch_size: int) -> Batch:
    """The authors' training batch: one query per sequence, the key at a uniformly drawn position
    (so in setting 2 a key that occurs more often is asked more often), its target the value at
    that key's last occurrence. ``queries, targets, valid`` are ``[B, 1]``."""
    full = make_batch(rng, setting, num_symbols, batch_size)
    rows = np.arange(batch_size)
    asked = full.keys[rows, rng.integers(0, full.keys.shape[1], batch_size)]
    return Batch(full.keys, full.values, asked[:, None], full.targets[rows, asked][:, None],
                 np.ones((batch_size, 1), bool))


def make_paper_eval_batch(rng: np.random.Generator, setting: int, num_symbols: int, num_sequences: int) -> Batch:
    """The authors' evaluation set (``get_all_queries``): sequences of S pairs in both settings
    (drawn with replacement in setting 2, so about 63% of the keys occur), each queried with
    every distinct key it holds, at most ``PAPER_MAX_QUERIES`` of them (the lowest key ids)."""
    batch = make_batch(rng, setting, num_symbols, num_sequences, length=None if setting == 1 else num_symbols)
    valid = batch.valid & (np.cumsum(batch.valid, axis=1) <= PAPER_MAX_QUERIES)
    return batch._replace(valid=valid)


# --- model --------------------------------------------------------------------------------------


def symmetric_uniform(bound: float):
    """A Flax initialiser drawing uniformly from ``[-bound, bound]`` (PyTorch's ``nn.Linear``
    draws its weights and bias, and the authors their key and query weights, this way)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SymbolDense(nn.Module):
    """``Dense(features)`` of ``concat([one_hot(values, num_values), table[keys]])`` (of
    ``table[keys]`` alone when ``values`` is None), computed by lookups: row ``values`` of the
    kernel plus row ``keys`` of ``table @ kernel[num_values:]``. The same function and parameters
    (``kernel [num_values + width, features]``, ``bias``) as a Dense layer on the concatenation,
    without building its ``B x L x (S + width)`` input or multiplying by its zeros.
    """

    features: int
    num_values: int = 0
    kernel_init: Callable = nn.initializers.lecun_normal()  # nn.Dense's defaults
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, table: jax.Array, keys: jax.Array, values: jax.Array | None = None) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (self.num_values + table.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        out = (table @ kernel[self.num_values :])[keys] + bias
        return out if values is None else out + kernel[values]


def paper_initialisers(fan_in: int, kernel_bound: float | None = None, xavier: bool = False) -> dict:
    """The initialisers of the authors' PyTorch ``nn.Linear`` layers: the kernel uniform in
    ``+-kernel_bound`` (their keys and queries: ``1/sqrt(d)``), Xavier-uniform (their softmax
    model) or PyTorch's default ``+-1/sqrt(fan_in)``; the bias always PyTorch's default."""
    default = 1 / math.sqrt(fan_in)
    kernel = nn.initializers.xavier_uniform() if xavier else symmetric_uniform(kernel_bound or default)
    return dict(kernel_init=kernel, bias_init=symmetric_uniform(default))


def sum_rule_readout(phi_k: jax.Array, values: jax.Array, phi_q: jax.Array) -> jax.Array:
    """The sum rule's normalised readout ``W^T phi(q) / (z . phi(q) + 1e-6)``, ``W = sum_t phi(k_t) v_t^T``,
    ``z = sum_t phi(k_t)``, without building W: ``sum_t (phi(q) . phi(k_t)) v_t`` over the sum of the
    same scores (linear attention's two forms; the same function, rounding aside).

    A query costs ``T (K + V)`` where W costs ``T K V`` to build; the authors' protocol trains one
    query per sequence, so W would be almost all of a step. ``phi_k [B, T, K]``, ``values [B, T, V]``,
    ``phi_q [B, Q, K]``; returns ``[B, Q, V]``.
    """
    scores = jnp.einsum("bqk,btk->bqt", phi_q, phi_k)
    return jnp.einsum("bqt,btv->bqv", scores, values) / (scores.sum(axis=-1) + 1e-6)[..., None]


def delta_rule_readout(phi_k: jax.Array, values: jax.Array, beta: jax.Array, phi_q: jax.Array) -> jax.Array:
    """``W^T q`` for the delta rule's fast weights W after the sequence (from zero), without W.

    A step is ``W_t = (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T``, so
    ``q^T W_t = ((I - beta_t k_t k_t^T) q)^T W_{t-1} + beta_t (q . k_t) v_t^T`` (the matrix is
    symmetric): walking the query back from the last step to the first, each step adds
    ``beta_t (q . k_t) v_t`` and replaces q by ``q - beta_t (q . k_t) k_t``. The same function as
    reading ``dj.fast_weight``'s final state (rounding aside), at ``T K`` per query instead of the
    ``T K V`` of W; the walk is as stable as the forward one (the same non-expanding matrices for
    normalised keys and beta in [0, 1]). ``phi_k [B, T, K]``, ``values [B, T, V]``, ``beta [B, T]``,
    ``phi_q [B, Q, K]``; returns ``[B, Q, V]``.
    """

    def step(q, inputs):
        k, b = inputs  # [B, K], [B]
        weight = b[:, None] * jnp.einsum("bqk,bk->bq", q, k)
        return q - weight[..., None] * k[:, None], weight

    _, weights = jax.lax.scan(step, phi_q, (jnp.swapaxes(phi_k, 0, 1), jnp.swapaxes(beta, 0, 1)), reverse=True)
    return jnp.einsum("tbq,btv->bqv", weights, values)


def fwm_memory(phi_k: jax.Array, values: jax.Array, beta: jax.Array) -> jax.Array:
    """The fast-weight memory rule (Schlag et al. 2021): ``[B, K, V]`` fast weights after the sequence.

    Each step is the delta rule's write ``W + beta k (v - W^T k)^T``, after which W is scaled down to
    Frobenius norm 1 when it is larger, as the authors' ``update_rule="fwm"`` does from the second
    step on (their first write, ``beta_0 v_0 k_0^T``, is kept as it is); keys are not normalised.
    ``phi_k [B, T, K]``, ``values [B, T, V]``, ``beta [B, T, 1]``.

    The steps are written out here (``fwm_memory_by_op`` is the same rule through ``dj.fast_weight``
    on one step at a time, the slower reference). The backward keeps W at the start of each
    segment of about sqrt(T) steps and recomputes the segment (``jax.checkpoint``), so it holds
    about ``2 sqrt(T)`` states, not several per step (at S = 200, T = 400, a batch of 32 and K = 128,
    a state is 3.3 MB in float32).
    """
    batch, length, key_width = phi_k.shape

    def step(state, inputs):
        k, v, b, t = inputs  # [B, K], [B, V], [B, 1], the step's index
        old = jnp.einsum("bkv,bk->bv", state, k)
        state = state + jnp.einsum("bk,bv->bkv", k, b * (v - old))
        norm = jnp.sqrt(jnp.sum(state * state, axis=(1, 2), keepdims=True))
        return jnp.where(t > 0, state / (jax.nn.relu(norm - 1) + 1), state), None

    @jax.checkpoint
    def segment(state, inputs):
        return jax.lax.scan(step, state, inputs)[0], None

    size = max(d for d in range(1, math.isqrt(length) + 1) if length % d == 0)  # a divisor of T near sqrt(T)
    time_major = [jnp.swapaxes(x, 0, 1) for x in (phi_k, values, beta)] + [jnp.arange(length)]
    segments = [x.reshape(length // size, size, *x.shape[1:]) for x in time_major]
    state = jnp.zeros((batch, key_width, values.shape[-1]), jnp.float32)
    return jax.lax.scan(segment, state, segments)[0]


def fwm_memory_by_op(phi_k: jax.Array, values: jax.Array, beta: jax.Array) -> jax.Array:
    """:func:`fwm_memory` built from the library's op: each step is ``dj.fast_weight`` with
    ``rule="delta"`` on one step from the carried state (``initial_state``), then the same norm
    scaling. The reference the direct steps are tested against (a step costs several times more)."""
    batch, length, key_width = phi_k.shape
    state = jnp.zeros((batch, 1, key_width, values.shape[-1]), jnp.float32)

    def step(state, inputs):
        k, v, b, t = inputs  # [B, K], [B, V], [B, 1], the step's index
        _, state = dj.fast_weight(k[:, None, None], k[:, None, None], v[:, None, None], b[:, None], rule="delta",
                                  initial_state=state)
        norm = jnp.sqrt(jnp.sum(state * state, axis=(1, 2, 3), keepdims=True))
        return jnp.where(t > 0, state / (jax.nn.relu(norm - 1) + 1), state), None

    time_major = [jnp.swapaxes(x, 0, 1) for x in (phi_k, values, beta)]
    state, _ = jax.lax.scan(step, state, (*time_major, jnp.arange(length)))
    return state[:, 0]


class RetrievalModel(nn.Module):
    """Write the (key, value) sequence into a fast-weight memory, read it with each query.

    Attributes:
      num_symbols: S.
      feature_map: ``"softmax"`` (attention over the pairs, the upper reference), ``"linear"``,
        ``"favor"`` or ``"dpfp"``.
      rule: ``"sum"``, ``"delta"`` or ``"fwm"`` (ignored by softmax).
      nu: DPFP's nu; num_features: FAVOR+'s m.
      paper_init: the authors' initialisers (:func:`paper_initialisers`) instead of Flax's defaults.
      via_op: read the memory as ``dj.fast_weight``'s final state (FWM: the op on one step at a
        time, :func:`fwm_memory_by_op`), the reference form; by default the same readout is computed
        without the op's per-step outputs, which the model does not use (:func:`sum_rule_readout`,
        :func:`delta_rule_readout`, :func:`fwm_memory`: rounding aside, the same function).
    """

    num_symbols: int
    feature_map: str
    rule: str = "sum"
    nu: int = 1
    num_features: int = 64
    key_dim: int = KEY_DIM
    paper_init: bool = False
    via_op: bool = False

    def dense(self, features: int, num_values: int, width: int, name: str, kernel_bound: float | None = None):
        """The step input's Dense layer (``num_values`` one-hot inputs, then ``width`` embedding ones)."""
        if not self.paper_init:
            return SymbolDense(features, num_values, name=name)
        xavier = self.feature_map == "softmax"
        return SymbolDense(features, num_values, name=name, **paper_initialisers(num_values + width, kernel_bound,
                                                                                  xavier))

    @nn.compact
    def __call__(self, keys, values, queries, projection=None):
        s = self.num_symbols
        width = round(1.1 * 2 * s)
        embed = nn.Embed(s, width, embedding_init=nn.initializers.normal(1.0), name="embed")
        table = embed(jnp.arange(s))  # the embedding rows: step inputs are [one_hot(v_t), emb(k_t)]
        value_onehot = jax.nn.one_hot(values, s)
        bound = 1 / math.sqrt(self.key_dim)
        k = self.dense(self.key_dim, s, width, "key", bound)(table, keys, values)
        q = self.dense(self.key_dim, 0, width, "query", bound)(table, queries)
        if self.feature_map == "softmax":
            weights = jax.nn.softmax(jnp.einsum("bqd,btd->bqt", q, k) / math.sqrt(self.key_dim), axis=-1)
            return jnp.einsum("bqt,bts->bqs", weights, value_onehot)

        phi_k = dj.apply_feature_map(self.feature_map, k, nu=self.nu, projection=projection)
        phi_q = dj.apply_feature_map(self.feature_map, q, nu=self.nu, projection=projection)
        beta = None
        if self.rule in ("delta", "fwm"):
            beta = jax.nn.sigmoid(self.dense(1, s, width, "beta")(table, keys, values))[..., 0][:, :, None]
        if self.rule == "fwm":
            memory = (fwm_memory_by_op if self.via_op else fwm_memory)(phi_k, value_onehot, beta)
            readout = jnp.einsum("bkv,bqk->bqv", memory, phi_q)
            # The authors' readout: a layer norm over the values, without scale or offset.
            mean = readout.mean(axis=-1, keepdims=True)
            return (readout - mean) * jax.lax.rsqrt(readout.var(axis=-1, keepdims=True) + 1e-5)
        if self.rule == "delta":
            phi_k, phi_q = dj.sum_norm(phi_k), dj.sum_norm(phi_q)
        if not self.via_op:
            if self.rule == "sum":
                return sum_rule_readout(phi_k, value_onehot, phi_q)
            return delta_rule_readout(phi_k, value_onehot, beta[..., 0], phi_q)
        # One head; the outputs are not needed (queries come after the sequence), only W.
        _, memory = dj.fast_weight(phi_k[:, :, None], phi_k[:, :, None], value_onehot[:, :, None], beta,
                                   rule=self.rule)
        readout = jnp.einsum("bkv,bqk->bqv", memory[:, 0], phi_q)
        if self.rule == "sum":
            readout = readout / (jnp.einsum("bqk,bk->bq", phi_q, phi_k.sum(axis=1)) + 1e-6)[..., None]
        return readout


def retrieval_loss(readout, targets, valid):
    """0.5 * squared error to the one-hot target, summed over values, mean over valid queries."""
    per_query = 0.5 * jnp.sum((readout - jax.nn.one_hot(targets, readout.shape[-1])) ** 2, axis=-1)
    return jnp.sum(per_query * valid) / jnp.maximum(jnp.sum(valid), 1)


# --- training -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
    setting: int
    feature_map: str
    rule: str
    num_symbols: int
    nu: int = 1
    num_features: int = 64
    seed: int = 0
    max_steps: int = 20_000
    batch_size: int = 32
    learning_rate: float = 1e-3
    eval_every: int = 100
    eval_sequences: int = 20
    patience: int = 10
    target_loss: float = TARGET_LOSS
    protocol: str = "demo"

    def __post_init__(self):
        if self.setting not in (1, 2):
            raise ValueError(f"setting must be 1 or 2; got {self.setting!r}")
        if self.feature_map not in MAPS:
            raise ValueError(f"feature_map must be one of {MAPS}; got {self.feature_map!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}; got {self.rule!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}; got {self.protocol!r}")
        for name in ("num_symbols", "nu", "num_features", "max_steps", "batch_size", "eval_every", "eval_sequences",
                     "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be above 0; got {self.learning_rate}")

    @property
    def label(self) -> str:
        if self.feature_map == "dpfp":
            name = f"dpfp-{self.nu}"
        elif self.feature_map == "favor":
            name = f"favor-{self.num_features}"
        else:
            name = self.feature_map
        return name if self.feature_map == "softmax" else f"{name} {self.rule}"


class Trainer:
    """One run's pieces, as :func:`train` uses them: the model's parameters and Adam state, the
    jitted ``train_step(params, opt_state, batch, step_key)`` and ``evaluate(params, batch,
    projection)``, and the random streams of the training and evaluation data.

    :meth:`step` is one training step as :func:`train` takes it (a new step key, a new batch, the
    update; not waited for), :meth:`evaluation_loss` one evaluation (its data, then the loss, waited
    for). Building one draws from the streams exactly as :func:`train` always has, so a loop of
    these calls is :func:`train`'s run, number for number (``benchmarks/sweep_cost.py`` times them).
    """

    def __init__(self, config: RunConfig):
        self.config = config
        self.paper = paper = config.protocol == "paper"
        self.model = model = RetrievalModel(config.num_symbols, config.feature_map, config.rule, config.nu,
                                            config.num_features, paper_init=paper)
        self.training_batch = make_paper_train_batch if paper else make_batch
        self.rng = np.random.default_rng(config.seed)
        key = jax.random.key(config.seed)
        sample = make_batch(self.rng, config.setting, config.num_symbols, config.batch_size)
        self.key, init_key, self.eval_key = jax.random.split(key, 3)
        self.params = model.init(init_key, sample.keys, sample.values, sample.queries,
                                 self.projection_for(init_key))["params"]
        optimizer = optax.adam(config.learning_rate)
        self.opt_state = optimizer.init(self.params)
        self.eval_projection = self.projection_for(self.eval_key)  # fixed for evaluation, so evaluations compare
        projection_for = self.projection_for

        def loss_fn(params, batch, projection):
            readout = model.apply({"params": params}, batch.keys, batch.values, batch.queries, projection)
            return retrieval_loss(readout, batch.targets, batch.valid)

        @jax.jit
        def train_step(params, opt_state, batch, step_key):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, projection_for(step_key))  # FAVOR+: redrawn
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.train_step = train_step
        self.evaluate = jax.jit(loss_fn)
        self.eval_rng = np.random.default_rng(config.seed + 10_000)  # sequences never trained on
        self.eval_batch = make_batch(self.eval_rng, config.setting, config.num_symbols, config.eval_sequences)

    def projection_for(self, key: jax.Array) -> jax.Array | None:
        """FAVOR+'s random projection drawn with ``key`` (None for the other feature maps)."""
        if self.config.feature_map != "favor":
            return None
        return dj.favor_projection(key, self.config.num_features, KEY_DIM)

    def step(self) -> jax.Array:
        """One training step on a new batch; returns its loss (not waited for)."""
        config = self.config
        self.key, step_key = jax.random.split(self.key)
        batch = self.training_batch(self.rng, config.setting, config.num_symbols, config.batch_size)
        self.params, self.opt_state, loss = self.train_step(self.params, self.opt_state, batch, step_key)
        return loss

    def evaluation(self) -> tuple[Batch, jax.Array | None]:
        """The evaluation set and FAVOR+ projection: the demo's are fixed, so evaluations compare;
        the authors draw new sequences and a new projection at every evaluation."""
        if not self.paper:
            return self.eval_batch, self.eval_projection
        self.eval_key, key = jax.random.split(self.eval_key)
        batch = make_paper_eval_batch(self.eval_rng, self.config.setting, self.config.num_symbols,
                                      self.config.eval_sequences)
        return batch, self.projection_for(key)

    def evaluation_loss(self) -> float:
        """The evaluation loss of the current parameters."""
        return float(self.evaluate(self.params, *self.evaluation()))


def evaluations_made(steps: int, eval_every: int) -> int:
    """How many evaluations :func:`train` makes in a run of ``steps`` steps: one every
    ``eval_every`` steps, and one more at the end when the run stops between two.

    Example:
        >>> evaluations_made(3000, 100), evaluations_made(2350, 100), evaluations_made(1, 100)
        (30, 24, 1)
    """
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be at least 1; got steps={steps}, eval_every={eval_every}")
    return -(-steps // eval_every)


def train(config: RunConfig, progress: bool = True) -> dict:
    """Train one model to the stopping rule; returns one CSV row as a dict."""
    trainer = Trainer(config)
    best, since_best, step, eval_loss = math.inf, 0, 0, math.inf
    start = time.perf_counter()
    bar = _progress(config, progress)
    while step < config.max_steps:
        loss = trainer.step()
        step += 1
        if step % config.eval_every == 0:
            eval_loss = trainer.evaluation_loss()
            bar.update(config.eval_every)
            bar.set_postfix(train=f"{float(loss):.4f}", eval=f"{eval_loss:.4f}")
            if eval_loss < best:
                best, since_best = eval_loss, 0
            else:
                since_best += 1
            # A NaN loss means NaN weights, which no later step can repair: stop (the authors' loop
            # would go on to the patience limit and end with the same NaN).
            if eval_loss <= config.target_loss or since_best >= config.patience or math.isnan(eval_loss):
                break
    bar.close()
    if step % config.eval_every:
        eval_loss = trainer.evaluation_loss()
    return dict(setting=config.setting, feature_map=config.feature_map,
                nu=config.nu if config.feature_map == "dpfp" else "",
                features=config.num_features if config.feature_map == "favor" else "",
                rule="" if config.feature_map == "softmax" else config.rule, S=config.num_symbols,
                final_eval_loss=f"{eval_loss:.6f}", steps=step, seconds=f"{time.perf_counter() - start:.1f}")


def _progress(config: RunConfig, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, desc=f"setting {config.setting} S={config.num_symbols} {config.label}",
                disable=not enabled, leave=False, file=sys.stderr)


# --- sweeps, CSV, plot, table -------------------------------------------------------------------


def quick_runs(seed: int, max_steps: int | None) -> Iterator[RunConfig]:
    """The demo: the paper's two effects at a few sizes, in minutes on a CPU."""
    cap = 3000 if max_steps is None else max_steps
    for s in (40, 100):
        for feature_map, nu in (("linear", 1), ("dpfp", 1), ("dpfp", 2)):
            yield RunConfig(1, feature_map, "sum", s, nu=nu, seed=seed, max_steps=cap)
    for rule in ("sum", "delta"):
        yield RunConfig(2, "dpfp", rule, 20, nu=1, seed=seed, max_steps=cap)


# The authors' protocol (synthetic/main.py of ischlag/fast-weight-transformers): step cap, seed,
# and the count of evaluations without improvement that stops a run (main.py stops when
# strike > max_strike = 10, at the 11th).
PAPER_MAX_STEPS = 100_000
PAPER_SEED = 1
PAPER_PATIENCE = 11
# The paper's sweeps: (setting, feature_map, rule, nu, num_features) for each line of Figures 2
# and 3, and the numbers of keys S of each setting.
PAPER_METHODS = (
    # Figure 2, setting 1: keys without repetition, the sum rule.
    (1, "softmax", "sum", 1, 64), (1, "linear", "sum", 1, 64),
    (1, "favor", "sum", 1, 64), (1, "favor", "sum", 1, 128), (1, "favor", "sum", 1, 512),
    (1, "dpfp", "sum", 1, 64), (1, "dpfp", "sum", 2, 64), (1, "dpfp", "sum", 3, 64),
    # Figure 3, setting 2: keys repeat; the sum rule, the delta rule ("ours" in the authors' code)
    # and the fast-weight memory rule of Schlag et al. (2021).
    (2, "dpfp", "sum", 1, 64), (2, "dpfp", "delta", 1, 64), (2, "dpfp", "delta", 2, 64),
    (2, "linear", "delta", 1, 64), (2, "favor", "delta", 1, 64), (2, "favor", "delta", 1, 128),
    (2, "dpfp", "fwm", 1, 64),
)
PAPER_SIZES = {1: tuple(range(20, 601, 20)), 2: tuple(range(20, 201, 20))}


def paper_config(setting: int, feature_map: str, rule: str, num_symbols: int, nu: int = 1, num_features: int = 64,
                 seed: int = PAPER_SEED, max_steps: int = PAPER_MAX_STEPS) -> RunConfig:
    """One run under the authors' protocol (docs/paper_figures.md)."""
    return RunConfig(setting, feature_map, rule, num_symbols, nu=nu, num_features=num_features, seed=seed,
                     max_steps=max_steps, patience=PAPER_PATIENCE, protocol="paper")


def full_runs(seed: int, max_steps: int | None) -> Iterator[RunConfig]:
    """The paper's sweeps (Figures 2 and 3): every method at every S, under the authors' protocol.
    ``examples/paper_figures.py`` runs them (or a budget's subset) resumably, in parallel."""
    cap = PAPER_MAX_STEPS if max_steps is None else max_steps
    for setting, feature_map, rule, nu, m in PAPER_METHODS:
        for s in PAPER_SIZES[setting]:
            yield paper_config(setting, feature_map, rule, s, nu, m, seed=seed, max_steps=cap)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _row_label(row: dict) -> str:
    name = {"dpfp": f"dpfp-{row['nu']}", "favor": f"favor-{row['features']}"}.get(row["feature_map"],
                                                                                   row["feature_map"])
    return name if not row["rule"] else f"{name} {row['rule']}"


def write_table(rows: list[dict], path: Path) -> str:
    lines = ["| setting | model | S | final eval loss | steps | seconds |", "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['setting']} | {_row_label(row)} | {row['S']} | {float(row['final_eval_loss']):.4f} "
                     f"| {row['steps']} | {row['seconds']} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_results(rows: list[dict]):
    """Final evaluation loss against S, one panel per setting, one line per feature map and rule.

    A log y-axis from ``PLOT_FLOOR`` (losses below it, 0 included, are drawn on the floor), the
    success threshold ``TARGET_LOSS`` as a dashed line, and x ticks at whole numbers of keys: the
    S values themselves when a panel has at most ten of them. Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    settings = sorted({int(r["setting"]) for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if int(row["setting"]) == setting:
                lines.setdefault(_row_label(row), []).append((int(row["S"]), float(row["final_eval_loss"])))
        for label, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [max(p[1], PLOT_FLOOR) for p in points], marker="o", label=label)
        ax.axhline(TARGET_LOSS, color="0.3", linestyle="--", linewidth=1, label=f"success threshold {TARGET_LOSS:g}")
        ax.set_yscale("log")
        top = max([float(r["final_eval_loss"]) for r in rows if int(r["setting"]) == setting] + [TARGET_LOSS])
        ax.set_ylim(PLOT_FLOOR, 2 * top)
        sizes = sorted({int(r["S"]) for r in rows if int(r["setting"]) == setting})
        if len(sizes) <= 10:
            ax.set_xticks(sizes)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("number of unique keys S")
        ax.set_ylabel(f"final evaluation loss (floor {PLOT_FLOOR:g})")
        ax.set_title(f"setting {setting}: " + ("capacity" if setting == 1 else "updating keys"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = plot_results(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Flags of a single run (not --quick or --full); the last three are filled in after parsing, so
# that one given where it does nothing is refused rather than ignored.
SINGLE_RUN = ("setting", "feature_map", "S", "rule", "nu", "features")
FALLBACKS = dict(rule="sum", nu=1, features=64)


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the parsed flags together (one line naming the flags), or None."""
    given = [name for name in SINGLE_RUN if getattr(args, name) is not None]
    flag = {name: "--" + name.replace("_", "-") for name in SINGLE_RUN}
    if args.quick and args.full:
        return "--quick and --full are exclusive"
    if args.quick or args.full:
        if given:
            return f"{flag[given[0]]} sets a single run; --{'quick' if args.quick else 'full'} runs its own list"
        return None
    missing = [flag[name] for name in ("setting", "feature_map", "S") if getattr(args, name) is None]
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (or --quick, or --full)"
    if args.feature_map == "softmax" and args.rule is not None:
        return "--rule: --feature-map softmax attends over the pairs and has no fast-weight rule"
    if args.nu is not None and args.feature_map != "dpfp":
        return f"--nu is DPFP's; this run has --feature-map {args.feature_map}"
    if args.features is not None and args.feature_map != "favor":
        return f"--features is FAVOR+'s; this run has --feature-map {args.feature_map}"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked (an argparse error, exit status 2, names the flag), with the
    single-run fallbacks filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    single = "(a single run: required unless --quick or --full)"
    parser.add_argument("--setting", type=int, choices=(1, 2), help=f"1: capacity, 2: updates {single}")
    parser.add_argument("--feature-map", choices=MAPS, help=f"feature map of the keys and queries {single}")
    parser.add_argument("--S", type=integers(1), default=None,
                        help=f"comma-separated numbers of unique keys, e.g. 20,40,60 {single}")
    parser.add_argument("--rule", choices=dj.RULES, default=None,
                        help="fast-weight update rule (default: sum; a single run, not with softmax)")
    parser.add_argument("--nu", type=integer(1), default=None, help="DPFP's nu (default: 1; a single dpfp run)")
    parser.add_argument("--features", type=integer(1), default=None,
                        help="FAVOR+'s number of random features m (default: 64; a single favor run)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (required)")
    parser.add_argument("--seed", type=integer(0), default=0, help="initialisation and data")
    parser.add_argument("--max-steps", type=integer(1), default=None,
                        help="the step cap of every run (default: 20000; --quick 3000; --full 100000, the paper's)")
    parser.add_argument("--quick", action="store_true", help="the demo preset")
    parser.add_argument("--full", action="store_true",
                        help="the paper's sweeps under its protocol (days on a CPU; examples/paper_figures.py runs "
                             "them resumably)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    if not (args.quick or args.full):
        for name, value in FALLBACKS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.quick:
        configs = list(quick_runs(args.seed, args.max_steps))
    elif args.full:
        configs = list(full_runs(args.seed, args.max_steps))
    else:
        configs = [RunConfig(args.setting, args.feature_map, args.rule, s, nu=args.nu, num_features=args.features,
                             seed=args.seed, max_steps=20_000 if args.max_steps is None else args.max_steps)
                   for s in args.S]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in configs:
        row = train(config, progress=not args.no_progress)
        rows.append(row)
        print(f"setting {row['setting']}  S={row['S']:>4}  {_row_label(row):<14} "
              f"eval loss {float(row['final_eval_loss']):.4f}  ({row['steps']} steps, {row['seconds']} s)", flush=True)
        write_csv(rows, args.out / "results.csv")  # after every run, so a long sweep can be watched
    write_plot(rows, args.out / "results.png")
    print()
    print(write_table(rows, args.out / "results.md"))
    print(f"wrote {args.out / 'results.csv'}, results.md and results.png")
    return rows


if __name__ == "__main__":
    main()
