"""Reading and writing ONNX files safely.

Loading refuses anything that is not a readable ONNX model and any external
data that points outside the model's folder; writing is all-or-nothing
(temporary files in the destination folder, then `os.replace`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from .errors import UserError

# Protobuf cannot serialise a message above 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _external_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.append(entry.value)
    return locations


def check_external_data_paths(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that escape `base_dir`.

    Absolute paths, `..` components and symlinks that resolve outside the
    model's folder are all refused before a byte of them is read.
    """
    base = base_dir.resolve()
    for location in _external_locations(model):
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
    """Load an ONNX model, turning every way a file can be wrong into a UserError."""
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
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{path} is not a usable ONNX model (no graph nodes or no opset)")
    check_external_data_paths(model, path.parent)
    if load_external_data and _external_locations(model):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise UserError(f"cannot read the external data of {path}: {exc}") from None
    return model


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield temporary paths beside each target; rename them all into place on success.

    On any exception (KeyboardInterrupt included) the temporary files are
    removed and no target is touched.
    """
    targets_p = [Path(t) for t in targets]
    temps: list[Path] = []
    try:
        for target in targets_p:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp, target in zip(temps, targets_p):
            os.replace(tmp, target)
        temps = []
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write `model` to `path` atomically.

    Small models become one self-contained file. Models near the protobuf
    limit (or with `external_data=True`) keep their weights in
    `<name>.data` beside the file; both files are written atomically.
    """
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _external_locations(model) == [] else True
    if not external_data:
        with atomic_paths(path) as (tmp,):
            onnx.save_model(model, str(tmp))
        return
    data_name = path.name + ".data"
    with atomic_paths(path, path.parent / data_name) as (tmp_model, tmp_data):
        # onnx writes the data file relative to the model; write into a private
        # folder first so the final data file name can be recorded in the model.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".sglp-") as staging:
            staged = Path(staging) / path.name
            onnx.save_model(
                model,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(staged, tmp_model)
            os.replace(Path(staging) / data_name, tmp_data)
