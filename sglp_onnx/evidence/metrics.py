"""Task metrics for one or more ONNX models on a data file: top-1 accuracy
(labels), perplexity (causal LMs: token ids and (B, T, V) logits), and
agreement of each model's predictions with the first model's.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ..files.calibration import CalibrationSet, check_calibration, check_labels, load_npz
from ..files.model_files import graph_input_names, load_model
from ..graph.runtime import input_model_errors, make_session


@dataclass
class Metrics:
    model: str
    samples: int
    accuracy: float | None = None
    perplexity: float | None = None
    agreement: float | None = None  # top-1 agreement with the first model

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure(
    model: onnx.ModelProto | str | os.PathLike,
    dataset: CalibrationSet,
    *,
    provider: str = "cpu",
    batch_size: int = 64,
) -> tuple[Metrics, list[np.ndarray]]:
    """Accuracy (labels, (B, classes) logits) and perplexity (token ids, (B, T, V)
    logits) of one model on `dataset`, and its top-1 predictions per batch."""
    session = make_session(model, provider)
    out_name = session.get_outputs()[0].name
    if isinstance(model, onnx.ModelProto):
        from .fidelity import output_kind

        # The output fidelity scores: class ids first (ArgMax) are not logits.
        out_name = output_kind(model).output
    correct = total = seen = 0
    nll = tokens = 0.0
    predictions: list[np.ndarray] = []
    for feed, labels in dataset.batches(batch_size):
        logits = session.run([out_name], feed)[0]
        seen += len(logits)
        pred = logits.argmax(-1)
        predictions.append(pred)
        if labels is not None and logits.ndim == 2:
            # A static class count was checked when the data was loaded; a dynamic one only now.
            check_labels(labels, logits.shape[-1], source=dataset.source)
            correct += int((pred == labels).sum())
            total += len(labels)
        if logits.ndim == 3 and "input_ids" in feed:
            ids = feed["input_ids"]
            mask = feed.get("attention_mask", np.ones_like(ids)).astype(bool)
            keep = mask[:, 1:] & mask[:, :-1]
            logp = log_softmax(logits[:, :-1])
            picked = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            nll -= float(picked[keep].sum())
            tokens += float(keep.sum())
    # A fixed-batch model skips a partial last batch: count what was evaluated.
    metrics = Metrics(model="" if isinstance(model, onnx.ModelProto) else str(model), samples=seen)
    if total:
        metrics.accuracy = correct / total
    if tokens:
        metrics.perplexity = float(np.exp(nll / tokens))
    return metrics, predictions


def evaluate(
    models: Sequence[str | os.PathLike],
    data: str | os.PathLike,
    *,
    provider: str = "cpu",
    batch_size: int = 64,
) -> list[Metrics]:
    """Metrics of every model on `data` (an `.npz` named like the calibration files)."""
    arrays = load_npz(data)
    results: list[Metrics] = []
    reference_predictions: list[np.ndarray] = []
    # One file serves every model: an array is known when any of them reads it.
    known = [name for path in models for name in graph_input_names(path)]
    for k, path in enumerate(models):
        model = load_model(path)
        dataset = check_calibration(arrays, model, source=str(data), also_known=known)
        with input_model_errors(f"the model {path}"):
            metrics, predictions = measure(model, dataset, provider=provider, batch_size=batch_size)
        metrics.model = str(path)
        if k == 0:
            reference_predictions = predictions
        else:
            same = sum(int((a == b).sum()) for a, b in zip(predictions, reference_predictions))
            count = sum(a.size for a in predictions)
            metrics.agreement = same / count if count else None
        results.append(metrics)
    return results


def format_metrics(results: Sequence[Metrics]) -> str:
    lines = [f"{'model':<48} {'samples':>8} {'accuracy':>9} {'perplexity':>11} {'agreement':>10}"]
    for m in results:
        name = m.model if len(m.model) <= 48 else "..." + m.model[-45:]
        acc = "-" if m.accuracy is None else f"{m.accuracy:.2%}"
        ppl = "-" if m.perplexity is None else f"{m.perplexity:.3f}"
        agr = "-" if m.agreement is None else f"{m.agreement:.2%}"
        lines.append(f"{name:<48} {m.samples:>8} {acc:>9} {ppl:>11} {agr:>10}")
    return "\n".join(lines)


def model_name(path: str | os.PathLike) -> str:
    return Path(path).name
