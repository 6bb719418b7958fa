"""Exporting PyTorch models to ONNX, and loading them from `MODULE:FACTORY` specs.

`export_torch` wraps either torch exporter (dynamo or legacy TorchScript) with a
dynamic batch dimension, quiet output and an atomic write; `load_torch_model`
builds the paired model for GradNorm without ever unpickling code.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import pickle
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import onnx
import torch

from ...errors import UserError
from ...files.model_files import EXTERNAL_DATA_THRESHOLD, save_model
from ...options import EXPORTERS  # the choices of --exporter, declared there

VERBOSE_ENV = "SGLP_ONNX_VERBOSE"
BATCH_DIM = "batch"
# torch configures non-propagating handlers on its child loggers, but their
# level is inherited from "torch", so raising that one silences them all.
_NOISY_LOGGERS = ("torch", "onnxscript", "onnx_ir")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def verbose_requested(verbose: bool | None) -> bool:
    if verbose is not None:
        return verbose
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def _file_descriptors_to(sink: BinaryIO) -> Iterator[None]:
    # The TorchScript exporter prints from C++ straight to fds 1 and 2, past
    # any Python-level redirection.
    saved = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            saved.append((fd, os.dup(fd)))
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        for fd, _ in saved:
            os.dup2(sink.fileno(), fd)
        yield
    finally:
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def quiet_output(enabled: bool) -> Iterator[None]:
    """Swallow the exporters' progress prints, warnings and log records."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with (
            tempfile.TemporaryFile() as sink,
            _file_descriptors_to(sink),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def first_line(exc: BaseException) -> str:
    text = _ANSI_ESCAPE.sub("", str(exc)).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    # The dynamo exporter wraps the real reason (an unsupported op, a
    # data-dependent branch) in generic "step n/3 failed" errors.
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _export_keywords(model: torch.nn.Module, n_inputs: int, input_names: list[str], output_names: list[str], *,
                     exporter: str, opset: int | None, dynamic_batch: bool) -> dict:
    """`torch.onnx.export`'s keywords for `exporter`."""
    kwargs: dict = {"input_names": input_names, "output_names": output_names, "opset_version": opset}
    if exporter == "dynamo":
        kwargs["dynamo"] = True
        # One self-contained file unless the weights cannot fit in a protobuf.
        kwargs["external_data"] = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
        if dynamic_batch:
            batch = torch.export.Dim(BATCH_DIM)
            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in range(n_inputs))
    else:
        kwargs["dynamo"] = False
        if dynamic_batch:
            kwargs["dynamic_axes"] = {name: {0: BATCH_DIM} for name in input_names + output_names}
    return kwargs


def export_torch(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = True,
    exporter: str = "dynamo",
    opset: int | None = None,
    verbose: bool | None = None,
) -> onnx.ModelProto:
    """Export `model` in eval mode to `path` and return the written ModelProto.

    Keyword arguments:
        input_names: graph input names, one per example input (default ("input",)).
        output_names: graph output names (default ("logits",)).
        dynamic_batch: make dim 0 of every input and output a symbolic "batch"
            dimension (default True).
        exporter: "dynamo" (torch.export based, writes the
            `pkg.torch.onnx.name_scopes` node metadata) or "legacy" (TorchScript)
            (default "dynamo").
        opset: ONNX opset version; None lets torch choose (default None).
        verbose: show the exporter's own console output; None reads the
            SGLP_ONNX_VERBOSE environment variable (default None).

    Every module's training flag is restored afterwards. Any export failure
    becomes a UserError; the destination is only replaced when export succeeds.
    """
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise UserError("example_inputs must be a non-empty tuple of tensors")
    input_names = list(input_names)
    output_names = list(output_names)
    if len(input_names) != len(example_inputs):
        raise UserError(
            f"{len(example_inputs)} example input(s) but {len(input_names)} input name(s) {input_names}; "
            "give one name per input"
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder does not exist: {path.parent}")

    kwargs = _export_keywords(model, len(example_inputs), input_names, output_names, exporter=exporter,
                              opset=opset, dynamic_batch=dynamic_batch)
    # Per module, so a submodule the caller froze in eval mode stays that way.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    show = verbose_requested(verbose)
    try:
        with tempfile.TemporaryDirectory(prefix="sglp-export-") as staging:
            staged = Path(staging) / path.name
            if exporter == "dynamo":
                kwargs["verbose"] = show
                # Failure reports and dumps land here, not in the caller's cwd.
                kwargs["artifacts_dir"] = staging
            try:
                with quiet_output(not show), torch.no_grad():
                    torch.onnx.export(model, example_inputs, str(staged), **kwargs)
            except Exception as exc:
                # The exporters raise many unrelated types (torch.export, dynamo,
                # onnxscript, TorchScript); every one means this model cannot be
                # exported as given.
                hint = "try exporter='legacy'" if exporter == "dynamo" else "try exporter='dynamo'"
                raise UserError(
                    f"exporting {type(model).__name__} with the {exporter} exporter failed: "
                    f"{first_line(root_cause(exc))[:300]}; {hint}, or make the model traceable"
                ) from None
            proto = onnx.load(str(staged))
    finally:
        for module, training in modes:
            module.training = training
    save_model(proto, path)
    return proto


def load_factory(spec: str) -> Callable:
    """Import `MODULE:FACTORY` (FACTORY may be dotted, e.g. `Class.build`).

    Only importlib and getattr are used: the spec is never evaluated. If the
    module is not importable as is, the current directory is tried too, and
    sys.path is restored afterwards.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip() or ":" in attr_path:
        raise UserError(f"bad model spec {spec!r}: expected MODULE:FACTORY, e.g. models.resnet_cifar:resnet56_digits")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    module = _import_module(module_name, spec)
    target = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UserError(f"module {module_name!r} has no attribute {attr_path!r} (from spec {spec!r})") from None
    if not callable(target):
        raise UserError(f"{spec!r} is a {type(target).__name__}, not a callable that builds a model")
    return target


def _missing_is_target(exc: ModuleNotFoundError, module_name: str) -> bool:
    # Distinguish "the module itself is not on the path" from "it imports
    # something that is not installed"; only the first is fixed by adding cwd.
    missing = exc.name or ""
    return module_name == missing or module_name.startswith(missing + ".")


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run the user's code (a module import, a factory call): what it prints
    goes to stderr, so stdout carries only the tool's own output (--json), and
    an exit or any other exception from it (KeyboardInterrupt aside) is a
    UserError naming `what`."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except (KeyboardInterrupt, UserError):
        raise
    except SystemExit as exc:
        raise UserError(f"{what} exited (SystemExit({exc.code!r})) instead of returning; "
                        "it must not call sys.exit or exit()") from None
    except BaseException as exc:
        raise UserError(f"{what} failed: {first_line(exc)}") from None


def _import_module(module_name: str, spec: str):
    what = f"importing {module_name!r} for {spec!r}"
    module = _try_import(module_name, what)
    if module is not None:
        return module
    saved_path = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        importlib.invalidate_caches()
        module = _try_import(module_name, what)
    finally:
        sys.path[:] = saved_path
    if module is None:
        raise UserError(
            f"cannot import module {module_name!r} for {spec!r}: not installed and not found under "
            f"{os.getcwd()}; run from the folder that contains it or install it"
        )
    return module


def _try_import(module_name: str, what: str):
    """The module, or None when it is not on sys.path; a failure of its own code is a UserError."""
    with user_code(what):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if _missing_is_target(exc, module_name):
                return None
            raise


def _read_weights(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise UserError(f"cannot read safetensors weights {path}: {first_line(exc)}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any pickle that would import or call code.
        # torch's own text advises weights_only=False; name only what was refused.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it would import {found.group(1)}" if found else "it holds more than tensors"
        raise UserError(
            f"refusing to load {path}: {what}, and weights are never unpickled as code; "
            "save model.state_dict() with torch.save, or use .safetensors"
        ) from None
    except Exception as exc:
        raise UserError(f"cannot read weights {path}: {first_line(exc)[:300]}") from None


def _as_state_dict(loaded: object, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise UserError(f"{path} holds a {type(loaded).__name__}, not a state_dict (a dict of tensors)")
    bad = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise UserError(f"{path} is not a state_dict: entries {bad[:3]} are not tensors")
    return loaded


def _preview(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_torch_model(spec: str, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """Build the model named by `MODULE:FACTORY`, load `weights` strictly, return it in eval mode.

    Weights are a `.safetensors` file or a `torch.save` file holding a
    state_dict (bare, or under the key "state_dict" or "model"). Pickles
    that carry code are refused, never run.
    """
    factory = load_factory(spec)
    with user_code(f"calling {spec!r}()"):
        model = factory()
    from ...graph.runtime import apply_torch_threads

    apply_torch_threads()
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{spec!r}() returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        state = _as_state_dict(_read_weights(path), path)
        expected = model.state_dict()
        missing = [key for key in expected if key not in state]
        unexpected = [key for key in state if key not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys: {_preview(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_preview(unexpected)}")
            raise UserError(f"weights {path} do not fit {spec!r}: " + "; ".join(parts))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
            raise UserError(f"weights {path} do not fit {spec!r}: {detail or first_line(exc)}") from None
    return model.eval()
