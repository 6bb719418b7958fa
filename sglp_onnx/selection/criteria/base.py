"""The criterion interface: a criterion picks which units to remove.

A criterion is one small class registered under its `--criterion` name. It
reads what it needs from the run's measuring `Context` (`evidence.context`),
which computes the calibration pass, GradNorm and other evidence lazily and
at most once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from ...evidence import Context


@dataclass
class Selection:
    """Which units go, and the evidence behind the choice (for the report)."""

    removed: list[int]
    importance: list[float] | None = None
    importance_kind: str | None = None  # what the importance numbers are
    segments: list[tuple[int, int]] | None = None
    k_curve: list[float] | None = None
    k_rule: str | None = None
    notes: list[str] = field(default_factory=list)
    # Passes over the calibration set the choice cost, e.g. {"forward": 1,
    # "backward": 1}; a partial pass (a suffix of the network) counts as one.
    passes: dict[str, int] = field(default_factory=dict)


class Criterion(ABC):
    """Chooses `n_remove` units to remove."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    needs_torch: ClassVar[bool] = False
    # Reads --segments (the Fisher segmentation of SGLP).
    uses_segments: ClassVar[bool] = False

    @abstractmethod
    def select(self, ctx: Context, n_remove: int) -> Selection:
        """The units to remove (indices into `ctx.units`) and why."""


REGISTRY: dict[str, type[Criterion]] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    REGISTRY[cls.name] = cls
    return cls


def lowest(scores: Sequence[float], n: int) -> list[int]:
    """Indices of the n lowest scores; ties go to the later unit."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:n])
