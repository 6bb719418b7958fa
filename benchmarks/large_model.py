"""`compress` on a model above the 2 GB protobuf limit: time and peak memory,
one-shot against `--sequential` calibration.

The model is a synthetic deep residual MLP (`blocks` blocks
`h + W2 relu(W1 h)` of float32 `width x width` weights, then a head) whose
weights are written straight into an external data file, so building it
never holds more than one weight in memory. Each compress runs in a fresh
process (`measured_compress.py`); its peak resident memory is VmHWM. Not part of CI: it needs
several GB of RAM and disk. Writes benchmarks/results/large_model.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import RESULTS_DIR, describe, publish  # noqa: E402
from benchmarks.measured_compress import floor_sentence, run_in, stage_cells  # noqa: E402
from benchmarks.mlp_model import build  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--folder", type=Path, help="where to build the model (default: a temporary folder)")
    parser.add_argument("--modes", nargs="+", default=["sequential", "one-shot", "one-shot-damage"],
                        choices=["sequential", "one-shot", "one-shot-damage"])
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "large_model.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sglp-large-", dir=args.folder) as tmp:
        folder = Path(tmp)
        model = folder / "large.onnx"
        start = time.perf_counter()
        data_bytes = build(model, blocks=args.blocks, width=args.width)
        build_seconds = time.perf_counter() - start
        rng = np.random.default_rng(0)
        np.savez(folder / "large.calib.npz", input=rng.standard_normal((args.samples, args.width)).astype(np.float32))
        floor = run_in(folder, "floor", model, sequential=False, batch_size=args.batch_size, floor=True)
        # one-shot-damage: the default criterion, a partial pass per candidate per greedy step.
        results = {mode: run_in(folder, mode, model, sequential=mode == "sequential", batch_size=args.batch_size,
                                options={"ratio": 0.25} if mode == "one-shot-damage" else None)
                   for mode in args.modes}

    lines = [
        "# `compress` on a model above the 2 GB protobuf limit",
        "",
        f"Machine: {describe()}.",
        "",
        f"Command: `python benchmarks/large_model.py --blocks {args.blocks} --width {args.width}`: a residual MLP "
        f"of {args.blocks} blocks with float32 {args.width}x{args.width} weights, {data_bytes / 2**30:.2f} GiB of "
        f"weights in `large.onnx.data` (built in {build_seconds:.1f} s); `compress --ratio 0.25` "
        f"(criterion sglp, gradient-free; one-shot-damage: the default criterion), {args.samples} calibration samples, batch {args.batch_size}; each mode "
        "in a fresh process, peak RSS from its VmHWM.",
        "",
        "| mode | result | wall s | peak RSS GiB | stage seconds | peak RSS GiB at the end of each stage | "
        "output size | data file recorded in output |",
        "|---|---|---:|---:|---|---|---:|---|",
    ]
    weights = data_bytes / 2**30
    floor_s = floor.get("seconds", float("nan"))
    lines[-2:-2] = [
        floor_sentence(floor),
        "",
    ]
    checks = []
    for mode, r in results.items():
        if "failed" in r:
            continue
        ratio, memory = r["seconds"] / floor_s, r["peak_rss_gib"] / weights
        if mode == "one-shot-damage":
            checks.append(f"- one-shot with the default criterion (damage: {r['removed']} greedy steps of partial "
                          f"passes): {ratio:.2f}x the floor; peak RSS {memory:.2f}x the weights (the gated graph's "
                          "session and the candidates' side-by-side session).")
        elif mode == "one-shot":
            checks.append(f"- one-shot: wall time {ratio:.2f}x the floor (must hold: at most 1.5x: "
                          f"{'holds' if ratio <= 1.5 else 'fails'}); peak RSS {memory:.2f}x the weights "
                          f"(must hold: at most 2x: {'holds' if memory <= 2 else 'fails'}).")
        else:
            piece = 2 * args.width * args.width * 4 / 2**30  # one block's two weights
            bound = 1.2 * piece + r["after_file_size"] / 2**30
            own = r["peak_rss_gib"] - r["base_rss_gib"]
            checks.append(f"- sequential: peak RSS {r['peak_rss_gib']:.2f} GiB against 1.2x the largest piece "
                          f"({piece:.2f} GiB) plus the output ({r['after_file_size'] / 2**30:.2f} GiB) = "
                          f"{bound:.2f} GiB: {'holds' if r['peak_rss_gib'] <= bound else 'fails'}; without the "
                          f"{r['base_rss_gib']:.2f} GiB the process holds before it reads the model (interpreter "
                          f"and libraries), {own:.2f} GiB: {'holds' if own <= bound else 'fails'}. Wall time "
                          f"{ratio:.2f}x the floor.")
    for mode, r in results.items():
        if "failed" in r:
            lines.append(f"| {mode} | failed (exit {r['returncode']}): {r['failed']} | {r['seconds']:.1f} | "
                         f"{r['peak_rss_gib']:.2f} (largest child so far) | | | | |")
            continue
        stages, peaks = stage_cells(r)
        lines.append(f"| {mode} | removed {r['removed']}/{r['units']} units | {r['seconds']:.1f} | "
                     f"{r['peak_rss_gib']:.2f} | {stages} | {peaks} | {r['after_file_size'] / 2**30:.2f} GiB | "
                     f"{', '.join(r['data_files_recorded'])} (files: {', '.join(r['files_beside_output'])}) |")
    publish(lines + ([""] + checks if checks else []), args.output)


if __name__ == "__main__":
    main()
