"""Byte-level language model with DPFPformer: real Flax training code, on one device or many.

Embedding -> DPFPformer (or Flax's causal softmax attention as the baseline) -> LM head, trained
with AdamW (warmup + cosine decay, gradient clipping) in a jitted step, data-parallel over every
local device through a ``jax.sharding.Mesh`` with a batch axis: the same command uses 1 CPU,
8 host devices, a GPU or a TPU slice.

    python examples/train_lm.py --steps 300 --out out/lm                     # default corpus, CPU-sized
    python examples/train_lm.py --preset paper-small --steps 20000 --out out/lm-gpu   # the paper's LM size
    python examples/train_lm.py --attention linear --rule sum --out out/lm-linear
    python examples/train_lm.py --carry --out out/lm-carry                   # fast weights across segments
    python examples/train_lm.py --resume --steps 600 --out out/lm            # continue from the checkpoint
    python examples/train_lm.py --sample 200 --steps 0 --resume --out out/lm  # generate from a checkpoint

Data: ``--data PATH`` (any text file, read as bytes) or, by default, this Python's own standard
library sources (every ``*.py`` directly under the stdlib folder, sorted by name, up to
``--corpus-bytes``): text that exists on every machine without a download. The last 5% is the
validation split; validation is reported in bits per byte.

Outputs in ``--out``: ``metrics.jsonl`` (step, train_loss, valid_bpb, tokens_per_s),
``loss.png``, and orbax checkpoints under ``checkpoints/`` every ``--save-every`` steps.
``--sample N`` prints N bytes decoded token by token with the recurrent decode cache (constant
work per token; softmax attention re-runs the growing context instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import sysconfig
import time
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
PRESETS = {
    # The paper's small language model (Sec. 6.2): 16 layers, width 128, 8 heads of 16, ff 2048.
    "paper-small": dict(depth=16, dim=128, heads=8, head_dim=16, ff_dim=2048, seq_len=256, batch_size=96),
    # Small enough for a 2-core CPU: a few hundred steps in minutes.
    "cpu": dict(depth=2, dim=64, heads=4, head_dim=16, ff_dim=256, seq_len=64, batch_size=16),
}


# --- data ---------------------------------------------------------------------------------------


def default_corpus(max_bytes: int) -> bytes:
    """This Python's standard-library sources, in a fixed order, up to ``max_bytes``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def load_corpus(data: Path | None, max_bytes: int) -> np.ndarray:
    text = data.read_bytes()[:max_bytes] if data is not None else default_corpus(max_bytes)
    if len(text) < 1024:
        raise ValueError(f"the corpus needs at least 1024 bytes; got {len(text)}")
    return np.frombuffer(text, np.uint8).astype(np.int32)


def split(corpus: np.ndarray, valid_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(corpus) * (1 - valid_fraction))
    return corpus[:cut], corpus[cut:]


def random_windows(data: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> np.ndarray:
    """``[B, seq_len + 1]`` windows at offsets drawn from (seed, step): a resumed run sees the same data."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
    return np.stack([data[s : s + seq_len + 1] for s in starts])


def stream_windows(data: np.ndarray, step: int, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive segments of ``batch_size`` parallel streams, for carrying memory across them.

    Stream b reads its own contiguous part of the text; step s gives its s-th segment. Returns the
    windows and a ``[B]`` flag that is True where a stream starts over (its memory must reset).
    """
    stream_len = len(data) // batch_size
    segments = (stream_len - 1) // seq_len
    if segments < 1:
        raise ValueError(f"the training text is too short for {batch_size} streams of {seq_len}-byte segments")
    index = step % segments
    starts = np.arange(batch_size) * stream_len + index * seq_len
    windows = np.stack([data[s : s + seq_len + 1] for s in starts])
    return windows, np.full(batch_size, index == 0)


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
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
        h = nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.heads * self.head_dim)(
            nn.LayerNorm()(x), mask=mask
        )
        x = x + h
        return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.ff_dim)(nn.LayerNorm()(x))))


class ByteLM(nn.Module):
    """Bytes in, next-byte logits out. ``__call__(tokens, memory=None)`` -> ``(logits, memory)``."""

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
    def __call__(self, tokens, memory=None):
        x = nn.Embed(256, self.dim)(tokens)
        if self.attention == "softmax":
            for _ in range(self.depth):
                x = SoftmaxBlock(self.heads, self.head_dim, self.ff_dim)(x)
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
            )(x, memory, return_memory=True)
        return nn.Dense(256, name="head")(x), memory


def cross_entropy(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


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

    def init(self, seed: int, batch_size: int, seq_len: int) -> dict:
        tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
        params = self.model.init(jax.random.key(seed), tokens)["params"]
        state = dict(params=params, opt_state=self.optimizer.init(params), step=jnp.array(0, jnp.int32))
        if self.carry:
            _, memory = self.model.apply({"params": params}, tokens)
            state["memory"] = jax.tree.map(jnp.zeros_like, memory)
        return self.place(state)

    def place(self, state: dict) -> dict:
        """Parameters and optimiser state replicated, carried memories sharded over the batch."""
        placed = jax.device_put({k: v for k, v in state.items() if k != "memory"}, self.replicated)
        if "memory" in state:
            placed["memory"] = jax.device_put(state["memory"], self.batch_sharding)
        return placed

    def make_train_step(self):
        model, optimizer = self.model, self.optimizer

        def loss_fn(params, windows, memory):
            logits, new_memory = model.apply({"params": params}, windows[:, :-1], memory)
            return cross_entropy(logits, windows[:, 1:]), new_memory

        @jax.jit
        def train_step(state, windows, reset):
            memory = state.get("memory")
            if memory is not None:
                # Truncated backprop: the carried memory is an input, not a path for gradients.
                keep = (~reset).astype(jnp.float32)
                memory = jax.tree.map(
                    lambda m: jax.lax.stop_gradient(m) * keep.reshape(-1, *([1] * (m.ndim - 1))), memory
                )
            (loss, new_memory), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], windows, memory)
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
        def eval_loss(params, windows):
            logits, _ = model.apply({"params": params}, windows[:, :-1])
            return cross_entropy(logits, windows[:, 1:])

        return eval_loss


def make_optimizer(learning_rate: float, steps: int, warmup: int, weight_decay: float, clip: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, warmup), max(steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))


def make_mesh() -> jax.sharding.Mesh:
    """All local devices on one ``batch`` axis: data parallelism.

    Automatic (GSPMD) sharding: Flax linen's ``nn.Embed`` gather has no explicit-sharding rule
    yet; dpfp-jax itself runs under either mesh type.
    """
    return jax.make_mesh((jax.local_device_count(),), ("batch",), axis_types=(AxisType.Auto,))


def checkpoint_manager(directory: Path, save_every: int):
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=2,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def restore(manager, trainer: Trainer, state: dict) -> dict:
    step = manager.latest_step()
    if step is None:
        return state
    host_state = jax.tree.map(np.asarray, state)
    restored = manager.restore(step, args=ocp.args.StandardRestore(host_state))
    return trainer.place(restored)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="a text file; default: the stdlib sources")
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--attention", choices=ATTENTIONS, default="dpfp")
    parser.add_argument("--rule", choices=dj.RULES, default="delta")
    parser.add_argument("--nu", type=int, default=1)
    parser.add_argument("--features", type=int, default=64, help="FAVOR+'s random features m")
    parser.add_argument("--impl", choices=dj.IMPLS, default="auto")
    for name in ("depth", "dim", "heads", "head-dim", "ff-dim", "seq-len", "batch-size"):
        parser.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    parser.add_argument("--steps", type=int, default=300, help="length of the run and of its LR schedule")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop (and checkpoint) at this step, e.g. to fit a time slot; --resume goes on")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--carry", action="store_true", help="carry fast weights across consecutive segments")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sample", type=int, default=0, help="bytes to generate at the end")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.carry and args.attention == "softmax":
        parser.error("--carry carries fast weights; softmax attention has none")
    return args


def build(args: argparse.Namespace) -> tuple[ByteLM, Trainer]:
    model = ByteLM(args.attention, args.rule, args.nu, args.features, args.depth, args.dim, args.heads,
                   args.head_dim, args.ff_dim, args.impl)
    mesh = make_mesh()
    if args.batch_size % mesh.size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {mesh.size} local devices")
    optimizer = make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay, args.clip)
    return model, Trainer(model, optimizer, mesh, args.carry)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train_data, valid_data = split(load_corpus(args.data, args.corpus_bytes))
    model, trainer = build(args)
    state = trainer.init(args.seed, args.batch_size, args.seq_len)
    manager = checkpoint_manager(args.out / "checkpoints", args.save_every)
    if args.resume:
        state = restore(manager, trainer, state)
    start_step = int(state["step"])
    train_step, eval_loss = trainer.make_train_step(), trainer.make_eval_step()
    valid = jax.device_put(validation_windows(valid_data, args.seq_len, args.eval_windows))
    metrics_path = args.out / "metrics.jsonl"
    if not args.resume and metrics_path.exists():
        metrics_path.unlink()

    from tqdm.auto import tqdm

    end_step = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=args.steps, disable=args.no_progress,
               file=sys.stderr, desc=f"{args.attention} {args.rule} x{trainer.mesh.size} devices")
    losses: dict[int, float] = {}
    tokens_seen, clock = 0, time.perf_counter()
    for step in bar:
        if args.carry:
            windows, reset = stream_windows(train_data, step, args.batch_size, args.seq_len)
        else:
            windows = random_windows(train_data, step, args.seed, args.batch_size, args.seq_len)
            reset = np.zeros(args.batch_size, bool)
        windows = jax.device_put(windows, trainer.batch_sharding)
        reset = jax.device_put(reset, trainer.batch_sharding)
        state, loss = train_step(state, windows, reset)
        done = step + 1
        losses[done] = float(loss)
        if step == start_step:  # the first step compiles; throughput counts from the second on
            clock = time.perf_counter()
        else:
            tokens_seen += args.batch_size * args.seq_len
        tokens_per_s = tokens_seen / max(time.perf_counter() - clock, 1e-9)
        bar.set_postfix(loss=f"{losses[done]:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if done % args.eval_every == 0 or done == args.steps:
            valid_bpb = float(eval_loss(state["params"], valid)) / math.log(2)
            record = dict(step=done, train_loss=losses[done], valid_bpb=valid_bpb, tokens_per_s=tokens_per_s)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.write(f"step {done}: train loss {losses[done]:.4f}, valid {valid_bpb:.3f} bits/byte, "
                      f"{tokens_per_s:,.0f} tokens/s")
        manager.save(done, args=ocp.args.StandardSave(state), force=done == end_step)
    manager.wait_until_finished()
    bar.close()
    if metrics_path.exists():
        plot_losses(metrics_path, args.out / "loss.png")
    sample = None
    if args.sample:
        sample = generate(model, state["params"], args.prompt.encode(), args.sample, args.temperature, args.seed)
        print(args.prompt + sample.decode("utf-8", errors="replace"))
    return dict(losses=losses, state=state, model=model, sample=sample)


def plot_losses(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["train_loss"] / math.log(2) for r in records], marker="o", label="train (bits/byte)")
    ax.plot(steps, [r["valid_bpb"] for r in records], marker="o", label="validation (bits/byte)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
