"""The training curve: ``loss.png`` from ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_loss_plot(metrics_path: Path, out: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = plot_losses(read_metrics(metrics_path), title)
    fig.savefig(out, dpi=120)
    plt.close(fig)
