"""Running removal sets without writing them: the runners of the gated graph.

`GatedRunner` holds ONNX Runtime sessions on the gated graph that
`surgery.gating` builds (one gated copy of the model, a suffix session per
candidate unit, or the candidates side by side) and runs the original
network, any removal set, and single-unit extensions of one.
Measured-damage and similarity criteria, and
the fidelity in every report, run their candidates through these.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

from ..files.calibration import fixed_batch, model_inputs
from ..files.model_files import initializer_bytes
from ..graph.runtime import ORT_ERRORS, PREPACK_MAX_BYTES, make_session, session_with_outputs
from ..surgery.gating import (COPY_PREFIX, STACK_PREFIX, arithmetic_gates, batched_suffix_model, gated_model,
                              stacked_suffix_model, suffix_model)
from ..units.discovery import PrunableUnit, static_shapes

# The original network's value of a scored tensor is kept across greedy steps up to this size
# (cka-removal's references, `selection.criteria.search.RunCache`).
REFERENCE_CACHE_BYTES = 256 * 2**20
# Suffix sessions alive at once hold at most this many bytes of weights, or the
# model's own weights when larger: with the full session, twice the weights.
# Above it the candidates run side by side in one session that reads the
# weights once (`run_extensions`): a ResNet-50's twelve suffix sessions would
# hold 0.6 GiB of weights and as much again packed, beside its 0.1 GiB.
SUFFIX_BUDGET_BYTES = 128 * 2**20
# Side by side, the candidates' rows are stacked in one stream where the graph
# allows it (`surgery.gating.stacked_suffix_model`) and the weights outweigh
# the stacked activations (`GatedRunner._run_stacked`), else each has its own copy.
STACK_CANDIDATES = True


class GatedRunner:
    """Runs the original network, any removal set, and single-unit extensions of one.

    `targets` are the tensors the caller scores (a representation, the first
    graph output). A full run returns them and, with `entries`, every unit's
    entry: what a suffix run of a candidate unit starts from.
    """

    def __init__(self, model: onnx.ModelProto, units: Sequence[PrunableUnit], targets: Sequence[str], *,
                 provider: str = "cpu", transform=None, also_expose: Sequence[str] = (), entries: bool = True) -> None:
        self.units = list(units)
        self.targets = list(dict.fromkeys(targets))
        # A model whose inputs fix the batch dimension may compute with it (a
        # Reshape to it): the candidates' copies then always run every row.
        self.rows_free = fixed_batch(model_inputs(model)) is None
        self.provider = provider
        self.gated, self.gates = gated_model(model, self.units)
        # `transform(gated)` edits the gated graph in place before any session
        # (runtime repair maps: repair.graph.add_runtime_maps); the inputs it
        # adds are fed from `extra_feed` on every run.
        if transform is not None:
            transform(self.gated)
        # Last: the gates that can run as arithmetic do, which ONNX Runtime optimizes better.
        arithmetic_gates(self.gated, static_shapes(self.gated)[1])
        self.extra_feed: dict[str, np.ndarray] = {}
        # Every exposed tensor is a graph output of the session, which ONNX
        # Runtime keeps for the whole run even when it is not fetched: a
        # runner for outputs only (`entries=False`) exposes no unit entries
        # (ResNet-50 at 224x224: 5 MiB of working memory per sample instead of 24).
        self.entries = entries
        exposed = ([u.entry for u in self.units] if entries else []) + list(also_expose)
        self.exposed = self.targets + [n for n in dict.fromkeys(exposed) if n not in self.targets]
        self.weights = initializer_bytes(model)
        self.budget = max(SUFFIX_BUDGET_BYTES, self.weights)
        # Its sessions run every step of a search: packed ahead where the packed copies stay small.
        self.prepack = self.weights <= PREPACK_MAX_BYTES
        self.full = session_with_outputs(self.gated, self.exposed, provider, prepack=self.prepack)
        self.full_inputs = {i.name for i in self.full.get_inputs()}
        self._suffix: dict[int, tuple[object, set[str]]] = {}
        self._suffix_sizes: dict[int, int] = {}
        self._batched_key: tuple[int, ...] | None = None
        self._batched: tuple[object, set[str]] | None = None
        self._stacked: tuple[object, set[str], list[int]] | None = None
        self._stackable = STACK_CANDIDATES

    def gate_feed(self, removed: set[int] | frozenset[int]) -> dict[str, np.ndarray]:
        return {g: np.array(k in removed) for k, g in enumerate(self.gates)}

    def run(self, feed: dict[str, np.ndarray], removed, *, entries: bool = False) -> dict[str, np.ndarray]:
        """Targets (and unit entries) of the network with `removed` bypassed."""
        if entries and not self.entries:
            raise ValueError("this runner exposes no unit entries (built with entries=False)")
        names = self.exposed if entries else self.targets
        run_feed = {**{k: v for k, v in {**feed, **self.extra_feed}.items() if k in self.full_inputs},
                    **self.gate_feed(set(removed))}
        return dict(zip(names, self.full.run(names, run_feed)))

    def _suffix_session(self, unit: int, dtype: np.dtype):
        if unit not in self._suffix:
            model = suffix_model(self.gated, self.units[unit].exit, dtype, self.targets)
            self._suffix_sizes[unit] = initializer_bytes(model)
            session = make_session(model, self.provider, prepack=self.prepack)
            self._suffix[unit] = (session, {i.name for i in session.get_inputs()})
        return self._suffix[unit]

    def run_extensions(self, feed: dict[str, np.ndarray], removed, candidates: Sequence[int],
                       current: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]] | None:
        """`run_extension` for every candidate in one session run of a
        `batched_suffix_model`: the weights loaded once, where one suffix
        session per candidate would not fit the weight budget (a large model).
        None where one session per candidate is the better choice (on CPU the
        side-by-side run takes as long as the separate ones, and ONNX
        Runtime optimizes the big graph more slowly than the small ones) or
        where the graph does not allow it. The session is built for a
        superset of the candidates and kept across greedy steps; a copy
        whose unit is not a candidate runs on one sample (ONNX Runtime runs
        every node of a session whatever outputs are asked for) where the
        model's batch dimension is not fixed (each copy reads its own copy
        of the model's inputs: a mask, positions), else on every sample, and
        then the session is rebuilt once the candidates are fewer than half
        of its copies."""
        if self.fits_apart(candidates):
            return None
        if self.rows_free and self._stackable:
            stacked = self._run_stacked(feed, removed, candidates, current)
            if stacked is not None:
                return stacked
        built = self._batched_key
        if built is None or not set(candidates) <= set(built) or \
                (2 * len(candidates) < len(built) and not self.rows_free):
            self._batched = None  # release the previous session first
            model = batched_suffix_model(self.gated, self._starts(candidates, current), self.targets, self.gates)
            self._batched_key = tuple(candidates)
            if model is not None:
                # The copies share weights: packing them ahead of time would
                # hold them twice while the session is made.
                session = make_session(model, self.provider, prepack=False)
                self._batched = (session, {i.name for i in session.get_inputs()})
        if self._batched is None:
            return None
        session, inputs = self._batched
        wanted = set(candidates)
        run_feed = {}
        for k in self._batched_key:  # the other copies are computed and ignored
            prefix = f"{COPY_PREFIX}{k}/"
            start = current[self.units[k].entry]
            rows = slice(None) if k in wanted or not self.rows_free else slice(0, 1)
            for name, value in feed.items():  # calibration arrays hold one row per sample
                if prefix + name in inputs:
                    run_feed[prefix + name] = value[rows] if value.ndim and len(value) == len(start) else value
            for name, value in {**self.extra_feed, **self.gate_feed(set(removed) | {k})}.items():
                if prefix + name in inputs:
                    run_feed[prefix + name] = value
            run_feed[prefix + self.units[k].exit] = start[rows]
        names = [f"{COPY_PREFIX}{k}/{t}" for k in candidates for t in self.targets]
        values = iter(session.run(names, run_feed))
        return {k: {t: next(values) for t in self.targets} for k in candidates}

    def _run_stacked(self, feed: dict[str, np.ndarray], removed, candidates: Sequence[int],
                     current: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]] | None:
        """`run_extensions` through a `stacked_suffix_model`, built for a
        superset of the candidates and kept: the copies of units not scored
        run on one sample. None where the graph cannot stack its rows."""
        if self._stacked is None or not set(candidates) <= set(self._stacked[2]):
            self._stacked = None  # release the previous session first
            # Stacking reads each weight once per run instead of once per copy,
            # and makes every activation as large as all the copies' together:
            # it pays where the weights outweigh those activations. Measured
            # (`compress --remove 4`, the side-by-side runs' seconds): the 1 GiB
            # MLP 12.6-13.9 s stacked against 23.9-25.2 s apart; ResNet-50 at
            # 224x224 (0.1 GiB of weights, 3 MiB per image at a unit entry)
            # 97 s against 62 s, its stacked activations mapped afresh each run.
            stream = max(current[self.units[k].entry].nbytes for k in candidates) * len(candidates)
            if stream > self.weights:
                self._stackable = False
                return None
            # A unit with companions (a quantized entry's scale) is bypassed by its gates, not by a join.
            made = None if any(self.units[k].companions for k in candidates) else \
                stacked_suffix_model(self.gated, self._starts(candidates, current), self.targets, self.gates)
            if made is None:
                self._stackable = False
                return None
            model, order = made
            session = make_session(model, self.provider, prepack=False)
            self._stacked = (session, {i.name for i in session.get_inputs()}, order)
        session, inputs, order = self._stacked
        wanted = set(candidates)
        run_feed = {k: v for k, v in {**self.extra_feed, **self.gate_feed(set(removed))}.items() if k in inputs}
        bounds = [0]
        for k in order:
            start = current[self.units[k].entry]
            run_feed[f"{STACK_PREFIX}{k}"] = start if k in wanted else start[:1]
            bounds.append(bounds[-1] + len(run_feed[f"{STACK_PREFIX}{k}"]))
        try:
            values = session.run(self.targets, run_feed)
        except ORT_ERRORS:  # a node the structure check let through computes across rows: copies, then
            self._stacked, self._stackable = None, False
            return None
        return {k: {t: v[bounds[i]:bounds[i + 1]] for t, v in zip(self.targets, values)}
                for i, k in enumerate(order) if k in wanted}

    def _starts(self, candidates: Sequence[int], current: dict[str, np.ndarray]) -> dict[int, tuple[str, int]]:
        """Where each candidate's suffix starts: its unit's exit, typed as its entry's value (ONNX type)."""
        dtype = onnx.helper.np_dtype_to_tensor_dtype
        return {k: (self.units[k].exit, dtype(current[self.units[k].entry].dtype)) for k in candidates}

    def _suffix_size(self, unit: int) -> int:
        if unit not in self._suffix_sizes:
            # The dtype only types the new input; the weights are what is counted.
            model = suffix_model(self.gated, self.units[unit].exit, np.float32, self.targets)
            self._suffix_sizes[unit] = initializer_bytes(model)
        return self._suffix_sizes[unit]

    def batchable(self) -> bool:
        """True when `run_extensions` can put candidates side by side (no node has a subgraph)."""
        return not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for node in self.gated.graph.node for a in node.attribute)

    def fits_apart(self, units: Sequence[int]) -> bool:
        """True when one suffix session per unit of `units` fits the weight budget together."""
        return len(units) * self.weights <= self.budget

    def suffix_groups(self, units: Sequence[int]) -> list[list[int]]:
        """`units` in consecutive groups whose suffix sessions together hold at
        most the runner's weight budget (a unit alone always makes a group);
        one group unless the model is large."""
        if self.fits_apart(units):
            return [list(units)] if units else []
        groups: list[list[int]] = []
        used = self.budget
        for unit in units:
            size = self._suffix_size(unit)
            if groups and used + size <= self.budget:
                groups[-1].append(unit)
                used += size
            else:
                groups.append([unit])
                used = size
        return groups

    def release_suffixes(self) -> None:
        """Close the suffix sessions unless every unit's would fit the budget together."""
        if not self.fits_apart(self.units):
            self._suffix.clear()

    def run_extension(self, feed: dict[str, np.ndarray], removed, unit: int,
                      current: dict[str, np.ndarray], value: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Targets with `removed | {unit}` bypassed, from `current` (a full run of
        `removed` with entries): a partial pass from `unit` on. `value`, when
        given, is what the network reads at `unit`'s exit instead of its entry
        (a repair map's output)."""
        entry_value = current[self.units[unit].entry] if value is None else value
        session, inputs = self._suffix_session(unit, entry_value.dtype)
        # The unit's own gate stays in the suffix for its companions (the
        # entry's scale and zero point): it must be set with the entry fed.
        run_feed = {**feed, **self.extra_feed, **self.gate_feed(set(removed) | {unit}),
                    self.units[unit].exit: entry_value}
        values = session.run(self.targets, {k: v for k, v in run_feed.items() if k in inputs})
        return dict(zip(self.targets, values))
