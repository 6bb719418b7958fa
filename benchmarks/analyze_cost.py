"""`analyze` with its default suggestions against `compress` at the largest
suggested budget: does suggesting three budgets cost more than the largest?

For each bundled model, in fresh processes, with the model's calibration
sidecar and the default options otherwise:
- `analyze(MODEL)`: the default removal (--ratio 0.25) and the suggestions
  for 10%, 25% and 50% of the FLOPs, each measured on the held-out samples
  and repaired where that helps;
- `analyze(MODEL, target_flops=0.5)`: the same with the budget in FLOPs;
- `compress(MODEL, OUT, target_flops=0.5)`: what a user runs for the largest.
Wall seconds are the call's own (imports excluded); the must-hold is
analyze <= 1.2x compress, same run. Writes benchmarks/results/analyze_cost.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # run as a script
sys.path.insert(0, str(ROOT))

from benchmarks.common import describe, publish, run_child  # noqa: E402

MODELS = ("resnet56_digits", "cnn1d_radio", "vit_digits", "tinyllama_pydoc")
BOUND = 1.2
LARGEST = 0.5


def child(kind: str, model: str, out: str) -> None:
    """The measured process: one analyze or one compress, its seconds and timings as JSON."""
    import sglp_onnx

    start = time.perf_counter()
    if kind == "analyze":
        result = sglp_onnx.analyze(model)
        report = result.report
    elif kind == "analyze-flops":
        result = sglp_onnx.analyze(model, target_flops=LARGEST)
        report = result.report
    else:
        result = sglp_onnx.compress(model, out, target_flops=LARGEST, force=True)
        report = result.report
    seconds = time.perf_counter() - start
    suggestions = [s["names"] for s in report.get("suggestions") or [] if s["achievable"]]
    print(json.dumps({"seconds": seconds, "timings": report["timings"],
                      "removed": report["selection"]["removed"] if "selection" in report else None,
                      "suggestions": suggestions}))


def cells(r: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="runs of each call, interleaved; the fastest counts")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "analyze_cost.md")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows, checks = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in args.only:
            model = ROOT / "models" / f"{name}.onnx"
            runs: dict[str, dict] = {}
            for repeat in range(args.repeats):  # interleaved; each kind's fastest run is kept
                for kind in ("analyze", "analyze-flops", "compress"):
                    print(f"[analyze_cost {time.strftime('%H:%M:%S')}] {name}: {kind} ({repeat + 1}/{args.repeats})",
                          flush=True)
                    run = run_child([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(model),
                                     str(Path(folder) / f"{name}.onnx")], cwd=ROOT)
                    if "failed" in run:
                        raise SystemExit(f"{name} {kind} failed: {run['failed']}")
                    if kind not in runs or run["seconds"] < runs[kind]["seconds"]:
                        runs[kind] = run
            a, f, c = runs["analyze"], runs["analyze-flops"], runs["compress"]
            ratio = a["seconds"] / c["seconds"]
            rows.append(f"| {name} | {a['seconds']:.1f} | {f['seconds']:.1f} | {c['seconds']:.1f} | {ratio:.2f} | "
                        f"{f['seconds'] / c['seconds']:.2f} | {cells(a)} | {cells(f)} | {cells(c)} |")
            checks.append(f"- {name}: analyze {a['seconds']:.1f} s = {ratio:.2f}x compress --target-flops {LARGEST} "
                          f"({c['seconds']:.1f} s), must be at most {BOUND}x: "
                          f"{'holds' if ratio <= BOUND else 'does not hold'}.")
    command = "python benchmarks/analyze_cost.py" + (f" --only {' '.join(args.only)}"
                                                     if list(args.only) != list(MODELS) else "") \
        + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
    lines = [
        "# `analyze` with its default suggestions against `compress` at the largest suggested budget",
        "",
        f"Machine: {describe()}",
        "",
        f"Command: `{command}` ({(time.perf_counter() - start) / 60:.0f} min in all). Each call runs in a fresh "
        f"process, {args.repeats} times interleaved with the others (the fastest counts: the calls take seconds, "
        "so a shared machine's noise is a good part of one run), with the model's calibration sidecar and "
        "default options: `analyze(MODEL)` (the default "
        f"--ratio 0.25 and suggestions for 10%, 25%, 50% of the FLOPs, each measured on the held-out samples and "
        f"repaired where that helps) and `compress(MODEL, OUT, target_flops={LARGEST})`. Seconds are the call's "
        "own; stage seconds are the report's `timings`. `analyze --target-flops` is analyze with the budget in "
        f"FLOPs (`target_flops={LARGEST}`, the same suggestions): its selection and suggestions are one per-FLOP "
        "order. Without it the default selection (--ratio, a unit count) is a per-unit order beside the "
        "suggestions' per-FLOP one where the units' FLOPs differ; the two share what they measure on the removal "
        "sets both reach.",
        "",
        "| model | analyze s | analyze --target-flops s | compress s | analyze / compress | "
        "analyze --target-flops / compress | analyze stages | analyze --target-flops stages | compress stages |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
        *rows,
        "",
        "Must hold:",
        "",
        *checks,
    ]
    print(publish(lines, args.output))


if __name__ == "__main__":
    main()
