"""sglp-onnx: remove whole residual layers from ONNX models.

Public API: `compress`, `analyze`, `evaluate`, `bench`, `export_torch`, and the
`UserError` raised for every problem the caller can fix.
"""

from .errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__"]
