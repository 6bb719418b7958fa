"""sglp-onnx: remove whole residual layers from ONNX models.

Public API, mirroring the command line: `compress`, `analyze`, `evaluate`,
`bench`, `export_torch`, `finetune`, `make_calibration`; their results (`CompressionResult`,
`Analysis`, `FinetuneResult`, `PrunableUnit`); `validate_report` and
`plot_report` for saved reports; and the `UserError` raised for every
problem the caller can fix. Everything but `UserError` is imported on first
use, so `import sglp_onnx` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UserError

__version__ = "0.2.0"

# name -> (module, attribute). Imported on first use: `import sglp_onnx`
# stays cheap (no onnx, onnxruntime, torch or matplotlib until needed).
_LAZY: dict[str, tuple[str, str]] = {
    "compress": ("pipeline", "compress"),
    "analyze": ("pipeline", "analyze"),
    "Analysis": ("pipeline", "Analysis"),
    "CompressionResult": ("pipeline", "CompressionResult"),
    "evaluate": ("evidence.metrics", "evaluate"),
    "bench": ("tools.bench", "bench"),
    "export_torch": ("tools.export.torch_export", "export_torch"),
    "finetune": ("tools.finetune", "finetune"),
    "FinetuneResult": ("tools.finetune", "FinetuneResult"),
    "make_calibration": ("tools.calib", "make_calibration"),
    "PrunableUnit": ("units.discovery", "PrunableUnit"),
    "validate_report": ("report.summary", "validate_report"),
    "plot_report": ("report.plots", "plot_report"),
}

if TYPE_CHECKING:
    from .tools.bench import bench
    from .evidence.metrics import evaluate
    from .tools.export.torch_export import export_torch
    from .tools.calib import make_calibration
    from .tools.finetune import FinetuneResult, finetune
    from .pipeline import Analysis, CompressionResult, analyze, compress
    from .report.plots import plot_report
    from .report.summary import validate_report
    from .units.discovery import PrunableUnit


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    try:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{module}":
            raise
        raise AttributeError(f"{__name__}.{name} is not available: this installation has no "
                             f"{__name__}.{module} module") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["UserError", "__version__", *_LAZY]
