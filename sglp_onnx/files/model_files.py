"""Reading and writing ONNX files safely.

Loading refuses anything that is not a readable ONNX model and any external
data that points outside the model's folder; writing is all-or-nothing
(temporary files in the destination folder, then `os.replace`, or a
no-clobber `os.link` where nothing may be overwritten).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Sequence

import onnx

from ..errors import UserError

# os.link fails with these where the file system has no hard links (FAT, some network mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
# Protobuf cannot serialise a message above 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
PROTOBUF_LIMIT = 2**31 - 1
# Loading with `defer=True`, external tensors of at least this many bytes stay
# in the input's data files: ONNX Runtime reads them from there, the output
# streams them from there, and the ModelProto only references them.
DEFER_MIN_BYTES = 64 * 2**10
# Chunk size when streaming a tensor from the input's data file to the output's.
_COPY_CHUNK = 64 * 2**20

# The folder the external-data locations of the models being worked on are
# relative to (the input model's folder), set for the length of a run.
_DATA_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("sglp_onnx_data_folder", default=None)


@contextlib.contextmanager
def external_data_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Within the block, external tensors that models still reference (see
    `load_model_files(defer=True)`) are read from `folder`: by ONNX Runtime
    sessions, `tensor_array` and the writers, which copy them into the output."""
    token = _DATA_FOLDER.set(Path(folder).resolve())
    try:
        yield _DATA_FOLDER.get()
    finally:
        _DATA_FOLDER.reset(token)


def data_folder() -> Path | None:
    """The folder set by `external_data_folder`, or None outside one."""
    return _DATA_FOLDER.get()


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of `model` (initializers, subgraphs, attributes) whose data is in an external file."""
    return [t for t in onnx.external_data_helper._get_all_tensors(model)
            if t.data_location == onnx.TensorProto.EXTERNAL]


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors `model` references in external files (0 when it holds all its weights)."""
    return sum(_external_info(t)[2] for t in external_tensors(model))


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, held or external: what a session on `model` loads."""
    return sum(_external_info(t)[2] if t.data_location == onnx.TensorProto.EXTERNAL else (_tensor_bytes(t) or 0)
               for t in model.graph.initializer)


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an external tensor; length from its type when not recorded."""
    entries = {e.key: e.value for e in tensor.external_data}
    length = int(entries["length"]) if "length" in entries else (_tensor_bytes(tensor) or 0)
    return entries.get("location", ""), int(entries.get("offset", 0)), length


def tensor_array(tensor: onnx.TensorProto):
    """The values of `tensor` as a numpy array, read from the data folder
    (`external_data_folder`) when they are still external."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor)
    folder = data_folder()
    if folder is None:
        raise RuntimeError(f"tensor {tensor.name!r} is external and no data folder is set")
    return onnx.numpy_helper.to_array(tensor, base_dir=str(folder))


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when `model` is too close to the protobuf limit to be one file."""
    return proto_size(model) > EXTERNAL_DATA_THRESHOLD


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """True when `model` can be serialised as one message (to bytes, for a session)."""
    return proto_size(model) < PROTOBUF_LIMIT


def model_files_for(model: onnx.ModelProto, path: Path, *, force: bool, external: bool = False,
                    inputs: Sequence[Path] = ()) -> list[Path]:
    """The files writing `model` to `path` creates: `path`, and `path.data` when
    its weights go to a side file: when `external` (the input kept its weights
    in external data, so the output does too) or when the model is too large
    for one file. An existing side file needs `force`; one of the `inputs`
    (the input model's own files) is refused. Renamed into place with the
    caller's other outputs (see `atomic_paths`)."""
    if not external and not needs_external_data(model):
        return [path]
    data_path = path.with_name(path.name + ".data")
    if any(same_file(data_path, p) for p in inputs):
        raise UserError(f"the output's weights would go to {data_path}, a file of the input model; choose another "
                        "output path (inputs are never overwritten)")
    check_name_length(data_path, what="output's weights file")
    if data_path.exists() and not force:
        raise UserError(f"{data_path} exists; pass --force to overwrite it")
    return [path, data_path]


def write_model_files(model: onnx.ModelProto, planned: Sequence[Path], temps: Sequence[Path]) -> int:
    """Write `model` to the temporary files standing for `planned` (from
    `model_files_for`); returns the bytes written."""
    if len(planned) == 2:
        save_model(model, temps[0], external_data=True, data_file=temps[1], data_name=planned[1].name)
    else:
        save_model(model, temps[0], external_data=False)
    return sum(Path(t).stat().st_size for t in temps[: len(planned)])


def proto_size(model: onnx.ModelProto) -> int:
    """Serialised size of `model` in bytes, or PROTOBUF_LIMIT when it is larger
    (protobuf raises instead of measuring a message above 2 GiB)."""
    try:
        return model.ByteSize()
    except Exception:  # google.protobuf.message.EncodeError
        return PROTOBUF_LIMIT


@contextlib.contextmanager
def checkable(model: onnx.ModelProto) -> Iterator[onnx.ModelProto | Path]:
    """What `onnx.checker.check_model(..., full_check=True)` should read for
    `model`: the model itself, or, when it references external data, its
    graph saved in a temporary folder beside empty stand-ins of its data
    files (the checker wants the files to exist; it never reads them).
    Above the protobuf limit, the model saved with its weights in a side file."""
    locations = list(dict.fromkeys(_external_info(t)[0] for t in external_tensors(model)))
    if not locations and fits_in_protobuf(model):
        yield model
        return
    if not fits_in_protobuf(model):
        with saved_with_external_data(model) as path:
            yield path
        return
    with tempfile.TemporaryDirectory(prefix="sglp-check-", ignore_cleanup_errors=True) as tmp:
        for location in locations:
            stand_in = Path(tmp) / location
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.touch()
        path = Path(tmp) / "sglp-checked-model.onnx"
        onnx.save_model(model, str(path))
        yield path


@contextlib.contextmanager
def saved_with_external_data(model: onnx.ModelProto) -> Iterator[Path]:
    """`model` saved in a temporary folder with its weights in a side file, for
    readers that need a path (ONNX Runtime, which maps the side file instead of
    copying it, and the checker above 2 GiB). `model` is not modified."""
    with tempfile.TemporaryDirectory(prefix="sglp-model-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        write_with_external_data(model, path, path.with_name("model.onnx.data"), location="model.onnx.data")
        yield path


# Offsets of external tensors are page aligned so that ONNX Runtime can map them.
DATA_ALIGNMENT = 4096


def write_with_external_data(model: onnx.ModelProto, model_path: Path, data_path: Path, *, location: str,
                             size_threshold: int = 1024) -> None:
    """Write `model` with every numeric initializer of `size_threshold` bytes or
    more in `data_path`, recorded in the model as `location`.

    Unlike `onnx.save_model(..., save_as_external_data=True)`, this neither
    strips `model` nor copies it: a stub graph with the same nodes and
    external-data references is saved, and the weights are streamed to the
    data file one tensor at a time. (Stripping and reloading a protobuf
    message does not give its memory back, so it would double the footprint.)
    """
    with open(data_path, "wb") as data:
        stub = external_stub(model, data, location=location, size_threshold=size_threshold)
    onnx.save_model(stub, str(model_path))


def external_stub(model: onnx.ModelProto, data, *, location: str, size_threshold: int = 1024) -> onnx.ModelProto:
    """A new ModelProto with the nodes of `model` whose numeric initializers
    of `size_threshold` bytes or more, and its tensors already external (read
    from the data folder), are written to the open file `data` one at a time
    and referenced there as `location`. `model` is not modified."""
    stub = onnx.ModelProto()
    _copy_fields(model, stub, skip="graph")
    _copy_fields(model.graph, stub.graph, skip="initializer")
    source = data_folder()
    # External tensors of subgraphs and attributes, copied with the nodes.
    nested = external_tensors(stub) if source is not None else []
    for tensor in model.graph.initializer:
        target = stub.graph.initializer.add()
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            target.CopyFrom(tensor)
            if source is not None:
                _stream_external(target, source, data, location)
            continue
        size = _tensor_bytes(tensor)
        if size is None or size < size_threshold:
            target.CopyFrom(tensor)
            continue
        raw = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
        offset = _aligned(data)
        data.write(raw)
        target.name = tensor.name
        target.data_type = tensor.data_type
        target.dims.extend(tensor.dims)
        if tensor.doc_string:
            target.doc_string = tensor.doc_string
        _set_external(target, location, offset, len(raw))
        del raw
    for tensor in nested:
        _stream_external(tensor, source, data, location)
    return stub


def _aligned(data) -> int:
    data.write(b"\0" * (-data.tell() % DATA_ALIGNMENT))
    return data.tell()


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _stream_external(tensor: onnx.TensorProto, folder: Path, data, location: str) -> None:
    """Copy an external tensor's bytes from its file under `folder` to the end
    of `data` in chunks, and point `tensor` at the copy."""
    source, start, length = _external_info(tensor)
    offset = _aligned(data)
    with open(folder / source, "rb") as f:
        f.seek(start)
        left = length
        while left:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OSError(f"{folder / source} ends before tensor {tensor.name!r}")
            data.write(chunk)
            left -= len(chunk)
    _set_external(tensor, location, offset, length)


def _copy_fields(source, target, *, skip: str) -> None:
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        # protobuf >= 5.x has is_repeated; older versions only the label.
        repeated = getattr(descriptor, "is_repeated", None)
        if repeated is None:
            repeated = descriptor.label == descriptor.LABEL_REPEATED
        if repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a numeric tensor's values; None for strings and unknown types."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    return count * itemsize


def external_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.append(entry.value)
    return locations


def beside(model_path: str | os.PathLike, suffix: str) -> Path:
    """A file next to `model_path` named after it: `beside("m.onnx", ".calib.npz")` is `m.calib.npz`."""
    path = Path(model_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + suffix)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` name one file: the same path once links are
    resolved, or (both existing) the same inode, as a hard link is."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError, ValueError):  # a loop of links, a name the system refuses
        return False


def refuse_inputs(path: Path, *, what: str, inputs: Sequence[Path]) -> None:
    """The one rule for every output of every command: never one of the files
    the run reads (`inputs`: the model, its external data, the calibration
    file, torch weights, the files it copies), with or without --force."""
    for source in inputs:
        if same_file(path, source):
            raise UserError(f"the {what} {path} is the input model or another file this run reads ({Path(source)}); "
                            "choose another path (inputs are never overwritten, even with --force)")


def check_output_path(path: Path, *, force: bool, what: str, inputs: Sequence[Path]) -> None:
    """Refuse an output path before any work: an input file (see
    `refuse_inputs`), a missing or unwritable folder, a folder, a symbolic
    link or anything else that is not a regular file, or an existing file
    without `force`."""
    refuse_inputs(path, what=what, inputs=inputs)
    check_name_length(path, what=what)
    if not path.parent.is_dir():
        raise UserError(f"the folder of the {what} does not exist: {path.parent}")
    # The final rename would replace a link by a regular file (not write where
    # it points) and a device or pipe by a file: refuse both, even with --force.
    if path.is_symlink():
        raise UserError(f"the {what} {path} is a symbolic link; give the path of a regular file "
                        f"(for example the one it points to, {path.resolve()})")
    if path.is_dir():
        raise UserError(f"the {what} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"the {what} {path} is not a regular file (a device, pipe or socket); "
                        "give the path of a regular file")
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    # os.access says yes to root even where the file system refuses files
    # (/proc, read-only mounts): try the real thing before hours of work.
    check_folder_writable(path.parent, what=what)


def check_external_data_paths(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that escape `base_dir`.

    Absolute paths, `..` components and symlinks that resolve outside the
    model's folder are all refused before a byte of them is read.
    """
    base = base_dir.resolve()
    for location in external_locations(model):
        candidate = Path(location)
        if candidate.is_absolute() or ".." in candidate.parts:
            raise UserError(
                f"external data location {location!r} points outside the model's folder; "
                "refusing to read it (move the data file beside the model)"
            )
        resolved = (base / candidate).resolve()
        if base not in resolved.parents and resolved != base:
            raise UserError(
                f"external data location {location!r} resolves outside the model's folder "
                f"({resolved}); refusing to read it"
            )
        if not resolved.is_file():
            raise UserError(f"external data file {location!r} referenced by the model is missing")


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, turning every way a file can be wrong into a UserError
    (unreadable, no nodes, duplicate node names, external data outside its
    folder, refused by onnx.checker)."""
    return load_model_files(path, load_external_data=load_external_data)[0]


def load_model_files(path: str | os.PathLike, *, load_external_data: bool = True,
                     defer: bool = False) -> tuple[onnx.ModelProto, list[Path]]:
    """`load_model`, and the files the model is made of: `path`, then each
    external data file it references (once each, in order of first use).

    With `defer`, external tensors of `DEFER_MIN_BYTES` or more are not read:
    the model keeps referencing them (relative to the model's folder, see
    `external_data_folder`), so that no copy of the weights is made in this
    process; the smaller ones (scales, norms, biases) are loaded."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}); check that the file is "
                        "complete and was written by onnx.save or torch.onnx.export") from None
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{path} is not a usable ONNX model (no graph nodes or no opset)")
    _check_unique_node_names(model, path)
    check_external_data_paths(model, path.parent)
    from ..graph.ort_schemas import register as register_ort_schemas

    register_ort_schemas()  # ONNX Runtime's SimplifiedLayerNormalization (the genai builder's RMS norm)
    try:
        # From the path, so that external weights are neither read nor copied.
        onnx.checker.check_model(str(path))
    except Exception as exc:  # ValidationError, or a parse error of the C++ loader
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the input model {path} is not valid ONNX: {line[:300]} (onnx.checker); fix or export it "
                        "again") from None
    densify_sparse_initializers(model, path)
    _refuse_non_tensor_io(model, path)
    locations = list(dict.fromkeys(external_locations(model)))
    if load_external_data and locations:
        try:
            if defer:
                _load_small_external(model, path.parent)
            else:
                onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise UserError(f"cannot read the external data of {path}: {exc}") from None
    return model, [path] + [path.parent / location for location in locations]


def densify_sparse_initializers(model: onnx.ModelProto, path: Path) -> list[str]:
    """Store the main graph's sparse initializers (valid ONNX, run by ONNX
    Runtime) as ordinary dense ones, the form every stage reads and the
    output is written in; returns their names. Sparse tensors anywhere else
    (subgraphs, Constant's sparse_value) are refused with a UserError."""
    import numpy as np

    for node in _all_nodes(model.graph):
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                raise UserError(f"{path}: node {node.name or node.op_type!r} holds a sparse tensor attribute, which "
                                "sglp-onnx does not read; store it dense (onnx.numpy_helper) and try again")
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                if sub.sparse_initializer:
                    raise UserError(f"{path}: a subgraph of node {node.name or node.op_type!r} has sparse "
                                    "initializers, which sglp-onnx does not read; store them dense and try again")
    graph = model.graph
    names = []
    for sparse in graph.sparse_initializer:
        try:
            values = onnx.numpy_helper.to_array(sparse.values)
            indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
            dims = [int(d) for d in sparse.dims]
            dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
            # Indices are linear (NNZ,) or coordinates (NNZ, rank).
            flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
            dense[flat] = values.reshape(-1)
        except Exception as exc:  # external values, indices out of range, a malformed tensor
            raise UserError(f"{path}: sparse initializer {sparse.values.name!r} cannot be read ({exc}); store it "
                            "dense and try again") from None
        graph.initializer.append(onnx.numpy_helper.from_array(dense.reshape(dims), sparse.values.name))
        names.append(sparse.values.name)
    del graph.sparse_initializer[:]
    return names


def _refuse_non_tensor_io(model: onnx.ModelProto, path: Path) -> None:
    """Graph inputs and outputs must be tensors: a sequence or map (scikit-learn-to-ONNX's ZipMap
    probabilities) is not something calibration data feeds or a score compares."""
    for what, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            kind = value.type.WhichOneof("value")
            if kind not in (None, "tensor_type"):
                raise UserError(f"{path}: graph {what} {value.name!r} is a {kind.replace('_type', '')}, not a "
                                "tensor, which sglp-onnx does not read; export it as a tensor (skl2onnx: "
                                "options={'zipmap': False}) and try again")


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                yield from _all_nodes(sub)


def _load_small_external(model: onnx.ModelProto, folder: Path) -> None:
    """Load the external tensors under `DEFER_MIN_BYTES` into `model`; the larger
    stay referenced. Every reference is checked against its file's size."""
    sizes: dict[str, int] = {}
    for tensor in external_tensors(model):
        location, offset, length = _external_info(tensor)
        if location not in sizes:
            sizes[location] = (folder / location).stat().st_size
        if offset + length > sizes[location]:
            raise ValueError(f"tensor {tensor.name!r} lies beyond the end of {location}")
        if length < DEFER_MIN_BYTES:
            inline_external(tensor, folder)


def inline_external(tensor: onnx.TensorProto, folder: Path) -> None:
    """Read an external tensor's data from its file under `folder` into it (in place)."""
    onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def graph_input_names(path: str | os.PathLike) -> list[str]:
    """The graph input names of the model at `path`, read without its weights
    (empty when it cannot be read: loading it says why)."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # protobuf raises several unrelated types
        return []
    return [i.name for i in graph.input]


def files_size(paths: Sequence[Path]) -> int:
    """Bytes on disk of `paths` (a model and its external data files)."""
    return sum(Path(p).stat().st_size for p in paths)


def _check_unique_node_names(model: onnx.ModelProto, path: Path) -> None:
    # Units, pairing and the report name nodes; two nodes with one name would
    # be mixed up (onnx.checker does not refuse them, ONNX's IR asks for unique names).
    graph = model.graph
    values = [v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)]
    nodes = [s for node in graph.node for s in (node.name, node.op_type, node.domain, *node.input, *node.output)]
    # protobuf hands back bytes for a string field that is not valid UTF-8 (a damaged file).
    if any(isinstance(s, bytes) for s in values + nodes):
        raise UserError(f"{path} is not valid ONNX: a node, op type or tensor name is not UTF-8 text "
                        "(the file is damaged)")
    seen: set[str] = set()
    for node in graph.node:
        if node.name and node.name in seen:
            raise UserError(f"{path} has two nodes named {node.name!r}; node names must be unique "
                            "(rename one, or export the model again)")
        seen.add(node.name)


def check_folder_writable(folder: Path, *, what: str = "output") -> None:
    """Create and remove a temporary file in `folder`, or raise a UserError saying why not."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sglp-write-check.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserError(
            f"cannot write the {what} into {folder} ({exc.strerror or type(exc).__name__}); "
            "choose a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _final_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then act on them.

    Python runs signal handlers in the main thread only, so swapping the
    handlers works even when the signal lands on an ONNX Runtime or torch
    thread (a signal mask would not).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda n, frame: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored
                signal.signal(signum, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


# mkstemp's random part and the ".", "." and ".tmp" around the target's name.
_TEMP_EXTRA = 8 + len("..") + len(".tmp")


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system of `folder` takes."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _temp_stem(target: Path) -> str:
    """The target's name in its temporary file's name (`.NAME.XXXXXXXX.tmp`),
    shortened, suffix kept, where the whole would exceed the file system's
    limit: a legal 250-byte output name must not fail at the last step."""
    limit = name_max(target.parent) - _TEMP_EXTRA
    name = target.name
    if len(name.encode()) <= limit:
        return name
    suffix = target.suffix if len(target.suffix.encode()) < limit else ""
    stem = name[: len(name) - len(suffix)]
    while stem and len((stem + suffix).encode()) > limit:
        stem = stem[:-1]
    return stem + suffix


def check_name_length(path: Path, *, what: str) -> None:
    """Refuse, before any work, a file name longer than its file system allows."""
    folder = path.parent if path.parent.is_dir() else Path(".")
    limit = name_max(folder)
    if len(path.name.encode()) > limit:
        raise UserError(f"the {what} name is {len(path.name.encode())} bytes long; the file system allows at most "
                        f"{limit}: choose a shorter name")


def destination_name(path: str | os.PathLike) -> str:
    """The name a temporary file of `atomic_paths` (`.NAME.XXXXXXXX.tmp`) will
    be renamed to; any other path's own name."""
    name = Path(path).name
    if name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3:
        return name[1:-len(".tmp")].rsplit(".", 1)[0]
    return name


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike, overwrite: bool = True) -> Iterator[list[Path]]:
    """Yield temporary paths beside each target; rename them all into place on success.

    On any exception (KeyboardInterrupt included) the temporary files are
    removed and no target is touched. With `overwrite`, existing targets are
    replaced (`os.replace`); without it, each file is put in place with a
    no-clobber `os.link`, so a target that appeared during the run (another
    run writing the same path) is never replaced: the files already put in
    place are taken back and a UserError says so.
    """
    targets_p = [Path(t) for t in targets]
    temps: list[Path] = []
    try:
        for target in targets_p:
            fd, tmp = tempfile.mkstemp(prefix=f".{_temp_stem(target)}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            temps.append(Path(tmp))
            # mkstemp makes owner-only files; the result should look like any
            # other file the user writes (or keep the mode of the file it replaces).
            os.chmod(tmp, _final_mode(target))
        yield temps
        # An interrupt between two renames would leave a mixed set: hold
        # SIGINT/SIGTERM until every file is in place, then let it through
        # marked so that the caller does not claim nothing was written.
        try:
            with interrupts_deferred():
                if overwrite:
                    for tmp, target in zip(temps, targets_p):
                        os.replace(tmp, target)
                else:
                    _link_all(temps, targets_p)
                temps = []
        except KeyboardInterrupt as exc:
            exc.output_written = not temps
            raise
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _link_all(temps: Sequence[Path], targets: Sequence[Path]) -> None:
    """Put every temporary file in place under its target's name without
    replacing anything: all of them, or (a target exists) none."""
    placed: list[tuple[Path, Path]] = []  # (temporary file, target) now in place
    try:
        for tmp, target in zip(temps, targets):
            try:
                os.link(tmp, target)  # atomic, and fails if target exists
            except FileExistsError:
                raise
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                # A file system without hard links: check, then rename (a
                # narrow race instead of none).
                if os.path.lexists(target):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(tmp), None,
                                          str(target)) from None
                os.replace(tmp, target)
            placed.append((tmp, target))
    except BaseException as exc:
        for tmp, target in placed:
            # Take back only our own file: a link of the temporary file (or,
            # renamed, the one it became).
            with contextlib.suppress(OSError):
                if not tmp.exists() or os.path.samefile(tmp, target):
                    target.unlink()
        if isinstance(exc, FileExistsError):
            raise UserError(f"{exc.filename2 or exc.filename} appeared while this run was writing (another run "
                            "writing the same path?); nothing was written; pass --force to overwrite it") from None
        raise
    for tmp in temps:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               data_file: str | os.PathLike | None = None, data_name: str | None = None,
               overwrite: bool = True) -> None:
    """Write `model` to `path` atomically.

    Small models become one self-contained file. Models near the protobuf
    limit (or with `external_data=True`) keep their weights in a side file,
    by default `<name>.data` beside the model; both files are written
    atomically. A caller that renames temporary files itself passes the
    temporary `data_file` and the final `data_name` recorded in the model.
    Without `overwrite`, an existing `path` is never replaced (see
    `atomic_paths`). `model` is left as it was (see `write_with_external_data`).
    """
    path = Path(path)
    if external_data is None:
        external_data = needs_external_data(model) if external_locations(model) == [] else True
    if not external_data:
        with atomic_paths(path, overwrite=overwrite) as (tmp,):
            onnx.save_model(model, str(tmp))
        return
    data_path = Path(data_file) if data_file is not None else path.with_name(path.name + ".data")
    data_name = data_name or data_path.name
    if Path(data_name).name != data_name:
        raise ValueError(f"data_name must be a bare file name, got {data_name!r}")
    with atomic_paths(path, data_path, overwrite=overwrite) as (tmp_model, tmp_data):
        # The model records the final data file name, whatever temporary name it is written under.
        write_with_external_data(model, tmp_model, tmp_data, location=data_name)
