"""Does the calibration pass stream? Peak memory and time of `analyze` on the
1-D CNN for growing calibration sets, each size in a fresh process.

Peak memory is the process's peak resident set (`ru_maxrss`); the
calibration file itself grows with the sample count (it is the input), the
activations and accumulators must not. Writes
benchmarks/results/streaming.md. `--child` is the measuring process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, ROOT, describe, publish, run_child  # noqa: E402

MODEL = MODELS_DIR / "cnn1d_radio.onnx"
CALIB = MODELS_DIR / "cnn1d_radio.calib.npz"
TORCH_MODEL = "models.cnn1d:cnn1d_radio"
TORCH_WEIGHTS = MODELS_DIR / "cnn1d_radio.pt"


def measure(samples: int, *, batch_size: int, torch_model: bool, sequential: bool = False,
            activation_budget: str | None = None) -> dict:
    """One `analyze` run over `samples` calibration samples (the sidecar's repeated) in this process."""
    import numpy as np

    from sglp_onnx.pipeline import analyze

    with np.load(CALIB) as data:
        x, labels = data["input"], data["labels"]
    rows = np.arange(samples) % len(x)
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, input=x[rows], labels=labels[rows])
        del x, labels, rows
        options = dict(calib=calib, ratio=0.3, batch_size=batch_size)
        if torch_model:
            options.update(torch_model=TORCH_MODEL, torch_weights=TORCH_WEIGHTS)
        if sequential:
            options["sequential"] = True
        if activation_budget is not None:
            options["activation_budget"] = activation_budget
        runs = _count_session_runs()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = analyze(MODEL, **options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return {
        "samples": samples,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
        # CPU time of all threads: what the work costs, whatever else the machine runs.
        "cpu_seconds": cpu_seconds,
        "calibration_seconds": result.timings.get("calibration", 0.0),
        "gradnorm_seconds": result.timings.get("gradnorm", 0.0),
        "rows": result.report["calibration"]["rows"],
        # ONNX Runtime runs: the work done, counted, whatever the machine's speed or load.
        "session_runs": runs[0],
    }


def _count_session_runs() -> list[int]:
    """Count every InferenceSession.run from now on in this process (a
    one-element list, updated in place)."""
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    count = [0]
    real = InferenceSession.run

    def counted(self, *args, **kwargs):
        count[0] += 1
        return real(self, *args, **kwargs)

    InferenceSession.run = counted
    return count


def measure_in_subprocess(samples: int, *, batch_size: int, torch_model: bool, sequential: bool = False,
                          activation_budget: str | None = None) -> dict:
    command = [sys.executable, "-m", "benchmarks.streaming", "--child", str(samples), "--batch-size", str(batch_size)]
    if activation_budget is not None:
        command += ["--activation-budget", activation_budget]
    if torch_model:
        command.append("--torch-model")
    if sequential:
        command.append("--sequential")
    result = run_child(command, cwd=ROOT)
    if "failed" in result:
        raise RuntimeError(f"measuring {samples} samples failed:\n{result['stderr']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", type=int, metavar="SAMPLES", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--torch-model", action="store_true", help="also run GradNorm on the paired torch model")
    parser.add_argument("--sequential", action="store_true", help="calibrate piece by piece (--sequential)")
    parser.add_argument("--activation-budget", help="compress's --activation-budget (default: its default)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "streaming.md")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, batch_size=args.batch_size, torch_model=args.torch_model,
                                 sequential=args.sequential, activation_budget=args.activation_budget)))
        return

    rows = []
    for torch_model in (False, True):
        for sequential in (False, True) if not torch_model else (False,):
            # Sizes interleaved across repeats; the minimum per size is kept (least disturbed run).
            runs: dict[int, list[dict]] = {n: [] for n in args.sizes}
            for _ in range(args.repeats):
                for n in args.sizes:
                    runs[n].append(measure_in_subprocess(n, batch_size=args.batch_size, torch_model=torch_model,
                                                         sequential=sequential))
            base = None
            for n in args.sizes:
                best = {k: min(r[k] for r in runs[n]) for k in ("peak_rss_mib", "seconds", "cpu_seconds",
                                                                "calibration_seconds", "gradnorm_seconds")}
                base = base or best
                mode = ("GradNorm (torch) + CKA" if torch_model else "CKA (gradient-free)") + (
                    ", --sequential" if sequential else "")
                rows.append((mode, n, best, base))
            print(rows[-1])

    lines = [
        "# Streaming: memory and time against calibration size",
        "",
        f"Machine: {describe()}.",
        "",
        f"Command: `python benchmarks/streaming.py` (`--sizes {' '.join(map(str, args.sizes))} --repeats "
        f"{args.repeats}`). `analyze models/cnn1d_radio.onnx --ratio 0.3 --batch-size {args.batch_size}` on the "
        "sidecar's 256 samples repeated to each size, every run in a fresh process; peak RSS from "
        "`getrusage(RUSAGE_SELF).ru_maxrss`; best of the repeats (runs interleaved by size).",
        "",
        "| mode | samples | peak RSS MiB | x smallest | analyze s | analyze CPU s | calibration s | GradNorm s | "
        "pass time x smallest | analyze CPU x smallest | linear would be |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, n, best, base in rows:
        pass_time = best["calibration_seconds"] + best["gradnorm_seconds"]
        base_time = base["calibration_seconds"] + base["gradnorm_seconds"]
        lines.append(
            f"| {mode} | {n} | {best['peak_rss_mib']:.0f} | {best['peak_rss_mib'] / base['peak_rss_mib']:.2f} | "
            f"{best['seconds']:.2f} | {best['cpu_seconds']:.2f} | {best['calibration_seconds']:.2f} | "
            f"{best['gradnorm_seconds']:.2f} | {pass_time / base_time:.2f} | "
            f"{best['cpu_seconds'] / base['cpu_seconds']:.2f} | {n / args.sizes[0]:.0f} |")
    lines += [
        "",
        "Requirement: 8x the samples costs at most 1.3x the peak RSS, and at most linear time "
        "(tests/test_streaming.py checks both).",
    ]
    publish(lines, args.output)


if __name__ == "__main__":
    main()
