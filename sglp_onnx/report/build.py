"""The report of an analysis, as a plain dict (the schema is report.schema.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..evidence.budget import parse_size
from ..files.calibration import CalibrationSet
from ..selection.segmentation import segments_of
from ..surgery.kv_cache import kv_cache_record
from ..units.discovery import PrunableUnit
from .summary import tool_info, unit_records


def analysis_report(*, model_path: Path, options, n_remove: int, selection, units: Sequence[PrunableUnit],
                    data: CalibrationSet, held_out: CalibrationSet | None, all_samples: int, evidence,
                    pairing: dict | None, before: dict, suggestions: list[dict] | None, fidelity: dict,
                    notes: list[str], timings: dict[str, float]) -> dict:
    """What `analyze` found and chose; `compress` adds the output, validation and savings."""
    removed = set(selection.removed)
    seg_ids = segments_of(selection.segments) if selection.segments else None
    report = {
        "tool": tool_info(),
        "input": str(Path(model_path).resolve()),
        "criterion": options.criterion,
        "granularity": options.granularity,
        "budget": {"remove": options.remove, "ratio": options.ratio, "target_flops": options.target_flops,
                   "max_loss": options.max_loss, "units_removed": n_remove},
        "removed": [units[i].name for i in selection.removed],
        "calibration": {
            "source": data.source,
            "samples": all_samples,
            "selection_samples": data.n_samples,
            "held_out_samples": 0 if held_out is None else held_out.n_samples,
            "rows": None if evidence is None else evidence.n_samples,
            "token_level": data.is_token_data if evidence is None else evidence.token_level,
            "batch_size": options.batch_size,
            "activation_budget": parse_size(options.activation_budget),
            "samples_per_run": None if evidence is None else evidence.rows,
            "nonfinite_values": None if evidence is None else evidence.nonfinite_values,
        },
        "units": unit_records(units, removed=removed, segment_ids=seg_ids, importance=selection.importance),
        "cka": None if evidence is None else np.round(evidence.cka, 6).tolist(),
        "segments": None if selection.segments is None else [list(b) for b in selection.segments],
        "k_selection": None if selection.k_curve is None else {
            "k": len(selection.segments), "curve": selection.k_curve, "rule": selection.k_rule},
        "importance_kind": selection.importance_kind,
        "pairing": pairing,
        "kv_cache": kv_cache_record(units, removed),
        "before": before,
        "suggestions": suggestions,
        "fidelity": fidelity,
        "notes": list(notes),
        "timings": timings,
    }
    if evidence is not None and evidence.rows is not None and evidence.rows < min(options.batch_size, data.n_samples):
        report["notes"].append(f"the calibration pass ran {evidence.rows} samples at a time, not --batch-size "
                               f"{options.batch_size}, to keep its activations within --activation-budget "
                               f"{options.activation_budget} (so each CKA minibatch is {evidence.rows} samples)")
    if evidence is not None and data.is_token_data and not evidence.token_level and evidence.batches:
        report["notes"].append("the units' tensors do not share one token layout (a text tower beside an image "
                               "tower): CKA and block influence read one row per sample, not per token")
    if evidence is not None and evidence.nonfinite_values:
        report["notes"].append(f"{evidence.nonfinite_values} non-finite activation values were treated as 0")
    if data.ignored:
        report["notes"].append(f"{data.source}: array(s) {', '.join(data.ignored)} ignored: no model input reads them")
    if data.fixed_batch and data.fixed_batch != options.batch_size:
        report["notes"].append(f"the model's batch dimension is fixed to {data.fixed_batch}: calibration ran in "
                               f"batches of {data.fixed_batch}, not {options.batch_size}")
    return report


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


def fidelity_records(plain_records: Sequence[dict], outcomes: Sequence, suggestions: list[dict] | None, kind,
                     data: CalibrationSet, held_out: CalibrationSet | None) -> dict:
    """The chosen removal's fidelity record (its repair's where the repair is
    applied), from the records and repair outcomes of the chosen set then of
    each achievable suggestion, in that order; each suggestion gets its own
    records (`fidelity`, `fidelity_without_repair`, `repaired`)."""
    from ..evidence.fidelity import fidelity_record

    records = iter(zip(plain_records, outcomes))

    def final(pair):
        plain, outcome = pair
        chosen_record = outcome.fidelity if outcome is not None and outcome.applied else plain
        return fidelity_record(chosen_record, kind, data, held_out)

    fidelity = final(next(records))
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
    return fidelity


def repair_record(outcome, units: Sequence[PrunableUnit], kind, data: CalibrationSet,
                  held_out: CalibrationSet | None) -> dict | None:
    """The report's `repair`: the chosen set's maps and its fidelity without them (None: no repair ran)."""
    if outcome is None:
        return None
    from ..evidence.fidelity import fidelity_record

    return {**outcome.record(units),
            "fidelity_without_repair": fidelity_record(outcome.fidelity_without, kind, data, held_out)}
