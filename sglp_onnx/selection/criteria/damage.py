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
from ...evidence.budget import METER_COPIES
from ...evidence.fidelity import FidelityMeter
from ...evidence import Context
from .base import Criterion, Selection, register

EXHAUSTIVE_LIMIT = 128
FAST_CANDIDATES = 6
# Successive halving (see `DamageSearch.step`): the first round scores every
# candidate on this many samples (token models: sequences holding this many
# tokens), each later round doubles the samples and keeps the better half.
HALVING_FIRST_SAMPLES = 32
HALVING_FIRST_TOKENS = 1024
# Greedy steps after the first consider this many contenders (at least): the
# remaining units whose last measured damage was lowest.
CONTENDERS = 8


class DamageSearch:
    """The greedy removal order on one context, extended step by step.

    Each step scores candidates by successive halving: every candidate on the
    first few samples of a fixed shuffle of the selection samples, then the
    better half on twice as many, until one is left or every sample is read
    (a calibration set of fewer than two first rounds: every candidate on every
    sample, the plain greedy). After the first step only the `CONTENDERS`
    units whose latest damage was lowest are candidates. Runs are cut into
    pieces of `rows` samples that fit the activation budget.
    """

    def __init__(self, ctx: Context, *, candidates: int | None = None) -> None:
        ctx.require_calibration("a measured-damage criterion")
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
        self.latest: dict[int, float] = {}  # unit -> its last measured cost (contender ranking)
        self.full_passes = 0.0  # in passes over the selection samples
        self.partial_passes = 0.0
        self.seconds = 0.0
        self.notes: list[str] = []
        self.samples = SampleOrder(ctx.calib, seed=ctx.seed)
        budget = ctx.activation_budget()
        held = budget.held([u.entry for u in ctx.units] + self.also_held(), copies={self.kind.output: METER_COPIES})
        rows = budget.rows(held, ctx.batch_size, share=0.5)
        # A large model scores candidates side by side in one session (their
        # suffixes share the weights): groups whose outputs take at most half
        # the runs' share of the budget.
        self.batched = not self.runner.fits_apart(range(len(ctx.units))) and self.runner.batchable()
        self.group = len(ctx.units)
        if self.batched:
            target = max(budget.sizes.get(self.kind.output, 0), 1)
            self.group = max(1, min(len(ctx.units), budget.bytes // 4 // (target * rows)))
            rows = budget.rows(held + self.group * target, ctx.batch_size, share=0.5)
        self.rows = self.samples.rows(rows)
        self.bounds = self.samples.rounds(self.first_round(), self.rows)
        self.cache_bytes = budget.bytes // 4
        self._references = RunCache(self.cache_bytes)  # the original's scored output, per piece

    repaired = False  # candidates are scored with their repair map (damage_repair.RepairedSearch)

    def make_runner(self):
        return self.ctx.runner()

    def also_held(self) -> list[str]:
        """Tensors a run holds beside the unit entries and the scored output."""
        return []

    def first_round(self) -> int:
        if self.ctx.calib.is_token_data:
            tokens = max(1, int(np.prod(self.ctx.calib.inputs[next(iter(self.ctx.calib.inputs))].shape[1:])))
            return max(1, -(-HALVING_FIRST_TOKENS // tokens))
        return HALVING_FIRST_SAMPLES

    def meter(self) -> FidelityMeter:
        return FidelityMeter(self.kind, token_level=self.ctx.calib.is_token_data)

    def mask(self, feed: dict[str, np.ndarray]) -> np.ndarray | None:
        name = self.ctx.calib.token_mask_name
        return feed.get(name) if name else None

    def pieces(self, start: int, stop: int, label: str):
        pieces = self.samples.pieces(start, stop, self.rows, self.bounds)
        return self.ctx.progress(pieces, label) if self.ctx.progress else pieces

    def _candidates(self) -> list[int]:
        left = [k for k in range(len(self.ctx.units)) if k not in self.order]
        if self.limit is not None and self.single is not None:
            return sorted(sorted(left, key=lambda k: (self.single[k], -k))[:self.limit])
        if not self.latest or len(left) <= CONTENDERS:
            return left
        return sorted(sorted(left, key=lambda k: (self.latest[k], -k))[:CONTENDERS])

    def share(self, feed: dict) -> float:
        """The fraction of the selection samples in `feed`: what one full run of it counts as passes."""
        return len(next(iter(feed.values()))) / self.samples.n

    def full_run(self, feed: dict, removed: set[int], **kwargs) -> dict[str, np.ndarray]:
        """The gated graph's run with `removed` bypassed, counted as passes."""
        self.full_passes += self.share(feed)
        return self.runner.run(feed, removed, **kwargs)

    def reference(self, start: int, feed: dict, current: dict, removed: set[int]) -> np.ndarray:
        """The original's scored output on the piece of samples from `start` on,
        kept while the kept ones fit a quarter of the budget."""
        target = self.kind.output
        return self._references.get(start, lambda: self.full_run(feed, set())[target] if removed
                                    else current[target])

    def step(self) -> None:
        removed = set(self.order)
        alive = self._candidates()
        self.prepare(removed, alive)
        meters = {k: self.meter() for k in alive}
        label = f"damage step {len(self.order) + 1}"
        start = 0
        for stop in self.bounds:
            self.score(removed, alive, meters, start, stop, label)
            self.partial_passes += len(alive) * (stop - start) / self.samples.n
            start = stop
            for k in alive:
                self.latest[k] = self._cost(k, meters[k].score)
            if len(alive) > 1 and stop < self.samples.n:
                alive = sorted(sorted(alive, key=lambda k: (self.latest[k], -k))[:(len(alive) + 1) // 2])
            if len(alive) == 1:
                break
        self._choose(alive, meters)
        self.chosen(removed)

    def prepare(self, removed: set[int], candidates: list[int]) -> None:
        """Before a step's scoring (the repair-aware search fits its maps here)."""

    def chosen(self, removed: set[int]) -> None:
        """After a step chose `self.order[-1]`."""

    def score(self, removed: set[int], alive: list[int], meters: dict, start: int, stop: int, label: str) -> None:
        """Add samples [start, stop) to the meters of `alive`: per group of
        candidates, a full run of the current network and a partial pass from
        each candidate's unit (side by side in one session for a large model)."""
        target = self.kind.output
        runner = self.runner
        groups = [alive[i:i + self.group] for i in range(0, len(alive), self.group)] if self.batched \
            else runner.suffix_groups(alive)
        for g, group in enumerate(groups):
            for a, feed in self.pieces(start, stop, label):
                current = self.full_run(feed, removed, entries=True)
                reference = self.reference(a, feed, current, removed)
                values = runner.run_extensions(feed, removed, group, current) if self.batched else None
                if self.batched and values is None:  # not here after all: one suffix session per candidate
                    self.batched = False
                    return self.score(removed, [k for rest in groups[g:] for k in rest], meters, start, stop, label)
                mask = self.mask(feed)
                prepared: dict = {}
                for k in group:
                    value = values[k] if values is not None else runner.run_extension(feed, removed, k, current)
                    meters[k].update(reference, value[target], mask, prepared)
            runner.release_suffixes()

    def _cost(self, k: int, score: float) -> float:
        increase = score - (self.scores[-1] if self.scores else 0.0)
        if self.ctx.flops_budget:
            increase /= max(self.ctx.units[k].flops, 1)
        return increase

    def _choose(self, candidates: list[int], meters: dict) -> None:
        if self.single is None:
            self.single = [meters[k].score for k in range(len(self.ctx.units))]
        # Ties go to the later unit, as in `lowest`.
        best = min(candidates, key=lambda k: (self._cost(k, meters[k].score), -k))
        self.order.append(best)
        self.scores.append(meters[best].score)

    def extend(self, n: int) -> None:
        start = time.perf_counter()
        while len(self.order) < n:
            self.step()
        self.seconds += time.perf_counter() - start

    def passes_note(self, name: str) -> str:
        halving = (f"; each step by successive halving over {', '.join(map(str, self.bounds))} samples"
                   if len(self.bounds) > 1 else "")
        return (f"{name}: {self.full_passes + self.partial_passes:.1f} forward passes' worth over the "
                f"{self.samples.n} selection samples for {len(self.order)} greedy steps ({self.full_passes:.1f} "
                f"full, {self.partial_passes:.1f} partial: from the bypassed unit on){halving}; runs of "
                f"{self.rows} samples")


class RunCache:
    """Runs (an array, or a dict of them) kept by their piece's first sample
    while together they fit `limit` bytes; a run that does not fit is
    recomputed on every use."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: dict[int, object] = {}
        self.bytes = 0

    def get(self, start: int, compute):
        if start in self.kept:
            return self.kept[start]
        value = compute()
        size = value.nbytes if isinstance(value, np.ndarray) else sum(v.nbytes for v in value.values())
        if self.bytes + size <= self.limit:
            self.kept[start] = value
            self.bytes += size
        return value

    def clear(self) -> None:
        self.kept, self.bytes = {}, 0


class SampleOrder:
    """The selection samples in a fixed shuffle (seeded), read in prefixes:
    successive-halving rounds are prefixes, so each spans the whole set."""

    def __init__(self, calib, *, seed: int) -> None:
        fixed = calib.fixed_batch or 1
        self.fixed, self.fixed_batch = fixed, calib.fixed_batch
        self.n = calib.n_samples - calib.n_samples % fixed
        order = np.random.default_rng(seed).permutation(calib.n_samples)[:self.n]
        self.calib = calib.subset(order)

    def rows(self, rows: int) -> int:
        return self.fixed_batch or max(1, rows)

    def rounds(self, first: int, rows: int) -> list[int]:
        """Sample counts at the end of each round: first, 2 first, ..., n (whole pieces of a fixed batch)."""
        first = -(-max(first, 1) // self.fixed) * self.fixed
        if self.n < 2 * first:
            return [self.n]
        bounds = []
        count = first
        while count < self.n:
            bounds.append(count)
            count *= 2
        return bounds + [self.n]

    def pieces(self, start: int, stop: int, rows: int, bounds: list[int]):
        """(first sample, feed) for samples [start, stop) in runs of at most
        `rows`, cut at every round bound too: any two calls cut alike, so a
        run kept by its first sample is the same run (`start`, `stop` bounds)."""
        for begin, end in zip([0] + bounds, bounds):
            for a in range(max(begin, start), min(end, stop), rows):
                b = min(a + rows, end, stop)
                yield a, {k: v[a:b] for k, v in self.calib.inputs.items()}


def exhaustive(ctx: Context, n: int) -> tuple[list[int], float, int]:
    """The removal set of size n with the lowest joint damage: (set, score, passes)."""
    search = DamageSearch(ctx)
    L = len(ctx.units)
    sets = list(itertools.combinations(range(L), n))
    meters = [search.meter() for _ in sets]
    target = search.kind.output
    for _, feed in search.pieces(0, search.samples.n, f"damage: {len(sets)} removal sets"):
        reference = search.runner.run(feed, set())[target]
        mask = search.mask(feed)
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
