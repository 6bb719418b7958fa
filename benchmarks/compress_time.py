"""How long `compress` takes on the bundled ResNet-56 (digits) with its
calibration sidecar and paired torch model, split by pipeline stage.

Runs the whole pipeline `--repeats` times in this process (after one
warm-up run that pays for imports) and writes the median of each stage to
benchmarks/results/compress_time.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, describe, publish  # noqa: E402

from sglp_onnx.pipeline import compress  # noqa: E402

MODEL = MODELS_DIR / "resnet56_digits.onnx"
OPTIONS = dict(criterion="sglp", torch_model="models.resnet_cifar:resnet56_digits",
               torch_weights=str(MODELS_DIR / "resnet56_digits.pt"), ratio=0.3)


def run_once(out_dir: Path) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    result = compress(MODEL, out_dir / "r56.pruned.onnx", force=True, **OPTIONS)
    return dict(result.report["timings"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "compress_time.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_once(Path(tmp))  # warm-up: imports, first torch call
        runs = [run_once(Path(tmp)) for _ in range(args.repeats)]
    stages = list(runs[0][0])
    medians = {s: statistics.median(r[0].get(s, 0.0) for r in runs) for s in stages}
    total = statistics.median(r[1] for r in runs)
    lines = [
        "# `compress` time on ResNet-56 (digits)",
        "",
        f"Machine: {describe()}.",
        "",
        f"Command: `make bench` (`python benchmarks/compress_time.py --repeats {args.repeats}`): "
        "`compress models/resnet56_digits.onnx --ratio 0.3` with the paired torch model for GradNorm and the "
        "256-sample calibration sidecar, batch size 64; median of the runs after one warm-up run.",
        "",
        "| stage | median seconds | share |",
        "|---|---:|---:|",
    ]
    for stage in stages:
        lines.append(f"| {stage} | {medians[stage]:.3f} | {medians[stage] / total:.0%} |")
    lines.append(f"| **total (wall)** | **{total:.3f}** | 100% |")
    publish(lines, args.output)


if __name__ == "__main__":
    main()
