"""The measured-damage greedy scoring every candidate with its repair.

At each step, with the removal set S already chosen (its cuts repaired by
the maps fitted when they were chosen), a candidate k is scored on the
network that bypasses S | {k} with every cut repaired: k's cut (k alone,
or merged with the cuts of S it touches) gets its map fitted from sums over
the selection samples, from what the repaired S-network computes at the
cut's entry to what the original computes at its exit (the repair's own
rule, `repair.plan`), then a partial pass from the cut's exit, fed the
map's output, gives the score. One gated session serves every step: its
bypasses read runtime linear maps (`repair.graph.add_runtime_maps`) fed
with S's maps and identities elsewhere. Costs per step: two full passes
(fit, then score; the second reuses the first's activations while they fit
an eighth of the activation budget) and the plain greedy's partial passes.

Used where every unit's entry is a float tensor and the model is small
enough for one suffix session per candidate (`GatedRunner.suffix_groups`);
elsewhere the plain greedy chooses and the chosen set is repaired after.
"""

from __future__ import annotations

import numpy as np

from ...evidence.activations import probe
from ...files.model_files import initializer_bytes
from ...graph.index import GraphIndex
from ...repair.cuts import channel_axis, cuts_of
from ...repair.fit import LinearFit, apply_fitted, as_rows
from ...repair.graph import add_runtime_maps, runtime_map_inputs, stored
from ...evidence.gated_runner import SUFFIX_BUDGET_BYTES, GatedRunner
from ...evidence import Context
from .damage import DamageSearch
from .search import RunCache

SEARCH_ROWS_PER_CHANNEL = 16


def repaired_search(ctx: Context, *, candidates: int | None = None) -> "RepairedSearch | None":
    """The repair-aware search on `ctx`, or None where it does not apply
    (a quantized or integer unit entry, a model too large for one suffix
    session per candidate); the caller then uses the plain greedy."""
    if ctx.calib is None or not ctx.units:
        return None
    weights = initializer_bytes(ctx.model)
    if len(ctx.units) * weights > max(SUFFIX_BUDGET_BYTES, weights):
        return None
    entries = list(dict.fromkeys(u.entry for u in ctx.units))
    values = probe(ctx.model, ctx.calib.first(min(2, ctx.batch_size, ctx.calib.n_samples)), entries, provider=ctx.provider)
    index = GraphIndex(ctx.model)
    specs = {}
    for k, unit in enumerate(ctx.units):
        value = values[unit.entry]
        if not np.issubdtype(value.dtype, np.floating) or value.ndim < 2 or unit.companions:
            return None
        axis = channel_axis(index, unit.entry, value.ndim)
        specs[k] = (axis, value.ndim, _elem(value.dtype), value.shape[axis])
    return RepairedSearch(ctx, specs, candidates=candidates)


def _elem(dtype: np.dtype) -> int:
    import onnx

    return onnx.helper.np_dtype_to_tensor_dtype(dtype)


class RepairedSearch(DamageSearch):
    """`DamageSearch` whose candidates are scored repaired. The original's
    reference is still only its scored output (`DamageSearch.reference`):
    kept per piece where all its exposed tensors would not be."""

    repaired = True
    grouped = False  # one suffix session per candidate: `repaired_search` applies only where they fit
    scores_label = ": scores"

    def __init__(self, ctx: Context, specs: dict, *, candidates: int | None = None) -> None:
        self.specs = specs  # unit -> (axis, rank, ONNX elem type, channels)
        self.form = ctx.repair
        # The runtime maps this search feeds: its own, since its runner is shared
        # with the other searches of the run (`Context.shared_runner`).
        self.map_feed: dict[str, np.ndarray] = {}
        super().__init__(ctx, candidates=candidates)
        self.maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a step's candidate -> its cut's map
        self.merged: dict = {}
        # Beside the runs (half the budget) and the scored output's references (a quarter), the
        # original's entries, exits and output, and this step's current run, an eighth each, per piece.
        self._original = RunCache(self.cache_bytes // 2)
        self._kept = RunCache(self.cache_bytes // 2)
        self._identities()

    def also_held(self) -> list[str]:
        return [u.exit for u in self.ctx.units]

    def _fit(self, channels: int) -> LinearFit:
        # Ranking candidates needs their maps roughly: a subsample of each
        # batch's rows (at least SEARCH_ROWS_PER_CHANNEL per channel), float32 products.
        return LinearFit(channels, self.form, rows_per_update=max(SEARCH_ROWS_PER_CHANNEL * channels, 2048),
                         product=np.float32)

    def make_runner(self) -> GatedRunner:
        specs = {k: spec[:3] for k, spec in self.specs.items()}
        return self.ctx.shared_runner(("repaired", self.kind.output, tuple(sorted(specs.items()))), lambda: GatedRunner(
            self.ctx.model, self.ctx.units, [self.kind.output], provider=self.ctx.provider,
            transform=lambda gated: add_runtime_maps(gated, specs), also_expose=[u.exit for u in self.ctx.units]))

    def _feed_map(self, k: int, weight: np.ndarray, bias: np.ndarray) -> None:
        axis, rank, _, channels = self.specs[k]
        if weight.ndim == 1:  # a diagonal map, fed as the full one it is
            weight = np.diag(weight)
        w, b = stored(weight, bias, form="full", axis=axis, rank=rank)
        name_w, name_b = runtime_map_inputs(k)
        self.map_feed[name_w], self.map_feed[name_b] = w, b

    def _identities(self) -> None:
        for k, (_, _, _, channels) in self.specs.items():
            self._feed_map(k, np.eye(channels), np.zeros(channels))

    def _original_run(self, start: int, feed: dict) -> dict[str, np.ndarray]:
        """The original network's exposed tensors for the piece from `start` (all gates off)."""
        return self._original.get(start, lambda: self.full_run(feed, set(), entries=True))

    def current(self, start: int, feed: dict, removed: set[int]) -> dict[str, np.ndarray]:
        """This step's network (S bypassed, S's maps fed) for the piece from `start`."""
        if not removed:
            return self._original_run(start, feed)
        return self._kept.get(start, lambda: self.full_run(feed, removed, entries=True))

    def step(self) -> None:
        self.runner.extra_feed = self.map_feed  # this search's maps (the runner is shared)
        # Overflowing activations make non-finite maps and scores: scored as such (fidelity.py), never warned.
        with np.errstate(all="ignore"):
            super().step()

    def prepare(self, removed: set[int], candidates: list[int]) -> None:
        """Every candidate's cut map, fitted on all the selection samples
        (read back where a search on this context fitted it already)."""
        units = self.ctx.units
        self._kept.clear()
        self.merged = {k: next(c for c in cuts_of(units, removed | {k}) if k in c.units) for k in candidates}
        measured = self.ctx.measured
        key = (self.measured_key, frozenset(removed), "map")
        todo = [k for k in candidates if (key, k) not in measured]
        fits = {k: self._fit(self.specs[self.merged[k].units[0]][3]) for k in todo}
        pieces = self.pieces(0, self.samples.n, f"damage step {len(self.order) + 1}: repair fits") if todo else []
        for a, feed in pieces:
            original = self._original_run(a, feed)
            current = self.current(a, feed, removed)
            mask = self.measure.mask(feed)
            for k in todo:
                cut = self.merged[k]
                axis = self.specs[cut.units[0]][0]
                fits[k].update(as_rows(current[units[cut.units[0]].entry], axis, mask),
                               as_rows(original[cut.exit], axis, mask))
        for k in todo:
            measured[key, k] = fits[k].solve()[:2]
        self.maps = {k: measured[key, k] for k in candidates}

    def extension(self, feed: dict, removed: set[int], k: int, current: dict) -> dict[str, np.ndarray]:
        """The network bypassing `removed | {k}` with every cut repaired: from the
        exit of k's cut, fed its map of what the current network reads at its entry."""
        units = self.ctx.units
        cut = self.merged[k]
        value = apply_fitted(current[units[cut.units[0]].entry], *self.maps[k], self.specs[cut.units[0]][0])
        return self.runner.run_extension(feed, removed | {k}, cut.units[-1], current, value=value)

    def chosen(self, removed: set[int]) -> None:
        best = self.order[-1]
        for k in self.merged[best].units:  # the cut's other units pass their entry on; its last one maps
            channels = self.specs[k][3]
            self._feed_map(k, np.eye(channels), np.zeros(channels))
        self._feed_map(self.merged[best].units[-1], *self.maps[best])
        self._kept.clear()
