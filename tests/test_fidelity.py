"""Fidelity and measured-damage selection: the score against a hand computation
on pruned models written by surgery, the output kind read from the graph,
exhaustive and greedy search against brute force, --max-loss, and the report
and terminal lines."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import criteria_models as cm
from sglp_onnx.files.calibration import HOLDOUT_EVERY
from sglp_onnx.cli import main
from sglp_onnx.evidence.fidelity import FidelityMeter, OutputKind, output_kind
from sglp_onnx.pipeline import DEFAULT_CRITERION, analyze, compress
from sglp_onnx.graph.runtime import make_session
from sglp_onnx.surgery.remove import remove_units
from tiny_graphs import make_model, residual_mlp

ROOT = Path(__file__).resolve().parents[1]
RADIO = ROOT / "models" / "cnn1d_radio.onnx"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def hand_kl(original: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    """Mean KL(original || pruned) per sample and top-1 agreement, written out directly."""
    p = make_session(original).run(None, {"input": x})[0]
    q = make_session(pruned).run(None, {"input": x})[0]
    lp, lq = log_softmax(p), log_softmax(q)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    return kl, float(np.mean(p.argmax(1) == q.argmax(1)))


@pytest.fixture()
def mlp(tmp_path) -> Path:
    onnx.save(residual_mlp(n_blocks=5, seed=4), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.calib.npz", input=rng.standard_normal((40, 8)).astype(np.float32))
    return tmp_path / "m.onnx"


def held_out(path: Path) -> np.ndarray:
    x = np.load(path.with_suffix(".calib.npz"))["input"]
    return x[np.arange(len(x)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]


def test_report_fidelity_equals_a_hand_computed_kl_on_the_held_out_samples(mlp):
    analysis = analyze(mlp, criterion="last", remove=2, suggest=None, repair="none")
    fid = analysis.report["fidelity"]
    pruned = remove_units(analysis.model, analysis.removed_units)
    kl, agreement = hand_kl(analysis.model, pruned, held_out(mlp))
    assert fid["kind"] == "kl" and fid["held_out"] and fid["samples"] == 8 == fid["rows"]
    assert fid["score"] == pytest.approx(kl, rel=1e-5, abs=1e-9)
    assert fid["top1_agreement"] == pytest.approx(agreement)
    assert analysis.report["calibration"]["selection_samples"] == 32
    assert analysis.report["calibration"]["held_out_samples"] == 8


def test_removing_nothing_has_zero_loss_and_full_agreement(mlp):
    fid = analyze(mlp, remove=0, suggest=None).report["fidelity"]
    assert fid["score"] == 0.0 and fid["top1_agreement"] == 1.0 and not fid["poor"]


def test_exhaustive_picks_the_set_with_the_lowest_joint_damage(mlp):
    analysis = analyze(mlp, criterion="damage-exhaustive", remove=2, suggest=None, repair="none")
    x = np.load(mlp.with_suffix(".calib.npz"))["input"]
    x = x[np.arange(len(x)) % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]  # selection reads these only
    scores = {s: hand_kl(analysis.model, remove_units(analysis.model, [analysis.units[i] for i in s]), x)[0]
              for s in itertools.combinations(range(len(analysis.units)), 2)}
    assert tuple(analysis.selection.removed) == min(scores, key=scores.get)
    # The default is exhaustive where that costs no more passes than the greedy: 5 sets of 4 of 5 units.
    four = analyze(mlp, criterion="damage-exhaustive", remove=4, suggest=None, repair="none").selection
    assert analyze(mlp, remove=4, suggest=None, repair="none").selection.removed == four.removed


def test_greedy_first_step_is_the_single_unit_with_least_damage(mlp):
    analysis = analyze(mlp, criterion="damage-greedy", remove=3, suggest=None, repair="none")
    x = np.load(mlp.with_suffix(".calib.npz"))["input"]
    x = x[np.arange(len(x)) % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    singles = [hand_kl(analysis.model, remove_units(analysis.model, [u]), x)[0] for u in analysis.units]
    # Partial passes from the bypassed unit equal whole pruned models.
    np.testing.assert_allclose(analysis.selection.importance, singles, rtol=1e-5, atol=1e-9)
    assert int(np.argmin(singles)) in analysis.selection.removed
    assert analysis.selection.passes["forward_partial"] == 5 + 4 + 3


def test_fast_variant_limits_the_candidates(mlp):
    full = analyze(mlp, criterion="damage-greedy", remove=4, suggest=None, repair="none").selection.passes
    fast = analyze(mlp, criterion="damage-fast", remove=4, suggest=None, repair="none").selection.passes
    assert full["forward_partial"] == 5 + 4 + 3 + 2
    assert fast["forward_partial"] <= full["forward_partial"]


def test_the_zeroed_block_goes_first_and_costs_nothing(tmp_path):
    path = cm.write_model(cm.last_zeroed_mlp, tmp_path, "z")
    analysis = analyze(path, criterion="damage-greedy", remove=1, suggest=None, repair="none")
    assert [analysis.units[i].name for i in analysis.selection.removed] == [f"blocks.{cm.ZEROED}"]
    assert analysis.report["fidelity"]["score"] == pytest.approx(0.0, abs=1e-9)


def test_max_loss_removes_as_many_units_as_the_budget_allows(tmp_path):
    path = cm.write_model(cm.last_zeroed_mlp, tmp_path, "z")
    units = len(analyze(path, criterion="last", remove=1, suggest=None).units)
    # Only the zeroed block is free: a zero budget removes exactly it.
    zero = analyze(path, criterion="damage-greedy", max_loss=1e-9, suggest=None, repair="none")
    assert [zero.units[i].name for i in zero.selection.removed] == [f"blocks.{cm.ZEROED}"]
    assert zero.report["budget"]["max_loss"] == 1e-9
    everything = analyze(path, criterion="damage-greedy", max_loss=1e9, suggest=None, repair="none")
    assert len(everything.selection.removed) == units - 1
    capped = analyze(path, criterion="damage-greedy", max_loss=1e9, remove=2, suggest=None, repair="none")
    assert len(capped.selection.removed) == 2
    # The budget holds on the held-out samples it is measured on.
    middle = analyze(path, criterion="damage-greedy", max_loss=0.05, suggest=None, repair="none")
    assert middle.report["fidelity"]["score"] <= 0.05


def test_max_loss_with_nothing_removable_warns_of_an_unchanged_copy(tmp_path, capsys):
    path = cm.write_model(cm.last_zeroed_mlp, tmp_path, "z")
    out = tmp_path / "copy.onnx"
    # --criterion last takes the last block first, which is not the free (zeroed) one: nothing fits 0.
    assert main(["compress", str(path), "-o", str(out), "--criterion", "last", "--max-loss", "0"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["removed"] == []
    assert f"warning: --max-loss 0: no unit can be removed within it; {out} is an unchanged copy" in printed
    assert any("unchanged copy of the input" in n for n in report["notes"])


def test_suggestions_carry_their_held_out_fidelity():
    report = analyze(RADIO, criterion="last", suggest=[0.1, 0.5]).report
    low, high = (s["fidelity"] for s in report["suggestions"])
    assert 0 <= low["score"] < high["score"]
    assert low["held_out"] and low["kind"] == "kl"


def test_terminal_prints_fidelity_and_warns_when_the_model_drifts(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["compress", str(RADIO), "-o", str(out), "--criterion", "last", "--ratio", "0.6"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "fidelity to the original: KL" in printed and "top-1 agreement" in printed
    assert "warning: the pruned model has drifted" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["fidelity"]["poor"] and report["fidelity"]["top1_agreement"] < 0.9
    assert report["removed"] == [u["name"] for u in report["units"] if u["removed"]]


def test_max_loss_and_segments_are_checked_before_any_work(tmp_path, capsys):
    for args, says in [(["--max-loss", "-1"], "--max-loss"), (["--max-loss", "nan"], "--max-loss"),
                       (["--segments", "2", "--criterion", "damage"], "--segments")]:
        code = main(["compress", str(RADIO), "-o", str(tmp_path / "x.onnx"), *args])
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err
        assert not (tmp_path / "x.onnx").exists()


def test_default_criterion_is_measured_damage():
    assert DEFAULT_CRITERION == "damage"
    assert analyze(RADIO, remove=1, suggest=None).report["criterion"] == "damage"


# -- the output kind read from the graph -----------------------------------

def _tail(op: str, **attrs) -> onnx.ModelProto:
    """input (2, 4) -> x + W x -> OP -> output."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    nodes = [helper.make_node("MatMul", ["input", "w"], ["b"]), helper.make_node("Add", ["input", "b"], ["h"])]
    if op == "Gemm":
        nodes.append(helper.make_node("MatMul", ["h", "w"], ["output"]))
    elif op in ("softcap", "pooler"):  # c * tanh(head / c) (Gemma 2's logits); tanh(dense) (BERT's pooler)
        nodes.append(helper.make_node("MatMul", ["h", "w"], ["head"]))
        if op == "softcap":
            nodes += [helper.make_node("Div", ["head", "cap"], ["scaled"]),
                      helper.make_node("Tanh", ["scaled"], ["capped"]),
                      helper.make_node("Mul", ["capped", "cap"], ["output"])]
        else:
            nodes.append(helper.make_node("Tanh", ["head"], ["output"]))
    elif op == "rmsnorm":  # x * 1/sqrt(mean(x^2) + eps) * w, as a legacy export spells T5's or Llama's final norm
        nodes += [helper.make_node("Pow", ["h", "two"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
                  helper.make_node("Add", ["ms", "eps"], ["mse"]),
                  helper.make_node("Sqrt", ["mse"], ["rms"]),
                  helper.make_node("Div", ["one", "rms"], ["inv"]),
                  helper.make_node("Mul", ["h", "inv"], ["normed"]),
                  helper.make_node("Mul", ["w_scale", "normed"], ["output"])]
    elif op == "none":
        nodes.append(helper.make_node("Relu", ["h"], ["output"]))
    else:
        extra = {"LayerNormalization": ["w_scale"]}.get(op, [])
        nodes.append(helper.make_node(op, ["h", *extra], ["output"], **attrs))
    inits = [w, helper.make_tensor("w_scale", TensorProto.FLOAT, [4], [1.0] * 4),
             helper.make_tensor("cap", TensorProto.FLOAT, [], [30.0])]
    if op != "softcap":
        inits.pop()
    if op == "rmsnorm":
        inits += [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("two", 2.0), ("eps", 1e-6),
                                                                                   ("one", 1.0))]
    return make_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
                      [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4])], inits)


@pytest.mark.parametrize("op, kind, form", [("Gemm", "kl", "logits"), ("Softmax", "kl", "probabilities"),
                                            ("softcap", "kl", "logits"), ("pooler", "cosine", "hidden state"),
                                            ("rmsnorm", "cosine", "hidden state"),
                                            ("LayerNormalization", "cosine", "hidden state"),
                                            ("none", "relative", "tensor")])
def test_output_kind_is_read_from_the_producers(op, kind, form):
    found = output_kind(_tail(op))
    assert (found.kind, found.form, found.output) == (kind, form, "output")


def test_meters_match_their_definitions():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    cos = FidelityMeter(OutputKind("o", "cosine", "hidden state", ""), token_level=False)
    cos.update(a[:3], b[:3])
    cos.update(a[3:], b[3:])
    want = np.mean(1 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert cos.score == pytest.approx(want)
    rel = FidelityMeter(OutputKind("o", "relative", "tensor", ""), token_level=False)
    rel.update(a, b)
    assert rel.score == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a))
    # A sequence output scores unpadded tokens only.
    seq = FidelityMeter(OutputKind("o", "kl", "logits", ""), token_level=True)
    logits = rng.standard_normal((2, 3, 4))
    noisy = logits + rng.standard_normal((2, 3, 4))
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    seq.update(logits, noisy, mask)
    keep = mask.astype(bool)
    lp, lq = log_softmax(logits[keep]), log_softmax(noisy[keep])
    assert seq.rows == 3 and seq.score == pytest.approx(np.mean(np.sum(np.exp(lp) * (lp - lq), 1)))
    # NaN in the pruned output is scored, never NaN.
    bad = FidelityMeter(OutputKind("o", "kl", "logits", ""), token_level=False)
    bad.update(a, np.full_like(a, np.nan))
    assert np.isfinite(bad.score)


def test_greedy_search_in_groups_under_a_weight_budget_scores_the_same(mlp, monkeypatch):
    """A large model's suffix sessions would hold many copies of its weights:
    candidates then go in groups that fit the budget (one full pass each), the
    sessions closed between groups, with the same scores and the same order."""
    import weakref

    import sglp_onnx.evidence.gated_runner as gated_runner

    free = analyze(mlp, criterion="damage-greedy", remove=3, suggest=None, repair="none").selection
    live: list[weakref.ref] = []
    peak = 0
    make = gated_runner.make_session

    def counting(model, provider="cpu", **kwargs):
        nonlocal peak
        session = make(model, provider, **kwargs)
        if "input" not in {i.name for i in model.graph.input}:  # a suffix: it starts inside the graph
            live.append(weakref.ref(session))
        peak = max(peak, sum(r() is not None for r in live))
        return session

    monkeypatch.setattr(gated_runner, "batched_suffix_model", lambda *args: None)  # one suffix session per candidate
    monkeypatch.setattr(gated_runner, "SUFFIX_BUDGET_BYTES", 0)  # the budget is the model's own weights
    monkeypatch.setattr(gated_runner, "make_session", counting)
    grouped = analyze(mlp, criterion="damage-greedy", remove=3, suggest=None, repair="none").selection
    assert grouped.removed == free.removed
    np.testing.assert_allclose(grouped.importance, free.importance, rtol=1e-6, atol=1e-12)
    assert grouped.passes["forward_partial"] == free.passes["forward_partial"]
    assert grouped.passes["forward"] > free.passes["forward"]  # one full pass per group
    assert 1 <= peak < len(analyze(mlp, criterion="last", remove=1, suggest=None).units)


def test_greedy_search_of_a_large_model_scores_every_candidate_in_one_run(mlp, monkeypatch):
    """Where one suffix session per candidate would not fit the weight budget,
    the candidates run side by side in one session (the weights once, one run
    per batch, kept across steps), with the scores of one session each."""
    import sglp_onnx.evidence.gated_runner as gated_runner
    import sglp_onnx.surgery.gating as gating

    separate = analyze(mlp, criterion="damage-greedy", remove=3, suggest=None, repair="none").selection
    made: list[int] = []
    make = gated_runner.make_session

    def counting(model, provider="cpu", **kwargs):
        made.append(sum(i.name.startswith(gating.COPY_PREFIX) for i in model.graph.input))
        return make(model, provider, **kwargs)

    monkeypatch.setattr(gated_runner, "SUFFIX_BUDGET_BYTES", 0)  # the budget is the model's own weights
    monkeypatch.setattr(gated_runner, "make_session", counting)
    batched = analyze(mlp, criterion="damage-greedy", remove=3, suggest=None, repair="none").selection
    assert len([n for n in made if n]) == 1  # one side-by-side session, kept for the three steps
    assert batched.removed == separate.removed
    np.testing.assert_allclose(batched.importance, separate.importance, rtol=1e-6, atol=1e-12)
    assert batched.passes == separate.passes


@pytest.mark.parametrize("case", ["mlp-stacked", "mlp-copies", "decoder-copies"])
def test_the_side_by_side_session_serves_every_step_and_runs_idle_copies_on_one_sample(tmp_path, monkeypatch,
                                                                                       case):
    """With successive halving and contenders, later rounds and steps score
    fewer candidates than the session has copies: one session serves the
    whole search and the copies of units not scored run on one sample, with
    the scores of one session per candidate. An MLP's candidates are stacked
    in one stream (`stacked_suffix_model`); with stacking off, or for a
    decoder (every layer reads its mask), each copy has its own nodes and its
    own one-sample copies of the model's inputs."""
    import sglp_onnx.evidence.gated_runner as gated_runner
    import sglp_onnx.surgery.gating as gating

    if case.startswith("mlp"):
        path = tmp_path / "m.onnx"
        # 64 wide: its weights (0.3 MiB) outweigh the stacked activations, so stacking pays.
        onnx.save(residual_mlp(n_blocks=10, width=64, seed=3), path)
        np.savez(tmp_path / "m.calib.npz",
                 input=np.random.default_rng(0).standard_normal((160, 64)).astype(np.float32))
        options = dict(criterion="damage", remove=3, suggest=None, repair="none")
    else:
        path = ROOT / "models" / "tinyllama_pydoc.onnx"
        options = dict(criterion="damage", remove=2, suggest=None, repair="none", max_calib_samples=40)
    separate = analyze(path, **options).selection
    made, rows = [], []
    make = gated_runner.make_session
    prefixes = (gating.COPY_PREFIX, gating.STACK_PREFIX)

    class Watched:
        def __init__(self, session):
            self.session = session

        def run(self, names, feed):
            assert all(k.startswith(prefixes) or k.startswith(gating.GATE_PREFIX) for k in feed)  # nothing shared
            per_copy: dict[str, set[int]] = {}
            for k, v in feed.items():
                if k.startswith(prefixes) and v.ndim:
                    per_copy.setdefault(k.split("/")[1], set()).add(len(v))
            rows.append(per_copy)
            return self.session.run(names, feed)

        def __getattr__(self, name):
            return getattr(self.session, name)

    def counting(model, provider="cpu", **kwargs):
        kinds = {p for i in model.graph.input for p in prefixes if i.name.startswith(p)}
        made.extend(kinds)
        session = make(model, provider, **kwargs)
        return Watched(session) if kinds else session

    monkeypatch.setattr(gated_runner, "SUFFIX_BUDGET_BYTES", 0)  # the budget is the model's own weights
    monkeypatch.setattr(gated_runner, "STACK_CANDIDATES", case != "mlp-copies")
    monkeypatch.setattr(gated_runner, "make_session", counting)
    batched = analyze(path, **options).selection
    assert made == [gating.STACK_PREFIX if case == "mlp-stacked" else gating.COPY_PREFIX]
    assert batched.removed == separate.removed
    np.testing.assert_allclose(batched.importance, separate.importance, rtol=1e-6, atol=1e-12)
    counts = [n for per_copy in rows for sizes in per_copy.values() for n in sizes]
    assert all(len(sizes) == 1 for per_copy in rows for sizes in per_copy.values())  # a copy's inputs agree
    assert 1 in counts and max(counts) > 1  # idle copies on one sample, scored ones on the piece
    assert all(len({n for sizes in per_copy.values() for n in sizes} - {1}) == 1 for per_copy in rows)


def test_batched_suffixes_refuse_subgraphs():
    import sglp_onnx.surgery.gating as gating

    then = helper.make_graph([helper.make_node("Identity", ["h"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    assert gating.batched_suffix_model(model, {0: ("h", TensorProto.FLOAT)}, ["y"], []) is None


def test_a_stacked_run_that_onnx_runtime_refuses_falls_back_to_copies(tmp_path, monkeypatch):
    """Stacking is an optimisation: where ONNX Runtime refuses a stacked run
    (a node that computes across rows got past the structure check), the
    candidates run as copies and score the same."""
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_state

    import sglp_onnx.evidence.gated_runner as gated_runner
    import sglp_onnx.surgery.gating as gating

    path = tmp_path / "m.onnx"
    onnx.save(residual_mlp(n_blocks=6, width=64, seed=3), path)
    np.savez(tmp_path / "m.calib.npz", input=np.random.default_rng(0).standard_normal((80, 64)).astype(np.float32))
    options = dict(criterion="damage", remove=2, suggest=None, repair="none")
    separate = analyze(path, **options).selection
    make, refused, copies = gated_runner.make_session, [], []

    class Refusing:
        def run(self, *args, **kwargs):
            refused.append(1)
            raise ort_state.Fail("stacked rows refused")

        def get_inputs(self):
            return []

    def refusing(model, provider="cpu", **kwargs):
        if any(i.name.startswith(gating.STACK_PREFIX) for i in model.graph.input):
            return Refusing()
        copies.extend(i.name for i in model.graph.input if i.name.startswith(gating.COPY_PREFIX))
        return make(model, provider, **kwargs)

    monkeypatch.setattr(gated_runner, "SUFFIX_BUDGET_BYTES", 0)
    monkeypatch.setattr(gated_runner, "make_session", refusing)
    fallen = analyze(path, **options).selection
    assert refused == [1] and copies  # tried once, then copies
    assert fallen.removed == separate.removed
    np.testing.assert_allclose(fallen.importance, separate.importance, rtol=1e-6, atol=1e-12)


def test_stacked_suffixes_run_every_copy_as_its_own_suffix_and_refuse_what_crosses_a_join(tmp_path):
    """Stacked rows give each copy what its own suffix gives; a value from
    before a join read after it (a long skip) or a graph input read after
    the first start would meet rows of other copies, so those graphs are
    refused."""
    import sglp_onnx.surgery.gating as gating
    from sglp_onnx.graph.runtime import session_with_outputs

    path = tmp_path / "m.onnx"
    onnx.save(residual_mlp(n_blocks=3, width=8, seed=2), path)
    np.savez(tmp_path / "m.calib.npz", input=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    analysis = analyze(path, criterion="last", remove=1, suggest=None, repair="none")
    model, units = analysis.model, analysis.units
    gated, gates = gating.gated_model(model, units)
    output = model.graph.output[0].name
    starts = {k: (u.exit, TensorProto.FLOAT) for k, u in enumerate(units)}
    stacked, order = gating.stacked_suffix_model(gated, starts, [output], gates)
    assert order == [0, 1, 2]
    x = analysis.calib.first(4)
    entries = session_with_outputs(model, [u.entry for u in units]).run([u.entry for u in units], x)
    session = make_session(stacked)
    names = {i.name for i in session.get_inputs()}
    value = session.run(None, {**{f"{gating.STACK_PREFIX}{k}": e[: k + 1] for k, e in enumerate(entries)},
                               **{g: np.array(False) for g in gates if g in names}})[0]
    for k, entry in enumerate(entries):  # copy k's rows: bypassing unit k, fed its entry
        alone = gating.suffix_model(gated, units[k].exit, np.float32, [output])
        want = make_session(alone).run(None, {units[k].exit: entry[: k + 1],
                                              **{g: np.array(False) for g in gates if g in
                                                 {i.name for i in alone.graph.input}}})[0]
        np.testing.assert_allclose(value[sum(range(1, k + 1)): sum(range(1, k + 2))], want, rtol=1e-6, atol=1e-6)
    # A long skip: the head reads the first block's output beside the last one's.
    skipped = onnx.ModelProto()
    skipped.CopyFrom(gated)
    head = next(n for n in skipped.graph.node if units[2].exit in n.input and n.op_type != "Add")
    skipped.graph.node.append(helper.make_node("Add", [units[2].exit, units[0].exit], ["long_skip"], name="skip"))
    head.input[list(head.input).index(units[2].exit)] = "long_skip"
    assert gating.stacked_suffix_model(skipped, starts, [output], gates) is None
    # From the second unit on, the skip reads the model's input: refused too.
    assert gating.stacked_suffix_model(skipped, {k: starts[k] for k in (1, 2)}, [output], gates) is None
    assert gating.stacked_suffix_model(gated, {k: starts[k] for k in (1, 2)}, [output], gates) is not None


def test_gated_sessions_are_closed_before_validation(mlp, monkeypatch):
    """A damage search holds its context in a cycle; its sessions must still be
    gone (without waiting for the collector) when the pruned model's opens."""
    import weakref

    import sglp_onnx.evidence.gated_runner as gated_runner
    import sglp_onnx.graph.runtime as runtime
    import sglp_onnx.surgery.gating as gating
    import sglp_onnx.surgery.validation as validation

    gated: list[weakref.ref] = []
    alive_at_validation: list[int] = []
    make = runtime.make_session

    def recording(model, provider="cpu", **kwargs):
        session = make(model, provider, **kwargs)
        if isinstance(model, onnx.ModelProto) and any(i.name.startswith(gating.GATE_PREFIX) or
                                                      i.name.startswith(gating.COPY_PREFIX)
                                                      for i in model.graph.input):
            gated.append(weakref.ref(session))
        return session

    def validating(model, provider="cpu", **kwargs):
        alive_at_validation.append(sum(r() is not None for r in gated))
        return make(model, provider, **kwargs)

    import gc

    monkeypatch.setattr(runtime, "make_session", recording)
    monkeypatch.setattr(gated_runner, "make_session", recording)
    monkeypatch.setattr(validation, "make_session", validating)
    gc.disable()
    try:
        compress(mlp, mlp.with_name("out.onnx"), criterion="damage-greedy", remove=2, repair="none")
    finally:
        gc.enable()
    assert gated and alive_at_validation and set(alive_at_validation) == {0}


def test_a_repaired_sets_held_out_record_from_its_plain_pruned_session_equals_the_gated_copys():
    # The held-out fidelity of a repaired removal set is measured on one plain
    # session of the pruned graph (read through the bypasses); it must equal
    # the record of the gated copy of the same model, batch for batch.
    from graphs import discover
    from sglp_onnx.evidence import Context
    from sglp_onnx.evidence.held_out import HeldOut
    from sglp_onnx.files.calibration import CalibrationSet
    from sglp_onnx.repair.plan import fit_repairs
    from sglp_onnx.repair.graph import with_repairs
    from tiny_graphs import calibration

    model = residual_mlp(6, 8)
    x = calibration(40, 8)["input"]
    units = discover(model, x[:2])
    data = CalibrationSet(inputs={"input": x[:30]}, labels=None, source="t")
    held = CalibrationSet(inputs={"input": x[30:]}, labels=None, source="t")
    removed = [1, 2, 4]
    repairs, _ = fit_repairs(model, units, removed, data, form="full", batch_size=16)
    repaired, new_units = with_repairs(model, units, repairs)
    ctx = Context(model=model, units=units, calib=data, batch_size=4)
    measured = HeldOut(ctx, held)
    quick = measured.repaired_record(repaired, new_units, removed)
    gated = measured.records(removed, network=(repaired, new_units))[0]
    assert quick["rows"] == gated["rows"] == 10
    assert quick["score"] == pytest.approx(gated["score"], rel=1e-5, abs=1e-9)
    assert quick["top1_agreement"] == gated["top1_agreement"]
    plain = measured.records(removed)[0]
    assert quick["score"] != pytest.approx(plain["score"], rel=1e-3)  # the maps are in what was measured
