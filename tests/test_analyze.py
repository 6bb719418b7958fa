"""`sglp-onnx analyze`: the table, the removal suggestions (equal to what
`compress --target-flops` removes), nothing written, and clean output in
pipes (no progress bars unless -v; --json is pure JSON)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from radio_reports import MODEL, RATIO, analyze_report
from sglp_onnx import UserError, analyze
from sglp_onnx.selection.criteria import Criterion, Selection
from sglp_onnx.pipeline import suggest_removals
from sglp_onnx.report.summary import analysis_summary
from sglp_onnx.units.discovery import PrunableUnit

CLI = str(Path(sys.executable).with_name("sglp-onnx"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real console script with stdout and stderr piped, as in `... | cat`.

    Decoded by hand: text mode would turn a progress bar's '\\r' into '\\n'.
    """
    result = subprocess.run([CLI, *args], cwd=cwd, capture_output=True, timeout=600)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def assert_no_progress_noise(stderr: str) -> None:
    assert "\r" not in stderr and "%|" not in stderr and "batch/s" not in stderr, stderr


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """The radio model and its calibration sidecar alone in a folder."""
    for name in ("cnn1d_radio.onnx", "cnn1d_radio.calib.npz"):
        shutil.copy(MODEL.parent / name, tmp_path / name)
    return tmp_path


def test_cli_analyze_prints_table_and_writes_nothing(model_folder):
    before = folder_state(model_folder)
    result = run_cli("analyze", "cnn1d_radio.onnx", "--ratio", str(RATIO), cwd=model_folder)
    assert result.returncode == 0, result.stderr
    assert folder_state(model_folder) == before
    assert_no_progress_noise(result.stderr)
    out = result.stdout
    for column in ("unit", "scope", "params", "FLOPs%", "seg", "rank", "CKA-prev", "CKA-next"):
        assert column in out.splitlines()[1]
    assert "removal suggestions" in out
    for target in ("10%", "25%", "50%"):
        assert any(line.strip().startswith(target) for line in out.splitlines())


def test_cli_analyze_json_is_pure_json_with_suggestions(model_folder):
    before = folder_state(model_folder)
    result = run_cli("analyze", "cnn1d_radio.onnx", "--json", "--suggest", "0.2,0.4", cwd=model_folder)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["target_flops"] for s in report["suggestions"]] == [0.2, 0.4]
    assert "after" not in report and "output" not in report
    assert folder_state(model_folder) == before
    assert_no_progress_noise(result.stderr)


def test_cli_analyze_plot_writes_only_the_png_and_respects_force(model_folder):
    before = folder_state(model_folder)
    args = ("analyze", "cnn1d_radio.onnx", "--criterion", "last", "--plot", "fig.png")
    assert run_cli(*args, cwd=model_folder).returncode == 0
    assert set(folder_state(model_folder)) - set(before) == {"fig.png"}
    assert (model_folder / "fig.png").read_bytes()[:4] == b"\x89PNG"
    again = run_cli(*args, cwd=model_folder)
    assert again.returncode == 2 and "--force" in again.stderr
    assert run_cli(*args, "--force", cwd=model_folder).returncode == 0


def test_cli_compress_in_a_pipe_is_quiet_and_verbose_shows_progress(model_folder):
    quiet = run_cli("compress", "cnn1d_radio.onnx", "-o", "out.onnx", "--json", cwd=model_folder)
    assert quiet.returncode == 0, quiet.stderr
    assert_no_progress_noise(quiet.stderr)
    report = json.loads(quiet.stdout)
    assert report["output"] == "out.onnx" and report["suggestions"] is None
    loud = run_cli("-v", "analyze", "cnn1d_radio.onnx", "--json", cwd=model_folder)
    assert loud.returncode == 0, loud.stderr
    assert "calibration" in loud.stderr and "\r" in loud.stderr  # tqdm, on request
    json.loads(loud.stdout)  # the bars go to stderr: stdout stays JSON


def test_a_long_run_in_a_pipe_says_on_stderr_which_stage_runs_in_plain_lines(model_folder, monkeypatch):
    monkeypatch.setenv("SGLP_ONNX_PROGRESS_SECONDS", "0")  # every tick: as a run of minutes would, now and then
    piped = run_cli("compress", "cnn1d_radio.onnx", "-o", "out.onnx", "--json", cwd=model_folder)
    assert piped.returncode == 0, piped.stderr
    assert_no_progress_noise(piped.stderr)  # no bars, no carriage returns
    lines = piped.stderr.splitlines()
    assert all(line.startswith("sglp-onnx: ") and line.endswith(" s in") for line in lines), lines
    assert any("choosing units (damage step 1" in line for line in lines), lines
    assert any("validating the pruned model" in line for line in lines), lines
    json.loads(piped.stdout)  # stdout stays the report
    quiet = run_cli("-q", "compress", "cnn1d_radio.onnx", "-o", "out2.onnx", cwd=model_folder)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_cli_rejects_bad_suggestion_targets(model_folder):
    result = run_cli("analyze", "cnn1d_radio.onnx", "--suggest", "0.2,1.5", cwd=model_folder)
    assert result.returncode == 2
    assert "--suggest" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("target", [0.1, 0.25, 0.5])
def test_suggestions_equal_what_target_flops_removes(target):
    """Data-free criterion: cheap enough to compare every target."""
    report = analyze(MODEL, criterion="last", suggest=[target]).report
    (suggestion,) = report["suggestions"]
    chosen = analyze(MODEL, criterion="last", target_flops=target, suggest=None).report
    assert suggestion["removed"] == [u["index"] for u in chosen["units"] if u["removed"]]
    assert suggestion["flops_removed_fraction"] >= target


def test_default_suggestions_read_the_per_unit_search_and_still_equal_target_flops():
    # The per-FLOP search behind the suggestions reads back what the per-unit
    # search measured on the removal sets both reach (its first steps): the
    # suggestions must still be what --target-flops chooses on its own.
    report = analyze(MODEL, ratio=RATIO, suggest=[0.5]).report
    (suggestion,) = report["suggestions"]
    alone = analyze(MODEL, target_flops=0.5, suggest=None).report
    assert suggestion["removed"] == [u["index"] for u in alone["units"] if u["removed"]]
    assert sorted(suggestion["removed"]) != sorted(u["index"] for u in report["units"] if u["removed"])


def test_per_unit_and_per_flop_searches_share_one_repair_aware_runner(monkeypatch):
    # Both searches score candidates repaired: one gated graph with runtime
    # maps and one set of suffix sessions serve them (each feeds its own maps).
    from sglp_onnx.evidence import gated_runner

    built = []
    init = gated_runner.GatedRunner.__init__

    def counting(self, *args, transform=None, **kwargs):
        built.append(transform is not None)
        init(self, *args, transform=transform, **kwargs)

    monkeypatch.setattr(gated_runner.GatedRunner, "__init__", counting)
    report = analyze(MODEL, ratio=RATIO, suggest=[0.5]).report
    assert any("repair map" in note for note in report["notes"])
    (suggestion,) = report["suggestions"]
    assert sorted(suggestion["removed"]) != sorted(u["index"] for u in report["units"] if u["removed"])
    assert built.count(True) == 1


def test_sglp_suggestion_matches_compress_target_flops():
    report = analyze_report()
    suggestion = next(s for s in report["suggestions"] if s["target_flops"] == 0.25)
    chosen = analyze(MODEL, criterion="sglp", target_flops=0.25, suggest=None).report
    assert suggestion["removed"] == [u["index"] for u in chosen["units"] if u["removed"]]
    total = report["before"]["flops"]
    assert suggestion["flops_removed"] == sum(report["units"][i]["flops"] for i in suggestion["removed"])
    assert suggestion["flops_removed_fraction"] == pytest.approx(suggestion["flops_removed"] / total)
    assert suggestion["names"] == [report["units"][i]["name"] for i in suggestion["removed"]]


class FirstUnits(Criterion):
    """Removes units 0..n-1; counts how often it was asked."""

    name = "first"
    summary = "test stub"
    calls = 0

    def select(self, ctx, n_remove: int) -> Selection:
        FirstUnits.calls += 1
        return Selection(removed=list(range(n_remove)))


def stub_units(flops: list[int]) -> list[PrunableUnit]:
    return [PrunableUnit(name=f"u{i}", scope="", entry=f"x{i}", exit=f"x{i + 1}", add_nodes=(f"add{i}",),
                         flops=f, params=10 * f) for i, f in enumerate(flops)]


def test_suggest_removals_hand_computed():
    # Units hold 100 of the model's 200 FLOPs; removing the first n units
    # removes 10, 30, 60 FLOPs (one unit always stays).
    units = stub_units([10, 20, 30, 40])
    FirstUnits.calls = 0
    got = suggest_removals(FirstUnits(), None, units, 200, [0.25, 0.1, 0.5])
    assert [s["target_flops"] for s in got] == [0.25, 0.1, 0.5]  # the caller's order
    quarter, tenth, half = got
    assert tenth["removed"] == [0, 1] and tenth["flops_removed"] == 30 and tenth["params_removed"] == 300
    assert tenth["flops_removed_fraction"] == pytest.approx(0.15)
    assert quarter["removed"] == [0, 1, 2] and quarter["units_removed"] == 3
    assert half["achievable"] is False and half["removed"] is None
    assert "30.0%" in half["reason"]
    assert FirstUnits.calls == 3  # one selection per count, shared by all targets


def test_suggest_removals_rejects_fractions_outside_0_1():
    with pytest.raises(UserError, match="in \\(0, 1\\)"):
        suggest_removals(FirstUnits(), None, stub_units([1, 1]), 2, [0.0])


def test_analysis_table_reports_rank_and_neighbour_cka():
    report = analyze_report()
    lines = analysis_summary(report).splitlines()
    rows = lines[3:3 + len(report["units"])]
    cka = report["cka"]
    importance = [u["importance"] for u in report["units"]]
    least = importance.index(min(importance))
    for i, row in enumerate(rows):
        cells = row.split()
        assert cells[0] == str(i) and cells[1] == report["units"][i]["name"]
        prev = "-" if i == 0 else f"{cka[i][i - 1]:.3f}"
        nxt = "-" if i == len(rows) - 1 else f"{cka[i][i + 1]:.3f}"
        assert cells[8:10] == [prev, nxt]
        assert (cells[-1] == "yes") == report["units"][i]["removed"]
    assert rows[least].split()[6] == "1"
    assert sorted(int(r.split()[6]) for r in rows) == list(range(1, len(rows) + 1))


@pytest.mark.parametrize("criterion", ["damage", "sglp", "block-influence"])
def test_analyze_a_model_with_one_unit_shows_it(tmp_path, criterion):
    """Nothing can be removed (one unit always stays), but analyze still shows
    the unit and what bypassing it would cost; an explicit budget is refused."""
    import jsonschema

    from sglp_onnx.report.summary import report_schema
    from tiny_graphs import write_model_and_calibration

    model, _ = write_model_and_calibration(tmp_path, n_blocks=1)
    result = run_cli("analyze", str(model), "--criterion", criterion, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    jsonschema.validate(report, report_schema())
    (unit,) = report["units"]
    assert not unit["removed"] and unit["params"] > 0
    assert all(not s["achievable"] for s in report["suggestions"])
    assert any("alone would give" in note for note in report["notes"])
    table = run_cli("analyze", str(model), "--criterion", criterion, cwd=tmp_path)
    assert table.returncode == 0 and unit["name"] in table.stdout and "selected 0 units" in table.stdout
    refused = run_cli("analyze", str(model), "--remove", "1", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error:")
