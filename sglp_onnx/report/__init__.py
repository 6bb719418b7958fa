"""The report: building it, printing it, its JSON Schema, and its plots."""

from ..lazy import lazy_exports

# `summary` itself is not re-exported: the name is its module's.
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "build": ["analysis_report"],
    "summary": ["analysis_summary", "fidelity_text", "human_bytes", "human_count", "report_schema", "to_json",
                "tool_info", "validate_report"],
    "plots": ["plot_format", "plot_report"],
})
