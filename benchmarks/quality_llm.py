"""Held-out perplexity of the tiny Llama after removing 25% and 37.5% of its
decoder layers with every criterion, without fine-tuning and after a short
fine-tune.

    python benchmarks/quality_llm.py        # part of make bench-quality

The model is models/tinyllama_pydoc.onnx (8 layers, trained by
models/train_llm.py on CPython's documentation), calibrated on its sidecar
models/tinyllama_pydoc.calib.npz and scored on the held-out topics in
models/pydoc.test.npz. SGLP and GradNorm pair with `--torch-model
hf:models/tinyllama_pydoc`. For each criterion one `analyze` gives both
removal sets (2 and 3 layers: its `--remove 3` selection and the suggestion
for 2). The fine-tune is `sglp_onnx.tools.finetune.train` on the paired
transformers model with the removed layers skipped, on windows of the
TRAINING text (never the held-out topics).

Writes the LLM section of benchmarks/results/quality.md between the markers
below, leaving the rest of the file (the CNN rows of benchmarks/quality.py)
as it is, and every number to benchmarks/results/quality_llm.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import CRITERIA, MODELS_DIR, REPAIR, RESULTS_DIR, ROOT, describe, repair_of  # noqa: E402

import torch  # noqa: E402

from sglp_onnx.files import CalibrationSet  # noqa: E402
from sglp_onnx.evidence import measure  # noqa: E402
from sglp_onnx.graph import make_session  # noqa: E402
from sglp_onnx.surgery import remove_units  # noqa: E402
from sglp_onnx.repair import repaired_pruned  # noqa: E402

BEGIN, END = "<!-- llm:begin -->", "<!-- llm:end -->"
MODEL_DIR = MODELS_DIR / "tinyllama_pydoc"
ONNX = MODELS_DIR / "tinyllama_pydoc.onnx"
TEST = MODELS_DIR / "pydoc.test.npz"
FRACTIONS = (0.25, 0.375)  # of the decoder layers
RANDOM_SEEDS = 3
CALIB_BATCH = 16
# The short fine-tune, the same for every removal set: FT_WINDOWS random
# 128-token windows of the training text, one epoch, finetune.py's defaults
# otherwise (AdamW with cosine decay, 0.5 CE + 0.5 T^2 KL from the unpruned
# model at T = 2). The learning rate is finetune.py's default, not tuned.
FT_WINDOWS = 512
FT_EPOCHS = 1
FT_LR = 1e-3
FT_BATCH = 16
ORDER = ["input_ids", "attention_mask"]

def onnx_perplexity(model, ids: np.ndarray, mask: np.ndarray, batch: int = 32) -> float:
    """exp(mean next-token NLL) over tokens whose position and successor are both real."""
    data = CalibrationSet(inputs={"input_ids": ids, "attention_mask": mask})
    return measure(model, data, batch_size=batch)[0].perplexity  # what `sglp-onnx eval` reports


def removal_sets(analysis, counts: list[int]) -> tuple[dict[int, list[int]], dict[int, bool]]:
    """Unit indices the criterion removes for each count, from one analysis,
    and whether compress keeps the repair of each set."""
    repair = analysis.report.get("repair")
    sets = {len(analysis.selection.removed): list(analysis.selection.removed)}
    kept = {len(analysis.selection.removed): bool(repair and repair["applied"])}
    for suggestion in analysis.report["suggestions"] or []:
        if suggestion["achievable"] and suggestion["units_removed"] in counts \
                and suggestion["units_removed"] not in sets:
            sets[suggestion["units_removed"]] = suggestion["removed"]
            kept[suggestion["units_removed"]] = bool(suggestion.get("repaired"))
    return sets, kept


def suggestion_targets(units, total_flops: int, counts: list[int]) -> tuple[float, ...]:
    """FLOPs fractions whose `--target-flops` rule asks for exactly each count: the
    decoder layers all cost the same, so halfway between n-1 and n layers."""
    per_layer = statistics.mean(u.flops for u in units)
    return tuple((n - 0.5) * per_layer / total_flops for n in counts)


class Healer:
    """Fine-tunes the transformers model with a removal set skipped; one result per distinct set."""

    def __init__(self, test: dict[str, np.ndarray], log) -> None:
        from models.pydoc_text import fixed_windows, token_stream
        from sglp_onnx.tools.finetune import teacher_outputs
        from sglp_onnx.paired import load_hf_model

        windows = fixed_windows(token_stream("train"), test["input_ids"].shape[1])
        pick = np.sort(np.random.default_rng(0).choice(len(windows), size=FT_WINDOWS, replace=False))
        self.data = CalibrationSet(inputs={"input_ids": windows[pick], "attention_mask": np.ones_like(windows[pick])},
                                   source="training text windows")
        self.teacher = load_hf_model(MODEL_DIR)
        self.test = test
        self.log = log
        self.teacher_logits = teacher_outputs(self.teacher, self.data, ORDER, batch_size=FT_BATCH)
        self.cache: dict[frozenset, dict] = {}

    def __call__(self, modules: list[str], pruned_onnx) -> dict:
        from models.train_llm import perplexity
        from sglp_onnx.tools.finetune import output_structure, skip_modules, train

        key = frozenset(modules)
        if key not in self.cache:
            structure = output_structure(self.teacher, modules, self.data.first(2), ORDER)
            student = skip_modules(self.teacher, modules, structure)
            # The skipped transformers model must be the pruned ONNX model.
            probe = {k: v[:4] for k, v in self.data.inputs.items()}
            with torch.no_grad():
                got = student.eval()(**{k: torch.from_numpy(v) for k, v in probe.items()}).logits.numpy()
            expected = make_session(pruned_onnx).run(["logits"], probe)[0]
            assert np.abs(got - expected).max() <= 2e-3 * max(1.0, np.abs(expected).max()), "pairing mismatch"
            start = time.perf_counter()
            history = train(student, self.teacher, self.data, ORDER, epochs=FT_EPOCHS, lr=FT_LR,
                            batch_size=FT_BATCH, seed=0, teacher_logits=self.teacher_logits)
            seconds = time.perf_counter() - start
            ppl = perplexity(student, self.test["input_ids"], self.test["attention_mask"])
            self.cache[key] = {"perplexity": ppl, "seconds": seconds, "train_loss": history}
        return self.cache[key]


def run(*, finetune: bool, log) -> dict:
    from sglp_onnx.pipeline import analyze

    test = dict(np.load(TEST))
    base = onnx_perplexity(str(ONNX), test["input_ids"], test["attention_mask"])
    log(f"unpruned held-out perplexity {base:.3f}")
    probe = analyze(ONNX, criterion="last", remove=1, suggest=None, batch_size=CALIB_BATCH,
                    torch_model=f"hf:{MODEL_DIR.relative_to(ROOT)}")
    n_layers = len(probe.units)
    counts = [round(f * n_layers) for f in FRACTIONS]
    targets = suggestion_targets(probe.units, probe.total_flops, counts)
    result = {"model": str(ONNX.relative_to(ROOT)), "layers": n_layers, "counts": counts,
              "test_windows": int(len(test["input_ids"])),
              "test_tokens": int((test["attention_mask"][:, 1:] * test["attention_mask"][:, :-1]).sum()),
              "unpruned_perplexity": base, "finetune": None, "rows": []}
    healer = Healer(test, log) if finetune else None
    modules_of = {u["unit"]: u["modules"] for u in probe.report["pairing"]["units"]}
    # The default with the paired model given too: GradNorm must never make its choice worse.
    rows = CRITERIA[:1] + [("damage (paired torch model given)", CRITERIA[0][1], True)] + CRITERIA[1:]
    for label, criterion, paired in rows:
        seeds = range(RANDOM_SEEDS) if criterion == "random" else [0]
        runs = []
        for seed in seeds:
            start = time.perf_counter()
            analysis = analyze(ONNX, criterion=criterion, seed=seed, remove=max(counts), suggest=targets,
                               batch_size=CALIB_BATCH, repair=repair_of(label),
                               **({"torch_model": f"hf:{MODEL_DIR.relative_to(ROOT)}"} if paired else {}))
            seconds = time.perf_counter() - start
            if analysis.report["pairing"]:
                modules_of.update({u["unit"]: u["modules"] for u in analysis.report["pairing"]["units"]})
            sets, kept = removal_sets(analysis, counts)
            for n in counts:
                if n not in sets:  # a criterion whose suggestion rule disagreed: ask for n directly
                    again = analyze(ONNX, criterion=criterion, seed=seed, remove=n, suggest=None,
                                    batch_size=CALIB_BATCH, repair=repair_of(label))
                    sets[n] = list(again.selection.removed)
                    kept[n] = bool(again.report["repair"] and again.report["repair"]["applied"])
            per_count = {}
            for n in counts:
                units = [analysis.units[i] for i in sets[n]]
                pruned = remove_units(analysis.model, units)
                entry = {"removed": [u.name for u in units],
                         "layers": [u.layer_index for u in units],
                         "perplexity": onnx_perplexity(pruned, test["input_ids"], test["attention_mask"]),
                         "repaired": kept[n]}
                # What compress writes: repaired where repair improved the held-out fidelity.
                entry["repaired_perplexity"] = onnx_perplexity(
                    repaired_pruned(analysis.model, analysis.units, sets[n], analysis.calib, form=REPAIR,
                                    batch_size=CALIB_BATCH),
                    test["input_ids"], test["attention_mask"]) if kept[n] else entry["perplexity"]
                if healer is not None:
                    if not modules_of:
                        raise RuntimeError("the first criterion must pair with the transformers model")
                    entry["finetuned"] = healer([m for u in units for m in modules_of[u.name]], pruned)
                per_count[n] = entry
            runs.append({"seed": seed, "seconds": seconds, "counts": per_count,
                         "notes": analysis.report["notes"], "importance_kind": analysis.report["importance_kind"],
                         "segments": analysis.report["segments"]})
            log(f"  {label} seed {seed}: {seconds:.1f}s  " + "  ".join(
                f"-{n}: layers {v['layers']} ppl {v['perplexity']:.3f} repaired {v['repaired_perplexity']:.3f}"
                + (f" ft {v['finetuned']['perplexity']:.3f}" if "finetuned" in v else "")
                for n, v in per_count.items()))
        result["rows"].append({"label": label, "criterion": criterion, "runs": runs})
    if finetune:
        result["finetune"] = {"windows": FT_WINDOWS, "epochs": FT_EPOCHS, "lr": FT_LR, "batch_size": FT_BATCH}
    return result


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def render(result: dict | None, *, wall: float, threads: int, missing: str | None = None) -> str:
    lines = [BEGIN, "## LLM: tiny Llama on CPython's documentation (perplexity, lower is better)", ""]
    if result is None:
        lines += [f"Not measured: {missing}. Train the model with `python -m models.train_llm`, then run "
                  "`python benchmarks/quality_llm.py`.", "", END]
        return "\n".join(lines) + "\n"
    counts = result["counts"]
    ft = result["finetune"]
    lines += [
        f"Machine: {describe()}; shared with other jobs while it ran, so wall times are indicative. "
        f"torch and ONNX Runtime ran with {threads} intra-op thread(s).",
        "",
        f"Command: `python benchmarks/quality_llm.py` (part of `make bench-quality`). Model "
        f"`{result['model']}`: {result['layers']} decoder layers (each unit is one whole layer: attention and "
        f"MLP); unpruned held-out perplexity **{result['unpruned_perplexity']:.3f}** on "
        f"{result['test_windows']} windows of 128 bytes ({result['test_tokens']} predicted tokens, "
        "`models/pydoc.test.npz`: topics the model never trained on). Calibration: the sidecar "
        f"`models/tinyllama_pydoc.calib.npz` (64 windows of training text, CKA over every unpadded token), "
        f"batch {CALIB_BATCH}. `sglp` and `gradnorm` pair with `--torch-model hf:models/tinyllama_pydoc` "
        "(GradNorm of the next-token loss); `random` is mean ± std over seeds "
        f"0..{RANDOM_SEEDS - 1}. **time** is the wall time of the criterion's `analyze` call (both removal "
        "counts). **ppl**: the layers bypassed, no repair. **repaired**: what `compress` writes for that set, "
        "the bypass plus the closed-form repair map at each cut (`--repair full`, fitted on the selection "
        "samples; 'not kept' where it did not improve the held-out fidelity, and the plain model's perplexity "
        "is shown).",
        "",
    ]
    if ft:
        lines += [f"**FT**: perplexity after fine-tuning the paired transformers model with the same layers "
                  f"skipped, `sglp_onnx.tools.finetune.train` for {ft['epochs']} epoch on {ft['windows']} random "
                  f"128-byte windows of the training text (lr {ft['lr']:g} with cosine decay, batch "
                  f"{ft['batch_size']}, 0.5 CE + 0.5 T² KL from the unpruned model at T = 2, seed 0; the "
                  "learning rate is finetune.py's default, not tuned on anything). The perplexity is that of "
                  "the fine-tuned transformers model, measured in torch (`sglp-onnx finetune --torch-model hf:DIR` "
                  "heals the same way, deleting the removed layers, and exports the healed model to ONNX).",
                  ""]
    else:
        lines += ["No fine-tuning in this run (`--no-finetune`).", ""]
    header = "| criterion |"
    rule = "|---|"
    for n in counts:
        header += (f" layers removed (-{n}) | ppl -{n}/{result['layers']} | repaired -{n} |"
                   + (f" FT -{n} |" if ft else ""))
        rule += "---|---:|---:|" + ("---:|" if ft else "")
    header += " time (s) |"
    rule += "---:|"
    lines += [header, rule]
    for row in result["rows"]:
        runs = row["runs"]
        cells = [row["label"]]
        for n in counts:
            got = [r["counts"][n] if n in r["counts"] else r["counts"][str(n)] for r in runs]
            cells.append("; ".join(",".join(map(str, g["layers"])) for g in got))
            cells.append(_mean_std([g["perplexity"] for g in got]))
            cells.append(_mean_std([g["repaired_perplexity"] for g in got])
                         + ("" if all(g["repaired"] for g in got) else " (not kept)"))
            if ft:
                cells.append(_mean_std([g["finetuned"]["perplexity"] for g in got]))
        cells.append(f"{statistics.mean(r['seconds'] for r in runs):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    segments = next((r["runs"][0]["segments"] for r in result["rows"] if r["criterion"] == "sglp"
                     and r["runs"][0]["segments"]), None)
    if segments:
        lines.append(f"SGLP's Fisher segments at -{max(counts)} (unit index ranges): {segments}.")
    lines += ["Layer numbers are the decoder layer indices (0 = next to the embedding).", "",
              f"Benchmark wall time: {wall / 60:.1f} min.", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the text between the markers in `path` (or append it), keeping the rest."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning columns")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "quality.md")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # One thread, as benchmarks/quality.py: on a shared 2-core machine a
    # second spinning thread costs more than it gives.
    torch.set_num_threads(args.threads)
    make_session.__kwdefaults__["threads"] = args.threads
    missing = next((str(p.relative_to(ROOT)) for p in (ONNX, MODEL_DIR, TEST) if not p.exists()), None)
    start = time.perf_counter()
    result = None if missing else run(finetune=not args.no_finetune, log=log)
    section = render(result, wall=time.perf_counter() - start, threads=args.threads,
                     missing=f"{missing} not found" if missing else None)
    write_section(args.output, section)
    if result is not None:
        (RESULTS_DIR / "quality_llm.json").write_text(json.dumps(result, indent=1, default=float))
    print(section)


if __name__ == "__main__":
    main()
