"""The single calibration pass: every unit's entry and exit streamed through
the similarity accumulators (pairwise CKA, entry-to-exit CKA, block
influence) and one batch kept for validation and pairing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from ..files.calibration import CalibrationSet
from ..progress import pause_point
from .activations import pass_rows
from .executor import Executor
from .similarity import MeanCosineDistance, MinibatchCKA
from ..units.discovery import PrunableUnit


@dataclass
class Evidence:
    """What one pass over the calibration set measured."""

    cka: np.ndarray  # (U, U) linear CKA between unit exits
    entry_exit_cka: np.ndarray  # (U,) CKA between each unit's entry and exit
    block_influence: np.ndarray  # (U,) mean 1 - cos(entry, exit) (ShortGPT)
    n_samples: int  # rows seen: inputs, or unpadded tokens for sequence models
    nonfinite_values: int
    batches: int
    # The graph outputs on the first batch (`calib.first(batch_size)`): the
    # original's outputs that validation compares the pruned model with.
    first_outputs: dict[str, np.ndarray] | None = None
    # Bytes per sample of every tensor the pass exposed and of the graph
    # outputs (measured on one sample; empty when run piecewise), and the
    # samples per run the activation budget allowed (`batch_size` or fewer).
    sizes: dict[str, int] = field(default_factory=dict)
    rows: int | None = None
    # Rows are tokens (token data whose unit tensors share one token layout), else samples.
    token_level: bool = False


def collect_evidence(
    model: onnx.ModelProto,
    calib: CalibrationSet,
    units: Sequence[PrunableUnit],
    *,
    batch_size: int,
    provider: str = "cpu",
    progress: Callable[[Iterator], Iterator] | None = None,
    executor: Executor = Executor.WHOLE,
    budget: int | None = None,
) -> Evidence:
    """One pass over `calib`; `Executor.PIECEWISE` runs the graph piece by
    piece (cut at unit exits, see `sequential.stream_sequential`) with the same result.
    `budget` (bytes) caps what one run holds (`activations.pass_rows`): a
    smaller run is a smaller CKA minibatch, so it is set only where needed."""
    exits = [u.exit for u in units]
    extra_entries = [e for e in dict.fromkeys(u.entry for u in units) if e not in exits]
    tracked = exits + extra_entries
    position = {name: i for i, name in enumerate(tracked)}
    cka = MinibatchCKA(len(tracked))
    influence = MeanCosineDistance(len(units))
    n_batches = 0
    first_outputs = None
    sizes: dict[str, int] = {}
    batches = executor.stream(model, calib, tracked, boundaries=exits, batch_size=batch_size, provider=provider,
                              progress=progress, budget=budget, sizes=sizes)
    # Rows are tokens where the first batch's tensors give one token layout (the
    # same number of token rows: not a text tower beside an image tower, as in CLIP).
    token_level = None
    for batch in batches:
        rows = None
        if token_level is None:
            token_level = calib.is_token_data
            if token_level:
                rows = {name: batch.samples(name, calib, True) for name in tracked}
                token_level = len({len(r) for r in rows.values()}) <= 1
        if rows is None or not token_level:
            rows = {name: batch.samples(name, calib, token_level) for name in tracked}
        cka.update([rows[name] for name in tracked])
        influence.update([rows[u.entry] for u in units], [rows[u.exit] for u in units])
        if n_batches == 0:
            first_outputs = dict(batch.outputs)
            pause_point("calibration")  # test hook: an interrupt in the middle of the pass
        n_batches += 1
    full = cka.result()
    U = len(units)
    entry_exit = np.array([full[position[u.entry], position[u.exit]] for u in units])
    return Evidence(
        cka=full[:U, :U],
        entry_exit_cka=entry_exit,
        block_influence=influence.result(),
        n_samples=cka.n_samples,
        nonfinite_values=cka.nonfinite_values,
        batches=n_batches,
        first_outputs=first_outputs,
        sizes=sizes,
        rows=pass_rows(sizes, budget, batch_size) if budget is not None and sizes else batch_size,
        token_level=bool(token_level),
    )
