"""Test accuracy of every criterion at about 30% and 50% of the FLOPs removed,
without fine-tuning and after a short fine-tune, on the bundled CNNs.

    python benchmarks/quality.py            # make bench-quality

For each model: one `analyze` per criterion (its wall time is the
criterion's cost, both targets included: the removal sets come from the
`--target-flops` rule through the analysis's suggestions), then for each
removal set the pruned ONNX model's test accuracy, and the test accuracy of
the paired torch model with the same units skipped after EPOCHS epochs of
`sglp_onnx.tools.finetune.train` on the model's TRAINING data (written here from
models/digits_data.py and models/radio_signals.py; never the test set).
`random` runs with seeds 0..RANDOM_SEEDS-1 and reports mean +- std.
Writes benchmarks/results/quality.md (and quality.json with every number).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import CRITERIA, REPAIR, RESULTS_DIR, ROOT, describe, repair_of  # noqa: E402

import torch  # noqa: E402

from sglp_onnx.files import CalibrationSet  # noqa: E402
from sglp_onnx.tools import load_torch_model  # noqa: E402
from sglp_onnx.tools.finetune import output_structure, skip_modules, teacher_outputs, train  # noqa: E402
from sglp_onnx.evidence import measure  # noqa: E402
from sglp_onnx.pipeline import analyze  # noqa: E402
from sglp_onnx.graph import make_session  # noqa: E402
from sglp_onnx.surgery import remove_units  # noqa: E402
from sglp_onnx.repair import repaired_pruned  # noqa: E402

TARGETS = (0.3, 0.5)
RANDOM_SEEDS = 3
# Same short fine-tune for every criterion. The learning rate is the
# candidate of `--choose-lr` with the lowest mean held-out cross-entropy
# (fine-tuning on 80% of each model's training data, scored on the other
# 20%; see docs/criteria.md), never chosen on a test set.
EPOCHS = 2
LR = 3e-3
FT_BATCH = 64
CALIB_BATCH = 64
# 1-D CNN training frames for fine-tuning: the first epoch's frames of
# models/train_radio.py (its seed), 200 per class.
RADIO_TRAIN_PER_CLASS = 200


@dataclass
class ModelSpec:
    name: str
    onnx: Path
    factory: str
    weights: Path
    test: Path
    train: Callable[[], tuple[np.ndarray, np.ndarray]]


def digits_train() -> tuple[np.ndarray, np.ndarray]:
    from models.digits_data import train_arrays

    return train_arrays()


def radio_train() -> tuple[np.ndarray, np.ndarray]:
    from models.radio_signals import make_dataset
    from models.train_radio import SNR_RANGE, TRAIN_SEED

    x, y, _ = make_dataset(RADIO_TRAIN_PER_CLASS, snr_db=SNR_RANGE, seed=TRAIN_SEED)
    return x, y


MODELS = {
    "resnet56": ModelSpec("ResNet-56 (digits)", ROOT / "models/resnet56_digits.onnx",
                          "models.resnet_cifar:resnet56_digits", ROOT / "models/resnet56_digits.pt",
                          ROOT / "models/digits.test.npz", digits_train),
    "resnet110": ModelSpec("ResNet-110 (digits)", ROOT / "models/resnet110_digits.onnx",
                           "models.resnet_cifar:resnet110_digits", ROOT / "models/resnet110_digits.pt",
                           ROOT / "models/digits.test.npz", digits_train),
    "vit": ModelSpec("ViT encoder (digits)", ROOT / "models/vit_digits.onnx", "models.vit_digits:vit_digits",
                     ROOT / "models/vit_digits.pt", ROOT / "models/digits.test.npz", digits_train),
    "cnn1d": ModelSpec("1-D CNN (radio)", ROOT / "models/cnn1d_radio.onnx", "models.cnn1d:cnn1d_radio",
                       ROOT / "models/cnn1d_radio.pt", ROOT / "models/radio.test.npz", radio_train),
}


def onnx_accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """Top-1 test accuracy, computed like `sglp-onnx eval` (the example CNNs' input is named "input")."""
    return measure(model, CalibrationSet(inputs={"input": x}, labels=y), batch_size=batch)[0].accuracy


@torch.no_grad()
def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    model.eval()
    pred = np.concatenate([model(torch.from_numpy(x[s:s + batch])).argmax(1).numpy() for s in range(0, len(x), batch)])
    return float(np.mean(pred == y))


def calibration_loss(model, calib: CalibrationSet) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of an ONNX model on the calibration set."""
    session = make_session(model)
    logits = np.concatenate([session.run(None, feed)[0] for feed, _ in calib.batches(CALIB_BATCH)])
    logits = logits.astype(np.float64) - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    labels = calib.labels
    return float(-logp[np.arange(len(labels)), labels].mean()), float(np.mean(logits.argmax(1) == labels))


def single_unit_ablation(analysis) -> dict:
    """Diagnostic on calibration data only: the loss and accuracy with each unit removed alone."""
    base_loss, base_acc = calibration_loss(analysis.model, analysis.calib)
    losses, accs = [], []
    for unit in analysis.units:
        loss, acc = calibration_loss(remove_units(analysis.model, [unit]), analysis.calib)
        losses.append(loss - base_loss)
        accs.append(base_acc - acc)
    return {"loss_increase": losses, "accuracy_drop": accs}


def stage(name: str) -> str:
    """The parent module of a unit (`layer2.5` -> `layer2`, `stages.1.3` -> `stages.1`): one resolution stage."""
    return name.rsplit(".", 1)[0]


def stage_split(analysis, target: float) -> list[dict]:
    """Diagnostic (calibration data only): SGLP's removal set at `target` split by
    resolution stage, each stage's share removed alone."""
    suggestion = next(x for x in analysis.report["suggestions"] if x["target_flops"] == target)
    loss, acc = calibration_loss(analysis.model, analysis.calib)
    rows = [{"stage": "none", "units": [], "flops": 0.0, "loss": loss, "accuracy": acc}]
    removed = [analysis.units[i] for i in suggestion["removed"]]
    for name in dict.fromkeys(stage(u.name) for u in analysis.units):
        part = [u for u in removed if stage(u.name) == name]
        loss, acc = calibration_loss(remove_units(analysis.model, part), analysis.calib)
        rows.append({"stage": name, "units": [u.name for u in part],
                     "flops": sum(u.flops for u in part) / analysis.total_flops, "loss": loss, "accuracy": acc})
    loss, acc = calibration_loss(remove_units(analysis.model, removed), analysis.calib)
    rows.append({"stage": None, "units": suggestion["names"], "flops": suggestion["flops_removed_fraction"],
                 "loss": loss, "accuracy": acc})
    return rows


def rank_correlation(a, b) -> float:
    """Spearman's rho (no tie correction; ties are rare in these scores)."""
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


class Healer:
    """Fine-tunes the paired torch model with a removal set skipped; one result per distinct set."""

    def __init__(self, spec: ModelSpec, modules_of: dict[str, list[str]], train_set: CalibrationSet,
                 test: tuple[np.ndarray, np.ndarray], *, epochs: int, lr: float) -> None:
        self.teacher = load_torch_model(spec.factory, str(spec.weights))
        self.modules_of = modules_of
        self.train_set = train_set
        self.test = test
        self.epochs, self.lr = epochs, lr
        self.cache: dict[frozenset, tuple[float, float]] = {}
        self.structure = output_structure(self.teacher, sorted({m for v in modules_of.values() for m in v}),
                                           train_set.first(4), ["input"])
        # The same teacher outputs serve every fine-tune of this model.
        self.teacher_logits = teacher_outputs(self.teacher, train_set, ["input"], batch_size=FT_BATCH)

    def __call__(self, names: list[str], pruned_onnx) -> tuple[float, float]:
        """(seconds, test accuracy after fine-tuning) for the units `names` removed."""
        key = frozenset(names)
        if key not in self.cache:
            paths = [m for name in names for m in self.modules_of[name]]
            student = skip_modules(self.teacher, paths, self.structure)
            # The skipped torch model must be the pruned ONNX model.
            probe = self.train_set.first(16)["input"]
            with torch.no_grad():
                got = student.eval()(torch.from_numpy(probe)).numpy()
            expected = make_session(pruned_onnx).run(None, {"input": probe})[0]
            assert np.abs(got - expected).max() <= 2e-3 * max(1.0, np.abs(expected).max()), "pairing mismatch"
            start = time.perf_counter()
            train(student, self.teacher, self.train_set, ["input"], epochs=self.epochs, lr=self.lr,
                  batch_size=FT_BATCH, seed=0, teacher_logits=self.teacher_logits)
            self.cache[key] = (time.perf_counter() - start, torch_accuracy(student, *self.test))
        return self.cache[key]


def run_model(key: str, *, epochs: int, lr: float, log) -> dict:
    spec = MODELS[key]
    test_data = np.load(spec.test)
    test = (test_data["input"], test_data["labels"])
    x_train, y_train = spec.train()
    train_set = CalibrationSet(inputs={"input": x_train}, labels=y_train, source="training split")
    options = dict(batch_size=CALIB_BATCH, suggest=TARGETS, target_flops=max(TARGETS))
    torch_options = dict(torch_model=spec.factory, torch_weights=str(spec.weights))

    result = {"model": spec.name, "onnx": str(spec.onnx.relative_to(ROOT)), "train_samples": len(y_train),
              "test_samples": len(test[1]), "rows": [], "details": {}}
    base = onnx_accuracy(str(spec.onnx), *test)
    result["unpruned_accuracy"] = base
    log(f"{spec.name}: unpruned test accuracy {base:.4f}")

    # Pairing (unit -> torch modules) for the fine-tunes, from one cheap analysis with the torch model.
    probe = analyze(spec.onnx, criterion="last", remove=1, suggest=None, batch_size=CALIB_BATCH, **torch_options)
    healer = Healer(spec, {u["unit"]: u["modules"] for u in probe.report["pairing"]["units"]}, train_set, test,
                    epochs=epochs, lr=lr)
    result["total_flops"] = probe.total_flops
    result["units"] = len(probe.units)
    for label, criterion, needs_torch in CRITERIA:
        seeds = range(RANDOM_SEEDS) if criterion == "random" else [0]
        runs = []
        for seed in seeds:
            start = time.perf_counter()
            analysis = analyze(spec.onnx, criterion=criterion, seed=seed, **options, repair=repair_of(label),
                               **(torch_options if needs_torch else {}))
            seconds = time.perf_counter() - start
            per_target = {}
            for suggestion in analysis.report["suggestions"]:
                names = suggestion["names"]
                units = [analysis.units[i] for i in suggestion["removed"]]
                pruned = remove_units(analysis.model, units)
                acc = onnx_accuracy(pruned, *test)
                # What compress writes for this set: repaired where repair improved its held-out fidelity.
                repaired_acc = onnx_accuracy(repaired_pruned(
                    analysis.model, analysis.units, suggestion["removed"], analysis.calib, form=REPAIR,
                    batch_size=CALIB_BATCH), *test) if suggestion.get("repaired") else acc
                ft_seconds, ft_acc = healer(names, pruned)
                fid = suggestion["fidelity"]
                plain_fid = suggestion.get("fidelity_without_repair") or fid
                per_target[suggestion["target_flops"]] = {
                    "heldout_agreement": fid["top1_agreement"], "heldout_kl": fid["score"],
                    "heldout_agreement_without_repair": plain_fid["top1_agreement"],
                    "repaired": bool(suggestion.get("repaired")), "repaired_accuracy": repaired_acc,
                    "units_removed": len(names), "flops_removed": suggestion["flops_removed_fraction"],
                    "accuracy": acc, "finetuned_accuracy": ft_acc, "finetune_seconds": ft_seconds,
                    "removed": names}
            runs.append({"seed": seed, "seconds": seconds, "targets": per_target,
                         "passes": analysis.selection.passes, "timings": analysis.report["timings"]})
            if analysis.report["units"][0]["importance"] is not None and seed == 0:
                result["details"][label] = {
                    "segments": analysis.report["segments"], "k_selection": analysis.report["k_selection"],
                    "importance": [u["importance"] for u in analysis.report["units"]],
                    "importance_kind": analysis.report["importance_kind"], "notes": analysis.report["notes"]}
            if "unit_names" not in result and needs_torch:
                result["unit_names"] = [u.name for u in analysis.units]
                result["cka"] = analysis.report["cka"]
                result["ablation"] = single_unit_ablation(analysis)
                result["stage_split"] = stage_split(analysis, min(TARGETS))
            log(f"  {label} seed {seed}: {seconds:.1f}s  " + "  ".join(
                f"{t:.0%}: {v['units_removed']} units {v['flops_removed']:.1%} acc {v['accuracy']:.4f} "
                f"ft {v['finetuned_accuracy']:.4f}" for t, v in per_target.items()))
        result["rows"].append({"label": label, "criterion": criterion, "runs": runs})
    return result


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def render(results: list[dict], *, epochs: int, lr: float, wall: float, threads: int) -> str:
    lines = [
        "# Quality of the criteria: test accuracy after removing ~30% and ~50% of the FLOPs",
        "",
        f"Machine: {describe()}; shared with other jobs while it ran, so wall times are indicative. "
        f"torch and ONNX Runtime ran with {threads} intra-op thread(s).",
        "",
        "Command: `make bench-quality` (`python benchmarks/quality.py`). For each model and criterion one "
        f"`analyze --target-flops {max(TARGETS)} --suggest {','.join(str(t) for t in TARGETS)}` with the model's "
        f"calibration sidecar (batch size {CALIB_BATCH}); the removal set for each target is the smallest one "
        "the criterion chooses that removes at least that fraction of the FLOPs (the `--target-flops` rule). "
        "**no FT**: test accuracy of the pruned ONNX model with the units bypassed (no repair). "
        "**repaired**: test accuracy of what `compress` writes for that set: the bypass plus the closed-form "
        "repair map at every cut (`--repair full`, fitted on the selection samples), kept only where it "
        "improved the held-out fidelity ('not kept': the plain model is written, its accuracy shown). "
        "**held-out agreement**: top-1 agreement with the unpruned model on the calibration samples held out "
        "from selection, without -> with repair. The default's selection scores each candidate repaired; "
        "the `--repair none` row is the default's choice before repair existed. "
        f"**FT**: test accuracy after {epochs} epochs of fine-tuning the paired torch model with the same "
        f"units skipped (`sglp_onnx.tools.finetune.train`: AdamW lr {lr:g} with cosine decay, batch {FT_BATCH}, "
        "loss 0.5 CE + 0.5 T² KL from the unpruned model at T = 2, seed 0) on the model's training split. "
        f"`random` is mean ± std over seeds 0..{RANDOM_SEEDS - 1}. **time** is the wall time of the "
        "criterion's `analyze` call (loading, unit discovery, torch pairing, calibration pass, GradNorm, "
        "selection; both targets). Accuracies in %.",
        "",
    ]
    for res in results:
        lines += [f"## {res['model']}", "",
                  f"`{res['onnx']}`: {res['units']} prunable units, {res['total_flops'] / 1e6:.2f} MFLOPs per "
                  f"sample; unpruned test accuracy **{100 * res['unpruned_accuracy']:.1f}%** on "
                  f"{res['test_samples']} test samples; fine-tuning on {res['train_samples']} training samples.",
                  ""]
        header = "| criterion |"
        rule = "|---|"
        for t in TARGETS:
            header += (f" units / FLOPs @{t:.0%} | no FT @{t:.0%} | repaired @{t:.0%} | held-out agreement @{t:.0%} "
                       f"| FT @{t:.0%} |")
            rule += "---:|---:|---:|---:|---:|"
        header += " time (s) | passes |"
        rule += "---:|---|"
        lines += [header, rule]
        for row in res["rows"]:
            runs = row["runs"]
            cells = [row["label"]]
            for t in TARGETS:
                got = [r["targets"].get(t) for r in runs]
                if any(g is None for g in got):
                    cells += ["unreachable", "-", "-", "-", "-"]
                    continue
                units = sorted({g["units_removed"] for g in got})
                flops = [g["flops_removed"] for g in got]
                cells.append(f"{'/'.join(map(str, units))} / {100 * statistics.mean(flops):.0f}%")
                cells.append(_mean_std([g["accuracy"] for g in got]))
                cells.append(_mean_std([g["repaired_accuracy"] for g in got])
                             + ("" if all(g["repaired"] for g in got) else " (not kept)" if not any(
                                 g["repaired"] for g in got) else " (some kept)"))
                cells.append(f"{_mean_std([g['heldout_agreement_without_repair'] for g in got])} -> "
                             f"{_mean_std([g['heldout_agreement'] for g in got])}")
                cells.append(_mean_std([g["finetuned_accuracy"] for g in got]))
            cells.append(f"{statistics.mean(r['seconds'] for r in runs):.1f}")
            passes = runs[0]["passes"]
            cells.append(", ".join(f"{k} {v}" for k, v in passes.items()) or "none")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Removed units (first seed for random):")
        lines.append("")
        for row in res["rows"]:
            for t in TARGETS:
                got = row["runs"][0]["targets"].get(t)
                if got:
                    lines.append(f"- {row['label']} @{t:.0%}: {', '.join(got['removed'])}")
        for label, detail in res["details"].items():
            if detail["segments"]:
                lines.append(f"- {label}: segments {detail['segments']} ({detail['k_selection']['rule']})")
        lines.append("")
        ablation = res.get("ablation")
        if ablation:
            damage = ablation["loss_increase"]
            lines += ["Diagnostic (calibration data only): each unit removed alone; Spearman rank correlation "
                      "between a criterion's importance score and the calibration cross-entropy increase that "
                      "removing the unit causes (1 = the criterion ranks units exactly by that damage).", "",
                      "| importance | Spearman ρ |", "|---|---:|"]
            for label, detail in res["details"].items():
                lines.append(f"| {label}: {detail['importance_kind']} | "
                             f"{rank_correlation(detail['importance'], damage):+.2f} |")
            lines += ["", "Per unit (calibration): " + ", ".join(
                f"{name} {d:+.3f}" for name, d in zip(res["unit_names"], damage)), ""]
        split = res.get("stage_split")
        if split:
            lines += [f"Diagnostic (calibration data only): SGLP's removal set at {min(TARGETS):.0%} split by "
                      "resolution stage (the units' parent module), each stage's share removed alone, the rest "
                      "of the network intact.", "",
                      "| stage | units removed | FLOPs removed | calibration accuracy | calibration CE |",
                      "|---|---|---:|---:|---:|"]
            for row in split:
                if row["stage"] == "none":
                    where, names = "none (unpruned)", "-"
                elif row["stage"] is None:
                    where, names = "all (the SGLP set)", f"{len(row['units'])} units"
                else:
                    where, names = row["stage"], ", ".join(row["units"]) or "-"
                lines.append(f"| {where} | {names} | {100 * row['flops']:.1f}% | {100 * row['accuracy']:.1f}% "
                             f"| {row['loss']:.3f} |")
            lines.append("")
    lines += mean_ranks(results)
    lines.append(f"Total benchmark wall time: {wall / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def mean_ranks(results: list[dict]) -> list[str]:
    """Mean rank of each criterion over every (model, target) row, without and with
    fine-tuning (1 = best test accuracy; ties share their mean rank; random by its mean)."""
    ranks: dict[str, dict[str, list[float]]] = {}
    for res in results:
        for t in TARGETS:
            for key in ("accuracy", "finetuned_accuracy"):
                scores = {}
                for row in res["rows"]:
                    got = [r["targets"].get(t) for r in row["runs"]]
                    if all(g is not None for g in got):
                        scores[row["label"]] = statistics.mean(g[key] for g in got)
                for label, score in scores.items():
                    better = sum(v > score + 1e-12 for v in scores.values())
                    ties = sum(abs(v - score) <= 1e-12 for v in scores.values())
                    ranks.setdefault(label, {}).setdefault(key, []).append(better + (ties + 1) / 2)
    if not ranks:
        return []
    lines = ["## Mean rank over all rows", "",
             "Rank of each criterion by test accuracy on every (model, FLOPs target) row above (1 = best; ties "
             "share their mean rank). One test sample is 0.22% of the digits test set (450) and 0.03% of the "
             "radio test set (3000).", "", "| criterion | mean rank, no FT | mean rank, FT | rows |", "|---|---:|---:|---:|"]
    for label, by in sorted(ranks.items(), key=lambda kv: statistics.mean(kv[1]["accuracy"])):
        lines.append(f"| {label} | {statistics.mean(by['accuracy']):.2f} | "
                     f"{statistics.mean(by['finetuned_accuracy']):.2f} | {len(by['accuracy'])} |")
    return lines + [""]


def choose_lr(candidates=(3e-4, 1e-3, 3e-3), *, epochs: int, log) -> None:
    """Pick the fine-tuning learning rate on training data only.

    For ResNet-56 (digits) and the 1-D CNN (radio), the SGLP and `last`
    removal sets at 50% FLOPs are fine-tuned on 80% of the model's training
    data; the held-out 20% gives cross-entropy and accuracy per candidate.
    """
    for key in ("resnet56", "cnn1d"):
        spec = MODELS[key]
        x, y = spec.train()
        order = np.random.default_rng(0).permutation(len(y))
        cut = int(0.8 * len(y))
        fit = CalibrationSet(inputs={"input": x[order[:cut]]}, labels=y[order[:cut]])
        held_x, held_y = torch.from_numpy(x[order[cut:]]), torch.from_numpy(y[order[cut:]])
        teacher = load_torch_model(spec.factory, str(spec.weights))
        teacher_logits = teacher_outputs(teacher, fit, ["input"], batch_size=FT_BATCH)
        for criterion in ("sglp", "last"):
            analysis = analyze(spec.onnx, criterion=criterion, target_flops=0.5, suggest=None,
                               batch_size=CALIB_BATCH, torch_model=spec.factory, torch_weights=str(spec.weights))
            modules_of = {u["unit"]: u["modules"] for u in analysis.report["pairing"]["units"]}
            paths = [m for i in analysis.selection.removed for m in modules_of[analysis.units[i].name]]
            for lr in candidates:
                student = skip_modules(teacher, paths, {})
                train(student, teacher, fit, ["input"], epochs=epochs, lr=lr, batch_size=FT_BATCH, seed=0,
                      teacher_logits=teacher_logits)
                with torch.no_grad():
                    logits = student.eval()(held_x)
                loss = float(torch.nn.functional.cross_entropy(logits, held_y))
                acc = float((logits.argmax(1) == held_y).float().mean())
                log(f"choose-lr {key} {criterion} lr {lr:g}: held-out cross-entropy {loss:.4f} accuracy {acc:.4f}")


def _kept_sections(path: Path) -> str:
    """Sections other benchmarks own in the same file (benchmarks/quality_llm.py writes
    one between `<!-- llm:begin -->` and `<!-- llm:end -->`), kept when this one rewrites it."""
    begin, end = "<!-- llm:begin -->", "<!-- llm:end -->"
    text = path.read_text() if path.exists() else ""
    if begin not in text or end not in text:
        return ""
    return "\n" + begin + text.split(begin, 1)[1].split(end, 1)[0] + end + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56,resnet110,vit,cnn1d", help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "quality.md")
    parser.add_argument("--choose-lr", action="store_true", help="run the learning-rate selection and exit")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # One thread for torch and ONNX Runtime: on a shared 2-core machine a
    # second spinning thread costs more than it gives (measured: one torch
    # fine-tuning epoch 5 s with one thread, 40 s with two, under load).
    # Applied to every criterion alike.
    torch.set_num_threads(args.threads)
    make_session.__kwdefaults__["threads"] = args.threads

    if args.choose_lr:
        choose_lr(epochs=args.epochs, log=log)
        return
    start = time.perf_counter()
    results = []
    for key in args.models.split(","):
        if not MODELS[key].onnx.exists():
            log(f"skipping {key}: {MODELS[key].onnx} not found (train it with the script in models/)")
            continue
        results.append(run_model(key, epochs=args.epochs, lr=args.lr, log=log))
    wall = time.perf_counter() - start
    text = render(results, epochs=args.epochs, lr=args.lr, wall=wall, threads=args.threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + _kept_sections(args.output))
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float))
    print(text)


if __name__ == "__main__":
    main()
