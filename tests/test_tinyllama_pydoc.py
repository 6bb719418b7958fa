"""The committed tiny Llama trained on CPython's documentation, and its ONNX exports.

`models/tinyllama_pydoc.onnx` must reproduce the transformers model's
held-out perplexity, and `models/tinyllama_pydoc.kv.onnx` must decode
greedily exactly like it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.pydoc_text import BOS_ID, VOCAB_SIZE, decode, encode, split_topics, token_stream
from models.tiny_llama import PYDOC_DIR, load_tiny_llama, tiny_llama_config
from models.train_llm import causal_lm_nll, perplexity

MODELS = Path(__file__).resolve().parents[1] / "models"
ONNX_PATH = MODELS / "tinyllama_pydoc.onnx"
KV_PATH = MODELS / "tinyllama_pydoc.kv.onnx"
TEST_NPZ = MODELS / "pydoc.test.npz"
CALIB_NPZ = MODELS / "tinyllama_pydoc.calib.npz"
# Printed by `python -m models.train_llm` for the committed weights.
HELDOUT_PERPLEXITY = 4.0537


@pytest.fixture(scope="module")
def hf_model():
    return load_tiny_llama(PYDOC_DIR)


@pytest.fixture(scope="module")
def test_data():
    data = np.load(TEST_NPZ)
    return data["input_ids"], data["attention_mask"]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_perplexity(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, batch: int = 32) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids), batch):
        (logits,) = sess.run(None, {"input_ids": ids[start:start + batch], "attention_mask": mask[start:start + batch]})
        s, n = causal_lm_nll(logits, ids[start:start + batch], mask[start:start + batch])
        total, count = total + s, count + n
    return math.exp(total / count)


def test_tokenizer_round_trips_and_split_is_disjoint():
    text = "def f(x):\n    return x ** 2  # é ∑"
    assert decode(encode(text)) == text
    assert decode([BOS_ID, *encode("ab"), VOCAB_SIZE - 1]) == "ab"
    train, held = split_topics()
    assert held and train and not set(train) & set(held)
    assert token_stream("heldout")[0] == BOS_ID


def test_committed_model_matches_its_factory_config(hf_model):
    assert hf_model.config.num_hidden_layers == tiny_llama_config().num_hidden_layers >= 8
    assert hf_model.config.vocab_size == VOCAB_SIZE


def test_data_files_hold_the_documented_windows(test_data):
    ids, mask = test_data
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape and ids.shape[1] == 128
    # The test windows are the held-out stream cut in order, so they can be regenerated.
    assert np.array_equal(ids.reshape(-1), token_stream("heldout")[: ids.size])
    calib = np.load(CALIB_NPZ)
    assert calib["input_ids"].dtype == np.int64 and calib["input_ids"].shape == calib["attention_mask"].shape
    assert 0 < (calib["attention_mask"] == 0).sum(axis=1).astype(bool).sum() < len(calib["input_ids"])


def test_onnx_reproduces_heldout_perplexity(hf_model, test_data):
    ids, mask = test_data
    # Exact agreement with transformers on a slice (transformers is the slow side)...
    want = perplexity(hf_model, ids[:64], mask[:64])
    assert onnx_perplexity(session(ONNX_PATH), ids[:64], mask[:64]) == pytest.approx(want, rel=1e-5)
    # ...and over every held-out window, the number models/train_llm.py printed (models/README.md).
    assert onnx_perplexity(session(ONNX_PATH), ids, mask) == pytest.approx(HELDOUT_PERPLEXITY, abs=1e-4)


def test_kv_onnx_decodes_like_transformers(hf_model):
    sess = session(KV_PATH)
    prompt = np.asarray([[BOS_ID, *encode("The for statement is used to")]], dtype=np.int64)
    feeds = {
        "input_ids": prompt,
        "attention_mask": np.ones_like(prompt),
        "position_ids": np.arange(prompt.shape[1], dtype=np.int64)[None],
    }
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    generated = []
    for _ in range(24):
        out = dict(zip(names, sess.run(None, feeds)))
        token = int(out["logits"][0, -1].argmax())
        generated.append(token)
        length = out["present.0.key"].shape[2]
        feeds = {
            "input_ids": np.asarray([[token]], dtype=np.int64),
            "attention_mask": np.ones((1, length + 1), dtype=np.int64),
            "position_ids": np.asarray([[length]], dtype=np.int64),
        }
        feeds.update({"past_key_values." + n[len("present."):]: v for n, v in out.items() if n.startswith("present.")})
    # Reference: recompute the whole sequence each step, no cache involved.
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(24):
            next_id = hf_model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert generated == ids[0, prompt.shape[1]:].tolist()
