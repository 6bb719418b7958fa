"""The calibration pass streams: 8x the calibration samples may cost at most
1.3x the peak resident memory and at most linear work.

Each size runs `analyze` on the 1-D CNN in a fresh process (see
benchmarks/streaming.py); sizes are interleaved and repeated and the best run
per size kept. Work is counted (ONNX Runtime session runs), never timed: a
busy or slow machine cannot decide the outcome.

The runs use a 64M activation budget: the measured-damage search keeps runs
it reuses while they fit a share of the budget (faster, and still bounded),
so with the 768M default a larger set may fill up to that share; a small
budget shows that nothing else grows with the samples.
"""

from __future__ import annotations

import pytest

from benchmarks.streaming import measure_in_subprocess

MEMORY_FACTOR = 1.3
BUDGET = "64M"


def best_of_interleaved(sizes: list[int], repeats: int, **options) -> dict[int, dict]:
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            runs[n].append(measure_in_subprocess(n, activation_budget=BUDGET, **options))
    return {n: {k: min(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}


def assert_streams(small: dict, large: dict, growth: int) -> None:
    assert large["rows"] == growth * small["rows"]
    assert large["peak_rss_mib"] <= MEMORY_FACTOR * small["peak_rss_mib"], (small, large)
    # Linear work: at most `growth` times the session runs (fixed costs such as the probe make it less).
    assert small["session_runs"] > 0
    assert large["session_runs"] <= growth * small["session_runs"], (small, large)


def test_calibration_pass_streams():
    # 65 and 520 samples: 52 and 416 selection samples (every 5th is held out), exactly 8x.
    best = best_of_interleaved([65, 520], repeats=2, batch_size=64, torch_model=False)
    assert_streams(best[65], best[520], 8)


@pytest.mark.slow
@pytest.mark.parametrize("torch_model", [False, True], ids=["cka", "cka+gradnorm"])
def test_calibration_pass_streams_at_2048_samples(torch_model):
    best = best_of_interleaved([260, 2080], repeats=2, batch_size=64, torch_model=torch_model)  # 208, 1664 selected
    assert_streams(best[260], best[2080], 8)
