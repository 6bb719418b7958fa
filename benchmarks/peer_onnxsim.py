"""sglp-onnx against the one ONNX peer: onnxsim 0.8.1's `apply_transformer_block_pruning`.

    python benchmarks/peer_onnxsim.py       # part of make bench-quality

onnxsim ranks pre-norm transformer sub-blocks (`x = x + Attn(LN(x))`,
`x = x + MLP(LN(x))`, joined by a bare Add) by the cosine similarity of
their input and output on calibration batches, drops the most similar ones
in one shot and adds no compensation. Both tools get the same model and the
same calibration data (the model's sidecar, all 256 samples for onnxsim;
sglp-onnx holds every 5th out for its fidelity check and selects on the
rest) and remove the same number of sub-blocks (`--granularity sublayer
--remove N`). Scored on the test split, which neither tool reads: top-1
accuracy, top-1 agreement with the unpruned model and mean KL divergence
from its output distribution. A model on which onnxsim matches no block is
listed with that result. Writes benchmarks/results/peer_onnxsim.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, describe, publish  # noqa: E402

import onnx  # noqa: E402

from sglp_onnx.graph import make_session, set_threads  # noqa: E402
from sglp_onnx.pipeline import compress  # noqa: E402

COUNTS = (2, 4, 6)
BATCH = 64


def outputs(model, x: np.ndarray) -> np.ndarray:
    session = make_session(model)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])


def scores(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    def logp(z):
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    p, q = logp(reference), logp(logits)
    return {"accuracy": float((logits.argmax(1) == labels).mean()),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "kl": float((np.exp(p) * (p - q)).sum(1).mean())}


def main() -> None:
    import onnxsim

    set_threads(1)
    model_path = MODELS_DIR / "vit_digits.onnx"
    calib = dict(np.load(MODELS_DIR / "vit_digits.calib.npz"))
    test = np.load(MODELS_DIR / "digits.test.npz")
    x, y = test["input"], test["labels"]
    model = onnx.load(str(model_path))
    reference = outputs(model, x)
    base = scores(reference, reference, y)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in COUNTS:
            batches = [{"input": calib["input"][i:i + BATCH]} for i in range(0, len(calib["input"]), BATCH)]
            start = time.perf_counter()
            theirs = onnxsim.apply_transformer_block_pruning(model, calibration_data=batches,
                                                            num_samples=len(calib["input"]), num_blocks_to_drop=n,
                                                            providers=["CPUExecutionProvider"])
            seconds = time.perf_counter() - start
            dropped = (len(model.graph.node) - len(theirs.graph.node))
            rows.append(("onnxsim 0.8.1 apply_transformer_block_pruning", n, seconds,
                         scores(outputs(theirs, x), reference, y), f"{dropped} nodes dropped"))
            for label, repair in (("sglp-onnx default (measured damage + repair)", "full"),
                                  ("sglp-onnx --repair none", "none")):
                start = time.perf_counter()
                result = compress(model_path, Path(tmp) / f"vit.{n}.{repair}.onnx", remove=n,
                                  granularity="sublayer", repair=repair, force=True)
                seconds = time.perf_counter() - start
                rows.append((label, n, seconds, scores(outputs(result.pruned, x), reference, y),
                             ", ".join(result.report["removed"])))
            for row in rows[-3:]:
                print(f"-{row[1]} {row[0]}: {row[3]} ({row[2]:.1f} s)", flush=True)
    llama = onnx.load(str(MODELS_DIR / "tinyllama_pydoc.onnx"))
    ids = dict(np.load(MODELS_DIR / "tinyllama_pydoc.calib.npz"))
    pruned = onnxsim.apply_transformer_block_pruning(
        llama, calibration_data=[{k: v[i:i + 16] for k, v in ids.items()} for i in range(0, 64, 16)],
        num_blocks_to_drop=4, providers=["CPUExecutionProvider"])
    llama_note = ("unchanged: no block matched" if len(pruned.graph.node) == len(llama.graph.node)
                  else f"{len(llama.graph.node) - len(pruned.graph.node)} nodes dropped")
    lines = [
        "# sglp-onnx against onnxsim's transformer block pruning",
        "",
        f"Machine: {describe()}; shared with other jobs, so times are indicative. One ONNX Runtime thread.",
        "",
        "Command: `python benchmarks/peer_onnxsim.py` (part of `make bench-quality`). Model "
        "`models/vit_digits.onnx` (pre-norm ViT, 8 layers = 16 sub-blocks, LayerNormalization and bare Add "
        f"joins: the pattern onnxsim matches); unpruned test accuracy **{100 * base['accuracy']:.1f}%** on "
        f"{len(y)} test images. Both tools calibrate on `models/vit_digits.calib.npz`; each row removes the "
        "same number of sub-blocks (sglp-onnx: `--granularity sublayer --remove N`). Test-set scores only "
        "(neither tool reads the test split): accuracy, top-1 agreement with the unpruned model, and mean KL "
        "divergence from its output distribution (nats).",
        "",
        "| sub-blocks removed | tool | test accuracy | agreement | KL | time (s) | removed |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for label, n, seconds, s, removed in rows:
        lines.append(f"| {n} | {label} | {100 * s['accuracy']:.1f} | {100 * s['agreement']:.1f} | "
                     f"{s['kl']:.4f} | {seconds:.1f} | {removed} |")
    lines += ["", f"The tiny Llama (`models/tinyllama_pydoc.onnx`, RMSNorm decoder) with onnxsim asked to drop 4 "
                  f"sub-blocks: {llama_note}; sglp-onnx prunes it (see the LLM section of quality.md)."]
    publish(lines, RESULTS_DIR / "peer_onnxsim.md")


if __name__ == "__main__":
    main()
