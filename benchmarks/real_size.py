"""`compress` at real sizes, against the one-pass floor: time, peak memory and
where they go, with the bounded-memory must-holds checked.

Three sections, each model built in a temporary folder (nothing committed):
A. resnet50: ResNet-50 (models/resnet50.py, random weights) at 224x224,
   exported to ONNX (opset 17, dynamic batch), 128 random calibration images;
   `--remove 4` with the default criterion and with `--criterion sglp`.
B. mlp: the residual MLP of benchmarks/large_model.py, 16 blocks of width 2896
   (1 GiB of float32 weights in external data); `--remove 4`.
C. llm: the tiny Llama's architecture (models/tiny_llama.py) with a 32000-token
   vocabulary, random weights, exported by `export_hf` without a cache, 32
   random sequences of 128 tokens; `--remove 2`.
D. llm135m (only with `--only llm135m`, about 15 min): a Llama shaped like
   SmolLM-135M (30 layers, hidden 576, MLP 1536, 9 heads, 3 KV heads, a
   49152-token vocabulary, tied embeddings: 134.5 M parameters, 0.5 GiB),
   random weights, exported by `export_hf` without a cache, 32 random
   sequences of 128 tokens; `--remove 6`: the decoder the bounded-memory
   issue was measured on (16.9 GB peak, 48 min before the activation budget).
Every compress, and the floor (load, one ONNX Runtime pass over the
calibration set, write), runs in a fresh process; peak RSS is its VmHWM.
Writes benchmarks/results/real_size.md; `--only` and the size flags make a
quick small run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # run as a script
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from benchmarks.mlp_model import build as build_mlp  # noqa: E402
from benchmarks.measured_compress import floor_sentence, run_in, stage_cells  # noqa: E402

SECTIONS = ("resnet50", "mlp", "llm", "llm135m")
DEFAULT_SECTIONS = SECTIONS[:3]
BATCH_SIZE = 64  # the CLI's default
LLM_VOCAB = 32000
# Per section: the default sizes, what compress removes and the criteria it runs.
DEFAULTS = {
    "resnet50": {"calib_samples": 128, "remove": 4, "criteria": ("damage", "sglp")},
    "mlp": {"calib_samples": 128, "remove": 4, "criteria": ("damage",), "blocks": 16},
    "llm": {"calib_samples": 32, "remove": 2, "criteria": ("damage",)},
    "llm135m": {"calib_samples": 32, "remove": 6, "criteria": ("damage",)},
}
# SmolLM-135M's shape (its config.json), for section D.
LLM135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
GIB = 2**30


def build_resnet50(folder: Path, *, image_size: int) -> dict:
    """Export ResNet-50 to `folder/resnet50.onnx`; returns its parameter count and the seconds it took."""
    from models.resnet50 import resnet50
    from sglp_onnx.tools.export.torch_export import export_torch

    start = time.perf_counter()
    model = resnet50(image_size=image_size)
    export_torch(model, model.example_inputs(), folder / "resnet50.onnx", input_names=("input",),
                 output_names=("logits",), dynamic_batch=True, opset=17)
    return {"params": sum(p.numel() for p in model.parameters()), "export_s": time.perf_counter() - start}


def build_llm(folder: Path, section: str = "llm") -> dict:
    """Export the tiny Llama with a `LLM_VOCAB` vocabulary (section llm), or
    the SmolLM-135M-shaped Llama (llm135m), to `folder/<section>.onnx` (no KV cache)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.tiny_llama import tiny_llama_config
    from sglp_onnx.tools.export.hf import export_hf

    torch.manual_seed(0)
    start = time.perf_counter()
    if section == "llm135m":
        config = LlamaConfig(**LLM135M)
    else:
        config = tiny_llama_config()
        config.vocab_size = LLM_VOCAB
    model = LlamaForCausalLM(config).float().eval()
    export_hf(model, folder / f"{section}.onnx", with_cache=False)
    return {"params": sum(p.numel() for p in model.parameters()), "export_s": time.perf_counter() - start,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def build_in_child(section: str, folder: Path, image_size: int) -> dict:
    """Run a builder in its own process, so torch's memory is gone before the measured runs."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", section, str(folder),
                           "--image-size", str(image_size)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"building {section} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(model: Path) -> int:
    """Bytes of the model's initializers (external ones included), read from their declared shapes."""
    proto = onnx.load(str(model), load_external_data=False)
    return sum(int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer)


def progress(text: str) -> None:
    print(f"[real_size {time.strftime('%H:%M:%S')}] {text}", flush=True)


def prepare(section: str, folder: Path, args) -> tuple[Path, dict]:
    """Build the section's model and its calibration file beside it: (model path, facts for the report)."""
    rng = np.random.default_rng(0)
    samples = args.calib_samples or DEFAULTS[section]["calib_samples"]
    start = time.perf_counter()
    if section == "resnet50":
        info = build_in_child(section, folder, args.image_size)
        model = folder / "resnet50.onnx"
        images = rng.standard_normal((samples, 3, args.image_size, args.image_size), dtype=np.float32)
        np.savez(folder / "resnet50.calib.npz", input=images)
        info["what"] = (f"ResNet-50 (`models/resnet50.py`, {info['params'] / 1e6:.1f} M parameters, random weights "
                        f"seed 0) exported by `export_torch` (torch.onnx.export, dynamo, opset 17, dynamic batch) "
                        f"in {info['export_s']:.0f} s; {samples} random standard-normal 3x{args.image_size}x"
                        f"{args.image_size} images")
    elif section == "mlp":
        blocks = DEFAULTS["mlp"]["blocks"]
        model = folder / "mlp.onnx"
        build_mlp(model, blocks=blocks, width=args.width)
        np.savez(folder / "mlp.calib.npz", input=rng.standard_normal((samples, args.width), dtype=np.float32))
        info = {"what": f"the residual MLP of `benchmarks/large_model.py` ({blocks} blocks of float32 {args.width}x"
                        f"{args.width} weights, external data) built in {time.perf_counter() - start:.0f} s; "
                        f"{samples} random standard-normal samples"}
    else:
        info = build_in_child(section, folder, args.image_size)
        model = folder / f"{section}.onnx"
        vocab = LLM135M["vocab_size"] if section == "llm135m" else LLM_VOCAB
        ids = rng.integers(0, vocab, (samples, args.tokens), dtype=np.int64)
        np.savez(folder / f"{section}.calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
        shape = ("SmolLM-135M's shape (" if section == "llm135m" else "the tiny Llama's architecture "
                 "(`tiny_llama_config()`: ")
        info["what"] = (f"a Llama of {shape}{info['layers']} layers, hidden {info['hidden']}) with a {vocab}-token "
                        f"vocabulary, {info['params'] / 1e6:.1f} M parameters, random weights (seed 0), exported by "
                        f"`export_hf(..., with_cache=False)` in {info['export_s']:.0f} s; {samples} random token "
                        f"sequences of {args.tokens} tokens")
    info["weights"] = weight_bytes(model)
    return model, info


def measure(section: str, model: Path, folder: Path) -> tuple[dict, dict]:
    """The floor, then one compress per criterion: (floor, {criterion: result})."""
    remove = DEFAULTS[section]["remove"]
    progress(f"{section}: floor (load, one pass at batch {BATCH_SIZE}, write)")
    floor = run_in(folder, f"{section}-floor", model, sequential=False, batch_size=BATCH_SIZE, floor=True)
    results = {}
    for criterion in DEFAULTS[section]["criteria"]:
        progress(f"{section}: compress --remove {remove} --criterion {criterion}")
        results[criterion] = run_in(folder, f"{section}-{criterion}", model, sequential=False,
                                    batch_size=BATCH_SIZE, options={"remove": remove, "criterion": criterion})
    return floor, results


def verdict(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def failure_text(r: dict) -> str:
    if r["returncode"] in (-9, 137):
        return f"killed by SIGKILL (exit {r['returncode']}; the OOM killer, most likely)"
    return f"failed (exit {r['returncode']}): {r['failed']}"


def checks(section: str, info: dict, floor: dict, results: dict) -> list[str]:
    """The must-hold lines of a section."""
    weights = info["weights"] / GIB
    floor_s = float("nan") if "failed" in floor else floor["seconds"]
    time_bound = {"resnet50": 4.0, "mlp": 2.5}.get(section)
    memory_slack = {"resnet50": 1.2, "mlp": 0.4, "llm": 1.2, "llm135m": 1.2}[section]
    memory_bound = 2 * weights + memory_slack
    lines = []
    for criterion, r in results.items():
        run = f"{section}, criterion {criterion}"
        if "failed" in r:
            lines.append(f"- {run}: {failure_text(r)} after {r['seconds']:.0f} s: every must-hold of this run "
                         "does not hold.")
            continue
        peak = r["peak_rss_gib"]
        lines.append(f"- {run}: peak RSS {peak:.2f} GiB, must be at most 2x the weights ({weights:.3f} GiB) + "
                     f"{memory_slack} GiB = {memory_bound:.2f} GiB: {verdict(peak <= memory_bound)}.")
        if time_bound is not None and "failed" in floor:
            lines.append(f"- {run}: compress {r['seconds']:.1f} s; the floor failed, so the time must-hold "
                         "cannot be checked: does not hold.")
        elif time_bound is not None:
            ratio = r["seconds"] / floor_s
            lines.append(f"- {run}: compress {r['seconds']:.1f} s = {ratio:.2f}x the floor ({floor_s:.1f} s), "
                         f"must be at most {time_bound}x: {verdict(ratio <= time_bound)}.")
        if section.startswith("llm"):
            selection, calibration = r["timings"].get("selection", 0.0), r["timings"].get("calibration")
            if calibration:
                lines.append(f"- {run}: selection {selection:.1f} s = {selection / calibration:.1f}x the "
                             f"calibration stage ({calibration:.1f} s), must be at most 20x: "
                             f"{verdict(selection <= 20 * calibration)}.")
            else:
                lines.append(f"- {run}: selection {selection:.1f} s, but the report's timings have no calibration "
                             "stage to compare it with: does not hold.")
    return lines


def table_rows(section: str, info: dict, floor: dict, results: dict) -> list[str]:
    weights = info["weights"] / GIB
    rows = []
    if "failed" in floor:
        rows.append(f"| {section} | floor | {failure_text(floor)} | {floor['seconds']:.1f} | | | "
                    f"{floor['peak_rss_gib']:.2f} | | | | |")
    else:
        rows.append(f"| {section} | floor | - | {floor['seconds']:.1f} | {floor['process_s']:.1f} | 1.00 | "
                    f"{floor['peak_rss_gib']:.2f} | {floor['peak_rss_gib'] / weights:.1f} | "
                    + ", ".join(f"{k} {v:.1f}" for k, v in floor["timings"].items()) + " | | |")
    for criterion, r in results.items():
        if "failed" in r:
            rows.append(f"| {section} | {criterion} | {failure_text(r)} | {r['seconds']:.1f} | | | "
                        f"{r['peak_rss_gib']:.2f} (largest child so far) | | | | |")
            continue
        stages, peaks = stage_cells(r)
        fidelity = r["fidelity"].removeprefix("fidelity to the original: ")
        floor_s = float("nan") if "failed" in floor else floor["seconds"]
        rows.append(f"| {section} | {criterion} | removed {r['removed']}/{r['units']}: "
                    f"{', '.join(r['removed_names'])} | {r['seconds']:.1f} | {r['process_s']:.1f} | "
                    f"{r['seconds'] / floor_s:.2f} | {r['peak_rss_gib']:.2f} | "
                    f"{r['peak_rss_gib'] / weights:.1f} | {stages} | {peaks} | {fidelity} |")
    return rows


def command_line(args) -> str:
    flags = [f"--only {' '.join(args.only)}"] if list(args.only) != list(DEFAULT_SECTIONS) else []
    for flag, value, default in (("--calib-samples", args.calib_samples, None), ("--width", args.width, 2896),
                                 ("--image-size", args.image_size, 224), ("--tokens", args.tokens, 128)):
        if value != default:
            flags.append(f"{flag} {value}")
    return " ".join(["python benchmarks/real_size.py", *flags])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", nargs=2, metavar=("SECTION", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                        help="the sections to run (default: resnet50 mlp llm; llm135m only when named)")
    parser.add_argument("--calib-samples", type=int,
                        help="calibration samples of every section run (default: 128, 128 and 32)")
    parser.add_argument("--width", type=int, default=2896, help="the MLP's width (default 2896: 1 GiB of weights)")
    parser.add_argument("--image-size", type=int, default=224, help="ResNet-50's input side (default 224)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per LLM calibration sequence (default 128)")
    parser.add_argument("--folder", type=Path, help="where to build the models (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "real_size.md")
    args = parser.parse_args()
    if args.build:
        section, folder = args.build
        built = build_resnet50(Path(folder), image_size=args.image_size) if section == "resnet50" \
            else build_llm(Path(folder), section)
        print(json.dumps(built))
        return

    from benchmarks.common import describe, publish

    started = time.perf_counter()
    sections = {}
    for section in args.only:
        with tempfile.TemporaryDirectory(prefix=f"sglp-real-{section}-", dir=args.folder) as tmp:
            folder = Path(tmp)
            progress(f"{section}: building the model and its calibration data")
            model, info = prepare(section, folder, args)
            progress(f"{section}: {info['weights'] / GIB:.3f} GiB of weights")
            sections[section] = (info, *measure(section, model, folder))
    total = time.perf_counter() - started

    lines = [
        "# `compress` at real sizes against the one-pass floor",
        "",
        f"Machine: {describe()}; shared with other jobs while it ran, so the seconds carry some noise.",
        "",
        f"Command: `{command_line(args)}` ({total / 60:.0f} min in all). Each compress runs "
        f"`sglp_onnx.compress(MODEL, OUT, remove=N, criterion=C, batch_size={BATCH_SIZE}, force=True)`, what "
        f"`sglp-onnx compress MODEL -o OUT --remove N [--criterion C] --batch-size {BATCH_SIZE} --force` runs, in a "
        "fresh process; peak RSS is that process's VmHWM. The floor is measured in the same run: a fresh process "
        "that loads the model with its weights, runs one ONNX Runtime pass over the calibration set at batch "
        f"{BATCH_SIZE} and writes the model with external data. Stage seconds are the report's `timings` "
        "(selection without the calibration stage it contains); peak RSS at the end of each stage is the "
        "process's VmHWM then.",
        "",
    ]
    for section, (info, floor, _) in sections.items():
        lines += [f"- {section}: {info['what']}; {info['weights'] / GIB:.3f} GiB of weights; "
                  f"`--remove {DEFAULTS[section]['remove']}`. {floor_sentence(floor)}"]
    lines += [
        "",
        "| section | run | result | compress s | process s | x floor | peak RSS GiB | x weights | stage seconds | "
        "peak RSS GiB at the end of each stage | fidelity (report) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for section, (info, floor, results) in sections.items():
        lines += table_rows(section, info, floor, results)
    lines += ["", "Must hold:", ""]
    for section, (info, floor, results) in sections.items():
        lines += checks(section, info, floor, results)
    publish(lines, args.output)


if __name__ == "__main__":
    main()
