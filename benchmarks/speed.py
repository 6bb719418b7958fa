"""How fast is SGLP next to CKA removal? Wall time of `compress` with each
criterion on ResNet-110 (digits) and the tiny Llama, and the forward passes
over the calibration set each one needs.

Passes are counted twice: as the criterion reports them (`Selection.passes`;
SGLP: one ONNX pass for CKA plus one forward/backward pass of the paired
torch model for GradNorm) and by counting the samples that went through
ONNX Runtime, divided by the calibration size (a partial pass that starts
mid-network counts as a whole one there). Writes
benchmarks/results/speed.md; every number in it comes from this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, ROOT, describe, publish  # noqa: E402

import onnxruntime as ort  # noqa: E402

from sglp_onnx.selection import REGISTRY  # noqa: E402
from sglp_onnx.pipeline import compress  # noqa: E402

# name, paired torch factory, weights (None: the factory loads them)
CASES = {
    "resnet110_digits": ("models.resnet_cifar:resnet110_digits", "models/resnet110_digits.pt"),
    "tinyllama_pydoc": ("models.tiny_llama:tiny_llama_pydoc", None),
    "cnn1d_radio": ("models.cnn1d:cnn1d_radio", "models/cnn1d_radio.pt"),
}
DEFAULT_MODELS = ("resnet110_digits", "tinyllama_pydoc")
CRITERIA = ("sglp", "cka-removal")


class OrtSampleCounter:
    """Counts samples (the batch axis) fed to every ONNX Runtime session."""

    def __init__(self) -> None:
        self.samples = 0
        self.runs = 0
        self._original = ort.InferenceSession.run

    def __enter__(self) -> "OrtSampleCounter":
        counter = self

        def run(session, output_names, input_feed, run_options=None):
            # Gates and other scalars carry no batch axis: the largest axis 0 is the batch.
            counter.samples += max((int(v.shape[0]) for v in input_feed.values() if getattr(v, "ndim", 0)),
                                   default=1)
            counter.runs += 1
            return counter._original(session, output_names, input_feed, run_options)

        ort.InferenceSession.run = run
        return self

    def __exit__(self, *exc) -> None:
        ort.InferenceSession.run = self._original


def run_once(name: str, criterion: str, ratio: float, folder: Path) -> dict:
    factory, weights = CASES[name]
    options = dict(criterion=criterion, ratio=ratio, batch_size=64)
    if criterion == "sglp":  # SGLP's importance is GradNorm on the paired torch model
        options.update(torch_model=factory, torch_weights=None if weights is None else str(ROOT / weights))
    with OrtSampleCounter() as counter:
        start, start_cpu = time.perf_counter(), time.process_time()
        result = compress(MODELS_DIR / f"{name}.onnx", folder / f"{name}.{criterion}.onnx", force=True,
                          **options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    passes = dict(result.selection.passes)
    if not passes and criterion == "sglp":
        # SGLP makes exactly one calibration pass for CKA, plus GradNorm's forward and backward.
        passes = {"forward": 1} if result.report.get("importance_kind", "").startswith("1 -") else {
            "forward": 1, "torch_forward": 1, "torch_backward": 1}
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "timings": dict(result.timings),
        "removed": len(result.selection.removed),
        "units": len(result.units),
        "passes": passes,
        "ort_sample_passes": counter.samples / result.calib.n_samples,
        "ort_runs": counter.runs,
        "calib_samples": result.calib.n_samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs per model and criterion (median)")
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of units to remove")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(CASES))
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "speed.md")
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    criteria = [c for c in CRITERIA if c in REGISTRY]
    absent_criteria = [c for c in CRITERIA if c not in REGISTRY]
    rows, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if not (MODELS_DIR / f"{name}.onnx").is_file():
                missing.append(name)
                continue
            # Warm-up: imports and the first torch/ONNX Runtime calls are not what is compared.
            run_once(name, criteria[0], args.ratio, Path(tmp))
            runs = {c: [] for c in criteria}
            for _ in range(args.repeats):
                for criterion in criteria:  # interleaved, so drift hits both criteria alike
                    runs[criterion].append(run_once(name, criterion, args.ratio, Path(tmp)))
                    print(name, criterion, round(runs[criterion][-1]["seconds"], 2), flush=True)
            for criterion in criteria:
                rs = runs[criterion]
                rows.append((name, criterion, rs, statistics.median(r["seconds"] for r in rs)))

    lines = [
        "# Compression speed: SGLP against CKA removal",
        "",
        f"Machine: {describe()}.",
        "",
        f"Command: `python benchmarks/speed.py` (`--repeats {args.repeats} --ratio {args.ratio}`): `compress` with "
        "each criterion, batch size 64, the model's calibration sidecar; SGLP with its paired torch model "
        "(GradNorm), CKA removal without (it needs none). Median wall time of the repeats after one warm-up "
        "run, criteria interleaved. The ONNX Runtime count includes the discovery and pairing probes and "
        "validation (one batch through the original and the pruned model). CPU s is the process CPU time "
        f"(all threads). Load average (1 min) when the run started: {load_start:.2f} on "
        f"{os.cpu_count()} CPUs shared with other jobs.",
        "",
        "| model | criterion | units removed | calibration samples | compress s (median) | each run s | CPU s (median) | "
        "stage seconds (median) | passes (criterion's count) | ONNX Runtime samples / calibration size |",
        "|---|---|---:|---:|---:|---|---:|---|---|---:|",
    ]
    for name, criterion, rs, median in rows:
        first = rs[0]
        stages = ", ".join(f"{k} {statistics.median(r['timings'].get(k, 0.0) for r in rs):.2f}"
                           for k in first["timings"])
        passes = ", ".join(f"{k} {v}" for k, v in first["passes"].items()) or "n/a"
        each_run = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        lines.append(
            f"| {name} | {criterion} | {first['removed']}/{first['units']} | {first['calib_samples']} | "
            f"{median:.2f} | {each_run} | {statistics.median(r['cpu_seconds'] for r in rs):.2f} | {stages} | "
            f"{passes} | {first['ort_sample_passes']:.1f} |")
    by_model: dict[str, dict[str, float]] = {}
    for name, criterion, _, median in rows:
        by_model.setdefault(name, {})[criterion] = median
    speedups = [f"{name}: cka-removal / sglp = {m['cka-removal'] / m['sglp']:.1f}x (wall)"
                for name, m in by_model.items() if "sglp" in m and "cka-removal" in m]
    if speedups:
        lines += ["", "Wall-time ratio " + "; ".join(speedups) + "."]
    if missing:
        lines += ["", f"Not measured (model file absent from models/): {', '.join(missing)}."]
    if absent_criteria:
        lines += ["", f"Not measured (criterion not implemented yet): {', '.join(absent_criteria)}."]
    publish(lines, args.output)


if __name__ == "__main__":
    main()
