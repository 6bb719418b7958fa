"""Measuring: the run's measuring context (`Context`), how it executes the
model (`Executor`: whole or piecewise), the gated graph's runners, the
calibration pass and what is measured on it: activations, similarities (CKA,
block influence), fidelity of a removal set, task metrics."""

from ..lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "context": ["Context"],
    "executor": ["Executor"],
    "gated_runner": ["REFERENCE_CACHE_BYTES", "SUFFIX_BUDGET_BYTES", "GatedRunner"],
    "activations": ["as_samples", "probe", "probe_shapes"],
    "calibration_pass": ["Evidence", "collect_evidence"],
    "similarity": ["MeanCosineDistance", "MinibatchCKA"],
    "fidelity": ["FidelityMeter", "OutputKind", "fidelity_record", "measure_sets", "measure_sets_sequential",
                 "output_kind"],
    "metrics": ["evaluate", "format_metrics", "measure"],
    "sequential": ["probe_sequential", "probe_shapes_sequential", "residual_boundaries"],
})
