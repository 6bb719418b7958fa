"""The activation budget: stages cut their batches into runs whose
activations fit it, with the same measurements where they are exact sums."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sglp_onnx import analyze
from sglp_onnx.cli import main
from sglp_onnx.errors import UserError
from sglp_onnx.evidence.budget import ActivationBudget, parse_size
from tiny_graphs import write_model_and_calibration

RADIO_MODEL = Path(__file__).resolve().parents[1] / "models" / "cnn1d_radio.onnx"  # units of three FLOP sizes


@pytest.mark.parametrize("text, size", [("1G", 2**30), ("512M", 512 * 2**20), ("1.5GiB", 3 * 2**29),
                                        ("65536", 65536), ("64k", 65536), (" 2 G ", 2 * 2**30)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1X", "-1G", "1 GB extra", "100", "63K"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(UserError, match="--activation-budget"):
        parse_size(text)


def test_rows_fit_the_budget_and_never_fall_below_one():
    budget = ActivationBudget(1000, {"a": 100, "b": 50})
    assert budget.held(["a", "b"], working=0) == 300  # returned tensors: ONNX Runtime's buffer and numpy's copy
    assert budget.held(["a"], copies={"b": 2}, working=1) == 400
    assert budget.rows(150, 64) == 6 and budget.rows(10, 64) == 64 and budget.rows(5000, 64) == 1
    assert budget.rows(150, 64, share=0.5) == 3


def test_a_bad_budget_is_one_line_and_exit_2_before_any_work(ws, capsys):
    code = main(["compress", str(ws.model), "-o", str(ws.output), "--activation-budget", "lots"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--activation-budget must be a size" in err, err
    assert not list(ws.out.iterdir())


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A residual MLP of 64 features and 64 samples: about 2 KB per sample in a pass."""
    return write_model_and_calibration(tmp_path_factory.mktemp("wide"), width=64, n_samples=80)[0]


def test_a_tight_budget_cuts_the_runs_and_chooses_the_same_units(wide):
    roomy = analyze(wide, remove=2, suggest=None, batch_size=64)
    tight = analyze(wide, remove=2, suggest=None, batch_size=64, activation_budget="64K")
    calibration = tight.report["calibration"]
    assert calibration["activation_budget"] == 65536 and calibration["batch_size"] == 64
    assert 1 <= calibration["samples_per_run"] < 64
    assert roomy.report["calibration"]["samples_per_run"] == 64
    assert any("samples at a time" in note and "--activation-budget" in note for note in tight.report["notes"])
    # The measured damage is a sum over samples: the runs' size does not change the choice.
    assert tight.selection.removed == roomy.selection.removed
    np.testing.assert_allclose(tight.selection.importance, roomy.selection.importance, rtol=1e-4, atol=1e-9)
    assert tight.report["fidelity"]["score"] == pytest.approx(roomy.report["fidelity"]["score"], rel=1e-4)


# -- the default search's successive halving --------------------------------------------------------------------

def _calib(n: int, fixed: int | None = None):
    from sglp_onnx.files.calibration import CalibrationSet

    return CalibrationSet(inputs={"x": np.arange(n, dtype=np.float32)[:, None]}, fixed_batch=fixed)


def test_halving_rounds_double_and_end_on_every_sample():
    from sglp_onnx.selection.criteria.search import SampleOrder

    assert SampleOrder(_calib(205), seed=0).rounds(32, 64) == [32, 64, 128, 205]
    assert SampleOrder(_calib(63), seed=0).rounds(32, 64) == [63]  # fewer than two rounds: one
    fixed = SampleOrder(_calib(205, fixed=8), seed=0)
    assert fixed.n == 200 and fixed.rounds(30, 64) == [32, 64, 128, 200]


def test_pieces_cut_alike_at_round_bounds_and_cover_each_sample_once():
    from sglp_onnx.selection.criteria.search import SampleOrder

    order = SampleOrder(_calib(205), seed=3)
    bounds = order.rounds(32, 50)
    every = [(a, len(feed["x"])) for a, feed in order.pieces(0, 205, 50, bounds)]
    assert [a for a, _ in every] == [0, 32, 64, 114, 128, 178]  # never across a bound
    assert all(n <= 50 for _, n in every) and sum(n for _, n in every) == 205
    later = [(a, len(feed["x"])) for a, feed in order.pieces(64, 205, 50, bounds)]
    assert later == every[2:]  # a run kept by its first sample is the same run
    seen = np.concatenate([feed["x"][:, 0] for _, feed in order.pieces(0, 205, 50, bounds)])
    assert sorted(seen) == list(range(205)) and list(seen) != list(range(205))  # a shuffle, each sample once


def test_the_greedy_scores_by_successive_halving_for_fewer_passes(tmp_path):
    from tiny_graphs import write_model_and_calibration

    model, _ = write_model_and_calibration(tmp_path, n_blocks=6, n_samples=320, width=16)
    halved = analyze(model, criterion="damage-greedy", remove=2, suggest=None, repair="none")
    notes = " ".join(halved.selection.notes)
    assert "successive halving over 32, 64, 128, 256 samples" in notes, notes
    # Every candidate of a step on every sample would be 6 + 5 partial passes.
    assert halved.selection.passes["forward_partial"] < 6 + 5


def test_an_expensive_first_round_reads_fewer_samples_and_says_so(tmp_path, monkeypatch):
    import sglp_onnx.selection.criteria.damage as damage
    from tiny_graphs import write_model_and_calibration

    model, _ = write_model_and_calibration(tmp_path, n_blocks=6, n_samples=320, width=16)
    usual = analyze(model, criterion="damage-greedy", remove=2, suggest=None, repair="none")
    units = usual.units
    per_sample = damage.first_round_flops(units)
    # The current run (every unit) plus each unit's partial pass (the units after it).
    assert per_sample == sum(u.flops for u in units) * 1 + sum(u.flops * k for k, u in enumerate(units))
    # A first round of 32 samples costs more than allowed, one of 16 too, one of 8 does not.
    monkeypatch.setattr(damage, "HALVING_FIRST_FLOPS", 8 * per_sample + 1)
    cheap = analyze(model, criterion="damage-greedy", remove=2, suggest=None, repair="none")
    notes = " ".join(cheap.selection.notes)
    assert "successive halving over 8, 16, 32, 64, 128, 256 samples" in notes, notes
    assert "first halving round reads 8 samples, not 32" in notes, notes
    assert cheap.selection.passes["forward_partial"] < usual.selection.passes["forward_partial"]
    assert "first halving round" not in " ".join(usual.selection.notes)
    # Never below HALVING_LEAST_SAMPLES, however expensive.
    monkeypatch.setattr(damage, "HALVING_FIRST_FLOPS", 1)
    least = analyze(model, criterion="damage-greedy", remove=2, suggest=None, repair="none")
    assert "halving over 8, 16," in " ".join(least.selection.notes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("environment, expected", [({}, "True"), ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "False")])
def test_measuring_sessions_return_freed_buffers_unless_the_user_set_the_threshold(environment, expected):
    # In a fresh process: the setting is process-wide and made once, with the first measuring session.
    code = "from sglp_onnx.graph.runtime import return_freed_buffers as r; print(r(), r())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | environment
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == [expected, expected]


def test_the_held_out_runner_exposes_no_unit_entries_once_the_search_is_released():
    # A graph output is kept through the whole run even when it is not fetched: the
    # runner that only measures outputs must not expose every unit's entry.
    from sglp_onnx.evidence import Context
    from sglp_onnx.units.discovery import find_units
    from tiny_graphs import calibration, residual_mlp

    model = residual_mlp(n_blocks=3)
    ctx = Context(model=model, units=find_units(model), calib=None)
    output = ctx.output_kind().output
    lean = ctx.output_runner()
    assert lean.exposed == [output] and ctx.output_runner() is lean
    feed = {"input": calibration(n=4)["input"]}
    assert lean.run(feed, {1})[output].shape[0] == 4
    with pytest.raises(ValueError, match="no unit entries"):
        lean.run(feed, set(), entries=True)
    searching = ctx.runner()  # a criterion's runner exposes the entries and serves outputs while it lives
    assert len(searching.exposed) == 1 + len(ctx.units) and ctx.output_runner() is searching
    ctx.release()
    assert ctx.output_runner() is not searching and ctx.output_runner().exposed == [output]


# -- releasing a stage's memory without a full collection each time ----------------------------------------------

def test_release_collects_only_what_a_cycle_still_holds(monkeypatch):
    import sglp_onnx.evidence.context as context_module
    from sglp_onnx.evidence import Context
    from tiny_graphs import residual_mlp

    collections = []
    monkeypatch.setattr(context_module.gc, "collect", lambda *a: collections.append(a) or 0)
    model = residual_mlp(n_blocks=2)

    class Search:  # what a criterion caches
        pass

    plain = Context(model=model, units=[], calib=None)
    plain.cache["search"], plain.cache["result"] = Search(), ([1], 0.5, 3)
    plain.release()
    assert collections == [] and plain.cache == {}
    cyclic = Context(model=model, units=[], calib=None)
    search = Search()
    search.itself = search  # freed only by the collector
    cyclic.cache["search"] = search
    del search
    cyclic.release()
    assert len(collections) == 1


def test_release_memory_collects_for_large_weights_only(monkeypatch):
    import gc

    from sglp_onnx.graph import runtime

    collections = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
    runtime.release_memory(runtime.COLLECT_WEIGHT_BYTES - 1)
    assert collections == []
    runtime.release_memory(runtime.COLLECT_WEIGHT_BYTES)
    runtime.release_memory()
    assert len(collections) == 2


@pytest.mark.parametrize("repair", [{"repair": "none"}, {}], ids=["plain", "default-repair"])
def test_no_search_outlives_analyze_with_per_flop_suggestions(monkeypatch, repair):
    # The suggestions' per-FLOP search runs on a copy of the context that it
    # holds: the copy's cache is cleared, so nothing waits for the collector
    # and releasing the context needs no full collection.
    import gc

    import sglp_onnx.evidence.context as context_module
    from sglp_onnx.selection.criteria.search import GreedySearch

    gc.collect()
    collections = []
    monkeypatch.setattr(context_module.gc, "collect", lambda *a: collections.append(a) or 0)
    gc.disable()
    try:
        result = analyze(RADIO_MODEL, remove=2, suggest=[0.2], **repair)
        assert result.report["suggestions"][0]["achievable"]
        assert collections == []
        assert not [o for o in gc.get_objects() if isinstance(o, GreedySearch)]
    finally:
        gc.enable()
