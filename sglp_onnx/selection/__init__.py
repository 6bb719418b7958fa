"""Choosing what to remove: the budget, the criteria (one file each), and
SGLP's Fisher segmentation and per-segment allocation."""

from ..lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "criteria": ["REGISTRY", "Context", "Criterion", "Selection", "get_criterion"],
    "budget": ["budget_to_count", "max_loss_count", "suggest_removals"],
    "segmentation": ["Segmentation", "fisher_segments", "segments_of"],
    "allocation": ["allocate", "choose_removals", "removal_count"],
})
