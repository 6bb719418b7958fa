"""What repair costs in compress time: the default (repair-aware search and
repair) against `--repair none` and against the default before repair
existed (commit BEFORE_REPAIR, checked out into a temporary git worktree),
in the same run.

    python benchmarks/repair_cost.py        # part of make bench

ResNet-56 (digits) at `--ratio 0.5` and the tiny Llama with `--remove 2`,
each with its calibration sidecar; every variant runs in a fresh process
(`python -m sglp_onnx.cli -q compress ...`, one thread), variants
interleaved, REPEATS times; the median wall time is reported and the ratio
to the pre-repair default. Writes benchmarks/results/repair_cost.md.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, ROOT, describe, publish  # noqa: E402

BEFORE_REPAIR = "fa544c5"  # the last commit whose default did not repair
REPEATS = 3
MODELS = {
    "ResNet-56 (digits), --ratio 0.5": (MODELS_DIR / "resnet56_digits.onnx", ["--ratio", "0.5"]),
    "tiny Llama, --remove 2": (MODELS_DIR / "tinyllama_pydoc.onnx", ["--remove", "2", "--batch-size", "16"]),
}


def timed(source: Path, model: Path, out: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sglp_onnx.cli", "-q", "compress", str(model), "-o", str(out),
                           "--force", "--threads", "1", *args], env=env, cwd=source, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{source}: {done.stderr.strip()}")
    return seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), BEFORE_REPAIR],
                       check=True, capture_output=True)
        try:
            variants = {"default before repair": (before, []), "default (repair)": (ROOT, []),
                        "--repair none": (ROOT, ["--repair", "none"])}
            rows = []
            for label, (model, args) in MODELS.items():
                times: dict[str, list[float]] = {v: [] for v in variants}
                for _ in range(REPEATS):
                    for name, (source, extra) in variants.items():
                        times[name].append(timed(source, model, Path(tmp) / "out.onnx", args + extra))
                base = statistics.median(times["default before repair"])
                for name in variants:
                    median = statistics.median(times[name])
                    rows.append(f"| {label} | {name} | {median:.1f} | {median / base:.2f} |")
                    print(rows[-1], flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    lines = ["# What repair costs in compress time", "", f"Machine: {describe()}; shared with other jobs, so "
             "ratios within one run are what counts.", "",
             "Command: `python benchmarks/repair_cost.py` (part of `make bench`). " + __doc__.split("\n\n")[2]
             .replace("\n", " "), "", "| model | variant | median wall time (s) | / default before repair |",
             "|---|---|---:|---:|", *rows]
    publish(lines, RESULTS_DIR / "repair_cost.md")


if __name__ == "__main__":
    main()
