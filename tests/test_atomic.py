"""All-or-nothing output: an interrupt (SIGINT, SIGTERM) or a failure at any
stage leaves no output, report, plot or temporary file, and the input as it was."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import sglp_onnx.files.model_files as model_files
import sglp_onnx.pipeline as pipeline
from sglp_onnx.cli import main
from sglp_onnx.files.model_files import atomic_paths, interrupts_deferred, load_model
from cli_runs import CLI, HANG_GUARD, read_until, snapshot
from tiny_graphs import write_model_and_calibration


@pytest.fixture
def work(tmp_path: Path):
    model, calib = write_model_and_calibration(tmp_path)
    return tmp_path, model


def _interrupt(proc: subprocess.Popen, signum: int, seen: bytes) -> tuple[int, str]:
    proc.send_signal(signum)
    try:
        _, rest = proc.communicate(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, (seen + rest).decode(errors="replace")


def _assert_nothing_written(root: Path, before: dict[str, str]) -> None:
    after = snapshot(root)
    assert after == before, f"files changed: {sorted(set(after) ^ set(before))}"
    assert not [p for p in root.rglob(".*") if p.name != "."], "temporary files were left behind"


def _start(root: Path, model: Path, *args: str, env: dict[str, str] | None = None,
           verbose: bool = False) -> subprocess.Popen:
    # -v: progress bars even though stderr is a pipe.
    return subprocess.Popen(
        [CLI, *(["-v"] if verbose else []), "compress", str(model), "-o", str(root / "out.onnx"), "--plot", str(root / "cka.png"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
        **INTERRUPTIBLE,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A shell that starts the tests in the background (`make test &`) makes them
# ignore SIGINT, and children inherit that: each child gets the default back
# (Python then installs its KeyboardInterrupt handler), in its own session so
# that a terminal's Ctrl-C for the tests does not reach it either.
INTERRUPTIBLE = {"start_new_session": True, "preexec_fn": _default_sigint}


EXIT_FOR = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.mark.parametrize(
    ("point", "signame"),
    [
        ("load", "SIGTERM"),
        ("discovery", "SIGINT"),
        ("selection", "SIGTERM"),
        ("surgery", "SIGINT"),
        ("validation", "SIGTERM"),
        ("write", "SIGINT"),
        # Every output complete in its temporary file, nothing renamed yet.
        ("rename", "SIGTERM"),
        ("rename", "SIGINT"),
    ],
)
def test_interrupt_at_each_stage_leaves_nothing(work, point, signame):
    signum = signal.Signals[signame]
    root, model = work
    before = snapshot(root)
    proc = _start(root, model, "--ratio", "0.5", env={pipeline.PAUSE_ENV: f"{point}:{HANG_GUARD}"})
    seen = read_until(proc, f"paused at {point}".encode())
    code, err = _interrupt(proc, signum, seen)
    assert code == EXIT_FOR[signum], err
    assert f"interrupted ({signal.Signals(signum).name}); nothing was written" in err
    assert "Traceback" not in err
    _assert_nothing_written(root, before)


def test_interrupted_forced_run_keeps_the_old_files(work):
    # --force replaces files only in the final renames; before them the old ones are intact.
    root, model = work
    for name in ("out.onnx", "out.json", "cka.png"):
        (root / name).write_bytes(b"old " + name.encode())
    before = snapshot(root)
    proc = _start(root, model, "--ratio", "0.5", "--force", env={pipeline.PAUSE_ENV: f"rename:{HANG_GUARD}"})
    seen = read_until(proc, rb"paused at rename")
    code, err = _interrupt(proc, signal.SIGTERM, seen)
    assert code == 143, err
    _assert_nothing_written(root, before)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_interrupt_in_the_middle_of_calibration(work, signame):
    signum = signal.Signals[signame]
    # A calibration pass of many batches, its progress bar running, interrupted
    # after its first batch (the pause point there: the machine's speed does not matter).
    root, model = work
    rng = np.random.default_rng(0)
    np.savez(root / "big.npz", input=rng.standard_normal((400, 8)).astype(np.float32))
    before = snapshot(root)
    proc = _start(root, model, "--calib", str(root / "big.npz"), "--batch-size", "4", "--ratio", "0.5",
                  verbose=True, env={pipeline.PAUSE_ENV: f"calibration:{HANG_GUARD}"})
    seen = read_until(proc, rb"paused at calibration")
    code, err = _interrupt(proc, signum, seen)
    assert code == EXIT_FOR[signum], err
    assert "nothing was written" in err and "Traceback" not in err
    _assert_nothing_written(root, before)


def test_uninterrupted_run_writes_everything(work):
    # The same command without a signal: the comparison point for the tests above.
    root, model = work
    proc = _start(root, model, "--ratio", "0.5")
    out, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 0, err
    names = sorted(p.name for p in root.iterdir())
    assert names == ["cka.png", "model.calib.npz", "model.onnx", "out.json", "out.onnx"]
    onnx.checker.check_model(str(root / "out.onnx"), full_check=True)
    assert (root / "out.onnx").stat().st_mode & 0o044, "output should be readable like any other file"


# -- failures in-process ------------------------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize(
    "target",
    [
        "sglp_onnx.pipeline.remove_units",
        "sglp_onnx.surgery.validation.validate",
        "sglp_onnx.pipeline.to_json",  # after the model is in its temporary file
        "sglp_onnx.report.plots.plot_report",
        "sglp_onnx.pipeline.write_model_files",
    ],
)
def test_failure_at_any_stage_leaves_nothing(work, capsys, monkeypatch, target):
    root, model = work
    monkeypatch.setattr(target, _boom)
    before = snapshot(root)
    code = main(["compress", str(model), "-o", str(root / "out.onnx"), "--plot", str(root / "cka.png"),
                 "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "internal error" in err and "injected failure" in err and "please report" in err
    _assert_nothing_written(root, before)


def test_failure_while_onnx_writes_leaves_nothing(work, capsys, monkeypatch):
    # onnx.save_model dies after writing part of the file.
    root, model = work
    real_save = onnx.save_model

    def half_save(proto, f, *args, **kwargs):
        real_save(proto, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", half_save)
    before = snapshot(root)
    code = main(["compress", str(model), "-o", str(root / "out.onnx"), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert code == 2, err  # the environment, not a bug
    assert err.startswith("error: cannot write the output (No space left on device")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    _assert_nothing_written(root, before)


def test_external_data_output_is_written_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    # Width 32: the weight matrices are above onnx's 1 KiB threshold for external data.
    root = tmp_path
    model, _ = write_model_and_calibration(root, width=32)
    monkeypatch.setattr(model_files, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the model were near 2 GB
    monkeypatch.setattr("sglp_onnx.pipeline.to_json", _boom)
    before = snapshot(root)
    assert main(["compress", str(model), "-o", str(root / "out.onnx"), "--ratio", "0.5"]) == 1
    capsys.readouterr()
    _assert_nothing_written(root, before)

    monkeypatch.undo()
    monkeypatch.setattr(model_files, "EXTERNAL_DATA_THRESHOLD", 0)
    assert main(["compress", str(model), "-o", str(root / "out.onnx"), "--ratio", "0.5"]) == 0
    names = sorted(p.name for p in root.iterdir())
    assert names == ["model.calib.npz", "model.onnx", "out.json", "out.onnx", "out.onnx.data"]
    locations = {e.value for t in onnx.load(str(root / "out.onnx"), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    pruned = load_model(root / "out.onnx")
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((2, 32), np.float32)
    assert np.isfinite(session.run(None, {"input": x})[0]).all()


# -- the rename step itself ----------------------------------------------------------------------------------------


@pytest.fixture
def ctrl_c_raises():
    """SIGINT handled by Python's KeyboardInterrupt handler during the test:
    a shell starts background jobs with SIGINT ignored, and Python then
    keeps it ignored (`bash .ci/run &` would fail the tests below)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_during_renames_is_held_until_every_file_is_in_place(tmp_path, monkeypatch, ctrl_c_raises):
    targets = [tmp_path / "a.onnx", tmp_path / "a.json", tmp_path / "a.png"]
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # to this thread, handled before the next line

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt) as caught:
        with atomic_paths(*targets) as temps:
            for tmp in temps:
                tmp.write_text("complete")
    assert caught.value.output_written is True
    assert [t.read_text() for t in targets] == ["complete"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.onnx", "a.png"]


def test_deferred_interrupt_restores_the_handlers(ctrl_c_raises):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    ran_to_the_end = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)  # to this thread: no wait for its delivery
            ran_to_the_end = True
    assert ran_to_the_end
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_handler_is_restored_after_main(work, capsys):
    root, model = work
    before = signal.getsignal(signal.SIGTERM)
    main(["compress", str(model), "--ratio", "1.5"])
    capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) == before


# -- the validation gate: an invalid model is never written --------------------------------------------------------


def _drop_a_node(model: onnx.ModelProto) -> None:
    del model.graph.node[len(model.graph.node) // 2]


def _rename_the_output(model: onnx.ModelProto) -> None:
    old = model.graph.output[0].name
    model.graph.output[0].name = "renamed"
    for node in model.graph.node:
        node.output[:] = ["renamed" if o == old else o for o in node.output]


def _change_the_opset(model: onnx.ModelProto) -> None:
    model.opset_import[0].version += 1


def _poison_a_weight(model: onnx.ModelProto) -> None:
    tensor = model.graph.initializer[0]
    array = onnx.numpy_helper.to_array(tensor).copy()
    array[...] = np.inf
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))


@pytest.mark.parametrize(
    ("breakage", "says"),
    [
        (_drop_a_node, "onnx.checker rejected"),
        (_rename_the_output, "signature changed"),
        (_change_the_opset, "opset or IR version"),
        (_poison_a_weight, "NaN/Inf"),
    ],
    ids=["dropped-node", "renamed-output", "opset", "non-finite"],
)
def test_a_broken_surgery_result_is_never_written(work, capsys, monkeypatch, breakage, says):
    root, model = work
    real_remove_units = pipeline.remove_units

    def broken_surgery(*args, **kwargs):
        pruned = real_remove_units(*args, **kwargs)
        breakage(pruned)
        return pruned

    monkeypatch.setattr(pipeline, "remove_units", broken_surgery)
    before = snapshot(root)
    code = main(["compress", str(model), "-o", str(root / "out.onnx"), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("internal error:") and "failed validation, so nothing was written" in err, err
    assert says in err and "please report" in err, err
    _assert_nothing_written(root, before)


def test_nothing_removed_must_reproduce_the_model_exactly(work, capsys, monkeypatch):
    root, model = work
    real_remove_units = pipeline.remove_units

    def nudged(*args, **kwargs):
        pruned = real_remove_units(*args, **kwargs)
        tensor = pruned.graph.initializer[0]
        array = onnx.numpy_helper.to_array(tensor) * np.float32(1.001)
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
        return pruned

    monkeypatch.setattr(pipeline, "remove_units", nudged)
    before = snapshot(root)
    code = main(["compress", str(model), "-o", str(root / "out.onnx"), "--remove", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "differs from the input model" in err, err
    _assert_nothing_written(root, before)


def test_report_none_writes_the_model_and_no_report(tmp_path):
    # The API's way to say "no report file" (the CLI's --report -): the report is only returned.
    from sglp_onnx import compress

    model, _ = write_model_and_calibration(tmp_path)
    before = snapshot(tmp_path)
    result = compress(model, tmp_path / "out.onnx", report=None, ratio=0.5, criterion="last")
    assert result.report_path is None and "report_path" not in result.report
    assert sorted(set(snapshot(tmp_path)) - set(before)) == ["out.onnx"]
    assert result.report["removed"] == [result.units[i].name for i in result.selection.removed]
    default = compress(model, tmp_path / "again.onnx", ratio=0.5, criterion="last")
    assert default.report_path == tmp_path / "again.json" and default.report_path.is_file()
