"""What a user waits for on the bundled ResNet-56, start-up included, and
whether torch and ONNX Runtime share the two cores without oversubscribing.

Every figure is the wall time of a fresh `sglp-onnx` process (the median of
`--repeats` runs), so imports, session creation and writing are all in it:

- `sglp-onnx --version` (the floor: interpreter and CLI start-up);
- gradient-free `compress` with the paper's method (`--criterion sglp`, no
  torch model) and with the default criterion (measured damage), and which
  heavy modules (torch, transformers, matplotlib) each imports;
- the GradNorm stage of the demo (`--torch-model`), with the machine idle and
  with a CPU-bound process running beside it: the same seconds within 20%
  means the thread pools do not fight each other.

Must hold (issue 13): ResNet-56 gradient-free compress at most 1.5 s; the
GradNorm stage beside a busy process within 20% of its idle time.
Writes benchmarks/results/startup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, ROOT, describe, publish  # noqa: E402

CLI = str(Path(sys.executable).with_name("sglp-onnx"))
MODEL = MODELS_DIR / "resnet56_digits.onnx"
PAIRED = ["--torch-model", "models.resnet_cifar:resnet56_digits",
          "--torch-weights", str(MODELS_DIR / "resnet56_digits.pt")]
HEAVY = ("torch", "transformers", "matplotlib")
LIMIT_SECONDS = 1.5
GRADNORM_TOLERANCE = 0.20


def timed(argv: list[str], *, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, proc


def median_wall(argv: list[str], repeats: int) -> float:
    return statistics.median(timed(argv)[0] for _ in range(repeats))


def heavy_imports(argv: list[str]) -> list[str]:
    """The heavy top-level modules a run imports (from `python -X importtime`)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    _, proc = timed(argv, env=env)
    seen = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in seen]


def gradnorm_seconds(out: Path, repeats: int) -> float:
    argv = [CLI, "compress", str(MODEL), "-o", str(out), "--ratio", "0.3", "--criterion", "sglp", "--force",
            "-q", *PAIRED]
    values = []
    for _ in range(repeats):
        timed(argv)
        values.append(json.loads(out.with_suffix(".json").read_text())["timings"]["gradnorm"])
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "startup.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r56.pruned.onnx"
        base = [CLI, "compress", str(MODEL), "-o", str(out), "--ratio", "0.3", "--force", "-q"]
        rows = [
            ("`sglp-onnx --version`", [CLI, "--version"]),
            ("`compress --criterion sglp` (gradient-free)", base + ["--criterion", "sglp"]),
            ("`compress` (default criterion: damage)", base),
            ("`compress --criterion sglp --torch-model ...` (GradNorm)", base + ["--criterion", "sglp", *PAIRED]),
        ]
        measured = [(label, median_wall(argv, args.repeats), heavy_imports(argv)) for label, argv in rows]
        idle = gradnorm_seconds(out, args.repeats)
        busy_proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            busy = gradnorm_seconds(out, args.repeats)
        finally:
            busy_proc.kill()
            busy_proc.wait()

    gradient_free = measured[1][1]
    ratio = busy / idle if idle else float("nan")
    lines = [
        "# Start-up and wall time on ResNet-56 (digits)",
        "",
        f"Machine: {describe()}.",
        "",
        f"Command: `make bench` (`python benchmarks/startup.py --repeats {args.repeats}`): each row is the median "
        "wall time of a fresh process (imports, sessions and writing included) on `models/resnet56_digits.onnx` "
        "with its 256-sample calibration sidecar, `--ratio 0.3`; the heavy modules column says which of "
        f"{', '.join(HEAVY)} the run imported.",
        "",
        "| run | median wall s | heavy modules imported |",
        "|---|---:|---|",
        *[f"| {label} | {seconds:.2f} | {', '.join(mods) or 'none'} |" for label, seconds, mods in measured],
        "",
        f"GradNorm stage (report timings, median of {args.repeats}): {idle:.3f} s idle, {busy:.3f} s with a "
        f"CPU-bound process beside it ({ratio:.2f}x).",
        "",
        "Must hold:",
        f"- gradient-free compress at most {LIMIT_SECONDS} s: {gradient_free:.2f} s, "
        f"{'holds' if gradient_free <= LIMIT_SECONDS else 'FAILS'}",
        f"- GradNorm beside a busy process within {GRADNORM_TOLERANCE:.0%} of idle: {ratio:.2f}x, "
        f"{'holds' if abs(ratio - 1) <= GRADNORM_TOLERANCE else 'FAILS'}",
    ]
    publish(lines, args.output)


if __name__ == "__main__":
    main()
