"""Orbax checkpoints, the settings a run's checkpoints were written with, and what a fresh run,
``--resume`` and ``--overwrite`` do to the output folder.

A folder holds one run: ``checkpoints/`` (orbax), ``config.json`` (the run's settings, written by
its first process when it starts), ``metrics.jsonl`` and ``loss.png``. A fresh run refuses a folder
that holds checkpoints unless told to overwrite them; ``--resume`` refuses a folder without one,
or one written with other model settings (named, before orbax is asked to restore), and cuts
``metrics.jsonl`` back to the step it restores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from . import UsageError

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
# The settings the train state's structure and shapes depend on: a checkpoint restores only into a
# run with the same (with --carry the carried memory is [batch, ...], so the batch size too).
STATE_SETTINGS = ("attention", "rule", "nu", "features", "depth", "dim", "heads", "head_dim", "ff_dim", "carry",
                  "gate")
# Settings added after runs were first saved, with the value every run saved before them had.
DEFAULTS_BEFORE_RECORDED = {"gate": False}


def checkpoint_manager(directory: Path, save_every: int) -> ocp.CheckpointManager:
    """Orbax saves and restores on every process together: each writes the shards it owns (one
    copy of a replicated array), the primary process the metadata."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=2,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def restore(manager: ocp.CheckpointManager, state: dict) -> dict:
    """The latest checkpoint, read straight into ``state``'s shapes and shardings; ``state`` if none."""
    step = manager.latest_step()
    if step is None:
        return state
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def saved_steps(directory: Path) -> list[int]:
    """The steps of the finished checkpoints in ``directory`` (orbax names each by its step;
    unfinished ones carry a temporary suffix), oldest first.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for name in ("6", "3", "9.orbax-checkpoint-tmp-1"):
    ...         (Path(folder) / name).mkdir()
    ...     saved_steps(Path(folder)), saved_steps(Path(folder) / "absent")
    ([3, 6], [])
    """
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.is_dir() and path.name.isdigit())


def _flag(name: str, value: Any) -> str:
    """How a setting is given on the command line.

    >>> _flag("head_dim", 16), _flag("carry", True), _flag("carry", False)
    ('--head-dim 16', '--carry', 'no --carry')
    """
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def state_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The state-shaping settings that differ between a checkpoint's run and this one, as
    ``"--dim 32 there, --dim 64 here"``; settings the saved run did not record are not compared,
    except those added later, which it had at their old default (``DEFAULTS_BEFORE_RECORDED``).

    >>> state_mismatches(dict(dim=32, depth=2, lr=1.0), dict(dim=64, depth=2, lr=2.0))
    ['--dim 32 there, --dim 64 here']
    >>> state_mismatches(dict(carry=True, batch_size=8), dict(carry=True, batch_size=16))
    ['--batch-size 8 there, --batch-size 16 here']
    >>> state_mismatches(dict(dim=32), dict(dim=32, gate=True))  # saved before --gate existed
    ['no --gate there, --gate here']
    """
    names = [*STATE_SETTINGS, *(["batch_size"] if current.get("carry") else [])]
    # A setting added after the run was saved (``gate``, say) had its default then.
    saved, current = ({**DEFAULTS_BEFORE_RECORDED, **settings} for settings in (saved, current))
    return [f"{_flag(name, saved[name])} there, {_flag(name, current[name])} here"
            for name in names if name in saved and saved[name] != current[name]]


def prepare_output(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool, lead: bool) -> None:
    """Check ``out`` for this run and get it ready, before any state is built.

    Fresh run: refused where ``out`` holds checkpoints, unless ``overwrite``, which deletes them
    with the old ``config.json``, ``metrics.jsonl`` and ``loss.png``; then ``settings`` are written
    to ``config.json``. ``resume``: refused without a checkpoint, or when ``config.json`` records
    other state-shaping settings (:data:`STATE_SETTINGS`). Raises :class:`UsageError`. Only the
    ``lead`` process writes; with several processes all wait for it.
    """
    directory = out / CHECKPOINTS
    steps = saved_steps(directory)
    if resume:
        if not steps:
            raise UsageError(f"--resume: no checkpoint in {directory}; start the run without --resume")
        config = out / CONFIG
        if config.exists():
            mismatches = state_mismatches(json.loads(config.read_text()), settings)
            if mismatches:
                raise UsageError(f"--resume: the checkpoint in {directory} (step {steps[-1]}) was written with "
                                 f"other model settings: {'; '.join(mismatches)} (give the same, or start "
                                 "over with --overwrite and without --resume)")
    else:
        if steps and not overwrite:
            raise UsageError(f"--out {out} holds another run's checkpoints (steps {', '.join(map(str, steps))}): "
                             "give --resume to continue that run, or --overwrite to delete them and start over")
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            if overwrite:
                shutil.rmtree(directory, ignore_errors=True)
                (out / PLOT).unlink(missing_ok=True)
            (out / METRICS).unlink(missing_ok=True)  # a fresh run's rows only
            (out / CONFIG).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("examples.lm.checkpoints.prepare_output")


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` after ``step`` (a crashed run logged past its last
    checkpoint; the resumed run logs those steps again). Returns how many rows were dropped."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
