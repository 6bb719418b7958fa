"""Does removing x% of the FLOPs cut CPU latency by x%? Original against pruned
example CNNs (ResNet-56 and ResNet-110 on digits, the 1-D radio CNN) at about
30% and 50% of the FLOPs removed, batch 64, one ONNX Runtime thread.

The ideal latency ratio is the FLOPs ratio; the requirement is a measured
ratio within 10% of it. To explain a gap, each model is also timed with
every unit removed (what is left: stem, projection blocks, head), which
splits its latency into a fixed part and the part the units carry.
Writes benchmarks/results/latency.md; every number in it comes from this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, publish  # noqa: E402

import onnxruntime  # noqa: E402

from sglp_onnx import bench  # noqa: E402
from sglp_onnx.files import load_calibration, load_model, save_model, sidecar_path  # noqa: E402
from sglp_onnx.pipeline import compress  # noqa: E402
from sglp_onnx.surgery import remove_units  # noqa: E402
from sglp_onnx.units import discover  # noqa: E402

MODELS = ("resnet56_digits", "resnet110_digits", "cnn1d_radio")
TARGETS = (0.3, 0.5)
TOLERANCE = 0.10
# A repaired model (the default) is held to 5%: its maps are counted in its FLOPs.
REPAIRED_TOLERANCE = 0.05


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        cpu = fields.get("Model name", platform.processor()).strip()
        cores = fields.get("CPU(s)", "?").strip()
        caches = ", ".join(f"{k.strip()} {fields[k].strip()}" for k in ("L2 cache", "L3 cache") if k in fields)
    except (OSError, subprocess.CalledProcessError):
        cpu, cores, caches = platform.processor(), "?", ""
    return (f"{cpu} ({cores} CPUs{'; ' + caches if caches else ''}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}")


def variants(name: str, folder: Path) -> list[tuple[str, Path, int, int]]:
    """(label, path, units removed, units) for the original, each FLOPs target and the all-units-removed rest."""
    source = MODELS_DIR / f"{name}.onnx"
    rows = [("original", source, 0, 0)]
    for target in TARGETS:
        out = folder / f"{name}.flops{int(target * 100)}.onnx"
        result = compress(source, out, target_flops=target, criterion="sglp", repair="none", force=True)
        rows.append((f"-{target:.0%} FLOPs target", out, len(result.selection.removed), len(result.units)))
        # The default: measured damage, repaired (the maps' 1x1 convolutions count in its FLOPs).
        out = folder / f"{name}.flops{int(target * 100)}.repaired.onnx"
        result = compress(source, out, target_flops=target, force=True)
        if result.report["repair"] and result.report["repair"]["applied"]:
            cuts = len(result.report["repair"]["cuts"])
            rows.append((f"-{target:.0%} FLOPs target, default + repair ({cuts} maps)", out,
                         len(result.selection.removed), len(result.units)))
    model = load_model(source)
    calib = load_calibration(sidecar_path(source), model, max_samples=8)
    units, _ = discover(model, calib, granularity="layer", provider="cpu")
    rest = folder / f"{name}.no_units.onnx"
    save_model(remove_units(model, units), rest)
    rows.append(("every unit removed", rest, len(units), len(units)))
    return [(label, path, removed, len(units)) for label, path, removed, _ in rows]


def measure(paths: list[Path], *, repeats: int, runs: int, warmup: int, batch: int) -> list[dict]:
    """Median over `repeats` fresh bench sessions of each model's p50 and latency ratio."""
    sessions = [bench(paths, batch_sizes=batch, runs=runs, warmup=warmup, threads=1) for _ in range(repeats)]
    rows = []
    for i, path in enumerate(paths):
        first = sessions[0][i]
        rows.append({
            "path": path,
            "flops": first.flops,
            "params": first.params,
            "flops_ratio": first.flops_ratio,
            "p50_ms": statistics.median(s[i].p50_ms for s in sessions),
            "p90_ms": statistics.median(s[i].p90_ms for s in sessions),
            "latency_ratio": statistics.median(s[i].latency_ratio for s in sessions),
            "cpu_ms": statistics.median(s[i].cpu_p50_ms for s in sessions),
            "cpu_ratio": statistics.median(s[i].cpu_p50_ms / s[0].cpu_p50_ms for s in sessions),
            "ratio_spread": (min(s[i].latency_ratio for s in sessions), max(s[i].latency_ratio for s in sessions)),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model per bench session")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="bench sessions per model family (median)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latency.md")
    args = parser.parse_args()

    table = [
        "| model | variant | units removed | FLOPs / sample | ideal ratio (FLOPs) | p50 ms | p90 ms | "
        "latency ratio (min-max) | latency / ideal | within tolerance | CPU ms | CPU ratio | CPU / ideal | "
        "CPU ratio predicted by the fixed part |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    analysis = []
    missing = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if not (MODELS_DIR / f"{name}.onnx").is_file():
                missing.append(name)
                continue
            rows = variants(name, Path(tmp))
            measured = measure([p for _, p, _, _ in rows], repeats=args.repeats, runs=args.runs,
                               warmup=args.warmup, batch=args.batch_size)
            rest = measured[-1]
            for (label, _, removed, n_units), m in zip(rows, measured):
                # If units cost CPU in proportion to their FLOPs and the rest is fixed:
                predicted = rest["cpu_ratio"] + (1 - rest["cpu_ratio"]) * (
                    (m["flops_ratio"] - rest["flops_ratio"]) / (1 - rest["flops_ratio"]))
                off = m["latency_ratio"] / m["flops_ratio"]
                tolerance = REPAIRED_TOLERANCE if "repair" in label else TOLERANCE
                verdict = "" if label in ("original", "every unit removed") else (
                    "yes" if abs(off - 1) <= tolerance else "**no**")
                lo, hi = m["ratio_spread"]
                table.append(
                    f"| {name} | {label} | {removed}/{n_units} | {m['flops'] / 1e6:.2f} M | {m['flops_ratio']:.3f} | "
                    f"{m['p50_ms']:.2f} | {m['p90_ms']:.2f} | {m['latency_ratio']:.3f} ({lo:.3f}-{hi:.3f}) | "
                    f"{off:.3f} | {verdict} | {m['cpu_ms']:.2f} | {m['cpu_ratio']:.3f} | "
                    f"{m['cpu_ratio'] / m['flops_ratio']:.3f} | {predicted:.3f} |")
            unit_flops = 1 - rest["flops_ratio"]
            analysis.append(
                f"| {name} | {rest['flops_ratio']:.1%} | {rest['latency_ratio']:.1%} | {rest['cpu_ratio']:.1%} | "
                f"{(1 - rest['latency_ratio']) / unit_flops:.3f} | {(1 - rest['cpu_ratio']) / unit_flops:.3f} |")
            print("\n".join(table[-len(rows):]), flush=True)

    load_after = os.getloadavg()
    lines = [
        "# Latency against FLOPs after layer removal",
        "",
        f"Machine: {machine()}. Load average (1 min) {load_before[0]:.2f} before and {load_after[0]:.2f} after "
        f"the run, on {os.cpu_count()} CPUs shared with other jobs.",
        "",
        f"Command: `python benchmarks/latency.py` (part of `make bench`): each model and its pruned versions "
        f"(`compress --target-flops 0.3` and `0.5`: criterion sglp with `--repair none`, and the default "
        f"(measured damage, repaired: its 1x1-convolution maps count in its FLOPs) with the calibration sidecar) "
        f"timed with "
        f"`sglp_onnx.bench` at batch {args.batch_size}, one intra-op thread, CPU provider, {args.warmup} warm-up "
        f"and {args.runs} timed runs, models interleaved run by run; median over {args.repeats} bench sessions "
        "(min-max of the ratio in brackets). Ideal ratio = FLOPs after / FLOPs before; the requirement is "
        f"|latency ratio / ideal - 1| <= {TOLERANCE:.0%} ({REPAIRED_TOLERANCE:.0%} for repaired models), judged on "
        "the wall-clock p50. The CPU columns are the "
        "median CPU time of the calling thread per run (`cpu_p50_ms`): with one intra-op thread all work runs "
        "there, so it is the latency without the other processes on this shared machine.",
        "",
        *table,
        "",
        "## Where the time goes",
        "",
        "The 'every unit removed' model keeps only what no removal touches (stem, downsampling blocks, pooling, "
        "head). Its shares of the original's FLOPs and latency split the cost into a fixed part and the part "
        "the units carry. When the fixed part's latency share exceeds its FLOPs share, units are cheaper per FLOP "
        "than the rest, so removing them cuts less latency than FLOPs (ratio above ideal), and the other way round. "
        "The last column of the first table predicts each CPU ratio from this split alone: fixed-part CPU share "
        "+ (1 - that share) x the fraction of the unit FLOPs kept.",
        "",
        "| model | fixed part: FLOPs share | fixed part: latency share | fixed part: CPU share | "
        "units: latency share / FLOPs share | units: CPU share / FLOPs share |",
        "|---|---:|---:|---:|---:|---:|",
        *analysis,
    ]
    if missing:
        lines += ["", f"Not measured (model file absent from models/): {', '.join(missing)}."]
    publish(lines, args.output)


if __name__ == "__main__":
    main()
