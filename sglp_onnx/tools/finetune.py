"""Healing a pruned model: apply the pruning report's removals to the paired
torch model, fine-tune it with cross-entropy plus distillation from the
unpruned model, and export it with the pruned ONNX file's signature.

Compression itself stays fine-tuning-free (SGLP's point); healing is a
separate, optional step that needs training data and the torch model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from ..files.calibration import CalibrationSet, check_calibration, load_npz, model_inputs
from ..errors import UserError
from ..graph.index import declared_dims
from ..graph.ops import ONNX_DOMAINS
from ..paired.gradnorm import TOLERANCE, first_tensor, is_causal_lm, next_token_rows, relative_error, run_torch
from ..files.model_files import load_model_files, save_model, write_model_files
from ..files.output_plan import OutputPlan, default_report, finetune_plan
from ..options import (DEFAULT_DISTILL_WEIGHT, DEFAULT_LR, DEFAULT_TEMPERATURE, ExportOptions, RuntimeOptions,
                       TrainingOptions)
from ..progress import Progress, Stages
from ..report.summary import to_json, tool_info
from ..graph.runtime import input_model_errors, make_session

# The training defaults are `options.TrainingOptions`' (DEFAULT_LR, DEFAULT_DISTILL_WEIGHT, DEFAULT_TEMPERATURE).
DEFAULT_BATCH_SIZE = TrainingOptions.batch_size
VALIDATION_SAMPLES = 8
# The teacher's outputs over the training set are kept in memory up to this size.
TEACHER_CACHE_BYTES = 256 * 2**20


class SkipModule(torch.nn.Module):
    """Stands in for a removed unit: returns the first tensor it is given.

    A module that returned a tuple (a transformer layer's hidden state plus
    attention weights or cache) is replaced by a tuple of the same length
    whose other entries are None.
    """

    def __init__(self, tuple_length: int | None = None) -> None:
        super().__init__()
        self.tuple_length = tuple_length

    def forward(self, *args, **kwargs):
        x = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None:
            raise RuntimeError("a skipped unit received no tensor input")
        if self.tuple_length is None:
            return x
        return (x,) + (None,) * (self.tuple_length - 1)


@dataclass
class RemovalPlan:
    """What the pruning report removed and which torch modules computed it."""

    units: list[str]
    modules: list[str] | None  # None until paired (see `pair_plan`)
    report_path: Path
    report: dict = field(repr=False, default_factory=dict)


def read_plan(pruned: Path, report: str | os.PathLike | None = None, *, pairing: dict | None = None) -> RemovalPlan:
    """The removed units of `pruned` and their torch modules, from its report
    (PRUNED.json by default) or from `pairing`; `modules` is None when the
    report has no pairing (see `pair_plan`)."""
    path = Path(report) if report is not None else default_report(pruned)
    if not path.is_file():
        raise UserError(f"no pruning report for {pruned}: {path} not found; pass --report REPORT.json "
                        "(the JSON that `sglp-onnx compress` wrote beside the pruned model)")
    try:
        data = json.loads(path.read_text())
        units = data["units"]
        removed = [u["name"] for u in units if u["removed"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not an sglp-onnx pruning report ({type(exc).__name__}: {exc})") from None
    pairing = data.get("pairing") if pairing is None else pairing
    if removed and not pairing:
        # compress ran without --torch-model (its default criterion needs none): finetune pairs itself.
        return RemovalPlan(units=removed, modules=None, report_path=path, report=data)
    return _with_modules(RemovalPlan(units=removed, modules=None, report_path=path, report=data), pairing)


def _with_modules(plan: RemovalPlan, pairing: dict) -> RemovalPlan:
    """`plan` with the torch modules of its removed units, from a pairing record."""
    path, removed = plan.report_path, plan.units
    modules_of = {p["unit"]: p["modules"] for p in (pairing or {}).get("units", [])}
    unpaired = [name for name in removed if not modules_of.get(name)]
    if unpaired:
        raise UserError(f"the report {path} has no torch module for removed unit(s) {', '.join(unpaired[:4])}; "
                        "run `sglp-onnx compress` again with --torch-model")
    modules = list(dict.fromkeys(m for name in removed for m in modules_of[name]))
    return RemovalPlan(units=removed, modules=modules, report_path=path, report=plan.report)


def pair_plan(plan: RemovalPlan, teacher: torch.nn.Module, arrays: dict, provider: str) -> RemovalPlan:
    """Pair the units of the model the report was made from with `teacher`
    (on the training data) when the report has no pairing of its own."""
    from ..paired.pairing import pair_units_of

    given = Path(str(plan.report.get("input", "")))
    candidates = [given] if given.is_absolute() else [given, plan.report_path.parent / given.name]
    original = next((c for c in candidates if c.is_file()), None)
    if original is None:
        raise UserError(f"the report {plan.report_path} has no torch pairing and the model it was made from "
                        f"({given}) is not found to pair it with --torch-model; run finetune where compress ran, or "
                        "run `sglp-onnx compress` again with --torch-model")
    info = pair_units_of(original, teacher, arrays, granularity=plan.report.get("granularity") or "layer",
                         provider=provider)
    return _with_modules(plan, info)


def output_structure(model: torch.nn.Module, paths: Sequence[str], feed, input_order) -> dict[str, int | None]:
    """Per module path: None when it returns a tensor, else the length of the tuple it returns."""
    found: dict[str, int | None] = {}
    hooks = []
    for path in paths:
        def hook(module, args, output, path=path):
            found.setdefault(path, len(output) if isinstance(output, (tuple, list)) else None)
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            run_torch(model, feed, input_order)
    finally:
        for h in hooks:
            h.remove()
    return found


def skip_modules(model: torch.nn.Module, paths: Sequence[str], structure: dict[str, int | None]) -> torch.nn.Module:
    """A copy of `model` with each module at `paths` replaced by a `SkipModule`."""
    pruned = copy.deepcopy(model)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = pruned.get_submodule(parent_path) if parent_path else pruned
        setattr(parent, child, SkipModule(structure.get(path)))
    return pruned


def delete_layers(model: torch.nn.Module, paths: Sequence[str]) -> tuple[torch.nn.Module, list[int]]:
    """A copy of a Hugging Face model without the decoder layers at `paths`, and the kept layer numbers.

    Each path must be a whole layer: an entry of the model's one layer
    ModuleList (as long as `config.num_hidden_layers`). The layers are
    deleted, not skipped, so the copy is a genuinely shallower model: the
    config's layer count (and `layer_types`) shrink and every `layer_idx`
    attribute in a kept layer is renumbered 0..n-1, as transformers would
    build it, so its KV cache holds one entry per kept layer.
    """
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UserError(f"{type(model).__name__} has no config.num_hidden_layers; cannot delete its layers")
    parents = {path.rpartition(".")[0] for path in paths}
    layers_path = parents.pop() if len(parents) == 1 else None
    layers = model.get_submodule(layers_path) if layers_path else None
    if paths and (parents or not isinstance(layers, torch.nn.ModuleList) or len(layers) != count
                  or not all(path.rpartition(".")[2].isdigit() for path in paths)):
        raise UserError(f"the removed modules ({', '.join(paths)}) are not whole decoder layers of "
                        f"{type(model).__name__}; fine-tuning a Hugging Face model needs a model pruned "
                        "by whole layers (not --granularity sublayer)")
    if not paths:
        return copy.deepcopy(model), list(range(count))
    removed = {int(path.rpartition(".")[2]) for path in paths}
    kept = [i for i in range(count) if i not in removed]
    clone = copy.deepcopy(model)
    old_layers = clone.get_submodule(layers_path)
    parent_path, _, child = layers_path.rpartition(".")
    setattr(clone.get_submodule(parent_path) if parent_path else clone, child,
            torch.nn.ModuleList([old_layers[i] for i in kept]))
    types = getattr(clone.config, "layer_types", None)
    clone.config.num_hidden_layers = len(kept)
    if isinstance(types, list) and len(types) == count:
        clone.config.layer_types = [types[i] for i in kept]
    for new, old in enumerate(kept):
        for module in old_layers[old].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    return clone.eval(), kept


def cache_layer_numbers(report: dict, kept: Sequence[int]) -> list[int]:
    """The pruned model's cache number of each kept layer, in order, from the report's kv_cache.layer_map."""
    mapping = (report.get("kv_cache") or {}).get("layer_map")
    if not mapping:
        return list(kept)
    numbers = [int(old) for old, new in sorted(mapping.items(), key=lambda kv: int(kv[0])) if new is not None]
    if numbers != list(kept):
        raise UserError(f"the report's kv_cache.layer_map keeps layers {numbers}, but its removed units keep "
                        f"layers {list(kept)}; is the report the pruned model's?")
    return numbers


def rename_cache_tensors(model: onnx.ModelProto, numbers: Sequence[int]) -> None:
    """Rename `past_key_values.{i}.*` / `present.{i}.*` to layer `numbers[i]` in place (graph and subgraphs)."""
    from ..surgery.kv_cache import rename_tensors

    rename_tensors(model, {f"{prefix}.{new}.{kv}": f"{prefix}.{old}.{kv}" for new, old in enumerate(numbers)
                           if new != old for prefix in ("past_key_values", "present") for kv in ("key", "value")})


def _torch_logits(model: torch.nn.Module, feed, input_order) -> torch.Tensor:
    logits = first_tensor(run_torch(model, feed, input_order))
    if logits is None:
        raise UserError("the torch model returned no tensor")
    return logits


def _loss_rows(logits: torch.Tensor, feed: dict[str, np.ndarray], causal: bool):
    """Logit rows that carry a loss and, for causal LMs, their next-token targets."""
    if causal and logits.ndim == 3 and "input_ids" in feed:
        return next_token_rows(logits, feed)
    return logits.reshape(-1, logits.shape[-1]), None


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T))."""
    log_p_student = torch.log_softmax(student / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * temperature**2


@torch.no_grad()
def task_metrics(model: torch.nn.Module, data: CalibrationSet, input_order, *, batch_size: int) -> dict:
    """Mean cross-entropy and top-1 accuracy against the labels (or next tokens), model in eval mode."""
    model.eval()
    causal = is_causal_lm(model)
    nll = correct = count = 0.0
    for feed, labels in data.batches(batch_size):
        rows, targets = _loss_rows(_torch_logits(model, feed, input_order), feed, causal)
        if targets is None:
            if labels is None:
                return {"loss": None, "accuracy": None}
            targets = torch.from_numpy(labels.reshape(-1)).long()
        nll += float(torch.nn.functional.cross_entropy(rows.float(), targets, reduction="sum"))
        correct += float((rows.argmax(-1) == targets).sum())
        count += len(targets)
    return {"loss": nll / max(count, 1), "accuracy": correct / max(count, 1)}


@torch.no_grad()
def teacher_outputs(teacher: torch.nn.Module, data: CalibrationSet, input_order: Sequence[str], *,
                    batch_size: int, max_bytes: int = TEACHER_CACHE_BYTES) -> np.ndarray | None:
    """The teacher's logits for every sample (eval mode), or None when they would exceed `max_bytes`."""
    teacher.eval()
    rows = []
    for feed, _ in data.batches(batch_size):
        rows.append(_torch_logits(teacher, feed, input_order).float().numpy())
        if rows[0].nbytes / len(rows[0]) * data.n_samples > max_bytes:
            return None
    return np.concatenate(rows)


def check_training_options(*, epochs: int, lr: float, batch_size: int, seed: int, distill_weight: float,
                           temperature: float) -> None:
    """Refuse a training option that cannot work (NaN included), before any
    work: the checks of `options.TrainingOptions`' fields."""
    TrainingOptions(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, distill_weight=distill_weight,
                    temperature=temperature).checked()


def _batch_loss(logits: torch.Tensor, teacher_batch: torch.Tensor | None, feed: dict, labels, causal: bool, *,
                distill_weight: float, temperature: float) -> torch.Tensor:
    """`train`'s loss on one batch: cross-entropy with the labels (next tokens;
    the teacher's top-1 without labels), mixed with distillation from the teacher."""
    rows, targets = _loss_rows(logits, feed, causal)
    if targets is None:
        targets = (torch.from_numpy(labels.reshape(-1)).long() if labels is not None
                   else _loss_rows(teacher_batch, feed, causal)[0].argmax(-1))
    loss = torch.nn.functional.cross_entropy(rows, targets)
    if distill_weight > 0 and teacher_batch is not None:
        teacher_rows = _loss_rows(teacher_batch, feed, causal)[0]
        loss = (1 - distill_weight) * loss + distill_weight * distillation_loss(rows, teacher_rows, temperature)
    return loss


def train(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    data: CalibrationSet,
    input_order: Sequence[str],
    *,
    epochs: int,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    distill_weight: float = DEFAULT_DISTILL_WEIGHT,
    temperature: float = DEFAULT_TEMPERATURE,
    progress: Progress | None = None,
    teacher_logits: np.ndarray | None = None,
) -> list[float]:
    """Fine-tune `student` in place; return the mean training loss of each epoch.

    Loss = (1 - w) * cross-entropy with the labels (next tokens for causal
    LMs; the teacher's top-1 when there are no labels) + w * T^2 *
    KL(teacher || student) at temperature T. AdamW without weight decay,
    learning rate decayed to 0 by a cosine over all steps; batches drawn in
    a seeded random order; normalisation statistics update (train mode).

    The teacher runs in eval mode on unaugmented data, so its outputs are
    the same every epoch: they are computed once (`teacher_outputs`) unless
    too large to keep, or taken from `teacher_logits` (one row per sample).
    """
    check_training_options(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, distill_weight=distill_weight,
                           temperature=temperature)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = data.n_samples
    steps = epochs * math.ceil(n / batch_size)
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    causal = is_causal_lm(student)
    if teacher is not None:
        teacher.eval()
        if teacher_logits is None and (distill_weight > 0 or data.labels is None):
            teacher_logits = teacher_outputs(teacher, data, input_order, batch_size=batch_size)
    history = []
    for epoch in range(epochs):
        student.train()
        order = rng.permutation(n)
        starts = range(0, n, batch_size)
        if progress is not None:
            starts = progress(starts, f"epoch {epoch + 1}/{epochs}")
        total, seen = 0.0, 0
        for start in starts:
            index = np.sort(order[start:start + batch_size])
            feed = {k: v[index] for k, v in data.inputs.items()}
            labels = None if data.labels is None else data.labels[index]
            teacher_batch = None
            if teacher_logits is not None:
                teacher_batch = torch.from_numpy(teacher_logits[index])
            elif teacher is not None and (distill_weight > 0 or labels is None):
                with torch.no_grad():
                    teacher_batch = _torch_logits(teacher, feed, input_order)
            loss = _batch_loss(_torch_logits(student, feed, input_order), teacher_batch, feed, labels, causal,
                               distill_weight=distill_weight, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
            seen += len(index)
        history.append(total / max(seen, 1))
    student.eval()
    for p in params:
        p.requires_grad_(False)
    return history


def _signature(model: onnx.ModelProto) -> tuple[list, list]:
    """Inputs and outputs as (name, element type, dims) with symbolic dims as None."""
    initializers = {i.name for i in model.graph.initializer}

    def describe(vi):
        dims = declared_dims(vi)
        numbers = None if dims is None else tuple(d if isinstance(d, int) else None for d in dims)
        return vi.name, vi.type.tensor_type.elem_type, numbers

    return ([describe(i) for i in model.graph.input if i.name not in initializers],
            [describe(o) for o in model.graph.output])


def check_signature(pruned: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """Same input and output names, order and element types; same rank and fixed sizes.

    Symbolic dimensions may be named differently by the exporter.
    """
    for kind, a, b in zip(("inputs", "outputs"), _signature(pruned), _signature(new)):
        same = len(a) == len(b) and all(
            na == nb and ta == tb and (da is None or db is None or (
                len(da) == len(db) and all(x is None or y is None or x == y for x, y in zip(da, db))))
            for (na, ta, da), (nb, tb, db) in zip(a, b))
        if not same:
            raise UserError(f"the fine-tuned export changed the model's {kind}: {b} instead of {a}")


def _validate(new: onnx.ModelProto, feed: dict[str, np.ndarray], provider: str) -> dict:
    from ..errors import ValidationError
    from ..surgery.validation import check_standalone

    try:
        checks = check_standalone(new, feed, provider=provider, what="the fine-tuned export")
    except ValidationError as exc:
        hint = "; lower --lr" if "NaN/Inf" in str(exc) else ""
        raise UserError(f"{exc}{hint}; nothing was written") from None
    return {**checks, "signature": False}


@dataclass
class FinetuneResult:
    """The written model and report of `finetune`, and the fine-tuned torch model."""

    output: Path
    report_path: Path | None  # None when the report was not written (printed with --json)
    report: dict
    model: torch.nn.Module = field(repr=False)

    def summary(self) -> str:
        """What was skipped and trained and how the metrics moved, as printed by `sglp-onnx finetune`."""
        rep = self.report
        tm = rep["train_metrics"]
        lines = [f"fine-tuned {rep['input']} for {rep['training']['epochs']} epoch(s) -> {rep['output']}",
                 f"{rep.get('layer_removal', 'skipped')} modules: {', '.join(rep['skipped_modules']) or '(none)'}",
                 f"training loss per epoch: {', '.join(f'{v:.4f}' for v in rep['training']['epoch_loss'])}"]
        if tm["before"]["accuracy"] is not None:
            lines.append(f"training-data accuracy: {tm['before']['accuracy']:.2%} -> {tm['after']['accuracy']:.2%}")
        if rep["eval"]:
            before, after = rep["eval"]["before"], rep["eval"]["after"]
            for key in ("accuracy", "perplexity"):
                if before.get(key) is not None:
                    fmt = "{:.2%}" if key == "accuracy" else "{:.3f}"
                    lines.append(f"{key} on {rep['eval']['data']}: {fmt.format(before[key])} -> "
                                 f"{fmt.format(after[key])}")
        if rep.get("repair_maps_dropped"):
            lines.append("note: fine-tuning healed the plain bypass, not the pruned model's repair maps; a removal "
                         "set chosen for repair can heal worse than one chosen without it (compress --repair none "
                         "before fine-tuning)")
        if self.report_path is not None:
            lines.append(f"report: {self.report_path}")
        return "\n".join(lines)


def _student(teacher, plan: RemovalPlan, pruned: onnx.ModelProto, pruned_path: Path, data: CalibrationSet,
             order: list[str], cache_names: set[str], *, hf: bool, torch_model: str, provider: str):
    """The torch model without the removed units (layers deleted for `hf`,
    modules skipped otherwise), checked to reproduce the pruned ONNX model:
    (student, the kept layers' cache numbers, the relative error, the probe feed)."""
    torch_order = [name for name in order if name not in cache_names]
    probe_feed = data.first(VALIDATION_SAMPLES)
    torch_probe = {k: v for k, v in probe_feed.items() if k not in cache_names}
    cache_numbers: list[int] = []
    try:
        if hf:
            student, kept = delete_layers(teacher, plan.modules)
            cache_numbers = cache_layer_numbers(plan.report, kept)
        else:
            structure = output_structure(teacher, plan.modules, probe_feed, order)
            student = skip_modules(teacher, plan.modules, structure)
        with torch.no_grad():
            got = _torch_logits(student.eval(), torch_probe, torch_order).float().numpy()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"the torch model failed on the training data: {type(exc).__name__}: {exc}") from None
    with input_model_errors(f"the model {pruned_path}"):
        expected = make_session(pruned, provider).run([pruned.graph.output[0].name], probe_feed)[0]
    error = relative_error(got, expected)
    if error > TOLERANCE:
        raise UserError(
            f"{'deleting' if hf else 'skipping'} the removed units' modules ({', '.join(plan.modules) or 'none'}) "
            f"in {torch_model} does "
            f"not reproduce {pruned_path} (relative error {error:.3g}); is --torch-model (and --torch-weights) "
            f"the model {plan.report_path} was made from?")
    return student, cache_numbers, error, probe_feed


def _export_student(student, pruned: onnx.ModelProto, exported: Path, order: list[str], probe_feed: dict,
                    cache_numbers: list[int], *, hf: bool, exporter: str) -> onnx.ModelProto:
    """The fine-tuned model as ONNX with the pruned model's names and opset (the KV cache renumbered as it was)."""
    from .export.torch_export import export_torch

    opset = next((o.version for o in pruned.opset_import if o.domain in ONNX_DOMAINS), None)
    if hf:
        from .export.hf import export_hf

        # A fresh export numbers the cache 0..n-1; the pruned model keeps the kept layers' numbers.
        with_cache = any(name.startswith("past_key_values.") for name in order)
        new = export_hf(student, exported, with_cache=with_cache, exporter=exporter, opset=opset)
        if with_cache:
            rename_cache_tensors(new, cache_numbers)
            save_model(new, exported)
        return new
    example = tuple(torch.from_numpy(np.ascontiguousarray(probe_feed[name][:2])) for name in order)
    return export_torch(student, example, exported, input_names=order,
                        output_names=[o.name for o in pruned.graph.output], exporter=exporter, opset=opset)


def _checked(pruned: onnx.ModelProto, new: onnx.ModelProto, feed: dict, provider: str) -> dict:
    """The fine-tuned model's validation record: the pruned model's signature, then `_validate`."""
    check_signature(pruned, new)
    validation = _validate(new, feed, provider)
    validation["signature"] = True
    return validation


def _write(new: onnx.ModelProto, outputs: OutputPlan, rep: dict, *, force: bool, pruned_files: list[Path],
           stages: Stages) -> None:
    """The fine-tuned model (and its report) written all or nothing."""
    with outputs.writing(new, force=force, input_files=pruned_files) as temps:
        write_model_files(new, temps.model_files, temps.model)
        stages.stop()
        if temps.report is not None:
            temps.report.write_text(to_json(rep))


def _cache_names(pruned: onnx.ModelProto) -> set[str]:
    """The pruned model's past KV-cache inputs (an hf:DIR decoder's)."""
    from ..files.calibration import is_cache_input

    specs = model_inputs(pruned)
    return {s.name for s in specs if is_cache_input(s, specs)}


def _teacher(torch_model: str, torch_weights, plan: RemovalPlan, train_data, provider: str, stages: Stages):
    """The paired torch model, loaded as compress's pairing loads it (same
    refusals), and the plan paired here when the pruning report had no pairing:
    (teacher, plan, paired here)."""
    from ..paired.pairing import load_paired_model

    teacher = load_paired_model(torch_model, None if torch_weights is None else str(torch_weights))
    paired_here = plan.modules is None
    if paired_here:
        stages.start("pairing")
        plan = pair_plan(plan, teacher, load_npz(train_data), provider)
        stages.start("load")
    return teacher, plan, paired_here


def _read_files(pruned_path: Path, train_data, report, eval_data, torch_weights, torch_model: str) -> list[Path]:
    """Every file the run reads: no output may be one of them, --force or not."""
    from ..paired.hf_model import HF_PREFIX, is_hf_spec

    inputs = [pruned_path, Path(train_data), Path(report) if report is not None else default_report(pruned_path)]
    inputs += [Path(p) for p in (eval_data, torch_weights) if p is not None]
    if is_hf_spec(torch_model) and Path(torch_model[len(HF_PREFIX):]).is_dir():
        inputs += [p for p in Path(torch_model[len(HF_PREFIX):]).iterdir() if p.is_file()]
    return inputs


def _load_pruned(pruned_path: Path, report, outputs: OutputPlan):
    """The pruned model (without its repair maps: fine-tuning heals the plain
    bypass, the closed-form maps are the no-training alternative), its files,
    its removal plan and the report's repair record."""
    pruned, pruned_files = load_model_files(pruned_path)
    outputs.refuse(pruned_files)  # its external data files
    plan = read_plan(pruned_path, report)
    repair = plan.report.get("repair")
    if repair and repair.get("applied"):
        from ..repair.graph import strip_repairs

        pruned = strip_repairs(pruned, repair["cuts"])
    return pruned, pruned_files, plan, repair


def _evaluation(pruned_path: Path, exported: Path, out: Path, eval_data, *, provider: str, batch_size: int) -> dict:
    """`--eval-data`: the pruned model's metrics before and after fine-tuning."""
    from ..evidence.metrics import evaluate

    before, after = evaluate([pruned_path, exported], eval_data, provider=provider, batch_size=batch_size)
    evaluation = {"data": str(eval_data), "before": before.to_dict(), "after": after.to_dict()}
    evaluation["after"]["model"] = str(out)
    return evaluation


def _finetune_record(*, pruned_path: Path, out: Path, plan: RemovalPlan, torch_model: str, torch_weights,
                     paired_here: bool, repair, hf: bool, cache_numbers: list[int], error: float, training: dict,
                     metrics: dict, evaluation, validation: dict, exporter: str, timings: dict) -> dict:
    """The fine-tuning report (written beside the output, or printed by --json)."""
    epoch_loss = training.pop("epoch_loss")
    return {
        "tool": tool_info(),
        "input": str(pruned_path),
        "output": str(out),
        "pruning_report": str(plan.report_path),
        "torch_model": torch_model,
        "torch_weights": None if torch_weights is None else str(torch_weights),
        "pairing": "made by finetune (the pruning report had none)" if paired_here else "the pruning report's",
        "removed_units": plan.units,
        "skipped_modules": plan.modules,
        # The pruned model's repair maps are not trained: fine-tuning heals the plain bypass.
        "repair_maps_dropped": bool(repair and repair.get("applied")),
        "layer_removal": "deleted" if hf else "skipped",
        "cache_layers": cache_numbers if hf else None,
        "skip_reproduces_pruned_relative_error": error,
        "training": {
            **training,
            "loss": "(1 - w) * CE(labels) + w * T^2 * KL(softmax(teacher/T) || softmax(student/T))",
            "optimizer": "AdamW, no weight decay, cosine decay to 0",
            "epoch_loss": epoch_loss,
        },
        "train_metrics": metrics,
        "eval": evaluation,
        "validation": validation,
        "exporter": exporter,
        "timings": timings,
    }


def finetune(
    pruned_path: str | os.PathLike, *, torch_model: str, train_data: str | os.PathLike, epochs: int,
    torch_weights: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None, eval_data: str | os.PathLike | None = None, lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, distill_weight: float = DEFAULT_DISTILL_WEIGHT,
    temperature: float = DEFAULT_TEMPERATURE, exporter: str = "dynamo", provider: str = "cpu", force: bool = False,
    write_report: bool = True, progress: Progress | None = None,
) -> FinetuneResult:
    """Heal a pruned model by fine-tuning its torch counterpart; write the result as ONNX.

    Reads the pruning report (`report`, default PRUNED.json beside the pruned model), replaces every removed
    unit's torch module(s) in the paired model by a skip (for `hf:DIR` causal LMs: deletes the removed decoder
    layers, see `delete_layers`, and exports with `export_hf`, the KV cache renamed to the pruned model's layer
    numbers), checks that this reproduces the pruned ONNX model, trains it (see `train`) on `train_data` (an
    .npz named like calibration files, with `labels` for classifiers), exports it with the pruned model's input
    and output names and opset, checks it (onnx.checker, ONNX Runtime, same signature, finite outputs) and
    writes it (default PRUNED.finetuned.onnx) with a JSON report beside it (unless not `write_report`: `--json`
    prints it instead), atomically. `eval_data` adds metrics of the pruned model before and after fine-tuning.
    """
    check_training_options(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, distill_weight=distill_weight,
                           temperature=temperature)
    ExportOptions(exporter=exporter).checked()
    RuntimeOptions(provider=provider).checked()
    timings: dict[str, float] = {}
    stages = Stages(progress, timings)
    pruned_path = Path(pruned_path)
    from ..paired.hf_model import is_hf_spec

    outputs = finetune_plan(pruned_path, output, write_report=write_report,
                            inputs=_read_files(pruned_path, train_data, report, eval_data, torch_weights, torch_model))
    outputs.check(force=force)
    out = outputs.model
    stages.start("load")
    pruned, pruned_files, plan, repair = _load_pruned(pruned_path, report, outputs)
    data = check_calibration(load_npz(train_data), pruned, source=str(train_data))
    order = [s.name for s in model_inputs(pruned)]

    hf = is_hf_spec(torch_model)
    cache_names = _cache_names(pruned) if hf else set()
    teacher, plan, paired_here = _teacher(torch_model, torch_weights, plan, train_data, provider, stages)
    student, cache_numbers, error, probe_feed = _student(teacher, plan, pruned, pruned_path, data, order, cache_names,
                                                         hf=hf, torch_model=torch_model, provider=provider)
    torch_order = [name for name in order if name not in cache_names]
    # The torch model runs whole sequences: the ONNX feed without its (empty) past KV cache.
    torch_data = data if not cache_names else CalibrationSet(
        inputs={k: v for k, v in data.inputs.items() if k not in cache_names}, labels=data.labels,
        source=data.source)

    stages.start("train")
    before = task_metrics(student, torch_data, torch_order, batch_size=batch_size)
    history = train(student, teacher, torch_data, torch_order, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                    distill_weight=distill_weight, temperature=temperature, progress=progress)
    after = task_metrics(student, torch_data, torch_order, batch_size=batch_size)

    with tempfile.TemporaryDirectory(prefix="sglp-finetune-") as tmp:
        stages.start("export")
        exported = Path(tmp) / out.name
        new = _export_student(student, pruned, exported, order, probe_feed, cache_numbers, hf=hf, exporter=exporter)
        stages.start("validation")
        validation = _checked(pruned, new, probe_feed, provider)
        stages.stop()
        evaluation = None
        if eval_data is not None:
            stages.start("eval")
            evaluation = _evaluation(pruned_path, exported, out, eval_data, provider=provider, batch_size=batch_size)
            stages.stop()

        rep = _finetune_record(
            pruned_path=pruned_path, out=out, plan=plan, torch_model=torch_model, torch_weights=torch_weights,
            paired_here=paired_here, repair=repair, hf=hf, cache_numbers=cache_numbers, error=error,
            training={"data": str(train_data), "samples": data.n_samples, "epochs": epochs, "lr": lr,
                      "batch_size": batch_size, "seed": seed, "distill_weight": distill_weight,
                      "temperature": temperature, "epoch_loss": history},
            metrics={"before": before, "after": after}, evaluation=evaluation, validation=validation,
            exporter=exporter, timings=timings)
        stages.start("write")
        _write(new, outputs, rep, force=force, pruned_files=pruned_files, stages=stages)
    return FinetuneResult(output=out, report_path=outputs.report, report=rep, model=student)
