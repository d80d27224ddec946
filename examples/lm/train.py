"""Optimiser, mesh, train state, the jitted train and evaluation steps, and the training loop.

Data-parallel over every device of every process through a ``jax.sharding.Mesh`` with a ``batch``
axis: parameters and optimiser state replicated, batches (and carried memories) sharded. With
context parallelism (``--context-parallel N``) the mesh is ``(batch, seq)`` with N devices on
``seq``: each window's bytes, and every activation, are split over ``seq`` as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from . import UsageError, checkpoints, input_pipeline, plotting, sampling
from .models import ByteLM, apply_lm, cross_entropy, sequence_sharded


@dataclasses.dataclass
class Trainer:
    """The model, optimiser, mesh and jitted steps of one run."""

    model: ByteLM
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    carry: bool

    @property
    def batch_sharding(self) -> NamedSharding:
        """Rows over ``batch`` (and, on a ``(batch, seq)`` mesh, replicated over ``seq``: a window's
        T + 1 bytes cannot be split in N, so the step splits its T inputs and targets)."""
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
            with self.traced_on_mesh():
                return fresh_on_mesh()

        def fresh_on_mesh():
            tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
            params = model.init(jax.random.key(seed), tokens)["params"]
            state = dict(params=params, opt_state=optimizer.init(params), step=jnp.array(0, jnp.int32))
            if carry:
                _, memory = model.apply({"params": params}, tokens)
                state["memory"] = jax.tree.map(jnp.zeros_like, memory)
            return state

        return jax.jit(fresh, out_shardings=self.state_sharding)()

    def traced_on_mesh(self):
        """A context (entered while tracing a step) under which the model sees the mesh: a
        context-parallel model's layers find their ``context_axis`` there, so the jitted steps can
        be called and compiled without ``jax.set_mesh`` around them."""
        return jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh)

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
            with self.traced_on_mesh():
                logits, new_memory = apply_lm(model, params, windows, memory, segment_ids)
                return cross_entropy(logits, sequence_sharded(windows[:, 1:], model)), new_memory

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
            with self.traced_on_mesh():
                logits, _ = apply_lm(model, params, windows, segment_ids=segment_ids)
                return cross_entropy(logits, sequence_sharded(windows[:, 1:], model))

        return eval_loss


def make_optimizer(learning_rate: float, steps: int, warmup: int, weight_decay: float, clip: float):
    """AdamW after clipping by global norm, linear warmup to ``learning_rate`` then cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, warmup), max(steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))


def make_mesh(context_parallel: int = 1) -> jax.sharding.Mesh:
    """Every device of every process on one ``batch`` axis: data parallelism; with
    ``context_parallel`` N > 1, a ``(batch, seq)`` mesh of ``(devices / N, N)``: each row's
    sequence split over N devices (neighbours in ``jax.make_mesh``'s order), the batch over the rest.

    Automatic (GSPMD) sharding: Flax linen's ``nn.Embed`` gather has no explicit-sharding rule
    yet; dpfp-jax itself runs under either mesh type (under an Auto mesh the layers are told the
    sequence axis, ``context_axis``).
    """
    devices = jax.device_count()
    if context_parallel == 1:
        return jax.make_mesh((devices,), ("batch",), axis_types=(AxisType.Auto,))
    if devices % context_parallel:
        raise UsageError(f"--context-parallel {context_parallel} must divide the {devices} devices "
                         "(jax.device_count())")
    return jax.make_mesh((devices // context_parallel, context_parallel), ("batch", "seq"),
                         axis_types=(AxisType.Auto, AxisType.Auto))


def build(args: argparse.Namespace) -> tuple[ByteLM, Trainer]:
    """The model and trainer of the parsed command line; :class:`UsageError` for a batch the
    devices cannot share evenly, or a ``--context-parallel`` that does not divide the devices."""
    mesh = make_mesh(args.context_parallel)
    model = ByteLM(args.attention, args.rule, args.nu, args.features, args.depth, args.dim, args.heads,
                   args.head_dim, args.ff_dim, args.impl, context_axis="seq" if "seq" in mesh.axis_names else None,
                   gate="gated_deltanet" if getattr(args, "gate", False) else None)
    rows = mesh.shape["batch"]
    if args.batch_size % rows:
        count = "jax.device_count()" + (f" / --context-parallel {args.context_parallel}" if rows < mesh.size else "")
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the {rows} devices the batch is split "
                         f"over ({count})")
    optimizer = make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay, args.clip)
    return model, Trainer(model, optimizer, mesh, args.carry)


def describe(args: argparse.Namespace, devices: int) -> str:
    """The run in two lines: the model, then the training settings (the plot's title)."""
    attention = {"dpfp": f"dpfp-{args.nu}", "favor": f"favor-{args.features}"}.get(args.attention, args.attention)
    if args.attention != "softmax":
        attention += f" {args.rule} rule" + (", gated" if getattr(args, "gate", False) else "") + (
            ", carried" if args.carry else "")
    if args.pack:
        attention += ", packed documents"
    processes = jax.process_count()
    where = f"{devices} device{'s' * (devices > 1)}" + (f", {processes} processes" if processes > 1 else "")
    if args.context_parallel > 1:
        where += f", each sequence split over {args.context_parallel}"
    layers = f"{args.depth} layer{'s' * (args.depth > 1)}"
    return (f"byte LM, {attention}: {layers}, width {args.dim}, {args.heads} heads of {args.head_dim}, "
            f"ff {args.ff_dim}\nbatch {args.batch_size} x {args.seq_len} bytes, lr {args.lr:g}, warmup "
            f"{args.warmup}, {args.steps} steps, seed {args.seed}; {where}")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line as JSON values (what ``config.json`` records)."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in sorted(vars(args).items())}


def train_and_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Train (and sample) as the parsed command line says.

    Every setting is checked (:class:`UsageError`) before the output folder is touched and before
    any state is built. Returns ``losses`` (step -> training loss in nats), ``metrics`` (the rows
    this run logged), ``seconds`` (time spent compiling, training, evaluating, checkpointing),
    ``tokens_per_s`` (over the training steps), ``state``, ``model`` and ``sample``.
    """
    lead = jax.process_index() == 0  # the one process that writes metrics and the plot, and prints
    corpus = input_pipeline.load_corpus(args.data, args.corpus_bytes, args.pack)
    train_data, valid_data = input_pipeline.split(corpus)
    input_pipeline.check_sizes(train_data, valid_data, args.batch_size, args.seq_len, args.carry)
    train_ids, valid_ids = input_pipeline.split(input_pipeline.document_ids(corpus)) if args.pack else (None, None)
    model, trainer = build(args)
    checkpoints.prepare_output(args.out, settings(args), args.resume, args.overwrite, lead)
    state = trainer.init(args.seed, args.batch_size, args.seq_len)
    manager = checkpoints.checkpoint_manager(args.out / checkpoints.CHECKPOINTS, args.save_every)
    metrics_path = args.out / checkpoints.METRICS
    if args.resume:
        state = checkpoints.restore(manager, state)
        if lead:
            checkpoints.truncate_metrics(metrics_path, int(state["step"]))
    start_step = int(state["step"])
    end_step = args.steps if args.stop_at is None else args.stop_at
    rows = trainer.local_rows(args.batch_size)
    eval_loss = trainer.make_eval_step()
    valid_windows = input_pipeline.validation_windows(valid_data, args.seq_len, args.eval_windows)
    valid = jax.make_array_from_process_local_data(trainer.replicated, valid_windows, valid_windows.shape)
    valid_segments = None
    if args.pack:  # each validation document starts from an empty memory
        ids = input_pipeline.validation_windows(valid_ids, args.seq_len, args.eval_windows)
        valid_segments = jax.make_array_from_process_local_data(trainer.replicated, ids, ids.shape)

    def next_batch(step: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        segment_ids = None
        if args.carry:
            windows, reset = input_pipeline.stream_windows(train_data, step, args.batch_size, args.seq_len, rows)
        else:
            windows = input_pipeline.random_windows(train_data, step, args.seed, args.batch_size, args.seq_len, rows)
            reset = np.zeros(len(rows), bool)
            if args.pack:  # the same offsets (same seed and step) in the ids
                ids = input_pipeline.random_windows(train_ids, step, args.seed, args.batch_size, args.seq_len, rows)
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
        plotting.write_loss_plot(metrics_path, args.out / checkpoints.PLOT, describe(args, trainer.mesh.size))
    sample = None
    if args.sample and lead:
        params = jax.device_get(state["params"])  # replicated: every process holds it whole
        sample = sampling.generate(model, params, args.prompt.encode(), args.sample, args.temperature, args.seed)
        decoding = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, seed {args.seed}"
        print(f"--- sample at step {int(state['step'])}: prompt {args.prompt!r} + {args.sample} bytes, {decoding} ---")
        print(args.prompt + sample.decode("utf-8", errors="replace"))
    return dict(losses=losses, metrics=records, seconds=seconds, tokens_per_s=tokens_per_s, state=state,
                model=model, sample=sample)
