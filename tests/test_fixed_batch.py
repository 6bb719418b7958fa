"""Models exported with a fixed batch dimension (often 1) are calibrated,
validated and evaluated in batches of exactly that size."""

from __future__ import annotations

import json

import numpy as np
import torch

from graphs import TinyResNet, image_batch, rewire, run, seeded
from sglp_onnx.cli import main


def _fixed_batch_model(tmp_path, batch: int):
    model = seeded(TinyResNet)
    path = tmp_path / "fixed.onnx"
    # No dynamic axes: the batch dimension is the number in the example.
    torch.onnx.export(model, (torch.from_numpy(image_batch(batch)),), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"])
    np.savez(tmp_path / "fixed.calib.npz", input=image_batch(10, seed=1), labels=np.arange(10) % 4)
    return path


def test_batch_fixed_to_one_compresses_and_matches_rewiring(tmp_path, capsys):
    path = _fixed_batch_model(tmp_path, 1)
    assert main(["compress", str(path), "--remove", "2", "--batch-size", "8", "--repair", "none"]) == 0
    report = json.loads((tmp_path / "fixed.pruned.json").read_text())
    assert any("fixed to 1" in note for note in report["notes"])
    removed = [(u["entry"], u["exit"]) for u in report["units"] if u["removed"]]
    assert len(removed) == 2
    import onnx

    x = image_batch(1, seed=5)
    expected = run(rewire(onnx.load(str(path)), removed), x)[0]
    assert np.array_equal(run(tmp_path / "fixed.pruned.onnx", x)[0], expected)


def test_fixed_batch_drops_a_partial_last_batch_in_eval(tmp_path, capsys):
    path = _fixed_batch_model(tmp_path, 4)
    np.savez(tmp_path / "test.npz", input=image_batch(10, seed=2), labels=np.arange(10) % 4)
    assert main(["eval", str(path), "--data", str(tmp_path / "test.npz"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics[0]["samples"] == 8 and metrics[0]["accuracy"] is not None


def test_fewer_samples_than_the_fixed_batch_is_a_usage_error(tmp_path, capsys):
    path = _fixed_batch_model(tmp_path, 4)
    np.savez(tmp_path / "fixed.calib.npz", input=image_batch(3, seed=1))
    assert main(["compress", str(path), "--remove", "1"]) == 2
    assert "fixed to 4" in capsys.readouterr().err
    assert not (tmp_path / "fixed.pruned.onnx").exists()


def test_a_fixed_batch_keeps_every_row_in_the_side_by_side_candidate_runs(tmp_path, monkeypatch, capsys):
    """The side-by-side session runs the copies of units it does not score on
    one sample only where the batch may change: a fixed batch may be computed
    with (a Reshape to it), so there every copy runs the fixed batch."""
    import sglp_onnx.evidence.gated_runner as gated_runner
    import sglp_onnx.surgery.gating as gating

    path = _fixed_batch_model(tmp_path, 4)
    np.savez(tmp_path / "fixed.calib.npz", input=image_batch(96, seed=1))
    rows = []
    make = gated_runner.make_session

    class Watched:
        def __init__(self, session):
            self.session = session

        def run(self, names, feed):
            rows.extend(len(v) for k, v in feed.items() if k.startswith(gating.COPY_PREFIX) and v.ndim)
            return self.session.run(names, feed)

        def __getattr__(self, name):
            return getattr(self.session, name)

    def watched(model, provider="cpu", **kwargs):
        session = make(model, provider, **kwargs)
        return Watched(session) if any(i.name.startswith(gating.COPY_PREFIX) for i in model.graph.input) else session

    monkeypatch.setattr(gated_runner, "SUFFIX_BUDGET_BYTES", 0)
    monkeypatch.setattr(gated_runner, "make_session", watched)
    assert main(["-q", "compress", str(path), "--remove", "2", "--repair", "none"]) == 0, capsys.readouterr().err
    assert rows and set(rows) == {4}


def _one_at_a_time_model(tmp_path):
    """A residual MLP whose batch is declared dynamic but that runs one sample
    at a time only (a Reshape to [1, width] first), as ONNX Runtime runs some
    exports (torch's opset-23 RotaryEmbedding, in ONNX Runtime 1.31)."""
    import onnx
    from onnx import helper, numpy_helper

    from tiny_graphs import calibration, residual_mlp

    model = residual_mlp(4, 8)
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["input.one" if x == "input" else x for x in node.input]
    graph.initializer.append(numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "one_row"))
    graph.node.insert(0, helper.make_node("Reshape", ["input", "one_row"], ["input.one"], name="one/Reshape"))
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "one.onnx"
    onnx.save_model(model, str(path))
    np.savez(tmp_path / "one.calib.npz", **calibration(16, 8))
    return path


def test_batch_size_one_is_every_run_s_size_even_the_probes(tmp_path, capsys):
    """--batch-size 1 bounds every run, the discovery probe and the
    repair-aware search's probe included: a model that runs one sample at a
    time is pruned (and equals the rewiring); with the default batch size it
    is refused in one line."""
    import onnx

    path = _one_at_a_time_model(tmp_path)
    assert main(["compress", str(path), "--remove", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not run in ONNX Runtime" in err and "it runs one sample at a time: pass --batch-size 1" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "one.pruned.onnx").exists()
    assert main(["compress", str(path), "--remove", "2", "--batch-size", "1"]) == 0
    assert main(["compress", str(path), "--remove", "2", "--batch-size", "1", "--repair", "none",
                 "-o", str(tmp_path / "plain.onnx")]) == 0
    report = json.loads((tmp_path / "plain.json").read_text())
    removed = [(u["entry"], u["exit"]) for u in report["units"] if u["removed"]]
    assert len(removed) == 2
    x = image_batch(1, shape=(8,), seed=5)
    expected = run(rewire(onnx.load(str(path)), removed), x)[0]
    assert np.array_equal(run(tmp_path / "plain.onnx", x)[0], expected)
    repaired = json.loads((tmp_path / "one.pruned.json").read_text())
    assert repaired["fidelity"]["score"] <= report["fidelity"]["score"]
