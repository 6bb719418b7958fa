"""Criteria on tiny models: the zeroed block every sensible criterion removes
first, CKA removal against brute force, gradient criteria refusing without a
torch model, and `--target-flops` meeting its target."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

import criteria_models as cm
from sglp_onnx.cli import main
from sglp_onnx.evidence import Context
from sglp_onnx.selection.criteria import get_criterion
from sglp_onnx.selection.criteria.cka_removal import GreedyCKA, final_representation
from sglp_onnx.surgery.gating import gated_model
from sglp_onnx.errors import UserError
from sglp_onnx.files.model_files import load_model
from sglp_onnx.pipeline import analyze
from sglp_onnx.evidence.activations import as_samples
from sglp_onnx.graph.runtime import make_session, session_with_outputs
from sglp_onnx.evidence.similarity import MinibatchCKA
from sglp_onnx.surgery.remove import remove_units, substitutions
from tiny_graphs import residual_mlp

ROOT = Path(__file__).resolve().parents[1]
RADIO = ROOT / "models" / "cnn1d_radio.onnx"
ZEROED_NAME = f"blocks.{cm.ZEROED}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The two zeroed-block models exported with their calibration sidecars."""
    path = tmp_path_factory.mktemp("criteria")
    cm.write_model(cm.last_zeroed_mlp, path, "last_zeroed")
    cm.write_model(cm.dead_branch_mlp, path, "dead_branch")
    return path


def context(analysis, **kwargs) -> Context:
    """A fresh criterion context on the units and calibration data of an analysis."""
    return Context(model=analysis.model, units=analysis.units, calib=analysis.calib,
                   batch_size=kwargs.pop("batch_size", 16), **kwargs)


# -- the block whose branch is zeroed goes first ---------------------------

@pytest.mark.parametrize("criterion", ["sglp", "cka-removal", "block-influence"])
def test_gradient_free_criteria_remove_the_zeroed_block_first(folder, criterion):
    # Only the block's last weights are zero: exit == entry exactly.
    result = analyze(folder / "last_zeroed.onnx", criterion=criterion, remove=1, suggest=None)
    assert [result.units[i].name for i in result.selection.removed] == [ZEROED_NAME]
    assert result.selection.importance[cm.ZEROED] == pytest.approx(0.0, abs=1e-9)
    assert min(result.selection.importance) == result.selection.importance[cm.ZEROED]


@pytest.mark.parametrize("criterion", ["sglp", "gradnorm"])
def test_gradient_criteria_remove_the_dead_block_first(folder, criterion):
    # The whole branch is zero, so every gradient of its weights is zero too.
    # SGLP with one segment is the global GradNorm ranking; with automatic K
    # the dead block is the least important of its own segment.
    for segments in ([1, None] if criterion == "sglp" else [None]):
        result = analyze(folder / "dead_branch.onnx", criterion=criterion, remove=1, segments=segments,
                         torch_model="criteria_models:dead_branch_mlp", suggest=None)
        importance = result.selection.importance
        assert importance[cm.ZEROED] == 0.0
        assert result.selection.importance_kind == "GradNorm"
        if segments == 1 or criterion == "gradnorm":
            assert [result.units[i].name for i in result.selection.removed] == [ZEROED_NAME]
        else:
            segment = next(b for b in result.selection.segments if b[0] <= cm.ZEROED < b[1])
            assert min(importance[segment[0]:segment[1]]) == 0.0


def test_gradnorm_of_a_block_with_only_its_last_weights_zeroed_is_not_zero(folder):
    # The last layer's weight gradient is (output gradient) x (hidden activation):
    # zeroing the weights alone leaves it nonzero, so GradNorm does not see
    # that the block does nothing (see docs/criteria.md).
    result = analyze(folder / "last_zeroed.onnx", criterion="gradnorm", remove=1,
                     torch_model="criteria_models:last_zeroed_mlp", suggest=None)
    assert result.selection.importance[cm.ZEROED] > 0.0


def test_zeroed_conv_block_goes_first_for_cka_removal_and_block_influence(tmp_path):
    # The CNN case: a BasicBlock whose last BN has gamma = beta = 0 computes
    # relu(x + 0) = x (x is itself a ReLU output).
    import torch

    import graphs

    model = graphs.seeded(graphs.TinyResNet)
    with torch.no_grad():
        model.layer1[1].bn2.weight.zero_()
        model.layer1[1].bn2.bias.zero_()
    x = graphs.image_batch(48, seed=3)
    graphs.export(model, x[:2], tmp_path / "r.onnx", "legacy")
    np.savez(tmp_path / "r.calib.npz", input=x)
    for criterion in ("cka-removal", "block-influence", "sglp"):
        result = analyze(tmp_path / "r.onnx", criterion=criterion, remove=1, suggest=None)
        assert [result.units[i].scope for i in result.selection.removed] == ["layer1.1"], criterion


# -- CKA removal --------------------------------------------------------------

def brute_force_single_removal(analysis, batch_size: int) -> np.ndarray:
    """CKA between the original's final representation and each unit-removed network's,
    every candidate written out by the real surgery and run in its own session."""
    model, calib = analysis.model, analysis.calib
    rep, _ = final_representation(model)

    def rows(session, name):
        out = []
        for feed, _ in calib.batches(batch_size):
            out.append(as_samples(session.run([name], feed)[0], token_level=False))
        return out

    reference = rows(session_with_outputs(model, [rep]), rep)
    scores = []
    for unit in analysis.units:
        pruned = remove_units(model, [unit])
        name = substitutions([unit]).get(rep, rep)
        cka = MinibatchCKA(2)
        for ref, got in zip(reference, rows(session_with_outputs(pruned, [name]), name)):
            cka.update([ref, got])
        scores.append(cka.result()[0, 1])
    return np.array(scores)


def test_cka_removal_matches_brute_force_for_one_removal(folder):
    analysis = analyze(folder / "last_zeroed.onnx", criterion="cka-removal", remove=1, suggest=None,
                       batch_size=16)
    expected = brute_force_single_removal(analysis, batch_size=16)
    got = 1.0 - np.array(analysis.selection.importance)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert analysis.selection.removed == [int(np.argmax(expected))]


def test_cka_removal_brute_force_on_a_random_mlp(tmp_path):
    # No zeroed block: the winner is decided by the numbers alone.
    import onnx

    onnx.save(residual_mlp(n_blocks=5, seed=4), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.calib.npz", input=rng.standard_normal((40, 8)).astype(np.float32))
    analysis = analyze(tmp_path / "m.onnx", criterion="cka-removal", remove=1, suggest=None, batch_size=16)
    expected = brute_force_single_removal(analysis, batch_size=16)
    np.testing.assert_allclose(1.0 - np.array(analysis.selection.importance), expected, atol=1e-6)
    assert analysis.selection.removed == [int(np.argmax(expected))]


def test_cka_removal_suffix_runs_equal_full_runs(folder):
    analysis = analyze(folder / "last_zeroed.onnx", criterion="last", remove=1, suggest=None)
    L = len(analysis.units)
    fast = GreedyCKA(context(analysis)).extend(L - 1)
    slow = GreedyCKA(context(analysis), use_suffix=False).extend(L - 1)
    assert fast.order == slow.order
    np.testing.assert_allclose(fast.step_cka, slow.step_cka, atol=1e-6)
    # Greedy CKA after k removals can only be compared, not ordered, but the
    # first step's winner is the zeroed block with CKA 1.
    assert fast.order[0] == cm.ZEROED and fast.step_cka[0] == pytest.approx(1.0, abs=1e-9)
    assert slow.full_passes == sum(1 + (L - k) for k in range(L - 1))
    assert fast.full_passes == L - 1 and fast.suffix_passes == sum(L - k for k in range(L - 1))


def test_cka_removal_is_incremental_over_n(folder):
    analysis = analyze(folder / "last_zeroed.onnx", criterion="last", remove=1, suggest=None)
    ctx = context(analysis)
    criterion = get_criterion("cka-removal")
    one = criterion.select(ctx, 1)
    three = criterion.select(ctx, 3)
    again = criterion.select(ctx, 2)
    L = len(analysis.units)
    assert set(one.removed) <= set(again.removed) <= set(three.removed)
    assert len(three.removed) == 3
    # The order was extended, never recomputed: 3 greedy steps in all.
    assert three.passes == again.passes == {"forward": 3 + L + (L - 1) + (L - 2), "forward_full": 3,
                                            "forward_partial": L + (L - 1) + (L - 2)}
    assert any("forward passes" in note for note in three.notes)


def test_gated_model_computes_what_surgery_produces(folder):
    analysis = analyze(folder / "last_zeroed.onnx", criterion="last", remove=1, suggest=None)
    model, units = analysis.model, analysis.units
    gated, gates = gated_model(model, units)
    session = make_session(gated)
    x = analysis.calib.first(16)
    for removed in ([], [1], [1, 2], [0, 4], [0, 1, 3, 4]):
        feed = {**x, **{g: np.array(k in removed) for k, g in enumerate(gates)}}
        got = session.run(None, feed)[0]
        expected = make_session(remove_units(model, [units[k] for k in removed])).run(None, x)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_float_gates_run_as_arithmetic_and_give_the_where_gates_values_bit_for_bit(folder):
    """The runner's sessions gate float32 values by `exit * (1 - s) + entry * s`
    (what ONNX Runtime's convolution layouts run through); the values are the
    `Where` gates' exactly. Other types, or a type shape inference does not
    know, keep their Where."""
    import copy

    from sglp_onnx.evidence.gated_runner import GatedRunner
    from sglp_onnx.surgery.gating import arithmetic_gates

    analysis = analyze(folder / "last_zeroed.onnx", criterion="last", remove=1, suggest=None)
    model, units = analysis.model, analysis.units
    output = model.graph.output[0].name
    runner = GatedRunner(model, units, [output])
    assert not [n for n in runner.gated.graph.node if n.op_type == "Where"]
    where, gates = gated_model(model, units)
    entries = [u.entry for u in units]
    with_where = session_with_outputs(where, [output, *entries])
    x = analysis.calib.first(16)
    for removed in ([], [1], [1, 2], [0, 4], [0, 1, 3, 4]):
        got = runner.run(x, set(removed), entries=True)
        expected = with_where.run([output, *entries], {**x, **{g: np.array(k in removed) for k, g in enumerate(gates)}})
        for name, value in zip([output, *entries], expected):
            np.testing.assert_array_equal(got[name], value)
    exits = {u.exit for u in units}
    for dtypes in ({e: onnx.TensorProto.FLOAT16 for e in exits}, {}):
        kept = copy.deepcopy(where)
        assert arithmetic_gates(kept, dtypes) == 0
        assert sum(n.op_type == "Where" for n in kept.graph.node) == len(units)


def test_final_representation_is_the_head_input():
    model = residual_mlp(n_blocks=3)
    rep, rule = final_representation(model)
    assert rep == "blocks.2.out" and "head/MatMul" in rule
    radio_rep, radio_rule = final_representation(load_model(RADIO))
    radio = load_model(RADIO)
    head = next(n for n in radio.graph.node if radio_rep in n.input)
    assert head.op_type == "Gemm" and "Gemm" in radio_rule


def test_final_representation_falls_back_to_the_first_output():
    from onnx import TensorProto, helper

    from tiny_graphs import make_model

    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Add", ["x", "y"], ["out"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])], [])
    rep, rule = final_representation(model)
    assert rep == "out" and "no Gemm/MatMul/Conv head" in rule


def test_cka_removal_without_calibration_data_is_a_user_error():
    model = residual_mlp(n_blocks=3)
    from sglp_onnx.units.discovery import find_units

    ctx = Context(model=model, units=find_units(model), calib=None)
    with pytest.raises(UserError, match="calibration data"):
        get_criterion("cka-removal").select(ctx, 1)


# -- gradients need the torch model; the rest work on a bare ONNX file ------------

@pytest.mark.parametrize("criterion", ["gradnorm"])
def test_gradient_criteria_refuse_without_a_torch_model(folder, criterion, capsys):
    with pytest.raises(UserError, match="--torch-model"):
        analyze(folder / "last_zeroed.onnx", criterion=criterion, remove=1, suggest=None)
    code = main(["compress", str(folder / "last_zeroed.onnx"), "--criterion", criterion, "--remove", "1",
                 "-o", str(folder / "refused.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--torch-model" in err
    assert not (folder / "refused.onnx").exists()


@pytest.mark.parametrize("criterion", ["sglp", "cka-removal", "block-influence", "last", "random"])
def test_gradient_free_criteria_work_on_a_bare_onnx_file(folder, criterion, tmp_path):
    result = main(["-q", "compress", str(folder / "last_zeroed.onnx"), "--criterion", criterion, "--remove", "2",
                   "-o", str(tmp_path / "out.onnx")])
    assert result == 0
    pruned = load_model(tmp_path / "out.onnx")
    assert [i.name for i in pruned.graph.input] == ["input"]


def test_sglp_without_torch_model_says_it_fell_back(folder):
    result = analyze(folder / "last_zeroed.onnx", criterion="sglp", remove=1, suggest=None)
    assert result.selection.passes == {"forward": 1}
    assert any("gradient-free" in note for note in result.selection.notes)


# -- --target-flops ----------------------------------------------------------

@pytest.mark.parametrize("criterion", ["last", "block-influence", "cka-removal", "sglp"])
@pytest.mark.parametrize("target", [0.2, 0.45])
def test_target_flops_removes_the_fewest_units_that_meet_the_target(folder, criterion, target):
    path = folder / "last_zeroed.onnx"
    result = analyze(path, criterion=criterion, target_flops=target, suggest=None)
    removed = sum(result.units[i].flops for i in result.selection.removed)
    assert removed >= target * result.total_flops
    n = len(result.selection.removed)
    assert result.report["budget"]["units_removed"] == n
    if n > 1:
        fewer = analyze(path, criterion=criterion, remove=n - 1, suggest=None)
        assert sum(fewer.units[i].flops for i in fewer.selection.removed) < target * fewer.total_flops


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_target_flops_on_the_radio_cnn(target):
    result = analyze(RADIO, criterion="last", target_flops=target, suggest=None)
    removed = sum(result.units[i].flops for i in result.selection.removed)
    assert removed / result.total_flops >= target
    # One unit fewer would miss: `last` removes a suffix of the units.
    first = min(result.selection.removed)
    assert (removed - result.units[first].flops) / result.total_flops < target


def test_unreachable_target_flops_is_a_user_error(folder):
    with pytest.raises(UserError, match="cannot be met"):
        analyze(folder / "last_zeroed.onnx", criterion="last", target_flops=0.95, suggest=None)


def test_reference_outputs_too_large_to_keep_are_recomputed_to_the_same_order(folder, monkeypatch):
    import sglp_onnx.evidence.gated_runner as gated_runner

    analysis = analyze(folder / "last_zeroed.onnx", criterion="last", remove=1, suggest=None)
    L = len(analysis.units)
    kept = get_criterion("cka-removal").select(context(analysis), L - 1)
    monkeypatch.setattr(gated_runner, "REFERENCE_CACHE_BYTES", 0)
    recomputed = get_criterion("cka-removal").select(context(analysis), L - 1)
    assert recomputed.removed == kept.removed
    # Every step after the first runs the original network again for its reference.
    assert recomputed.passes["forward_full"] == kept.passes["forward_full"] + (L - 2)


def test_a_damage_search_within_a_tiny_activation_budget_runs_one_sample_at_a_time_to_the_same_order(folder):
    analysis = analyze(folder / "last_zeroed.onnx", criterion="last", remove=1, suggest=None)
    L = len(analysis.units)
    roomy = context(analysis, batch_size=64)
    kept = get_criterion("damage-greedy").select(roomy, L - 1)
    tight = context(analysis, batch_size=64, budget=1)  # nothing kept, one sample per run
    recomputed = get_criterion("damage-greedy").select(tight, L - 1)
    assert roomy.cache["damage-greedy"].rows == 64
    assert tight.cache["damage-greedy"].rows == 1 and tight.evidence().rows == 1
    assert recomputed.removed == kept.removed
    np.testing.assert_allclose(recomputed.importance, kept.importance, rtol=1e-5, atol=1e-9)
    # Every step after the first runs the original network again for its reference.
    assert recomputed.passes["forward_full"] == kept.passes["forward_full"] + (L - 2)


@pytest.mark.parametrize("criterion, who", [("damage-greedy", "a measured-damage criterion"),
                                            ("cka-removal", "--criterion cka-removal"),
                                            ("sglp", "this criterion")])
def test_a_criterion_without_calibration_data_says_so_in_one_refusal(folder, criterion, who):
    analysis = analyze(folder / "last_zeroed.onnx", criterion="last", remove=1, suggest=None)
    bare = Context(model=analysis.model, units=analysis.units, calib=None)
    with pytest.raises(UserError, match=f"^{re.escape(who)} needs calibration data: pass --calib"):
        get_criterion(criterion).select(bare, 1)
