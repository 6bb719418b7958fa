"""What `analyze` and `compress` return: the model, its units, the
selection and the report, and for `compress` the pruned model and where it
was written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .files.calibration import CalibrationSet
from .report.summary import analysis_summary, summary
from .selection.criteria import Selection
from .units.discovery import PrunableUnit


@dataclass
class Analysis:
    """Everything `analyze` finds; `compress` adds the pruned model and output paths."""

    model: onnx.ModelProto
    units: list[PrunableUnit]
    selection: Selection
    report: dict
    calib: CalibrationSet
    total_flops: int
    timings: dict[str, float] = field(default_factory=dict)
    # The file as loaded, when the patterns rewrote it into `model` (a fused
    # graph with its joins made visible); None when `model` is the file.
    source_model: onnx.ModelProto | None = None
    rewrites: list = field(default_factory=list)
    # The input's files: the model, then its external data files.
    input_files: list[Path] = field(default_factory=list)
    # The original's outputs on the first calibration batch, when the
    # calibration pass computed them (what validation compares with).
    first_outputs: dict | None = None
    validation_rows: int = 64  # samples of the validation run
    # The chosen removal set's repair (repair.stage.RepairOutcome); None with --repair none.
    repair: object | None = None

    @property
    def removed_units(self) -> list[PrunableUnit]:
        return [self.units[i] for i in self.selection.removed]

    def summary(self) -> str:
        """The analysis table, segments and removal suggestions, as printed by `sglp-onnx analyze`."""
        return analysis_summary(self.report)


@dataclass
class CompressionResult(Analysis):
    pruned: onnx.ModelProto | None = None
    output: Path | None = None
    report_path: Path | None = None

    def summary(self) -> str:
        """What was removed and what it saved, as printed by `sglp-onnx compress`."""
        return summary(self.report)
