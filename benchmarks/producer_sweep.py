"""Decoder families as optimum-onnx exports them, through the CLI: what a new
user who brings a Hugging Face model gets.

For each architecture, a tiny model (5 layers, hidden 64, random weights,
nothing downloaded) is built from its config and exported by optimum-onnx's
`main_export` (text-generation-with-past) in its own process, with the
transformers optimum-onnx requires (installed beside the environment, see
tests/test_producers.py). Then, in fresh processes:

- `sglp-onnx compress MODEL --remove 2` with the default options: exit code,
  removed layers, units and sublayers, the fidelity kind and score;
- `... --criterion last --repair none`: the pruned model against this
  environment's transformers with the last two layers deleted, on the
  unpadded tokens of 4 left-padded sequences (an empty KV cache).

Writes benchmarks/results/producer_sweep.md. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
LAYERS, VOCAB, SEQ, SAMPLES, REMOVE = 5, 300, 20, 24, 2
ARCHS = ("qwen2", "qwen3", "phi3", "gemma", "gemma2", "mistral", "gpt_neox", "opt", "falcon", "phi", "bloom",
         "gptj", "granite", "olmo", "stablelm")

BUILD = r"""
import sys, torch, transformers as T
from optimum.exporters.onnx import main_export
name, folder = sys.argv[1:3]
torch.manual_seed(0)
common = dict(vocab_size=%(vocab)d, hidden_size=64, num_hidden_layers=%(layers)d, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=128)
configs = {
    "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **common),
    "qwen3": lambda: T.Qwen3Config(num_key_value_heads=2, head_dim=16, **common),
    "phi3": lambda: T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common),
    "gemma": lambda: T.GemmaConfig(num_key_value_heads=2, head_dim=16, **common),
    "gemma2": lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=16, **common),
    "mistral": lambda: T.MistralConfig(num_key_value_heads=2, **common),
    "gpt_neox": lambda: T.GPTNeoXConfig(**common),
    "opt": lambda: T.OPTConfig(vocab_size=%(vocab)d, hidden_size=64, num_hidden_layers=%(layers)d, num_attention_heads=4,
                               ffn_dim=128, max_position_embeddings=128, word_embed_proj_dim=64),
    "falcon": lambda: T.FalconConfig(vocab_size=%(vocab)d, hidden_size=64, num_hidden_layers=%(layers)d,
                                     num_attention_heads=4, new_decoder_architecture=False),
    "phi": lambda: T.PhiConfig(**common),
    "bloom": lambda: T.BloomConfig(vocab_size=%(vocab)d, hidden_size=64, n_layer=%(layers)d, n_head=4),
    "gptj": lambda: T.GPTJConfig(vocab_size=%(vocab)d, n_embd=64, n_layer=%(layers)d, n_head=4, rotary_dim=8,
                                 n_positions=128),
    "granite": lambda: T.GraniteConfig(num_key_value_heads=2, **common),
    "olmo": lambda: T.OlmoConfig(num_key_value_heads=2, **common),
    "stablelm": lambda: T.StableLmConfig(num_key_value_heads=2, **common),
}
T.AutoModelForCausalLM.from_config(configs[name]()).save_pretrained(f"{folder}/hf")
main_export(model_name_or_path=f"{folder}/hf", output=f"{folder}/onnx", task="text-generation-with-past",
            device="cpu", local_files_only=True, do_validation=False)
""" % {"vocab": VOCAB, "layers": LAYERS}


def optimum_path() -> str:
    path = os.environ.get("SGLP_OPTIMUM_PATH") or str(Path(sys.prefix) / "optimum-onnx")
    if not Path(path).is_dir():
        raise SystemExit(f"optimum-onnx is not installed in {path} (make .venv/.installed-test installs it)")
    return path


def progress(text: str) -> None:
    print(f"[producer_sweep {time.strftime('%H:%M:%S')}] {text}", flush=True)


def compress(model: Path, calib: Path, out: Path, *extra: str) -> tuple[int, str, dict | None]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "sglp_onnx.cli", "-q", "compress", str(model), "--calib",
                           str(calib), "-o", str(out), "--remove", str(REMOVE), "--force", *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    report = json.loads(out.with_suffix(".json").read_text()) if done.returncode == 0 else None
    return done.returncode, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "", report


def layer_stack(model):
    for path in ("model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.h"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return path
    raise ValueError(f"no layer stack in {type(model).__name__}")


def reference_error(folder: Path, pruned: Path, calib: dict) -> float:
    """Max |pruned - transformers without the last REMOVE layers| on unpadded tokens."""
    import onnxruntime as ort
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf").eval()
    smaller = copy.deepcopy(model)
    path = layer_stack(smaller)
    parent, _, child = path.rpartition(".")
    holder = smaller.get_submodule(parent)
    setattr(holder, child, torch.nn.ModuleList(list(getattr(holder, child))[:-REMOVE]))
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(smaller.config, key):
            setattr(smaller.config, key, LAYERS - REMOVE)
    if getattr(smaller.config, "layer_types", None):
        smaller.config.layer_types = smaller.config.layer_types[:-REMOVE]
    feed = {k: v[:4] for k, v in calib.items()}
    with torch.no_grad():
        want = smaller(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(pruned), options, providers=["CPUExecutionProvider"])
    run_feed = dict(feed)
    for i in session.get_inputs():
        if i.name.startswith("past"):
            run_feed[i.name] = np.zeros([4 if k == 0 else (0 if isinstance(d, str) else d)
                                         for k, d in enumerate(i.shape)], np.float32)
    got = session.run(None, run_feed)[0]
    return float(np.abs(got - want)[feed["attention_mask"].astype(bool)].max())


def sweep(arch: str, root: Path, pythonpath: str) -> dict:
    folder = root / arch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", BUILD, arch, str(folder)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"arch": arch, "export": done.stderr.strip().splitlines()[-1][:200]}
    model = folder / "onnx" / "model.onnx"
    inputs = {i.name for i in onnx.load(str(model), load_external_data=False).graph.input}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (SAMPLES, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::3, :4] = 0  # a third of the rows left-padded
    calib = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in inputs:
        calib["position_ids"] = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int64)
    np.savez(folder / "calib.npz", **calib)
    row = {"arch": arch, "export": "ok"}
    code, err, report = compress(model, folder / "calib.npz", folder / "default.onnx")
    row["default"] = f"{code}: {err[:150]}" if code else (
        f"0: removed {', '.join(report['removed'])}; {len(report['units'])} units of "
        f"{'/'.join(sorted({str(u['sublayers']) for u in report['units']}))} sublayers; "
        f"{report['fidelity']['kind']} {report['fidelity']['score']:.3g}")
    code, err, report = compress(model, folder / "calib.npz", folder / "last.onnx", "--criterion", "last",
                                 "--repair", "none")
    row["last"] = f"{code}: {err[:150]}" if code else f"{reference_error(folder, folder / 'last.onnx', calib):.2g}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "producer_sweep.md")
    args = parser.parse_args()
    pythonpath = optimum_path()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sglp-sweep-") as tmp:
        for arch in args.only:
            progress(arch)
            rows.append(sweep(arch, Path(tmp), pythonpath))
    import onnxruntime
    import torch
    import transformers

    lines = [
        "# Decoder families exported by optimum-onnx, through the CLI",
        "",
        f"Command: `python benchmarks/producer_sweep.py` ({time.perf_counter() - start:.0f} s). Each model: "
        f"{LAYERS} layers, hidden 64, a {VOCAB}-token vocabulary, random weights, exported by optimum-onnx 0.1.0 "
        "(`main_export`, text-generation-with-past, its own transformers 4.57); calibration: "
        f"{SAMPLES} random sequences of {SEQ} tokens, a third left-padded. Reference: transformers "
        f"{transformers.__version__} (this environment), onnxruntime {onnxruntime.__version__}, torch "
        f"{torch.__version__}.",
        "",
        f"| architecture | export | `compress --remove {REMOVE}` (defaults): exit code, result | "
        f"`--criterion last --repair none`: max abs error against transformers without the last {REMOVE} layers "
        "(unpadded tokens) |",
        "|---|---|---|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['arch']} | {row['export']} | {row.get('default', '-')} | {row.get('last', '-')} |")
    args.output.write_text("\n".join(lines) + "\n")
    progress(f"wrote {args.output}")


if __name__ == "__main__":
    main()
