"""Layer-selection criteria, one module each; every module in this package
is imported so that a new criterion is a single new file."""

import importlib
import pkgutil

from ...errors import UserError
from ...evidence import Context  # re-exported: what every Criterion.select reads
from .base import REGISTRY, Criterion, Selection, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_criterion(name: str) -> Criterion:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise UserError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(REGISTRY))}") from None


def checked_criterion(opts) -> Criterion:
    """The criterion `opts.criterion` names (`options.SelectionOptions`),
    refused with options it cannot honour before any work."""
    chosen = get_criterion(opts.criterion)
    if opts.segments is not None and not chosen.uses_segments:
        raise UserError(f"--segments K sets the Fisher segments of --criterion sglp; --criterion {opts.criterion} "
                        "does not segment")
    if chosen.needs_torch and opts.torch_model is None:
        raise UserError(f"--criterion {opts.criterion} needs gradients: pass the paired torch model with "
                        "--torch-model MODULE:FACTORY (and --torch-weights FILE)")
    return chosen


def needs_calibration(chosen: Criterion, opts) -> bool:
    """Whether synthetic inputs would not do: the criterion measures on real
    data, the torch model is paired on it, or --max-loss reads its fidelity."""
    return chosen.needs_calibration or opts.torch_model is not None or opts.max_loss is not None


__all__ = ["REGISTRY", "Context", "Criterion", "Selection", "checked_criterion", "get_criterion",
           "needs_calibration", "register"]
