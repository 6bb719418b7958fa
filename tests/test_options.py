"""Every option declared once (`sglp_onnx.options`): the flags of every
command as they were, one declaration per flag whichever commands use it,
the API's keywords as the fields, and one check (one message) for a value
whether it comes from the command line or from Python."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest

import sglp_onnx
from sglp_onnx import options
from sglp_onnx.cli import cli, main
from sglp_onnx.errors import UserError
from cli_runs import run_main

CLASSES = (options.SelectionOptions, options.RuntimeOptions, options.OutputOptions, options.TrainingOptions,
           options.ExportOptions, options.CalibOptions)

VERBOSITY = ["--verbose", "--quiet", "--log-level"]
SELECTION = ["--calib", "--remove", "--ratio", "--target-flops", "--max-loss", "--fidelity-output", "--criterion",
             "--segments", "--torch-model", "--torch-weights", "--granularity", "--batch-size", "--provider", "--seed",
             "--sequential", "--repair", "--activation-budget", "--json"]
# Each command's flags, in the order --help lists them.
FLAGS = {
    "analyze": [*VERBOSITY, "--threads", *SELECTION, "--suggest", "--plot", "--force"],
    "bench": ["--batch-size", "--runs", "--warmup", "--threads", "--provider", "--data", "--json", *VERBOSITY],
    "calib": ["--output", *VERBOSITY, "--samples", "--seed", "--seq-len", "--tokenizer", "--size", "--preset", "--mean",
              "--std", "--channel-order", "--layout", "--crop-fraction", "--preview", "--force"],
    "compress": ["--output", "--output-dir", *VERBOSITY, "--threads", *SELECTION, "--report", "--plot", "--force",
                 "--dry-run", "--renumber-cache"],
    "eval": ["--data", "--batch-size", "--provider", "--json", "--threads", *VERBOSITY],
    "export": ["--output", "--torch-weights", "--exporter", "--input-shape", "--with-cache", "--force", *VERBOSITY],
    "finetune": ["--torch-model", "--torch-weights", "--train-data", "--epochs", "--lr", "--batch-size", "--seed",
                 "--distill-weight", "--temperature", "--eval-data", "--report", "--output", "--exporter", "--provider",
                 "--force", "--json", "--threads", *VERBOSITY],
}


def declared() -> list[tuple[type, dataclasses.Field]]:
    return [(cls, spec) for cls in CLASSES for spec in dataclasses.fields(cls)]


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_command_keeps_its_flags(command):
    params = [p for p in cli.commands[command].params if isinstance(p, click.Option)]
    assert [next(o for o in p.opts if o.startswith("--")) for p in params] == FLAGS[command]
    assert sorted(FLAGS) == sorted(cli.commands)


def test_a_flag_has_one_declaration_whichever_commands_use_it():
    # A field shared by another class carries the very metadata of its declaration
    # (its check is the same function): equal; a second declaration would not be.
    meanings: dict[str, list] = {}
    for _, spec in declared():
        seen = meanings.setdefault(spec.metadata["flag"], [])
        if not any(spec.metadata == other for other in seen):
            seen.append(spec.metadata)
    # finetune's --report names the pruning report it reads; compress's, the report it writes.
    assert {flag for flag, metadata in meanings.items() if len(metadata) > 1} == {"--report"}


def test_command_words_and_required_name_real_commands():
    for cls, spec in declared():
        named = set(spec.metadata["helps"]) | set(spec.metadata["required"])
        assert named <= set(cli.commands), (cls.__name__, spec.name, named - set(cli.commands))


def test_finetune_keywords_are_the_declared_fields():
    parameters = inspect.signature(sglp_onnx.finetune).parameters
    fields = {spec.name: spec for cls in (options.TrainingOptions, options.ExportOptions) for spec in
              dataclasses.fields(cls)}
    fields.update({spec.name: spec for cls, names in ((options.RuntimeOptions, ("provider",)),
                                                      (options.OutputOptions, ("output", "force")),
                                                      (options.SelectionOptions, ("torch_model", "torch_weights")))
                   for spec in dataclasses.fields(cls) if spec.name in names})
    for name, spec in fields.items():
        default = parameters[name].default
        assert default is inspect.Parameter.empty or default == spec.default, name
        assert (default is inspect.Parameter.empty) == ("finetune" in spec.metadata["required"]), name


def test_unknown_api_keywords_are_type_errors(tmp_path):
    with pytest.raises(TypeError, match="analyze\\(\\) got an unexpected keyword argument 'bogus'"):
        sglp_onnx.analyze(tmp_path / "absent.onnx", bogus=1)
    # compress names itself, and refuses before it looks for the model or plans its outputs.
    with pytest.raises(TypeError, match="compress\\(\\) got an unexpected keyword argument 'bogus'"):
        sglp_onnx.compress(tmp_path / "absent.onnx", bogus=1)
    with pytest.raises(TypeError, match="finetune\\(\\) got an unexpected keyword argument 'bogus'"):
        sglp_onnx.finetune(tmp_path / "absent.onnx", torch_model="x:y", train_data="t.npz", epochs=1, bogus=1)


@pytest.mark.parametrize(("argv", "keywords", "says"), [
    (["eval", "{model}", "--data", "{calib}", "--batch-size", "0"], {"batch_size": 0},
     "--batch-size must be a whole number >= 1, got 0"),
    (["compress", "{model}", "--seed", "-1"], {"seed": -1}, "--seed must be a whole number >= 0, got -1"),
    (["finetune", "{model}", "--torch-model", "x:y", "--train-data", "{calib}", "--epochs", "1", "--seed", "-1"],
     {"seed": -1}, "--seed must be a whole number >= 0, got -1"),
    (["compress", "{model}", "--ratio", "1.5"], {"ratio": 1.5}, "--ratio must be in (0, 1), got 1.5"),
])
def test_a_value_is_refused_alike_from_the_cli_and_the_api(ws, capsys, argv, keywords, says):
    run_main(ws, capsys, [a.format(model=ws.model, calib=ws.calib) for a in argv], says=says)
    cls = options.RuntimeOptions if "ratio" not in keywords else options.SelectionOptions
    with pytest.raises(UserError) as refused:
        cls(**keywords).checked()
    assert str(refused.value) == says


def test_finetune_refuses_an_unknown_exporter_or_provider_before_any_work(tmp_path):
    for keywords, says in (({"exporter": "onnxscript"}, "--exporter must be one of dynamo, legacy"),
                           ({"provider": "tpu"}, "--provider must be one of cpu, cuda, tensorrt")):
        with pytest.raises(UserError, match=says):
            sglp_onnx.finetune(tmp_path / "absent.onnx", torch_model="x:y", train_data=tmp_path / "t.npz", epochs=1,
                               **keywords)


def test_threads_from_the_cli_is_one_line_exit_2(ws, capsys):
    assert main(["eval", str(ws.model), "--data", str(ws.calib), "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --threads must be a whole number >= 1, got 0\n"
