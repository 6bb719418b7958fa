"""What the benchmarks share: where models and results are, the machine a
result was measured on, writing a result file, peak memory, a measured run
in a child process, and the rows the two quality tables compare.

A benchmark runs as a script (`python benchmarks/NAME.py`), so it first puts
the repository on sys.path, then imports from here:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.common import ROOT, describe, publish  # noqa: E402
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
RESULTS_DIR = ROOT / "benchmarks" / "results"


def describe() -> str:
    """One line on the machine a benchmark ran on, for result files."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import onnxruntime
        import torch

        versions = f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}"
    except ImportError:  # pragma: no cover - benchmarks run in the project venv
        versions = ""
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}, {versions}"


def publish(lines: list[str], path) -> str:
    """Write a result file (markdown lines) and echo it; returns the text."""
    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)
    return text


def peak_rss_gib() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec;
    `ru_maxrss` of a child starts at its parent's resident memory at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(command: list[str], *, cwd: Path | None = None) -> dict:
    """Run `command`, a process that prints its result as JSON on its last
    line of stdout, and return that result. When it fails: its last line of
    stderr (`failed`) and the end of it (`stderr`), its exit status, wall
    seconds and the largest peak RSS of any child so far (`peak_rss_gib`; the
    failed one's own is not known)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"failed": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300],
                "returncode": done.returncode, "seconds": wall, "process_s": wall,
                "peak_rss_gib": usage.ru_maxrss / 2**20, "stderr": done.stderr[-2000:]}
    # process_s: the child's whole life, interpreter start-up and imports included.
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": wall}


# The rows of both quality tables (quality.py: the CNNs and the ViT,
# quality_llm.py: the tiny Llama): (row label, --criterion, uses the paired torch model).
CRITERIA = [
    ("damage (default)", "damage", False),
    ("damage, --repair none (plain bypass, the default before repair)", "damage", False),
    ("damage-fast", "damage-fast", False),
    ("sglp", "sglp", True),
    ("sglp (no torch: 1-CKA importance)", "sglp", False),
    ("gradnorm", "gradnorm", True),
    ("cka-removal", "cka-removal", False),
    ("block-influence", "block-influence", False),
    ("last", "last", False),
    ("random", "random", False),
]
REPAIR = "full"


def repair_of(label: str) -> str:
    """The --repair of a row: the default's, except the row that shows the plain bypass."""
    return "none" if "--repair none" in label else REPAIR
