"""Tiny Hugging Face transformers (Llama, Qwen2, GPT-2, OPT, Gemma 2, BERT, ViT) built
from configs with random weights (nothing is downloaded), and what tests
compare a pruned export of one with: the model with those layers deleted,
its logits, and greedy decoding with a KV cache, in transformers and in
ONNX Runtime."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB = 97
LAYERS = 4
SEQ = 12
IMAGE = 32

# initializer_range 0.2 (10x the default) makes the random models' logits
# peaked, so greedy decoding has clear winners and layers matter.
CONFIGS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0)),
    # OPT flattens the hidden state to (tokens, hidden) around its MLP: a layer's
    # two residuals chain through Reshapes.
    "opt": lambda: OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, init_std=0.2, pad_token_id=1)),
    # Gemma 2 soft-caps its logits: c * tanh(logits / c).
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2,
        final_logit_softcapping=5.0)),
    "bert": lambda: BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.2)),
    "vit": lambda: ViTForImageClassification(ViTConfig(
        image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=64, num_labels=5, initializer_range=0.2)),
}


def token_batch(n: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids; a quarter of the rows (at least one) right-padded from a random position."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n, length), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(n - max(1, n // 4), n):
        mask[row, rng.integers(length // 2, length):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def inputs_for(arch: str, n: int, seed: int) -> dict[str, np.ndarray]:
    if arch == "vit":
        return {"pixel_values": np.random.default_rng(seed).standard_normal((n, 3, IMAGE, IMAGE)).astype(np.float32)}
    return token_batch(n, SEQ, seed)


def layer_list(model: nn.Module) -> str:
    """Path of the model's stack of layers: the ModuleList with one entry per hidden layer."""
    n = model.config.num_hidden_layers
    return next(name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n)


def delete_layers(model: nn.Module, removed: set[int]) -> nn.Module:
    """A copy of `model` without the layers in `removed`, renumbered as transformers would build it."""
    clone = copy.deepcopy(model)
    path = layer_list(clone)
    parent, _, child = path.rpartition(".")
    layers = clone.get_submodule(path)
    kept = [i for i in range(len(layers)) if i not in removed]
    setattr(clone.get_submodule(parent), child, nn.ModuleList([layers[i] for i in kept]))
    types = getattr(clone.config, "layer_types", None)
    clone.config.num_hidden_layers = len(kept)
    if isinstance(types, list):
        clone.config.layer_types = [types[i] for i in kept]
    for new, old in enumerate(kept):
        for module in layers[old].modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    return clone.eval()


@torch.no_grad()
def hf_logits(model: nn.Module, feed: dict[str, np.ndarray]) -> np.ndarray:
    return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def removed_layers(report: dict) -> set[int]:
    return {int(k) for k, v in report["kv_cache"]["layer_map"].items() if v is None}


def onnx_greedy(sess: ort.InferenceSession, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding feeding every `present.i.*` output back as `past_key_values.i.*`."""
    batch, length = prompt.shape
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt),
             "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1))}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((batch, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    tokens = []
    for _ in range(steps):
        out = dict(zip(names, sess.run(None, feeds)))
        token = out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(token)
        total = next(v for k, v in out.items() if k.startswith("present.")).shape[2] + 1
        feeds = {"input_ids": token, "attention_mask": np.ones((batch, total), dtype=np.int64),
                 "position_ids": np.full((batch, 1), total - 1, dtype=np.int64)}
        feeds.update({"past_key_values." + k[len("present."):]: v for k, v in out.items() if k.startswith("present.")})
    return np.concatenate(tokens, axis=1)


@torch.no_grad()
def hf_greedy(model: nn.Module, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding with transformers' own KV cache (which indexes layers by layer_idx)."""
    out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
    tokens = []
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1).numpy()
