"""How a run executes the original model while it measures: whole (one ONNX
Runtime session on the whole graph, the default) or piecewise
(`--sequential`: the graph cut at unit boundaries and run one piece at a
time, see sequential.py, so that ONNX Runtime holds one piece's weights).

The stages that run the original model (discovery's probe, the calibration
pass, the held-out fidelity, validation's reference) take an `Executor`
instead of a flag; the calls that differ between the two are here.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx


class Executor(Enum):
    WHOLE = "whole"
    PIECEWISE = "piecewise"

    @classmethod
    def of(cls, sequential: bool) -> Executor:
        """The executor of the `sequential` option (`--sequential`, the API's `sequential=`)."""
        return cls.PIECEWISE if sequential else cls.WHOLE

    @property
    def piecewise(self) -> bool:
        return self is Executor.PIECEWISE

    def probe_shapes(self, model: onnx.ModelProto, feed: dict[str, np.ndarray], names: Sequence[str], *,
                     provider: str) -> tuple[dict, dict]:
        """Shapes and dtypes of `names` on `feed` (`activations.probe_shapes`)."""
        if self.piecewise:
            from .sequential import probe_shapes_sequential

            return probe_shapes_sequential(model, feed, names, provider=provider)
        from .activations import probe_shapes

        return probe_shapes(model, feed, names, provider=provider)

    def stream(self, model: onnx.ModelProto, calib, names: Sequence[str], *, boundaries: Sequence[str],
               batch_size: int, provider: str, progress: Callable[[Iterator], Iterator] | None = None,
               budget: int | None = None, sizes: dict[str, int] | None = None) -> Iterator:
        """Batches of the tensors `names` and the graph outputs over `calib`
        (`activations.Batch`). Whole: `budget` caps the rows of a run and
        `sizes` receives the bytes per sample (`activations.stream`);
        piecewise: cut after each of `boundaries` (`sequential.stream_sequential`),
        one batch of `batch_size` at a time, `budget` and `sizes` unused."""
        if self.piecewise:
            from .sequential import stream_sequential

            return stream_sequential(model, calib, names, boundaries=boundaries, batch_size=batch_size,
                                     provider=provider, progress=progress)
        from .activations import stream

        return stream(model, calib, names, batch_size=batch_size, provider=provider, progress=progress,
                      budget=budget, sizes=sizes)
