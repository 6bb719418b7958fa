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

import numpy as np

from ...errors import UserError
from ...evidence.budget import METER_COPIES
from ...evidence.fidelity import FidelityMeter
from ...evidence import Context
from .base import Criterion, Selection, register
from .search import GreedySearch, Measure, RunCache, Schedule

EXHAUSTIVE_LIMIT = 128
FAST_CANDIDATES = 6
# Successive halving (see `search.GreedySearch.step`): the first round scores every
# candidate on this many samples (token models: sequences holding this many
# tokens), each later round doubles the samples and keeps the better half.
HALVING_FIRST_SAMPLES = 32
HALVING_FIRST_TOKENS = 1024
# Where that first round would cost more than HALVING_FIRST_FLOPS (every unit's
# partial pass plus the current network's run, from the units' FLOPs per sample;
# 0.5 TFLOPs is about 15 s on one core of a laptop CPU), it reads half as many
# samples, and half again, down to these. ResNet-50 at 224x224: 1.1 TFLOPs on 32
# samples, so 8; the bundled models' first rounds cost 3-6 GFLOPs.
HALVING_FIRST_FLOPS = 5 * 10**11
HALVING_LEAST_SAMPLES = 8
HALVING_LEAST_TOKENS = 256
# Greedy steps after the first consider this many contenders (at least): the
# remaining units whose last measured damage was lowest.
CONTENDERS = 8


class FidelityMeasure(Measure):
    """The fidelity score (fidelity.py) of the scored output against the original's: lowest increase goes."""

    def __init__(self, ctx: Context) -> None:
        self.kind = ctx.output_kind()
        self.target = self.kind.output
        self.token_level = ctx.calib.is_token_data
        self.calib = ctx.calib
        self.per_flop = ctx.flops_budget

    def meter(self) -> FidelityMeter:
        return FidelityMeter(self.kind, token_level=self.token_level)

    def mask(self, feed: dict[str, np.ndarray]) -> np.ndarray | None:
        return self.calib.token_mask(feed)

    def update(self, meter, reference, value, feed, prepared) -> None:
        meter.update(reference, value, self.mask(feed), prepared)

    def score(self, meter) -> float:
        return meter.score


class DamageSearch(GreedySearch):
    """The greedy removal order by measured damage on one context.

    Each step scores candidates by successive halving: every candidate on the
    first few samples of a fixed shuffle of the selection samples, then the
    better half on twice as many, until one is left or every sample is read
    (a calibration set of fewer than two first rounds: every candidate on every
    sample, the plain greedy). After the first step only the `CONTENDERS`
    units whose latest damage was lowest are candidates. Runs are cut into
    pieces of `rows` samples that fit the activation budget; the original's
    scored output is kept per piece while those kept fit a quarter of it.
    """

    label = "damage"
    first_round_note = ""  # set where the first halving round reads fewer samples than usual
    repaired = False  # candidates are scored with their repair map (damage_repair.RepairedSearch)
    grouped = True  # a large model's candidates in groups (the repair-aware search: one session each)

    def __init__(self, ctx: Context, *, candidates: int | None = None) -> None:
        ctx.require_calibration("a measured-damage criterion")
        # The report's CKA matrix and heatmap come from the one calibration
        # pass every criterion with data shares; the choice below does not read it.
        ctx.evidence()
        measure = FidelityMeasure(ctx)
        self.kind = measure.kind
        self.ctx = ctx
        runner = self.make_runner()
        budget = ctx.activation_budget()
        held = budget.held([u.entry for u in ctx.units] + self.also_held(), copies={self.kind.output: METER_COPIES})
        rows = budget.rows(held, ctx.batch_size, share=0.5)
        # A large model scores candidates side by side in one session (their
        # suffixes share the weights): groups whose outputs take at most half
        # the runs' share of the budget.
        group = None
        if self.grouped and not runner.fits_apart(range(len(ctx.units))) and runner.batchable():
            target = max(budget.sizes.get(self.kind.output, 0), 1)
            group = max(1, min(len(ctx.units), budget.bytes // 4 // (target * rows)))
            rows = budget.rows(held + group * target, ctx.batch_size, share=0.5)
        self.cache_bytes = budget.bytes // 4
        schedule = Schedule(first_round=self.first_round(), contenders=CONTENDERS, fixed=candidates,
                            grouped=self.grouped)
        super().__init__(ctx, measure, schedule, runner, rows=rows, references=RunCache(self.cache_bytes),
                         group=group)
        if self.first_round_note and len(self.bounds) > 1:
            self.notes.append(f"{self.label}: {self.first_round_note}")

    def make_runner(self):
        return self.ctx.runner()

    def also_held(self) -> list[str]:
        """Tensors a run holds beside the unit entries and the scored output."""
        return []

    def first_round(self) -> int:
        """Samples every candidate of a step is scored on first (successive
        halving); fewer than the usual count where that costs more than
        HALVING_FIRST_FLOPS (`first_round_flops`), then said in the notes."""
        if self.ctx.calib.is_token_data:
            tokens = max(1, int(np.prod(self.ctx.calib.inputs[next(iter(self.ctx.calib.inputs))].shape[1:])))
            usual, least = (max(1, -(-count // tokens)) for count in (HALVING_FIRST_TOKENS, HALVING_LEAST_TOKENS))
        else:
            usual, least = HALVING_FIRST_SAMPLES, HALVING_LEAST_SAMPLES
        per_sample = first_round_flops(self.ctx.units)
        first = usual
        while first > least and first * per_sample > HALVING_FIRST_FLOPS:
            first = max(least, first // 2)
        if first < usual:
            self.first_round_note = (
                f"each step's first halving round reads {first} samples, not {usual}: every unit's partial pass "
                f"on {usual} would cost {usual * per_sample / 1e12:.1f} TFLOPs, more than "
                f"{HALVING_FIRST_FLOPS / 1e12:g}")
        return first

    def passes_note(self, name: str) -> str:
        halving = (f"; each step by successive halving over {', '.join(map(str, self.bounds))} samples"
                   if len(self.bounds) > 1 else "")
        return (f"{name}: {self.full_passes + self.partial_passes:.1f} forward passes' worth over the "
                f"{self.samples.n} selection samples for {len(self.order)} greedy steps ({self.full_passes:.1f} "
                f"full, {self.partial_passes:.1f} partial: from the bypassed unit on){halving}; runs of "
                f"{self.rows} samples")


def first_round_flops(units) -> int:
    """FLOPs per sample of a greedy step's first halving round, from the units'
    own FLOPs (what lies outside them, a stem or a head, is left out): the
    current network's run plus every unit's partial pass, which runs the units
    after it."""
    # Unit k runs in the current network and in the partial passes of the k units before it.
    return sum((k + 1) * u.flops for k, u in enumerate(units))


def exhaustive(ctx: Context, n: int) -> tuple[list[int], float, int]:
    """The removal set of size n with the lowest joint damage: (set, score, passes)."""
    search = DamageSearch(ctx)
    L = len(ctx.units)
    sets = list(itertools.combinations(range(L), n))
    measure = search.measure
    meters = [measure.meter() for _ in sets]
    target = measure.target
    for _, feed in search.pieces(0, search.samples.n, f"damage: {len(sets)} removal sets"):
        reference = search.runner.run(feed, set())[target]
        mask = measure.mask(feed)
        prepared: dict = {}
        for s, meter in zip(sets, meters):
            meter.update(reference, search.runner.run(feed, set(s))[target], mask, prepared)

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
        passes = round(search.full_passes + search.partial_passes, 1)
        limited = f", each step among the {self.candidates} lowest single-unit damages" if self.candidates else ""
        notes = [
            f"{self.name}: {_rule(search)}" + (f"; each candidate scored with its {ctx.repair} repair map fitted "
                                               "on the selection samples" if search.repaired else ""),
            *search.notes,
            f"{self.name} greedy order (score after each removal: a mean over the samples its step read for "
            f"the unit, fewer where the halving ended early){limited}: "
            + ", ".join(f"{ctx.units[k].name} {s:.4g}" for k, s in zip(order, search.scores)),
            search.passes_note(self.name),
        ]
        return Selection(
            removed=sorted(order), importance=list(search.single),
            importance_kind=f"damage of removing this unit alone{' with its repair' if search.repaired else ''} "
                            f"({search.kind.kind} score of the output)",
            notes=notes,
            passes={"forward": passes, "forward_full": round(search.full_passes, 1),
                    "forward_partial": round(search.partial_passes, 1)},
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
