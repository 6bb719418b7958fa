"""One figure of a report: the CKA heatmap with the Fisher segments and the
removed units, the importance of every unit, and the cost before and after.

It reads only the report dictionary, so a saved JSON report can be plotted
again later. Rendering uses the Agg canvas directly (never pyplot), so it
works without a display and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..errors import UserError
from .summary import human_bytes, human_count

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every
# common form of colour-vision deficiency. Segments cycle through six of
# them; vermillion is kept for removed units and black for outlines.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442")
REMOVED_COLOR = "#D55E00"  # vermillion: removed units, everywhere in the figure
NEUTRAL = "#7F7F7F"
HEATMAP_CMAP = "cividis"  # perceptually uniform and colour-blind safe
REMOVED_HATCH = "///"

# Artist ids the tests (and anyone post-processing the figure) can look for.
GID_REMOVED_ROWS = "removed-units-rows"
GID_REMOVED_COLS = "removed-units-cols"
GID_REMOVED_BAR = "removed-unit-bar"
GID_REMOVED_MARKS = "removed-unit-marks"
# Importances spanning more than this ratio (largest / smallest non-zero) get a log axis.
LOG_SCALE_RANGE = 50.0



def _segment_color(segment: int | None) -> str:
    return NEUTRAL if segment is None else OKABE_ITO[segment % len(OKABE_ITO)]


def _tick_step(n: int, most: int) -> int:
    return max(1, -(-n // most))


def _placeholder(ax, title: str, message: str) -> None:
    ax.set_title(title, loc="left", fontweight="bold")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes, color=NEUTRAL)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _heatmap(fig: Figure, ax, report: dict, removed: Sequence[int], verb: str) -> None:
    cka = report.get("cka")
    title = "(a) CKA between unit outputs"
    if not cka:
        _placeholder(ax, title, f"no CKA: criterion {report.get('criterion')!r}\nruns no calibration pass")
        return
    n = len(cka)
    # Deep networks often keep CKA above 0.5 everywhere: start the colour
    # scale at the data's floor (rounded down to 0.1) so the structure shows.
    low = min(min(row) for row in cka)
    vmin = min(0.9, max(0.0, math.floor(low * 10) / 10))
    image = ax.imshow(cka, cmap=HEATMAP_CMAP, vmin=vmin, vmax=1.0, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("linear CKA (1 = same representation)")

    segments = report.get("segments") or []
    for k, (start, stop) in enumerate(segments):
        # The within-segment block on the diagonal, outlined in white over a
        # black halo so it reads on both ends of the colour map.
        for color, width in (("black", 3.2), ("white", 1.6)):
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), stop - start, stop - start, fill=False,
                                   edgecolor=color, linewidth=width))
        if k:
            ax.axhline(start - 0.5, color="white", linewidth=0.8, linestyle=(0, (4, 3)))
            ax.axvline(start - 0.5, color="white", linewidth=0.8, linestyle=(0, (4, 3)))

    # Removed units: a marker on both axes, just outside the image.
    ax.plot(list(removed), [-1.1] * len(removed), linestyle="none", marker="v", markersize=7,
            color=REMOVED_COLOR, markeredgecolor="black", clip_on=False, gid=GID_REMOVED_COLS)
    ax.plot([-1.1] * len(removed), list(removed), linestyle="none", marker=">", markersize=7,
            color=REMOVED_COLOR, markeredgecolor="black", clip_on=False, gid=GID_REMOVED_ROWS,
            label=f"{verb} unit")
    ax.set_xlim(-1.8, n - 0.5)
    ax.set_ylim(n - 0.5, -1.8)
    step = _tick_step(n, 25)
    ticks = list(range(0, n, step))
    names, axis_label = _unit_labels(report["units"], ticks)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(names, rotation=90)
    ax.set_yticklabels(names)
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label, tick in zip(labels, ticks):
            if tick in removed:
                label.set_color(REMOVED_COLOR)
                label.set_fontweight("bold")
    ax.tick_params(labelsize=8)
    ax.set_xlabel(axis_label)
    ax.set_ylabel(axis_label)
    for spine in ax.spines.values():
        spine.set_visible(False)
    subtitle = f"{len(segments)} Fisher segments outlined" if segments else "no segmentation"
    ax.set_title(f"{title}\n{subtitle}; \u25b6\u25bc = {verb}", loc="left", fontweight="bold")


def _unit_labels(units: Sequence[dict], ticks: Sequence[int]) -> tuple[list[str], str]:
    """Tick labels for units, the same in every panel: their names when all are
    short, else their indices (the report's table gives index and name)."""
    names = [units[i]["name"] for i in ticks]
    if max((len(s) for s in names), default=0) > 14:
        return [str(i) for i in ticks], "unit index (graph order)"
    return names, "unit (graph order)"


def _bars(ax, report: dict, removed: Sequence[int], verb: str) -> None:
    units = report["units"]
    importance = [u.get("importance") for u in units]
    has_importance = any(v is not None for v in importance)
    if has_importance:
        values = [0.0 if v is None else v for v in importance]
        ylabel = "importance"
        kind = report.get("importance_kind") or "importance"
        title = f"(b) importance per unit: {kind}"
    else:
        total = report["before"].get("flops") or 1
        values = [100.0 * u["flops"] / total for u in units]
        ylabel = "share of model FLOPs (%)"
        title = f"(b) units (criterion {report.get('criterion')!r} scores no importance): FLOPs share"
    x = list(range(len(units)))
    segments = [u.get("segment") for u in units]
    colors = [_segment_color(s) for s in segments]
    bars = ax.bar(x, values, color=colors, edgecolor="black", linewidth=0.4, width=0.8)
    removed_set = set(removed)
    for i, patch in enumerate(bars.patches):
        if i in removed_set:
            patch.set_hatch(REMOVED_HATCH)
            patch.set_edgecolor("black")
            patch.set_linewidth(0.9)
            patch.set_gid(GID_REMOVED_BAR)
    n = len(units)
    step = _tick_step(n, 40)
    ticks = x[::step]
    ax.set_xticks(ticks)
    names, axis_label = _unit_labels(units, ticks)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    for label, tick in zip(ax.get_xticklabels(), ticks):
        if tick in removed_set:
            label.set_color(REMOVED_COLOR)
            label.set_fontweight("bold")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel(axis_label)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left", fontweight="bold", fontsize=10, wrap=True)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles = []
    seen = sorted({s for s in segments if s is not None})
    handles += [Patch(facecolor=_segment_color(s), edgecolor="black", label=f"segment {s}") for s in seen]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch=REMOVED_HATCH,
                         label=f"{verb} ({len(removed_set)})"))
    ax.legend(handles=handles, fontsize=7, ncol=min(len(handles), 5), loc="upper left", framealpha=0.9)
    top = max(values, default=0.0)
    positive = [v for v in values if v > 0]
    if positive and top / min(positive) > LOG_SCALE_RANGE:
        # Removed units are the least important: on a linear scale their bars
        # are too small to see next to the largest. A log scale shows every
        # non-zero bar; a zero one stays at the floor.
        floor = min(positive) / 3
        ax.set_yscale("log")
        ax.set_ylim(floor, top * (top / floor) ** 0.45)  # room for the legend, in log space
        ax.set_ylabel(f"{ylabel} (log scale)")
        base = floor
    else:
        if top > 0:
            ax.set_ylim(0, top * 1.35)  # room for the legend above the bars
        base = 0.0
    # A marker above each removed (selected) bar, however small the bar.
    marks = sorted(removed_set)
    ax.plot(marks, [max(values[i], base) for i in marks], linestyle="none", marker="v", markersize=6,
            color=REMOVED_COLOR, markeredgecolor="black", gid=GID_REMOVED_MARKS, clip_on=False,
            transform=ax.transData)


def _cost(ax, report: dict) -> None:
    before, after = report.get("before") or {}, report.get("after")
    if after:
        keys = [k for k in ("params", "flops", "file_size") if before.get(k)]
        labels = {"params": "parameters", "flops": "FLOPs / sample", "file_size": "file size"}
        fmt = {"params": human_count, "flops": human_count, "file_size": human_bytes}
        x = list(range(len(keys)))
        width = 0.38
        ax.bar([i - width / 2 for i in x], [100.0] * len(keys), width, color=OKABE_ITO[0], label="before")
        kept = [100.0 * after[k] / before[k] for k in keys]
        ax.bar([i + width / 2 for i in x], kept, width, color=OKABE_ITO[1], label="after")
        for i, k in enumerate(keys):
            ax.text(i - width / 2, 101, fmt[k](before[k]), ha="center", va="bottom", fontsize=8)
            ax.text(i + width / 2, kept[i] + 1, f"{fmt[k](after[k])}\n{kept[i]:.0f}%", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([labels[k] for k in keys])
        ax.set_ylabel("% of the input model")
        ax.set_ylim(0, 150)
        ax.set_yticks(range(0, 101, 20))  # the room above 100% is for the labels
        n_removed = sum(1 for u in report["units"] if u.get("removed"))
        ax.set_title(f"(c) cost before and after removing {n_removed} of {len(report['units'])} units",
                     loc="left", fontweight="bold", fontsize=10)
        # Below the fidelity line, which takes the top of the panel.
        ax.legend(fontsize=8, loc="upper right", ncol=2, bbox_to_anchor=(1.0, 0.91))
        line = _fidelity_line(report)
        if line:
            ax.text(0.01, 0.97, line, transform=ax.transAxes, va="top", fontsize=8,
                    color=REMOVED_COLOR if (report.get("fidelity") or {}).get("poor") else "black")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        return
    suggestions = [s for s in (report.get("suggestions") or [])]
    title = "(c) removal suggestions"
    if not suggestions:
        _placeholder(ax, title, "no 'after' (nothing was written) and no removal suggestions in this report")
        return
    x = list(range(len(suggestions)))
    width = 0.38
    flops = [100.0 * (s.get("flops_removed_fraction") or 0.0) for s in suggestions]
    total_params = before.get("params") or 1
    params = [100.0 * (s.get("params_removed") or 0) / total_params for s in suggestions]
    ax.bar([i - width / 2 for i in x], flops, width, color=OKABE_ITO[1], label="FLOPs removed")
    ax.bar([i + width / 2 for i in x], params, width, color=OKABE_ITO[4], label="parameters removed")
    for i, s in enumerate(suggestions):
        target = 100.0 * s["target_flops"]
        ax.plot([i - 0.45, i + 0.45], [target, target], color="black", linestyle="--", linewidth=1,
                label="FLOPs target" if i == 0 else None)
        text = f"{s['units_removed']} units" if s.get("achievable") else "not\nreachable"
        fidelity = s.get("fidelity") or {}
        if s.get("achievable") and fidelity:
            text += "\n" + _fidelity_short(fidelity)
        ax.text(i, max(flops[i], params[i], target) + 2, text, ha="center", va="bottom", fontsize=8,
                color=REMOVED_COLOR if fidelity.get("poor") else "black")
    ax.set_xticks(x)
    ax.set_xticklabels([f"target {100 * s['target_flops']:.0f}%" for s in suggestions])
    ax.set_ylabel("% of the input model removed")
    ax.set_ylim(0, max([*flops, *params, *(100 * s["target_flops"] for s in suggestions)]) * 1.45 + 8)
    ax.set_title(f"{title} of {report.get('criterion')!r} per FLOPs target, with their held-out fidelity",
                 loc="left", fontweight="bold", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _kind(fidelity: dict) -> str:
    kind = fidelity.get("kind") or "score"
    return {"kl": "KL"}.get(kind, kind.replace("_", " "))


def _fidelity_short(fidelity: dict) -> str:
    """A suggestion's fidelity in a few words: top-1 agreement and the score."""
    parts = []
    if fidelity.get("top1_agreement") is not None:
        parts.append(f"top-1 {fidelity['top1_agreement']:.1%}")
    if fidelity.get("score") is not None:
        parts.append(f"{_kind(fidelity)} {fidelity['score']:.3g}")
    return "\n".join(parts)


def _fidelity_line(report: dict) -> str:
    """How close the pruned model stays to the input: the held-out fidelity
    (the number that matters), else the validation batch's agreement, named as such."""
    fidelity = report.get("fidelity") or {}
    if fidelity.get("score") is not None:
        where = (f"{fidelity.get('samples', '?')} held-out samples" if fidelity.get("held_out")
                 else "in-sample: too few to hold any out")
        agreement = (f"top-1 agreement {fidelity['top1_agreement']:.1%}, "
                     if fidelity.get("top1_agreement") is not None else "")
        unit = f" {fidelity['unit']}" if fidelity.get("unit") else ""
        poor = " (poor)" if fidelity.get("poor") else ""
        return f"fidelity to the input: {agreement}{_kind(fidelity)} {fidelity['score']:.3g}{unit}{poor} ({where})"
    agreement = (report.get("validation") or {}).get("top1_agreement")
    if agreement is not None:
        return f"top-1 agreement with the input model (validation batch, in-sample): {agreement:.1%}"
    return ""


# The formats --plot writes, by the suffix of its path.
PLOT_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def plot_format(path: str | os.PathLike) -> str:
    """The figure format `path`'s suffix names, PNG without a suffix (a
    temporary file of `model_files.atomic_paths` counts by its destination);
    a UserError for any other suffix."""
    from ..files.model_files import destination_name

    name = destination_name(path)
    suffix = os.path.splitext(name)[1].lower()
    if not suffix:
        return "png"
    if suffix not in PLOT_FORMATS:
        raise UserError(f"the plot {name} must end in .png, .svg or .pdf (the suffix chooses the format), "
                        f"not {suffix}")
    return PLOT_FORMATS[suffix]


def plot_report(report: dict, path: str | os.PathLike | None = None) -> Figure:
    """Draw `report` (from `compress` or `analyze`) as one three-panel figure.

    (a) the CKA matrix between unit outputs with the Fisher segments
    outlined and the removed units marked on both axes; (b) every unit's
    importance (or FLOPs share when the criterion has no score) coloured by
    segment, removed units hatched; (c) parameters, FLOPs and file size
    before and after, or, for an analysis, the removal suggestions. When
    `path` is given the figure is written there as PNG, SVG or PDF, as its
    suffix says (see `plot_format`). Returns the figure.
    """
    fmt = plot_format(path) if path is not None else None
    units = report["units"]
    removed = [i for i, u in enumerate(units) if u.get("removed")]
    fig = Figure(figsize=(15, 7.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    # Without a CKA matrix the left panel only carries a note: keep it narrow.
    left = 1.0 if report.get("cka") else 0.3
    grid = fig.add_gridspec(2, 2, width_ratios=[left, 1.15], height_ratios=[1.25, 1.0])
    # A compress report says what was removed; an analysis, what it selects.
    verb = "removed" if report.get("after") else "selected"
    _heatmap(fig, fig.add_subplot(grid[:, 0]), report, removed, verb)
    _bars(fig.add_subplot(grid[0, 1]), report, removed, verb)
    _cost(fig.add_subplot(grid[1, 1]), report)
    name = os.path.basename(str(report.get("input", "model")))
    fig.suptitle(f"sglp-onnx {name}: criterion {report.get('criterion')}, {verb} {len(removed)} of "
                 f"{len(units)} units", fontsize=13, fontweight="bold")
    if path is not None:
        # An explicit format: `compress` passes a temporary name (.NAME.XXXXXXXX.tmp).
        # A tight box: long unit names and rotated ticks are never cut off at the edges.
        fig.savefig(path, format=fmt, dpi=110, bbox_inches="tight", pad_inches=0.15)
    return fig
