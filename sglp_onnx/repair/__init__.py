"""Repair: a closed-form linear map at every cut of a removal.

A *cut* is a maximal run of consecutive removed units; bypassing it makes
the readers of its last exit read its first entry. Repair fits, on the
selection samples, the least-squares map (with bias, ridge-regularised)
from the cut's entry to the original network's value at its exit, and
inserts it at the cut (ReplaceMe, Shopkhoev et al. 2025; LinearPatch, Chen
et al. 2025; Prune&Comp, 2026), so the pruned model needs no fine-tuning to
recover most of what the removal cost.

- `cuts`: the cuts of a removal set and the channel axis each map acts on.
- `fit`: the streamed normal equations of one map (float64 sums).
- `graph`: the maps as nodes in the graph (a 1x1 Conv, MatMul + Add, or a
  per-channel scale and bias; dequantized and requantized for quantized
  activations).
- `plan`: fitting every cut of a removal set, front to back on the pruned
  model's own entries, and the report's records.
"""

from ..lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "cuts": ["Cut", "channel_axis", "cuts_of"],
    "fit": ["FORMS", "LinearFit", "apply_fitted", "as_rows"],
    "graph": ["add_runtime_maps", "runtime_map_inputs", "stored", "strip_repairs", "with_repairs"],
    "plan": ["DEFAULT_REPAIR", "REPAIR_CHOICES", "Repair", "fit_repairs", "repair_records"],
    "stage": ["RepairOutcome", "repair_removal", "repaired_pruned"],
})
