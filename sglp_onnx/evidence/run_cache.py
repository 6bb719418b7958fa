"""Runs kept between uses while they fit a byte limit: a greedy search's
references and current runs (`selection.criteria.search`), the original's
held-out output between removal sets (`held_out.HeldOut`)."""

from __future__ import annotations

import numpy as np


class RunCache:
    """Runs (an array, or a dict of them) kept by their piece's first sample
    while together they fit `limit` bytes; a run that does not fit is
    recomputed on every use. `whole`: every run or none (once one does not
    fit, none is kept), so that a search's recomputing costs whole passes."""

    def __init__(self, limit: int, *, whole: bool = False) -> None:
        self.limit = limit
        self.whole = whole
        self.clear()

    def get(self, start: int, compute):
        if start in self.kept:
            return self.kept[start]
        value = compute()
        if self.closed:
            return value
        size = value.nbytes if isinstance(value, np.ndarray) else sum(v.nbytes for v in value.values())
        if self.bytes + size <= self.limit:
            self.kept[start] = value
            self.bytes += size
        elif self.whole:
            self.clear()
            self.closed = True
        return value

    def clear(self) -> None:
        self.kept: dict[int, object] = {}
        self.bytes = 0
        self.closed = False  # `whole` and a run did not fit: none is kept any more
