"""Byte-level language model with DPFPformer: real Flax training code, on one device or many.

Embedding -> DPFPformer (or Flax's causal softmax attention as the baseline) -> LM head, trained
with AdamW (warmup + cosine decay, gradient clipping) in a jitted step, data-parallel over every
device through a ``jax.sharding.Mesh`` with a batch axis: the same command uses 1 CPU, 8 host
devices, a GPU, a TPU slice, or several machines (one process each, see below).

    python examples/train_lm.py --steps 300 --out out/lm                     # default corpus, CPU-sized
    python examples/train_lm.py --preset paper-small --steps 20000 --out out/lm-gpu   # the paper's LM size
    python examples/train_lm.py --attention linear --rule sum --out out/lm-linear
    python examples/train_lm.py --carry --out out/lm-carry                   # fast weights across segments
    python examples/train_lm.py --context-parallel 4 --out out/lm-cp         # each sequence over 4 devices
    python examples/train_lm.py --resume --steps 600 --out out/lm            # continue from the checkpoint
    python examples/train_lm.py --sample 200 --steps 0 --resume --out out/lm  # generate from a checkpoint

Several processes (machines, or processes on one machine) run jax's own multi-controller engine:
start the same command once per process with ``--coordinator-address HOST:PORT --num-processes N
--process-id I`` (or ``--distributed`` alone under SLURM, Open MPI, Kubernetes or a Cloud TPU, where
``jax.distributed.initialize`` reads them from the environment). The mesh spans every process's
devices, each process builds only its rows of the global batch, orbax writes one checkpoint
together, and process 0 alone writes ``metrics.jsonl`` and ``loss.png`` and prints. ``--out`` must
be a folder every process sees.

``--context-parallel N`` splits each window's sequence over N devices (context parallelism): the
mesh becomes ``(batch, seq)`` of ``(devices / N, N)`` and the layers get ``context_axis="seq"``,
so each device holds and computes a slice of every sequence; the losses are those of the run
without it. ``--seq-len`` must be divisible by N and N must divide the devices; softmax attention
is refused.

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
``loss.png``; orbax checkpoints under ``checkpoints/`` every ``--save-every`` steps, and
``config.json``, the run's settings. Without ``--log-every`` and ``--eval-every`` both scale with
``--steps`` (a 100th and a 10th of it). A folder holds one run: a fresh run refuses a folder with
checkpoints unless ``--overwrite`` (which deletes them); ``--resume`` refuses a folder without a
checkpoint or with one of other model settings (named), and cuts ``metrics.jsonl`` back to the
step it restores, so rows logged after the last checkpoint of a crashed run are not doubled.

``tokens_per_s`` counts training steps only: tokens trained in the row's steps over the time those
steps took, each from building its batch to its loss on the host. Compilation (done ahead of the
first step), evaluation, checkpointing, logging and sampling are outside it; the run's totals for
each are printed at the end.

``--sample N`` prints N bytes decoded token by token with the recurrent decode cache (constant
work per token; softmax attention re-runs the growing context instead), under a header naming the
prompt and the decoding settings.

Every setting is checked before the run starts: a value out of range, a flag the chosen attention
does not use, a missing ``--data`` file, a batch the devices cannot share, ... end with one line
naming the flag and exit status 2. The code is in ``examples/lm/``: ``input_pipeline``,
``models``, ``train``, ``checkpoints``, ``sampling``, ``plotting``; this file is the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax

import dpfp_jax as dj

if __package__:  # imported as examples.train_lm (the tests), or run as python -m examples.train_lm
    from .arguments import HelpFormatter, integer, real
    from .lm import UsageError
    from .lm.input_pipeline import MIN_CORPUS_BYTES, SEPARATOR
    from .lm.models import ATTENTIONS, ByteLM
    from .lm.train import Trainer, build, make_optimizer, train_and_evaluate
else:  # python examples/train_lm.py: Python puts examples/ first on the module path
    from arguments import HelpFormatter, integer, real
    from lm import UsageError
    from lm.input_pipeline import MIN_CORPUS_BYTES, SEPARATOR
    from lm.models import ATTENTIONS, ByteLM
    from lm.train import Trainer, build, make_optimizer, train_and_evaluate

# The model, optimiser and trainer are what the TPU compile test builds from a parsed command line.
__all__ = ["ByteLM", "PRESETS", "Trainer", "build", "build_parser", "main", "make_optimizer", "parse_args"]

PRESETS = {
    # The paper's small language model (Sec. 6.2): 16 layers, width 128, 8 heads of 16, ff 2048.
    "paper-small": dict(depth=16, dim=128, heads=8, head_dim=16, ff_dim=2048, seq_len=256, batch_size=96),
    # Small enough for a 2-core CPU: a few hundred steps in minutes.
    "cpu": dict(depth=2, dim=64, heads=4, head_dim=16, ff_dim=256, seq_len=64, batch_size=16),
}
# Flags whose default is filled in after parsing, so that one given where it does nothing is
# refused (not ignored): the value, and which runs use it.
FALLBACKS: dict[str, tuple[Any, str]] = {
    "rule": ("delta", "fast-weight attentions (not softmax)"),
    "nu": (1, "--attention dpfp"),
    "features": (64, "--attention favor"),
    "impl": ("auto", "fast-weight attentions (not softmax)"),
    "prompt": ("def ", "--sample"),
    "temperature": (0.0, "--sample"),
}


def _unused(args: argparse.Namespace) -> list[str]:
    """The fallback flags given on the command line that this run would not use."""
    used = dict(rule=args.attention != "softmax", nu=args.attention == "dpfp", features=args.attention == "favor",
                impl=args.attention != "softmax", prompt=args.sample > 0, temperature=args.sample > 0)
    return [name for name in FALLBACKS if getattr(args, name) is not None and not used[name]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (required)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in an --out that holds checkpoints, deleting them")
    parser.add_argument("--data", type=Path, default=None,
                        help="a text file, read as bytes (default: this Python's standard-library sources)")
    parser.add_argument("--corpus-bytes", type=integer(MIN_CORPUS_BYTES), default=2_000_000,
                        help="bytes of the corpus used")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model and batch sizes")
    parser.add_argument("--attention", choices=ATTENTIONS, default="dpfp", help="attention of every layer")
    parser.add_argument("--rule", choices=dj.RULES, default=None,
                        help="fast-weight update rule (default: delta; not with softmax)")
    parser.add_argument("--nu", type=integer(1), default=None, help="DPFP's nu (default: 1; dpfp only)")
    parser.add_argument("--gate", action="store_true",
                        help="Gated DeltaNet's per-step decay in every fast-weight layer (delta rule)")
    parser.add_argument("--features", type=integer(1), default=None,
                        help="FAVOR+'s random features m (default: 64; favor only)")
    parser.add_argument("--impl", choices=dj.IMPLS, default=None,
                        help="fast-weight implementation (default: auto; not with softmax)")
    for name in ("depth", "dim", "heads", "head-dim", "ff-dim", "seq-len", "batch-size"):
        key = name.replace("-", "_")
        sizes = ", ".join(f"{preset} {values[key]}" for preset, values in sorted(PRESETS.items()))
        what = "global batch, over all processes" if name == "batch-size" else "overrides the preset"
        parser.add_argument(f"--{name}", type=integer(1), default=None,
                            help=f"{what} (default: the preset's: {sizes})")
    parser.add_argument("--steps", type=integer(0), default=300,
                        help="length of the run and of its LR schedule (0: only with --resume, e.g. to sample)")
    parser.add_argument("--stop-at", type=integer(1), default=None,
                        help="stop (and checkpoint) at this step, at most --steps, e.g. to fit a time slot; "
                             "--resume goes on (default: --steps)")
    parser.add_argument("--lr", type=real(0.0, inclusive=False), default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=integer(0), default=50, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=real(0.0), default=0.01, help="AdamW's weight decay")
    parser.add_argument("--clip", type=real(0.0, inclusive=False), default=1.0,
                        help="gradient clipping by global norm")
    parser.add_argument("--carry", action="store_true", help="carry fast weights across consecutive segments")
    parser.add_argument("--context-parallel", type=integer(1), default=1,
                        help="split each window's sequence over N devices (context parallelism: a (batch, seq) "
                             "mesh of devices / N x N; --seq-len divisible by N; fast-weight attention only)")
    parser.add_argument("--pack", action="store_true",
                        help=f"pack documents (each source file, led by the byte {SEPARATOR:#04x}; with --data, "
                             f"its {SEPARATOR:#04x} bytes start documents) and train and validate with segment ids")
    parser.add_argument("--eval-every", type=integer(1), default=None,
                        help="validate every N steps and at the last (default: --steps // 10, at least 1)")
    parser.add_argument("--log-every", type=integer(1), default=None,
                        help="a metrics row every N steps (default: --steps // 100, at least 1)")
    parser.add_argument("--eval-windows", type=integer(1), default=32, help="validation windows of --seq-len bytes")
    parser.add_argument("--save-every", type=integer(1), default=100, help="checkpoint interval in steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--sample", type=integer(0), default=0, help="bytes to generate at the end")
    parser.add_argument("--prompt", default=None, help="the sample's prompt (default: 'def '; with --sample)")
    parser.add_argument("--temperature", type=real(0.0), default=None,
                        help="sampling temperature; 0 is greedy (default: 0; with --sample)")
    parser.add_argument("--seed", type=integer(0), default=0, help="initialisation, data order and sampling")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("several processes (jax.distributed.initialize)")
    group.add_argument("--coordinator-address", default=None,
                       help="HOST:PORT of process 0, the same for every process (default: single process)")
    group.add_argument("--num-processes", type=integer(1), default=None, help="number of processes (default: 1)")
    group.add_argument("--process-id", type=integer(0), default=None,
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


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the parsed flags together (one line naming the flags), or None.

    Each flag's own range is checked by its argparse type; this checks the combinations and the
    files, before any JAX work.
    """
    unused = _unused(args)
    if unused:
        name = unused[0]
        has = f"--sample {args.sample}" if FALLBACKS[name][1] == "--sample" else f"--attention {args.attention}"
        return f"--{name} applies only to {FALLBACKS[name][1]}; this run has {has}"
    if args.steps == 0 and not args.resume:
        return "--steps 0 trains nothing: give --resume to sample from a checkpoint, or at least 1 step"
    if args.stop_at is not None and args.stop_at > args.steps:
        return f"--stop-at {args.stop_at} is past --steps {args.steps}"
    if args.resume and args.overwrite:
        return "--resume and --overwrite cannot be combined: --overwrite deletes the checkpoints --resume reads"
    if args.gate and (args.attention == "softmax" or args.rule == "sum"):
        return ("--gate adds Gated DeltaNet's decay to the delta rule's fast-weight layers; this run has "
                + ("--attention softmax" if args.attention == "softmax" else "--rule sum"))
    if args.carry and args.attention == "softmax":
        return "--carry carries fast weights; softmax attention has none"
    if args.carry and args.pack:
        return "--carry and --pack cannot be combined: the carried memory would cross documents"
    if args.context_parallel > 1 and args.attention == "softmax":
        return (f"--context-parallel {args.context_parallel} splits the fast-weight attentions' sequence; "
                "softmax attention has no context-parallel form here")
    if args.data is not None and not args.data.is_file():
        return f"--data {args.data}: no such file"
    if args.sample and args.prompt == "":  # None: the fallback fills it in
        return "--prompt must hold at least one byte for --sample"
    if args.process_id is not None and args.num_processes is not None and args.process_id >= args.num_processes:
        return f"--process-id must be in [0, {args.num_processes}); got {args.process_id}"
    if args.coordinator_address is not None:
        host, _, port = args.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"--coordinator-address must be HOST:PORT; got {args.coordinator_address!r}"
    return None


def parse_args(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line, checked (an argparse error, exit status 2, names the flag) and with every
    default filled in: the preset's sizes, the intervals, the fallbacks of :data:`FALLBACKS`."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, (value, _) in FALLBACKS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seq_len % args.context_parallel:  # the preset's --seq-len is known only now
        parser.error(f"--seq-len {args.seq_len} must be divisible by --context-parallel {args.context_parallel}")
    args.eval_every, args.log_every = default_intervals(args.steps, args.eval_every, args.log_every)
    return args


def initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when any of the process flags (or ``--distributed``) is given.

    Flags left out are detected by jax from the cluster's environment, where it knows one.
    """
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if args.distributed or any(flag is not None for flag in flags):
        jax.distributed.initialize(*flags)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (and sample) as the command line says; see :func:`examples.lm.train.train_and_evaluate`
    for what it returns. A setting found unusable once the data and devices are known (a short
    corpus, a batch the devices cannot share, an --out holding another run) is an argparse error
    too."""
    parser = build_parser()
    args = parse_args(argv, parser)
    initialize_distributed(args)
    try:
        return train_and_evaluate(args)
    except UsageError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
