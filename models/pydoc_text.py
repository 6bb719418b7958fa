"""CPython's own documentation text as a small, offline language-modelling corpus.

The text is `pydoc_data.topics.topics` (ships with every CPython), split by
topic into train and held-out parts, and tokenised at the byte level so no
vocabulary file is needed.
"""

from __future__ import annotations

import numpy as np
from pydoc_data.topics import topics as _TOPICS

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259

# Every tenth topic in sorted order is held out. Splitting by topic (not by
# position in one long string) keeps held-out text about subjects the model
# never read, so perplexity measures generalisation rather than recall.
HELD_OUT_EVERY = 10


def encode(text: str) -> list[int]:
    """UTF-8 bytes of `text` as token ids 0..255 (no specials added)."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Inverse of `encode`; special ids are dropped and broken UTF-8 is replaced."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def split_topics() -> tuple[list[str], list[str]]:
    """(train topic names, held-out topic names), both sorted."""
    names = sorted(_TOPICS)
    held = [n for i, n in enumerate(names) if i % HELD_OUT_EVERY == 0]
    train = [n for i, n in enumerate(names) if i % HELD_OUT_EVERY != 0]
    return train, held


def token_stream(split: str) -> np.ndarray:
    """All topics of `split` ("train" or "heldout") as one int64 stream.

    Each topic is wrapped in BOS ... EOS so a window that crosses a topic
    boundary still shows the model where one document ends.
    """
    train, held = split_topics()
    names = {"train": train, "heldout": held}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    ids: list[int] = []
    for name in names:
        ids.append(BOS_ID)
        ids.extend(encode(_TOPICS[name]))
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int64)


def fixed_windows(stream: np.ndarray, seq_len: int, limit: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows of `seq_len` tokens (the tail is dropped)."""
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit)
    return stream[: n * seq_len].reshape(n, seq_len).copy()
