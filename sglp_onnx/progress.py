"""What a run shows while it works: the caller's `progress` wraps long loops
(`progress(iterable, label)`, sized iterables give a total), and, when it has
a `stage` attribute (the CLI's terminal display), each stage says what it is
doing while it runs."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

Progress = Callable[[Iterator, str], Iterator]

STAGE_LABELS = {
    "load": "loading the model and calibration data",
    "discovery": "finding residual units (one probe run)",
    "pairing": "pairing the torch model with the units",
    "selection": "choosing units",
    "suggestions": "working out removal suggestions",
    "fidelity": "measuring held-out fidelity",
    "repair": "fitting a repair map at every cut",
    "plot": "plotting",
    "surgery": "removing units",
    "validation": "validating the pruned model",
    "write": "writing the outputs",
    "train": "fine-tuning",
    "export": "exporting the fine-tuned model to ONNX",
    "eval": "evaluating",
}


def stage(progress: Progress | None, name: str):
    """A context in which `progress` (when it can) shows that stage `name` runs."""
    announce = getattr(progress, "stage", None)
    return nullcontext() if announce is None else announce(STAGE_LABELS.get(name, name))


# The stream a stage label is showing on, if any (one line at a time).
_showing: dict[str, object] = {"stream": None}


@contextmanager
def terminal_stage(stream, label: str) -> Iterator[None]:
    """`label…` on the terminal while the stage runs, cleared when it ends."""
    clear_status()
    stream.write(f"{label}…")
    stream.flush()
    _showing["stream"] = stream
    try:
        yield
    finally:
        clear_status()


def clear_status() -> None:
    """Erase a stage label still showing (before an error message, say)."""
    stream = _showing["stream"]
    if stream is not None:
        stream.write("\r\033[K")
        stream.flush()
        _showing["stream"] = None


class Stages:
    """A run's stages one after another: `start(name)` ends the previous one
    (its seconds go to `timings[name]`) and shows the new one; `stop()` ends
    the last."""

    def __init__(self, progress: Progress | None, timings: dict[str, float]) -> None:
        self.progress, self.timings = progress, timings
        self._current: tuple[str, float, object] | None = None

    def start(self, name: str) -> None:
        self.stop()
        shown = stage(self.progress, name)
        shown.__enter__()
        self._current = (name, time.perf_counter(), shown)

    def stop(self) -> None:
        if self._current is not None:
            name, began, shown = self._current
            self._current = None
            shown.__exit__(None, None, None)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - began
