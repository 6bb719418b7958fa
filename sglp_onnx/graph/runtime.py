"""ONNX Runtime sessions: explicit providers, extra outputs, large models.

Every session in the tool is made here so that provider choice, fallback
detection and the 2 GB protobuf limit are handled in one place.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from ..errors import UserError
from ..options import PROVIDERS
from ..files.model_files import data_folder, external_tensors, proto_size, saved_with_external_data

# Each --provider choice (options.PROVIDERS) and the ONNX Runtime providers it asks for, in order.
PROVIDER_CHAINS = dict(zip(PROVIDERS, (
    ["CPUExecutionProvider"],
    ["CUDAExecutionProvider", "CPUExecutionProvider"],
    ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
), strict=True))
# Above this size a session reads the model from a temporary file with its
# weights in a side file, which ONNX Runtime maps; from bytes, the serialised
# copy and ONNX Runtime's own copy would both stay in memory.
SESSION_FILE_THRESHOLD = 512 * 2**20
# A session that runs many times (the gated runner's) packs its constant
# weights ahead of time when the model's weights are at most this: the packed
# copy it keeps beside them stays small. Measured (1 thread): a 1 GiB MatMul
# model took 1.7 s more to open packed and held a second GiB; an int4
# (MatMulNBits) decoder ran 20% faster packed; ResNet-50 and a float32 decoder
# ran alike either way.
PREPACK_MAX_BYTES = 256 * 2**20


# Process-wide settings, set once by the CLI (--threads, -v) or the API's
# `threads` keyword; every session reads them.
_settings = {"threads": None, "verbose": False, "heap": None}


def set_threads(threads: int | None) -> None:
    """Threads for every ONNX Runtime session (intra-op; inter-op 1) and for
    torch, from now on; None: `default_threads()`. torch is set now if it is
    already imported, else when the paired model is loaded (`apply_torch_threads`)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"--threads must be a whole number >= 1, got {threads!r}")
    check_thread_count(threads)
    _settings["threads"] = threads
    if "torch" in sys.modules:
        apply_torch_threads()


# More threads than this many per core only add switching: a larger count is
# a mistake (--threads 100000 would start that many threads in each session).
THREADS_PER_CORE = 4


def check_thread_count(threads: int | None) -> None:
    """Refuse a thread count far beyond the machine's cores, before any session starts them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is not None and threads > THREADS_PER_CORE * cores:
        raise UserError(f"--threads {threads} is more than {THREADS_PER_CORE} per core on this machine "
                        f"({cores} cores): choose at most {THREADS_PER_CORE * cores}")


def session_threads() -> int | None:
    """The thread count sessions use: the one set, else `default_threads()`
    (None: ONNX Runtime's own choice)."""
    return _settings["threads"] if _settings["threads"] is not None else default_threads()


def default_threads() -> int | None:
    """1 on a machine with at most two cores (where a second thread costs more
    than it gives: see README, --threads); otherwise ONNX Runtime and torch choose."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores <= 2 else None


@contextmanager
def blas_threads() -> Iterator[None]:
    """numpy's BLAS limited to the thread count sessions use while the block
    runs (nothing when that is left to the libraries). On a 2-core machine
    shared with ONNX Runtime, a 2-thread OpenBLAS waits for its second thread
    at every call: a 2048 x 32 Gram matrix took 31 ms instead of 0.3 ms."""
    n = session_threads()
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def apply_torch_threads() -> None:
    """Give torch the thread count sessions use (nothing when it is left to the libraries)."""
    n = session_threads()
    if n is not None:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


# Below this many bytes of weights, what a leftover reference cycle could hold
# (small sessions and runs) is not worth a full collection: 0.2 s and more in a
# process that has imported torch and transformers.
COLLECT_WEIGHT_BYTES = 64 * 2**20


def release_memory(weight_bytes: int | None = None) -> None:
    """Give the memory of closed sessions back to the system before a large
    one opens: collect cycles (for a model of `weight_bytes` of weights at
    least COLLECT_WEIGHT_BYTES; None: always), then (glibc) return the
    allocator's free pages (`malloc_trim`), which freed ONNX Runtime buffers
    otherwise keep resident."""
    import gc

    if weight_bytes is None or weight_bytes >= COLLECT_WEIGHT_BYTES:
        gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def set_verbose(verbose: bool) -> None:
    """With -v, ONNX Runtime's own error log lines reach stderr too."""
    _settings["verbose"] = bool(verbose)


# Every exception type ONNX Runtime's C++ core raises (Fail, InvalidArgument,
# InvalidGraph, RuntimeException, ...), whatever the version defines.
ORT_ERRORS = tuple(v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception))
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def ort_reason(exc: BaseException) -> str:
    """The first line of an ONNX Runtime error, without its status prefix and C++ source location."""
    text = str(exc).strip()
    line = (text.splitlines() or [type(exc).__name__])[0]
    line = _ORT_PREFIX.sub("", line)
    return re.sub(r"^\S+:\d+ .*?\) ", "", line)[:300]


def feed_rows(feed: dict) -> int | None:
    """The samples a feed holds: its inputs' first dimension (None for a feed without arrays)."""
    return next((len(v) for v in feed.values() if getattr(v, "ndim", 0) >= 1), None)


@contextmanager
def input_model_errors(what: str = "the input model", one_at_a_time: Callable[[], bool] | None = None
                       ) -> Iterator[None]:
    """Turn an ONNX Runtime failure into a UserError: for a model the user
    gave, a graph ONNX Runtime refuses (an opset that does not fit the ops) or
    data it cannot run on (token ids outside the vocabulary) is the input's
    fault, not a bug. `one_at_a_time()`: whether the failed run succeeds on
    its first sample alone (then the message says to pass --batch-size 1)."""
    try:
        yield
    except ORT_ERRORS as exc:
        hint = ("; it runs one sample at a time: pass --batch-size 1"
                if one_at_a_time is not None and one_at_a_time() else "")
        raise UserError(f"{what} does not run in ONNX Runtime: {ort_reason(exc)}; check that the model "
                        f"loads and runs in ONNX Runtime on this data{hint}") from None


class InputSession:
    """A session on the user's model (or a view of it with extra outputs):
    `run` fails with a UserError (see `input_model_errors`)."""

    def __init__(self, session: ort.InferenceSession, what: str = "the input model") -> None:
        self._session = session
        self._what = what

    def run(self, output_names, input_feed, *args, **kwargs):
        with input_model_errors(self._what, lambda: self._runs_one(output_names, input_feed)):
            return self._session.run(output_names, input_feed, *args, **kwargs)

    def _runs_one(self, output_names, feed: dict) -> bool:
        """Whether a run of several samples that failed runs on its first sample
        alone (every input whose first dimension is the batch's, cut to one)."""
        rows = feed_rows(feed) or 1
        if rows <= 1:
            return False
        one = {k: v[:1] if getattr(v, "ndim", 0) >= 1 and len(v) == rows else v for k, v in feed.items()}
        try:
            self._session.run(output_names, one)
        except ORT_ERRORS:
            return False
        return True

    def __getattr__(self, name):
        return getattr(self._session, name)


def provider_chain(provider: str) -> list[str]:
    try:
        return list(PROVIDER_CHAINS[provider])
    except KeyError:
        raise UserError(f"--provider must be one of {', '.join(PROVIDER_CHAINS)}, got {provider!r}") from None


# Buffers of at least this size are mapped apart and unmapped when freed (glibc's
# M_MMAP_THRESHOLD, -3 in mallopt): see `return_freed_buffers`.
MMAP_THRESHOLD_BYTES = 8 * 2**20
_M_MMAP_THRESHOLD = -3
# Fixing the mmap threshold also fixes glibc's trim threshold at 128 KiB: the
# heap's top would be returned and faulted back in around every temporary
# (M_TRIM_THRESHOLD, -1 in mallopt). Up to this much free top is kept instead.
TRIM_THRESHOLD_BYTES = 32 * 2**20
_M_TRIM_THRESHOLD = -1


def return_freed_buffers() -> bool:
    """Make freed activation buffers go back to the system at once, for the
    rest of the process (glibc only; True when set here).

    Without an arena ONNX Runtime allocates every activation with malloc.
    glibc raises its mmap threshold to the largest buffer freed so far (up to
    32 MiB), after which such buffers come from the heap, which fragments and
    is rarely returned: measured on ResNet-50 at 224x224, a 768M activation
    budget peaked at 1.85 GiB of RSS with the adaptive threshold and 1.38 GiB
    with a fixed 1 MiB one. A mapped buffer costs a page fault per 4 KiB page
    each time it is allocated, which a run of many small pieces pays over and
    over: `compress --remove 4` on that ResNet-50 (default options, 1 thread)
    took 227 s and peaked at 1.25 GiB with 1 MiB, 173 s and 1.33 GiB with
    8 MiB (`MMAP_THRESHOLD_BYTES`), 161 s and 1.63 GiB with 32 MiB. The trim
    threshold is then raised to `TRIM_THRESHOLD_BYTES`. A threshold the user
    set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) is
    left as it is.
    """
    if _settings.get("heap") is not None:
        return _settings["heap"]
    _settings["heap"] = False
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        import ctypes

        try:
            libc = ctypes.CDLL(None)
            _settings["heap"] = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
            if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            pass
    return _settings["heap"]


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    provider: str = "cpu",
    *,
    threads: int | None = None,
    optimize: bool = True,
    prepack: bool = False,
    arena: bool = False,
) -> ort.InferenceSession:
    """A session on `provider` that refuses to fall back silently to the CPU.

    `threads` (intra-op; inter-op 1) defaults to the process-wide setting
    (`set_threads`); 0 leaves the choice to ONNX Runtime. `prepack` lets
    ONNX Runtime pack constant weights ahead of time, its own default: off
    here, since most of the tool's sessions run the calibration samples once,
    and packing costs a second copy of the packed weights for the session's
    life and seconds of opening on a large model, which one pass never wins
    back (`PREPACK_MAX_BYTES`; `bench` packs, as a deployment does). `arena`
    keeps ONNX Runtime's CPU memory arena, which holds on to its largest run's
    buffers for the session's life: off by default, since the measuring
    stages keep several sessions alive (one per damage candidate) and their
    arenas would add up far beyond the activation budget; `bench` turns it on
    to time what a deployment runs. ONNX Runtime's own
    log stays quiet (errors reach the caller as exceptions) unless
    `set_verbose(True)`.
    """
    chain = provider_chain(provider)
    if not arena:
        return_freed_buffers()
    options = ort.SessionOptions()
    # 3 = errors, 4 = fatal only: a failing node is logged (in colour) before it
    # is raised, and the CLI reports the exception as one line.
    options.log_severity_level = 3 if _settings["verbose"] else 4
    if threads is None:
        threads = session_threads()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    with _serialised(model, options) as source, _quiet_provider_loading(provider != "cpu"):
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
    # onnxruntime's Python session keeps the serialised model it was made
    # from, weights included, for its life (only `set_providers` reads it
    # again, which the tool never calls): one more copy of the weights per
    # live session, dropped here.
    if isinstance(getattr(session, "_model_bytes", None), bytes):
        session._model_bytes = None
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


# ONNX Runtime reads the external data of a model given as bytes from this folder.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


@contextmanager
def _serialised(model: onnx.ModelProto | str | os.PathLike, options: ort.SessionOptions) -> Iterator[bytes | str]:
    """What ONNX Runtime reads `model` from. A model that still references the
    input's external data (`load_model_files(defer=True)`) goes as bytes, and
    ONNX Runtime maps its weights from the input's own data files."""
    if not isinstance(model, onnx.ModelProto):
        yield str(model)
        return
    folder = data_folder()
    if folder is not None and external_tensors(model):
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(folder))
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
) -> InputSession:
    """A session on the input model (or a gated copy of it) with `names` exposed as
    extra outputs. It runs the user's model on the user's data, so an ONNX
    Runtime failure, making it or running it, is a UserError."""
    with extra_outputs(model, names) as exposed, input_model_errors():
        return InputSession(make_session(exposed, provider, **kwargs))


def needed_nodes(graph: onnx.GraphProto, names: Sequence[str], *, stop: str | None = None,
                 producer: dict[str, onnx.NodeProto] | None = None
                 ) -> tuple[dict[int, onnx.NodeProto], set[str]] | None:
    """The nodes (by id) that compute `names`, walking back no further than
    tensor `stop` (fed instead), and every tensor they or `names` name; None
    when one of them has a subgraph (its outer-scope reads are not followed).
    `producer`: tensor -> node of `graph`, when the caller has it already."""
    if producer is None:
        producer = {out: node for node in graph.node for out in node.output if out}
    needed: dict[int, onnx.NodeProto] = {}
    frontier = [t for t in dict.fromkeys(names) if t != stop]
    seen = set(frontier)
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or id(node) in needed:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        needed[id(node)] = node
        for t in node.input:
            if t and t != stop and t not in seen:
                seen.add(t)
                frontier.append(t)
    return needed, seen


def prefix_model(model: onnx.ModelProto, names: Sequence[str], *,
                 renames: dict[str, str] | None = None) -> onnx.ModelProto | None:
    """A model computing only `names` from the graph inputs: the nodes they
    need, nothing after (ONNX Runtime runs every node of a session whatever
    outputs are asked for). `renames`: tensor -> tensor its readers read
    instead (a removal's bypasses, `surgery.remove.substitutions`), so the
    prefix is that of the pruned model without rewriting the whole graph.
    None when a needed node has a subgraph (its outer-scope reads are not
    followed) or when nothing would be dropped."""
    graph = model.graph
    graph_nodes = list(graph.node)
    if renames:
        graph_nodes = [_renamed(node, renames) for node in graph_nodes]
    walked = needed_nodes(graph, names, producer={out: node for node in graph_nodes for out in node.output if out})
    if walked is None or len(walked[0]) == len(graph.node):
        return None
    needed, seen = walked
    nodes = [node for node in graph_nodes if id(node) in needed]  # the graph's order: topological
    prefix = onnx.helper.make_graph(
        nodes, f"{graph.name}_prefix", [i for i in graph.input if i.name in seen],
        [onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names)],
        [init for init in graph.initializer if init.name in seen])
    out = onnx.helper.make_model(prefix, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def _renamed(node: onnx.NodeProto, renames: dict[str, str]) -> onnx.NodeProto:
    if not any(t in renames for t in node.input):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for i, t in enumerate(copy.input):
        copy.input[i] = renames.get(t, t)
    return copy


def prefix_session(model: onnx.ModelProto, names: Sequence[str], provider: str = "cpu") -> InputSession:
    """`session_with_outputs` that runs only what `names` need (`prefix_model`)."""
    prefix = prefix_model(model, names)
    if prefix is None:
        return session_with_outputs(model, names, provider)
    with input_model_errors():
        return InputSession(make_session(prefix, provider))
