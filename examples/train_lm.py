"""Byte-level language model with DPFPformer: real Flax training code, on one device or many.

Embedding -> DPFPformer (or Flax's causal softmax attention as the baseline) -> LM head, trained
with AdamW (warmup + cosine decay, gradient clipping) in a jitted step, data-parallel over every
device through a ``jax.sharding.Mesh`` with a batch axis: the same command uses 1 CPU, 8 host
devices, a GPU, a TPU slice, or several machines (one process each, see below).

    python examples/train_lm.py --steps 300 --out out/lm                     # default corpus, CPU-sized
    python examples/train_lm.py --preset paper-small --steps 20000 --out out/lm-gpu   # the paper's LM size
    python examples/train_lm.py --attention linear --rule sum --out out/lm-linear
    python examples/train_lm.py --carry --out out/lm-carry                   # fast weights across segments
    python examples/train_lm.py --resume --steps 600 --out out/lm            # continue from the checkpoint
    python examples/train_lm.py --sample 200 --steps 0 --resume --out out/lm  # generate from a checkpoint

Several processes (machines, or processes on one machine) run jax's own multi-controller engine:
start the same command once per process with ``--coordinator-address HOST:PORT --num-processes N
--process-id I`` (or ``--distributed`` alone under SLURM, Open MPI, Kubernetes or a Cloud TPU, where
``jax.distributed.initialize`` reads them from the environment). The mesh spans every process's
devices, each process builds only its rows of the global batch, orbax writes one checkpoint
together, and process 0 alone writes ``metrics.jsonl`` and ``loss.png`` and prints. ``--out`` must
be a folder every process sees.

Data: ``--data PATH`` (any text file, read as bytes) or, by default, this Python's own standard
library sources (every ``*.py`` directly under the stdlib folder, sorted by name, up to
``--corpus-bytes``): text that exists on every machine without a download. The last 5% is the
validation split; validation is reported in bits per byte.

``--pack`` trains on packed documents: each default-corpus source file is a document that starts
with the separator byte 0x1E (ASCII's record separator, made for this and absent from Python
source; a file holding it is refused), and with ``--data`` the file's own 0x1E bytes start its
documents. Every training and validation row carries ``segment_ids`` (which document each byte
belongs to), so the fast weights (or, for softmax, the causal mask) restart at every document:
no byte is predicted from another document's bytes. The last byte of a document is trained to
predict the next separator, the end of the document. ``--carry`` refuses ``--pack`` (a carried
memory would cross documents between segments).

Outputs in ``--out``: ``metrics.jsonl``, one row every ``--log-every`` steps, at every evaluation
and at the last step, with ``step``, ``train_bpb`` (the mean training loss of the steps since the
previous row, in bits per byte), ``valid_bpb`` (rows where validation ran) and ``tokens_per_s``;
``loss.png``; orbax checkpoints under ``checkpoints/`` every ``--save-every`` steps. Without
``--log-every`` and ``--eval-every`` both scale with ``--steps`` (a 100th and a 10th of it).

``tokens_per_s`` counts training steps only: tokens trained in the row's steps over the time those
steps took, each from building its batch to its loss on the host. Compilation (done ahead of the
first step), evaluation, checkpointing, logging and sampling are outside it; the run's totals for
each are printed at the end.

``--sample N`` prints N bytes decoded token by token with the recurrent decode cache (constant
work per token; softmax attention re-runs the growing context instead), under a header naming the
prompt and the decoding settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import sysconfig
import time
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import dpfp_jax as dj

ATTENTIONS = ("dpfp", "linear", "favor", "softmax")
SEPARATOR = 0x1E  # ASCII record separator: starts every packed document
PRESETS = {
    # The paper's small language model (Sec. 6.2): 16 layers, width 128, 8 heads of 16, ff 2048.
    "paper-small": dict(depth=16, dim=128, heads=8, head_dim=16, ff_dim=2048, seq_len=256, batch_size=96),
    # Small enough for a 2-core CPU: a few hundred steps in minutes.
    "cpu": dict(depth=2, dim=64, heads=4, head_dim=16, ff_dim=256, seq_len=64, batch_size=16),
}


# --- data ---------------------------------------------------------------------------------------


def default_documents(max_bytes: int) -> list[tuple[Path, bytes]]:
    """This Python's standard-library source files, in a fixed order, until they hold ``max_bytes``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        documents.append((path, data))
        total += len(data)
        if total >= max_bytes:
            break
    return documents


def default_corpus(max_bytes: int) -> bytes:
    """This Python's standard-library sources, in a fixed order, up to ``max_bytes``."""
    return b"".join(data for _, data in default_documents(max_bytes))[:max_bytes]


def packed_corpus(max_bytes: int) -> bytes:
    """The default corpus's files as documents, each led by :data:`SEPARATOR`, up to ``max_bytes``."""
    chunks = []
    for path, data in default_documents(max_bytes):
        if SEPARATOR in data:
            raise ValueError(f"{path} holds the separator byte {SEPARATOR:#04x}; its documents cannot be packed")
        chunks.append(bytes([SEPARATOR]) + data)
    return b"".join(chunks)[:max_bytes]


def load_corpus(data: Path | None, max_bytes: int, pack: bool = False) -> np.ndarray:
    if data is not None:
        text = data.read_bytes()[:max_bytes]
    else:
        text = packed_corpus(max_bytes) if pack else default_corpus(max_bytes)
    if len(text) < 1024:
        raise ValueError(f"the corpus needs at least 1024 bytes; got {len(text)}")
    return np.frombuffer(text, np.uint8).astype(np.int32)


def document_ids(corpus: np.ndarray) -> np.ndarray:
    """Each byte's document: a new one starts at every :data:`SEPARATOR` byte.

    >>> document_ids(np.array([97, SEPARATOR, 98, 99, SEPARATOR, SEPARATOR, 100])).tolist()
    [0, 1, 1, 1, 2, 3, 3]
    """
    return np.cumsum(corpus == SEPARATOR, dtype=np.int32)


def split(corpus: np.ndarray, valid_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(corpus) * (1 - valid_fraction))
    return corpus[:cut], corpus[cut:]


def random_windows(data: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int,
                   rows: np.ndarray | None = None) -> np.ndarray:
    """``[B, seq_len + 1]`` windows at offsets drawn from (seed, step): a resumed run sees the same data.

    ``rows`` (default: all) picks rows of the global batch of ``batch_size``: a process builds its own.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
    if rows is not None:
        starts = starts[rows]
    return np.stack([data[s : s + seq_len + 1] for s in starts])


def stream_windows(data: np.ndarray, step: int, batch_size: int, seq_len: int,
                   rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive segments of ``batch_size`` parallel streams, for carrying memory across them.

    Stream b reads its own contiguous part of the text; step s gives its s-th segment. Returns the
    windows and a ``[B]`` flag that is True where a stream starts over (its memory must reset).
    ``rows`` (default: all) picks streams, as in :func:`random_windows`.
    """
    stream_len = len(data) // batch_size
    segments = (stream_len - 1) // seq_len
    if segments < 1:
        raise ValueError(f"the training text is too short for {batch_size} streams of {seq_len}-byte segments")
    index = step % segments
    starts = np.arange(batch_size) * stream_len + index * seq_len
    if rows is not None:
        starts = starts[rows]
    windows = np.stack([data[s : s + seq_len + 1] for s in starts])
    return windows, np.full(len(starts), index == 0)


def validation_windows(data: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """Evenly spaced fixed windows of the validation split."""
    count = max(1, min(count, (len(data) - 1) // seq_len))
    starts = np.linspace(0, len(data) - seq_len - 1, count).astype(int)
    return np.stack([data[s : s + seq_len + 1] for s in starts])


# --- model --------------------------------------------------------------------------------------


class SoftmaxBlock(nn.Module):
    """Pre-norm block with Flax's causal multi-head softmax attention: the baseline."""

    heads: int
    head_dim: int
    ff_dim: int

    @nn.compact
    def __call__(self, x, segment_ids=None):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
        if segment_ids is not None:  # packed documents: each attends only within itself
            mask = nn.combine_masks(mask, nn.make_attention_mask(segment_ids, segment_ids, jnp.equal))
        h = nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.heads * self.head_dim)(
            nn.LayerNorm()(x), mask=mask
        )
        x = x + h
        return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.ff_dim)(nn.LayerNorm()(x))))


class ByteLM(nn.Module):
    """Bytes in, next-byte logits out. ``__call__(tokens, memory=None, segment_ids=None)`` ->
    ``(logits, memory)``; ``segment_ids [B, T]`` packs documents (no byte sees another document's)."""

    attention: str = "dpfp"
    rule: str = "delta"
    nu: int = 1
    num_features: int = 64
    depth: int = 2
    dim: int = 64
    heads: int = 4
    head_dim: int = 16
    ff_dim: int = 256
    impl: str = "auto"
    decode: bool = False

    @nn.compact
    def __call__(self, tokens, memory=None, segment_ids=None):
        x = nn.Embed(256, self.dim)(tokens)
        if self.attention == "softmax":
            for _ in range(self.depth):
                x = SoftmaxBlock(self.heads, self.head_dim, self.ff_dim)(x, segment_ids)
            x = nn.LayerNorm()(x)
        else:
            x, memory = dj.DPFPformer(
                self.dim, self.depth, num_heads=self.heads, head_dim=self.head_dim, nu=self.nu,
                feature_map="linear" if self.attention == "linear" else self.attention, rule=self.rule,
                # The delta rule's layers sum-normalise phi(q), phi(k); the sum rule's use the classic
                # linear-transformer denominator.
                normalization="sum" if self.rule == "delta" else "attention",
                num_features=self.num_features, ff_mult=max(1, self.ff_dim // self.dim), impl=self.impl,
                decode=self.decode, name="transformer",
            )(x, memory, segment_ids=segment_ids, return_memory=True)
        return nn.Dense(256, name="head")(x), memory


def cross_entropy(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def apply_lm(model: ByteLM, params, windows, memory=None, segment_ids=None):
    """``(logits, memory)`` of ``windows [B, T + 1]``'s first T bytes, each predicting the next;
    ``segment_ids`` (None, or ``[B, T + 1]`` like the windows) packs documents."""
    ids = None if segment_ids is None else segment_ids[:, :-1]
    return model.apply({"params": params}, windows[:, :-1], memory, segment_ids=ids)


# --- training -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
    """The model, optimiser, mesh and jitted steps of one run."""

    model: ByteLM
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    carry: bool

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("batch"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def state_sharding(self) -> dict[str, NamedSharding]:
        """Per entry of the train state (a pytree prefix): parameters and optimiser state
        replicated, carried memories sharded over the batch."""
        shardings = dict(params=self.replicated, opt_state=self.replicated, step=self.replicated)
        if self.carry:
            shardings["memory"] = self.batch_sharding
        return shardings

    def init(self, seed: int, batch_size: int, seq_len: int) -> dict:
        """The initial state, created by a jit that writes it straight into ``state_sharding``:
        on several processes no host holds more than its own devices' part."""
        model, optimizer, carry = self.model, self.optimizer, self.carry

        def fresh():
            tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
            params = model.init(jax.random.key(seed), tokens)["params"]
            state = dict(params=params, opt_state=optimizer.init(params), step=jnp.array(0, jnp.int32))
            if carry:
                _, memory = model.apply({"params": params}, tokens)
                state["memory"] = jax.tree.map(jnp.zeros_like, memory)
            return state

        return jax.jit(fresh, out_shardings=self.state_sharding)()

    def batch(self, local_rows: np.ndarray, global_rows: int) -> jax.Array:
        """The global ``[global_rows, ...]`` batch sharded over ``batch`` from this process's rows
        (:meth:`local_rows`)."""
        return jax.make_array_from_process_local_data(self.batch_sharding, local_rows,
                                                      (global_rows, *local_rows.shape[1:]))

    def local_rows(self, batch_size: int) -> np.ndarray:
        """The rows of a ``batch_size`` global batch that live on this process's devices, in the
        order :meth:`batch` expects them."""
        indices = self.batch_sharding.addressable_devices_indices_map((batch_size,))
        starts = sorted({index[0].indices(batch_size)[:2] for index in indices.values()})
        return np.concatenate([np.arange(a, b) for a, b in starts])

    def make_train_step(self):
        model, optimizer = self.model, self.optimizer

        def loss_fn(params, windows, memory, segment_ids):
            logits, new_memory = apply_lm(model, params, windows, memory, segment_ids)
            return cross_entropy(logits, windows[:, 1:]), new_memory

        # Shardings fixed in and out, so the step compiled ahead of time accepts its own output.
        # segment_ids is None (an empty pytree) unless documents are packed; jit's in_shardings
        # name every positional argument, so it has no default.
        @partial(jax.jit,
                 in_shardings=(self.state_sharding, self.batch_sharding, self.batch_sharding, self.batch_sharding),
                 out_shardings=(self.state_sharding, self.replicated))
        def train_step(state, windows, reset, segment_ids):
            memory = state.get("memory")
            if memory is not None:
                # Truncated backprop: the carried memory is an input, not a path for gradients.
                keep = (~reset).astype(jnp.float32)
                memory = jax.tree.map(
                    lambda m: jax.lax.stop_gradient(m) * keep.reshape(-1, *([1] * (m.ndim - 1))), memory
                )
            (loss, new_memory), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], windows, memory,
                                                                                  segment_ids)
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            new_state = dict(params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                             step=state["step"] + 1)
            if memory is not None:
                new_state["memory"] = new_memory
            return new_state, loss

        return train_step

    def make_eval_step(self):
        model = self.model

        @jax.jit
        def eval_loss(params, windows, segment_ids=None):
            logits, _ = apply_lm(model, params, windows, segment_ids=segment_ids)
            return cross_entropy(logits, windows[:, 1:])

        return eval_loss


def make_optimizer(learning_rate: float, steps: int, warmup: int, weight_decay: float, clip: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, warmup), max(steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))


def make_mesh() -> jax.sharding.Mesh:
    """Every device of every process on one ``batch`` axis: data parallelism.

    Automatic (GSPMD) sharding: Flax linen's ``nn.Embed`` gather has no explicit-sharding rule
    yet; dpfp-jax itself runs under either mesh type.
    """
    return jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))


def checkpoint_manager(directory: Path, save_every: int):
    """Orbax saves and restores on every process together: each writes the shards it owns (one
    copy of a replicated array), the primary process the metadata."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=2,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def restore(manager, trainer: Trainer, state: dict) -> dict:
    """The latest checkpoint, read straight into ``state``'s shapes and shardings; ``state`` if none."""
    step = manager.latest_step()
    if step is None:
        return state
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return manager.restore(step, args=ocp.args.StandardRestore(target))


# --- sampling -----------------------------------------------------------------------------------


def generate(model: ByteLM, params, prompt: bytes, num_bytes: int, temperature: float = 0.0,
             seed: int = 0) -> bytes:
    """Decode ``num_bytes`` after ``prompt``: greedy at temperature 0, else sampled.

    Fast-weight models run with ``decode=True``: the memory lives in the ``cache`` collection
    and each new byte costs the same. Softmax attention re-runs the growing context.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one byte")
    tokens = jnp.asarray(np.frombuffer(prompt, np.uint8).astype(np.int32))[None]
    key = jax.random.key(seed)

    def pick(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(key, logits / temperature, axis=-1)

    out = []
    if model.attention == "softmax":
        full = jax.jit(lambda p, t: model.apply({"params": p}, t)[0][:, -1])
        for _ in range(num_bytes):
            key, sub = jax.random.split(key)
            nxt = pick(full(params, tokens), sub)
            out.append(int(nxt[0]))
            tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
        return bytes(out)

    decoder = model.clone(decode=True)
    cache = decoder.init(jax.random.key(0), tokens[:, :1])["cache"]

    @jax.jit
    def step(cache, chunk):
        (logits, _), updates = decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])
        return updates["cache"], logits[:, -1]

    cache, logits = step(cache, tokens)  # the whole prompt in one call
    for _ in range(num_bytes):
        key, sub = jax.random.split(key)
        nxt = pick(logits, sub)
        out.append(int(nxt[0]))
        cache, logits = step(cache, nxt[:, None])
    return bytes(out)


# --- the script ---------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written and every option's default; an option without a fixed
    default (``None``) says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (required)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a text file, read as bytes (default: this Python's standard-library sources)")
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000, help="bytes of the corpus used")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model and batch sizes")
    parser.add_argument("--attention", choices=ATTENTIONS, default="dpfp", help="attention of every layer")
    parser.add_argument("--rule", choices=dj.RULES, default="delta", help="fast-weight update rule")
    parser.add_argument("--nu", type=int, default=1, help="DPFP's nu")
    parser.add_argument("--features", type=int, default=64, help="FAVOR+'s random features m")
    parser.add_argument("--impl", choices=dj.IMPLS, default="auto", help="fast-weight implementation")
    for name in ("depth", "dim", "heads", "head-dim", "ff-dim", "seq-len", "batch-size"):
        key = name.replace("-", "_")
        sizes = ", ".join(f"{preset} {values[key]}" for preset, values in sorted(PRESETS.items()))
        what = "global batch, over all processes" if name == "batch-size" else "overrides the preset"
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{what} (default: the preset's: {sizes})")
    parser.add_argument("--steps", type=int, default=300, help="length of the run and of its LR schedule")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop (and checkpoint) at this step, e.g. to fit a time slot; --resume goes on "
                             "(default: --steps)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's weight decay")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm")
    parser.add_argument("--carry", action="store_true", help="carry fast weights across consecutive segments")
    parser.add_argument("--pack", action="store_true",
                        help=f"pack documents (each source file, led by the byte {SEPARATOR:#04x}; with --data, "
                             f"its {SEPARATOR:#04x} bytes start documents) and train and validate with segment ids")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="validate every N steps and at the last (default: --steps // 10, at least 1)")
    parser.add_argument("--log-every", type=int, default=None,
                        help="a metrics row every N steps (default: --steps // 100, at least 1)")
    parser.add_argument("--eval-windows", type=int, default=32, help="validation windows of --seq-len bytes")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--sample", type=int, default=0, help="bytes to generate at the end")
    parser.add_argument("--prompt", default="def ", help="the sample's prompt (default: %(default)r)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and sampling")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("several processes (jax.distributed.initialize)")
    group.add_argument("--coordinator-address", default=None,
                       help="HOST:PORT of process 0, the same for every process (default: single process)")
    group.add_argument("--num-processes", type=int, default=None, help="number of processes (default: 1)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's id, 0 to --num-processes - 1 (default: 0)")
    group.add_argument("--distributed", action="store_true",
                       help="initialise even without the flags above: jax reads them from SLURM, Open MPI, "
                            "Kubernetes or Cloud TPU environment variables")
    return parser


def default_intervals(steps: int, eval_every: int | None, log_every: int | None) -> tuple[int, int]:
    """``(eval_every, log_every)``: the given ones, else a 10th and a 100th of the run (at least 1).

    >>> default_intervals(300, None, None), default_intervals(60, None, None), default_intervals(60, 50, 5)
    ((30, 3), (6, 1), (50, 5))
    """
    return (max(1, steps // 10) if eval_every is None else eval_every,
            max(1, steps // 100) if log_every is None else log_every)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.eval_every, args.log_every = default_intervals(args.steps, args.eval_every, args.log_every)
    for name in ("eval_every", "log_every", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.carry and args.attention == "softmax":
        parser.error("--carry carries fast weights; softmax attention has none")
    if args.carry and args.pack:
        parser.error("--carry and --pack cannot be combined: the carried memory would cross documents")
    if args.num_processes is not None and args.num_processes < 1:
        parser.error(f"--num-processes must be at least 1; got {args.num_processes}")
    if args.process_id is not None and args.num_processes is not None \
            and not 0 <= args.process_id < args.num_processes:
        parser.error(f"--process-id must be in [0, {args.num_processes}); got {args.process_id}")
    return args


def initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when any of the process flags (or ``--distributed``) is given.

    Flags left out are detected by jax from the cluster's environment, where it knows one.
    """
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if args.distributed or any(flag is not None for flag in flags):
        jax.distributed.initialize(*flags)


def build(args: argparse.Namespace) -> tuple[ByteLM, Trainer]:
    model = ByteLM(args.attention, args.rule, args.nu, args.features, args.depth, args.dim, args.heads,
                   args.head_dim, args.ff_dim, args.impl)
    mesh = make_mesh()
    if args.batch_size % mesh.size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {mesh.size} devices")
    optimizer = make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay, args.clip)
    return model, Trainer(model, optimizer, mesh, args.carry)


def describe(args: argparse.Namespace, devices: int) -> str:
    """The run in two lines: the model, then the training settings (the plot's title)."""
    attention = {"dpfp": f"dpfp-{args.nu}", "favor": f"favor-{args.features}"}.get(args.attention, args.attention)
    if args.attention != "softmax":
        attention += f" {args.rule} rule" + (", carried" if args.carry else "")
    if args.pack:
        attention += ", packed documents"
    processes = jax.process_count()
    where = f"{devices} device{'s' * (devices > 1)}" + (f", {processes} processes" if processes > 1 else "")
    layers = f"{args.depth} layer{'s' * (args.depth > 1)}"
    return (f"byte LM, {attention}: {layers}, width {args.dim}, {args.heads} heads of {args.head_dim}, "
            f"ff {args.ff_dim}\nbatch {args.batch_size} x {args.seq_len} bytes, lr {args.lr:g}, warmup "
            f"{args.warmup}, {args.steps} steps, seed {args.seed}; {where}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (and sample); returns ``losses`` (step -> training loss in nats), ``metrics`` (the rows
    this run logged), ``seconds`` (time spent compiling, training, evaluating, checkpointing),
    ``tokens_per_s`` (over the training steps), ``state``, ``model`` and ``sample``."""
    args = parse_args(argv)
    initialize_distributed(args)
    lead = jax.process_index() == 0  # the one process that writes metrics and the plot, and prints
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.data, args.corpus_bytes, args.pack)
    train_data, valid_data = split(corpus)
    train_ids, valid_ids = split(document_ids(corpus)) if args.pack else (None, None)
    model, trainer = build(args)
    state = trainer.init(args.seed, args.batch_size, args.seq_len)
    manager = checkpoint_manager(args.out / "checkpoints", args.save_every)
    if args.resume:
        state = restore(manager, trainer, state)
    start_step = int(state["step"])
    end_step = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    rows = trainer.local_rows(args.batch_size)
    eval_loss = trainer.make_eval_step()
    valid_windows = validation_windows(valid_data, args.seq_len, args.eval_windows)
    valid = jax.make_array_from_process_local_data(trainer.replicated, valid_windows, valid_windows.shape)
    valid_segments = None
    if args.pack:  # each validation document starts from an empty memory
        ids = validation_windows(valid_ids, args.seq_len, args.eval_windows)
        valid_segments = jax.make_array_from_process_local_data(trainer.replicated, ids, ids.shape)
    metrics_path = args.out / "metrics.jsonl"
    if lead and not args.resume and metrics_path.exists():
        metrics_path.unlink()

    def next_batch(step: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        segment_ids = None
        if args.carry:
            windows, reset = stream_windows(train_data, step, args.batch_size, args.seq_len, rows)
        else:
            windows = random_windows(train_data, step, args.seed, args.batch_size, args.seq_len, rows)
            reset = np.zeros(len(rows), bool)
            if args.pack:  # the same offsets (same seed and step) in the ids
                ids = random_windows(train_ids, step, args.seed, args.batch_size, args.seq_len, rows)
                segment_ids = trainer.batch(ids, args.batch_size)
        return trainer.batch(windows, args.batch_size), trainer.batch(reset, args.batch_size), segment_ids

    seconds = dict(compile=0.0, train=0.0, evaluate=0.0, checkpoint=0.0)
    if end_step > start_step:
        # Compiled ahead, so no step's time holds compilation.
        clock = time.perf_counter()
        train_step = trainer.make_train_step().lower(
            state, jax.ShapeDtypeStruct((args.batch_size, args.seq_len + 1), jnp.int32),
            jax.ShapeDtypeStruct((args.batch_size,), jnp.bool_),
            jax.ShapeDtypeStruct((args.batch_size, args.seq_len + 1), jnp.int32) if args.pack else None).compile()
        seconds["compile"] = time.perf_counter() - clock

    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, end_step), initial=start_step, total=args.steps,
               disable=args.no_progress or not lead, file=sys.stderr,
               desc=f"{args.attention} {args.rule} x{trainer.mesh.size} devices")
    losses: dict[int, float] = {}
    records: list[dict[str, float]] = []
    interval_losses: list[float] = []
    interval_tokens, interval_seconds, tokens = 0, 0.0, 0
    for step in bar:
        clock = time.perf_counter()
        windows, reset, segment_ids = next_batch(step)
        state, loss = train_step(state, windows, reset, segment_ids)
        done = step + 1
        losses[done] = float(loss)  # waits for the step: its time is all in the count
        step_seconds = time.perf_counter() - clock
        seconds["train"] += step_seconds
        interval_seconds += step_seconds
        interval_losses.append(losses[done])
        interval_tokens += args.batch_size * args.seq_len
        tokens += args.batch_size * args.seq_len
        evaluate = done % args.eval_every == 0 or done == end_step
        if evaluate or done % args.log_every == 0:
            record = dict(step=done, train_bpb=float(np.mean(interval_losses)) / math.log(2))
            if evaluate:
                clock = time.perf_counter()
                record["valid_bpb"] = float(eval_loss(state["params"], valid, valid_segments)) / math.log(2)
                seconds["evaluate"] += time.perf_counter() - clock
            record["tokens_per_s"] = interval_tokens / interval_seconds
            records.append(record)
            interval_losses, interval_tokens, interval_seconds = [], 0, 0.0
            if lead:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(train_bpb=f"{record['train_bpb']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            if evaluate and lead:
                bar.write(f"step {done}: train {record['train_bpb']:.3f} bits/byte, valid {record['valid_bpb']:.3f} "
                          f"bits/byte, {record['tokens_per_s']:,.0f} tokens/s")
        clock = time.perf_counter()
        manager.save(done, args=ocp.args.StandardSave(state), force=done == end_step)
        seconds["checkpoint"] += time.perf_counter() - clock
    clock = time.perf_counter()
    manager.wait_until_finished()
    seconds["checkpoint"] += time.perf_counter() - clock
    bar.close()
    tokens_per_s = tokens / seconds["train"] if tokens else None
    if lead and tokens:
        print(f"{len(losses)} steps: {tokens_per_s:,.0f} tokens/s over {seconds['train']:.1f} s of training steps; "
              f"besides: compile {seconds['compile']:.1f} s, evaluation {seconds['evaluate']:.1f} s, "
              f"checkpoints {seconds['checkpoint']:.1f} s")
    if lead and metrics_path.exists():
        write_loss_plot(metrics_path, args.out / "loss.png", describe(args, trainer.mesh.size))
    sample = None
    if args.sample and lead:
        params = jax.device_get(state["params"])  # replicated: every process holds it whole
        sample = generate(model, params, args.prompt.encode(), args.sample, args.temperature, args.seed)
        decoding = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, seed {args.seed}"
        print(f"--- sample at step {int(state['step'])}: prompt {args.prompt!r} + {args.sample} bytes, {decoding} ---")
        print(args.prompt + sample.decode("utf-8", errors="replace"))
    return dict(losses=losses, metrics=records, seconds=seconds, tokens_per_s=tokens_per_s, state=state,
                model=model, sample=sample)


def smooth(values: list[float], span: float) -> np.ndarray:
    """Exponential moving average with weight ``2 / (span + 1)`` on the newest value, divided by
    the weight it has gathered so the start is not pulled towards 0.

    >>> smooth([4.0, 2.0, 2.0], span=1).tolist(), smooth([4.0, 2.0], span=3).round(3).tolist()
    ([4.0, 2.0, 2.0], [4.0, 2.667])
    """
    decay = 1 - 2 / (span + 1)
    average, weight, out = 0.0, 0.0, []
    for value in values:
        average = decay * average + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        out.append(average / weight)
    return np.asarray(out)


def plot_losses(records: list[dict], title: str):
    """Training bits/byte at every logged step (each row's interval mean, faint, and their moving
    average over about a 20th of the rows) and validation bits/byte where evaluated. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    train = [r["train_bpb"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, train, color="C0", alpha=0.3, linewidth=1, label="train, mean since the previous row")
    ax.plot(steps, smooth(train, max(1.0, len(train) / 20)), color="C0", linewidth=2, label="train, smoothed")
    valid = [(r["step"], r["valid_bpb"]) for r in records if "valid_bpb" in r]
    ax.plot([v[0] for v in valid], [v[1] for v in valid], "o-", color="C1", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def write_loss_plot(metrics_path: Path, out: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig = plot_losses(records, title)
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
