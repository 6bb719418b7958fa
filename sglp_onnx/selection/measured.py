"""One run's measuring and choosing: the criterion's selection for the
budget, the removal suggestions, the held-out fidelity of each and their
repairs, as plain data the report is built from."""

from __future__ import annotations

from dataclasses import dataclass

from ..evidence import Context, Executor
from ..evidence.budget import parse_size
from ..evidence.held_out import HeldOut
from ..progress import Progress, timed
from ..report.build import fidelity_records, repair_notes
from .budget import select_for_budget, suggest_removals
from .criteria import Criterion, Selection


@dataclass
class Measured:
    """What `measure_and_select` found: the choice, the suggestions (each
    with its fidelity records), the chosen set's fidelity record and repair
    (`repair.RepairOutcome`; None: none ran), the notes, the calibration
    pass's evidence (None: none ran), the scored output and the samples of
    the validation run."""

    n_remove: int
    selection: Selection
    suggestions: list[dict] | None
    fidelity: dict
    repair: object | None
    notes: list[str]
    evidence: object | None
    kind: object
    validation_rows: int


def measure_and_select(model, units, data, held_out, total_flops: int, chosen: Criterion, opts, paired, *,
                       suggest, only_measure: bool, timings: dict[str, float],
                       progress: Progress | None, executor: Executor) -> Measured:
    """Choose with `chosen` on `data` (the selection samples) for the budget
    of `opts` (`options.SelectionOptions`), suggest removal sets for the
    FLOPs fractions `suggest`, and measure each on `held_out` (else `data`),
    repaired where --repair helps; `paired` (`paired.PairedModel`) gives
    gradient criteria their gradients. `executor` runs the calibration pass
    and the held-out fidelity (piecewise: `--sequential`, no repair)."""
    loss_note = f"GradNorm loss: {paired.loss_description(data)}" if paired is not None else None

    def gradnorm_fn():
        batches = data.batches(ctx.gradient_rows())
        return paired.gradnorm(progress(batches, "gradients") if progress else batches)

    ctx = Context(model=model, units=units, calib=data, batch_size=opts.batch_size, provider=opts.provider,
                  seed=opts.seed, segments=opts.segments, gradnorm_fn=gradnorm_fn if paired else None,
                  progress=progress, timings=timings, executor=executor,
                  flops_budget=opts.target_flops is not None,
                  repair="none" if executor.piecewise else opts.repair, fidelity_output=opts.fidelity_output,
                  budget=parse_size(opts.activation_budget))
    held = HeldOut(ctx, held_out if held_out is not None else data)
    with timed(timings, "selection", progress):
        n_remove, selection, notes = select_for_budget(
            chosen, ctx, units, total_flops, opts, only_measure=only_measure,
            loss_of=lambda removed: held.loss_of(removed, form=opts.repair, fit_data=data, progress=progress))
    suggestions = None
    if suggest:
        with timed(timings, "suggestions", progress):
            suggestions = suggest_removals(chosen, ctx, units, total_flops, suggest)
    runner_used = ctx.runner_used
    # The search's sessions go before the held-out runs: theirs expose every
    # unit entry, which ONNX Runtime would keep through each run.
    ctx.release()
    with timed(timings, "fidelity", progress):
        sets = [selection.removed] + [x["removed"] for x in suggestions or [] if x["achievable"]]
        plain_records = held.records(*sets)
        if only_measure:  # what removing the unit would cost: the damage a criterion weighs
            from ..report.summary import fidelity_text

            notes.append(f"bypassing {units[0].name} alone would give {fidelity_text(held.records([0])[0])} on "
                         "the held-out samples")
    evidence = ctx.evidence_if_computed
    # Validation compares the first run of the calibration pass, or a run that fits the budget.
    validation_rows = evidence.rows if evidence is not None and evidence.rows else \
        (ctx.output_rows() if not executor.piecewise else opts.batch_size)
    notes = list(selection.notes) + notes
    kind = ctx.output_kind()
    ctx.release()
    # Repair: fitted on the selection samples, kept where the held-out fidelity improves.
    outcomes = [None] * len(sets)
    if opts.repair != "none" and executor.piecewise and selection.removed:
        notes.append(f"--repair {opts.repair} was not applied: fitting the maps runs the whole model, which "
                     "--sequential avoids; run without --sequential where the model fits in memory")
    elif opts.repair != "none":
        with timed(timings, "repair", progress):
            outcomes = [held.repaired(s, r, form=opts.repair, fit_data=data, progress=progress) if s else None
                        for s, r in zip(sets, plain_records)]
            held.release()
    fidelity = fidelity_records(plain_records, outcomes, suggestions, kind, data, held_out)
    repair = outcomes[0]
    if repair is not None:
        notes += repair_notes(repair, units)
    if executor.piecewise and runner_used:
        notes.append(f"--criterion {opts.criterion} ran the whole model (its gated graph) to measure damage: "
                     "--sequential kept only the calibration pass, the fidelity and the validation to one piece "
                     "at a time; for a model larger than memory use --criterion sglp")
    if loss_note is not None and ctx.gradnorm_computed:
        notes.append(loss_note)
    return Measured(n_remove=n_remove, selection=selection, suggestions=suggestions, fidelity=fidelity,
                    repair=repair, notes=notes, evidence=evidence, kind=kind, validation_rows=validation_rows)
