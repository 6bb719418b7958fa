"""`sglp-onnx eval`: accuracy with labels, agreement with the first model
(with or without labels) and perplexity of a causal LM, against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sglp_onnx.cli import main
from sglp_onnx.evidence.metrics import evaluate
from sglp_onnx.graph.runtime import make_session
from sglp_onnx.surgery.remove import remove_units
from sglp_onnx.units.discovery import find_units
from tiny_graphs import IR_VERSION, calibration, residual_mlp


@pytest.fixture
def models(tmp_path):
    model = residual_mlp(n_blocks=4, seed=2)
    pruned = remove_units(model, find_units(model)[1:3])
    onnx.save(model, tmp_path / "m.onnx")
    onnx.save(pruned, tmp_path / "p.onnx")
    data = calibration(n=50, seed=3)
    np.savez(tmp_path / "labelled.npz", **data)
    np.savez(tmp_path / "unlabelled.npz", input=data["input"])
    return tmp_path, data


def predictions(path, x):
    return make_session(str(path)).run(None, {"input": x})[0].argmax(1)


def test_accuracy_and_agreement_with_labels(models):
    folder, data = models
    full, pruned = predictions(folder / "m.onnx", data["input"]), predictions(folder / "p.onnx", data["input"])
    a, b = evaluate([folder / "m.onnx", folder / "p.onnx"], folder / "labelled.npz", batch_size=16)
    assert a.accuracy == pytest.approx(np.mean(full == data["labels"]))
    assert b.accuracy == pytest.approx(np.mean(pruned == data["labels"]))
    assert a.agreement is None and b.agreement == pytest.approx(np.mean(full == pruned))
    assert a.samples == b.samples == 50 and a.perplexity is None


def test_agreement_without_labels(models, capsys):
    folder, data = models
    full, pruned = predictions(folder / "m.onnx", data["input"]), predictions(folder / "p.onnx", data["input"])
    assert 0 < np.mean(full == pruned) < 1  # the check below is not trivial
    code = main(["eval", str(folder / "m.onnx"), str(folder / "p.onnx"), str(folder / "m.onnx"),
                 "--data", str(folder / "unlabelled.npz"), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["accuracy"] for r in rows] == [None, None, None]
    assert rows[1]["agreement"] == pytest.approx(np.mean(full == pruned))
    assert rows[2]["agreement"] == 1.0
    code = main(["eval", str(folder / "m.onnx"), str(folder / "p.onnx"), "--data", str(folder / "unlabelled.npz")])
    table = capsys.readouterr().out.splitlines()
    assert code == 0 and len(table) == 3 and f"{np.mean(full == pruned):.2%}" in table[2]


def tiny_lm(vocab: int = 7, dim: int = 4, seed: int = 0) -> onnx.ModelProto:
    """input_ids (B, T) -> logits (B, T, V) = embedding @ W: a bigram model."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((dim, vocab)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


def test_perplexity_of_a_causal_lm_ignores_padding(tmp_path):
    model = tiny_lm()
    onnx.save(model, tmp_path / "lm.onnx")
    ids = np.random.default_rng(1).integers(0, 7, size=(3, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    np.savez(tmp_path / "text.npz", input_ids=ids, attention_mask=mask)
    (result,) = evaluate([tmp_path / "lm.onnx"], tmp_path / "text.npz", batch_size=2)
    logits = make_session(model).run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, t, ids[b, t + 1]] for b in range(3) for t in range(5) if mask[b, t] and mask[b, t + 1]]
    assert result.perplexity == pytest.approx(np.exp(np.mean(nll)), rel=1e-6)
    assert result.accuracy is None
