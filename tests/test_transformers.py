"""Transformers and LLMs through the whole pipeline.

Tiny Llama, Qwen2, GPT-2, OPT, Gemma 2, BERT and ViT models are built from configs with
random weights (nothing is downloaded), saved to a temporary folder and
exported with both exporters. `compress --remove 2` must validate and give
exactly what transformers computes with those layers deleted (and the kept
layers renumbered); a pruned model with a KV cache must decode greedily like
transformers with its own cache.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sglp_onnx import validate_report
from sglp_onnx.files.calibration import HOLDOUT_EVERY, check_calibration
from sglp_onnx.cli import main
from sglp_onnx.errors import UserError
from sglp_onnx.tools.export.torch_export import export_torch
from sglp_onnx.tools.export.hf import export_hf
from sglp_onnx.paired.hf_model import load_hf_model
from sglp_onnx.pipeline import compress
from tiny_transformers import (CONFIGS, LAYERS, SEQ, VOCAB, delete_layers, hf_greedy, hf_logits, inputs_for, layer_list,
                               onnx_greedy, removed_layers, session, token_batch)

N_CALIB = 16
NEW_TOKENS = 16
CAUSAL = ("llama", "qwen2", "gpt2")



def selection_tokens(folder) -> int:
    """Unpadded tokens of the calibration samples selection reads (every 5th sample is held out)."""
    mask = np.load(folder / "calib.npz")["attention_mask"]
    return int(mask[np.arange(len(mask)) % HOLDOUT_EVERY != HOLDOUT_EVERY - 1].sum())


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """`staged(arch)` -> HF folder (with calib.npz); `staged(arch, exporter, with_cache)` -> its export.

    Everything is built on first use and shared by the tests of this module.
    """
    folders: dict = {}
    files: dict = {}

    def get(arch: str, exporter: str | None = None, with_cache: bool = False):
        if arch not in folders:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(arch)
            CONFIGS[arch]().eval().save_pretrained(str(folder / "hf"))
            calib = inputs_for(arch, N_CALIB if arch != "vit" else 8, seed=1)
            if arch == "vit":
                calib["labels"] = np.arange(8) % 5
            np.savez(folder / "calib.npz", **calib)
            folders[arch] = folder
        folder = folders[arch]
        if exporter is None:
            return folder
        key = (arch, exporter, with_cache)
        if key not in files:
            path = folder / f"{exporter}{'.kv' if with_cache else ''}.onnx"
            model = load_hf_model(folder / "hf")
            if arch == "vit":
                example = torch.from_numpy(inputs_for("vit", 2, seed=0)["pixel_values"])
                export_torch(model, (example,), path, exporter=exporter, input_names=("pixel_values",))
            else:
                export_hf(model, path, with_cache=with_cache, exporter=exporter)
            files[key] = path
        return files[key]

    return get


def assert_valid(report: dict) -> None:
    assert all(report["validation"][k] for k in ("checker", "runs", "signature", "finite", "opset_ir_kept"))
    validate_report(report)


# (arch, exporter, compress options). Criteria vary so that the paired
# hf:DIR model (GradNorm), the calibration pass and the data-free criteria
# all meet every family.
def _hf(**options):
    return {"torch_model": "hf", **options}


CASES = [
    ("llama", "legacy", _hf(criterion="sglp")),
    ("llama", "dynamo", {"criterion": "block-influence"}),
    ("qwen2", "legacy", _hf(criterion="gradnorm")),
    ("qwen2", "dynamo", {"criterion": "random", "seed": 3}),
    ("gpt2", "legacy", _hf(criterion="sglp")),
    ("gpt2", "dynamo", {"criterion": "last"}),
    ("opt", "legacy", {}),
    ("gemma2", "legacy", {"criterion": "block-influence"}),
    ("bert", "legacy", _hf(criterion="sglp")),
    ("bert", "dynamo", {"criterion": "block-influence"}),
    ("vit", "legacy", _hf(criterion="gradnorm")),
    ("vit", "dynamo", {"criterion": "random", "seed": 1}),
]
# A dynamo export of these takes about 10 s on 2 cores; they run with the slow
# tests (make test-slow), Llama's runs always (its export is the dynamo case of the default run).
SLOW = {("qwen2", "dynamo"), ("bert", "dynamo"), ("vit", "dynamo"), ("gpt2", "dynamo")}


@pytest.mark.parametrize(
    "arch, exporter, options",
    [pytest.param(*c, marks=[pytest.mark.slow] if c[:2] in SLOW else [], id=f"{c[0]}-{c[1]}") for c in CASES])
def test_compress_equals_transformers_with_layers_deleted(staged, arch, exporter, options):
    folder = staged(arch)
    path = staged(arch, exporter)
    options = dict(options)
    if options.get("torch_model") == "hf":
        options["torch_model"] = f"hf:{folder / 'hf'}"
    out = folder / f"{exporter}.pruned.onnx"
    result = compress(path, out, calib=folder / "calib.npz", remove=2, batch_size=8, force=True, repair="none",
                      **options)
    report = result.report
    assert_valid(report)
    assert report["fidelity"]["kind"] == "kl"  # logits, soft-capped (Gemma 2) or not
    assert report["fidelity"]["definition"].endswith("per sample" if arch == "vit" else "per unpadded token")

    model = load_hf_model(folder / "hf")
    scopes = [f"{layer_list(model)}.{i}" for i in range(LAYERS)]
    # The TorchScript exporter leaves OPT's `model.` out of its scopes.
    assert len(report["units"]) == LAYERS
    assert all(s == u["scope"] or s.endswith("." + u["scope"]) for s, u in zip(scopes, report["units"]))
    assert all(u["sublayers"] == 2 and u["attention"] for u in report["units"])
    removed = removed_layers(report)
    assert removed == {i for i, u in enumerate(report["units"]) if u["removed"]} and len(removed) == 2
    kept = [i for i in range(LAYERS) if i not in removed]
    assert {int(k): v for k, v in report["kv_cache"]["layer_map"].items() if v is not None} == \
        {old: new for new, old in enumerate(kept)}

    feed = inputs_for(arch, 3, seed=7)
    (got,) = session(out).run(["logits"], feed)
    want = hf_logits(delete_layers(model, removed), feed)
    if arch == "vit":
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    else:
        real = feed["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
        # Token-level CKA: one sample per unpadded calibration token.
        if report["cka"] is not None:
            assert report["calibration"]["rows"] == selection_tokens(folder)

    if "torch_model" in options:
        assert report["importance_kind"] == "GradNorm"
        assert [u["modules"] for u in report["pairing"]["units"]] == [[s] for s in scopes]
        assert report["pairing"]["output_relative_error"] < 1e-4
        assert all(u["importance"] > 0 for u in report["units"])
        loss = next(n for n in report["notes"] if n.startswith("GradNorm loss"))
        expected = {"bert": "own argmax", "vit": "labels"}.get(arch, "next-token")
        assert expected in loss


# Seeds for which `random` removes the first layer, whose nodes compute the
# rotary tables and masks every other layer reads (checked below).
GENERATION_CASES = [("llama", "legacy", 3), ("gpt2", "dynamo", 3)]


@pytest.mark.parametrize("arch, exporter, seed", [
    pytest.param(*c, marks=[pytest.mark.slow] if c[:2] in SLOW else [], id=f"{c[0]}-{c[1]}") for c in GENERATION_CASES])
def test_pruned_cache_model_generates_like_transformers(staged, arch, exporter, seed):
    folder = staged(arch)
    path = staged(arch, exporter, with_cache=True)
    out = folder / f"{exporter}.kv.pruned.onnx"
    # The calibration file has no past_key_values.*: they are empty (whole sequences).
    report = compress(path, out, calib=folder / "calib.npz", remove=2, criterion="random", seed=seed,
                      batch_size=8, force=True, repair="none").report
    assert_valid(report)
    units = report["units"]
    for i, unit in enumerate(units):
        assert unit["cache_inputs"] == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert unit["cache_outputs"] == [f"present.{i}.key", f"present.{i}.value"]
    removed = removed_layers(report)
    assert 0 in removed, "choose a seed for which `random` removes layer 0"
    cache = report["kv_cache"]
    assert cache["removed_inputs"] == sorted(f"past_key_values.{i}.{kv}" for i in removed for kv in ("key", "value"))
    assert cache["removed_outputs"] == sorted(f"present.{i}.{kv}" for i in removed for kv in ("key", "value"))
    assert (cache["layers_before"], cache["layers_after"]) == (LAYERS, LAYERS - 2)

    pruned = onnx.load(str(out))
    kept = [i for i in range(LAYERS) if i not in removed]
    assert [i.name for i in pruned.graph.input] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in kept for kv in ("key", "value")]
    assert [o.name for o in pruned.graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in kept for kv in ("key", "value")]

    reference = delete_layers(load_hf_model(folder / "hf"), removed)
    prompt = token_batch(2, 5, seed=11)["input_ids"]
    generated = onnx_greedy(session(out), prompt, NEW_TOKENS)
    assert generated.shape == (2, NEW_TOKENS)
    np.testing.assert_array_equal(generated, hf_greedy(reference, prompt, NEW_TOKENS))


def test_cache_model_pairs_with_hf_folder_without_a_cache(staged):
    """GradNorm on a model with cache inputs: the paired model runs whole sequences (past length 0)."""
    folder = staged("llama")
    path = staged("llama", "legacy", with_cache=True)
    report = compress(path, folder / "paired.kv.onnx", calib=folder / "calib.npz", remove=1,
                      criterion="sglp", torch_model=f"hf:{folder / 'hf'}", batch_size=8, force=True).report
    assert_valid(report)
    assert [u["modules"] for u in report["pairing"]["units"]] == [[f"model.layers.{i}"] for i in range(LAYERS)]
    assert report["pairing"]["output_relative_error"] < 1e-4
    assert report["importance_kind"] == "GradNorm"
    assert report["calibration"]["rows"] == selection_tokens(folder)
    # A calibration file with a non-empty past cannot be compared with a cache-free run.
    model = onnx.load(str(path))
    data = dict(np.load(folder / "calib.npz"))
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            data[inp.name] = np.zeros((N_CALIB, 2, 3, 8), dtype=np.float32)
    data["attention_mask"] = np.ones((N_CALIB, SEQ + 3), dtype=np.int64)
    np.savez(folder / "past.npz", **data)
    with pytest.raises(UserError, match="non-empty past"):
        compress(path, folder / "past.onnx", calib=folder / "past.npz", remove=1,
                 torch_model=f"hf:{folder / 'hf'}", force=True)


def test_calibration_without_past_gets_an_empty_cache_and_positions(staged):
    model = onnx.load(str(staged("llama", "legacy", with_cache=True)))
    feed = token_batch(3, 7, seed=0)
    calib = check_calibration(feed, model)
    assert calib.inputs["past_key_values.3.value"].shape == (3, 2, 0, 8)
    assert calib.inputs["past_key_values.3.value"].dtype == np.float32
    np.testing.assert_array_equal(calib.inputs["position_ids"], np.tile(np.arange(7), (3, 1)))
    (logits, *_) = session(staged("llama", "legacy", with_cache=True)).run(None, calib.first(3))
    (plain,) = session(staged("llama", "legacy")).run(None, feed)
    real = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[real], plain[real], atol=1e-5)

    # Cache-like means a past length of its own: embeddings share the token ids' length.
    from sglp_onnx.files.calibration import InputSpec, is_cache_input

    ids = InputSpec("ids", np.int64, ("batch", "sequence"))
    past = InputSpec("k", np.float32, ("batch", 2, "past", 8))
    assert is_cache_input(past, [ids, past])
    assert not is_cache_input(InputSpec("e", np.float32, ("batch", "sequence", 8)), [ids])
    assert not is_cache_input(past, [past])  # no token ids: not a sequence model
    assert not is_cache_input(InputSpec("img", np.float32, ("batch", 3, "h", "w")), [ids])


def test_token_samples_follow_the_mask_of_the_new_tokens():
    from sglp_onnx.evidence.activations import as_samples

    hidden = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(as_samples(hidden, token_level=True, token_mask=mask),
                                  hidden.reshape(6, 4)[[0, 1, 2, 3, 4]])
    # With a KV cache the mask covers past + new tokens; the hidden states are the new ones.
    with_past = np.concatenate([np.ones((2, 2), dtype=np.int64), mask], axis=1)
    np.testing.assert_array_equal(as_samples(hidden, token_level=True, token_mask=with_past),
                                  as_samples(hidden, token_level=True, token_mask=mask))
    assert as_samples(hidden, token_level=False).shape == (2, 12)
    # Flattened to (B*T, hidden) (OPT's MLP), the same rows; the repair fit's rows alike.
    from sglp_onnx.repair.fit import as_rows

    flat = hidden.reshape(6, 4)
    for m in (mask, with_past):
        np.testing.assert_array_equal(as_samples(flat, token_level=True, token_mask=m),
                                      as_samples(hidden, token_level=True, token_mask=mask))
        np.testing.assert_array_equal(as_rows(flat, 1, m), as_rows(hidden, 2, m))
    np.testing.assert_array_equal(as_rows(hidden, 2, mask), hidden.reshape(6, 4)[:5])
    # One row per sequence (a pooled output) is never masked.
    np.testing.assert_array_equal(as_samples(hidden[:, 0], token_level=True, token_mask=mask), hidden[:, 0])


def test_genai_config_is_rewritten_beside_the_output(staged, tmp_path):
    folder = staged("llama")
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(staged("llama", "legacy", with_cache=True), source / "model.onnx")
    shutil.copy(folder / "calib.npz", source / "model.calib.npz")
    config = {"model": {"type": "llama", "vocab_size": VOCAB, "decoder": {
        "filename": "model.onnx", "num_hidden_layers": LAYERS, "num_attention_heads": 4, "head_size": 8,
        "inputs": {"past_key_names": "past_key_values.%d.key"}}}, "search": {"max_length": 64}}
    original = json.dumps(config, indent=1)
    (source / "genai_config.json").write_text(original)

    target = tmp_path / "out"
    target.mkdir()
    report = compress(source / "model.onnx", target / "small.onnx", remove=2, criterion="last", force=True).report
    written = json.loads((target / "genai_config.json").read_text())
    assert written["model"]["decoder"]["num_hidden_layers"] == LAYERS - 2
    assert written["model"]["decoder"]["filename"] == "small.onnx"
    assert written["model"]["vocab_size"] == VOCAB and written["search"] == config["search"]
    assert report["kv_cache"]["genai_config"] == str(target / "genai_config.json")
    assert (source / "genai_config.json").read_text() == original  # the input folder is never modified
    validate_report(json.loads((target / "small.json").read_text()))

    # Output in the input's folder: the copy gets the output's name.
    compress(source / "model.onnx", remove=1, criterion="last")
    beside = json.loads((source / "model.pruned.genai_config.json").read_text())
    assert beside["model"]["decoder"]["num_hidden_layers"] == LAYERS - 1
    assert beside["model"]["decoder"]["filename"] == "model.pruned.onnx"
    assert (source / "genai_config.json").read_text() == original
    (source / "other.genai_config.json").write_text("{}")
    with pytest.raises(UserError, match="exists"):
        compress(source / "model.onnx", source / "other.onnx", remove=1, criterion="last")
    assert not (source / "other.onnx").exists()


def test_a_sequence_classifier_is_scored_per_sample(tmp_path):
    """Token inputs, but one row of logits per sequence: the report says the
    score is per sample, and counts one row per held-out sample."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, initializer_range=0.2)).eval()

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    feed = token_batch(2, SEQ, seed=0)
    path = tmp_path / "classifier.onnx"
    torch.onnx.export(Logits(), (torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])),
                      str(path), dynamo=False, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}})
    np.savez(tmp_path / "calib.npz", **token_batch(N_CALIB, SEQ, seed=1))
    report = compress(path, tmp_path / "out.onnx", calib=tmp_path / "calib.npz", remove=1, batch_size=8).report
    assert_valid(report)
    fidelity = report["fidelity"]
    assert fidelity["kind"] == "kl" and fidelity["definition"].endswith("nats per sample")
    assert fidelity["rows"] == fidelity["samples"] == N_CALIB // HOLDOUT_EVERY


def test_a_text_tower_beside_an_image_tower_reads_one_row_per_sample(tmp_path):
    """CLIP-like: token ids and a mask feed a text tower, pixels an image tower
    of 4 patches; their hidden states hold different numbers of token rows, so
    CKA reads one row per sample and the report says so (it failed with an
    internal error before)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.patch = nn.Embedding(VOCAB, 16), nn.Linear(48, 16)
            self.text = nn.Sequential(Block(), Block())
            self.image = nn.Sequential(Block(), Block())
            self.head = nn.Linear(32, 3)

        def forward(self, input_ids, attention_mask, pixel_values):
            text = self.text(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
            patches = pixel_values.reshape(pixel_values.shape[0], 3, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5)
            image = self.image(self.patch(patches.reshape(pixel_values.shape[0], 4, 48)))
            return self.head(torch.cat([text.sum(1), image.mean(1)], -1))

    torch.manual_seed(0)
    feed = token_batch(2, SEQ, seed=0)
    pixels = torch.randn(2, 3, 8, 8)
    path = tmp_path / "towers.onnx"
    torch.onnx.export(TwoTowers().eval(), (torch.from_numpy(feed["input_ids"]),
                                           torch.from_numpy(feed["attention_mask"]), pixels),
                      str(path), dynamo=False, input_names=["input_ids", "attention_mask", "pixel_values"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "b", 1: "t"},
                                                             "attention_mask": {0: "b", 1: "t"},
                                                             "pixel_values": {0: "b"}})
    calib = token_batch(N_CALIB, SEQ, seed=1)
    np.savez(tmp_path / "calib.npz", **calib,
             pixel_values=np.random.default_rng(2).standard_normal((N_CALIB, 3, 8, 8)).astype(np.float32))
    report = compress(path, tmp_path / "out.onnx", calib=tmp_path / "calib.npz", remove=2, batch_size=8).report
    assert_valid(report)
    assert len(report["units"]) == 4 and len(report["removed"]) == 2
    assert report["calibration"]["token_level"] is False
    assert report["calibration"]["rows"] == report["calibration"]["selection_samples"]
    assert any("one token layout" in n for n in report["notes"])


def test_opt_sublayers_read_flattened_tokens_like_the_others(staged):
    """OPT's MLP sublayer reads the hidden state flattened to (tokens, hidden):
    at sublayer granularity its entry and exit have one row per token, padded
    ones included, and are read through the mask like the attention's (B, T,
    hidden) ones: the default criterion with its repair runs, and every
    unit's CKA rows are the unpadded selection tokens."""
    folder = staged("opt")
    path = staged("opt", "legacy")
    report = compress(path, folder / "sublayer.onnx", calib=folder / "calib.npz", remove=2, granularity="sublayer",
                      batch_size=8, force=True).report
    assert_valid(report)
    assert len(report["units"]) == 2 * LAYERS and report["repair"]["applied"] is not None
    assert report["calibration"]["rows"] == selection_tokens(folder)
    assert report["fidelity"]["kind"] == "kl" and report["fidelity"]["score"] >= 0


def test_sublayer_granularity_on_llama_with_cache(staged):
    folder = staged("llama")
    path = staged("llama", "legacy", with_cache=True)
    out = folder / "sublayer.kv.onnx"
    report = compress(path, out, calib=folder / "calib.npz", remove=2, granularity="sublayer",
                      criterion="random", seed=3, batch_size=8, force=True, repair="none").report
    assert_valid(report)
    units = report["units"]
    assert len(units) == 2 * LAYERS and all(u["sublayers"] == 1 for u in units)
    assert [u["attention"] for u in units] == [True, False] * LAYERS
    for i in range(LAYERS):  # the attention sublayer owns the layer's cache, the MLP none
        assert units[2 * i]["cache_outputs"] == [f"present.{i}.key", f"present.{i}.value"]
        assert units[2 * i + 1]["cache_inputs"] == units[2 * i + 1]["cache_outputs"] == []
    gone = [i for i, u in enumerate(units) if u["removed"]]
    attention_gone = {i // 2 for i in gone if i % 2 == 0}
    assert removed_layers(report) == attention_gone
    assert any(i % 2 == 1 for i in gone), "choose a seed that removes an MLP sublayer too"

    class Zero(nn.Module):
        """An attention or MLP whose output is 0, so its residual Add passes x through."""

        def __init__(self, attention: bool):
            super().__init__()
            self.attention = attention

        def forward(self, hidden_states=None, *args, **kwargs):
            zero = torch.zeros_like(hidden_states)
            return (zero, None) if self.attention else zero

    reference = load_hf_model(folder / "hf")
    for i in gone:
        layer = reference.model.layers[i // 2]
        if i % 2 == 0:
            layer.self_attn = Zero(attention=True)
        else:
            layer.mlp = Zero(attention=False)
    feed = token_batch(3, SEQ, seed=5)
    calib = check_calibration(feed, onnx.load(str(out)))
    (got, *_) = session(out).run(None, calib.inputs)
    real = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], hf_logits(reference, feed)[real], atol=1e-4, rtol=1e-4)


def cache_graph(layers: int = 3, width: int = 4) -> onnx.ModelProto:
    """Decoder-like layers `h + (h + c) W_i` whose cache output is their past
    concatenated with the key `(h + c) K_i`; the shared `c` is computed from the
    SHAPE of layer 0's past (the past length, as transformers reads it for the mask)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1], dtype=np.int64), "one")]
    nodes = [helper.make_node("Shape", ["past.0"], ["past_shape"], name="shared/Shape"),
             helper.make_node("Gather", ["past_shape", "one"], ["past_len"], name="shared/Gather"),
             helper.make_node("Cast", ["past_len"], ["c"], to=TensorProto.FLOAT, name="shared/Cast")]
    h = "x"
    for i in range(layers):
        s = f"layers.{i}"
        inits += [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"{s}.w"),
                  numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"{s}.k")]
        nodes += [helper.make_node("Add", [h, "c"], [f"{s}.hc"], name=f"/{s}/Add"),
                  helper.make_node("MatMul", [f"{s}.hc", f"{s}.w"], [f"{s}.f"], name=f"/{s}/MatMul"),
                  helper.make_node("Add", [h, f"{s}.f"], [f"{s}.out"], name=f"/{s}/Add_1"),
                  helper.make_node("MatMul", [f"{s}.hc", f"{s}.k"], [f"{s}.key"], name=f"/{s}/MatMul_1"),
                  helper.make_node("Concat", [f"past.{i}", f"{s}.key"], [f"present.{i}"], axis=1,
                                   name=f"/{s}/Concat")]
        h = f"{s}.out"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "cache", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width])] + [
            helper.make_tensor_value_info(f"past.{i}", TensorProto.FLOAT, ["batch", "past", width])
            for i in range(layers)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", width])] + [
            helper.make_tensor_value_info(f"present.{i}", TensorProto.FLOAT, ["batch", None, width])
            for i in range(layers)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_past_input_read_elsewhere_only_for_its_shape_goes_with_its_layer():
    from sglp_onnx.surgery.remove import remove_units
    from sglp_onnx.units.discovery import find_units

    model = cache_graph()
    units = find_units(model)
    assert [u.scope for u in units] == ["layers.0", "layers.1", "layers.2"]
    # past.0 also feeds the shared Shape, but a kept past input declared with
    # the same shape can stand in for it.
    assert [u.owned_inputs for u in units] == [(f"past.{i}",) for i in range(3)]
    assert [u.owned_outputs for u in units] == [(f"present.{i}",) for i in range(3)]
    assert [u.layer_index for u in units] == [0, 1, 2]
    pruned = remove_units(model, units[:1])
    onnx.checker.check_model(pruned, full_check=True)
    assert [i.name for i in pruned.graph.input] == ["x", "past.1", "past.2"]
    assert next(n for n in pruned.graph.node if n.op_type == "Shape").input[0] == "past.1"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    past = rng.standard_normal((2, 5, 4)).astype(np.float32)
    y, present1, _ = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "past.1": past, "past.2": past})
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # Layer 0 skipped by hand: x goes straight to layer 1, c = past length 5.
    w1 = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    h1 = x + (x + 5.0) @ w1["layers.1.w"]
    np.testing.assert_allclose(present1[:, 5:], (x + 5.0) @ w1["layers.1.k"], rtol=1e-5)
    np.testing.assert_allclose(y, h1 + (h1 + 5.0) @ w1["layers.2.w"], rtol=1e-4, atol=1e-5)
    assert full.run(None, {"x": x, "past.0": past, "past.1": past, "past.2": past})[0].shape == y.shape

    # Without a stand-in (past.0 declared unlike any other input) it stays a shared input.
    del model.graph.input[1].type.tensor_type.shape.dim[1:]
    model.graph.input[1].type.tensor_type.shape.dim.add().dim_param = "other"
    model.graph.input[1].type.tensor_type.shape.dim.add().dim_value = 4
    assert find_units(model)[0].owned_inputs == ()


def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_perplexity_of_pruned_causal_lm(staged, capsys):
    folder = staged("gpt2")
    path = staged("gpt2", "legacy")
    kv = staged("gpt2", "legacy", with_cache=True)
    out = folder / "last.onnx"
    code, _, err = _cli(capsys, "-q", "compress", path, "-o", out, "--remove", "1", "--criterion", "last", "--force",
                        "--repair", "none")
    assert code == 0, err
    test = token_batch(8, SEQ, seed=21)
    np.savez(folder / "test.npz", **test)
    code, stdout, err = _cli(capsys, "eval", path, out, kv, "--data", folder / "test.npz", "--json")
    assert code == 0, err
    full, pruned, cached = (m["perplexity"] for m in json.loads(stdout))

    def perplexity(model):
        logits = torch.from_numpy(hf_logits(model, test)).log_softmax(-1)
        ids, mask = torch.from_numpy(test["input_ids"]), torch.from_numpy(test["attention_mask"]).bool()
        keep = mask[:, 1:] & mask[:, :-1]
        picked = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        return math.exp(-float(picked[keep].mean()))

    model = load_hf_model(folder / "hf")
    assert full == pytest.approx(perplexity(model), rel=1e-4)
    assert pruned == pytest.approx(perplexity(delete_layers(model, {LAYERS - 1})), rel=1e-4)
    assert cached == pytest.approx(full, rel=1e-5)  # an empty past changes nothing
    assert pruned != pytest.approx(full, rel=1e-3)


def test_cli_exports_hf_folder(staged, capsys, tmp_path):
    folder = staged("qwen2")
    out = tmp_path / "qwen.kv.onnx"
    code, stdout, err = _cli(capsys, "export", f"hf:{folder / 'hf'}", "-o", out, "--with-cache",
                             "--exporter", "legacy")
    assert code == 0, err
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in model.graph.output][-1] == f"present.{LAYERS - 1}.value"
    feed = token_batch(2, 6, seed=3)
    calib = check_calibration(feed, model)
    (logits, *_) = session(out).run(None, calib.inputs)
    np.testing.assert_allclose(logits, hf_logits(load_hf_model(folder / "hf"), feed), atol=1e-4)

    code, _, err = _cli(capsys, "export", f"hf:{tmp_path / 'missing'}", "-o", tmp_path / "m.onnx")
    assert code == 2 and "folder not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(capsys, "export", "graphs:tiny_resnet", "-o", tmp_path / "m.onnx", "--with-cache")
    assert code == 2 and "hf:DIR" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    code, _, err = _cli(capsys, "compress", staged("qwen2", "legacy"), "-o", tmp_path / "p.onnx",
                        "--calib", folder / "calib.npz", "--torch-model", f"hf:{tmp_path / 'broken'}")
    assert code == 2 and "config" in err and not (tmp_path / "p.onnx").exists()
