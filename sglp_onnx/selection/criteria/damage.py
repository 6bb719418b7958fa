"""Measured-damage selection: remove the units whose bypass changes the
model's output least, measured by the fidelity score (fidelity.py) on the
calibration samples used for selection.

- `damage-greedy`, in the style of SLEB (Song et al. 2024): at each step,
  bypass each remaining unit together with those already chosen and keep
  the bypass that damages the score least; with a FLOPs budget, the
  damage increase is divided by the unit's FLOPs (damage per FLOP saved).
  Each candidate is a partial pass from the bypassed unit on (gating.py).
- `damage-fast`: the same greedy, each step restricted to the few remaining
  units whose single-unit damage (measured once, in the first step) is
  lowest.
- `damage-exhaustive`: every removal set of the requested size scored
  jointly; refused when there are more than EXHAUSTIVE_LIMIT sets.
- `damage` (the default): exhaustive where that costs no more passes than
  the greedy would (all units but one), else the greedy.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from ...errors import UserError
from ...evidence.fidelity import FidelityMeter
from ...surgery.gating import ReferenceOutputs
from .base import Context, Criterion, Selection, register

EXHAUSTIVE_LIMIT = 128
FAST_CANDIDATES = 6


class DamageSearch:
    """The greedy removal order on one context, extended step by step."""

    def __init__(self, ctx: Context, *, candidates: int | None = None) -> None:
        if ctx.calib is None:
            raise UserError("measured-damage criteria need calibration data: pass --calib CALIB.npz "
                            "or put MODEL.calib.npz beside the model")
        self.ctx = ctx
        # The report's CKA matrix and heatmap come from the one calibration
        # pass every criterion with data shares; the choice below does not read it.
        ctx.evidence()
        self.kind = ctx.output_kind()
        self.runner = self.make_runner()
        self.limit = candidates
        self.order: list[int] = []
        self.scores: list[float] = []  # score after removing order[:k+1]
        self.single: list[float] | None = None
        self.full_passes = 0
        self.partial_passes = 0
        self.seconds = 0.0
        self.references = ReferenceOutputs(self.runner, self.kind.output)
        self.notes: list[str] = []

    repaired = False  # candidates are scored with their repair map (damage_repair.RepairedSearch)

    def make_runner(self):
        return self.ctx.runner()

    def meter(self) -> FidelityMeter:
        return FidelityMeter(self.kind, token_level=self.ctx.calib.is_token_data)

    def mask(self, feed: dict[str, np.ndarray]) -> np.ndarray | None:
        name = self.ctx.calib.token_mask_name
        return feed.get(name) if name else None

    def batches(self, label: str):
        batches = self.ctx.calib.batches(self.ctx.batch_size)
        return self.ctx.progress(batches, label) if self.ctx.progress else batches

    def _candidates(self) -> list[int]:
        left = [k for k in range(len(self.ctx.units)) if k not in self.order]
        if self.limit is None or self.single is None:
            return left
        return sorted(sorted(left, key=lambda k: (self.single[k], -k))[:self.limit])

    def step(self) -> None:
        removed = set(self.order)
        candidates = self._candidates()
        target = self.kind.output
        meters = {k: self.meter() for k in candidates}
        # All candidates in one session run per batch (their suffixes side by
        # side, the weights once) where the graph allows.
        if self._batched_step(removed, candidates, meters):
            self.partial_passes += len(candidates)
            self._choose(candidates, meters)
            return
        # Else one suffix session per candidate: they hold weights, so the
        # candidates go in groups whose suffixes fit the runner's budget, each
        # group one more full pass (one group for any model that is not large).
        self.references.start(removed)
        for g, group in enumerate(self.runner.suffix_groups(candidates)):
            for b, (feed, _) in enumerate(self.batches(f"damage step {len(self.order) + 1}")):
                current = self.runner.run(feed, removed, entries=True)
                if g == 0 or removed:
                    reference = self.references.get(b, feed, current)
                else:  # nothing removed yet: the reference is this very run
                    reference = current[target]
                self.full_passes += b == 0
                self.full_passes += b == 0 and self.references.recomputed
                mask = self.mask(feed)
                for k in group:
                    meters[k].update(reference, self.runner.run_extension(feed, removed, k, current)[target], mask)
            self.runner.release_suffixes()
            if g == 0:
                self.references.end()
        self.partial_passes += len(candidates)
        self._choose(candidates, meters)

    def _batched_step(self, removed: set[int], candidates: list[int], meters: dict) -> bool:
        """Score every candidate with one run per batch; False (nothing scored)
        when the runner cannot batch this graph."""
        target = self.kind.output
        self.references.start(removed)
        for b, (feed, _) in enumerate(self.batches(f"damage step {len(self.order) + 1}")):
            current = self.runner.run(feed, removed, entries=True)
            values = self.runner.run_extensions(feed, removed, candidates, current)
            if values is None:
                return False
            reference = self.references.get(b, feed, current)
            self.full_passes += b == 0
            self.full_passes += b == 0 and self.references.recomputed
            mask = self.mask(feed)
            for k in candidates:
                meters[k].update(reference, values[k][target], mask)
        self.references.end()
        return True

    def _choose(self, candidates: list[int], meters: dict) -> None:
        scores = {k: m.score for k, m in meters.items()}
        if self.single is None:
            self.single = [scores[k] for k in range(len(self.ctx.units))]
        previous = self.scores[-1] if self.scores else 0.0
        units = self.ctx.units

        def cost(k: int) -> tuple[float, int]:
            increase = scores[k] - previous
            if self.ctx.flops_budget:
                increase /= max(units[k].flops, 1)
            return increase, -k  # ties go to the later unit, as in `lowest`

        best = min(candidates, key=cost)
        self.order.append(best)
        self.scores.append(scores[best])

    def extend(self, n: int) -> None:
        start = time.perf_counter()
        while len(self.order) < n:
            self.step()
        self.seconds += time.perf_counter() - start


def exhaustive(ctx: Context, n: int) -> tuple[list[int], float, int]:
    """The removal set of size n with the lowest joint damage: (set, score, passes)."""
    search = DamageSearch(ctx)
    L = len(ctx.units)
    sets = list(itertools.combinations(range(L), n))
    meters = [search.meter() for _ in sets]
    target = search.kind.output
    for feed, _ in search.batches(f"damage: {len(sets)} removal sets"):
        reference = search.runner.run(feed, set())[target]
        mask = search.mask(feed)
        for s, meter in zip(sets, meters):
            meter.update(reference, search.runner.run(feed, set(s))[target], mask)

    def cost(i: int) -> tuple[float, tuple[int, ...]]:
        score = meters[i].score
        if ctx.flops_budget:
            score /= max(sum(ctx.units[k].flops for k in sets[i]), 1)
        return score, tuple(-k for k in reversed(sets[i]))

    best = min(range(len(sets)), key=cost)
    return list(sets[best]), meters[best].score, len(sets) + 1


def _check(ctx: Context, n_remove: int) -> None:
    L = len(ctx.units)
    if n_remove >= L:
        raise UserError(f"cannot remove {n_remove} of {L} units: at least one unit must stay")


def _rule(search: DamageSearch) -> str:
    per = " per FLOP removed" if search.ctx.flops_budget else ""
    return f"score: {search.kind.kind} of {search.kind.output!r} ({search.kind.rule}){per}"


class _Greedy(Criterion):
    candidates: int | None = None
    needs_calibration = True

    def select(self, ctx: Context, n_remove: int) -> Selection:
        _check(ctx, n_remove)
        if n_remove <= 0:
            return Selection(removed=[], notes=[f"{self.name}: nothing to remove, no forward pass run"])
        search = ctx.cache.get(self.name)
        if search is None:
            from .damage_repair import repaired_search

            search = repaired_search(ctx, candidates=self.candidates) if ctx.repair != "none" else None
            search = ctx.cache[self.name] = search or DamageSearch(ctx, candidates=self.candidates)
        search.extend(n_remove)
        order = search.order[:n_remove]
        passes = search.full_passes + search.partial_passes
        limited = f", each step among the {self.candidates} lowest single-unit damages" if self.candidates else ""
        notes = [
            f"{self.name}: {_rule(search)}" + (f"; each candidate scored with its {ctx.repair} repair map fitted "
                                               "on the selection samples" if search.repaired else ""),
            *search.notes,
            f"{self.name} greedy order (score after each removal){limited}: "
            + ", ".join(f"{ctx.units[k].name} {s:.4g}" for k, s in zip(order, search.scores)),
            f"{self.name}: {passes} forward passes over the selection samples for {len(search.order)} greedy "
            f"steps ({search.full_passes} full, {search.partial_passes} partial: from the bypassed unit on)",
        ]
        return Selection(
            removed=sorted(order), importance=list(search.single),
            importance_kind=f"damage of removing this unit alone{' with its repair' if search.repaired else ''} "
                            f"({search.kind.kind} score of the output)",
            notes=notes,
            passes={"forward": passes, "forward_full": search.full_passes, "forward_partial": search.partial_passes},
        )


@register
class DamageGreedy(_Greedy):
    name = "damage-greedy"
    summary = "SLEB-style greedy: repeatedly remove the unit whose bypass changes the output least"


@register
class DamageFast(_Greedy):
    name = "damage-fast"
    summary = f"greedy damage limited each step to the {FAST_CANDIDATES} lowest single-unit damages"
    candidates = FAST_CANDIDATES


@register
class DamageExhaustive(Criterion):
    name = "damage-exhaustive"
    summary = f"score every removal set jointly (at most {EXHAUSTIVE_LIMIT} sets)"
    needs_calibration = True

    def select(self, ctx: Context, n_remove: int) -> Selection:
        _check(ctx, n_remove)
        if n_remove <= 0:
            return Selection(removed=[], notes=[f"{self.name}: nothing to remove, no forward pass run"])
        count = math.comb(len(ctx.units), n_remove)
        if count > EXHAUSTIVE_LIMIT:
            raise UserError(f"--criterion {self.name}: {count} removal sets of {n_remove} among {len(ctx.units)} "
                            f"units is more than {EXHAUSTIVE_LIMIT}; use --criterion damage")
        return _exhaustive_selection(ctx, n_remove, self.name)


def _exhaustive_selection(ctx: Context, n_remove: int, name: str) -> Selection:
    key = (name, "exhaustive", n_remove)
    if key not in ctx.cache:
        ctx.cache[key] = exhaustive(ctx, n_remove)
    removed, score, passes = ctx.cache[key]
    kind = ctx.output_kind()
    per = " per FLOP removed" if ctx.flops_budget else ""
    return Selection(
        removed=removed,
        notes=[f"{name}: every one of the {passes - 1} removal sets of {n_remove} scored jointly; "
               f"score: {kind.kind} of {kind.output!r} ({kind.rule}){per}; best {score:.4g}; "
               f"{passes} full forward passes over the selection samples"],
        passes={"forward": passes, "forward_full": passes},
    )


@register
class Damage(_Greedy):
    name = "damage"
    summary = "measured damage: the greedy, or every removal set where that costs no more passes"

    def select(self, ctx: Context, n_remove: int) -> Selection:
        _check(ctx, n_remove)
        L = len(ctx.units)
        # Exhaustive only where it costs no more full passes than the greedy's
        # partial passes (n = L - 1, ...; one removal is the greedy's first step,
        # exact already): the default stays as cheap as cka-removal.
        greedy_passes = sum(L - k for k in range(n_remove))
        # With repair the greedy scores candidates repaired; the joint sets are scored plain.
        if ctx.repair == "none" and 1 < n_remove and math.comb(L, n_remove) <= min(EXHAUSTIVE_LIMIT, greedy_passes):
            return _exhaustive_selection(ctx, n_remove, self.name)
        return super().select(ctx, n_remove)
