"""Messages that say what happened: a guessed input size is named with how
to give real inputs; under -q an interrupt prints its one line and nothing
else. Through the real console script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from cli_runs import Workspace, run_main
from tiny_graphs import residual_mlp

CLI = str(Path(sys.executable).with_name("sglp-onnx"))
HANG_GUARD = 600  # seconds: only a hung run ever reaches it


def dynamic_width_model(path: Path) -> Path:
    """A 12-wide MLP whose feature dimension is declared dynamic: a guessed size fails."""
    model = residual_mlp(width=12)
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "features"
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("command", [["bench", "--runs", "1"], ["compress", "--criterion", "last"]])
def test_guessed_sizes_are_said_with_how_to_give_real_inputs(ws, capsys, command):
    model = dynamic_width_model(ws.root / "in" / "dyn.onnx")
    argv = [command[0], str(model), *command[1:]] + (["-o", str(ws.output)] if command[0] == "compress" else [])
    err = run_main(ws, capsys, argv, says="guessed sizes")
    assert "features" in err and ("--data" in err if command[0] == "bench" else "--calib" in err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_quiet_interrupt_prints_its_one_line_only(ws, signum):
    env = {**os.environ, "SGLP_ONNX_PAUSE_AT": f"selection:{HANG_GUARD}"}
    process = subprocess.Popen([CLI, "-q", "compress", str(ws.model), "-o", str(ws.output), "--remove", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                               start_new_session=True,  # SIGINT not ignored, whatever started the tests
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # No deadline but the hang guard: the pause line comes when it comes.
        assert process.stderr.readline() == "sglp-onnx: paused at selection\n"
        process.send_signal(signum)
        out, err = process.communicate(timeout=HANG_GUARD)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum
    assert out == ""
    assert err == f"interrupted ({signal.Signals(signum).name}); nothing was written\n"
    assert not list(ws.out.iterdir())


def test_a_closed_stdout_stops_quietly(ws):
    """`sglp-onnx analyze M --json | head -c 1`: the reader goes away; no traceback, no misleading error."""
    process = subprocess.Popen([CLI, "analyze", str(ws.model), "--json", "--remove", "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    err = process.stderr.read()
    process.wait(timeout=HANG_GUARD)
    assert process.returncode == 128 + signal.SIGPIPE and err == "", err
