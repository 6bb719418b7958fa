"""Writing a removal into the graph: the one bypass (the gated graph), the
removal itself, KV-cache bookkeeping, and the validation gate."""

from ..lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "gating": ["batched_suffix_model", "gate_graph", "gated_model", "suffix_model"],
    "remove": ["dropped_weight_inputs", "remove_units"],
    "kv_cache": [
        "CACHE_NAME", "genai_config_for_output", "genai_config_source", "genai_config_target", "genai_support_files", "kv_cache_record",
        "other_model_files", "rename_tensors", "renumber_kept_cache", "updated_genai_config",
    ],
    "validation": ["check_standalone", "validate", "validate_pruned", "validation_reference"],
})
