"""Commands beside compress: the latency bench, fine-tuning and export (the
metrics of `sglp-onnx eval` live in `evidence.metrics`)."""

from ..lazy import lazy_exports

# `bench` and `finetune` themselves are not re-exported: the names are their
# modules'; the API has them as `sglp_onnx.bench` and `sglp_onnx.finetune`.
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "bench": ["BenchResult", "format_results"],
    "calib": ["SOURCE_SUFFIXES", "calibration_data", "make_calibration"],
    "export.torch_export": ["export_torch", "load_torch_model"],
    "export.hf": ["export_hf"],
    "finetune": ["FinetuneResult"],
})
