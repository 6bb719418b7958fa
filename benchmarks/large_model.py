"""`compress` on a model above the 2 GB protobuf limit: time and peak memory,
one-shot against `--sequential` calibration.

The model is a synthetic deep residual MLP (`blocks` blocks
`h + W2 relu(W1 h)` of float32 `width x width` weights, then a head) whose
weights are written straight into an external data file, so building it
never holds more than one weight in memory. Each compress runs in a fresh
process; its peak resident memory is VmHWM (`peak_rss_gib`). Not part of CI: it needs
several GB of RAM and disk. Writes benchmarks/results/large_model.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

IR_VERSION = 10  # onnx >= 1.23 stamps IR 14 on new models, which ONNX Runtime refuses


def _external(name: str, shape: tuple[int, ...], data, location: str) -> onnx.TensorProto:
    """A float32 initializer whose values go to the end of the open data file."""
    array = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(shape) / np.sqrt(shape[0])
    array = array.astype(np.float32)
    offset = data.tell()
    data.write(array.tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def build(path: Path, *, blocks: int, width: int, classes: int = 10) -> int:
    """Write the model and `<name>.data`; returns the data file's size in bytes."""
    location = path.name + ".data"
    nodes, inits = [], []
    with open(path.parent / location, "wb") as data:
        h = "input"
        for i in range(blocks):
            s = f"blocks.{i}"
            inits += [_external(f"{s}.w1", (width, width), data, location),
                      _external(f"{s}.w2", (width, width), data, location)]
            nodes += [
                helper.make_node("MatMul", [h, f"{s}.w1"], [f"{s}.a"], name=f"/blocks.{i}/MatMul"),
                helper.make_node("Relu", [f"{s}.a"], [f"{s}.r"], name=f"/blocks.{i}/Relu"),
                helper.make_node("MatMul", [f"{s}.r", f"{s}.w2"], [f"{s}.f"], name=f"/blocks.{i}/MatMul_1"),
                helper.make_node("Add", [h, f"{s}.f"], [f"{s}.out"], name=f"/blocks.{i}/Add"),
            ]
            h = f"{s}.out"
        inits.append(_external("head.w", (width, classes), data, location))
        nodes.append(helper.make_node("MatMul", [h, "head.w"], ["logits"], name="/head/MatMul"))
        size = data.tell()
    graph = helper.make_graph(
        nodes, "large_residual_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sglp-bench")
    model.ir_version = IR_VERSION
    onnx.save_model(model, str(path))
    return size


def peak_rss_gib() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec;
    `ru_maxrss` of a child starts at its parent's resident memory at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(model: str, out: str, sequential: bool, batch_size: int, options: dict | None = None) -> None:
    """The measured process: one compress, then its peak RSS and stage times as JSON."""
    import contextlib

    import sglp_onnx.pipeline as pipeline

    # Peak RSS so far at the end of each pipeline stage: where the memory goes.
    stage_peaks: dict[str, float] = {}
    timed = pipeline._timed

    @contextlib.contextmanager
    def timed_with_peak(timings, stage, *args):
        with timed(timings, stage, *args):
            yield
        stage_peaks[stage] = peak_rss_gib()

    pipeline._timed = timed_with_peak
    # The calibration pass is timed inside the criterion, not by `_timed`.
    from sglp_onnx.selection.criteria import Context

    evidence = Context.evidence

    def evidence_with_peak(self):
        collected = evidence(self)
        stage_peaks.setdefault("calibration", peak_rss_gib())
        return collected

    Context.evidence = evidence_with_peak
    # What the process holds before any model work: the interpreter and the libraries.
    import onnxruntime  # noqa: F401

    base_rss = peak_rss_gib()
    start = time.perf_counter()
    # criterion sglp: what the results describe (the default, damage, runs a pass per candidate).
    options = options or {"ratio": 0.25, "criterion": "sglp"}
    result = pipeline.compress(model, out, batch_size=batch_size, force=True, sequential=sequential, **options)
    seconds = time.perf_counter() - start
    recorded = sorted({e.value for t in onnx.load(out, load_external_data=False).graph.initializer
                       for e in t.external_data if e.key == "location"})
    from sglp_onnx.report.summary import fidelity_lines

    print(json.dumps({
        "seconds": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "base_rss_gib": base_rss,
        "timings": result.report["timings"],
        "stage_peak_rss_gib": stage_peaks,
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
    from sglp_onnx.files.calibration import load_calibration
    from sglp_onnx.files.model_files import save_model
    from sglp_onnx.graph.runtime import make_session

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


def run_child(model: Path, out: Path, *, sequential: bool, batch_size: int, floor: bool = False,
              options: dict | None = None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--baseline" if floor else "--child", str(model),
               str(out), "--batch-size", str(batch_size)] + (["--sequential"] if sequential else [])
    if options is not None:
        command += ["--options", json.dumps(options)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"failed": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300],
                "returncode": done.returncode, "seconds": wall, "process_s": wall,
                "peak_rss_gib": usage.ru_maxrss / 2**20}
    # process_s: the child's whole life, interpreter start-up and imports included.
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": wall}


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


def run_in(folder: Path, name: str, model: Path, **kwargs) -> dict:
    """`run_child` writing into `folder/name`, emptied afterwards (the disk freed for the next run)."""
    out_dir = folder / name
    out_dir.mkdir()
    result = run_child(model, out_dir / "out.onnx", **kwargs)
    for p in out_dir.iterdir():
        p.unlink()
    print(name, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--options", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help="where to build the model (default: a temporary folder)")
    parser.add_argument("--modes", nargs="+", default=["sequential", "one-shot", "one-shot-damage"],
                        choices=["sequential", "one-shot", "one-shot-damage"])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "large_model.md")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.sequential, args.batch_size, args.options)
        return
    if args.baseline:
        baseline(*args.baseline, args.batch_size)
        return

    from benchmarks.machine import describe, publish

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
