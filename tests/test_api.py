"""The public surface: a cheap `import sglp_onnx`, a documented API that
mirrors the commands, `--version`, and examples in every command's help."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import sglp_onnx
from sglp_onnx.cli import cli, main

HEAVY = ("onnx", "onnxruntime", "torch", "matplotlib", "numpy")


def test_import_is_cheap():
    code = f"import sys, sglp_onnx; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", [n for n in sglp_onnx.__all__ if n != "__version__"])
def test_public_names_resolve_and_are_documented(name):
    value = getattr(sglp_onnx, name)
    assert value.__doc__ and value.__doc__.strip()
    if callable(value) and not isinstance(value, type):
        assert value.__annotations__.get("return"), f"{name} has no return annotation"


def test_api_mirrors_the_commands():
    for command in ("compress", "analyze", "evaluate", "bench", "export_torch"):
        assert command in sglp_onnx.__all__


def test_functions_stay_functions_after_their_modules_are_imported():
    from sglp_onnx.tools.bench import format_results  # noqa: F401
    from sglp_onnx.evidence.metrics import format_metrics  # noqa: F401

    assert callable(sglp_onnx.evaluate) and sglp_onnx.evaluate.__name__ == "evaluate"
    assert callable(sglp_onnx.bench) and sglp_onnx.bench.__name__ == "bench"


# The stage folders; each __init__ re-exports what other folders may use.
STAGES = ("files", "graph", "units", "surgery", "evidence", "selection", "paired", "report", "repair", "tools")


def test_a_stage_face_costs_nothing_to_import():
    code = (f"import sys; import {', '.join('sglp_onnx.' + s for s in STAGES)}; "
            f"print([[m for m in {HEAVY!r} if m in sys.modules], "
            "sorted(m for m in sys.modules if m.startswith('sglp_onnx.'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([[], sorted({"sglp_onnx.errors", "sglp_onnx.lazy", *(f"sglp_onnx.{s}" for s in STAGES)})])


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_face_gives_every_name_it_lists(stage):
    face = importlib.import_module(f"sglp_onnx.{stage}")
    modules = {m.name for m in pkgutil.iter_modules(face.__path__)}
    assert face.__all__ and len(set(face.__all__)) == len(face.__all__)
    for name in face.__all__:
        # A name that is also a module's would be replaced by the module once that is imported.
        assert name not in modules, f"sglp_onnx.{stage}.{name} is also a module"
        assert getattr(face, name) is getattr(face, name)
    assert set(face.__all__) <= set(dir(face))
    with pytest.raises(AttributeError, match=f"sglp_onnx.{stage}' has no attribute 'nothing'"):
        face.nothing  # noqa: B018


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'compresss'"):
        sglp_onnx.compresss  # noqa: B018


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sglp-onnx, version {sglp_onnx.__version__}"


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_help_has_examples(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"sglp-onnx {command}" in result.output


def test_top_level_help_lists_commands_and_examples():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in cli.commands:
        assert command in result.output
    assert "Examples:" in result.output
