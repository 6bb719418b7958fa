"""The compression pipeline end to end: `compress` and `analyze`.

Each stage is a function of plain data in its own module; this module only
sequences them, times them and assembles the report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import onnx

from .errors import InternalError, UserError, ValidationError
from .files.calibration import CalibrationSet, load_calibration, sidecar_path, synthetic_calibration
from .files.model_files import (atomic_paths, beside, check_name_length, check_output_path, external_bytes,
                                external_data_folder, files_size, load_model_files, model_files_for, proto_size,
                                refuse_inputs, write_model_files)
from .graph.flops import model_params
from .options import DEFAULT_CRITERION, DEFAULT_RATIO, SelectionOptions  # noqa: F401 (the defaults, re-exported)
from .paired.pairing import PairedModel
from .progress import PAUSE_ENV, Progress, pause_point, stage  # noqa: F401 (PAUSE_ENV: the tests' hook)
from .report.build import analysis_report
from .report.summary import analysis_summary, summary, to_json
from .evidence.budget import parse_size
from .selection.budget import budget_to_count, max_loss_count, suggest_removals
from .selection.criteria import Context, Selection, get_criterion
from .surgery.kv_cache import (genai_config_source, genai_config_target, genai_support_files, other_model_files,
                               renumber_kept_cache, updated_genai_config)
from .surgery.remove import dropped_weight_inputs, remove_units
from .surgery.validation import validate
from .units.discovery import PrunableUnit, discover
from .units.patterns import finish as finish_patterns
from .units.patterns import prepare as prepare_patterns

# FLOPs fractions `analyze` suggests removal sets for.
DEFAULT_SUGGESTIONS = (0.10, 0.25, 0.50)



@dataclass
class Analysis:
    """Everything `analyze` finds; `compress` adds the pruned model and output paths."""

    model: onnx.ModelProto
    units: list[PrunableUnit]
    selection: Selection
    report: dict
    calib: CalibrationSet
    total_flops: int
    timings: dict[str, float] = field(default_factory=dict)
    # The file as loaded, when the patterns rewrote it into `model` (a fused
    # graph with its joins made visible); None when `model` is the file.
    source_model: onnx.ModelProto | None = None
    rewrites: list = field(default_factory=list)
    # The input's files: the model, then its external data files.
    input_files: list[Path] = field(default_factory=list)
    # The original's outputs on the first calibration batch, when the
    # calibration pass computed them (what validation compares with).
    first_outputs: dict | None = None
    validation_rows: int = 64  # samples of the validation run
    # The chosen removal set's repair (repair.stage.RepairOutcome); None with --repair none.
    repair: object | None = None

    @property
    def removed_units(self) -> list[PrunableUnit]:
        return [self.units[i] for i in self.selection.removed]

    def summary(self) -> str:
        """The analysis table, segments and removal suggestions, as printed by `sglp-onnx analyze`."""
        return analysis_summary(self.report)


@dataclass
class CompressionResult(Analysis):
    pruned: onnx.ModelProto | None = None
    output: Path | None = None
    report_path: Path | None = None

    def summary(self) -> str:
        """What was removed and what it saved, as printed by `sglp-onnx compress`."""
        return summary(self.report)


@contextmanager
def _timed(timings: dict[str, float], name: str, progress: Progress | None = None):
    pause_point(name)
    start = time.perf_counter()
    try:
        with stage(progress, name):
            yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


# What the pruned model is called in messages (and in `_analyze`'s `outputs`).
OUTPUT_MODEL = "output model"


def default_output(model_path: Path) -> Path:
    return beside(model_path, ".pruned.onnx")


def default_report(output: Path) -> Path:
    return beside(output, ".json")


def run_inputs(model_path: Path, opts: SelectionOptions, *, extra: Sequence[Path] = ()) -> list[Path]:
    """Every file a run on `model_path` reads that is known before the model
    is loaded: the model, the calibration file (`--calib`, else the sidecar
    `MODEL.calib.npz`), the torch weights, the files of an `hf:DIR` paired
    model, and `extra` (the genai config and tokenizer files it copies). The
    model's external data files are added once it is loaded (`_analyze`). No
    output of any kind may be one of them (`check_output_path`)."""
    paths = [model_path]
    if opts.calib is not None:
        paths.append(Path(opts.calib))
    elif sidecar_path(model_path).is_file():
        paths.append(sidecar_path(model_path))
    if opts.torch_weights is not None:
        paths.append(Path(opts.torch_weights))
    if opts.torch_model is not None:
        from .paired.hf_model import HF_PREFIX, is_hf_spec

        if is_hf_spec(opts.torch_model):
            folder = Path(opts.torch_model[len(HF_PREFIX):])
            if folder.is_dir():
                paths.extend(p for p in folder.iterdir() if p.is_file())
    return paths + list(extra)


def _check_writable(path: Path, *, force: bool, what: str, inputs: Sequence[Path]) -> None:
    check_output_path(path, force=force, what=what, inputs=inputs)


def _load_calibration(model_path: Path, model: onnx.ModelProto, calib: str | None, *, needed: bool,
                      max_samples: int | None, seed: int) -> CalibrationSet:
    if calib is not None:
        from .tools.calib import SOURCE_SUFFIXES, calibration_data

        if Path(calib).is_dir() or (Path(calib).is_file() and Path(calib).suffix.lower() in SOURCE_SUFFIXES):
            # A folder of images or a text file: made into a set as `sglp-onnx calib` makes one.
            from .files.calibration import check_calibration

            made = calibration_data(model_path, [calib], model=model, seed=seed)
            return check_calibration(made.arrays, model, source=f"the calibration set made from {calib}",
                                     max_samples=max_samples)
        return load_calibration(calib, model, max_samples=max_samples)
    sidecar = sidecar_path(model_path)
    if sidecar.is_file():
        return load_calibration(sidecar, model, max_samples=max_samples)
    if needed:
        raise UserError(f"no calibration data: pass --calib CALIB.npz or put {sidecar.name} beside the model")
    return synthetic_calibration(model, seed=seed)


def pair_units_of(model_path: str | os.PathLike, module, arrays: dict, *, granularity: str,
                  provider: str = "cpu") -> dict:
    """The pairing record (a report's `pairing`) of the units of the model at
    `model_path` with the torch `module`, matched on the calibration `arrays`:
    what `compress --torch-model` records, for a report written without it."""
    from .files.calibration import check_calibration
    from .paired.pairing import cache_inputs, check_empty_cache, pair

    with external_data_folder(Path(model_path).parent):
        source_model, _ = load_model_files(model_path, defer=True)
        model, _ = prepare_patterns(source_model)
        data = check_calibration(arrays, model, source=f"the data checked against {model_path}")
        units, _ = discover(model, data, granularity=granularity, provider=provider)
        if not units:
            raise UserError(f"no prunable unit in {model_path}, the model the report was made from")
        check_empty_cache(data, cache_inputs(model, units))
        return pair(model, module, units, data, provider)[1]


def analyze(model_path: str | os.PathLike, **kwargs) -> Analysis:
    """Find units, measure them and choose which to remove, without writing a model.

    Keyword `options` are the fields of `options.SelectionOptions` (calib,
    remove | ratio | target_flops | max_loss, criterion, segments,
    torch_model, torch_weights, granularity, batch_size, provider, seed,
    sequential, max_calib_samples), the flags of `sglp-onnx compress`.
    `suggest` lists FLOPs fractions for which the report's `suggestions` say
    which units the criterion would remove (None: no suggestions). `plot`
    writes the figure of `plots.plot_report` there as PNG, SVG or PDF by its
    suffix (an existing file only with `force`); nothing else is written.
    `threads` sets the ONNX Runtime and torch threads of this process from
    now on (`runtime.set_threads`; None: leave the setting as it is).
    `progress` wraps long loops (`progress(iterable, label)`).

    A model with external data is worked on without reading its large
    tensors into this process: the returned `model` references them in the
    input's data files (relative to the model's folder).
    """
    from .graph.runtime import blas_threads

    with external_data_folder(Path(model_path).parent), blas_threads():
        return _analyze(model_path, **kwargs)


def _analyze(
    model_path: str | os.PathLike,
    *,
    suggest: Sequence[float] | None = DEFAULT_SUGGESTIONS,
    plot: str | os.PathLike | None = None,
    force: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    outputs: Sequence[tuple[str, Path]] = (),
    measure_single_unit: bool = True,
    **options,
) -> Analysis:
    # `outputs`: (what, path) of the files `compress` will write, checked
    # against the model's external data files as soon as they are known.
    if threads is not None:
        from .graph.runtime import set_threads

        set_threads(threads)
    opts = _selection_options(options, "analyze")
    timings: dict[str, float] = {}
    plot_path = Path(plot) if plot is not None else None
    inputs = run_inputs(Path(model_path), opts)
    if plot_path is not None:
        _check_writable(plot_path, force=force, what="plot", inputs=inputs)
        outputs = [*outputs, ("plot", plot_path)]
    chosen = get_criterion(opts.criterion)
    if opts.segments is not None and not chosen.uses_segments:
        raise UserError(f"--segments K sets the Fisher segments of --criterion sglp; --criterion {opts.criterion} "
                        "does not segment")
    if chosen.needs_torch and opts.torch_model is None:
        raise UserError(f"--criterion {opts.criterion} needs gradients: pass the paired torch model with "
                        "--torch-model MODULE:FACTORY (and --torch-weights FILE)")
    model_path = Path(model_path)
    with _timed(timings, "load", progress):
        source_model, input_files = load_model_files(model_path, defer=True)
        for what, path in outputs:
            refuse_inputs(path, what=what, inputs=input_files)
            if what == OUTPUT_MODEL and len(input_files) > 1:  # its weights will go to OUTPUT.data too
                data_path = path.with_name(path.name + ".data")
                refuse_inputs(data_path, what="output's weights file", inputs=input_files)
                check_name_length(data_path, what="output's weights file")
        model, rewrites = prepare_patterns(source_model)
        data = _load_calibration(model_path, model, None if opts.calib is None else str(opts.calib),
                                 needed=chosen.needs_calibration or opts.torch_model is not None
                                 or opts.max_loss is not None,
                                 max_samples=opts.max_calib_samples, seed=opts.seed)
        all_samples = data.n_samples
        data, held_out = data.split_holdout()
        if opts.fidelity_output is not None:
            from .evidence.fidelity import output_kind

            output_kind(model, opts.fidelity_output)  # an unknown name: exit 2 before any measuring
    with data.explained("--calib"):  # the first run on the data: guessed sizes fail here
        with _timed(timings, "discovery", progress):
            units, total_flops = discover(model, data, granularity=opts.granularity, provider=opts.provider,
                                          sequential=opts.sequential)
    if not units:
        raise UserError(f"no prunable unit in {model_path}: no residual join x + f(x) whose output keeps x's "
                        "shape (projection/downsampling blocks are never candidates; blocks inside If/Loop/Scan "
                        "bodies are not pruned)")

    pairing_info = loss_note = None
    gradnorm_fn = None
    if opts.torch_model is not None:
        with _timed(timings, "pairing", progress):
            paired = PairedModel.load(opts.torch_model, opts.torch_weights, model, units, data,
                                      provider=opts.provider)
        pairing_info = paired.info
        loss_note = f"GradNorm loss: {paired.loss_description(data)}"

        def gradnorm_fn():
            batches = data.batches(ctx.gradient_rows())
            return paired.gradnorm(progress(batches, "gradients") if progress else batches)

    ctx = Context(model=model, units=units, calib=data, batch_size=opts.batch_size, provider=opts.provider,
                  seed=opts.seed, segments=opts.segments, gradnorm_fn=gradnorm_fn, progress=progress,
                  timings=timings, sequential=opts.sequential, flops_budget=opts.target_flops is not None,
                  repair="none" if opts.sequential else opts.repair, fidelity_output=opts.fidelity_output,
                  budget=parse_size(opts.activation_budget))
    fidelity_data = held_out if held_out is not None else data

    def held_out_fidelity(*removal_sets, network=None) -> list[dict]:
        """Held-out fidelity records of `removal_sets` of the input, or of
        `network` = (model, units) (the input with repair maps added)."""
        from .evidence.fidelity import measure_sets, measure_sets_sequential
        from .surgery.gating import GatedRunner

        net_model, net_units = network or (model, units)
        if opts.sequential:
            return measure_sets_sequential(net_model, net_units, ctx.output_kind(), fidelity_data, removal_sets,
                                           batch_size=opts.batch_size, provider=opts.provider)
        runner = ctx.runner() if network is None else GatedRunner(net_model, net_units, [ctx.output_kind().output],
                                                                   provider=opts.provider)
        return measure_sets(runner, ctx.output_kind(), fidelity_data, removal_sets, batch_size=ctx.output_rows())

    def repaired(removed, plain: dict):
        """The repair of `removed` (`repair.repair_removal`), measured against `plain`, its unrepaired record."""
        from .repair.stage import repair_removal

        return repair_removal(model, units, removed, data, form=opts.repair, plain=plain,
                              measure=lambda m, u, r: held_out_fidelity(r, network=(m, u))[0],
                              batch_size=ctx.rows([u.entry for u in units] + [u.exit for u in units]),
                              provider=opts.provider, progress=progress)

    def loss_of(removed) -> dict:
        """What --max-loss reads: the held-out record of the model compress would write."""
        plain = held_out_fidelity(removed)[0]
        if opts.repair == "none" or opts.sequential or not removed:
            return plain
        outcome = repaired(removed, plain)
        return outcome.fidelity if outcome.applied else plain

    budget_notes: list[str] = []
    # `analyze` of a model with one unit and no budget asked for: nothing can
    # go (one unit always stays), but the unit and its measurements are shown.
    only_measure = (len(units) == 1 and measure_single_unit and opts.max_loss is None
                    and all(options.get(k) is None for k in ("remove", "ratio", "target_flops")))
    with _timed(timings, "selection", progress):
        if only_measure:
            n_remove, selection = budget_to_count(chosen, ctx, units, total_flops, remove=0, ratio=None,
                                                  target_flops=None)
            budget_notes.append("the model has one prunable unit and one always stays: nothing can be removed; "
                                "its measurements are shown")
        elif opts.max_loss is None:
            n_remove, selection = budget_to_count(chosen, ctx, units, total_flops, remove=opts.remove,
                                                  ratio=opts.ratio, target_flops=opts.target_flops)
        else:
            n_remove, selection, budget_notes = max_loss_count(
                chosen, ctx, units, total_flops, loss_of, float(opts.max_loss),
                remove=opts.remove, ratio=opts.ratio, target_flops=opts.target_flops)
    # Stages timed inside the criterion (calibration, gradnorm) are not selection time.
    timings["selection"] -= timings.get("calibration", 0.0) + timings.get("gradnorm", 0.0)
    suggestions = None
    if suggest:
        with _timed(timings, "suggestions", progress):
            suggestions = suggest_removals(chosen, ctx, units, total_flops, suggest)
    with _timed(timings, "fidelity", progress):
        from .evidence.fidelity import fidelity_record

        sets = [selection.removed] + [x["removed"] for x in suggestions or [] if x["achievable"]]
        plain_records = held_out_fidelity(*sets)

        if only_measure:  # what removing the unit would cost: the damage a criterion weighs
            from .report.summary import fidelity_text

            alone = held_out_fidelity([0])[0]
            budget_notes.append(f"bypassing {units[0].name} alone would give {fidelity_text(alone)} on the "
                                "held-out samples")

    evidence = ctx.evidence_if_computed
    # Validation compares the first run of the calibration pass, or a run that fits the budget.
    validation_rows = evidence.rows if evidence is not None and evidence.rows else \
        (ctx.output_rows() if not opts.sequential else opts.batch_size)
    notes = list(selection.notes) + budget_notes
    runner_used = ctx.runner_used
    kind = ctx.output_kind()
    ctx.release()
    # Repair: fitted on the selection samples, kept where the held-out fidelity improves.
    outcomes = [None] * len(sets)
    if opts.repair != "none" and opts.sequential and selection.removed:
        notes.append(f"--repair {opts.repair} was not applied: fitting the maps runs the whole model, which "
                     "--sequential avoids; run without --sequential where the model fits in memory")
    elif opts.repair != "none":
        with _timed(timings, "repair", progress):
            outcomes = [repaired(s, r) if s else None for s, r in zip(sets, plain_records)]
    records = iter(zip(plain_records, outcomes))

    def final(pair):
        plain, outcome = pair
        chosen_record = outcome.fidelity if outcome is not None and outcome.applied else plain
        return fidelity_record(chosen_record, kind, data, held_out)

    first = next(records)
    fidelity = final(first)
    repair = first[1]
    for x in suggestions or []:
        if x["achievable"]:
            pair = next(records)
            x["fidelity"] = final(pair)
            x["fidelity_without_repair"] = fidelity_record(pair[0], kind, data, held_out) \
                if pair[1] is not None else None
            x["repaired"] = bool(pair[1] is not None and pair[1].applied)
        else:
            x["fidelity"] = x["fidelity_without_repair"] = None
            x["repaired"] = False
    if repair is not None:
        notes += repair_notes(repair, units)
    if opts.sequential and runner_used:
        notes.append(f"--criterion {opts.criterion} ran the whole model (its gated graph) to measure damage: "
                     "--sequential kept only the calibration pass, the fidelity and the validation to one piece "
                     "at a time; for a model larger than memory use --criterion sglp")
    if loss_note is not None and ctx.gradnorm_computed:
        notes.append(loss_note)
    report = analysis_report(
        model_path=model_path, options=replace(opts, ratio=None) if only_measure else opts, n_remove=n_remove, selection=selection, units=units,
        data=data, held_out=held_out, all_samples=all_samples, evidence=evidence, pairing=pairing_info,
        before={"params": model_params(source_model), "flops": total_flops,
                "file_size": files_size(input_files)},
        suggestions=suggestions, fidelity=fidelity, notes=notes, timings=timings)
    report["repair"] = None if repair is None else {
        **repair.record(units),
        "fidelity_without_repair": fidelity_record(repair.fidelity_without, kind, data, held_out)}
    if plot_path is not None:
        with _timed(timings, "plot", progress), atomic_paths(plot_path) as (tmp,):
            from .report.plots import plot_report

            plot_report(report, tmp)
    return Analysis(model=model, units=units, selection=selection, report=report, calib=data,
                    total_flops=total_flops, timings=timings,
                    source_model=None if model is source_model else source_model, rewrites=rewrites,
                    input_files=input_files, first_outputs=evidence.first_outputs if evidence else None,
                    validation_rows=validation_rows,
                    repair=repair)


def repair_notes(outcome, units) -> list[str]:
    """The report's notes on one removal set's repair (also printed)."""
    notes = list(outcome.skipped)
    if outcome.applied:
        notes.append(f"repair: {len(outcome.repairs)} cut(s) mapped ({outcome.form}; "
                     f"{sum(r.params for r in outcome.repairs):,} parameters); held-out score "
                     f"{outcome.fidelity_without['score']:.4g} without repair, {outcome.fidelity['score']:.4g} with")
    elif outcome.repairs:
        notes.append(f"repair {outcome.reason} (held-out score {outcome.fidelity_without['score']:.4g} without "
                     f"repair, {outcome.fidelity['score']:.4g} with): the plain removal is written")
    return notes


def _validation_reference(analysis: Analysis, feed: dict, *, sequential: bool, provider: str) -> dict | None:
    """The original's outputs on the validation batch without a session on the
    whole original: from the calibration pass, which ran that very batch first;
    with `--sequential` and no calibration pass, piece by piece. None (validation
    then runs the original itself) when nothing was removed (the output must be
    bit-identical to the input's, so both come from plain sessions), when the
    patterns rewrote the file, or without `--sequential` and a calibration pass."""
    if not analysis.selection.removed or analysis.source_model is not None:
        return None
    rows = next(iter(feed.values())).shape[0]
    outputs = analysis.first_outputs
    if outputs is not None and all(v.ndim and v.shape[0] == rows for v in outputs.values()):
        return outputs
    if not sequential:
        return None
    from .evidence.sequential import probe_sequential, residual_boundaries

    original = analysis.model
    return probe_sequential(original, feed, [], provider=provider,
                            boundaries=[u.exit for u in analysis.units] + residual_boundaries(original))


def _selection_options(options: dict, caller: str) -> SelectionOptions:
    unknown = sorted(set(options) - set(SelectionOptions.names()))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    return SelectionOptions(**options).checked()


def compress(model_path: str | os.PathLike, output: str | os.PathLike | None = None, **kwargs) -> CompressionResult:
    """Remove residual units from an ONNX model and write the validated result.

    Keyword options are those of `analyze`: the fields of
    `options.SelectionOptions`, `threads` and `progress`.
    The output (default `MODEL.pruned.onnx`) and the JSON report (default
    beside the output) are written atomically, only after validation passed.
    With `renumber_cache`, the kept KV-cache inputs and outputs are renamed
    to consecutive layer numbers (what onnxruntime-genai expects) after
    validation; by default every kept name stays as it was. With `dry_run`,
    everything up to and including validation runs (the pruned model in
    memory) and nothing is written: the result's report says what a real run
    would remove, save and write.

    For a model with external data, the output's weights are copied from the
    input's data files into the output's as it is written; the returned
    `pruned` model references the input's files (write it again with
    `sglp_onnx.files.model_files.save_model` inside
    `external_data_folder(input folder)`).
    """
    from .graph.runtime import blas_threads

    with external_data_folder(Path(model_path).parent), blas_threads():
        return _compress(model_path, output, **kwargs)


def _compress(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    report: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    force: bool = False,
    renumber_cache: bool = False,
    dry_run: bool = False,
    **options,
) -> CompressionResult:
    opts = _selection_options({k: v for k, v in options.items() if k in SelectionOptions.names()}, "compress")
    model_path = Path(model_path)
    out = Path(output) if output is not None else default_output(model_path)
    report_path = Path(report) if report is not None else default_report(out)
    if not model_path.exists():
        raise UserError(f"model file not found: {model_path}")
    plot_path = Path(plot) if plot is not None else None
    # An onnxruntime-genai config beside the input is rewritten for the output.
    genai_source = genai_config_source(model_path)
    genai_path = genai_config_target(model_path, out) if genai_source is not None else None
    # Written to another folder, the pruned model gets the tokenizer files onnxruntime-genai reads beside it.
    copies, copy_notes = genai_support_files(model_path, out) if genai_source is not None else ([], [])
    destinations = {OUTPUT_MODEL: out, "report": report_path, "plot": plot_path, "genai config": genai_path,
                    **{f"copy of {source.name}": target for source, target in copies}}
    named = [(what, path) for what, path in destinations.items() if path is not None]
    # Two targets on one file: the last rename would silently win.
    for i, (what, path) in enumerate(named):
        for other, other_path in named[:i]:
            if path.resolve() == other_path.resolve():
                raise UserError(f"the {other} and the {what} must be different files (both are {path})")
    if plot_path is not None:
        from .report.plots import plot_format

        plot_format(plot_path)
    inputs = run_inputs(model_path, opts, extra=[p for p in (genai_source,) if p is not None]
                        + [source for source, _ in copies])
    if not dry_run:
        for what, path in named:
            _check_writable(path, force=force, what=what, inputs=inputs)

    # Suggestions are for deciding what to remove; compress has decided.
    # (Already inside the input's external_data_folder: `_analyze` directly.)
    analysis = _analyze(model_path, **{"suggest": None, **options}, outputs=[] if dry_run else named,
                        measure_single_unit=False)
    timings = analysis.timings
    removed = analysis.removed_units
    repair = analysis.repair if analysis.repair is not None and analysis.repair.applied else None
    with _timed(timings, "surgery", options.get("progress")):
        # A repaired removal bypasses the units of the input with the maps added (repair.with_repairs).
        base, base_units = (repair.model, repair.units) if repair else (analysis.model, analysis.units)
        pruned = finish_patterns(remove_units(base, [base_units[i] for i in analysis.selection.removed]),
                                 analysis.rewrites)
    with _timed(timings, "validation", options.get("progress")):
        from .graph.runtime import release_memory

        release_memory()  # the stages' sessions are closed: the pruned model's opens next
        feed = analysis.calib.first(min(analysis.validation_rows, analysis.calib.n_samples))
        original = analysis.source_model or analysis.model
        reference = _validation_reference(analysis, feed, sequential=opts.sequential, provider=opts.provider)
        try:
            result = validate(
                original, pruned, feed, reference=reference,
                removed_outputs={o for u in removed for o in u.owned_outputs},
                removed_inputs={i for u in removed for i in u.owned_inputs} | dropped_weight_inputs(original, pruned),
                nothing_removed=not removed, provider=opts.provider,
                scored_output=analysis.report["fidelity"]["output"] if analysis.report.get("fidelity") else None,
            )
        except ValidationError as exc:
            raise InternalError(f"the pruned model failed validation, so nothing was written: {exc}") from exc

    rep = analysis.report
    if renumber_cache:
        with _timed(timings, "validation", options.get("progress")):
            renumber_kept_cache(pruned, rep, feed, provider=opts.provider)
    rep["output"] = str(out)
    rep["report_path"] = str(report_path)
    rep["validation"] = result.to_dict()
    removed_set = set(analysis.selection.removed)
    rep["after"] = {
        "params": model_params(pruned),
        "flops": analysis.total_flops - sum(u.flops for u in removed) + (repair.flops if repair else 0),
        "file_size": 0,
    }
    genai_config = None
    if genai_path is not None and rep.get("kv_cache"):
        genai_config, changes = updated_genai_config(
            genai_source, layers_before=rep["kv_cache"]["layers_before"],
            layers_after=rep["kv_cache"]["layers_after"], model_name=model_path.name, output_name=out.name)
        if genai_config is not None:
            rep["kv_cache"]["genai_config"] = str(genai_path)
            if "renamed" not in rep["kv_cache"]:
                naming = ("the kept cache tensors keep their names (see kv_cache.layer_map; --renumber-cache "
                          "renames them 0..n-1 as onnxruntime-genai expects)")
            elif rep["kv_cache"]["renamed"]:
                naming = "the kept cache tensors are renumbered 0..n-1"
            else:
                naming = "the kept cache tensors are numbered 0..n-1 already"
            wrote = "a real run writes" if dry_run else "wrote"
            if copies:
                copied = "a real run copies" if dry_run else "copied"
                naming += f"; {copied} {', '.join(source.name for source, _ in copies)} beside it"
            rep["notes"].append(f"{wrote} {genai_path} for the pruned model: {'; '.join(changes)}; {naming}")
            rep["notes"].extend(copy_notes)
            others = other_model_files(genai_config, out.name)
            if others and out.parent.resolve() != model_path.parent.resolve():
                rep["notes"].append(f"{genai_path.name} also names {', '.join(others)}, not copied beside the output "
                                    f"(models are never copied): copy {'them' if len(others) > 1 else 'it'} from "
                                    f"{model_path.parent} for onnxruntime-genai to load the folder")
        else:
            rep["notes"].extend(changes)
    if genai_config is None:
        genai_path = None
        copies = []
    if dry_run:
        rep["dry_run"] = True
        rep["after"]["file_size"] = proto_size(pruned) + external_bytes(pruned)
        rep["timings"] = {k: round(v, 4) for k, v in timings.items()}
        return CompressionResult(
            model=analysis.model, units=analysis.units, selection=analysis.selection, report=rep,
            calib=analysis.calib, total_flops=analysis.total_flops, timings=timings, pruned=pruned)
    with _timed(timings, "write", options.get("progress")):
        # Weights go to OUTPUT.data when the input kept its own external or
        # near the protobuf limit, renamed into place with the other files
        # (the model records the final name).
        model_paths = model_files_for(pruned, out, force=force, external=len(analysis.input_files) > 1,
                                      inputs=analysis.input_files + inputs)
        n = len(model_paths)
        targets = model_paths + [report_path] + ([plot_path] if plot_path else []) + ([genai_path] if genai_path else [])
        targets += [target for _, target in copies]
        try:
            with atomic_paths(*targets, overwrite=force) as temps:
                rep["after"]["file_size"] = write_model_files(pruned, model_paths, temps)
                if plot_path is not None:
                    from .report.plots import plot_report

                    plot_report(rep, temps[n + 1])
                if genai_path is not None:
                    temps[n + 1 + (plot_path is not None)].write_text(json.dumps(genai_config, indent=2) + "\n")
                for (source, _), temp in zip(copies, temps[len(targets) - len(copies):]):
                    shutil.copyfile(source, temp)
                rep["timings"] = {k: round(v, 4) for k, v in timings.items()}
                temps[n].write_text(to_json(rep))
                pause_point("rename")
        except OSError as exc:
            # Disk full, quota, a folder that vanished: the environment, not a bug.
            where = exc.filename or out.parent
            raise UserError(f"cannot write the output ({exc.strerror or exc}: {where}); nothing was written; "
                            "free some space or choose another folder with -o") from None
    assert removed_set == {i for i, u in enumerate(rep["units"]) if u["removed"]}
    return CompressionResult(
        model=analysis.model, units=analysis.units, selection=analysis.selection, report=rep,
        calib=analysis.calib, total_flops=analysis.total_flops, timings=timings,
        pruned=pruned, output=out, report_path=report_path,
    )
