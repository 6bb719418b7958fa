"""Latency of ONNX models side by side under ONNX Runtime, with their
parameters, FLOPs and file size: what `sglp-onnx bench` prints.

Models are timed interleaved, one run of each in turn, so that drift
(thermal, other processes) hits them all alike and their ratios stay fair.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ..files.calibration import (CalibrationSet, check_calibration, fixed_batch, load_npz, model_inputs, sidecar_path,
                          synthetic_calibration)
from ..errors import UserError
from ..graph.flops import model_params, node_flops, tensors_needed
from ..files.model_files import external_locations, graph_input_names, load_model
from ..report.summary import human_bytes, human_count
from ..evidence.activations import probe_shapes
from ..graph.runtime import check_thread_count, input_model_errors, make_session, provider_chain

DEFAULT_RUNS = 50
DEFAULT_WARMUP = 5
# One intra-op thread: CPU numbers that repeat from run to run and do not
# depend on what else the machine is doing; --threads 0 lets ONNX Runtime
# use every core.
DEFAULT_THREADS = 1
PERCENTILES = (50, 90, 99)
FLOPS_PROBE_SAMPLES = 2


@dataclass
class BenchResult:
    """One model at one batch size. Latencies are per batch, in milliseconds."""

    model: str
    batch_size: int
    provider: str
    threads: int  # intra-op threads; 0 = ONNX Runtime's default
    runs: int
    warmup: int
    inputs: str  # where the input batch came from
    params: int
    flops: int  # per sample
    file_size: int  # bytes, external data files included
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    # Median CPU time of the calling thread per run. With threads=1 on the CPU
    # all work runs on that thread, so this is the latency the run would have
    # had on an idle machine: a contention-free figure for shared CI hosts.
    cpu_p50_ms: float
    # Samples per second: batch_size / p50 latency. The median, like the latency
    # columns: a few slow outliers (a shared host, a page fault) dominate a mean
    # and made a faster model show fewer samples/s than a slower one.
    throughput: float
    latency_ratio: float  # p50 over the first model's p50 at this batch size
    flops_ratio: float  # FLOPs over the first model's FLOPs

    def to_dict(self) -> dict:
        return asdict(self)


def bench(
    models: Sequence[str | os.PathLike],
    *,
    batch_sizes: int | Sequence[int] = 1,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    provider: str = "cpu",
    threads: int = DEFAULT_THREADS,
    data: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[BenchResult]:
    """Time every model at every batch size; results ordered by batch size, then model.

    Keyword arguments:
        batch_sizes: one batch size or several (default 1).
        runs: timed runs per model and batch size (default 50).
        warmup: untimed runs first, per model and batch size (default 5).
        provider: "cpu", "cuda" or "tensorrt" (default "cpu"). On a GPU the
            inputs are copied to the device once and outputs stay there
            (I/O binding), so host-device transfers are not timed.
        threads: ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose
            (default 1, for repeatable CPU numbers).
        data: `.npz` with the model inputs (default: the first model's
            `MODEL.calib.npz` sidecar found, else synthetic inputs). Samples
            are repeated when a batch needs more than the file holds.
        seed: seed of synthetic inputs (default 0).

    Ratios compare each model with the first one: `latency_ratio` (p50)
    next to `flops_ratio`, the ratio a FLOPs-bound model would reach.
    """
    paths = [Path(m) for m in models]
    sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    _check_options(paths, sizes, runs, warmup, threads)
    provider_chain(provider)

    source, arrays, guessed = _input_arrays(paths, data, seed, max(sizes))
    explained = CalibrationSet(inputs=arrays, guessed=guessed).explained("--data")
    with explained:
        return _bench(paths, sizes, source, arrays, runs=runs, warmup=warmup, provider=provider, threads=threads)


def _bench(paths: list[Path], sizes: list[int], source: str, arrays: dict[str, np.ndarray], *, runs: int,
           warmup: int, provider: str, threads: int) -> list[BenchResult]:
    datasets, static = [], []
    known = [name for path in paths for name in graph_input_names(path)]  # one file serves every model
    for path in paths:  # one protobuf in memory at a time; sessions read the files
        model = load_model(path)
        datasets.append(_check_inputs(arrays, model, source, sizes, path, known))
        static.append(_static_facts(model, path, datasets[-1]))
        del model

    _check_batch_memory(datasets, max(sizes))
    sessions = [make_session(path, provider, threads=threads, arena=True, prepack=True) for path in paths]
    results: list[BenchResult] = []
    for batch_size in sizes:
        feeds = [_batch(dataset, batch_size) for dataset in datasets]
        runners = [_runner(session, feed, provider) for session, feed in zip(sessions, feeds)]
        with input_model_errors("a model"):
            times, cpu_times = time_interleaved(runners, runs=runs, warmup=warmup)
        first_p50_ms = float(np.percentile(times[0], 50)) * 1e3
        for path, (params, flops, size), seconds, cpu in zip(paths, static, times, cpu_times):
            ms = np.asarray(seconds) * 1e3
            p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
            results.append(BenchResult(
                model=str(path), batch_size=batch_size, provider=provider, threads=threads, runs=runs,
                warmup=warmup, inputs=source, params=params, flops=flops, file_size=size,
                p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(ms.mean()), min_ms=float(ms.min()),
                cpu_p50_ms=float(np.median(cpu)) * 1e3,
                throughput=batch_size / (p50 / 1e3),
                latency_ratio=p50 / first_p50_ms, flops_ratio=flops / static[0][1] if static[0][1] else 1.0,
            ))
    return results


def _check_options(paths: list[Path], sizes: list[int], runs: int, warmup: int, threads: int) -> None:
    if not paths:
        raise UserError("give at least one model to bench")
    if not sizes or any(int(b) != b or b < 1 for b in sizes):
        raise UserError(f"--batch-size must be at least 1, got {sizes}")
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    if threads < 0:
        raise UserError(f"--threads must be 0 (ONNX Runtime's choice) or more, got {threads}")
    check_thread_count(threads or None)


def _input_arrays(paths: list[Path], data, seed: int, n: int) -> tuple[str, dict[str, np.ndarray], str]:
    """One set of arrays for all models, so that every model sees the same inputs."""
    if data is not None:
        return str(data), load_npz(data), ""
    for path in paths:
        sidecar = sidecar_path(path)
        if sidecar.is_file():
            return str(sidecar), load_npz(sidecar), ""
    synthetic = synthetic_calibration(load_model(paths[0], load_external_data=False), seed=seed, n_samples=n)
    return synthetic.source, synthetic.inputs, synthetic.guessed


def _check_inputs(arrays: dict[str, np.ndarray], model: onnx.ModelProto, source: str, batch_sizes: list[int],
                  path: Path, known: Sequence[str] = ()) -> CalibrationSet:
    fixed = fixed_batch(model_inputs(model))
    if fixed and any(b != fixed for b in batch_sizes):
        raise UserError(f"{path} has a fixed batch size of {fixed}; bench it with --batch-size {fixed}")
    return check_calibration(arrays, model, source=source, also_known=known)


def _check_batch_memory(datasets: list[CalibrationSet], batch_size: int) -> None:
    """Refuse a --batch-size whose inputs alone exceed this machine's memory
    (before allocating them: numpy would raise MemoryError, or the system
    would start swapping)."""
    per_sample = max(sum(v[:1].nbytes for v in d.inputs.values()) for d in datasets)
    needed = batch_size * max(per_sample, 1) * len(datasets)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if needed > total:
        raise UserError(f"--batch-size {batch_size} needs {human_bytes(needed)} for the inputs alone; this machine "
                        f"has {human_bytes(total)} of memory: choose a smaller --batch-size")


def _batch(dataset: CalibrationSet, batch_size: int) -> dict[str, np.ndarray]:
    rows = np.arange(batch_size) % dataset.n_samples
    return {k: np.ascontiguousarray(v[rows]) for k, v in dataset.inputs.items()}


def _static_facts(model: onnx.ModelProto, path: Path, dataset: CalibrationSet) -> tuple[int, int, int]:
    """Parameters, FLOPs per sample and bytes on disk."""
    feed = dataset.first(FLOPS_PROBE_SAMPLES)
    n = next(iter(feed.values())).shape[0]
    shapes, _ = probe_shapes(model, feed, tensors_needed(model))
    flops = sum(node_flops(model, shapes).values()) // n
    # The loaded model holds its weights inline; the file on disk says where they live.
    locations = set(external_locations(onnx.load(str(path), load_external_data=False)))
    size = path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)
    return model_params(model), flops, size


def _runner(session: ort.InferenceSession, feed: dict[str, np.ndarray], provider: str) -> Callable[[], None]:
    outputs = [o.name for o in session.get_outputs()]
    if provider == "cpu":
        return lambda: session.run(outputs, feed)
    # GPU: inputs live on the device for the whole measurement and outputs
    # are left there, so only the model's own work is timed.
    binding = session.io_binding()
    device_inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feed.items()}
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, "cuda", 0)
    binding.synchronize_inputs()

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run.device_inputs = device_inputs  # keep the device buffers alive with the runner
    return run


def time_interleaved(runners: list[Callable[[], None]], *, runs: int,
                 warmup: int) -> tuple[list[list[float]], list[list[float]]]:
    """Wall and calling-thread CPU seconds per run of each runner.

    Round k starts with runner k mod M so that no model is always first.
    """
    for run in runners:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runners]
    cpu_times: list[list[float]] = [[] for _ in runners]
    m = len(runners)
    for k in range(runs):
        for j in range(m):
            i = (k + j) % m
            start, start_cpu = time.perf_counter(), time.thread_time()
            runners[i]()
            times[i].append(time.perf_counter() - start)
            cpu_times[i].append(time.thread_time() - start_cpu)
    return times, cpu_times


def format_results(results: Sequence[BenchResult]) -> str:
    """A table per batch size, with the setup on the first line."""
    if not results:
        return ""
    first = results[0]
    threads = "ONNX Runtime default" if first.threads == 0 else str(first.threads)
    lines = [f"provider {first.provider}, intra-op threads {threads}, {first.runs} timed runs after "
             f"{first.warmup} warm-up, models interleaved; inputs: {first.inputs}"]
    names = distinct_names([r.model for r in results])
    width = max(len(names[r.model]) for r in results)
    header = (f"{'model':<{width}}  {'batch':>5}  {'p50 ms':>8}  {'p90 ms':>8}  {'p99 ms':>8}  {'samples/s':>10}  "
              f"{'params':>7}  {'FLOPs':>7}  {'size':>8}  {'latency':>7}  {'FLOPs':>6}")
    for batch_size in dict.fromkeys(r.batch_size for r in results):
        lines += ["", header, "-" * len(header)]
        for r in (r for r in results if r.batch_size == batch_size):
            lines.append(
                f"{names[r.model]:<{width}}  {r.batch_size:>5}  {r.p50_ms:>8.3f}  {r.p90_ms:>8.3f}  "
                f"{r.p99_ms:>8.3f}  {r.throughput:>10.1f}  {human_count(r.params):>7}  {human_count(r.flops):>7}  "
                f"{human_bytes(r.file_size):>8}  {r.latency_ratio:>6.3f}x  {r.flops_ratio:>5.3f}x")
    lines += ["", "samples/s: batch size over the p50 latency; latency and FLOPs columns on the right: ratio to the "
                  "first model (p50 latency; FLOPs per sample)"]
    return "\n".join(lines)


def distinct_names(paths: Sequence[str]) -> dict[str, str]:
    """How each model is shown: its file name when the names differ, else the
    path as given (two `m.onnx` in different folders must not look the same)."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    names = [Path(p).name for p in unique]
    if len(set(names)) == len(names):
        return dict(zip(unique, names))
    return {p: p for p in unique}
