"""The conventions users bring from onnxsim, onnxslim, optimum-cli and polygraphy,
through the real CLI: --dry-run, several models with -O DIR, --log-level; and
one convention for segments and unit labels everywhere. Last, the code's own:
tests and benchmarks use no private name of the package and import no other
test module or benchmark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sglp_onnx.cli import main
from sglp_onnx.report.summary import segments_line, validate_report
from cli_runs import run_main, snapshot
from figures import panels
from tiny_graphs import write_model_and_calibration


def test_dry_run_chooses_validates_and_writes_nothing(ws, capsys):
    before = snapshot(ws.root)
    assert main(["compress", str(ws.model), "--remove", "2", "--dry-run", "--criterion", "last"]) == 0
    out = capsys.readouterr().out
    assert snapshot(ws.root) == before
    assert "removed 2 of 4 units" in out and "validation passed" in out and "fidelity to the original" in out
    assert "dry run: nothing written" in out


def test_dry_run_json_is_the_report_a_real_run_would_write(ws, capsys):
    before = snapshot(ws.root)
    assert main(["compress", str(ws.model), "--remove", "2", "--dry-run", "--json", "--criterion", "last"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert snapshot(ws.root) == before
    validate_report(dry)
    assert dry["dry_run"] is True and dry["validation"]["runs"]
    assert main(["compress", str(ws.model), "-o", str(ws.output), "--remove", "2", "--criterion", "last", "-q"]) == 0
    real = json.loads(ws.output.with_suffix(".json").read_text())
    assert real["removed"] == dry["removed"] and real["fidelity"]["score"] == dry["fidelity"]["score"]
    assert "dry_run" not in real


def test_a_dry_run_never_refuses_for_an_existing_output(ws, capsys):
    ws.output.write_bytes(b"kept")
    assert main(["compress", str(ws.model), "-o", str(ws.output), "--remove", "1", "--dry-run"]) == 0
    assert ws.output.read_bytes() == b"kept"


def test_several_models_go_into_the_output_dir(tmp_path, capsys):
    a, _ = write_model_and_calibration(tmp_path / "a")
    b, _ = write_model_and_calibration(tmp_path / "b", width=12)
    b_named = b.with_name("other.onnx")
    b.rename(b_named)
    b.with_name("model.calib.npz").rename(b_named.with_name("other.calib.npz"))
    out_dir = tmp_path / "pruned"
    assert main(["compress", str(a), str(b_named), "-O", str(out_dir), "--remove", "1", "--criterion", "last",
                 "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [Path(r["input"]).name for r in reports] == ["model.onnx", "other.onnx"]
    for r in reports:
        validate_report(r)
    # --json: the reports went to stdout, the models into DIR.
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.pruned.onnx", "other.pruned.onnx"]
    shutil.rmtree(out_dir)
    assert main(["compress", str(a), str(b_named), "-O", str(out_dir), "--remove", "1", "--criterion", "last"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "model.pruned.json", "model.pruned.onnx", "other.pruned.json", "other.pruned.onnx"]
    out = capsys.readouterr().out
    assert out.count("removed 1 of 4 units") == 2
    # Each summary block names its model, before its own lines.
    blocks = out.split("== ")[1:]
    assert [b.split(" ==")[0] for b in blocks] == [str(a), str(b_named)]
    assert all("removed 1 of 4 units" in b for b in blocks)


def test_two_models_that_would_write_one_file_are_refused_before_work(tmp_path, capsys):
    a, _ = write_model_and_calibration(tmp_path / "a")
    b, _ = write_model_and_calibration(tmp_path / "b")
    before = snapshot(tmp_path)
    assert main(["compress", str(a), str(b), "-O", str(tmp_path / "pruned"), "--remove", "1"]) == 2
    err = capsys.readouterr().err
    assert "would both write" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("extra", [[], ["-o", "x.onnx"], ["--plot", "p.png"], ["--report", "r.json"]])
def test_several_models_refuse_one_file_options(tmp_path, capsys, extra):
    a, _ = write_model_and_calibration(tmp_path / "a")
    before = snapshot(tmp_path)
    code = main(["compress", str(a), str(a), *extra, *([] if extra else [])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_the_first_failing_model_stops_the_run_and_says_what_was_written(tmp_path, capsys):
    a, _ = write_model_and_calibration(tmp_path / "a")
    broken = tmp_path / "b" / "broken.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"not a model")
    out_dir = tmp_path / "pruned"
    code = main(["compress", str(a), str(broken), "-O", str(out_dir), "--remove", "1", "--criterion", "last"])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {broken}:") and f"written before it: {a}" in line
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.pruned.json", "model.pruned.onnx"]


@pytest.mark.parametrize("level", ["error", "warning"])
def test_log_level_error_and_warning_print_no_summary(ws, capsys, level):
    assert main(["compress", str(ws.model), "-o", str(ws.output), "--remove", "1", "--log-level", level]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert ws.output.exists()


def test_log_level_warning_keeps_the_drift_warning(capsys):
    # Removing 20 of ResNet-56's 25 blocks drifts far from the original.
    model = Path(__file__).resolve().parents[1] / "models" / "resnet56_digits.onnx"
    for level, expect_out in (("info", True), ("warning", False)):
        code = main(["compress", str(model), "--remove", "20", "--dry-run", "--criterion", "last",
                     "--repair", "none", f"--log-level={level}"])
        captured = capsys.readouterr()
        assert code == 0
        assert ("warning:" in captured.out) == expect_out
        if not expect_out:
            assert captured.err.strip().startswith("warning:")


def test_log_level_is_accepted_before_and_after_the_command(ws, capsys):
    assert main(["--log-level", "error", "compress", str(ws.model), "-o", str(ws.output), "--remove", "1"]) == 0
    assert capsys.readouterr().out == ""
    run_main(ws, capsys, ["compress", str(ws.model), "--log-level", "loud"], says="log-level")


def test_segments_are_printed_as_the_json_stores_them():
    assert segments_line([[0, 3], [3, 7]]) == (
        "segments (K=2, unit ranges [start, stop) as in the JSON report): [0, 3), [3, 7)")


def test_analyze_prints_segments_half_open_like_its_json(ws, capsys):
    assert main(["analyze", str(ws.model), "--criterion", "sglp", "--segments", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["analyze", str(ws.model), "--criterion", "sglp", "--segments", "2"]) == 0
    text = capsys.readouterr().out
    assert segments_line(report["segments"]) in text
    assert report["segments"][0][0] == 0 and report["segments"][-1][1] == len(report["units"])


def test_plot_panels_label_units_alike_and_analyze_says_selected(ws, tmp_path):
    from sglp_onnx import analyze, compress, plot_report

    analysis = analyze(ws.model, remove=1, criterion="sglp", segments=2)
    fig = plot_report(analysis.report)
    heat, bars = panels(fig)["a"], panels(fig)["b"]
    names = [u["name"] for u in analysis.report["units"]]
    assert [t.get_text() for t in heat.get_xticklabels()] == names
    assert [t.get_text() for t in bars.get_xticklabels()] == names
    legend = [t.get_text() for t in bars.get_legend().get_texts()]
    assert any(x.startswith("selected") for x in legend) and not any(x.startswith("removed") for x in legend)
    result = compress(ws.model, tmp_path / "p.onnx", remove=1, criterion="sglp", segments=2)
    legend = [t.get_text() for t in panels(plot_report(result.report))["b"].get_legend().get_texts()]
    assert any(x.startswith("removed") for x in legend)


def test_progress_bars_know_their_total():
    import numpy as np

    from sglp_onnx.files.calibration import CalibrationSet

    calib = CalibrationSet(inputs={"x": np.zeros((10, 2), np.float32)}, labels=None, source="t")
    assert len(calib.batches(4)) == 3 and len(list(calib.batches(4))) == 3
    fixed = CalibrationSet(inputs={"x": np.zeros((10, 2), np.float32)}, labels=None, source="t", fixed_batch=4)
    assert len(fixed.batches(64)) == 2 and [len(f["x"]) for f, _ in fixed.batches(64)] == [4, 4]


def test_each_stage_says_what_it_does_on_a_terminal(ws, capsys):
    from sglp_onnx import compress
    from sglp_onnx.progress import STAGE_LABELS

    shown = []

    def progress(iterable, label):
        return iterable

    def stage(label):
        from contextlib import nullcontext

        shown.append(label)
        return nullcontext()

    progress.stage = stage
    compress(ws.model, ws.output, remove=1, criterion="damage", progress=progress)
    assert shown == [STAGE_LABELS[s] for s in ("load", "discovery", "selection", "fidelity", "repair", "surgery",
                                                "validation", "write")]


def test_bench_rows_tell_two_models_of_one_name_apart(tmp_path, capsys):
    a, _ = write_model_and_calibration(tmp_path / "a", name="m")
    b, _ = write_model_and_calibration(tmp_path / "b", name="m")
    assert main(["bench", str(a), str(b), "--runs", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert str(a) in out and str(b) in out


def test_the_api_names_stay_functions_after_their_modules_are_imported():
    import importlib

    import sglp_onnx

    for name, module in (("finetune", "sglp_onnx.tools.finetune"), ("bench", "sglp_onnx.tools.bench"),
                         ("evaluate", "sglp_onnx.evidence.metrics")):
        importlib.import_module(module)
        assert callable(getattr(sglp_onnx, name)) and not hasattr(getattr(sglp_onnx, name), "__path__")
        assert getattr(sglp_onnx, name).__module__ == module


EXITING_FORWARD = """
import sys

import torch


class Stop(BaseException):
    pass


class Exits(torch.nn.Module):
    def __init__(self, stop):
        super().__init__()
        self.stop = stop
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        self.stop()
        return self.linear(x)


def exits_in_forward():
    return Exits(lambda: sys.exit(0))


def stops_in_forward():
    def stop():
        raise Stop("stopped in forward")
    return Exits(stop)
"""


@pytest.mark.parametrize(("factory", "says"), [("exits_in_forward", "SystemExit(0)"),
                                               ("stops_in_forward", "Stop: stopped in forward")])
def test_user_code_that_exits_inside_forward_is_the_inputs_fault(ws, capsys, tmp_path_factory, monkeypatch,
                                                                  factory, says):
    import sys

    folder = tmp_path_factory.mktemp("user_forward")
    (folder / "sglp_exiting_forward.py").write_text(EXITING_FORWARD)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "sglp_exiting_forward", raising=False)
    err = run_main(ws, capsys, ["compress", str(ws.model), "-o", str(ws.output), "--remove", "1",
                                "--torch-model", f"sglp_exiting_forward:{factory}"], says=says)
    assert "nothing was written" in err


LAZY_PROBE = """
import sys
from sglp_onnx.cli import main
code = main(sys.argv[1:])
print(code, *sorted(m for m in ("onnx", "torch", "transformers", "matplotlib") if m in sys.modules))
"""


def _modules_after(argv: list[str]) -> list[str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LAZY_PROBE, *argv], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    words = proc.stdout.strip().splitlines()[-1].split()
    assert words[0] == "0", proc.stderr
    return words[1:]


def test_the_version_and_help_import_nothing_heavy():
    assert _modules_after(["--version"]) == []
    assert "torch" not in _modules_after(["compress", "--help"])


def test_a_bare_onnx_compress_never_imports_torch_transformers_or_matplotlib(ws):
    assert _modules_after(["compress", str(ws.model), "-o", str(ws.output), "--remove", "1", "-q"]) == ["onnx"]


def test_a_plain_torch_model_never_imports_transformers(tmp_path):
    models = Path(__file__).resolve().parents[1] / "models"
    imported = _modules_after(["compress", str(models / "resnet56_digits.onnx"), "-o", str(tmp_path / "p.onnx"),
                               "--remove", "2", "-q", "--criterion", "gradnorm",
                               "--torch-model", "models.resnet_cifar:resnet56_digits",
                               "--torch-weights", str(models / "resnet56_digits.pt")])
    assert "torch" in imported and "transformers" not in imported


def test_the_report_names_its_input_by_absolute_path(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws.model.parent)
    assert main(["compress", ws.model.name, "-o", str(ws.output), "--remove", "1", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == str(ws.model.resolve())


# -- the code's own conventions: tests and benchmarks use the package's public names ------------------------------

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCHMARK_MODULES = {"common", "measured_compress", "mlp_model"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    """Where `source` reaches a `_`-prefixed name of sglp_onnx: imports it
    (`from sglp_onnx.x import _y`, `import sglp_onnx._x`), reads or assigns it
    on a name bound to the package (`module._y`, `setattr(module, "_y", ...)`),
    or names it in a dotted string (`monkeypatch.setattr("sglp_onnx.x._y", ...)`)."""
    import ast

    tree = ast.parse(source)
    found: list[str] = []
    bound: set[str] = set()  # local names for sglp_onnx modules and objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sglp_onnx":
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    bound.add(alias.asname or "sglp_onnx")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "sglp_onnx":
                if any(_private(part) for part in node.module.split(".")):
                    found.append(f"line {node.lineno}: from {node.module} import ...")
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                    bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            target, name = node.args[0], node.args[1]
            if (func in ("setattr", "getattr", "delattr", "hasattr") and isinstance(name, ast.Constant)
                    and isinstance(name.value, str) and _private(name.value)):
                while isinstance(target, ast.Attribute):
                    target = target.value
                if isinstance(target, ast.Name) and target.id in bound:
                    found.append(f"line {node.lineno}: {ast.unparse(node.func)}(..., {name.value!r})")
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("sglp_onnx.")
                and any(_private(part) for part in node.value.split("."))):
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def sibling_imports(source: str, *, folder: str) -> list[str]:
    """Imports of another test module (tests/) or of another benchmark's
    internals (benchmarks/, beyond the modules they share)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if folder == "tests" and any(part.startswith("test_") for part in parts[:2]):
                found.append(f"line {node.lineno}: {name}")
            if folder == "benchmarks" and parts[0] == "benchmarks" and len(parts) > 1 \
                    and parts[1] not in SHARED_BENCHMARK_MODULES:
                found.append(f"line {node.lineno}: {name}")
    return found


def _code_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_private_name_finder_sees_every_form():
    bad = '''
import sglp_onnx.pipeline as pipeline
import sglp_onnx._hidden
from sglp_onnx.files.model_files import _interrupts_deferred, load_model
from sglp_onnx.graph import flops
pipeline._timed = None
flops._count(1)
load_model._cache
monkeypatch.setattr(pipeline, "_validation_reference", None)
monkeypatch.setattr("sglp_onnx.pipeline._discover", None)
'''
    found = private_uses(bad)
    assert len(found) == 7, found
    for name in ("_hidden", "_interrupts_deferred", "pipeline._timed", "flops._count", "load_model._cache",
                 "'_validation_reference'", "pipeline._discover"):
        assert any(name in line for line in found), name
    fine = '''
import sglp_onnx
from sglp_onnx import compress
import numpy as np
sglp_onnx.__version__, compress.__doc__, np._NoValue, "sglp_onnx.pipeline.to_json"
'''
    assert private_uses(fine) == []
    assert sibling_imports("from test_bad_input import snapshot\nimport tests.test_x", folder="tests") == [
        "line 1: test_bad_input", "line 2: tests.test_x"]
    assert sibling_imports("from benchmarks.large_model import run_in\nfrom benchmarks.common import ROOT",
                           folder="benchmarks") == ["line 1: benchmarks.large_model"]


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_tests_and_benchmarks_use_no_private_name_of_the_package(folder):
    found = {str(p.relative_to(ROOT)): uses for p in _code_files(folder) if (uses := private_uses(p.read_text()))}
    assert not found, f"a `_` name of sglp_onnx is used; make it public or use the public API: {found}"


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_no_test_module_imports_another_and_no_benchmark_another_benchmark(folder):
    found = {str(p.relative_to(ROOT)): uses for p in _code_files(folder)
             if (uses := sibling_imports(p.read_text(), folder=folder))}
    assert not found, ("shared test helpers go in conftest.py or a helper module (graphs.py, cli_runs.py, ...); "
                       f"shared benchmark code in benchmarks/common.py: {found}")
