"""Budgets: how many units a request means (a count, a fraction of the
units or of the FLOPs, a fidelity bound) and the removal suggestions for
FLOPs targets, each a sweep over the criterion's selections."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from ..errors import UserError
from ..evidence import Context
from ..units.discovery import PrunableUnit
from .allocation import removal_count
from .criteria import Criterion, Selection


def budget_to_count(criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int, *,
                     remove, ratio, target_flops) -> tuple[int, Selection]:
    if target_flops is None:
        n = removal_count(len(units), remove=remove, ratio=ratio)  # refuses a count that leaves no unit
        return n, criterion.select(ctx, n)
    found, reason = first_reaching(criterion, ctx, units, total_flops, [target_flops])
    if target_flops not in found:
        raise UserError(f"--target-flops {target_flops} cannot be met: {reason}")
    return found[target_flops]


def first_reaching(criterion: Criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int,
                    targets: Sequence[float]) -> tuple[dict[float, tuple[int, Selection]], str | None]:
    """For each FLOPs fraction, the smallest removal count (and its selection)
    that removes at least that fraction; one sweep over the counts serves every
    target. Unreached targets are missing, and the second value says why."""
    pending = sorted(set(targets))
    found: dict[float, tuple[int, Selection]] = {}
    most = 0
    for n in range(1, len(units)):
        if not pending:
            return found, None
        try:
            selection = criterion.select(ctx, n)
        except UserError as exc:  # e.g. an explicit --segments K caps the count at L - K
            return found, str(exc)
        flops = sum(units[i].flops for i in selection.removed)
        most = max(most, flops)
        while pending and flops >= pending[0] * total_flops:
            found[pending.pop(0)] = (n, selection)
    if not pending:
        return found, None
    if len(units) < 2:
        return found, "the model has one prunable unit, and one always stays"
    return found, (f"removing 1 to {len(units) - 1} of the {len(units)} units (one always stays) removes at most "
                   f"{most / max(total_flops, 1):.1%} of the FLOPs")


def max_loss_count(criterion: Criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int,
                    score: Callable[[list[int]], dict], max_loss: float, *, remove, ratio,
                    target_flops) -> tuple[int, Selection, list[str]]:
    """The most units (or FLOPs) the criterion removes while `score(removed)`
    stays within `max_loss`; --remove/--ratio/--target-flops, when given, cap it."""
    if target_flops is None and (remove is not None or ratio is not None):
        most = removal_count(len(units), remove=remove, ratio=ratio)
    else:
        most = len(units) - 1
    best = (0, Selection(removed=[]))
    tried = []
    for n in range(1, most + 1):
        try:
            selection = criterion.select(ctx, n)
        except UserError:  # e.g. an explicit --segments K caps the count at L - K
            break
        if target_flops is not None and sum(units[i].flops for i in selection.removed) > target_flops * total_flops:
            break
        record = score(selection.removed)
        tried.append(f"{n}: {record['score']:.4g}")
        if record["score"] > max_loss:
            break
        best = (n, selection)
    notes = [f"--max-loss {max_loss:g}: held-out score by units removed: {', '.join(tried) or 'none tried'}; "
             f"{best[0]} removed"]
    if best[0] == 0:
        notes.append(f"--max-loss {max_loss:g}: no unit can be removed within it, so the output is an unchanged copy "
                     "of the input; raise --max-loss or give a budget (--remove, --ratio, --target-flops)")
    return best[0], best[1], notes


def suggest_removals(criterion: Criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int,
                     targets: Sequence[float]) -> list[dict]:
    """For each FLOPs fraction in `targets`, the units `criterion` would remove to reach it.

    The rule is that of `--target-flops`: the smallest removal count whose
    selection removes at least that fraction of the model's FLOPs, so each
    suggestion is exactly what `compress --target-flops F` would remove.
    Selections reuse the evidence and GradNorm cached in `ctx`: no second
    calibration pass.
    """
    wanted = list(dict.fromkeys(float(t) for t in targets))
    for t in wanted:
        if not 0.0 < t < 1.0:
            raise UserError(f"suggestion targets must be FLOPs fractions in (0, 1), got {t}")
    ranking = ctx
    if ctx is not None and not ctx.flops_budget and len({u.flops for u in units}) > 1:
        # Rank as --target-flops does (per FLOP: different from per unit only when
        # the units' FLOPs differ), without disturbing ctx's own searches.
        ctx.runner(), ctx.output_kind()  # built once, shared with the copy
        ranking = replace(ctx, flops_budget=True, cache={})
    try:
        found, reason = first_reaching(criterion, ranking, units, total_flops, wanted)
    finally:
        if ranking is not ctx:
            ranking.cache.clear()  # its search holds the copy: no cycle left for the collector
    suggestions = []
    for t in wanted:
        if t not in found:
            suggestions.append({"target_flops": t, "achievable": False, "units_removed": None, "removed": None,
                                "names": None, "flops_removed": None, "flops_removed_fraction": None,
                                "params_removed": None, "reason": reason})
            continue
        n, selection = found[t]
        flops = sum(units[i].flops for i in selection.removed)
        suggestions.append({
            "target_flops": t,
            "achievable": True,
            "units_removed": n,
            "removed": list(selection.removed),
            "names": [units[i].name for i in selection.removed],
            "flops_removed": int(flops),
            "flops_removed_fraction": flops / max(total_flops, 1),
            "params_removed": int(sum(units[i].params for i in selection.removed)),
            "reason": None,
        })
    return suggestions


ONE_UNIT_NOTE = ("the model has one prunable unit and one always stays: nothing can be removed; its measurements "
                 "are shown")


def select_for_budget(criterion: Criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int, opts,
                      loss_of, *, only_measure: bool) -> tuple[int, Selection, list[str]]:
    """(units to remove, the criterion's selection, notes) for the budget of
    `opts` (`options.SelectionOptions`): --remove, --ratio or --target-flops
    (`budget_to_count`), or --max-loss (`max_loss_count`, reading `loss_of`).
    `only_measure`: a model with one unit and no budget asked for, where
    nothing can go but the unit is measured."""
    if only_measure:
        n_remove, selection = budget_to_count(criterion, ctx, units, total_flops, remove=0, ratio=None,
                                              target_flops=None)
        return n_remove, selection, [ONE_UNIT_NOTE]
    if opts.max_loss is None:
        n_remove, selection = budget_to_count(criterion, ctx, units, total_flops, remove=opts.remove,
                                              ratio=opts.ratio, target_flops=opts.target_flops)
        return n_remove, selection, []
    return max_loss_count(criterion, ctx, units, total_flops, loss_of, float(opts.max_loss),
                          remove=opts.remove, ratio=opts.ratio, target_flops=opts.target_flops)
