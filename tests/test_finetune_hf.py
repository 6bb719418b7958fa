"""Healing a pruned Hugging Face causal LM: `finetune --torch-model hf:DIR`.

A tiny random Llama with a KV cache is pruned through `compress`, healed
for one epoch, and the healed ONNX file must keep the pruned model's
signature (cache tensors named after the kept layers' original numbers)
and decode greedily, cache fed back, like the healed transformers model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sglp_onnx.cli import main
from sglp_onnx.errors import UserError
from sglp_onnx.tools.export.hf import export_hf
from sglp_onnx.tools.finetune import delete_layers, finetune, rename_cache_tensors
from sglp_onnx.paired.hf_model import load_hf_model
from sglp_onnx.pipeline import compress
from sglp_onnx.graph.runtime import make_session
from tiny_transformers import hf_greedy, onnx_greedy

VOCAB = 64
LAYERS = 4
NEW_TOKENS = 8
# A seed for which `random` removes two layers that are not the last two, so
# the kept layers' cache numbers differ from a fresh export's 0..n-1.
SEED = 1


def names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune_hf")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)).eval().save_pretrained(
        str(folder / "hf"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(48, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-8:, 8:] = 0
    np.savez(folder / "train.npz", input_ids=ids, attention_mask=mask)
    export_hf(load_hf_model(folder / "hf"), folder / "llama.kv.onnx", with_cache=True, exporter="legacy")
    report = compress(folder / "llama.kv.onnx", folder / "llama.kv.pruned.onnx", calib=folder / "train.npz",
                      remove=2, criterion="random", seed=SEED, torch_model=f"hf:{folder / 'hf'}",
                      batch_size=16).report
    kept = sorted(int(k) for k, v in report["kv_cache"]["layer_map"].items() if v is not None)
    assert len(kept) == LAYERS - 2 and kept != list(range(LAYERS - 2)), f"choose another SEED (kept {kept})"
    return folder / "llama.kv.pruned.onnx", kept


def test_finetune_hf_cache_model_keeps_signature_and_decodes_like_transformers(pruned, capsys):
    path, kept = pruned
    folder = path.parent
    code = main(["finetune", str(path), "--torch-model", f"hf:{folder / 'hf'}", "--train-data",
                 str(folder / "train.npz"), "--epochs", "1", "--lr", "0.01", "--batch-size", "16", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    out = folder / "llama.kv.pruned.finetuned.onnx"
    assert report["layer_removal"] == "deleted" and report["cache_layers"] == kept
    assert report["skip_reproduces_pruned_relative_error"] < 1e-4
    assert report["validation"] == {"checker": True, "runs": True, "signature": True, "finite": True}
    healed, original = onnx.load(str(out)), onnx.load(str(path))
    assert names(healed) == names(original)
    assert names(healed)[0][3:] == [f"past_key_values.{i}.{kv}" for i in kept for kv in ("key", "value")]
    metrics = report["train_metrics"]
    assert metrics["after"]["loss"] < metrics["before"]["loss"]

    # The written model is the healed torch model, cache and all.
    result = finetune(path, torch_model=f"hf:{folder / 'hf'}", train_data=folder / "train.npz", epochs=1,
                      lr=0.01, batch_size=16, output=folder / "again.onnx", exporter="legacy")
    assert result.report["training"]["epoch_loss"] == report["training"]["epoch_loss"]
    assert result.model.config.num_hidden_layers == LAYERS - 2
    prompt = np.random.default_rng(11).integers(0, VOCAB, size=(2, 5), dtype=np.int64)
    for file in (out, folder / "again.onnx"):
        generated = onnx_greedy(make_session(onnx.load(str(file)), "cpu"), prompt, NEW_TOKENS)
        np.testing.assert_array_equal(generated, hf_greedy(result.model, prompt, NEW_TOKENS))


def test_delete_layers_renumbers_and_refuses_sublayers(pruned):
    model = load_hf_model(pruned[0].parent / "hf")
    smaller, kept = delete_layers(model, ["model.layers.0", "model.layers.2"])
    assert kept == [1, 3] and len(smaller.model.layers) == 2 and len(model.model.layers) == LAYERS
    assert [layer.self_attn.layer_idx for layer in smaller.model.layers] == [0, 1]
    assert model.model.layers[3].self_attn.layer_idx == 3 and model.config.num_hidden_layers == LAYERS
    with pytest.raises(UserError, match="whole decoder layers"):
        delete_layers(model, ["model.layers.1.mlp"])


def test_rename_cache_tensors_maps_all_references():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", [f"past_key_values.{i}.{kv}"], [f"present.{i}.{kv}"])
         for i in range(2) for kv in ("key", "value")], "g",
        [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, [1])
         for i in range(2) for kv in ("key", "value")],
        [helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, [1])
         for i in range(2) for kv in ("key", "value")])
    model = helper.make_model(graph)
    rename_cache_tensors(model, [1, 3])
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == [f"past_key_values.{i}.{kv}" for i in (1, 3)
                                                   for kv in ("key", "value")]
    assert [list(n.input) + list(n.output) for n in model.graph.node][2] == ["past_key_values.3.key",
                                                                              "present.3.key"]


def test_finetune_pairs_a_report_made_without_the_torch_model(pruned, tmp_path):
    """compress without --torch-model, then finetune --torch-model hf:DIR: the pairing is made by finetune."""
    path, kept = pruned
    folder = path.parent
    plain = tmp_path / "plain.onnx"
    report = compress(folder / "llama.kv.onnx", plain, calib=folder / "train.npz", remove=2, criterion="random",
                      seed=SEED, batch_size=16).report
    assert not report["pairing"]
    result = finetune(plain, torch_model=f"hf:{folder / 'hf'}", train_data=folder / "train.npz", epochs=1,
                      lr=0.01, batch_size=16, exporter="legacy")
    assert result.report["pairing"].startswith("made by finetune")
    assert result.report["cache_layers"] == kept and result.model.config.num_hidden_layers == LAYERS - 2
    assert result.report["skip_reproduces_pruned_relative_error"] < 1e-4
