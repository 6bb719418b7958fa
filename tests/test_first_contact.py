"""What a new user runs into first, through the real CLI: every mistake is
refused with one line and exit 2 before any work, nothing is written and the
input stays as it was; stdout carries only what was asked for."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import sglp_onnx.pipeline as pipeline
import sglp_onnx.graph.runtime as runtime
from sglp_onnx.progress import RESUME_ENV
from graphs import exported, write_exported
from sglp_onnx.cli import main
from cli_runs import CLI, assert_refused, compress_args, read_until, run_main, snapshot
from tiny_graphs import calibration, make_model, residual_mlp

USER_CODE = '''
import sys

import torch


class Stop(BaseException):
    pass


def exits():
    sys.exit(0)


def stops():
    raise Stop("stopped by the user's code")


def linear():
    return torch.nn.Linear(8, 3)
'''

PRINTING_CODE = '''
import graphs

print("importing the user's module")


def printing_resnet():
    print("building the user's model")
    return graphs.tiny_resnet()
'''


@pytest.fixture
def user_code(tmp_path_factory, monkeypatch):
    """A user module `sglp_user_code` on sys.path, outside the workspace."""
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "sglp_user_code.py").write_text(USER_CODE)
    (folder / "sglp_exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    (folder / "sglp_printing_user_code.py").write_text(PRINTING_CODE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    for name in ("sglp_user_code", "sglp_exits_on_import", "sglp_printing_user_code"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder


def refused(ws, capsys, argv: list[str], *, says: str) -> str:
    """`run_main` (exit 2, no traceback, nothing written) with exactly one line on stderr."""
    err = run_main(ws, capsys, argv, says=says)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# -- 1. two outputs on one file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_args", "says"),
    [
        (lambda ws: ["-o", ws.output, "--report", ws.out / "x.png", "--plot", ws.out / "x.png"],
         "the report and the plot"),
        (lambda ws: ["-o", ws.output, "--report", ws.out / "x.png", "--plot", ws.out / "sub" / ".." / "x.png"],
         "the report and the plot"),
        (lambda ws: ["-o", ws.out / "m.svg", "--plot", ws.out / "m.svg"], "the output model and the plot"),
        (lambda ws: ["-o", ws.out / "m.pdf", "--report", ws.out / "r.svg", "--plot", ws.out / "r.svg"],
         "the report and the plot"),
    ],
    ids=["report-plot", "report-plot-spelled-apart", "output-plot", "report-plot-not-the-default"],
)
def test_two_outputs_on_one_file_are_refused(ws, capsys, make_args, says):
    (ws.out / "sub").mkdir()
    argv = ["compress", str(ws.model), *map(str, make_args(ws)), "--force"]
    line = refused(ws, capsys, argv, says="must be different files")
    assert says in line


# -- 2. a factory that exits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("sglp_user_code:exits", "exited (SystemExit(0))"),
        ("sglp_user_code:stops", "stopped by the user's code"),
        ("sglp_exits_on_import:exits", "exited (SystemExit(3))"),
    ],
    ids=["factory-exits", "factory-raises-baseexception", "module-exits-on-import"],
)
@pytest.mark.parametrize("command", ["compress", "export"])
def test_a_factory_that_exits_is_refused(ws, capsys, user_code, spec, says, command):
    if command == "compress":
        argv = compress_args(ws, "--remove", "1", "--torch-model", spec)
    else:
        argv = ["export", spec, "-o", str(ws.output), "--input-shape", "1,8"]
    line = refused(ws, capsys, argv, says=says)
    assert spec.split(":")[0] in line


# -- 3. outputs that are not regular files -----------------------------------------------------------------


def test_a_report_that_is_a_symbolic_link_is_refused(ws, capsys):
    target = ws.out / "kept.json"
    target.write_text("{}")
    link = ws.out / "link.json"
    link.symlink_to(target.name)
    refused(ws, capsys, compress_args(ws, "--report", str(link), "--force"), says="is a symbolic link")
    assert link.is_symlink() and os.readlink(link) == target.name and target.read_text() == "{}"


def test_an_output_that_is_a_pipe_is_refused(ws, capsys):
    fifo = ws.out / "pruned.onnx"
    os.mkfifo(fifo)
    refused(ws, capsys, compress_args(ws, "--force"), says="not a regular file")
    assert not fifo.is_file() and fifo.exists()


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
@pytest.mark.parametrize("device", ["/dev/null", "/dev/stdout"])
def test_a_report_on_a_device_is_refused(ws, capsys, device):
    before = Path(device).lstat()
    refused(ws, capsys, compress_args(ws, "--report", device, "--force"), says=str(device))
    after = Path(device).lstat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


# -- 4. two runs on one output -----------------------------------------------------------------------------


def test_a_file_that_appears_during_the_run_is_never_replaced(ws):
    """Another run (here: the test) writes the report while this one holds its
    finished files: this run takes back its output, leaves the other's report
    alone and says so; nothing of its own remains."""
    report = ws.out / "pruned.json"
    plot = ws.out / "p.png"
    before = snapshot(ws.root)
    resume = ws.root.parent / f"{ws.root.name}.resume"  # outside the snapshot
    proc = subprocess.Popen(
        [CLI, *compress_args(ws, "--remove", "1", "--plot", str(plot))], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=ws.root,
        # The run waits at the renames until the other run's report is there
        # (the resume file), however slow the machine; 600 s only bounds a hang.
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", pipeline.PAUSE_ENV: "rename:600",
             RESUME_ENV: str(resume)},
    )
    seen = read_until(proc, b"paused at rename", timeout=600)
    report.write_text("the other run's report")
    resume.touch()
    _, rest = proc.communicate(timeout=600)
    err = (seen + rest).decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip() and "paused at" not in line]
    assert proc.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "appeared while this run was writing" in err, err
    assert set(snapshot(ws.root)) == set(before) | {"out/pruned.json"}
    assert report.read_text() == "the other run's report"
    assert not ws.output.exists() and not plot.exists()
    assert not [p for p in ws.root.rglob(".*") if p.is_file()]


def test_with_force_a_file_that_appeared_is_replaced(ws, capsys):
    ws.output.write_bytes(b"old")
    assert main(compress_args(ws, "--remove", "1", "--force", "-q")) == 0
    assert onnx.load(str(ws.output)).graph.node


# -- 5. stdout carries only the JSON ------------------------------------------------------------------------


def test_a_printing_factory_does_not_corrupt_json(tmp_path, capsys, user_code):
    model = write_exported(tmp_path)
    weights = tmp_path / "w.pt"
    torch.save(exported("resnet", "legacy")[0].state_dict(), weights)
    capsys.readouterr()
    code = main(["compress", str(model), "--remove", "1", "--criterion", "sglp", "--json",
                 "--torch-model", "sglp_printing_user_code:printing_resnet", "--torch-weights", str(weights)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["importance_kind"] == "GradNorm"
    assert "importing the user's module" in err and "building the user's model" in err


# -- 6, 8. labels outside the model's classes ----------------------------------------------------------------


@pytest.fixture
def bad_labels(ws) -> Path:
    data = calibration(16)
    data["labels"][5] = 3  # the model has 3 classes
    path = ws.root / "in" / "bad_labels.npz"
    np.savez(path, **data)
    return path


def test_eval_refuses_labels_outside_the_classes(ws, capsys, bad_labels):
    refused(ws, capsys, ["eval", str(ws.model), "--data", str(bad_labels)], says="integers in [0, 3)")


def test_gradnorm_refuses_labels_outside_the_classes_before_any_work(ws, capsys, bad_labels, user_code):
    argv = compress_args(ws, "--calib", str(bad_labels), "--criterion", "gradnorm",
                         "--torch-model", "sglp_user_code:linear")
    refused(ws, capsys, argv, says="integers in [0, 3)")


def test_eval_refuses_negative_labels(ws, capsys):
    data = calibration(16)
    data["labels"][0] = -1
    path = ws.root / "in" / "negative.npz"
    np.savez(path, **data)
    refused(ws, capsys, ["eval", str(ws.model), "--data", str(path)], says="holds -1")


# -- 7. the plot format follows the suffix --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "magic"), [("p.svg", b"<?xml"), ("p.pdf", b"%PDF"), ("p.png", b"\x89PNG")])
def test_plot_is_written_in_the_format_its_suffix_names(ws, capsys, name, magic):
    plot = ws.out / name
    assert main(compress_args(ws, "--remove", "1", "--plot", str(plot), "-q")) == 0
    assert plot.read_bytes().startswith(magic)


@pytest.mark.parametrize("command", ["compress", "analyze"])
def test_plot_with_another_suffix_is_refused(ws, capsys, command):
    argv = (compress_args(ws) if command == "compress" else ["analyze", str(ws.model)])
    refused(ws, capsys, [*argv, "--plot", str(ws.out / "p.jpg")], says=".png, .svg or .pdf")


# -- 8. bad models and data are the input's fault ----------------------------------------------------------


def test_duplicate_node_names_are_refused_at_load(ws, capsys):
    model = residual_mlp()
    model.graph.node[2].name = model.graph.node[0].name
    path = ws.root / "in" / "twice.onnx"
    onnx.save_model(model, str(path))
    refused(ws, capsys, compress_args(ws, "--calib", str(ws.calib), model=path), says="'blocks.0/MatMul'")


def test_an_op_the_opset_does_not_have_is_refused(ws, capsys):
    model = residual_mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(8, np.float32), "norm.scale"))
    head = model.graph.node[-1]
    norm = helper.make_node("LayerNormalization", [head.input[0], "norm.scale"], ["norm.out"], name="norm")
    model.graph.node.insert(len(model.graph.node) - 1, norm)
    head.input[0] = "norm.out"
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 11))  # LayerNormalization came in opset 17
    path = ws.root / "in" / "opset11.onnx"
    onnx.save_model(model, str(path))
    line = refused(ws, capsys, compress_args(ws, "--calib", str(ws.calib), model=path),
                   says="the input model")
    assert "LayerNormalization" in line


def token_model(vocab: int = 16, width: int = 8, n_blocks: int = 4) -> onnx.ModelProto:
    """Token ids -> Gather embedding -> residual MLP blocks -> logits over the vocabulary."""
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [weight("embed", (vocab, width)), weight("head", (width, vocab))]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"], name="embed/Gather")]
    h = "h"
    for i in range(n_blocks):
        inits += [weight(f"b{i}.w1", (width, width)), weight(f"b{i}.w2", (width, width))]
        nodes += [helper.make_node("MatMul", [h, f"b{i}.w1"], [f"b{i}.a"], name=f"b{i}/MatMul"),
                  helper.make_node("Relu", [f"b{i}.a"], [f"b{i}.r"], name=f"b{i}/Relu"),
                  helper.make_node("MatMul", [f"b{i}.r", f"b{i}.w2"], [f"b{i}.f"], name=f"b{i}/MatMul_1"),
                  helper.make_node("Add", [h, f"b{i}.f"], [f"b{i}.out"], name=f"b{i}/Add")]
        h = f"b{i}.out"
    nodes.append(helper.make_node("MatMul", [h, "head"], ["logits"], name="head/MatMul"))
    return make_model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])], inits)


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_token_ids_outside_the_vocabulary_are_refused_quietly(ws, command):
    """ORT's failure on the input (past the samples discovery probes) is one
    line; its own coloured log line stays off the terminal."""
    model = ws.root / "in" / "lm.onnx"
    onnx.save_model(token_model(), str(model))
    ids = np.random.default_rng(1).integers(0, 16, (24, 6))
    ids[20, 3] = 999
    data = ws.root / "in" / "lm.calib.npz"
    np.savez(data, input_ids=ids)
    argv = compress_args(ws, model=model) if command == "compress" else ["eval", str(model), "--data", str(data)]
    before = snapshot(ws.root)
    done = subprocess.run([CLI, *argv], capture_output=True, text=True, timeout=600, cwd=ws.root,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.stdout == ""
    assert_refused(ws, done.returncode, done.stderr, before, says="idx=999")
    assert len(done.stderr.strip().splitlines()) == 1 and "onnxruntime" not in done.stderr.lower(), done.stderr


@pytest.mark.parametrize("shape", ["1,-3,8,8", "1,0,8", "1,x"])
def test_export_refuses_a_bad_input_shape_while_parsing(ws, capsys, shape):
    refused(ws, capsys, ["export", "torch.nn:ReLU", "-o", str(ws.output), "--input-shape", shape],
            says="--input-shape")


# -- 9. finetune options are checked first ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [("--epochs", "0", "--epochs"), ("--lr", "-0.1", "--lr"), ("--lr", "nan", "--lr"),
     ("--distill-weight", "2", "--distill-weight"), ("--temperature", "0", "--temperature"),
     ("--batch-size", "0", "--batch-size"), ("--seed", "-1", "--seed")],
)
def test_finetune_options_are_refused_before_any_work(ws, capsys, option, value, says):
    argv = ["finetune", str(ws.model), "--torch-model", "sglp_never_imported:f", "--train-data", str(ws.calib),
            "--epochs", "1", option, value]
    refused(ws, capsys, argv, says=says)


def test_finetune_api_refuses_nan_before_any_work(tmp_path):
    from sglp_onnx.errors import UserError
    from sglp_onnx.tools.finetune import finetune

    with pytest.raises(UserError, match="--temperature"):
        finetune(tmp_path / "absent.onnx", torch_model="x:y", train_data=tmp_path / "absent.npz", epochs=1,
                 temperature=math.nan)


# -- 10. -q and -v after the command ---------------------------------------------------------------------------


def test_quiet_after_the_command(ws, capsys):
    capsys.readouterr()
    assert main(compress_args(ws, "--remove", "1", "-q")) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert ws.output.is_file()


@pytest.mark.parametrize("command", ["compress", "analyze", "eval", "bench", "export", "finetune"])
def test_every_command_lists_quiet_and_verbose(capsys, command):
    capsys.readouterr()
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "-q, --quiet" in out and "-v, --verbose" in out


# -- 11. the report on stdout ----------------------------------------------------------------------------------


def test_report_dash_prints_the_report_and_writes_no_report_file(ws, capsys):
    capsys.readouterr()
    assert main(compress_args(ws, "--remove", "1", "--report", "-")) == 0
    captured = capsys.readouterr()
    out = captured.out
    report = json.loads(out)
    # The human summary still shows, on stderr.
    assert "removed 1 of 4 units" in captured.err and f"wrote {ws.output}" in captured.err
    assert report["report_path"] == "-" and report["output"] == str(ws.output)
    assert sorted(p.name for p in ws.out.iterdir()) == ["pruned.onnx"]


def test_json_into_the_default_report_path_is_not_refused(ws, capsys):
    """`compress M -o pruned.onnx --json > pruned.json`: the shell creates the file first."""
    redirected = ws.out / "pruned.json"
    redirected.write_text("")
    capsys.readouterr()
    assert main(compress_args(ws, "--remove", "1", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["report_path"] == "-"
    assert redirected.read_text() == ""
    assert sorted(p.name for p in ws.out.iterdir()) == ["pruned.json", "pruned.onnx"]


# -- 12. --threads -----------------------------------------------------------------------------------------------


@pytest.fixture
def thread_setting():
    torch_threads = torch.get_num_threads()
    runtime.set_threads(None)
    yield
    runtime.set_threads(None)  # --threads 3 must not reach the tests that follow
    torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("command", ["compress", "analyze", "eval"])
def test_threads_reach_every_session(ws, capsys, thread_setting, command):
    argv = {"compress": compress_args(ws, "--remove", "1"), "analyze": ["analyze", str(ws.model)],
            "eval": ["eval", str(ws.model), "--data", str(ws.calib)]}[command]
    assert main([*argv, "--threads", "3", "-q"]) == 0
    options = runtime.make_session(residual_mlp()).get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert torch.get_num_threads() == 3


def test_threads_in_the_python_api(ws, thread_setting):
    import sglp_onnx

    sglp_onnx.analyze(ws.model, remove=1, threads=2)
    assert runtime.session_threads() == 2


@pytest.mark.parametrize("command", ["compress", "analyze", "eval", "finetune"])
def test_threads_below_one_are_refused(ws, capsys, thread_setting, command):
    argv = {"compress": compress_args(ws), "analyze": ["analyze", str(ws.model)],
            "eval": ["eval", str(ws.model), "--data", str(ws.calib)],
            "finetune": ["finetune", str(ws.model), "--torch-model", "x:y", "--train-data", str(ws.calib),
                         "--epochs", "1"]}[command]
    refused(ws, capsys, [*argv, "--threads", "0"], says="--threads")
