"""`compress --renumber-cache`: the kept KV-cache tensors get consecutive
layer numbers (what onnxruntime-genai expects) and the model computes
exactly what the pruned model with the original names computes."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sglp_onnx import validate_report
from sglp_onnx.cli import main
from sglp_onnx.tools.export.hf import export_hf


def _run(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})))


def _empty_past(layers, prefix="past_key_values"):
    return {f"{prefix}.{i}.{kv}": np.zeros((2, 2, 0, 8), np.float32) for i in layers for kv in ("key", "value")}


def test_renumbered_cache_names_are_consecutive_and_outputs_identical(tmp_path, capsys):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    path = tmp_path / "llama.onnx"
    export_hf(model.eval(), path, with_cache=True, exporter="legacy")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "llama.calib.npz", input_ids=rng.integers(0, 64, (8, 10)), attention_mask=np.ones((8, 10), np.int64))
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"num_hidden_layers": 4,
                                                                                  "filename": "llama.onnx"}}}))
    first, second = tmp_path / "kept", tmp_path / "renamed"
    first.mkdir()
    second.mkdir()
    args = ["compress", str(path), "--remove", "2", "--criterion", "random", "--seed", "1"]
    assert main(args + ["-o", str(first / "kept.onnx")]) == 0
    assert main(args + ["-o", str(second / "renamed.onnx"), "--renumber-cache"]) == 0
    assert "the others renumbered 0..n-1" in capsys.readouterr().out

    kept = json.loads((first / "kept.json").read_text())
    renamed = json.loads((second / "renamed.json").read_text())
    validate_report(renamed)
    survivors = sorted(int(k) for k, v in kept["kv_cache"]["layer_map"].items() if v is not None)
    assert survivors != [0, 1]  # the renaming is not trivial for this seed
    assert set(renamed["kv_cache"]["renamed"]) == {f"{p}.{i}.{kv}" for p in ("past_key_values", "present")
                                                   for i in survivors for kv in ("key", "value")} - {
        f"{p}.{i}.{kv}" for p in ("past_key_values", "present") for i in (0, 1) for kv in ("key", "value")
        if survivors[i] == i}

    ids = rng.integers(0, 64, (2, 5))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(5), (2, 1))}
    a = _run(first / "kept.onnx", {**feed, **_empty_past(survivors)})
    b = _run(second / "renamed.onnx", {**feed, **_empty_past(range(len(survivors)))})
    assert sorted(k for k in b if k.startswith("present.")) == [f"present.{i}.{kv}" for i in range(2)
                                                                 for kv in ("key", "value")]
    np.testing.assert_array_equal(a["logits"], b["logits"])
    for new, old in enumerate(survivors):
        np.testing.assert_array_equal(a[f"present.{old}.key"], b[f"present.{new}.key"])
    config = json.loads((second / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2


def test_renumber_cache_without_a_cache_is_a_usage_error(tmp_path, capsys):
    code = main(["compress", "models/cnn1d_radio.onnx", "-o", str(tmp_path / "x.onnx"), "--remove", "1",
                 "--criterion", "last", "--renumber-cache"])
    assert code == 2
    assert "--renumber-cache needs a model with a KV cache" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
