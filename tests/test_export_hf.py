"""Hugging Face causal LMs -> ONNX, with and without a KV cache, with both exporters.

Tiny random Llama, Qwen2, Mistral and GPT-2 models are built from configs and saved
to a temporary folder (nothing is downloaded). Every export is done once per
module and shared by the tests that read it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sglp_onnx.errors import UserError
from sglp_onnx.tools.export.hf import export_hf, input_names, output_names

VOCAB = 97
LAYERS = 2
NEW_TOKENS = 16

# initializer_range well above the default 0.02 makes random models' logits
# peaked, so greedy decoding has clear winners instead of near-ties that a
# 1e-7 difference between runtimes could flip.
CONFIGS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)),
    # A sliding window shorter than the generated sequence: the exported cache
    # keeps every position and the attention mask applies the window.
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
        initializer_range=0.2)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, initializer_range=0.2)),
}

# A dynamo export takes 7-10 s on 2 cores: Qwen2's and Mistral's (Llama-like)
# and GPT-2's run with the slow tests (make test-slow); their legacy exports,
# and Llama's dynamo export, always run.
SLOW = {("qwen2", "dynamo"), ("mistral", "dynamo"), ("gpt2", "dynamo")}
CASES = [pytest.param(arch, exporter, marks=[pytest.mark.slow] if (arch, exporter) in SLOW else [],
                      id=f"{arch}-{exporter}")
         for arch in CONFIGS for exporter in ("dynamo", "legacy")]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for arch, build in CONFIGS.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(arch)
        build().save_pretrained(str(path))
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="module")
def exported(model_dirs):
    """Export on first use, keyed by (arch, exporter, with_cache)."""
    cache: dict = {}

    def get(arch: str, exporter: str, with_cache: bool):
        key = (arch, exporter, with_cache)
        if key not in cache:
            path = model_dirs[arch] / f"{exporter}{'.kv' if with_cache else ''}.onnx"
            proto = export_hf(model_dirs[arch], path, with_cache=with_cache, exporter=exporter)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            cache[key] = (proto, session)
        return cache[key]

    return get


def reference(model_dirs, arch):
    return AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]), dtype=torch.float32).eval()


def empty_past(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors, with kv_heads and head_dim read from the graph."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = inp.shape
            feeds[inp.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32)
    return feeds


def onnx_greedy(session: ort.InferenceSession, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding that feeds every `present.i.*` back as `past_key_values.i.*`."""
    batch, length = prompt.shape
    feeds = {
        "input_ids": prompt,
        "attention_mask": np.ones_like(prompt),
        "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1)),
        **empty_past(session, batch),
    }
    names = [o.name for o in session.get_outputs()]
    tokens = []
    for _ in range(steps):
        outputs = dict(zip(names, session.run(None, feeds)))
        token = outputs["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(token)
        past_len = outputs["present.0.key"].shape[2]
        feeds = {
            "input_ids": token,
            "attention_mask": np.ones((batch, past_len + 1), dtype=np.int64),
            "position_ids": np.full((batch, 1), past_len, dtype=np.int64),
        }
        for name, value in outputs.items():
            if name.startswith("present."):
                feeds["past_key_values." + name[len("present."):]] = value
    return np.concatenate(tokens, axis=1)


@torch.no_grad()
def torch_greedy(model, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding by recomputing the whole sequence each step (no cache at all)."""
    ids = torch.from_numpy(prompt)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:].numpy()


def random_batch(batch: int, length: int, seed: int, pad_from: int | None = None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    return ids, mask


@pytest.mark.parametrize("arch, exporter", CASES)
def test_logits_match_transformers(model_dirs, exported, arch, exporter):
    _, session = exported(arch, exporter, False)
    model = reference(model_dirs, arch)
    # Shapes other than the export example's, and a right-padded row.
    for batch, length, pad_from in [(1, 7, None), (3, 11, 6)]:
        ids, mask = random_batch(batch, length, seed=length, pad_from=pad_from)
        (got,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, exporter", CASES)
def test_cache_graph_generates_like_transformers(model_dirs, exported, arch, exporter):
    proto, session = exported(arch, exporter, True)
    assert [i.name for i in proto.graph.input] == input_names(LAYERS, with_cache=True)
    assert [o.name for o in proto.graph.output] == output_names(LAYERS, with_cache=True)
    model = reference(model_dirs, arch)
    prompt, _ = random_batch(2, 5, seed=1)
    assert np.array_equal(onnx_greedy(session, prompt, NEW_TOKENS), torch_greedy(model, prompt, NEW_TOKENS))


@pytest.mark.parametrize("arch, exporter", CASES)
def test_cache_graph_prefill_and_step_logits(model_dirs, exported, arch, exporter):
    """Logits and presents of one prefill and one cached step equal transformers' own cache path."""
    _, session = exported(arch, exporter, True)
    model = reference(model_dirs, arch)
    ids, _ = random_batch(3, 6, seed=2)
    names = [o.name for o in session.get_outputs()]
    feeds = {
        "input_ids": ids[:, :4],
        "attention_mask": np.ones((3, 4), dtype=np.int64),
        "position_ids": np.tile(np.arange(4), (3, 1)),
        **empty_past(session, 3),
    }
    first = dict(zip(names, session.run(None, feeds)))
    feeds = {
        "input_ids": ids[:, 4:],
        "attention_mask": np.ones((3, 6), dtype=np.int64),
        "position_ids": np.tile(np.arange(4, 6), (3, 1)),
    }
    feeds.update({"past_key_values." + n[len("present."):]: v for n, v in first.items() if n.startswith("present.")})
    second = dict(zip(names, session.run(None, feeds)))
    with torch.no_grad():
        full = model(input_ids=torch.from_numpy(ids), use_cache=True)
    np.testing.assert_allclose(first["logits"], full.logits[:, :4].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(second["logits"], full.logits[:, 4:].numpy(), atol=1e-4, rtol=1e-4)
    for i, layer in enumerate(full.past_key_values.layers):
        # A sliding-window layer keeps only its most recent positions; the graph keeps all 6.
        kept = layer.keys.shape[2]
        assert second[f"present.{i}.key"].shape[2] == 6
        np.testing.assert_allclose(second[f"present.{i}.key"][:, :, -kept:], layer.keys.numpy(), atol=1e-5)
        np.testing.assert_allclose(second[f"present.{i}.value"][:, :, -kept:], layer.values.numpy(), atol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_cache_signature_is_the_same_for_both_exporters(exported, exporter):
    proto, _ = exported("llama", exporter, True)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    assert dims["input_ids"] == dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["logits"] == ["batch_size", "sequence_length", VOCAB]
    # Llama config above: 2 KV heads of 32 / 4 = 8 dimensions each.
    for i in range(LAYERS):
        for kind in ("key", "value"):
            assert dims[f"past_key_values.{i}.{kind}"] == ["batch_size", 2, "past_sequence_length", 8]
            assert dims[f"present.{i}.{kind}"] == ["batch_size", 2, "total_sequence_length", 8]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_graph_records_hf_module_scopes(exported, exporter):
    """Unit discovery needs each node's decoder layer: metadata (dynamo) or node names (legacy)."""
    proto, _ = exported("llama", exporter, False)
    if exporter == "dynamo":
        scopes = [p.value for n in proto.graph.node for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        assert len(scopes) == len(proto.graph.node)
        # Scopes read as in the transformers model, with no wrapper prefix.
        assert any("'model.layers.1.self_attn'" in s for s in scopes)
        assert any("'model.layers.0.mlp'" in s for s in scopes)
    else:
        names = [n.name for n in proto.graph.node]
        assert any(name.startswith("/model/layers.1/self_attn/") for name in names)
        assert any(name.startswith("/model/layers.0/mlp/") for name in names)
    assert "model.embed_tokens.weight" in {t.name for t in proto.graph.initializer}


def test_accepts_a_loaded_model_and_restores_training_flag(tmp_path):
    torch.manual_seed(0)
    model = CONFIGS["gpt2"]().train()
    proto = export_hf(model, tmp_path / "m.onnx", exporter="legacy")
    assert model.training
    assert onnx.load(str(tmp_path / "m.onnx")).graph.output[0].name == proto.graph.output[0].name == "logits"


def test_user_errors(tmp_path, model_dirs):
    with pytest.raises(UserError, match="not found"):
        export_hf(tmp_path / "missing", tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        export_hf(tmp_path / "empty", tmp_path / "m.onnx")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load"):
        export_hf(tmp_path / "broken", tmp_path / "m.onnx")
    with pytest.raises(UserError, match="exporter"):
        export_hf(model_dirs["llama"], tmp_path / "m.onnx", exporter="jit")
    with pytest.raises(UserError, match="output folder"):
        export_hf(model_dirs["llama"], tmp_path / "nowhere" / "m.onnx", exporter="legacy")
    half = CONFIGS["llama"]().half()
    with pytest.raises(UserError, match="float"):
        export_hf(half, tmp_path / "m.onnx")
    with pytest.raises(UserError, match="not a Hugging Face language model"):
        export_hf(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
