"""Repair: the least-squares fit, the cuts of a removal set, and repaired
models equal to an independent computation (the original bypassed by
`graphs.rewire`, each reported map applied in numpy)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphs import example_input, exported, repaired_reference, run
from sglp_onnx.cli import main
from sglp_onnx.repair import LinearFit, cuts_of
from sglp_onnx.repair.fit import as_rows
from sglp_onnx.units.discovery import PrunableUnit


def test_full_fit_recovers_a_linear_map_from_streamed_batches():
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((6, 6)), rng.standard_normal(6)
    fit = LinearFit(6, "full")
    for _ in range(3):
        x = rng.standard_normal((20000, 6))
        fit.update(x.astype(np.float32), (x @ weight + bias).astype(np.float32))
    got_w, got_b, error = fit.solve()
    np.testing.assert_allclose(got_w, weight, atol=2e-3)
    np.testing.assert_allclose(got_b, bias, atol=2e-3)
    assert error < 1e-4 and fit.n == 60000


def test_few_rows_pull_the_map_towards_the_plain_bypass_not_towards_zero():
    # 8 rows for 16 channels: least squares alone would fit the noise exactly.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 16))
    fit = LinearFit(16, "full")
    fit.update(x, x + 0.01 * rng.standard_normal((8, 16)))
    weight, bias, _ = fit.solve()
    assert np.abs(weight - np.eye(16)).max() < 0.05 and np.abs(bias).max() < 0.05


@pytest.mark.parametrize("rows", [30, 70])  # fewer rows than half the channels: solved in the rows' dual
def test_full_fit_is_the_ridge_solution_towards_the_identity_however_it_is_solved(rows):
    from sglp_onnx.repair.fit import RIDGE, SCARCITY

    rng = np.random.default_rng(4)
    c = 80
    x = 2 * rng.standard_normal((rows, c)) + 1
    y = x @ (0.2 * rng.standard_normal((c, c))) + x + 0.5
    fit = LinearFit(c, "full")
    fit.update(x[:rows // 2], y[:rows // 2])
    fit.update(x[rows // 2:], y[rows // 2:])
    weight, bias, error = fit.solve()
    # The closed form in the primal: (Xc'Xc + r I) W = Xc'Yc + r I, b = mean_y - mean_x W.
    xc, yc = x - x.mean(0), y - y.mean(0)
    ridge = (RIDGE + SCARCITY * c / rows) * np.trace(xc.T @ xc) / c
    want = np.linalg.solve(xc.T @ xc + ridge * np.eye(c), xc.T @ yc + ridge * np.eye(c))
    np.testing.assert_allclose(weight, want, atol=1e-9)
    np.testing.assert_allclose(bias, y.mean(0) - x.mean(0) @ want, atol=1e-9)
    residual = ((y - x @ want - bias) ** 2).sum() / ((y - x) ** 2).sum()
    assert error == pytest.approx(residual, rel=1e-9)


def test_diagonal_fit_recovers_a_scale_and_bias_and_scores_against_the_bypass():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 4))
    y = x * np.array([2.0, 0.5, -1.0, 1.0]) + np.array([1.0, 0.0, 3.0, -2.0]) + 0.1 * rng.standard_normal((4000, 4))
    fit = LinearFit(4, "diagonal")
    fit.update(x, y)
    scale, bias, error = fit.solve()
    np.testing.assert_allclose(scale, [2.0, 0.5, -1.0, 1.0], atol=0.02)
    np.testing.assert_allclose(bias, [1.0, 0.0, 3.0, -2.0], atol=0.02)
    # The map's squared residual (noise only) over the bypass's (y ~ x).
    bypass = ((y - x) ** 2).sum()
    residual = ((y - x * scale - bias) ** 2).sum()
    assert error == pytest.approx(residual / bypass, rel=1e-6) and error < 0.01


def test_rows_keep_channels_and_drop_padding():
    maps = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    rows = as_rows(maps, 1)
    assert rows.shape == (8, 3) and list(rows[1]) == [1.0, 5.0, 9.0]
    hidden = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert as_rows(hidden, 2, mask).shape == (5, 3)


def _unit(k: int, entry: str, exit_: str) -> PrunableUnit:
    return PrunableUnit(name=f"u{k}", scope="", entry=entry, exit=exit_, add_nodes=())


def test_consecutive_removed_units_make_one_cut():
    # u0: a -> b, u1: b -> c, u2: c -> d, u3: e -> f (after a downsampling block), u4: f -> g
    units = [_unit(0, "a", "b"), _unit(1, "b", "c"), _unit(2, "c", "d"), _unit(3, "e", "f"), _unit(4, "f", "g")]
    cuts = cuts_of(units, [4, 0, 1, 3])
    assert [(c.units, c.entry, c.exit) for c in cuts] == [((0, 1), "a", "c"), ((3, 4), "e", "g")]
    assert [c.units for c in cuts_of(units, [0, 2])] == [(0,), (2,)]


def _stage(tmp_path: Path, name: str, exporter: str, n: int = 40) -> Path:
    _, path = exported(name, exporter)
    model = tmp_path / "model.onnx"
    shutil.copy(path, model)
    np.savez(tmp_path / "model.calib.npz", input=example_input(name, n, seed=3))
    return model


@pytest.mark.parametrize(("name", "exporter", "args"), [
    ("resnet", "legacy", ["--criterion", "last", "--remove", "2"]),
    ("resnet", "dynamo", ["--criterion", "random", "--remove", "3", "--seed", "1"]),
    ("transformer", "dynamo", ["--criterion", "last", "--remove", "2"]),
    ("transformer", "legacy", ["--criterion", "random", "--remove", "2", "--seed", "2", "--repair", "diagonal"]),
])
def test_repaired_model_equals_an_independent_computation(tmp_path, capsys, name, exporter, args):
    model = _stage(tmp_path, name, exporter)
    assert main(["-q", "compress", str(model), *args]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "model.pruned.json").read_text())
    repair = report["repair"]
    assert repair["applied"], repair["reason"]
    assert repair["cuts"] and repair["fidelity_without_repair"]["score"] > report["fidelity"]["score"]
    removed = sum(u["removed"] for u in report["units"])
    assert sum(len(c["units"]) for c in repair["cuts"]) == removed
    pruned = onnx.load(str(tmp_path / "model.pruned.onnx"))
    x = {"input": example_input(name, 5, seed=21)}
    expected = repaired_reference(onnx.load(str(model)), report, pruned, x)
    for got, want in zip(run(pruned, x), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_repair_none_writes_the_plain_bypass(tmp_path, capsys):
    model = _stage(tmp_path, "resnet", "legacy")
    assert main(["-q", "compress", str(model), "--criterion", "last", "--remove", "2", "--repair", "none"]) == 0
    report = json.loads((tmp_path / "model.pruned.json").read_text())
    assert report["repair"] is None
    names = {i.name for i in onnx.load(str(tmp_path / "model.pruned.onnx")).graph.initializer}
    assert not any(n.startswith("sglp_repair") for n in names)


def test_a_prefix_session_runs_only_what_the_asked_tensors_need_and_computes_them_alike():
    from sglp_onnx.graph.runtime import prefix_model, prefix_session, session_with_outputs
    from tiny_graphs import calibration, residual_mlp

    model = residual_mlp(4, 8)
    names = [n.output[0] for n in model.graph.node]
    early = names[len(names) // 3]
    prefix = prefix_model(model, [early])
    assert prefix is not None and len(prefix.graph.node) < len(model.graph.node)
    assert [o.name for o in prefix.graph.output] == [early]
    feed = {k: v for k, v in calibration(8, 8).items() if k in {i.name for i in model.graph.input}}
    whole = session_with_outputs(model, [early]).run([early], feed)[0]
    np.testing.assert_array_equal(prefix_session(model, [early]).run([early], feed)[0], whole)
    assert prefix_model(model, [model.graph.output[0].name]) is None  # nothing to drop: the model itself


def test_a_prefix_read_through_a_removal_computes_what_the_pruned_model_computes():
    # The repair fits read each cut's entry from the pruned model's prefix
    # without rewriting the whole graph (`bypassed_prefix`): it must equal the
    # prefix of the model `remove_units` writes, up to a cut after the removed units.
    from sglp_onnx.graph.runtime import prefix_session, session_with_outputs
    from sglp_onnx.surgery.remove import bypassed_prefix, remove_units
    from graphs import discover
    from tiny_graphs import calibration, residual_mlp

    model = residual_mlp(6, 8)
    data = calibration(8, 8)
    feed = {k: v for k, v in data.items() if k in {i.name for i in model.graph.input}}
    units = discover(model, feed)
    gone = [units[1], units[2]]
    entry = units[4].entry
    prefix = bypassed_prefix(model, gone, [entry])
    assert prefix is not None and len(prefix.graph.node) < len(model.graph.node)
    quick = session_with_outputs(prefix, [entry])
    pruned = prefix_session(remove_units(model, gone), [entry])
    full = prefix_session(model, [entry])
    np.testing.assert_allclose(quick.run([entry], feed)[0], pruned.run([entry], feed)[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(quick.run([entry], feed)[0], full.run([entry], feed)[0])  # the removal shows
