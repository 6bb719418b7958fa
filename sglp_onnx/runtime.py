"""ONNX Runtime sessions: explicit providers, extra outputs, large models.

Every session in the tool is made here so that provider choice, fallback
detection and the 2 GB protobuf limit are handled in one place.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import onnx
import onnxruntime as ort

from .errors import UserError
from .model_files import proto_size, saved_with_external_data

PROVIDER_CHAINS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
PROTOBUF_LIMIT = 2_000_000_000
# Above this size a session reads the model from a temporary file with its
# weights in a side file, which ONNX Runtime maps; from bytes, the serialised
# copy and ONNX Runtime's own copy would both stay in memory.
SESSION_FILE_THRESHOLD = 512 * 2**20


def provider_chain(provider: str) -> list[str]:
    try:
        return list(PROVIDER_CHAINS[provider])
    except KeyError:
        raise UserError(f"--provider must be one of {', '.join(PROVIDER_CHAINS)}, got {provider!r}") from None


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    provider: str = "cpu",
    *,
    threads: int | None = None,
    optimize: bool = True,
) -> ort.InferenceSession:
    """A session on `provider` that refuses to fall back silently to the CPU."""
    chain = provider_chain(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with _serialised(model) as source, _quiet_provider_loading(provider != "cpu"):
        try:
            # No Python-level fallback: it prints a banner and hides which provider failed.
            session = ort.InferenceSession(source, sess_options=options, providers=chain, enable_fallback=0)
        except Exception as exc:
            if provider != "cpu":
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                # Drop the C++ source location and signature ONNX Runtime puts first.
                reason = re.sub(r"^\S+:\d+ .*?\) ", "", reason)[:300]
                raise UserError(f"ONNX Runtime cannot use the {provider} provider here ({reason}); "
                                "use --provider cpu") from None
            raise
    if chain[0] not in session.get_providers():
        raise UserError(
            f"the {provider} provider is not usable on this machine "
            f"(ONNX Runtime fell back to {session.get_providers()[0]}); use --provider cpu"
        )
    return session


@contextmanager
def _quiet_provider_loading(enabled: bool) -> Iterator[None]:
    """Silence ONNX Runtime's global logger while GPU provider libraries load.

    A missing CUDA or TensorRT library is logged as several ERROR lines on
    stderr before the session falls back; make_session reports it as one line.
    """
    if not enabled:
        yield
        return
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings)


@contextmanager
def _serialised(model: onnx.ModelProto | str | os.PathLike) -> Iterator[bytes | str]:
    if not isinstance(model, onnx.ModelProto):
        yield str(model)
        return
    if proto_size(model) < SESSION_FILE_THRESHOLD:
        yield model.SerializeToString()
        return
    with saved_with_external_data(model) as path:
        yield str(path)


@contextmanager
def extra_outputs(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """Temporarily expose intermediate tensors as graph outputs (in place)."""
    existing = {o.name for o in model.graph.output}
    added = [n for n in dict.fromkeys(names) if n not in existing]
    for name in added:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        yield model
    finally:
        if added:
            del model.graph.output[len(model.graph.output) - len(added):]


def session_with_outputs(
    model: onnx.ModelProto, names: Sequence[str], provider: str = "cpu", **kwargs
) -> ort.InferenceSession:
    with extra_outputs(model, names) as exposed:
        return make_session(exposed, provider, **kwargs)
