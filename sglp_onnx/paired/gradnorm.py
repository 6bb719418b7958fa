"""GradNorm importance on the paired PyTorch model, and the pairing check.

Each unit is matched to the torch module that computes it: the module whose
input equals the unit's entry and whose output equals its exit on a
calibration batch (its scope name is tried first). A unit that no module
reproduces is refused, as is a model whose final outputs differ.
"""

from __future__ import annotations

import sys

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from ..files.calibration import MASK_NAMES
from ..errors import UserError
from ..units.discovery import PrunableUnit, layer_key


@dataclass
class Pairing:
    """Torch module paths per unit, and how the pairing was verified."""

    modules: list[list[str]]
    max_error: list[float]
    output_error: float
    method: list[str] = field(default_factory=list)


def run_torch(model: torch.nn.Module, feed: dict[str, np.ndarray], input_order: Sequence[str]):
    """Call the torch model with an ONNX feed: positional for one input, keywords otherwise."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
    if len(tensors) == 1:
        return model(next(iter(tensors.values())))
    try:
        return model(**tensors)
    except TypeError:
        return model(*[tensors[n] for n in input_order])


def first_tensor(value) -> torch.Tensor | None:
    """The main tensor of a module output: itself, the first of a tuple, or `.logits`."""
    if isinstance(value, torch.Tensor):
        return value
    logits = getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        for v in value.values():
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def relative_error(a: np.ndarray | None, b: np.ndarray) -> float:
    """Max |a - b| relative to max(1, max |b|); inf when shapes differ or `a` is missing."""
    if a is None or a.shape != b.shape:
        return float("inf")
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0) / scale)


TOLERANCE = 2e-3


def pair_units(
    model: torch.nn.Module,
    units: Sequence[PrunableUnit],
    feed: dict[str, np.ndarray],
    onnx_values: dict[str, np.ndarray],
    onnx_outputs: Sequence[np.ndarray],
    input_order: Sequence[str],
    node_scopes: dict[str, str],
) -> Pairing:
    """Match every unit to torch modules and verify the match on one batch.

    `onnx_values` holds the ONNX values of every unit's entry and exit for
    `feed`; `node_scopes` maps ONNX node names to module scopes (used for
    units no single module computes, such as one attention sublayer).
    """
    captured: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
    hooks = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, kwargs, output):
        name = names[module]
        inp = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        out = first_tensor(output)
        # Copies: a later in-place op (ReLU(inplace=True) after a block, `x += ...`)
        # would otherwise rewrite what was captured here.
        captured.setdefault(name, (
            None if inp is None else inp.detach().float().numpy().copy(),
            None if out is None else out.detach().float().numpy().copy(),
        ))

    for module in names:
        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            result = run_torch(model, feed, input_order)
    except Exception as exc:
        raise UserError(f"the torch model failed on a calibration batch: {type(exc).__name__}: {exc}") from None
    finally:
        for h in hooks:
            h.remove()

    final = first_tensor(result)
    output_error = relative_error(None if final is None else final.detach().float().numpy(), onnx_outputs[0])
    if output_error > TOLERANCE:
        raise UserError(
            "the paired torch model does not reproduce the ONNX model's output on a calibration batch "
            f"(relative error {output_error:.3g}); check --torch-model and --torch-weights"
        )

    modules, errors, methods, unpaired = [], [], [], []
    for unit in units:
        entry, exit_ = onnx_values[unit.entry], onnx_values[unit.exit]
        matches = [
            (name, relative_error(out, exit_)) for name, (inp, out) in captured.items()
            if name and relative_error(out, exit_) <= TOLERANCE and relative_error(inp, entry) <= TOLERANCE
        ]
        preferred = [m for m in matches if m[0] in (unit.scope, layer_key(unit.scope))]
        if preferred or matches:
            name, err = (preferred or sorted(matches, key=lambda m: -m[0].count(".")))[0]
            modules.append([name])
            errors.append(err)
            methods.append("module output")
            continue
        # A sublayer (one residual branch inside a layer's forward) has no
        # module of its own: take the modules its ONNX nodes came from.
        scoped = _modules_from_scopes(model, (node_scopes.get(n, "") for n in unit.nodes))
        if scoped:
            modules.append(scoped)
            errors.append(float("nan"))
            methods.append("node scopes")
        else:
            unpaired.append(unit.name)
    if unpaired:
        shown = ", ".join(unpaired[:4]) + (" ..." if len(unpaired) > 4 else "")
        raise UserError(
            f"no module of the paired torch model reproduces unit(s) {shown}; "
            "is --torch-model the model this ONNX file was exported from?"
        )
    return Pairing(modules=modules, max_error=errors, output_error=output_error, method=methods)


def _modules_from_scopes(model: torch.nn.Module, scopes: Iterable[str]) -> list[str]:
    found: set[str] = set()
    for scope in scopes:
        parts = scope.split(".") if scope else []
        while parts:
            try:
                module = model.get_submodule(".".join(parts))
            except AttributeError:
                parts.pop()
                continue
            if any(True for _ in module.parameters(recurse=False)) or len(parts) > 1:
                found.add(".".join(parts))
            break
    # Keep only the outermost paths so no parameter is counted twice.
    return sorted(p for p in found if not any(p.startswith(q + ".") for q in found))


def unit_parameters(model: torch.nn.Module, module_paths: Sequence[str]) -> list[torch.nn.Parameter]:
    params: dict[int, torch.nn.Parameter] = {}
    for path in module_paths:
        for p in model.get_submodule(path).parameters():
            params[id(p)] = p
    return list(params.values())


def next_token_rows(logits: torch.Tensor, feed: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's (B, T, V) logit rows that predict a real next token, and those tokens."""
    ids = torch.from_numpy(feed["input_ids"]).long()
    mask = torch.from_numpy(feed.get("attention_mask", np.ones_like(feed["input_ids"]))).bool()
    keep = (mask[:, 1:] & mask[:, :-1]).reshape(-1)
    return logits[:, :-1].reshape(-1, logits.shape[-1])[keep], ids[:, 1:].reshape(-1)[keep]


def task_loss(output, feed: dict[str, np.ndarray], labels: np.ndarray | None, *, causal_lm: bool) -> torch.Tensor:
    """Cross-entropy with labels, with the model's own argmax when there are
    none, or next-token cross-entropy for causal language models."""
    logits = first_tensor(output)
    if logits is None:
        raise UserError("the paired torch model returned no tensor to compute a loss from")
    if causal_lm and logits.ndim == 3 and "input_ids" in feed:
        return torch.nn.functional.cross_entropy(*next_token_rows(logits, feed), reduction="sum")
    flat = logits.reshape(-1, logits.shape[-1])
    if labels is not None and labels.size == flat.shape[0]:
        target = torch.from_numpy(labels.reshape(-1)).long()
    else:
        target = flat.detach().argmax(-1)
        # Per-token predictions of an encoder: padding tokens predict nothing.
        mask = next((feed[n] for n in MASK_NAMES if n in feed), None)
        if logits.ndim == 3 and mask is not None and tuple(mask.shape) == tuple(logits.shape[:2]):
            keep = torch.from_numpy(np.asarray(mask)).bool().reshape(-1)
            flat, target = flat[keep], target[keep]
    return torch.nn.functional.cross_entropy(flat, target, reduction="sum")


def loss_description(model: torch.nn.Module, calib) -> str:
    """In words, the loss `task_loss` uses for `model` on calibration set `calib`."""
    if is_causal_lm(model) and calib.is_token_data:
        return "next-token cross-entropy of the causal LM over unpadded tokens"
    if calib.labels is not None:
        return "cross-entropy against the calibration labels"
    per = " per unpadded token" if calib.is_token_data else ""
    return f"cross-entropy against the model's own argmax prediction{per} (no labels: output-preserving)"


def is_causal_lm(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or []
    if type(model).__name__.endswith("ForCausalLM") or any(a.endswith("ForCausalLM") for a in archs):
        return True
    if config is None or "transformers" not in sys.modules:
        return False  # not a transformers model: never import transformers to find out
    try:  # transformers' own list also names the older *LMHeadModel classes (GPT-2)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return config is not None and type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def gradnorm(
    model: torch.nn.Module,
    pairing: Pairing,
    batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray | None]],
    input_order: Sequence[str],
) -> np.ndarray:
    """GradNorm importance: ||d loss / d theta_unit||_2 with the gradient summed over all batches.

    The model stays in eval mode (batch-norm statistics and dropout as deployed).
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    causal = is_causal_lm(model)
    n_total = 0
    for feed, labels in batches:
        output = run_torch(model, feed, input_order)
        loss = task_loss(output, feed, labels, causal_lm=causal)
        loss.backward()
        n_total += next(iter(feed.values())).shape[0]
    scores = []
    for paths in pairing.modules:
        grads = [p.grad for p in unit_parameters(model, paths) if p.grad is not None]
        total = sum(float(g.double().pow(2).sum()) for g in grads)
        scores.append(np.sqrt(total) / max(n_total, 1))
    for p in model.parameters():
        p.grad = None
    return np.asarray(scores, dtype=np.float64)
