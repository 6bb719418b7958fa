"""What a run shows while it works: the caller's `progress` wraps long loops
(`progress(iterable, label)`, sized iterables give a total), and, when it has
a `stage` attribute (the CLI's terminal display), each stage says what it is
doing while it runs."""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
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


# Off a terminal, a line at most this often (seconds; the first after as long
# into the run). SGLP_ONNX_PROGRESS_SECONDS sets it (tests keep pipes quiet).
LINE_EVERY = 10.0
LINE_EVERY_ENV = "SGLP_ONNX_PROGRESS_SECONDS"


class LineProgress:
    """Progress for a pipe or a log: one plain line on `stream`, at most every
    `every` seconds, saying which stage runs and how far its loop is; a run
    shorter than `every` prints nothing."""

    def __init__(self, stream, every: float | None = None) -> None:
        if every is None:
            every = float(os.environ.get(LINE_EVERY_ENV) or LINE_EVERY)
        self.stream, self.every = stream, every
        self.began = self.last = time.monotonic()
        self.label = "starting"

    def __call__(self, iterable, label: str):
        total = len(iterable) if hasattr(iterable, "__len__") else None
        for done, item in enumerate(iterable):
            self.tick(f"{label} {done}/{total}" if total is not None else f"{label} {done}")
            yield item

    @contextmanager
    def stage(self, label: str) -> Iterator[None]:
        self.label = label
        self.tick(None)
        yield

    def tick(self, where: str | None) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        detail = f" ({where})" if where else ""
        self.stream.write(f"sglp-onnx: {self.label}{detail}, {now - self.began:.0f} s in\n")
        self.stream.flush()


class Stages:
    """A run's stages one after another: `start(name)` ends the previous one
    (its seconds go to `timings[name]`, as `clocked` counts them) and shows
    the new one; `stop()` ends the last."""

    def __init__(self, progress: Progress | None, timings: dict[str, float]) -> None:
        self.progress, self.timings = progress, timings
        self._current: ExitStack | None = None

    def start(self, name: str) -> None:
        self.stop()
        current = ExitStack()
        current.enter_context(clocked(self.timings, name))
        current.enter_context(stage(self.progress, name))
        self._current = current

    def stop(self) -> None:
        if self._current is not None:
            current, self._current = self._current, None
            current.close()


# Test hook: SGLP_ONNX_PAUSE_AT=POINT[:SECONDS] stops at the start of a stage
# (load, discovery, pairing, selection, surgery, validation, write), after
# the calibration pass's first batch ("calibration") or at "rename" (every
# output complete in its temporary file), says so on stderr and waits there,
# so that tests can act at a known point whatever the machine's speed. It
# waits until the file SGLP_ONNX_RESUME names exists (when set), else for
# SECONDS (default 60): a bound for a test that never acts, not a deadline.
PAUSE_ENV = "SGLP_ONNX_PAUSE_AT"
RESUME_ENV = "SGLP_ONNX_RESUME"


def pause_point(point: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name != point:
        return
    print(f"sglp-onnx: paused at {point}", file=sys.stderr, flush=True)
    limit = time.monotonic() + float(seconds or 60)
    resume = os.environ.get(RESUME_ENV)
    if not resume:
        time.sleep(float(seconds or 60))
        return
    while not os.path.exists(resume) and time.monotonic() < limit:
        time.sleep(0.05)


@contextmanager
def timed(timings: dict[str, float], name: str, progress: Progress | None = None) -> Iterator[None]:
    """Stage `name` of a run: a test may pause at its start (`pause_point`),
    `progress` shows it while it runs, and its seconds are added to
    `timings[name]` (`clocked`)."""
    pause_point(name)
    with clocked(timings, name), stage(progress, name):
        yield


@contextmanager
def clocked(timings: dict[str, float], name: str) -> Iterator[None]:
    """The one clock of a run's stages: the block's seconds are added to
    `timings[name]` (a stage entered twice adds up), less the seconds that
    stages clocked inside it added to `timings` (the calibration pass a
    criterion runs is calibration time, not selection time)."""
    def others() -> float:
        return sum(v for k, v in timings.items() if k != name)

    start, before = time.perf_counter(), others()
    try:
        yield
    finally:
        inner = others() - before
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start - inner
