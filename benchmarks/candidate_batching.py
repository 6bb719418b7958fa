"""Measured-damage candidates side by side in one session, against one suffix
session per candidate, on ResNet-56: session creation and run time for one
batch of 64 calibration samples, every unit a candidate. Why small models
keep one session per candidate (see README). Writes
benchmarks/results/candidate_batching.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, describe, publish  # noqa: E402

MODEL = MODELS_DIR / "resnet56_digits.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "candidate_batching.md")
    args = parser.parse_args()

    from sglp_onnx.evidence import output_kind
    from sglp_onnx.files import load_calibration, load_model
    from sglp_onnx.graph import make_session
    from sglp_onnx.evidence import GatedRunner
    from sglp_onnx.surgery import batched_suffix_model, suffix_model
    from sglp_onnx.units import discover

    model = load_model(MODEL)
    calib = load_calibration(MODEL.with_name("resnet56_digits.calib.npz"), model)
    units, _ = discover(model, calib, granularity="layer", provider="cpu")
    runner = GatedRunner(model, units, [output_kind(model).output])
    feed = calib.first(64)
    current = runner.run(feed, set(), entries=True)
    candidates = list(range(len(units)))

    start = time.perf_counter()
    separate = {k: make_session(suffix_model(runner.gated, units[k].exit, current[units[k].entry].dtype,
                                             runner.targets)) for k in candidates}
    separate_make = time.perf_counter() - start
    start = time.perf_counter()
    dtype = 1  # float32 entries
    batched = make_session(batched_suffix_model(runner.gated, {k: (units[k].exit, dtype) for k in candidates},
                                                runner.targets, runner.gates), prepack=False)
    batched_make = time.perf_counter() - start

    def run_separate() -> None:
        for k, session in separate.items():
            inputs = {i.name for i in session.get_inputs()}
            run_feed = {**feed, **runner.gate_feed({k}), units[k].exit: current[units[k].entry]}
            session.run(None, {n: v for n, v in run_feed.items() if n in inputs})

    inputs = {i.name for i in batched.get_inputs()}

    def run_batched() -> None:
        run_feed = {n: v for n, v in feed.items() if n in inputs}
        for k in candidates:
            prefix = f"sglp_candidate/{k}/"
            run_feed.update({prefix + g: v for g, v in runner.gate_feed({k}).items() if prefix + g in inputs})
            run_feed[prefix + units[k].exit] = current[units[k].entry]
        batched.run(None, run_feed)

    def median(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    rows = [("one suffix session per candidate", separate_make, median(run_separate)),
            ("all candidates side by side, one session", batched_make, median(run_batched))]
    lines = [
        "# Damage candidates: one session each or side by side",
        "",
        f"Machine: {describe()}.",
        "",
        f"Command: `python benchmarks/candidate_batching.py`: ResNet-56, all {len(units)} units candidates, one "
        f"batch of 64 calibration samples, run time the median of {args.repeats}.",
        "",
        "| scoring | sessions made in s | one batch, every candidate, s |",
        "|---|---:|---:|",
    ] + [f"| {label} | {made:.2f} | {run:.3f} |" for label, made, run in rows]
    publish(lines, args.output)


if __name__ == "__main__":
    main()
