"""`compress` on a decoder at LLM scale: a Llama of about 1.1 B parameters
(TinyLlama's shape: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads,
vocabulary 32000) with random weights, exported here with its KV cache and
external data by `sglp_onnx.export_hf` (nothing is downloaded or committed).

`--remove 4`, one-shot and `--sequential`, gradient-free (criterion sglp
without gradients: CKA segments, entry-to-exit CKA inside them) and with the
paired model `hf:DIR` (criterion sglp with GradNorm). Each run is a fresh
process; peak RSS is its VmHWM. The floor is measured in the same run
(see `measured_compress.baseline`). Needs about 25 GB of disk and 16 GB of RAM;
writes benchmarks/results/llm_scale.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import RESULTS_DIR, ROOT, describe, peak_rss_gib, publish, run_child  # noqa: E402
from benchmarks.measured_compress import floor_sentence, run_in, stage_cells  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def build(folder: Path, *, layers: int) -> dict:
    """The HF folder (for hf:DIR), the ONNX export with KV cache, and how long each took."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglp_onnx.tools import export_hf

    torch.manual_seed(0)
    start = time.perf_counter()
    model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": layers})).float().eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / "hf")
    made = time.perf_counter() - start
    start = time.perf_counter()
    export_hf(model, folder / "llama.onnx", with_cache=True)
    exported = time.perf_counter() - start
    del model
    gc.collect()
    return {"params": params, "build_s": made, "export_s": exported,
            "rss_gib": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--remove", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--folder", type=Path, help="where to build the model (default: a temporary folder)")
    parser.add_argument("--runs", nargs="+", default=["one-shot", "sequential", "one-shot+hf", "sequential+hf"],
                        choices=["one-shot", "sequential", "one-shot+hf", "sequential+hf"])
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "llm_scale.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sglp-llm-", dir=args.folder) as tmp:
        folder = Path(tmp)
        # Built in a child so that the torch model's memory is gone before the runs.
        info = run_child([sys.executable, "-c", (
            "import json, sys; from pathlib import Path; sys.path.insert(0, %r); "
            "from benchmarks.llm_scale import build; print(json.dumps(build(Path(%r), layers=%d)))"
        ) % (str(ROOT), str(folder), args.layers)])
        if "failed" in info:
            raise SystemExit(f"building the model failed: {info['failed']}")
        print("built", info, flush=True)
        model = folder / "llama.onnx"
        weights = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("llama.onnx"))
        rng = np.random.default_rng(0)
        ids = rng.integers(0, SHAPE["vocab_size"], (args.samples, args.tokens), dtype=np.int64)
        np.savez(folder / "llama.calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))

        floor = run_in(folder, "floor", model, sequential=False, batch_size=args.batch_size, floor=True)
        results = {}
        for run in args.runs:
            options = {"remove": args.remove, "criterion": "sglp"}
            if run.endswith("+hf"):
                options["torch_model"] = f"hf:{folder / 'hf'}"
            results[run] = run_in(folder, run, model, sequential=run.startswith("sequential"),
                                  batch_size=args.batch_size, options=options)

    gib = weights / 2**30
    lines = [
        "# `compress` on a 1 B-parameter decoder with its KV cache",
        "",
        f"Machine: {describe()}.",
        "",
        f"Command: `python benchmarks/llm_scale.py`: a Llama of {info['params'] / 1e9:.2f} B parameters "
        f"({args.layers} layers, hidden {SHAPE['hidden_size']}, MLP {SHAPE['intermediate_size']}, "
        f"{SHAPE['num_attention_heads']} heads, {SHAPE['num_key_value_heads']} KV heads, vocabulary "
        f"{SHAPE['vocab_size']}) with random weights, built in {info['build_s']:.0f} s and exported by "
        f"`export_hf(..., with_cache=True)` in {info['export_s']:.0f} s: {gib:.2f} GiB in `llama.onnx` + "
        f"`llama.onnx.data`. Calibration: {args.samples} random token sequences of {args.tokens} tokens "
        f"(a quarter held out), batch {args.batch_size}; `compress --remove {args.remove} --criterion sglp`, "
        "gradient-free or with `--torch-model hf:DIR` (GradNorm on the paired model); each run in a fresh process.",
        "",
        floor_sentence(floor),
        "",
        "| run | result | wall s | x floor | peak RSS GiB | x model size | stage seconds | "
        "peak RSS GiB at the end of each stage |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for run, r in results.items():
        if "failed" in r:
            lines.append(f"| {run} | failed (exit {r['returncode']}): {r['failed']} | {r['seconds']:.1f} | | "
                         f"{r['peak_rss_gib']:.2f} | | | |")
            continue
        stages, peaks = stage_cells(r)
        lines.append(f"| {run} | removed {r['removed']}/{r['units']} units | {r['seconds']:.1f} | "
                     f"{r['seconds'] / floor['seconds']:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['peak_rss_gib'] / gib:.2f} | {stages} | {peaks} |")
    publish(lines, args.output)


if __name__ == "__main__":
    main()
