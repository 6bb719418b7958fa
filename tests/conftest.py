"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Off a terminal the CLI prints a progress line every few seconds of a long
# run; a loaded machine would make that depend on its speed, so tests run with
# none unless a test asks (test_analyze's progress-line test sets it to 0).
os.environ["SGLP_ONNX_PROGRESS_SECONDS"] = "1e9"

from cli_runs import Workspace
from tiny_graphs import write_model_and_calibration


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A residual MLP and its calibration in tmp_path/in, an empty output folder tmp_path/out."""
    model, calib = write_model_and_calibration(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    return Workspace(tmp_path, model, calib, out)
