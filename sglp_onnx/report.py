"""The compression report: a JSON document for pipelines and a terminal
summary for people, both built from the same dictionary.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from . import __version__
from .units import PrunableUnit

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


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=_json_default) + "\n"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _bytes(n: int) -> str:
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
        lines.append(f"{u['index']:>3}  {name:<28} {_human(u['params']):>8} "
                     f"{100 * u['flops'] / total_flops:>6.2f}% {seg:>4} {imp:>11}  {'yes' if u['removed'] else ''}")
    if report.get("segments"):
        segs = ", ".join(f"[{a}..{b - 1}]" for a, b in report["segments"])
        lines.append(f"segments (K={len(report['segments'])}): {segs}")
        if report.get("k_selection", {}).get("rule"):
            lines.append(f"  K rule: {report['k_selection']['rule']}")
    if report.get("importance_kind"):
        lines.append(f"importance: {report['importance_kind']}")
    removed = [u["name"] for u in units if u["removed"]]
    lines.append(f"removed {len(removed)} of {len(units)} units: {', '.join(removed) or 'none'}")
    before, after = report["before"], report.get("after")
    if after:
        def ratio(key):
            return f"{after[key] / before[key]:.3f}x" if before[key] else "n/a"
        lines.append(f"params  {_human(before['params']):>8} -> {_human(after['params']):>8}  ({ratio('params')})")
        lines.append(f"FLOPs   {_human(before['flops']):>8} -> {_human(after['flops']):>8}  ({ratio('flops')}, "
                     "per sample)")
        lines.append(f"size    {_bytes(before['file_size']):>10} -> {_bytes(after['file_size']):>10}  "
                     f"({ratio('file_size')})")
    validation = report.get("validation")
    if validation:
        checks = [k for k in ("checker", "runs", "signature", "finite", "opset_ir_kept") if validation.get(k)]
        extra = ""
        if validation.get("top1_agreement") is not None:
            extra = f", top-1 agreement with the input model on a calibration batch {validation['top1_agreement']:.1%}"
        lines.append(f"validation passed ({', '.join(checks)}){extra}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    timings = report.get("timings", {})
    if timings:
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    if report.get("output"):
        lines.append(f"wrote {report['output']}")
    if report.get("report_path"):
        lines.append(f"report {report['report_path']}")
    return "\n".join(lines)


def tool_info() -> dict:
    return {"name": "sglp-onnx", "version": __version__, "report_version": REPORT_VERSION}
