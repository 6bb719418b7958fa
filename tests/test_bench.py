"""`bench` and `sglp-onnx bench`: interleaved timing, statistics, ratios, inputs and errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sglp_onnx.tools.bench import BenchResult, bench, format_results, time_interleaved
from sglp_onnx.cli import main
from sglp_onnx.errors import UserError
from tiny_graphs import calibration, residual_mlp, write_model_and_calibration

WIDTH, CLASSES = 8, 3


def mlp_flops(blocks: int) -> int:
    """Two (width x width) matmuls per block plus the head, 2 FLOPs per multiply-accumulate."""
    return blocks * 2 * 2 * WIDTH * WIDTH + 2 * WIDTH * CLASSES


@pytest.fixture
def two_models(tmp_path):
    big, _ = write_model_and_calibration(tmp_path, n_blocks=4, name="big")
    small = tmp_path / "small.onnx"
    onnx.save_model(residual_mlp(2), str(small))
    return big, small


def test_results_per_model_and_batch_size_with_ratios_to_the_first(two_models):
    big, small = two_models
    results = bench([big, small], batch_sizes=[1, 8], runs=5, warmup=1)
    assert [(r.model, r.batch_size) for r in results] == [
        (str(big), 1), (str(small), 1), (str(big), 8), (str(small), 8)]
    for r in results:
        assert r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput == pytest.approx(r.batch_size / (r.p50_ms / 1e3))
        assert r.inputs.endswith("big.calib.npz") and r.threads == 1 and r.provider == "cpu"
    assert [r.flops for r in results[:2]] == [mlp_flops(4), mlp_flops(2)]
    assert [r.params for r in results[:2]] == [4 * 2 * WIDTH * WIDTH + WIDTH * CLASSES,
                                                2 * 2 * WIDTH * WIDTH + WIDTH * CLASSES]
    assert results[0].latency_ratio == 1.0 and results[0].flops_ratio == 1.0
    assert results[1].flops_ratio == pytest.approx(mlp_flops(2) / mlp_flops(4))
    assert results[3].latency_ratio == pytest.approx(results[3].p50_ms / results[2].p50_ms)
    assert results[0].file_size == big.stat().st_size
    table = format_results(results)
    assert "big.onnx" in table and "small.onnx" in table and "p99 ms" in table


def test_interleaving_alternates_and_rotates_the_first_model():
    calls: list[str] = []
    runners = [lambda name=name: calls.append(name) for name in "abc"]
    times, cpu_times = time_interleaved(runners, runs=3, warmup=2)
    assert calls[:6] == list("aabbcc")  # warm-up: each model on its own
    assert calls[6:] == list("abc" "bca" "cab")
    assert [len(t) for t in times] == [len(t) for t in cpu_times] == [3, 3, 3]


def test_inputs_come_from_data_then_sidecar_then_synthetic(tmp_path, two_models):
    big, small = two_models
    data = tmp_path / "other.npz"
    np.savez(data, **calibration(3, WIDTH))
    assert bench([small, big], runs=1, warmup=0, data=data)[0].inputs == str(data)
    # small.onnx has no sidecar; big.onnx (second) does: the first sidecar found serves both.
    assert bench([small, big], runs=1, warmup=0)[0].inputs.endswith("big.calib.npz")
    assert bench([small], runs=1, warmup=0)[0].inputs.startswith("synthetic")
    # A batch larger than the data repeats its samples.
    assert bench([small], runs=1, warmup=0, data=data, batch_sizes=7)[0].batch_size == 7


@pytest.mark.parametrize("kwargs, message", [
    ({"runs": 0}, "--runs"),
    ({"warmup": -1}, "--warmup"),
    ({"batch_sizes": [0]}, "--batch-size"),
    ({"threads": -2}, "--threads"),
    ({"provider": "tpu"}, "--provider"),
])
def test_bad_options_are_user_errors(two_models, kwargs, message):
    with pytest.raises(UserError, match=message):
        bench([two_models[0]], **kwargs)


def test_fixed_batch_model_asks_for_its_batch_size(tmp_path):
    model = residual_mlp(2)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    path = tmp_path / "fixed.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(UserError, match="--batch-size 4"):
        bench([path], batch_sizes=1, runs=1)


def test_cli_json_and_exit_codes(two_models, capsys):
    big, small = two_models
    assert main(["bench", str(big), str(small), "--runs", "3", "--warmup", "0", "--batch-size", "2",
                 "--threads", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows[0]) == set(BenchResult.__dataclass_fields__)
    assert [r["batch_size"] for r in rows] == [2, 2] and rows[0]["threads"] == 0
    assert main(["bench", str(big), "--runs", "0"]) == 2
    assert "--runs must be at least 1" in capsys.readouterr().err
    assert main(["bench", str(big.with_name("missing.onnx"))]) == 2


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_unusable_gpu_provider_is_one_line_and_exit_2(two_models, provider, capfd):
    import onnxruntime as ort

    from sglp_onnx.graph.runtime import make_session

    try:
        make_session(str(two_models[0]), provider)
        pytest.skip(f"the {provider} provider works on this machine")
    except UserError:
        pass
    capfd.readouterr()
    assert main(["bench", str(two_models[0]), "--provider", provider, "--runs", "1"]) == 2
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and provider in captured.err
    assert ort.get_available_providers()  # the global logger was restored, ORT still usable


def test_bench_times_sessions_that_pack_their_weights_as_a_deployment_does(two_models, monkeypatch):
    # The measuring stages' sessions do not pack weights ahead (graph.runtime.make_session); bench's do.
    import sglp_onnx.tools.bench as bench_module

    made = []
    real = bench_module.make_session

    def recording(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_module, "make_session", recording)
    bench(list(two_models), batch_sizes=[1], runs=2, warmup=1)
    assert len(made) == 2 and all(kwargs.get("prepack") is True and kwargs.get("arena") is True for kwargs in made)
