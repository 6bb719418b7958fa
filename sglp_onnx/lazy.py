"""How a stage folder's `__init__` re-exports its names without importing
them: each is imported from its module on first use (PEP 562), so importing
one module of a stage never imports its siblings (ONNX Runtime, torch or
matplotlib stay out until needed) and the faces cannot form import cycles."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` of the package `package`, which
    re-exports `exports` (a module, relative to `package` -> the names it gives).

    A name is looked up in its module when first asked for, then kept on the
    package. No name may be a submodule's (importing the submodule would
    replace it on the package).
    """
    where: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if name in where:
                raise ValueError(f"{package}: {name!r} is re-exported from both {where[name]} and {module}")
            where[name] = module

    def __getattr__(name: str) -> Any:
        try:
            module = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return list(where), __getattr__, __dir__
