"""The repair stage: fit the maps of a removal set, measure the repaired
model's held-out fidelity beside the plain removal's, and keep the repair
only where it measurably helps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import onnx

from ..units.discovery import PrunableUnit
from .graph import with_repairs
from .plan import Repair, fit_repairs, repair_records


@dataclass
class RepairOutcome:
    """One removal set's repair: the maps, whether they are applied and why."""

    form: str
    repairs: list[Repair] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    applied: bool = False
    reason: str = ""
    fidelity: dict | None = None  # repaired model's fidelity record
    fidelity_without: dict | None = None  # plain removal's
    model: onnx.ModelProto | None = None  # the input with the maps' nodes (when applied)
    units: list[PrunableUnit] | None = None  # units whose cut tails read the maps

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.repairs) if self.applied else 0

    def record(self, units: Sequence[PrunableUnit]) -> dict:
        """The report's `repair` object."""
        return {
            "form": self.form,
            "fit_on": "pruned model's own entries, front to back (selection samples)",
            "applied": self.applied,
            "reason": self.reason,
            "cuts": repair_records(self.repairs, units),
            "not_repaired": list(self.skipped),
            "params": sum(r.params for r in self.repairs),
            "flops": sum(r.flops for r in self.repairs),
            "fidelity_without_repair": self.fidelity_without,
        }


def better(repaired: dict, plain: dict) -> bool:
    """True when the repaired model is closer to the original than the plain
    removal on held-out samples: a lower score (KL, cosine distance or
    relative error) and, for logits, no lower top-1 agreement."""
    if repaired["score"] >= plain["score"]:
        return False
    a, b = repaired.get("top1_agreement"), plain.get("top1_agreement")
    return a is None or b is None or a >= b


def repair_removal(model: onnx.ModelProto, units: Sequence[PrunableUnit], removed: Sequence[int], data, *,
                   form: str, measure: Callable[[onnx.ModelProto, list[PrunableUnit], list[int]], dict],
                   plain: dict, batch_size: int, provider: str,
                   progress: Callable[[Iterator, str], Iterator] | None = None, reference=None) -> RepairOutcome:
    """Fit the maps of `removed` on `data` and measure the repaired model with
    `measure(model, units, removed)` (the held-out fidelity record); `plain`
    is the plain removal's record. Applied only when `better`. `reference`:
    the original's values shared with other removal sets (`plan.original_reference`)."""
    outcome = RepairOutcome(form=form, fidelity_without=plain)
    if not removed:
        outcome.reason = "nothing removed"
        return outcome
    outcome.repairs, outcome.skipped = fit_repairs(model, units, removed, data, form=form, batch_size=batch_size,
                                                   provider=provider, progress=progress, reference=reference)
    if not outcome.repairs:
        outcome.reason = "no cut could be repaired"
        return outcome
    repaired_model, repaired_units = with_repairs(model, units, outcome.repairs)
    outcome.fidelity = measure(repaired_model, repaired_units, list(removed))
    if better(outcome.fidelity, plain):
        outcome.applied = True
        outcome.model, outcome.units = repaired_model, repaired_units
        outcome.reason = "the repaired model is closer to the original on the held-out samples"
    else:
        outcome.reason = ("not applied: the repaired model is not closer to the original than the plain removal "
                          "on the held-out samples")
    return outcome


def repaired_pruned(model: onnx.ModelProto, units: Sequence[PrunableUnit], removed: Sequence[int], data, *,
                    form: str = "full", batch_size: int = 64, provider: str = "cpu") -> onnx.ModelProto:
    """The pruned model of removal set `removed` with every cut repaired
    (fitted on `data`), as `compress` writes it when the repair is kept;
    for benchmarks and scripts that compare removal sets."""
    from ..surgery.remove import remove_units

    repairs, _ = fit_repairs(model, units, removed, data, form=form, batch_size=batch_size, provider=provider)
    repaired, new_units = with_repairs(model, units, repairs)
    return remove_units(repaired, [new_units[k] for k in sorted(removed)])
