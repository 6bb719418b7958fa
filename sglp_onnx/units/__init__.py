"""Finding prunable units: residual joins recognised by the patterns in
`patterns/`, grouped into layers, with what each unit owns."""

from ..lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "discovery": ["PrunableUnit", "discover", "find_units", "layer_key", "probe_targets", "residual_adds",
                  "shape_twin", "with_flops"],
})
