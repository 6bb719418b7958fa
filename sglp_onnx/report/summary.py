"""The compression report: a JSON document for pipelines and a terminal
summary for people, both built from the same dictionary.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..units.discovery import PrunableUnit

REPORT_VERSION = 1


def unit_records(
    units: Sequence[PrunableUnit],
    *,
    removed: set[int],
    segment_ids: Sequence[int] | None,
    importance: Sequence[float] | None,
) -> list[dict[str, Any]]:
    records = []
    for i, u in enumerate(units):
        records.append({
            "index": i,
            "name": u.name,
            "scope": u.scope,
            "entry": u.entry,
            "exit": u.exit,
            "params": int(u.params),
            "flops": int(u.flops),
            "sublayers": u.sublayers,
            "attention": u.has_attention,
            "segment": None if segment_ids is None else int(segment_ids[i]),
            "importance": None if importance is None else _finite_or_none(importance[i]),
            "removed": i in removed,
            "cache_inputs": list(u.owned_inputs),
            "cache_outputs": list(u.owned_outputs),
        })
    return records


def to_json(report: dict) -> str:
    """The report as strict JSON: NaN and Infinity are not JSON, so they become null."""
    return json.dumps(_finite_or_none(report), indent=2, default=_json_default, allow_nan=False) + "\n"


def _finite_or_none(value):
    """`value` with every non-finite float, also nested in lists and dicts, replaced by None."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite_or_none(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def human_bytes(n: float) -> str:
    """3670016 -> '3.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def summary(report: dict) -> str:
    """A human-readable summary of a compression or analysis report."""
    lines = []
    units = report["units"]
    total_flops = report["before"]["flops"] or 1
    lines.append(f"{len(units)} prunable units ({report['granularity']} granularity), "
                 f"criterion {report['criterion']}")
    header = f"{'#':>3}  {'unit':<28} {'params':>8} {'FLOPs%':>7} {'seg':>4} {'importance':>11}  removed"
    lines.append(header)
    lines.append("-" * len(header))
    for u in units:
        imp = "-" if u["importance"] is None else f"{u['importance']:.4g}"
        seg = "-" if u["segment"] is None else str(u["segment"])
        name = u["name"] if len(u["name"]) <= 28 else "..." + u["name"][-25:]
        lines.append(f"{u['index']:>3}  {name:<28} {human_count(u['params']):>8} "
                     f"{100 * u['flops'] / total_flops:>6.2f}% {seg:>4} {imp:>11}  {'yes' if u['removed'] else ''}")
    if report.get("segments"):
        lines.append(segments_line(report["segments"]))
        if report.get("k_selection", {}).get("rule"):
            lines.append(f"  K rule: {report['k_selection']['rule']}")
    if report.get("importance_kind"):
        lines.append(f"importance: {report['importance_kind']}")
    removed = [u["name"] for u in units if u["removed"]]
    lines.append(f"removed {len(removed)} of {len(units)} units: {', '.join(removed) or 'none'}")
    max_loss = (report.get("budget") or {}).get("max_loss")
    if max_loss is not None and not removed and report.get("output"):
        lines.append(f"warning: --max-loss {max_loss:g}: no unit can be removed within it; {report['output']} is an "
                     "unchanged copy of the input")
    cache = report.get("kv_cache")
    if cache and cache["removed_outputs"]:
        mapping = ", ".join(f"{k}->{'-' if v is None else v}" for k, v in cache["layer_map"].items())
        lines.append(f"KV cache: {cache['layers_before']} -> {cache['layers_after']} layers (old->new: {mapping}); "
                     f"{len(cache['removed_inputs'])} past inputs and {len(cache['removed_outputs'])} present "
                     "outputs removed, " + ("the others keep their names" if "renamed" not in cache
                                            else "the others renumbered 0..n-1 (--renumber-cache)" if cache["renamed"]
                                            else "the others numbered 0..n-1 already (--renumber-cache)"))
    before, after = report["before"], report.get("after")
    if after:
        def ratio(key):
            return f"{after[key] / before[key]:.3f}x" if before[key] else "n/a"
        lines.append(f"params  {human_count(before['params']):>8} -> {human_count(after['params']):>8}  ({ratio('params')})")
        lines.append(f"FLOPs   {human_count(before['flops']):>8} -> {human_count(after['flops']):>8}  ({ratio('flops')}, "
                     "per sample)")
        lines.append(f"size    {human_bytes(before['file_size']):>10} -> {human_bytes(after['file_size']):>10}  "
                     f"({ratio('file_size')})")
    validation = report.get("validation")
    if validation:
        checks = [k for k in ("checker", "runs", "signature", "finite", "opset_ir_kept") if validation.get(k)]
        extra = ""
        if validation.get("top1_agreement") is not None:
            extra = f", top-1 agreement with the input model on a calibration batch {validation['top1_agreement']:.1%}"
        lines.append(f"validation passed ({', '.join(checks)}){extra}")
    lines += fidelity_lines(report)
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    timings = report.get("timings", {})
    if timings:
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    if report.get("dry_run"):
        also = f" and {report['report_path']}" if report.get("report_path") else ""
        lines.append(f"dry run: nothing written (a real run writes {report['output']}{also})")
    else:
        if report.get("output"):
            lines.append(f"wrote {report['output']}")
        if report.get("report_path"):
            lines.append(f"report {report['report_path']}")
    return "\n".join(lines)


def fidelity_text(record: dict | None) -> str:
    """`KL 0.0123 nats, top-1 agreement 98.4%` for a fidelity record."""
    if not record:
        return "-"
    name = {"kl": "KL", "cosine": "cosine distance", "relative": "relative error"}[record["kind"]]
    text = f"{name} {record['score']:.4g}" + (" nats" if record["kind"] == "kl" else "")
    if record.get("top1_agreement") is not None:
        text += f", top-1 agreement {record['top1_agreement']:.1%}"
    return text


def fidelity_lines(report: dict) -> list[str]:
    """The fidelity line of a summary, and the warning when it is poor."""
    record = report.get("fidelity")
    if not record:
        return []
    where = (f"on {record['samples']} calibration samples held out from selection" if record["held_out"] else
             f"on the {record['samples']} selection samples (too few calibration samples to hold any out)")
    lines = [f"fidelity to the original: {fidelity_text(record)} ({record['rows']} rows {where}; "
             f"{record['definition']})"]
    rule = record.get("rule") or ""
    if "not scored" in rule or "--fidelity-output" in rule:  # not simply the first output: say which
        lines.append(f"  scored output {record['output']!r}: {rule}")
    repair = report.get("repair")
    if repair and repair["applied"]:
        lines.append(f"  with {len(repair['cuts'])} repair map(s) ({repair['form']}, {repair['params']:,} parameters); "
                     f"without repair: {fidelity_text(repair['fidelity_without_repair'])}")
    if record["poor"] and report.get("removed"):
        lines.append("warning: the pruned model has drifted far from the original; remove fewer units "
                     "(--remove, --target-flops, or --max-loss to bound the drift), or heal it with "
                     "`sglp-onnx finetune`")
    return lines


def tool_info() -> dict:
    return {"name": "sglp-onnx", "version": __version__, "report_version": REPORT_VERSION}


def _importance_ranks(units: Sequence[dict]) -> list[int | None]:
    """Rank 1 = least important (the first candidate for removal); ties rank the later unit lower."""
    scored = [i for i, u in enumerate(units) if u["importance"] is not None]
    order = sorted(scored, key=lambda i: (units[i]["importance"], -i))
    ranks: list[int | None] = [None] * len(units)
    for position, i in enumerate(order, start=1):
        ranks[i] = position
    return ranks


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def analysis_summary(report: dict) -> str:
    """The `sglp-onnx analyze` table: every unit with its cost, segment, importance
    rank and CKA to its neighbours, then the segments and the removal suggestions."""
    units = report["units"]
    cka = report.get("cka")
    total_flops = report["before"]["flops"] or 1
    calib = report.get("calibration") or {}
    lines = [f"{len(units)} prunable units ({report['granularity']} granularity), criterion {report['criterion']}"]
    if calib.get("source"):
        lines[0] += f"; calibration: {calib.get('samples')} samples from {calib['source']}"
    ranks = _importance_ranks(units)
    header = (f"{'#':>3}  {'unit':<22} {'scope':<22} {'params':>7} {'FLOPs%':>7} {'seg':>3} {'rank':>5} "
              f"{'importance':>10} {'CKA-prev':>8} {'CKA-next':>8}  selected")
    lines += [header, "-" * len(header)]
    for i, u in enumerate(units):
        prev = f"{cka[i][i - 1]:.3f}" if cka and i > 0 else "-"
        nxt = f"{cka[i][i + 1]:.3f}" if cka and i + 1 < len(units) else "-"
        seg = "-" if u["segment"] is None else str(u["segment"])
        rank = "-" if ranks[i] is None else str(ranks[i])
        imp = "-" if u["importance"] is None else f"{u['importance']:.4g}"
        lines.append(f"{i:>3}  {_short(u['name'], 22):<22} {_short(u['scope'] or '-', 22):<22} "
                     f"{human_count(u['params']):>7} {100 * u['flops'] / total_flops:>6.2f}% {seg:>3} {rank:>5} "
                     f"{imp:>10} {prev:>8} {nxt:>8}  {'yes' if u['removed'] else ''}")
    lines.append(f"units cover {100 * sum(u['flops'] for u in units) / total_flops:.1f}% of the model's "
                 f"{human_count(report['before']['flops'])} FLOPs per sample and "
                 f"{human_count(sum(u['params'] for u in units))} of its {human_count(report['before']['params'])} parameters")
    if any(r is not None for r in ranks):
        lines.append(f"rank: 1 = least important; importance: {report.get('importance_kind') or '-'}")
    if cka:
        lines.append("CKA-prev/next: linear CKA between this unit's output and its neighbour's "
                     "(near 1: the two outputs carry the same information)")
    if report.get("segments"):
        lines.append(segments_line(report["segments"]))
        rule = (report.get("k_selection") or {}).get("rule")
        if rule:
            lines.append(f"  K rule: {rule}")
    budget = report.get("budget") or {}
    given = next(((k, v) for k, v in budget.items() if k != "units_removed" and v is not None), None)
    chosen = [u["name"] for u in units if u["removed"]]
    lines.append(f"selected at {given[0].replace('_', '-')} {given[1]}: {len(chosen)} units: "
                 f"{', '.join(chosen) or 'none'}" if given else
                 f"selected {len(chosen)} units: {', '.join(chosen) or 'none'}")
    lines += fidelity_lines(report)
    suggestions = report.get("suggestions")
    if suggestions:
        lines.append(f"removal suggestions ({report['criterion']}; same as compress --target-flops F):")
        lines.append(f"  {'target':>6} {'units':>5} {'FLOPs removed':>13} {'params removed':>14}  "
                     f"{'held-out fidelity':<40}  units removed")
        total_params = report["before"]["params"] or 1
        for s in suggestions:
            target = f"{100 * s['target_flops']:.0f}%"
            if not s["achievable"]:
                lines.append(f"  {target:>6}  not reachable: {s['reason']}")
                continue
            fidelity = fidelity_text(s.get('fidelity')) + (" (repaired)" if s.get("repaired") else "")
            lines.append(f"  {target:>6} {s['units_removed']:>5} {100 * s['flops_removed_fraction']:>12.1f}% "
                         f"{100 * s['params_removed'] / total_params:>13.1f}%  "
                         f"{fidelity:<40}  {', '.join(s['names'])}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    timings = report.get("timings", {})
    if timings:
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return "\n".join(lines)


SCHEMA_FILE = "report.schema.json"


def report_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the report, shipped with the package."""
    from importlib import resources

    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def validate_report(report: dict) -> None:
    """Check `report` (a dict, or JSON text) against `report.schema.json`.

    Raises `jsonschema.ValidationError` naming the first offending key.
    Reports are checked as they would be written, so numpy values are fine.
    """
    import jsonschema

    data = json.loads(report if isinstance(report, str) else to_json(report))
    jsonschema.validate(data, report_schema(), cls=jsonschema.Draft202012Validator)


def segments_line(segments: Sequence[Sequence[int]]) -> str:
    """The segments as the JSON stores them: half-open unit ranges [start, stop)."""
    ranges = ", ".join(f"[{a}, {b})" for a, b in segments)
    return f"segments (K={len(segments)}, unit ranges [start, stop) as in the JSON report): {ranges}"
