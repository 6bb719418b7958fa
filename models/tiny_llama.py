"""A small Llama decoder for byte-level text, built from a config (no downloads).

`tiny_llama()` is the untrained model; `load_tiny_llama(dir)` and
`tiny_llama_pydoc()` load trained weights saved with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from .pydoc_text import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

PYDOC_DIR = Path(__file__).resolve().parent / "tinyllama_pydoc"


def tiny_llama_config() -> LlamaConfig:
    """8 decoder layers, hidden 128, 4 query heads sharing 2 KV heads (GQA).

    The SwiGLU MLP has three matrices, so an intermediate size of 3x hidden
    (Llama uses 8/3x) costs what a 4x two-matrix MLP would; it also keeps
    the weights and their two ONNX exports near 20 MB in all.

    Grouped-query attention is deliberate: it makes the KV-cache shapes
    (batch, kv_heads, past, head_dim) differ from the query heads, which is
    what exported LLMs look like. Embeddings are untied so the saved state
    dict loads strictly into `tiny_llama()` without tying logic.
    """
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def tiny_llama() -> LlamaForCausalLM:
    """Untrained model in eval mode (seed torch first for reproducible weights)."""
    return LlamaForCausalLM(tiny_llama_config()).eval()


def load_tiny_llama(directory: str | Path) -> LlamaForCausalLM:
    """Model saved with `save_pretrained` in `directory`, in eval mode."""
    return LlamaForCausalLM.from_pretrained(str(directory)).eval()


def tiny_llama_pydoc() -> LlamaForCausalLM:
    """The committed model trained on CPython's documentation (models/train_llm.py)."""
    return load_tiny_llama(PYDOC_DIR)
