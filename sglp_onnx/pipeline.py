"""The compression pipeline end to end: `compress` and `analyze`.

Each stage is a function of plain data in its own module; this module only
sequences them, times them and assembles the report.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from .selection.allocation import removal_count
from .files.calibration import CalibrationSet, load_calibration, model_inputs, sidecar_path, synthetic_calibration
from .selection.criteria import Context, Criterion, Selection, get_criterion
from .errors import UserError
from .graph.flops import node_flops, tensors_needed
from .graph.index import GraphIndex
from .surgery.kv_cache import CACHE_NAME, genai_config_source, genai_config_target, kv_cache_record, updated_genai_config
from .files.model_files import (atomic_paths, beside, check_output_path, load_model, model_files_for,
                               write_model_files)
from .report.summary import analysis_summary, summary, to_json, tool_info, unit_records
from .evidence.activations import probe, probe_shapes
from .selection.segmentation import segments_of
from .surgery.remove import remove_units
from .units.patterns import finish as finish_patterns, prepare as prepare_patterns
from .units.discovery import PrunableUnit, find_units, probe_targets, with_flops
from .surgery.validation import ValidationError, validate

DEFAULT_RATIO = 0.25
# The criterion that wins the quality benchmark (benchmarks/results/quality.md).
DEFAULT_CRITERION = "damage"
PROBE_SAMPLES = 2
PAIRING_SAMPLES = 8
# FLOPs fractions `analyze` suggests removal sets for.
DEFAULT_SUGGESTIONS = (0.10, 0.25, 0.50)

Progress = Callable[[Iterator, str], Iterator]


class InternalError(Exception):
    """A failure that is the tool's fault (for example an output failing validation)."""


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


# Test hook: SGLP_ONNX_PAUSE_AT=STAGE[:SECONDS] stops at the start of STAGE
# (load, discovery, pairing, selection, surgery, validation, write) or at
# "rename" (every output complete in its temporary file), says so on stderr
# and sleeps, so that tests can interrupt a run at a known point.
PAUSE_ENV = "SGLP_ONNX_PAUSE_AT"


def _pause_point(point: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name == point:
        print(f"sglp-onnx: paused at {point}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 60))


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    _pause_point(stage)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _check_budget(remove, ratio, target_flops, max_loss=None) -> tuple[int | None, float | None, float | None]:
    given = [x is not None for x in (remove, ratio, target_flops)]
    if sum(given) > 1:
        raise UserError("give only one of --remove, --ratio and --target-flops")
    if max_loss is not None and (isinstance(max_loss, bool) or not math.isfinite(float(max_loss))
                                 or float(max_loss) < 0):
        raise UserError(f"--max-loss must be a number >= 0, got {max_loss}")
    if sum(given) == 0 and max_loss is None:
        ratio = DEFAULT_RATIO
    if remove is not None and (isinstance(remove, bool) or int(remove) != remove or remove < 0):
        raise UserError(f"--remove must be a whole number >= 0, got {remove}")
    if ratio is not None and not (0.0 < float(ratio) < 1.0):
        raise UserError(f"--ratio must be in (0, 1), got {ratio}")
    if target_flops is not None and not (0.0 < float(target_flops) < 1.0):
        raise UserError(f"--target-flops must be in (0, 1), got {target_flops}")
    return remove, ratio, target_flops


def default_output(model_path: Path) -> Path:
    return beside(model_path, ".pruned.onnx")


def default_report(output: Path) -> Path:
    return beside(output, ".json")


def _check_writable(path: Path, *, force: bool, what: str, input_path: Path) -> None:
    check_output_path(path, force=force, what=what, inputs=[input_path])


def _load_calibration(model_path: Path, model: onnx.ModelProto, calib: str | None, *, needed: bool,
                      max_samples: int | None, seed: int) -> CalibrationSet:
    if calib is not None:
        return load_calibration(calib, model, max_samples=max_samples)
    sidecar = sidecar_path(model_path)
    if sidecar.is_file():
        return load_calibration(sidecar, model, max_samples=max_samples)
    if needed:
        raise UserError(f"no calibration data: pass --calib CALIB.npz or put {sidecar.name} beside the model")
    return synthetic_calibration(model, seed=seed)


def _load_paired_model(spec: str, weights: str | None):
    """`MODULE:FACTORY` (with optional weights), or `hf:DIR` for a Hugging Face folder."""
    from .paired.hf_model import HF_PREFIX, is_hf_spec, load_hf_model

    if is_hf_spec(spec):
        if weights is not None:
            raise UserError("--torch-weights goes with --torch-model MODULE:FACTORY; an hf:DIR folder holds "
                            "its own weights")
        return load_hf_model(spec[len(HF_PREFIX):])
    from .tools.export.torch_export import load_torch_model

    return load_torch_model(spec, weights)


def _cache_inputs(model: onnx.ModelProto, units: Sequence[PrunableUnit]) -> set[str]:
    """Graph inputs that are a decoder layer's past KV cache: owned by a unit and cache-shaped."""
    from .files.calibration import is_cache_input

    specs = model_inputs(model)
    owned = {i for u in units for i in u.owned_inputs}
    return {s.name for s in specs if s.name in owned and is_cache_input(s, specs)}


def _torch_feed(feed: dict[str, np.ndarray], cache_inputs: set[str]) -> dict[str, np.ndarray]:
    """The ONNX feed without the past KV cache: the paired model runs each
    calibration sequence whole (past length 0), which is what an ONNX model
    with a cache computes from the empty past its calibration gets."""
    return {k: v for k, v in feed.items() if k not in cache_inputs}


def _discover(model: onnx.ModelProto, calib: CalibrationSet, *, granularity: str, provider: str,
              timings: dict[str, float], sequential: bool = False) -> tuple[list[PrunableUnit], int]:
    with _timed(timings, "discovery"):
        names = probe_targets(model) + tensors_needed(model)
        feed = calib.first(PROBE_SAMPLES)
        n_probe = next(iter(feed.values())).shape[0]
        if sequential:
            from .evidence.sequential import probe_shapes_sequential

            shapes, dtypes = probe_shapes_sequential(model, feed, names, provider=provider)
        else:
            shapes, dtypes = probe_shapes(model, feed, names, provider=provider)
        units = find_units(model, granularity=granularity, shapes=shapes, dtypes=dtypes)
        # The probe ran on n_probe samples; FLOPs are reported per sample.
        per_node = {k: v // n_probe for k, v in node_flops(model, shapes).items()}
        units = with_flops(units, per_node)
    return units, sum(per_node.values())


def _budget_to_count(criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int, *,
                     remove, ratio, target_flops) -> tuple[int, Selection]:
    if target_flops is None:
        n = removal_count(len(units), remove=remove, ratio=ratio)  # refuses a count that leaves no unit
        return n, criterion.select(ctx, n)
    found, reason = _first_reaching(criterion, ctx, units, total_flops, [target_flops])
    if target_flops not in found:
        raise UserError(f"--target-flops {target_flops} cannot be met: {reason}")
    return found[target_flops]


def _first_reaching(criterion: Criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int,
                    targets: Sequence[float]) -> tuple[dict[float, tuple[int, Selection]], str | None]:
    """For each FLOPs fraction, the smallest removal count (and its selection)
    that removes at least that fraction; one sweep over the counts serves every
    target. Unreached targets are missing, and the second value says why."""
    pending = sorted(set(targets))
    found: dict[float, tuple[int, Selection]] = {}
    most = 0
    for n in range(1, len(units)):
        if not pending:
            return found, None
        try:
            selection = criterion.select(ctx, n)
        except UserError as exc:  # e.g. an explicit --segments K caps the count at L - K
            return found, str(exc)
        flops = sum(units[i].flops for i in selection.removed)
        most = max(most, flops)
        while pending and flops >= pending[0] * total_flops:
            found[pending.pop(0)] = (n, selection)
    if not pending:
        return found, None
    return found, (f"removing 1 to {len(units) - 1} of the {len(units)} units (one always stays) removes at most "
                   f"{most / max(total_flops, 1):.1%} of the FLOPs")


def _max_loss_count(criterion: Criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int,
                    score: Callable[[list[int]], dict], max_loss: float, *, remove, ratio,
                    target_flops) -> tuple[int, Selection, list[str]]:
    """The most units (or FLOPs) the criterion removes while `score(removed)`
    stays within `max_loss`; --remove/--ratio/--target-flops, when given, cap it."""
    if target_flops is None and (remove is not None or ratio is not None):
        most = removal_count(len(units), remove=remove, ratio=ratio)
    else:
        most = len(units) - 1
    best = (0, Selection(removed=[]))
    tried = []
    for n in range(1, most + 1):
        try:
            selection = criterion.select(ctx, n)
        except UserError:  # e.g. an explicit --segments K caps the count at L - K
            break
        if target_flops is not None and sum(units[i].flops for i in selection.removed) > target_flops * total_flops:
            break
        record = score(selection.removed)
        tried.append(f"{n}: {record['score']:.4g}")
        if record["score"] > max_loss:
            break
        best = (n, selection)
    notes = [f"--max-loss {max_loss:g}: held-out score by units removed: {', '.join(tried) or 'none tried'}; "
             f"{best[0]} removed"]
    return best[0], best[1], notes


def suggest_removals(criterion: Criterion, ctx: Context, units: Sequence[PrunableUnit], total_flops: int,
                     targets: Sequence[float]) -> list[dict]:
    """For each FLOPs fraction in `targets`, the units `criterion` would remove to reach it.

    The rule is that of `--target-flops`: the smallest removal count whose
    selection removes at least that fraction of the model's FLOPs, so each
    suggestion is exactly what `compress --target-flops F` would remove.
    Selections reuse the evidence and GradNorm cached in `ctx`: no second
    calibration pass.
    """
    wanted = list(dict.fromkeys(float(t) for t in targets))
    for t in wanted:
        if not 0.0 < t < 1.0:
            raise UserError(f"suggestion targets must be FLOPs fractions in (0, 1), got {t}")
    if ctx is not None and not ctx.flops_budget and len({u.flops for u in units}) > 1:
        # Rank as --target-flops does (per FLOP: different from per unit only when
        # the units' FLOPs differ), without disturbing ctx's own searches.
        ctx.runner(), ctx.output_kind()  # built once, shared with the copy
        ctx = replace(ctx, flops_budget=True, cache={})
    found, reason = _first_reaching(criterion, ctx, units, total_flops, wanted)
    suggestions = []
    for t in wanted:
        if t not in found:
            suggestions.append({"target_flops": t, "achievable": False, "units_removed": None, "removed": None,
                                "names": None, "flops_removed": None, "flops_removed_fraction": None,
                                "params_removed": None, "reason": reason})
            continue
        n, selection = found[t]
        flops = sum(units[i].flops for i in selection.removed)
        suggestions.append({
            "target_flops": t,
            "achievable": True,
            "units_removed": n,
            "removed": list(selection.removed),
            "names": [units[i].name for i in selection.removed],
            "flops_removed": int(flops),
            "flops_removed_fraction": flops / max(total_flops, 1),
            "params_removed": int(sum(units[i].params for i in selection.removed)),
            "reason": None,
        })
    return suggestions


def analyze(
    model_path: str | os.PathLike,
    *,
    calib: str | os.PathLike | None = None,
    remove: int | None = None,
    ratio: float | None = None,
    target_flops: float | None = None,
    max_loss: float | None = None,
    criterion: str = DEFAULT_CRITERION,
    segments: int | None = None,
    torch_model: str | None = None,
    torch_weights: str | os.PathLike | None = None,
    granularity: str = "layer",
    batch_size: int = 64,
    provider: str = "cpu",
    seed: int = 0,
    max_calib_samples: int | None = None,
    progress: Progress | None = None,
    sequential: bool = False,
    suggest: Sequence[float] | None = DEFAULT_SUGGESTIONS,
    plot: str | os.PathLike | None = None,
    force: bool = False,
    threads: int | None = None,
) -> Analysis:
    """Find units, measure them and choose which to remove, without writing a model.

    Arguments mirror `sglp-onnx compress`; see `compress`. `suggest` lists
    FLOPs fractions for which the report's `suggestions` say which units the
    criterion would remove (None: no suggestions). `plot` writes the
    figure of `plots.plot_report` there as PNG, SVG or PDF by its suffix (an
    existing file only with `force`); nothing else is written. `threads`
    sets the ONNX Runtime and torch threads of this process from now on
    (`runtime.set_threads`; None: leave the setting as it is).
    """
    if threads is not None:
        from .graph.runtime import set_threads

        set_threads(threads)
    timings: dict[str, float] = {}
    remove, ratio, target_flops = _check_budget(remove, ratio, target_flops, max_loss)
    plot_path = Path(plot) if plot is not None else None
    if plot_path is not None:
        _check_writable(plot_path, force=force, what="plot", input_path=Path(model_path))
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"--seed must be a whole number >= 0, got {seed!r}")
    if segments is not None and segments < 1:
        raise UserError(f"--segments must be at least 1, got {segments}")
    chosen = get_criterion(criterion)
    if segments is not None and not chosen.uses_segments:
        raise UserError(f"--segments K sets the Fisher segments of --criterion sglp; --criterion {criterion} "
                        "does not segment")
    model_path = Path(model_path)
    with _timed(timings, "load"):
        source_model = load_model(model_path)
        model, rewrites = prepare_patterns(source_model)
        data = _load_calibration(model_path, model, None if calib is None else str(calib),
                                 needed=chosen.needs_calibration or torch_model is not None or max_loss is not None,
                                 max_samples=max_calib_samples, seed=seed)
        all_samples = data.n_samples
        data, held_out = data.split_holdout()
    if chosen.needs_torch and torch_model is None:
        raise UserError(f"--criterion {criterion} needs gradients: pass the paired torch model with "
                        "--torch-model MODULE:FACTORY (and --torch-weights FILE)")
    units, total_flops = _discover(model, data, granularity=granularity, provider=provider, timings=timings,
                                   sequential=sequential)
    if not units:
        raise UserError(f"no prunable unit in {model_path}: no residual Add x + f(x) whose output keeps x's "
                        "shape (projection/downsampling blocks are never candidates)")

    gradnorm_fn = None
    pairing_info = None
    loss_note = None
    if torch_model is not None:
        cache_inputs = _cache_inputs(model, units)
        with _timed(timings, "pairing"):
            paired = _load_paired_model(torch_model, None if torch_weights is None else str(torch_weights))
            _check_empty_cache(data, cache_inputs)
            pairing, pairing_info = _pair(model, paired, units, data, provider)

        def gradnorm_fn():
            from .paired.gradnorm import gradnorm

            order = [s.name for s in model_inputs(model) if s.name not in cache_inputs]
            batches = ((_torch_feed(feed, cache_inputs), labels) for feed, labels in data.batches(batch_size))
            if progress:
                batches = progress(batches, "gradients")
            return gradnorm(paired, pairing, batches, order)

        from .paired.gradnorm import loss_description

        loss_note = f"GradNorm loss: {loss_description(paired, data)}"

    ctx = Context(model=model, units=units, calib=data, batch_size=batch_size, provider=provider, seed=seed,
                  segments=segments, gradnorm_fn=gradnorm_fn, progress=progress, timings=timings,
                  sequential=sequential, flops_budget=target_flops is not None)
    fidelity_data = held_out if held_out is not None else data

    def held_out_fidelity(*removal_sets) -> list[dict]:
        from .evidence.fidelity import measure_sets

        return measure_sets(ctx.runner(), ctx.output_kind(), fidelity_data, removal_sets, batch_size=batch_size)

    budget_notes: list[str] = []
    with _timed(timings, "selection"):
        if max_loss is None:
            n_remove, selection = _budget_to_count(chosen, ctx, units, total_flops, remove=remove, ratio=ratio,
                                                   target_flops=target_flops)
        else:
            n_remove, selection, budget_notes = _max_loss_count(
                chosen, ctx, units, total_flops, lambda r: held_out_fidelity(r)[0], float(max_loss),
                remove=remove, ratio=ratio, target_flops=target_flops)
    # Stages timed inside the criterion (calibration, gradnorm) are not selection time.
    timings["selection"] -= timings.get("calibration", 0.0) + timings.get("gradnorm", 0.0)
    suggestions = None
    if suggest:
        with _timed(timings, "suggestions"):
            suggestions = suggest_removals(chosen, ctx, units, total_flops, suggest)
    with _timed(timings, "fidelity"):
        sets = [selection.removed] + [x["removed"] for x in suggestions or [] if x["achievable"]]
        records = iter(held_out_fidelity(*sets))
        fidelity = _fidelity_record(next(records), ctx, data, held_out)
        for x in suggestions or []:
            x["fidelity"] = _fidelity_record(next(records), ctx, data, held_out) if x["achievable"] else None

    removed = set(selection.removed)
    seg_ids = segments_of(selection.segments) if selection.segments else None
    evidence = ctx._evidence
    report = {
        "tool": tool_info(),
        "input": str(model_path),
        "criterion": criterion,
        "granularity": granularity,
        "budget": {"remove": remove, "ratio": ratio, "target_flops": target_flops, "max_loss": max_loss,
                   "units_removed": n_remove},
        "removed": [units[i].name for i in selection.removed],
        "calibration": {
            "source": data.source,
            "samples": all_samples,
            "selection_samples": data.n_samples,
            "held_out_samples": 0 if held_out is None else held_out.n_samples,
            "rows": None if evidence is None else evidence.n_samples,
            "token_level": data.is_token_data,
            "batch_size": batch_size,
            "nonfinite_values": None if evidence is None else evidence.nonfinite_values,
        },
        "units": unit_records(units, removed=removed, segment_ids=seg_ids, importance=selection.importance),
        "cka": None if evidence is None else np.round(evidence.cka, 6).tolist(),
        "segments": None if selection.segments is None else [list(b) for b in selection.segments],
        "k_selection": None if selection.k_curve is None else {
            "k": len(selection.segments), "curve": selection.k_curve, "rule": selection.k_rule},
        "importance_kind": selection.importance_kind,
        "pairing": pairing_info,
        "kv_cache": kv_cache_record(units, removed),
        "before": {"params": _model_params(source_model), "flops": total_flops,
                   "file_size": model_path.stat().st_size},
        "suggestions": suggestions,
        "fidelity": fidelity,
        "notes": list(selection.notes) + budget_notes,
        "timings": timings,
    }
    if loss_note is not None and ctx._gradnorm is not None:
        report["notes"].append(loss_note)
    if evidence is not None and evidence.nonfinite_values:
        report["notes"].append(f"{evidence.nonfinite_values} non-finite activation values were treated as 0")
    if data.fixed_batch and data.fixed_batch != batch_size:
        report["notes"].append(f"the model's batch dimension is fixed to {data.fixed_batch}: calibration ran in "
                               f"batches of {data.fixed_batch}, not {batch_size}")
    if plot_path is not None:
        with _timed(timings, "plot"), atomic_paths(plot_path) as (tmp,):
            from .report.plots import plot_report

            plot_report(report, tmp)
    return Analysis(model=model, units=units, selection=selection, report=report, calib=data,
                    total_flops=total_flops, timings=timings,
                    source_model=None if model is source_model else source_model, rewrites=rewrites)


def _fidelity_record(record: dict, ctx: Context, data: CalibrationSet, held_out: CalibrationSet | None) -> dict:
    from .evidence.fidelity import describe, is_poor

    kind = ctx.output_kind()
    return {
        **record,
        "definition": describe(record["kind"], kind.form, token_level=data.is_token_data),
        "output": kind.output,
        "rule": kind.rule,
        "held_out": held_out is not None,
        "samples": (held_out or data).n_samples,
        "poor": is_poor(record),
    }


def _model_params(model: onnx.ModelProto) -> int:
    from .graph.flops import model_params

    return model_params(model)


def _check_empty_cache(data: CalibrationSet, cache_inputs: set[str]) -> None:
    """The paired model runs without a cache, so the ONNX model's past must be empty to compare."""
    filled = [k for k in sorted(cache_inputs) if k in data.inputs and data.inputs[k].ndim >= 3
              and 0 not in data.inputs[k].shape[1:]]
    if filled:
        raise UserError(f"the calibration data holds a non-empty past KV cache ({filled[0]} has shape "
                        f"{data.inputs[filled[0]].shape}); with --torch-model, leave the past_* arrays out of the "
                        ".npz (they are then empty: whole sequences, as the paired model runs them)")


def _pair(model, paired, units, data: CalibrationSet, provider: str):
    from .paired.gradnorm import pair_units

    feed = data.first(PAIRING_SAMPLES)
    names = list(dict.fromkeys(t for u in units for t in (u.entry, u.exit)))
    values = probe(model, feed, names, provider=provider)
    outputs = [values[o.name] for o in model.graph.output]
    index = GraphIndex(model)
    scopes = {n.name: s for n, s in zip(index.nodes, index.scopes) if n.name}
    cache_inputs = _cache_inputs(model, units)
    pairing = pair_units(paired, units, _torch_feed(feed, cache_inputs), values, outputs,
                         [s.name for s in model_inputs(model) if s.name not in cache_inputs], scopes)
    info = {
        "method": sorted(set(pairing.method)),
        "output_relative_error": pairing.output_error,
        "units": [{"unit": u.name, "modules": m, "relative_error": None if math.isnan(e) else e}
                  for u, m, e in zip(units, pairing.modules, pairing.max_error)],
    }
    return pairing, info


def _renumber_cache(pruned: onnx.ModelProto, rep: dict, feed: dict[str, np.ndarray], *, provider: str) -> None:
    """Rename the kept cache tensors to consecutive layer numbers, in place, and
    check the renamed model (a pure renaming, so checker and one run suffice)."""
    from .surgery.kv_cache import rename_tensors, renumbering
    from .surgery.validation import check_standalone

    kv = rep.get("kv_cache")
    io_names = [i.name for i in pruned.graph.input] + [o.name for o in pruned.graph.output]
    if not kv or not any(CACHE_NAME.match(n) for n in io_names):
        raise UserError("--renumber-cache needs a model with a KV cache named past_key_values.{i}.key/value "
                        "and present.{i}.key/value")
    mapping = renumbering(kv["layer_map"], io_names)
    rename_tensors(pruned, mapping)
    try:
        check_standalone(pruned, {mapping.get(k, k): v for k, v in feed.items()}, provider=provider,
                         what="the model with renumbered cache tensors")
    except ValidationError as exc:
        raise InternalError(f"{exc}; nothing was written") from exc
    kv["renamed"] = dict(sorted(mapping.items()))


def compress(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    report: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    force: bool = False,
    renumber_cache: bool = False,
    **options,
) -> CompressionResult:
    """Remove residual units from an ONNX model and write the validated result.

    Keyword options are those of `analyze` (calib, remove | ratio |
    target_flops, criterion, segments, torch_model, torch_weights,
    granularity, batch_size, provider, seed, max_calib_samples, progress,
    sequential, threads).
    The output (default `MODEL.pruned.onnx`) and the JSON report (default
    beside the output) are written atomically, only after validation passed.
    With `renumber_cache`, the kept KV-cache inputs and outputs are renamed
    to consecutive layer numbers (what onnxruntime-genai expects) after
    validation; by default every kept name stays as it was.
    """
    model_path = Path(model_path)
    out = Path(output) if output is not None else default_output(model_path)
    report_path = Path(report) if report is not None else default_report(out)
    if not model_path.exists():
        raise UserError(f"model file not found: {model_path}")
    plot_path = Path(plot) if plot is not None else None
    # An onnxruntime-genai config beside the input is rewritten for the output.
    genai_source = genai_config_source(model_path)
    genai_path = genai_config_target(model_path, out) if genai_source is not None else None
    destinations = {"output model": out, "report": report_path, "plot": plot_path, "genai config": genai_path}
    named = [(what, path) for what, path in destinations.items() if path is not None]
    # Two targets on one file: the last rename would silently win.
    for i, (what, path) in enumerate(named):
        for other, other_path in named[:i]:
            if path.resolve() == other_path.resolve():
                raise UserError(f"the {other} and the {what} must be different files (both are {path})")
    _check_writable(out, force=force, what="output", input_path=model_path)
    _check_writable(report_path, force=force, what="report", input_path=model_path)
    if plot_path is not None:
        _check_writable(plot_path, force=force, what="plot", input_path=model_path)
        from .report.plots import plot_format

        plot_format(plot_path)
    if genai_path is not None:
        _check_writable(genai_path, force=force, what="genai config", input_path=model_path)

    # Suggestions are for deciding what to remove; compress has decided.
    analysis = analyze(model_path, **{"suggest": None, **options})
    timings = analysis.timings
    removed = analysis.removed_units
    with _timed(timings, "surgery"):
        pruned = finish_patterns(remove_units(analysis.model, removed), analysis.rewrites)
    with _timed(timings, "validation"):
        feed = analysis.calib.first(min(options.get("batch_size", 64), analysis.calib.n_samples))
        try:
            result = validate(
                analysis.source_model or analysis.model, pruned, feed,
                removed_outputs={o for u in removed for o in u.owned_outputs},
                removed_inputs={i for u in removed for i in u.owned_inputs},
                nothing_removed=not removed, provider=options.get("provider", "cpu"),
            )
        except ValidationError as exc:
            raise InternalError(f"the pruned model failed validation, so nothing was written: {exc}") from exc

    rep = analysis.report
    if renumber_cache:
        with _timed(timings, "validation"):
            _renumber_cache(pruned, rep, feed, provider=options.get("provider", "cpu"))
    rep["output"] = str(out)
    rep["report_path"] = str(report_path)
    rep["validation"] = result.to_dict()
    removed_set = set(analysis.selection.removed)
    rep["after"] = {
        "params": _model_params(pruned),
        "flops": analysis.total_flops - sum(u.flops for u in removed),
        "file_size": 0,
    }
    genai_config = None
    if genai_path is not None and rep.get("kv_cache"):
        genai_config, changes = updated_genai_config(
            genai_source, layers_before=rep["kv_cache"]["layers_before"],
            layers_after=rep["kv_cache"]["layers_after"], model_name=model_path.name, output_name=out.name)
        if genai_config is not None:
            rep["kv_cache"]["genai_config"] = str(genai_path)
            naming = ("the kept cache tensors are renumbered 0..n-1" if rep["kv_cache"].get("renamed")
                      else "the kept cache tensors keep their names (see kv_cache.layer_map; --renumber-cache "
                           "renames them 0..n-1 as onnxruntime-genai expects)")
            rep["notes"].append(f"wrote {genai_path} for the pruned model: {'; '.join(changes)}; {naming}")
        else:
            rep["notes"].extend(changes)
    if genai_config is None:
        genai_path = None
    with _timed(timings, "write"):
        # Weights near the protobuf limit go to OUTPUT.data, renamed into
        # place with the other files (the model records the final name).
        model_paths = model_files_for(pruned, out, force=force)
        n = len(model_paths)
        targets = model_paths + [report_path] + ([plot_path] if plot_path else []) + ([genai_path] if genai_path else [])
        try:
            with atomic_paths(*targets, overwrite=force) as temps:
                rep["after"]["file_size"] = write_model_files(pruned, model_paths, temps)
                if plot_path is not None:
                    from .report.plots import plot_report

                    plot_report(rep, temps[n + 1])
                if genai_path is not None:
                    temps[n + 1 + (plot_path is not None)].write_text(json.dumps(genai_config, indent=2) + "\n")
                rep["timings"] = {k: round(v, 4) for k, v in timings.items()}
                temps[n].write_text(to_json(rep))
                _pause_point("rename")
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
