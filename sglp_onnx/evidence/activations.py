"""Collecting unit representations: expose tensors as extra outputs and run
ONNX Runtime over the calibration set once, batch by batch.

Batches are yielded, never accumulated, so memory stays at one batch of
activations whatever the calibration size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from ..files.calibration import CalibrationSet, token_keep
from ..graph.runtime import feed_rows, session_with_outputs
from .budget import RETURNED_COPIES, WORKING_TENSORS, bytes_per_sample, rows_within

NUMPY_TO_ONNX = {
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
    np.dtype(np.int64): onnx.TensorProto.INT64,
    np.dtype(np.int32): onnx.TensorProto.INT32,
    np.dtype(np.bool_): onnx.TensorProto.BOOL,
    # A quantized model's activations.
    np.dtype(np.uint8): onnx.TensorProto.UINT8,
    np.dtype(np.int8): onnx.TensorProto.INT8,
    np.dtype(np.uint16): onnx.TensorProto.UINT16,
    np.dtype(np.int16): onnx.TensorProto.INT16,
}


def probe(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], names: Sequence[str], *, provider: str = "cpu"
) -> dict[str, np.ndarray]:
    """Values of `names` (and the model's outputs) for one input batch."""
    names = list(dict.fromkeys(names))
    session = session_with_outputs(model, names, provider)
    wanted = [o.name for o in session.get_outputs()]
    values = session.run(wanted, feed)
    return dict(zip(wanted, values))


def probe_shapes(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], names: Sequence[str], *, provider: str = "cpu"
) -> tuple[dict[str, tuple], dict[str, int]]:
    """Concrete shapes and ONNX dtypes of `names` for one batch."""
    values = probe(model, feed, names, provider=provider)
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    dtypes = {k: NUMPY_TO_ONNX[v.dtype] for k, v in values.items() if v.dtype in NUMPY_TO_ONNX}
    return shapes, dtypes


def as_samples(array: np.ndarray, *, token_level: bool, token_mask: np.ndarray | None = None,
               samples: int | None = None) -> np.ndarray:
    """Rows are samples: one per input, or one per (unpadded) token for sequence models.

    A CNN feature map (B, C, H, W) becomes (B, C*H*W); a transformer hidden
    state (B, T, D) becomes (tokens, D), keeping only tokens whose mask is 1.
    A mask longer than T (a model with a KV cache masks past + new tokens)
    is read for its last T positions, the new tokens; a hidden state
    flattened to (B*T, D) is masked alike (`token_keep`). Where the batch
    holds `samples` inputs and a (non-token) tensor's first dimension is a
    multiple of it (MobileViT's transformer runs on (B * patch area, N, C)),
    each sample's rows become one row.
    """
    if not token_level or array.ndim < 2:
        if samples and array.shape[0] != samples and array.shape[0] % samples == 0:
            return array.reshape(samples, -1)
        return array.reshape(array.shape[0], -1)
    leading = array.shape[:2] if array.ndim >= 3 else array.shape[:1]
    rows = array.reshape(int(np.prod(leading)), -1)
    keep = token_keep(token_mask, leading)
    if keep is None or keep.all():  # nothing padded: a view, not a copy
        return rows
    return rows[keep.reshape(-1)]


@dataclass
class Batch:
    """One calibration batch: the feed, its labels, the model outputs and the exposed tensors."""

    feed: dict[str, np.ndarray]
    labels: np.ndarray | None
    outputs: dict[str, np.ndarray]
    tensors: dict[str, np.ndarray]

    def samples(self, name: str, calib: CalibrationSet, token_level: bool | None = None) -> np.ndarray:
        """`as_samples` of tensor `name`: one row per token where `token_level`
        (None: where the calibration set is token data), else per sample."""
        return as_samples(self.tensors[name], token_level=calib.is_token_data if token_level is None else token_level,
                          token_mask=calib.token_mask(self.feed), samples=feed_rows(self.feed))


def stream(
    model: onnx.ModelProto,
    calib: CalibrationSet,
    names: Sequence[str],
    *,
    batch_size: int,
    provider: str = "cpu",
    progress: Callable[[Iterator], Iterator] | None = None,
    budget: int | None = None,
    sizes: dict[str, int] | None = None,
) -> Iterator[Batch]:
    """Run the model over `calib` once, yielding each batch with `names` exposed.

    With `budget` (bytes), batches are cut to `pass_rows` samples so that what
    one run returns stays within it; `sizes`, when given, receives the bytes
    per sample of every fetched tensor (measured on one sample first)."""
    output_names = [o.name for o in model.graph.output]
    session = session_with_outputs(model, names, provider)
    fetch = output_names + [n for n in dict.fromkeys(names) if n not in output_names]
    if budget is not None or sizes is not None:
        one = calib.first(1)
        measured = bytes_per_sample(dict(zip(fetch, session.run(fetch, one))), next(iter(one.values())).shape[0])
        if sizes is not None:
            sizes.update(measured)
        if budget is not None:
            batch_size = pass_rows(measured, budget, batch_size)
    batches = calib.batches(batch_size)
    if progress is not None:
        batches = progress(batches)
    for feed, labels in batches:
        values = dict(zip(fetch, session.run(fetch, feed)))
        yield Batch(
            feed=feed,
            labels=labels,
            outputs={k: values[k] for k in output_names},
            tensors={k: values[k] for k in names},
        )


def pass_rows(sizes: dict[str, int], budget: int, requested: int) -> int:
    """Samples per run of a pass that returns every tensor of `sizes` (bytes per
    sample) within `budget` bytes, ONNX Runtime's working buffers included."""
    held = RETURNED_COPIES * sum(sizes.values()) + WORKING_TENSORS * max(sizes.values(), default=0)
    return rows_within(budget, held, requested)
