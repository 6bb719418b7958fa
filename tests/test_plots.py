"""The report figure: the PNG on disk and the content of the returned figure
(panels, labels, one marker per removed unit), for compress and analyze
reports and for criteria without CKA or importance."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from figures import panels
from radio_reports import analyze_report, compress_report
from sglp_onnx.report.plots import GID_REMOVED_BAR, GID_REMOVED_COLS, GID_REMOVED_ROWS, plot_report


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def marker_count(ax, gid: str) -> int:
    lines = [line for line in ax.get_lines() if line.get_gid() == gid]
    assert len(lines) == 1, f"expected one {gid} marker line"
    return len(lines[0].get_xdata())


def removed_indices(report: dict) -> list[int]:
    return [i for i, u in enumerate(report["units"]) if u["removed"]]


def test_compress_report_figure_and_png(tmp_path):
    report = compress_report()
    removed = removed_indices(report)
    assert removed, "the fixture must remove some units"
    path = tmp_path / "figure.png"

    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    fig = plot_report(report, path)
    assert plt.get_fignums() == open_before  # nothing left open in pyplot's registry

    width, height = png_size(path)
    assert 1200 <= width <= 4000 and 500 <= height <= 3000
    assert 1.4 < width / height < 3.0
    parts = panels(fig)
    assert sorted(parts) == ["a", "b", "c"]
    assert len(fig.axes) == 4  # three panels and the heatmap's colour bar
    heat, bars, cost = parts["a"], parts["b"], parts["c"]
    for ax in (heat, bars):
        assert ax.get_xlabel() and ax.get_ylabel()
    assert cost.get_ylabel()
    assert "CKA" in heat.get_title(loc="left")
    assert fig.get_suptitle()
    colorbar = next(ax for ax in fig.axes if ax not in parts.values())
    assert "CKA" in colorbar.get_ylabel()

    # The heatmap is the CKA matrix, with a marker per removed unit on each axis.
    image = heat.get_images()[0].get_array()
    assert image.shape == (len(report["units"]),) * 2
    assert marker_count(heat, GID_REMOVED_COLS) == len(removed)
    assert marker_count(heat, GID_REMOVED_ROWS) == len(removed)
    cols = next(line for line in heat.get_lines() if line.get_gid() == GID_REMOVED_COLS)
    rows = next(line for line in heat.get_lines() if line.get_gid() == GID_REMOVED_ROWS)
    assert sorted(cols.get_xdata()) == removed and sorted(rows.get_ydata()) == removed
    # Segment outlines: two rectangles (halo and line) per segment.
    assert len(heat.patches) == 2 * len(report["segments"])

    # One bar per unit at the unit's importance; exactly the removed ones hatched.
    unit_bars = [p for p in bars.patches if p.get_width() > 0]
    assert len(unit_bars) == len(report["units"])
    heights = [p.get_height() for p in unit_bars]
    assert heights == pytest.approx([u["importance"] for u in report["units"]])
    hatched = [i for i, p in enumerate(unit_bars) if p.get_hatch()]
    assert hatched == removed
    assert sum(p.get_gid() == GID_REMOVED_BAR for p in unit_bars) == len(removed)
    # Segment colours: units of one segment share a colour, neighbours differ.
    colors = [p.get_facecolor() for p in unit_bars]
    for a, b in zip(report["units"], report["units"][1:]):
        same = colors[a["index"]] == colors[b["index"]]
        assert same == (a["segment"] == b["segment"])

    # Before/after: 100% bars and the after/before ratios of the report.
    ratios = sorted(round(p.get_height(), 6) for p in cost.patches)
    expected = sorted([100.0] * 3 + [round(100 * report["after"][k] / report["before"][k], 6)
                                     for k in ("params", "flops", "file_size")])
    assert ratios == pytest.approx(expected)


def test_analysis_report_shows_suggestions_instead_of_after(tmp_path):
    report = analyze_report()
    assert "after" not in report
    fig = plot_report(report, tmp_path / "analysis.png")
    cost = panels(fig)["c"]
    assert "suggestion" in cost.get_title(loc="left")
    ticks = [t.get_text() for t in cost.get_xticklabels()]
    assert ticks == [f"target {100 * s['target_flops']:.0f}%" for s in report["suggestions"]]
    flops_bars = [p.get_height() for p in cost.patches][: len(report["suggestions"])]
    assert flops_bars == pytest.approx([100 * s["flops_removed_fraction"] for s in report["suggestions"]])
    assert "selected" in fig.get_suptitle()


@pytest.mark.parametrize("criterion", ["last", "random"])
def test_criteria_without_cka_or_importance_still_plot(tmp_path, criterion):
    report = analyze_report(criterion)
    assert report["cka"] is None and report["segments"] is None
    path = tmp_path / f"{criterion}.png"
    fig = plot_report(report, path)
    assert png_size(path)[0] > 0
    parts = panels(fig)
    assert sorted(parts) == ["a", "b", "c"]
    assert not parts["a"].get_images()  # a note instead of a heatmap
    assert "no CKA" in " ".join(t.get_text() for t in parts["a"].texts)
    bars = [p for p in parts["b"].patches if p.get_width() > 0]
    assert [i for i, p in enumerate(bars) if p.get_hatch()] == removed_indices(report)
    assert "FLOPs" in parts["b"].get_ylabel()


def test_report_without_after_or_suggestions_gets_a_note():
    report = analyze_report()
    report["suggestions"] = None
    fig = plot_report(report)  # no path: nothing written, the figure is still returned
    assert "no removal suggestions" in " ".join(t.get_text() for t in panels(fig)["c"].texts)


def test_compress_plot_option_writes_png_at_the_given_path(tmp_path):
    from sglp_onnx import compress

    plot = tmp_path / "heatmap"  # no suffix: still PNG bytes
    compress(Path(__file__).resolve().parents[1] / "models" / "cnn1d_radio.onnx", tmp_path / "m.onnx",
             criterion="last", remove=3, plot=plot)
    assert png_size(plot)[0] >= 1200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap", "m.json", "m.onnx"]


def _texts(ax) -> str:
    return " ".join(t.get_text() for t in ax.texts)


def test_compress_figure_shows_the_held_out_fidelity_not_the_in_sample_agreement():
    report = compress_report()
    fidelity = report["fidelity"]
    assert fidelity["held_out"]
    text = _texts(panels(plot_report(report))["c"])
    assert f"top-1 agreement {fidelity['top1_agreement']:.1%}" in text
    assert f"{fidelity['samples']} held-out samples" in text and "calibration batch" not in text


def test_suggestions_panel_shows_each_suggestions_fidelity():
    report = analyze_report()
    text = _texts(panels(plot_report(report))["c"])
    shown = [s for s in report["suggestions"] if s.get("achievable")]
    assert shown
    for s in shown:
        assert f"top-1 {s['fidelity']['top1_agreement']:.1%}" in text


def test_small_importances_get_a_log_axis_and_every_removed_bar_a_marker():
    report = compress_report()
    removed = removed_indices(report)
    values = [u["importance"] for u in report["units"]]
    positive = [v for v in values if v and v > 0]
    bars = panels(plot_report(report))["b"]
    assert bars.get_yscale() == ("log" if max(positive) / min(positive) > 50 else "linear")
    assert marker_count(bars, "removed-unit-marks") == len(removed)
    # A report whose removed units score 1000x less than the rest: log scale, bars above the floor.
    for u in report["units"]:
        u["importance"] = 1e-3 if u["removed"] else 1.0
    bars = panels(plot_report(report))["b"]
    assert bars.get_yscale() == "log" and bars.get_ylim()[0] < 1e-3


def test_saved_figure_holds_every_label(tmp_path):
    """The PNG is cut to the drawn content (tight box): no tick label or axis label is clipped."""
    report = analyze_report()
    for u in report["units"]:
        u["name"] = f"a.long.module.path.{u['name']}"  # long names: indices on the axes, long tick text
    path = tmp_path / "long.png"
    fig = plot_report(report, path)
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    width, height = png_size(path)
    assert width == pytest.approx((box.width + 0.3) * 110, abs=3)
    assert height == pytest.approx((box.height + 0.3) * 110, abs=3)
