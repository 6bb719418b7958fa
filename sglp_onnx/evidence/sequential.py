"""Calibrating a model piece by piece (`--sequential`) so that ONNX Runtime
holds one piece's weights at a time instead of the whole model's.

The graph is cut after each unit's exit into contiguous pieces of its
(topologically ordered) node list. Piece k runs over the whole calibration
set before piece k+1 starts; the tensors that cross a cut, and those the
caller asked for, are spilled to a temporary folder batch by batch and read
back one batch at a time. Memory therefore stays at one batch of activations
plus one piece's weights, whatever the calibration size or the model size;
the disk holds the spilled tensors until the pass ends.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from ..files.calibration import CalibrationSet
from ..errors import UserError
from ..graph.index import subgraph_references
from ..graph.ops import is_onnx
from .activations import NUMPY_TO_ONNX, Batch
from ..graph.runtime import InputSession, input_model_errors, make_session


@dataclass
class Piece:
    """A contiguous run of graph nodes and the tensors it reads and hands on."""

    nodes: list[int]  # indices into graph.node, in order
    inputs: list[str] = field(default_factory=list)  # graph inputs or earlier pieces' outputs
    outputs: list[str] = field(default_factory=list)  # what later pieces, the graph or the caller need


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs and outer-scope names read by the node's subgraphs."""
    return [t for t in node.input if t] + sorted(subgraph_references(node))


def split_at(model: onnx.ModelProto, boundaries: Sequence[str], wanted: Sequence[str] = ()) -> list[Piece]:
    """Pieces of `model` cut right after the producer of each boundary tensor.

    `wanted` tensors (beyond the graph outputs) are made outputs of the
    piece that computes them. Constant nodes are copied into every piece
    that reads them rather than passed across cuts.
    """
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    initializers = {init.name for init in graph.initializer}
    graph_outputs = [o.name for o in graph.output]
    requested = set(graph_outputs) | set(wanted)
    # Constants are copied into the pieces that read them, unless someone wants their value.
    constant_nodes = {i for i, node in enumerate(graph.node)
                      if is_onnx(node, "Constant")
                      and not requested.intersection(node.output)}
    cut_after = sorted({producer[b] for b in boundaries if b in producer})
    edges = [-1] + [c for c in cut_after if c < len(graph.node) - 1] + [len(graph.node) - 1]
    pieces = [Piece(nodes=[i for i in range(start + 1, stop + 1) if i not in constant_nodes])
              for start, stop in zip(edges[:-1], edges[1:])]
    pieces = [p for p in pieces if p.nodes]

    piece_of = {i: k for k, p in enumerate(pieces) for i in p.nodes}
    needed_later: dict[str, int] = {}  # tensor -> last piece that reads it
    for k, piece in enumerate(pieces):
        local = {out for i in piece.nodes for out in graph.node[i].output}
        reads: list[str] = []
        copied: set[int] = set()
        for i in piece.nodes:
            for t in _node_reads(graph.node[i]):
                if t in local or t in initializers:
                    continue
                if producer.get(t) in constant_nodes:
                    copied.add(producer[t])
                    continue
                reads.append(t)
                needed_later[t] = k
        piece.nodes = sorted(set(piece.nodes) | copied)
        piece.inputs = list(dict.fromkeys(reads))
        late = [t for t in piece.inputs if t in producer and piece_of[producer[t]] >= k]
        if late:
            raise UserError(f"--sequential needs a topologically sorted graph; {late[0]!r} is read before the "
                            "node that computes it (re-save the model with onnx-graphsurgeon's toposort)")
    for k, piece in enumerate(pieces):
        produced = [out for i in piece.nodes if piece_of.get(i) == k for out in graph.node[i].output if out]
        piece.outputs = [t for t in produced if t in requested or needed_later.get(t, -1) > k]
    return pieces


def piece_model(model: onnx.ModelProto, piece: Piece, input_types: dict[str, int]) -> onnx.ModelProto:
    """A standalone model of one piece: its nodes, the initializers they read, typed inputs."""
    graph = model.graph
    nodes = [graph.node[i] for i in piece.nodes]
    read = {t for node in nodes for t in _node_reads(node)}
    sub = helper.make_graph(
        nodes, f"{graph.name}_piece",
        [helper.make_tensor_value_info(name, input_types[name], None) for name in piece.inputs],
        [onnx.ValueInfoProto(name=name) for name in piece.outputs],
        [init for init in graph.initializer if init.name in read],
    )
    piece_proto = helper.make_model(sub, opset_imports=list(model.opset_import))
    piece_proto.ir_version = model.ir_version
    piece_proto.functions.extend(model.functions)
    return piece_proto


class SpillStore:
    """Per-tensor append-only files of raw batches, read back one batch at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[str, list[tuple[int, tuple, np.dtype]]] = {}
        self._files: dict[str, Path] = {}
        self._created = 0  # files ever made: a dropped tensor's number is never reused

    def write(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if name not in self._files:
            self._files[name] = self.folder / f"{self._created}.bin"
            self._created += 1
        path = self._files[name]
        with open(path, "ab") as f:
            offset = f.tell()
            f.write(array.tobytes())
        self._index.setdefault(name, []).append((offset, array.shape, array.dtype))

    def read(self, name: str, batch: int) -> np.ndarray:
        offset, shape, dtype = self._index[name][batch]
        count = int(np.prod(shape, dtype=np.int64))
        array = np.fromfile(self._files[name], dtype=dtype, count=count, offset=offset)
        return array.reshape(shape)

    def dtype(self, name: str) -> np.dtype:
        return self._index[name][0][2]

    def drop(self, name: str) -> None:
        path = self._files.pop(name, None)
        self._index.pop(name, None)
        if path is not None:
            path.unlink(missing_ok=True)


def stream_sequential(
    model: onnx.ModelProto,
    calib: CalibrationSet,
    names: Sequence[str],
    *,
    boundaries: Sequence[str],
    batch_size: int,
    provider: str = "cpu",
    progress: Callable[[Iterator], Iterator] | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> Iterator[Batch]:
    """Like `representations.stream`, yielding the same batches, but computed piece by piece.

    `boundaries` are the tensors after whose producers the graph is cut
    (unit exits). Spilled tensors live in a temporary folder under
    `spill_dir` (default: the system's temporary folder), removed at the end.
    """
    graph_inputs = {i.name for i in model.graph.input}
    output_names = [o.name for o in model.graph.output]
    names = list(dict.fromkeys(names))
    pieces = split_at(model, boundaries, wanted=names)
    n_batches = -(-calib.n_samples // batch_size)
    reads_left = {}
    for k, piece in enumerate(pieces):
        for t in piece.inputs:
            reads_left[t] = k
    keep = set(output_names) | set(names)

    with tempfile.TemporaryDirectory(prefix="sglp-sequential-", dir=spill_dir) as tmp:
        store = SpillStore(Path(tmp))
        steps = [(k, b) for k in range(len(pieces)) for b in range(n_batches)]
        if progress is not None:
            steps = progress(steps)
        session = None
        current = -1
        feeds = None
        for k, b in steps:
            piece = pieces[k]
            if k != current:
                session = None  # release the previous piece's weights before loading the next
                types = {t: _onnx_type(calib.inputs[t].dtype if t in graph_inputs else store.dtype(t), t)
                         for t in piece.inputs}
                # A piece of the user's model on the user's data: its failures are the input's.
                with input_model_errors():
                    session = InputSession(make_session(piece_model(model, piece, types), provider))
                feeds = iter(calib.batches(batch_size))
                if current >= 0:
                    _drop_consumed(store, pieces[current], reads_left, current, keep)
                current = k
            feed, _ = next(feeds)
            piece_feed = {t: feed[t] if t in graph_inputs else store.read(t, b) for t in piece.inputs}
            for name, value in zip(piece.outputs, session.run(piece.outputs, piece_feed)):
                store.write(name, value)
        session = None

        for b, (feed, labels) in enumerate(calib.batches(batch_size)):
            def value(t: str) -> np.ndarray:
                return feed[t] if t in graph_inputs else store.read(t, b)

            yield Batch(feed=feed, labels=labels, outputs={o: value(o) for o in output_names},
                        tensors={n: value(n) for n in names})


def _drop_consumed(store: SpillStore, piece: Piece, reads_left: dict[str, int], k: int, keep: set[str]) -> None:
    """Delete spilled tensors no later piece reads and nobody asked for."""
    for t in piece.inputs:
        if reads_left.get(t, -1) <= k and t not in keep:
            store.drop(t)


def _onnx_type(dtype: np.dtype, name: str) -> int:
    try:
        return NUMPY_TO_ONNX[np.dtype(dtype)]
    except KeyError:
        raise UserError(f"--sequential cannot pass tensor {name!r} of dtype {dtype} between pieces") from None


def residual_boundaries(model: onnx.ModelProto) -> list[str]:
    """Exits of every residual Add: where to cut before units are known (discovery's probe)."""
    from ..graph.index import GraphIndex
    from ..units.discovery import residual_adds

    return [r.exit for r in residual_adds(GraphIndex(model))]


def probe_shapes_sequential(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: Sequence[str], *,
                            provider: str = "cpu") -> tuple[dict[str, tuple], dict[str, int]]:
    """`representations.probe_shapes` computed piece by piece, cut at residual exits."""
    values = probe_sequential(model, feed, names, boundaries=residual_boundaries(model), provider=provider)
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    dtypes = {k: NUMPY_TO_ONNX[v.dtype] for k, v in values.items() if v.dtype in NUMPY_TO_ONNX}
    return shapes, dtypes


def probe_sequential(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: Sequence[str], *,
                     boundaries: Sequence[str], provider: str = "cpu") -> dict[str, np.ndarray]:
    """`representations.probe` computed piece by piece: values of `names` and the outputs for one batch."""
    n = next(iter(feed.values())).shape[0]
    batch = next(stream_sequential(model, CalibrationSet(inputs=feed), names, boundaries=boundaries,
                                   batch_size=n, provider=provider))
    return {**batch.outputs, **batch.tensors}
