"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_runs import Workspace
from tiny_graphs import write_model_and_calibration


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A residual MLP and its calibration in tmp_path/in, an empty output folder tmp_path/out."""
    model, calib = write_model_and_calibration(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    return Workspace(tmp_path, model, calib, out)
