"""The corpus as bytes, packed documents, and the windows the training and validation steps read."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from . import UsageError

SEPARATOR = 0x1E  # ASCII record separator: starts every packed document
MIN_CORPUS_BYTES = 1024


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
    """The corpus as ``int32`` bytes: ``data``'s first ``max_bytes`` or the default corpus.

    Raises :class:`UsageError` (naming the flag) for a corpus under :data:`MIN_CORPUS_BYTES` and
    for ``pack`` with a ``data`` file that holds no :data:`SEPARATOR`: it would be one document.
    """
    if data is not None:
        text = data.read_bytes()[:max_bytes]
        if pack and SEPARATOR not in text:
            raise UsageError(f"--pack: --data {data} holds no separator byte {SEPARATOR:#04x} in its first "
                             f"{len(text)} bytes, so it would train as one document; put {SEPARATOR:#04x} "
                             "before each document or leave out --pack")
    else:
        text = packed_corpus(max_bytes) if pack else default_corpus(max_bytes)
    if len(text) < MIN_CORPUS_BYTES:
        source = f"--data {data}" if data is not None else "the default corpus"
        raise UsageError(f"--corpus-bytes/--data: the corpus needs at least {MIN_CORPUS_BYTES} bytes; "
                         f"{source} gives {len(text)}")
    return np.frombuffer(text, np.uint8).astype(np.int32)


def document_ids(corpus: np.ndarray) -> np.ndarray:
    """Each byte's document: a new one starts at every :data:`SEPARATOR` byte.

    >>> document_ids(np.array([97, SEPARATOR, 98, 99, SEPARATOR, SEPARATOR, 100])).tolist()
    [0, 1, 1, 1, 2, 3, 3]
    """
    return np.cumsum(corpus == SEPARATOR, dtype=np.int32)


def split(corpus: np.ndarray, valid_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The training part and the last ``valid_fraction`` (validation).

    >>> [part.tolist() for part in split(np.arange(10), 0.2)]
    [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]
    """
    cut = int(len(corpus) * (1 - valid_fraction))
    return corpus[:cut], corpus[cut:]


def check_sizes(train: np.ndarray, valid: np.ndarray, batch_size: int, seq_len: int, carry: bool) -> None:
    """Raise :class:`UsageError` unless both splits hold a window of ``seq_len + 1`` bytes with room
    to place it (and, with ``carry``, ``batch_size`` streams of at least one segment each).

    >>> check_sizes(np.zeros(1000), np.zeros(50), 8, 64, carry=False)
    Traceback (most recent call last):
    ...
    examples.lm.UsageError: --seq-len 64: the validation split holds 50 bytes, fewer than the 66 a window needs ...
    """
    for name, part in (("training", train), ("validation", valid)):
        if len(part) < seq_len + 2:
            raise UsageError(f"--seq-len {seq_len}: the {name} split holds {len(part)} bytes, fewer than the "
                             f"{seq_len + 2} a window needs (a smaller --seq-len, or more --corpus-bytes)")
    if carry and (len(train) // batch_size - 1) // seq_len < 1:
        raise UsageError(f"--carry: the training split ({len(train)} bytes) is too short for --batch-size "
                         f"{batch_size} streams of --seq-len {seq_len}-byte segments")


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
