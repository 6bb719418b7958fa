"""The weights of a model the tool works on, kept out of its ModelProto.

Every ONNX Runtime session the tool opens (the gated graph, each damage
candidate's suffix, the repair prefixes, the held-out and validation runs)
is made from a ModelProto. A model that holds its weights in its own file
would be serialised with them and copied into each session: measured on a
ResNet-50 (98 MB of float32 weights), opening a session took 1.05-1.44 s
with the weights in the proto and 0.15-0.19 s with them referenced in a side
file, which ONNX Runtime maps instead of copying (`benchmarks/results/
real_size.md` has the whole run). So a run that loads such a model writes
its large weights once to a temporary side file (`spill_weights`), works on
a model that references them there, as it does the weights of a model with
external data (`model_files.external_data_folder`), and puts them back into
the models it returns or writes (`restore_weights`). The side file goes when
the run ends (`working_weights`), whatever ends it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from .model_files import (DEFER_MIN_BYTES, _external_info, _tensor_bytes, external_data_folder, external_stub,
                          external_tensors, inline_external)

# A model holding fewer bytes of weights than this stays as it is: opening a
# session on it costs little (about 12 ms per MiB on the ResNet-50 above).
SPILL_MIN_BYTES = 16 * 2**20
# Initializers of at least this size go; the smaller (scales, norms, biases)
# stay in the proto, as `load_model_files(defer=True)` keeps them.
SPILL_TENSOR_MIN_BYTES = DEFER_MIN_BYTES
SPILL_NAME = "sglp-working-weights.data"

_RUN: contextvars.ContextVar["_Run | None"] = contextvars.ContextVar("sglp_onnx_working_weights", default=None)


class _Run:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack  # what ends with the run: the data folders set, the side file's folder
        self.folder: Path | None = None


@contextlib.contextmanager
def working_weights(folder: str | os.PathLike) -> Iterator[None]:
    """One run's data folder: `external_data_folder(folder)` (the input's
    folder), in which `spill_weights` may move a model's weights to a
    temporary folder that is then the data folder; removed at the end."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(external_data_folder(folder))
        token = _RUN.set(_Run(stack))
        stack.callback(_RUN.reset, token)
        yield


def spill_weights(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` with its main graph's initializers of `SPILL_TENSOR_MIN_BYTES` or more
    referenced in a temporary side file (a new ModelProto: the caller drops
    `model`, whose memory then goes), or None where nothing changes: outside
    `working_weights`, once per run, for a model that references external
    data already (its data folder is the input's), holds less than
    `SPILL_MIN_BYTES` in such initializers, or where the side file cannot be
    written (the run goes on from the proto, as before)."""
    run = _RUN.get()
    if run is None or run.folder is not None or external_tensors(model):
        return None
    big = [size for size in map(_tensor_bytes, model.graph.initializer)
           if size is not None and size >= SPILL_TENSOR_MIN_BYTES]
    if not big or sum(big) < SPILL_MIN_BYTES:
        return None
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix="sglp-weights-"))
        with open(folder / SPILL_NAME, "wb") as data:
            stub = external_stub(model, data, location=SPILL_NAME, size_threshold=SPILL_TENSOR_MIN_BYTES)
    except OSError:  # a full or read-only temporary folder: work from the proto
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return None
    run.folder = folder
    run.stack.callback(shutil.rmtree, folder, ignore_errors=True)
    run.stack.enter_context(external_data_folder(folder))
    return stub


def restore_weights(*models: onnx.ModelProto | None) -> None:
    """Put the spilled weights back into `models` (in place), so that they
    hold them as the input did and outlive the run; the others are left."""
    run = _RUN.get()
    if run is None or run.folder is None:
        return
    for model in models:
        if model is None:
            continue
        for tensor in external_tensors(model):
            if _external_info(tensor)[0] == SPILL_NAME:
                inline_external(tensor, run.folder)
