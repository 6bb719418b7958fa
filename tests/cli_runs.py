"""Running the CLI in tests: the folder a run reads and writes (`Workspace`,
the `ws` fixture of conftest.py), a snapshot of its files, the check that a
refused run said why in one or two lines and changed nothing, and reading a
child `sglp-onnx` process's stderr as it comes."""

from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sglp_onnx.cli import main

# The console script beside this interpreter, for tests that run it in a child process.
CLI = str(Path(sys.executable).with_name("sglp-onnx"))

# Waits end on what the run prints, never on the clock: this bound only stops
# a hung run, and the pauses (SGLP_ONNX_PAUSE_AT) last as long.
HANG_GUARD = 600


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (bytecode caches aside) with a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@dataclass
class Workspace:
    root: Path
    model: Path
    calib: Path
    out: Path  # an existing, empty, writable output folder

    @property
    def output(self) -> Path:
        return self.out / "pruned.onnx"


def assert_refused(ws: Workspace, code: int, err: str, before: dict[str, str], *, says: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert says.lower() in err.lower(), err
    after = snapshot(ws.root)
    assert after == before, f"files changed: {set(after) ^ set(before)}"
    assert not list(ws.root.rglob(".*.tmp"))


def run_main(ws: Workspace, capsys, argv: list[str], *, says: str) -> str:
    before = snapshot(ws.root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert_refused(ws, code, err, before, says=says)
    return err


def compress_args(ws: Workspace, *extra: str, model: Path | None = None) -> list[str]:
    return ["compress", str(model or ws.model), "-o", str(ws.output), *extra]


def read_until(proc: subprocess.Popen, needle: bytes, timeout: float = HANG_GUARD) -> bytes:
    """stderr of `proc` up to a match of the regex `needle` (tqdm writes no newlines, so read raw)."""
    seen = b""
    deadline = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while not re.search(needle, seen):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"never saw {needle!r}; stderr so far: {seen.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            seen += os.read(fd, 65536)
    return seen
