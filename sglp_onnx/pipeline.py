"""The compression pipeline end to end: `compress` and `analyze`.

Each stage is a function of plain data in its own folder; this module only
sequences them: load, discover, pair, measure, select, remove, validate, write.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import onnx

from .errors import UserError
from .evidence.executor import Executor
from .files.calibration import CalibrationSet, choose_calibration
from .files.model_files import atomic_paths, check_output_path, external_bytes, files_size, load_model_files, \
    proto_size, refuse_inputs, write_model_files
from .files.working_weights import restore_weights, spill_weights, working_weights
from .files.output_plan import OUTPUT_MODEL, OutputPlan, compress_plan, default_output, run_inputs  # noqa: F401
from .graph.flops import model_params
from .options import DEFAULT_CRITERION, DEFAULT_RATIO, SelectionOptions  # noqa: F401 (the defaults, re-exported)
from .paired.pairing import PairedModel
from .progress import PAUSE_ENV, Progress, clocked, pause_point, timed  # noqa: F401 (PAUSE_ENV: the tests' hook)
from .report.build import analysis_report, repair_record
from .report.summary import to_json
from .results import Analysis, CompressionResult
from .selection.budget import suggest_removals  # noqa: F401 (re-exported)
from .selection.criteria import checked_criterion, needs_calibration
from .selection.measured import measure_and_select
from .surgery.kv_cache import genai_config_for_output, renumber_kept_cache
from .surgery.remove import remove_units
from .surgery.validation import validate_pruned
from .units.discovery import discover
from .units.patterns import finish as finish_patterns
from .units.patterns import prepare as prepare_patterns

# FLOPs fractions `analyze` suggests removal sets for.
DEFAULT_SUGGESTIONS = (0.10, 0.25, 0.50)


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

    with working_weights(Path(model_path).parent), blas_threads():
        analysis = _analyze(model_path, **kwargs)
        restore_weights(analysis.model, analysis.source_model, analysis.repair and analysis.repair.model)
        return analysis


def _analyze(model_path: str | os.PathLike, *, suggest: Sequence[float] | None = DEFAULT_SUGGESTIONS,
             plot: str | os.PathLike | None = None, force: bool = False, threads: int | None = None,
             progress: Progress | None = None, plan: OutputPlan | None = None, measure_single_unit: bool = True,
             **options) -> Analysis:
    # `plan`: the files `compress` will write, checked against the model's
    # external data files as soon as they are known.
    if threads is not None:
        from .graph.runtime import set_threads

        set_threads(threads)
    opts = SelectionOptions.from_keywords(options, "analyze")
    timings: dict[str, float] = {}
    model_path, plot_path = Path(model_path), Path(plot) if plot is not None else None
    if plot_path is not None:
        check_output_path(plot_path, force=force, what="plot", inputs=run_inputs(
            model_path, calib=opts.calib, torch_model=opts.torch_model, torch_weights=opts.torch_weights))
    chosen = checked_criterion(opts)
    with timed(timings, "load", progress):
        source_model, input_files = load_model_files(model_path, defer=True)
        if plan is not None:
            plan.refuse(input_files)
        if plot_path is not None:
            refuse_inputs(plot_path, what="plot", inputs=input_files)
        model, rewrites = prepare_patterns(source_model)
        # Weights held in the file go to a temporary side file for the run's sessions (working_weights.py).
        spilled = spill_weights(model)
        if spilled is not None:
            source_model = spilled if model is source_model else source_model
            model = spilled
        data = choose_calibration(model_path, model, None if opts.calib is None else str(opts.calib),
                                  needed=needs_calibration(chosen, opts), max_samples=opts.max_calib_samples,
                                  seed=opts.seed)
        all_samples = data.n_samples
        data, held_out = data.split_holdout()
        if opts.fidelity_output is not None:
            from .evidence.fidelity import output_kind

            output_kind(model, opts.fidelity_output)  # an unknown name: exit 2 before any measuring
    with data.explained("--calib"), timed(timings, "discovery", progress):  # guessed sizes fail on the first run
        units, total_flops = discover(model, data, granularity=opts.granularity, provider=opts.provider,
                                      executor=Executor.of(opts.sequential), batch_size=opts.batch_size)
    if not units:
        raise UserError(f"no prunable unit in {model_path}: no residual join x + f(x) whose output keeps x's "
                        "shape (projection/downsampling blocks are never candidates; blocks inside If/Loop/Scan "
                        "bodies are not pruned)")
    paired = None
    if opts.torch_model is not None:
        with timed(timings, "pairing", progress):
            paired = PairedModel.load(opts.torch_model, opts.torch_weights, model, units, data,
                                      provider=opts.provider, batch_size=opts.batch_size)
    # `analyze` of a model with one unit and no budget asked for: nothing can
    # go (one unit always stays), but the unit and its measurements are shown.
    only_measure = (len(units) == 1 and measure_single_unit and opts.max_loss is None
                    and all(options.get(k) is None for k in ("remove", "ratio", "target_flops")))
    analysis = Analysis(model=model, units=units, selection=None, report={}, calib=data, total_flops=total_flops,
                        timings=timings, source_model=None if model is source_model else source_model,
                        rewrites=rewrites, input_files=input_files)
    before = {"params": model_params(source_model), "flops": total_flops, "file_size": files_size(input_files)}
    _measure(analysis, chosen, opts, paired, held_out, suggest=suggest, only_measure=only_measure,
             report_of=dict(model_path=model_path, all_samples=all_samples, before=before), progress=progress)
    if plot_path is not None:
        with timed(timings, "plot", progress), atomic_paths(plot_path) as (tmp,):
            from .report.plots import plot_report

            plot_report(analysis.report, tmp)
    return analysis


def _measure(analysis: Analysis, chosen, opts: SelectionOptions, paired: PairedModel | None,
             held_out: CalibrationSet | None, *, suggest, only_measure: bool, report_of: dict,
             progress: Progress | None) -> None:
    """Measure, select, suggest, repair: fills `analysis`'s selection, report, repair and validation rows."""
    m = measure_and_select(analysis.model, analysis.units, analysis.calib, held_out, analysis.total_flops, chosen,
                           opts, paired, suggest=suggest, only_measure=only_measure, timings=analysis.timings,
                           progress=progress, executor=Executor.of(opts.sequential))
    units, data = analysis.units, analysis.calib
    report = analysis_report(
        **report_of, options=replace(opts, ratio=None) if only_measure else opts, n_remove=m.n_remove,
        selection=m.selection, units=units, data=data, held_out=held_out, evidence=m.evidence,
        pairing=paired.info if paired else None, suggestions=m.suggestions, fidelity=m.fidelity, notes=m.notes,
        timings=analysis.timings)
    report["repair"] = repair_record(m.repair, units, m.kind, data, held_out)
    analysis.selection, analysis.report, analysis.repair = m.selection, report, m.repair
    analysis.first_outputs = m.evidence.first_outputs if m.evidence else None
    analysis.validation_rows = m.validation_rows


def compress(model_path: str | os.PathLike, output: str | os.PathLike | None = None, **kwargs) -> CompressionResult:
    """Remove residual units from an ONNX model and write the validated result.

    Keyword options are those of `analyze`: the fields of
    `options.SelectionOptions`, `threads` and `progress`.
    The output (default `MODEL.pruned.onnx`) and the JSON `report` (True,
    the default: OUTPUT with .json; a path: there; None: no report file, the
    result's `report` only) are written atomically, only after validation passed.
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

    with working_weights(Path(model_path).parent), blas_threads():
        result = _compress(model_path, output, **kwargs)
        restore_weights(result.model, result.source_model)
        return result


def _compress(model_path: str | os.PathLike, output: str | os.PathLike | None = None, *,
              report: str | os.PathLike | bool | None = True, plot: str | os.PathLike | None = None,
              force: bool = False, renumber_cache: bool = False, dry_run: bool = False,
              **options) -> CompressionResult:
    # analyze's keywords that compress passes on (`suggest` and `plot` are its own here).
    passed_on = {"threads", "progress"}
    opts = SelectionOptions.from_keywords({k: v for k, v in options.items() if k not in passed_on}, "compress")
    model_path = Path(model_path)
    plan, genai_source, copy_notes = compress_plan(model_path, output, report, plot, calib=opts.calib,
                                                   torch_model=opts.torch_model, torch_weights=opts.torch_weights)
    plan.check(force=force, writable=not dry_run)
    # Suggestions are for deciding what to remove; compress has decided.
    # (Already inside the run's working_weights: `_analyze` directly.)
    analysis = _analyze(model_path, **{"suggest": None, **options}, plan=None if dry_run else plan,
                        measure_single_unit=False)
    timings, progress, rep = analysis.timings, options.get("progress"), analysis.report
    repair = analysis.repair if analysis.repair is not None and analysis.repair.applied else None
    with timed(timings, "surgery", progress):
        # A repaired removal bypasses the units of the input with the maps added (repair.with_repairs).
        base, base_units = (repair.model, repair.units) if repair else (analysis.model, analysis.units)
        pruned = finish_patterns(remove_units(base, [base_units[i] for i in analysis.selection.removed]),
                                 analysis.rewrites)
    with timed(timings, "validation", progress):
        result, feed = validate_pruned(analysis, pruned, executor=Executor.of(opts.sequential),
                                       provider=opts.provider)
    if renumber_cache:
        with timed(timings, "validation", progress):
            renumber_kept_cache(pruned, rep, feed, provider=opts.provider)
    with clocked(timings, "surgery"):
        restore_weights(pruned)  # what is written, and returned, holds its weights as the input did
    rep["output"] = str(plan.model)
    if plan.report is not None:
        rep["report_path"] = str(plan.report)
    rep["validation"] = result.to_dict()
    removed_flops = sum(u.flops for u in analysis.removed_units) - (repair.flops if repair else 0)
    rep["after"] = {"params": model_params(pruned), "flops": analysis.total_flops - removed_flops, "file_size": 0}
    genai_config = None if plan.genai_config is None else genai_config_for_output(
        rep, genai_source, plan.genai_config, plan.copies, copy_notes, model_path=model_path, output=plan.model,
        dry_run=dry_run)
    plan = plan if genai_config is not None else plan.without_genai()
    if dry_run:
        rep["dry_run"] = True
        rep["after"]["file_size"] = proto_size(pruned) + external_bytes(pruned)
        rep["timings"] = {k: round(v, 4) for k, v in timings.items()}
    else:
        with timed(timings, "write", progress):
            _write(plan, pruned, rep, genai_config, force=force, input_files=analysis.input_files,
                   timings=timings)
        assert set(analysis.selection.removed) == {i for i, u in enumerate(rep["units"]) if u["removed"]}
    return CompressionResult(
        model=analysis.model, units=analysis.units, selection=analysis.selection, report=rep,
        calib=analysis.calib, total_flops=analysis.total_flops, timings=timings, pruned=pruned,
        output=None if dry_run else plan.model, report_path=None if dry_run else plan.report)


def _write(plan: OutputPlan, pruned: onnx.ModelProto, rep: dict, genai_config: dict | None, *, force: bool,
           input_files: list[Path], timings: dict[str, float]) -> None:
    # Weights go to OUTPUT.data when the input kept its own external or near
    # the protobuf limit (the model records the final name).
    with plan.writing(pruned, force=force, external=len(input_files) > 1, input_files=input_files) as temps:
        rep["after"]["file_size"] = write_model_files(pruned, temps.model_files, temps.model)
        if temps.plot is not None:
            from .report.plots import plot_report

            plot_report(rep, temps.plot)
        if temps.genai_config is not None:
            temps.genai_config.write_text(json.dumps(genai_config, indent=2) + "\n")
        for source, temp in temps.copies:
            shutil.copyfile(source, temp)
        rep["timings"] = {k: round(v, 4) for k, v in timings.items()}
        if temps.report is not None:
            temps.report.write_text(to_json(rep))
        pause_point("rename")
