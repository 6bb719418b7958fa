"""`compress`, and the floor it is compared with, each in a fresh process:
wall time, peak RSS (VmHWM) and the peak RSS at the end of each stage. Shared
by large_model.py and llm_scale.py; run as a script, it is the measured
process (`--child` compresses, `--baseline` measures the floor)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import peak_rss_gib, run_child  # noqa: E402


class StagePeaks:
    """A `progress` for compress that shows nothing and records the peak RSS
    so far at the end of each stage, by stage name: where the memory goes."""

    def __init__(self) -> None:
        from sglp_onnx.progress import STAGE_LABELS

        self.names = {label: name for name, label in STAGE_LABELS.items()}
        self.peaks: dict[str, float] = {}

    def __call__(self, iterable, label: str = ""):
        yield from iterable
        if label == "calibration":  # timed inside the criterion, not a stage of its own
            self.peaks.setdefault("calibration", peak_rss_gib())

    @contextlib.contextmanager
    def stage(self, label: str):
        yield
        self.peaks[self.names.get(label, label)] = peak_rss_gib()


def child(model: str, out: str, sequential: bool, batch_size: int, options: dict | None = None) -> None:
    """The measured process: one compress, then its peak RSS and stage times as JSON."""
    import onnx

    from sglp_onnx import compress
    from sglp_onnx.report.summary import fidelity_lines

    stages = StagePeaks()
    # What the process holds before any model work: the interpreter and the libraries.
    import onnxruntime  # noqa: F401

    base_rss = peak_rss_gib()
    start = time.perf_counter()
    # criterion sglp: what the results describe (the default, damage, runs a pass per candidate).
    options = options or {"ratio": 0.25, "criterion": "sglp"}
    result = compress(model, out, batch_size=batch_size, force=True, sequential=sequential, progress=stages,
                      **options)
    seconds = time.perf_counter() - start
    recorded = sorted({e.value for t in onnx.load(out, load_external_data=False).graph.initializer
                       for e in t.external_data if e.key == "location"})
    print(json.dumps({
        "seconds": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "base_rss_gib": base_rss,
        "timings": result.report["timings"],
        "stage_peak_rss_gib": stages.peaks,
        "removed": len(result.selection.removed),
        "units": len(result.units),
        "removed_names": [u["name"] for u in result.report["units"] if u["removed"]],
        "fidelity": (fidelity_lines(result.report) or ["-"])[0],
        "after_file_size": result.report["after"]["file_size"],
        "data_files_recorded": recorded,
        "files_beside_output": sorted(p.name for p in Path(out).parent.iterdir() if p.name.startswith("out")),
    }))


def baseline(model: str, out: str, batch_size: int) -> None:
    """The physical floor, measured: read the model once (weights included),
    one forward pass over the calibration set in one ONNX Runtime session
    (the tool's session settings), write the model once with its weights in
    a side file. Prints its stage times and peak RSS as JSON."""
    import onnx

    from sglp_onnx.files import load_calibration, save_model
    from sglp_onnx.graph import make_session

    timings = {}
    start = time.perf_counter()
    loaded = onnx.load(model)
    timings["load"] = time.perf_counter() - start
    start = time.perf_counter()
    session = make_session(model)
    for feed, _ in load_calibration(beside_calib(model), loaded).batches(batch_size):
        session.run(None, feed)
    del session
    timings["pass"] = time.perf_counter() - start
    start = time.perf_counter()
    save_model(loaded, out, external_data=True)
    timings["write"] = time.perf_counter() - start
    print(json.dumps({"seconds": sum(timings.values()), "timings": timings,
                      "peak_rss_gib": peak_rss_gib()}))


def beside_calib(model: str) -> str:
    return str(Path(model).with_name(Path(model).name.replace(".onnx", ".calib.npz")))


def run_measured(model: Path, out: Path, *, sequential: bool, batch_size: int, floor: bool = False,
                 options: dict | None = None) -> dict:
    """`child` (or with `floor`, `baseline`) in a fresh process; its JSON, or what `run_child` says of a failure."""
    command = [sys.executable, str(Path(__file__).resolve()), "--baseline" if floor else "--child", str(model),
               str(out), "--batch-size", str(batch_size)] + (["--sequential"] if sequential else [])
    if options is not None:
        command += ["--options", json.dumps(options)]
    return run_child(command)


def run_in(folder: Path, name: str, model: Path, **kwargs) -> dict:
    """`run_measured` writing into `folder/name`, emptied afterwards (the disk freed for the next run)."""
    out_dir = folder / name
    out_dir.mkdir()
    result = run_measured(model, out_dir / "out.onnx", **kwargs)
    for p in out_dir.iterdir():
        p.unlink()
    print(name, result, flush=True)
    return result


def floor_sentence(floor: dict) -> str:
    """The report's line on the floor run (`baseline`)."""
    return ("Floor, measured in the same run (a fresh process: `onnx.load` with the weights, one ONNX Runtime pass "
            "over the calibration set, `save_model` with external data): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in floor.get("timings", {}).items())
            + f", **{floor.get('seconds', float('nan')):.1f} s** in all, peak RSS "
            f"{floor.get('peak_rss_gib', float('nan')):.2f} GiB.")


def stage_cells(r: dict) -> tuple[str, str]:
    """A run's stage seconds and peak RSS at the end of each stage, as table cells."""
    return (", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()),
            ", ".join(f"{k} {v:.2f}" for k, v in r["stage_peak_rss_gib"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help="compress MODEL into OUT")
    mode.add_argument("--baseline", nargs=2, metavar=("MODEL", "OUT"), help="the floor: load, one pass, write")
    parser.add_argument("--options", type=json.loads, help="compress keywords, as JSON")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequential", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.sequential, args.batch_size, args.options)
    else:
        baseline(*args.baseline, args.batch_size)


if __name__ == "__main__":
    main()
