"""Layer-selection criteria, one module each; every module in this package
is imported so that a new criterion is a single new file."""

import importlib
import pkgutil

from ...errors import UserError
from .base import REGISTRY, Context, Criterion, Selection, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_criterion(name: str) -> Criterion:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise UserError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "Context", "Criterion", "Selection", "get_criterion", "register"]
