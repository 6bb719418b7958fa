"""Real reports of the bundled 1-D CNN (models/cnn1d_radio.onnx), computed
once per test session and shared by the plot, analyze and schema tests.

Each accessor returns a deep copy, so a test may mutate what it gets.
"""

from __future__ import annotations

import atexit
import copy
import functools
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "cnn1d_radio.onnx"
RATIO = 0.3

_scratch = tempfile.TemporaryDirectory(prefix="sglp-test-reports-")
atexit.register(_scratch.cleanup)


@functools.lru_cache(maxsize=None)
def _compressed() -> dict:
    from sglp_onnx import compress

    out = Path(_scratch.name) / "cnn1d.pruned.onnx"
    return compress(MODEL, out, ratio=RATIO, criterion="sglp", force=True).report


@functools.lru_cache(maxsize=None)
def _dry_run() -> dict:
    from sglp_onnx import compress

    out = Path(_scratch.name) / "cnn1d.dry.onnx"
    return compress(MODEL, out, ratio=RATIO, criterion="sglp", dry_run=True).report


@functools.lru_cache(maxsize=None)
def _analyzed(criterion: str) -> dict:
    from sglp_onnx import analyze

    return analyze(MODEL, ratio=RATIO, criterion=criterion).report


def compress_report() -> dict:
    """`compress(..., ratio=0.3)` with SGLP (gradient-free importance)."""
    return copy.deepcopy(_compressed())


def dry_run_report() -> dict:
    """`compress(..., ratio=0.3, dry_run=True)`: everything but the files."""
    return copy.deepcopy(_dry_run())


def analyze_report(criterion: str = "sglp") -> dict:
    """`analyze(..., ratio=0.3)`: suggestions, no `after`; 'last' has no CKA."""
    return copy.deepcopy(_analyzed(criterion))
