"""The greedy removal search the measured criteria share: at each step,
bypass each remaining unit together with those already chosen, score the
network against the original's, keep the best candidate.

Candidate networks are never written out: they run through the gated graph
(`gated_runner.GatedRunner`). A candidate differs from the current network only
from the unit it bypasses on, so it is run as a partial pass from that unit,
fed with the current network's value of the unit's entry (one full run of
the current network per piece of samples).

What is compared is a `Measure` (cka_removal.py: linear CKA of the final
representation, highest goes; damage.py: the fidelity score of the output,
lowest increase goes); how samples are read and which candidates each step
scores is a `Schedule`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from ...evidence.run_cache import RunCache  # noqa: F401 (the searches' cache, re-exported)
from .base import Context


class Measure:
    """How a search scores a candidate against the original network.

    `target` is the tensor compared. Per candidate and step a fresh `meter()`
    accumulates pieces of samples: `update(meter, reference, value, feed,
    prepared)` with `reference` what `reference(value, feed)` kept of the
    original's value, `value` the candidate's and `prepared` a dict shared by
    every candidate on the piece. `score(meter)` is the candidate's score:
    the highest goes when `higher`, else the lowest increase over the
    previous step's score (per FLOP removed when `per_flop`).
    """

    target: str
    higher = False
    per_flop = False

    def meter(self):
        raise NotImplementedError

    def reference(self, value: np.ndarray, feed: dict[str, np.ndarray]):
        return value

    def update(self, meter, reference, value: np.ndarray, feed: dict[str, np.ndarray], prepared: dict) -> None:
        raise NotImplementedError

    def score(self, meter) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Schedule:
    """Which samples a search reads and which candidates each step scores."""

    # The samples in a fixed shuffle (the context's seed), else in the file's order.
    shuffle: bool = True
    # Successive halving: each step scores every candidate on this many samples,
    # then the better half on twice as many, ... (`SampleOrder.rounds`); None:
    # every candidate on every sample.
    first_round: int | None = None
    # Steps after the first score this many remaining units (at least), those
    # whose latest cost was lowest; None: every remaining unit.
    contenders: int | None = None
    # Every step scores only the `fixed` remaining units whose single-unit
    # scores (the first step's) were best; None: no such limit.
    fixed: int | None = None
    # A large model's candidates run in groups whose suffix sessions fit the
    # weight budget (side by side in one session where the search was given a
    # group size), closed after each group; False: one session per candidate, kept.
    grouped: bool = True
    # Candidates run as partial passes from their unit; False: full runs (a check).
    suffix: bool = True


class GreedySearch:
    """The greedy removal order on one context, extended step by step
    (`extend(n)` makes it n long): `order`, `scores` (the score after
    removing order[:k+1]), `single` (each unit bypassed alone, the first
    step's scores) and the passes it cost over the selection samples.

    `rows`: samples per run; `references`: where the original's values are
    kept between steps; `group`: candidates side by side per session run
    (`GatedRunner.run_extensions`), None for one suffix session each.
    """

    label = "search"  # what its progress says: "<label> step <k>"
    scores_label = ""  # appended to the label while a step scores

    def __init__(self, ctx: Context, measure: Measure, schedule: Schedule, runner, *, rows: int,
                 references: "RunCache", group: int | None = None) -> None:
        self.ctx, self.measure, self.schedule, self.runner = ctx, measure, schedule, runner
        self.units = list(ctx.units)
        self.order: list[int] = []
        self.scores: list[float] = []
        self.single: list[float] | None = None
        self.latest: dict[int, float] = {}  # unit -> its last measured cost (contender ranking)
        self.full_passes = 0.0  # in passes over the selection samples
        self.partial_passes = 0.0
        self.seconds = 0.0
        self.notes: list[str] = []
        self.batched = group is not None
        self.group = len(self.units) if group is None else group
        self.samples = SampleOrder(ctx.calib, seed=ctx.seed if schedule.shuffle else None)
        self.rows = self.samples.rows(rows)
        self.bounds = self.samples.rounds(schedule.first_round, self.rows)
        self.references = references
        # What else decides a candidate's meter besides the removal set, the candidate and the samples read.
        self.measured_key = (type(self).__name__, measure.target, ctx.repair, schedule.shuffle, ctx.seed,
                             tuple(self.bounds))

    # -- running networks ------------------------------------------------
    def pieces(self, start: int, stop: int, label: str):
        pieces = self.samples.pieces(start, stop, self.rows, self.bounds)
        return self.ctx.progress(pieces, label) if self.ctx.progress else pieces

    def share(self, feed: dict) -> float:
        """The fraction of the selection samples in `feed`: what one full run of it counts as passes."""
        return len(next(iter(feed.values()))) / self.samples.n

    def full_run(self, feed: dict, removed: set[int], **kwargs) -> dict[str, np.ndarray]:
        """The gated graph's run with `removed` bypassed, counted as passes."""
        self.full_passes += self.share(feed)
        return self.runner.run(feed, removed, **kwargs)

    def current(self, start: int, feed: dict, removed: set[int]) -> dict[str, np.ndarray]:
        """The current network's run on the piece from `start`: its entries feed the candidates."""
        return self.full_run(feed, removed, entries=self.schedule.suffix)

    def reference(self, start: int, feed: dict, current: dict, removed: set[int]):
        """What the measure keeps of the original's value on the piece from
        `start`, kept while the kept ones fit the reference cache."""
        def compute():
            target = self.measure.target
            value = self.full_run(feed, set())[target] if removed else current[target]
            return self.measure.reference(value, feed)

        return self.references.get(start, compute)

    def extension(self, feed: dict, removed: set[int], k: int, current: dict) -> dict[str, np.ndarray]:
        """The network bypassing `removed | {k}` on `feed`."""
        if not self.schedule.suffix:
            return self.full_run(feed, removed | {k})
        return self.runner.run_extension(feed, removed, k, current)

    # -- one greedy step ---------------------------------------------------
    def candidates(self) -> list[int]:
        left = [k for k in range(len(self.units)) if k not in self.order]
        fixed, contenders = self.schedule.fixed, self.schedule.contenders
        if fixed is not None and self.single is not None:
            sign = -1.0 if self.measure.higher else 1.0
            return sorted(sorted(left, key=lambda k: (sign * self.single[k], -k))[:fixed])
        if contenders is None or not self.latest or len(left) <= contenders:
            return left
        return sorted(sorted(left, key=lambda k: (self.latest[k], -k))[:contenders])

    def step(self) -> None:
        removed = set(self.order)
        alive = self.candidates()
        self.prepare(removed, alive)
        meters = {k: self.measure.meter() for k in alive}
        scores: dict[int, float] = {}
        label = f"{self.label} step {len(self.order) + 1}"
        start = 0
        for stop in self.bounds:
            scored = self.recall(removed, alive, meters, stop)
            if scored:
                self.score(removed, scored, meters, start, stop, label)
                self.remember(removed, scored, meters, stop)
            if self.schedule.suffix:
                self.partial_passes += len(scored) * (stop - start) / self.samples.n
            start = stop
            for k in alive:
                scores[k] = self.measure.score(meters[k])
                self.latest[k] = self.cost(k, scores[k])
            if len(alive) > 1 and stop < self.samples.n:
                alive = sorted(sorted(alive, key=lambda k: (self.latest[k], -k))[:(len(alive) + 1) // 2])
            if len(alive) == 1:
                break
        self.choose(alive, scores)
        self.chosen(removed)

    def recall(self, removed: set[int], alive: list[int], meters: dict, stop: int) -> list[int]:
        """Set the meters of `alive` candidates that a search on this context
        (this one, or the per-FLOP copy of analyze's suggestions) measured
        already on samples [0, stop) with the same removal set; the others,
        to be scored."""
        todo = []
        for k in alive:
            kept = self.ctx.measured.get((self.measured_key, frozenset(removed), k, stop))
            if kept is None:
                todo.append(k)
            else:
                meters[k] = copy.deepcopy(kept)
        return todo

    def remember(self, removed: set[int], scored: list[int], meters: dict, stop: int) -> None:
        for k in scored:
            self.ctx.measured[(self.measured_key, frozenset(removed), k, stop)] = copy.deepcopy(meters[k])

    def prepare(self, removed: set[int], candidates: list[int]) -> None:
        """Before a step's scoring (the repair-aware search fits its maps here)."""

    def chosen(self, removed: set[int]) -> None:
        """After a step chose `self.order[-1]`."""

    def groups(self, alive: list[int]) -> list[list[int]]:
        if self.batched:
            return [alive[i:i + self.group] for i in range(0, len(alive), self.group)]
        return self.runner.suffix_groups(alive) if self.schedule.grouped else [alive]

    def score(self, removed: set[int], alive: list[int], meters: dict, start: int, stop: int, label: str) -> None:
        """Add samples [start, stop) to the meters of `alive`: per group of
        candidates, a run of the current network and a partial pass from
        each candidate's unit (side by side in one session for a large model)."""
        groups = self.groups(alive)
        for g, group in enumerate(groups):
            for a, feed in self.pieces(start, stop, label + self.scores_label):
                current = self.current(a, feed, removed)
                reference = self.reference(a, feed, current, removed)
                values = self.runner.run_extensions(feed, removed, group, current) if self.batched else None
                if self.batched and values is None:  # not here after all: one suffix session per candidate
                    self.batched = False
                    return self.score(removed, [k for rest in groups[g:] for k in rest], meters, start, stop, label)
                prepared: dict = {}
                for k in group:
                    value = values[k] if values is not None else self.extension(feed, removed, k, current)
                    self.measure.update(meters[k], reference, value[self.measure.target], feed, prepared)
            if self.schedule.grouped:
                self.runner.release_suffixes()

    def cost(self, k: int, score: float) -> float:
        """What the step minimizes: the score's decrease, or its increase over the last step's (per FLOP)."""
        if self.measure.higher:
            return -score
        increase = score - (self.scores[-1] if self.scores else 0.0)
        if self.measure.per_flop:
            increase /= max(self.units[k].flops, 1)
        return increase

    def choose(self, candidates: list[int], scores: dict[int, float]) -> None:
        if self.single is None:
            self.single = [scores[k] for k in range(len(self.units))]
        # Ties go to the later unit, as in `lowest`.
        best = min(candidates, key=lambda k: (self.cost(k, scores[k]), -k))
        self.order.append(best)
        self.scores.append(scores[best])

    def extend(self, n: int) -> None:
        start = time.perf_counter()
        while len(self.order) < n:
            self.step()
        self.seconds += time.perf_counter() - start


class SampleOrder:
    """The selection samples in a fixed shuffle (`seed`; None: in their
    order), read in prefixes: successive-halving rounds are prefixes, so each
    spans the whole set."""

    def __init__(self, calib, *, seed: int | None) -> None:
        fixed = calib.fixed_batch or 1
        self.fixed, self.fixed_batch = fixed, calib.fixed_batch
        self.n = calib.n_samples - calib.n_samples % fixed
        if seed is None:
            self.calib = calib
        else:
            self.calib = calib.subset(np.random.default_rng(seed).permutation(calib.n_samples)[:self.n])

    def rows(self, rows: int) -> int:
        return self.fixed_batch or max(1, rows)

    def rounds(self, first: int | None, rows: int) -> list[int]:
        """Sample counts at the end of each round: first, 2 first, ..., n (whole
        pieces of a fixed batch); one round of every sample where `first` is None."""
        if first is None:
            return [self.n]
        first = -(-max(first, 1) // self.fixed) * self.fixed
        if self.n < 2 * first:
            return [self.n]
        bounds = []
        count = first
        while count < self.n:
            bounds.append(count)
            count *= 2
        return bounds + [self.n]

    def pieces(self, start: int, stop: int, rows: int, bounds: list[int]) -> list[tuple[int, dict]]:
        """(first sample, feed) for samples [start, stop) in runs of at most
        `rows`, cut at every round bound too: any two calls cut alike, so a
        run kept by its first sample is the same run (`start`, `stop` bounds).
        The feeds are views of the samples."""
        pieces = []
        for begin, end in zip([0] + bounds, bounds):
            for a in range(max(begin, start), min(end, stop), rows):
                b = min(a + rows, end, stop)
                pieces.append((a, {k: v[a:b] for k, v in self.calib.inputs.items()}))
        return pieces
