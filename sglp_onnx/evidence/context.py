"""The measuring context of one run: what the criteria, the held-out
fidelity and validation measure with, each part computed on first use and
at most once.

A `Context` holds the model, its units and the selection samples, and
computes lazily: the calibration pass (`calibration_pass.collect_evidence`,
run whole or piecewise by its `Executor`), GradNorm (from the paired torch
model), the scored output (`fidelity.output_kind`), the gated graph's runner
(`gated_runner.GatedRunner`) and the activation budget's rows. It times the
calibration pass and GradNorm into the run's timings and, with `release`,
closes its sessions before the next stage opens its own.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from ..errors import UserError
from ..files.calibration import CalibrationSet
from ..progress import clocked
from ..units.discovery import PrunableUnit
from .budget import BACKWARD_COPIES, METER_COPIES, ActivationBudget
from .calibration_pass import Evidence, collect_evidence
from .executor import Executor


@dataclass
class Context:
    """One run's measuring: everything a criterion, the held-out fidelity and
    validation's batch size read; expensive parts are computed on first use."""

    model: onnx.ModelProto
    units: Sequence[PrunableUnit]
    calib: CalibrationSet | None
    batch_size: int = 64
    provider: str = "cpu"
    seed: int = 0
    segments: int | None = None
    # Returns GradNorm per unit, or None when no paired torch model was given.
    gradnorm_fn: Callable[[], np.ndarray] | None = None
    progress: Callable[[Iterator, str], Iterator] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # Per-criterion state that must survive repeated select() calls on this
    # context (`--target-flops` asks for n = 1, 2, ...), keyed by criterion name.
    cache: dict[str, object] = field(default_factory=dict)
    # What greedy searches measured (a candidate's meter after a round, its
    # repair map), shared with the copies `dataclasses.replace` makes: the
    # per-FLOP search of analyze's suggestions reads the per-unit search's
    # measurements of the removal sets both reach (`search.GreedySearch.score`).
    measured: dict = field(default_factory=dict)
    # How the calibration pass and the held-out fidelity run the model (whole,
    # or piecewise with `--sequential`); the gated runner always runs it whole.
    executor: Executor = Executor.WHOLE
    # The budget is in FLOPs (`--target-flops`): measured-damage criteria
    # then rank by damage per FLOP removed.
    flops_budget: bool = False
    # The repair form (`--repair`): measured-damage criteria score candidates repaired unless "none".
    repair: str = "none"
    # The graph output fidelity and measured damage score (`--fidelity-output`;
    # None: chosen by `fidelity.output_kind`).
    fidelity_output: str | None = None
    # Bytes of activations a stage may hold at once (`--activation-budget`, evidence.budget).
    budget: int = 768 * 2**20
    _evidence: Evidence | None = None
    _sizes: dict[str, int] | None = None
    _gradnorm: np.ndarray | None = None
    _runner: object | None = None
    _output_runner: object | None = None
    # Other runners built once per run (the repair-aware search's), by key: one
    # dict shared with the copies `dataclasses.replace` makes, like `measured`.
    runners: dict = field(default_factory=dict)
    _output_kind: object | None = None

    def output_kind(self):
        """Which output is scored and how (fidelity.output_kind), computed once."""
        if self._output_kind is None:
            from .fidelity import output_kind

            self._output_kind = output_kind(self.model, self.fidelity_output)
        return self._output_kind

    def _gated_runner(self, *, entries: bool):
        from .gated_runner import GatedRunner

        return GatedRunner(self.model, self.units, [self.output_kind().output], provider=self.provider,
                           entries=entries)

    def runner(self):
        """The gated graph's runner for the scored output (gated_runner.GatedRunner), built once."""
        if self._runner is None:
            self._runner = self._gated_runner(entries=True)
        return self._runner

    def shared_runner(self, key, build: Callable[[], object]):
        """The runner `build()` makes, built once per run and shared with this
        context's copies (the per-FLOP search of analyze's suggestions): a
        user of one must set whatever state it feeds before each of its runs."""
        if key not in self.runners:
            self.runners[key] = build()
        return self.runners[key]

    def output_runner(self):
        """A runner for the network's outputs only (held-out fidelity): the
        criteria's runner while it is live, else one built once that exposes
        no unit entries, so ONNX Runtime does not keep them through each run."""
        if self._runner is not None:
            return self._runner
        if self._output_runner is None:
            self._output_runner = self._gated_runner(entries=False)
        return self._output_runner

    def require_calibration(self, who: str) -> None:
        """The one refusal of a criterion run without calibration data."""
        if self.calib is None:
            raise UserError(f"{who} needs calibration data: pass --calib CALIB.npz or put MODEL.calib.npz "
                            "beside the model")

    def evidence(self) -> Evidence:
        """The calibration pass's evidence, computed on first use (its seconds: `timings["calibration"]`)."""
        if self._evidence is None:
            self.require_calibration("this criterion")
            progress = (lambda it: self.progress(it, "calibration")) if self.progress else None
            with clocked(self.timings, "calibration"):
                self._evidence = collect_evidence(self.model, self.calib, self.units, batch_size=self.batch_size,
                                                  provider=self.provider, progress=progress,
                                                  executor=self.executor, budget=self.budget)
        return self._evidence

    def activation_budget(self) -> ActivationBudget:
        """The budget with the bytes per sample of every unit entry and exit
        and of the graph outputs: the calibration pass's when it ran, else
        measured on one sample."""
        if self._evidence is not None and self._evidence.sizes:
            return ActivationBudget(self.budget, self._evidence.sizes)
        if self._sizes is None:
            from .activations import probe
            from .budget import bytes_per_sample

            names = list(dict.fromkeys([u.entry for u in self.units] + [u.exit for u in self.units]))
            feed = self.calib.first(1)
            self._sizes = bytes_per_sample(probe(self.model, feed, names, provider=self.provider),
                                           next(iter(feed.values())).shape[0])
        return ActivationBudget(self.budget, self._sizes)

    def rows(self, tensors: Sequence[str] = (), *, copies: dict[str, float] | None = None) -> int:
        """Samples per run for a stage holding `tensors` and `copies` of others
        (`ActivationBudget.held`) within the budget: `batch_size` or fewer."""
        if self.calib is None:
            return self.batch_size
        budget = self.activation_budget()
        return budget.rows(budget.held(tensors, copies=copies), self.batch_size)

    def gradient_rows(self) -> int:
        """Samples per torch forward and backward (GradNorm, gradients summed: exact)."""
        exits = {u.exit: BACKWARD_COPIES for u in self.units}
        return self.rows(copies={**exits, self.output_kind().output: METER_COPIES})

    def output_rows(self) -> int:
        """Samples per run for fidelity and validation: the original's and a
        pruned network's scored output, and the meter's temporaries."""
        return self.rows(copies={self.output_kind().output: METER_COPIES})

    def release(self) -> None:
        """Close the gated graph's sessions and drop the criteria's state, so
        that the next stage's sessions do not sit beside them. What a
        reference cycle still holds is collected now; a full collection runs
        only then (it takes 0.2 s and more in a process that has imported
        torch and transformers, and most releases free everything at once)."""
        released = [self._runner, self._output_runner, *self.runners.values(), *self.cache.values()]
        watched = [weakref.ref(x) for x in released if x is not None and _weakrefable(x)]
        self._runner = self._output_runner = None
        self.runners.clear()
        self.cache.clear()
        del released
        if any(ref() is not None for ref in watched):
            gc.collect()  # the searches' sessions, cached runs and sample copies, now

    @property
    def runner_used(self) -> bool:
        """True once a criterion ran the whole gated graph (`runner`)."""
        return self._runner is not None

    @property
    def evidence_if_computed(self) -> Evidence | None:
        """The calibration pass's evidence when a criterion needed it, else None (no pass is run)."""
        return self._evidence

    @property
    def gradnorm_computed(self) -> bool:
        return self._gradnorm is not None

    @property
    def has_torch_model(self) -> bool:
        return self.gradnorm_fn is not None

    def gradnorm(self, criterion: str) -> np.ndarray:
        if self.gradnorm_fn is None:
            raise UserError(f"--criterion {criterion} needs gradients: pass the paired torch model with "
                            "--torch-model MODULE:FACTORY (and --torch-weights FILE)")
        if self._gradnorm is None:
            with clocked(self.timings, "gradnorm"):
                self._gradnorm = self.gradnorm_fn()
        return self._gradnorm


def _weakrefable(value) -> bool:
    try:
        weakref.ref(value)
    except TypeError:  # tuples, lists, numbers: the cache's plain results
        return False
    return True
