"""Train the tiny Llama on CPython's documentation text and save its artifacts.

    python -m models.train_llm

Writes models/tinyllama_pydoc/ (save_pretrained), models/tinyllama_pydoc.calib.npz
(train-text windows, a few right-padded), models/pydoc.test.npz (every
non-overlapping held-out window) and the ONNX exports
models/tinyllama_pydoc.onnx (no cache) and models/tinyllama_pydoc.kv.onnx
(KV cache), and prints the held-out perplexity. `--export-only` redoes the
exports from the saved folder without training.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from .pydoc_text import PAD_ID, fixed_windows, token_stream
from .tiny_llama import PYDOC_DIR, tiny_llama

MODELS_DIR = Path(__file__).resolve().parent
CALIB_PATH = MODELS_DIR / "tinyllama_pydoc.calib.npz"
TEST_PATH = MODELS_DIR / "pydoc.test.npz"
ONNX_PATH = MODELS_DIR / "tinyllama_pydoc.onnx"
KV_ONNX_PATH = MODELS_DIR / "tinyllama_pydoc.kv.onnx"

SEQ_LEN = 128
CALIB_ROWS = 64
CALIB_PADDED_ROWS = 8


def causal_lm_nll(logits: np.ndarray | torch.Tensor, input_ids, attention_mask) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    Token t+1 is scored from position t only where both are real tokens
    (attention_mask == 1), so right padding never counts.
    """
    logits = torch.as_tensor(logits).double()
    ids = torch.as_tensor(input_ids)
    mask = torch.as_tensor(attention_mask).bool()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    keep = mask[:, 1:] & mask[:, :-1]
    return float(nll[keep].sum()), int(keep.sum())


@torch.no_grad()
def perplexity(model, input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int = 32) -> float:
    """Token-level perplexity exp(mean NLL) of a causal LM over fixed windows."""
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        ids = torch.from_numpy(input_ids[start : start + batch_size])
        mask = torch.from_numpy(attention_mask[start : start + batch_size])
        logits = model(input_ids=ids, attention_mask=mask).logits
        s, n = causal_lm_nll(logits, ids, mask)
        total, count = total + s, count + n
    return math.exp(total / count)


def calibration_windows(stream: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random train-text windows; the last rows are right-padded so the mask matters."""
    starts = rng.integers(0, len(stream) - SEQ_LEN, size=CALIB_ROWS)
    ids = np.stack([stream[s : s + SEQ_LEN] for s in starts]).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(CALIB_ROWS - CALIB_PADDED_ROWS, CALIB_ROWS):
        length = int(rng.integers(SEQ_LEN // 4, SEQ_LEN - 8))
        ids[row, length:] = PAD_ID
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def heldout_windows() -> dict[str, np.ndarray]:
    ids = fixed_windows(token_stream("heldout"), SEQ_LEN)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def train(*, steps: int, batch_size: int, lr: float, warmup: int, seed: int, log_every: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stream = torch.from_numpy(token_stream("train"))
    test = heldout_windows()
    model = tiny_llama()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        # Linear warmup, then cosine down to a tenth of the peak.
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    start_time = time.time()
    running = 0.0
    for step in range(steps):
        model.train()
        starts = rng.integers(0, len(stream) - SEQ_LEN, size=batch_size)
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = log_every if (step + 1) % log_every == 0 else (step + 1) % log_every
            model.eval()
            ppl = perplexity(model, test["input_ids"], test["attention_mask"])
            print(
                f"step {step + 1:5d}/{steps}  train loss {running / n:.4f}  "
                f"held-out ppl {ppl:.3f}  lr {lr_at(step):.2e}  {time.time() - start_time:6.0f}s",
                flush=True,
            )
            running = 0.0
    print(f"training time: {time.time() - start_time:.0f}s", flush=True)
    return model.eval()


def export_onnx(model_dir: Path) -> None:
    """Both ONNX exports (dynamo), then the ONNX Runtime perplexity as a cross-check."""
    import onnxruntime as ort

    from sglp_onnx.tools.export.hf import export_hf

    export_hf(model_dir, ONNX_PATH, with_cache=False)
    export_hf(model_dir, KV_ONNX_PATH, with_cache=True)
    test = heldout_windows()
    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    total, count = 0.0, 0
    for start in range(0, len(test["input_ids"]), 32):
        ids = test["input_ids"][start : start + 32]
        mask = test["attention_mask"][start : start + 32]
        (logits,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        s, n = causal_lm_nll(logits, ids, mask)
        total, count = total + s, count + n
    print(f"wrote {ONNX_PATH.name} and {KV_ONNX_PATH.name}; "
          f"held-out perplexity in ONNX Runtime: {math.exp(total / count):.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    # One thread by default: on 2 cores shared with other jobs, two OpenMP
    # threads spin-wait for each other and were measured at 7x the CPU time
    # per step of a single thread.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=PYDOC_DIR)
    parser.add_argument("--export-only", action="store_true", help="skip training; re-export the saved model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.export_only:
        export_onnx(args.out)
        return

    model = train(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        log_every=args.log_every,
    )
    model.save_pretrained(str(args.out), safe_serialization=True)

    test = heldout_windows()
    np.savez_compressed(TEST_PATH, **test)
    calib = calibration_windows(token_stream("train"), np.random.default_rng(args.seed + 1))
    np.savez_compressed(CALIB_PATH, **calib)

    ppl = perplexity(model, test["input_ids"], test["attention_mask"])
    n_tokens = int((test["attention_mask"][:, 1:] * test["attention_mask"][:, :-1]).sum())
    print(
        f"held-out perplexity: {ppl:.4f} over {len(test['input_ids'])} windows x {SEQ_LEN} tokens "
        f"({n_tokens} predicted bytes, {math.log2(ppl):.4f} bits/byte)",
        flush=True,
    )
    export_onnx(args.out)


if __name__ == "__main__":
    main()
