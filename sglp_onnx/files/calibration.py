"""Calibration data: an `.npz` with one array per model input plus optional
`labels`, checked against the model's inputs and served in batches.
"""

from __future__ import annotations

import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from ..errors import UserError
from ..graph.index import declared_dims

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}
MASK_NAMES = ("attention_mask",)
# One calibration sample in HOLDOUT_EVERY is held out from selection to
# measure the pruned model's fidelity.
HOLDOUT_EVERY = 5
POSITION_NAMES = ("position_ids",)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: type  # `object` for an ONNX type numpy cannot hold (bfloat16, float8, int4)
    shape: tuple  # ints for fixed dims, str/None for dynamic ones
    onnx_type: int = onnx.TensorProto.UNDEFINED

    @property
    def type_name(self) -> str:
        """The ONNX element type's own name: bfloat16, float8e4m3fn, float."""
        try:
            return onnx.helper.tensor_dtype_to_string(self.onnx_type).split(".")[-1].lower()
        except (KeyError, ValueError):
            return f"ONNX type {self.onnx_type}"


def unfeedable(spec: InputSpec) -> UserError:
    """The error for an input whose type calibration data cannot hold."""
    return UserError(f"the model's input {spec.name!r} is {spec.type_name}, which sglp-onnx cannot feed (numpy has "
                     "no such type); export the model with float32 or float16 inputs, or add a Cast after the input")


@dataclass
class CalibrationSet:
    """Model inputs (name -> array with samples on axis 0) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    # Set when the model's batch dimension is a fixed number (exports often
    # pin it to 1): every batch then has exactly that many samples.
    fixed_batch: int | None = None
    # Arrays of the file that no model input reads (side information), ignored.
    ignored: list[str] = field(default_factory=list)
    # Synthetic inputs only: the dynamic dimensions whose sizes were guessed.
    guessed: str = ""

    @contextmanager
    def explained(self, flag: str) -> Iterator[None]:
        """Within the block, a UserError (the model fails on these inputs) from
        synthetic inputs with guessed sizes says so, and how to give real ones."""
        try:
            yield
        except UserError as exc:
            if not self.guessed:
                raise
            raise UserError(f"{exc}. No data was given, so the inputs were made up with guessed sizes for their "
                            f"dynamic dimensions ({self.guessed}); give real inputs with {flag} DATA.npz "
                            "(arrays named after the model's inputs)") from None

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def token_mask_name(self) -> str | None:
        return next((n for n in MASK_NAMES if n in self.inputs), None)

    def token_mask(self, feed: dict[str, np.ndarray]) -> np.ndarray | None:
        """The attention mask among `feed` (a batch of this set), None without one."""
        name = self.token_mask_name
        return feed.get(name) if name else None

    @property
    def is_token_data(self) -> bool:
        """Sequence models: an integer input of rank 2 (token ids)."""
        return any(np.issubdtype(a.dtype, np.integer) and a.ndim == 2 for a in self.inputs.values())

    def batches(self, batch_size: int) -> "Batches":
        """The samples in batches of `batch_size` (a fixed-batch model's own size,
        its partial last batch left out); sized, so progress bars show a total."""
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        return Batches(self, batch_size)

    def subset(self, index: np.ndarray) -> "CalibrationSet":
        return CalibrationSet(inputs={k: v[index] for k, v in self.inputs.items()},
                              labels=None if self.labels is None else self.labels[index],
                              source=self.source, fixed_batch=self.fixed_batch, ignored=self.ignored,
                              guessed=self.guessed)

    def split_holdout(self, every: int = HOLDOUT_EVERY) -> tuple["CalibrationSet", "CalibrationSet | None"]:
        """(selection samples, held-out samples): every `every`-th sample is held
        out, so both parts span the whole file (sorted or grouped data too).
        Too few samples to hold any out (fewer than `every`, or fewer than a
        fixed batch): (self, None)."""
        n = self.n_samples
        held = np.arange(every - 1, n, every)
        if len(held) == 0 or (self.fixed_batch and len(held) < self.fixed_batch):
            return self, None
        kept = np.setdiff1d(np.arange(n), held)
        return self.subset(kept), self.subset(held)

    def first(self, n: int) -> dict[str, np.ndarray]:
        """The first `n` samples (exactly the fixed batch for a fixed-batch model)."""
        n = self.fixed_batch or n
        return {k: v[:n] for k, v in self.inputs.items()}



def token_keep(mask: np.ndarray | None, leading: Sequence[int]) -> np.ndarray | None:
    """Which rows of a token model's tensor are unpadded tokens, from the
    batch's (B, T') attention mask: for leading dims (B, T), the mask's last
    T positions (a mask longer than T covers a KV cache's past too); for one
    leading dim of B*T rows, T > 1 (a hidden state flattened to (B*T, C),
    as OPT's MLP reads it), the same flattened; None where neither applies
    (no mask, one row per sequence)."""
    if mask is None or mask.ndim != 2:
        return None
    batch, total = mask.shape
    if len(leading) == 2 and leading[0] == batch and leading[1] <= total:
        return mask[:, total - leading[1]:].astype(bool)
    if len(leading) == 1 and batch and leading[0] % batch == 0 and 1 < leading[0] // batch <= total:
        return mask[:, total - leading[0] // batch:].astype(bool).reshape(-1)
    return None


class Batches:
    """One pass over a calibration set in batches: `len` is the number of batches."""

    def __init__(self, calib: CalibrationSet, batch_size: int) -> None:
        n = calib.n_samples
        if calib.fixed_batch:
            # A partial last batch cannot be fed to a fixed-batch model.
            batch_size, n = calib.fixed_batch, n - n % calib.fixed_batch
        self.calib, self.batch_size, self.n = calib, batch_size, n

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        labels = self.calib.labels
        for start in range(0, self.n, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            yield {k: v[start:stop] for k, v in self.calib.inputs.items()}, \
                None if labels is None else labels[start:stop]


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        elem = vi.type.tensor_type.elem_type
        specs.append(InputSpec(vi.name, _ONNX_TO_NUMPY.get(elem, object), declared_dims(vi), elem))
    return specs


def sidecar_path(model_path: str | Path) -> Path:
    """`MODEL.calib.npz` beside `MODEL.onnx`."""
    from .model_files import beside

    return beside(model_path, ".calib.npz")


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    # np.load also reads .npy and pickles: anything but a zip archive is refused
    # here, with advice on how to write one (never on how to unpickle it).
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a readable .npz file (not a zip archive); "
                        "write one with numpy.savez(path, input=..., labels=...)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
            raise UserError(f"{path} is not a readable .npz file: it holds object (pickled) arrays, which are "
                            "never loaded; store plain numeric arrays") from None
        raise UserError(f"{path} is not a readable .npz file ({exc})") from None
    except Exception as exc:  # zipfile, zlib and numpy's header parser raise unrelated types
        raise UserError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc}); "
                        "write it again with numpy.savez") from None
    not_arrays = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        raise UserError(f"{path} is not a readable .npz file: members {not_arrays[:3]} are not .npy arrays; "
                        "write it with numpy.savez")
    return arrays


def load_calibration(path: str | Path, model: onnx.ModelProto, *, max_samples: int | None = None) -> CalibrationSet:
    """Load and check an `.npz` against the model's inputs."""
    arrays = load_npz(path)
    return check_calibration(arrays, model, source=str(path), max_samples=max_samples)


def check_calibration(
    arrays: dict[str, np.ndarray], model: onnx.ModelProto, *, source: str = "calibration data",
    max_samples: int | None = None, also_known: Sequence[str] = (),
) -> CalibrationSet:
    """The arrays of a calibration (or eval, or training) file checked against
    `model`'s inputs, the one place that does: names (each array is a model
    input, `labels`, a KV-cache entry or one of `also_known`: another model's
    input where one file serves several), dtype kind and range, rank, fixed
    dims, finite values, labels' shape and range, sample counts."""
    specs = model_inputs(model)
    given = arrays
    arrays = {**arrays, **_implied_inputs(arrays, specs, model)}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise UserError(
            f"{source} lacks the model input(s) {', '.join(missing)}; "
            f"it has {', '.join(sorted(arrays)) or 'no arrays'} (arrays must be named after the model's inputs)"
        )
    ignored = _check_names(given, specs, source, also_known)
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        array = arrays[spec.name]
        inputs[spec.name] = _check_array(array, spec, source)
        _check_cache_dims(inputs[spec.name], spec, model, source)
    counts = {len(a) for a in inputs.values()}
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim < 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{source}: 'labels' must be an integer array with one entry per sample")
        _check_label_shape(labels, inputs, source)
        counts.add(len(labels))
    if len(counts) != 1:
        raise UserError(f"{source}: arrays disagree on the number of samples ({sorted(counts)})")
    if labels is not None:
        classes = output_classes(model, labels.ndim)
        if classes is not None:
            check_labels(labels, classes, source=source)
    n = counts.pop()
    if n == 0:
        raise UserError(f"{source} holds no samples")
    fixed = fixed_batch(specs)
    if fixed and n < fixed:
        raise UserError(f"{source} holds {n} samples but the model's batch dimension is fixed to {fixed}")
    if max_samples is not None and n > max_samples:
        inputs = {k: v[:max_samples] for k, v in inputs.items()}
        labels = labels[:max_samples] if labels is not None else None
    return CalibrationSet(inputs=inputs, labels=labels, source=source, fixed_batch=fixed, ignored=ignored)


LABELS = "labels"


def _check_names(arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str,
                 also_known: Sequence[str]) -> list[str]:
    """The arrays no input reads, sorted. One whose name is close to an
    input's or to `labels` is a mistake (`label` for `labels`, `input_id`
    for `input_ids`): silently ignored it would change what is measured, so
    it is refused. Others (side information such as a radio file's `snr`)
    are returned, for the caller to say they were ignored. KV-cache entries
    are known (a pruned model takes fewer than the file holds)."""
    from ..surgery.kv_cache import CACHE_NAME

    inputs = [s.name for s in specs]
    known = set(inputs) | {LABELS} | set(also_known)
    unknown = sorted(k for k in arrays if k not in known and not CACHE_NAME.match(k))
    import difflib

    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        if close:
            raise UserError(f"{source} has an array {name!r} that the model does not read (did you mean "
                            f"{close[0]!r}?); arrays are named after the model's inputs ({', '.join(inputs)}) "
                            f"plus optional '{LABELS}': rename it")
    return unknown


def _check_label_shape(labels: np.ndarray, inputs: dict[str, np.ndarray], source: str) -> None:
    """One class index per sample, shape (N,); for token models also one per
    token, the shape of the token ids. (N, 1) is refused, not squeezed: a
    column compared with N predictions would broadcast into N x N matches."""
    if labels.ndim == 1:
        return
    tokens = [a.shape[:2] for a in inputs.values() if a.ndim == 2 and np.issubdtype(a.dtype, np.integer)]
    if labels.ndim == 2 and labels.shape in tokens:
        return
    expected = f"({labels.shape[0]},)" + (f" or, one per token, {tokens[0]}" if tokens else "")
    raise UserError(f"{source}: 'labels' has shape {labels.shape}; expected {expected}: one class index per "
                    "sample (numpy: labels.reshape(-1))")


def output_classes(model: onnx.ModelProto, label_rank: int = 1) -> int | None:
    """The number of classes `labels` of rank `label_rank` index: the fixed last
    dimension of the scored output (the first, or the first float
    distribution after integer class ids: `fidelity.output_kind`) when that
    output is (batch, classes) or (batch, tokens, classes) logits for them;
    None when it cannot be told."""
    if not model.graph.output:
        return None
    from ..evidence.fidelity import output_kind

    scored = output_kind(model).output
    dims = declared_dims(next(o for o in model.graph.output if o.name == scored))
    if dims is None or len(dims) not in (2, 3) or len(dims) != label_rank + 1:
        return None
    last = dims[-1]
    return last if isinstance(last, int) and last > 0 else None


def check_labels(labels: np.ndarray, classes: int, *, source: str) -> None:
    """Labels are class indices of the model's output: integers in [0, classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise UserError(f"{source}: 'labels' holds {int(bad)}, but the model has {classes} classes; labels must be "
                        f"integers in [0, {classes})")


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size a model with a numeric (not symbolic) batch dimension accepts."""
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return spec.shape[0]
    return None


def is_cache_input(spec: InputSpec, specs: list[InputSpec]) -> bool:
    """A KV-cache-like input of a sequence model: float, rank >= 3, every dim
    after the batch fixed except one dynamic (past) length, in a model that
    also takes rank-2 integer token ids whose dims do not include that length
    (an embeddings input shares the token ids' sequence length)."""
    if spec.shape is None or len(spec.shape) < 3 or np.dtype(spec.dtype).kind != "f":
        return False
    dynamic = [d for d in spec.shape[1:] if not (isinstance(d, int) and d > 0)]
    tokens = [s for s in specs if s.shape is not None and len(s.shape) == 2 and np.dtype(s.dtype).kind in "iu"]
    if len(dynamic) != 1 or not tokens:
        return False
    return not (isinstance(dynamic[0], str) and any(dynamic[0] == s.shape[1] for s in tokens))


def _implied_inputs(arrays: dict[str, np.ndarray], specs: list[InputSpec],
                    model: onnx.ModelProto | None = None) -> dict[str, np.ndarray]:
    """Inputs a calibration file for a model with a KV cache may leave out.

    A missing past KV-cache input is empty (past length 0: the calibration
    sequences are whole prompts, as in a prefill), also when its declared
    shape leaves more than the past length symbolic (see
    `attention_cache_dims`); a missing `position_ids`
    counts 0, 1, ... along each sequence, which is what transformers uses when
    it is given none. The sample count comes from the arrays present.
    """
    present = [a for a in arrays.values() if isinstance(a, np.ndarray) and a.ndim >= 1]
    if not present:
        return {}
    n = len(present[0])
    implied: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name in arrays:
            continue
        if is_cache_input(spec, specs):
            shape = [n] + [d if isinstance(d, int) and d > 0 else 0 for d in spec.shape[1:]]
            implied[spec.name] = np.zeros(shape, dtype=spec.dtype)
        elif model is not None and (dims := attention_cache_dims(model, spec)) is not None:
            implied[spec.name] = np.zeros([n] + dims, dtype=spec.dtype)
        elif spec.name in POSITION_NAMES and np.dtype(spec.dtype).kind in "iu":
            # Token ids span the new tokens, an attention mask the past ones too.
            lengths = [a.shape[1] for a in present if a.ndim == 2 and np.issubdtype(a.dtype, np.integer)]
            if lengths:
                new, total = min(lengths), max(lengths)
                positions = np.arange(total - new, total, dtype=spec.dtype)
                implied[spec.name] = np.broadcast_to(positions, (n, new)).copy()
    return implied


def attention_cache_dims(model: onnx.ModelProto, spec: InputSpec) -> list[int] | None:
    """Dims after the batch of an empty past for a 4-D float input that ONNX
    Runtime's GroupQueryAttention or MultiHeadAttention reads as its past key
    or value: (kv_heads, 0, head_size), or None for any other input.

    The onnxruntime-genai builder declares its cache
    [batch_size, kv_heads, past_sequence_length, kv_cache_dim], so the head
    size is not in the declaration; it is the width of the attention's
    query projection over its heads (packed Q, K, V in GroupQueryAttention's
    query when it has no separate key).
    """
    if spec.shape is None or len(spec.shape) != 4 or np.dtype(spec.dtype).kind != "f":
        return None
    for node in model.graph.node:
        if node.domain != "com.microsoft" or spec.name not in node.input:
            continue
        position = list(node.input).index(spec.name)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "GroupQueryAttention" and position in (3, 4):
            heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads")
            packed = len(node.input) < 2 or not node.input[1]
            parts = heads + 2 * kv_heads if heads and kv_heads and packed else heads
        elif node.op_type == "MultiHeadAttention" and position in (6, 7):
            heads = kv_heads = parts = attrs.get("num_heads")
        else:
            return None
        width = _projection_width(model, node.input[0])
        if not parts or not width or width % parts:
            return None
        dims = [int(kv_heads), 0, width // parts]
        declared = spec.shape[1:]
        if any(isinstance(d, int) and d > 0 and d != want for d, want in zip(declared, dims) if want):
            return None
        return dims
    return None


def _check_cache_dims(array: np.ndarray, spec: InputSpec, model: onnx.ModelProto, source: str) -> None:
    """A past key or value of an attention op must have its KV heads and head
    size, which its declaration may leave symbolic (see `attention_cache_dims`)."""
    if array.ndim != 4 or (dims := attention_cache_dims(model, spec)) is None:
        return
    heads, _, size = dims
    if array.shape[1] != heads or array.shape[3] != size:
        raise UserError(f"{source}: input {spec.name!r} has shape {array.shape}; the attention that reads it expects "
                        f"[samples, {heads}, past length, {size}] ({heads} KV heads of size {size}); leave the past "
                        "out for whole sequences")


def _projection_width(model: onnx.ModelProto, tensor: str) -> int | None:
    """The last dim of `tensor`: declared, or the output width of the linear op
    with constant weights that computes it (through bias adds and casts)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name: i for i in model.graph.initializer}
    declared = {vi.name: declared_dims(vi) for vi in model.graph.value_info}
    for _ in range(8):
        dims = declared.get(tensor)
        if dims and isinstance(dims[-1], int) and dims[-1] > 0:
            return dims[-1]
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type == "MatMulNBits":
            return next((a.i for a in node.attribute if a.name == "N"), None)
        if node.op_type == "MatMul" and node.input[1] in initializers:
            return int(initializers[node.input[1]].dims[-1])
        if node.op_type in ("Add", "Cast", "Identity"):
            computed = [t for t in node.input if t and t not in initializers]
            if len(computed) != 1:
                return None
            tensor = computed[0]
            continue
        return None
    return None


def _check_array(array: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    where = f"{source}: input {spec.name!r}"
    if spec.dtype is object:
        raise unfeedable(spec)
    if array.dtype == object or array.dtype.kind in "USV":
        raise UserError(f"{where} has dtype {array.dtype}; expected {np.dtype(spec.dtype).name}")
    expected = np.dtype(spec.dtype)
    if array.dtype != expected:
        same_kind = _kind(array.dtype) == _kind(expected)
        if not same_kind:
            raise UserError(f"{where} has dtype {array.dtype}; the model expects {expected.name}")
        _check_range(array, expected, where)
        array = array.astype(expected)
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise UserError(
                f"{where} has rank {array.ndim} (shape {array.shape}); the model expects rank "
                f"{len(spec.shape)} ({format_shape(spec.shape)}) with samples on axis 0"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if axis > 0 and isinstance(want, int) and want > 0 and want != got:
                raise UserError(
                    f"{where} has shape {array.shape}; the model expects {format_shape(spec.shape)}"
                )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise UserError(f"{where} contains NaN or Inf values; clean the calibration data")
    return array


def _check_range(array: np.ndarray, expected: np.dtype, where: str) -> None:
    """Values the cast to the input's dtype would change: integers outside its
    range wrap (300 becomes 44 as uint8), floats beyond it become Inf."""
    if not array.size:
        return
    if expected.kind in "iu":
        info = np.iinfo(expected)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise UserError(f"{where} holds {bad}, outside the range of the model's {expected.name} input "
                            f"[{info.min}, {info.max}]; the values would wrap around")
    elif expected.kind == "f" and array.dtype.kind == "f":
        with np.errstate(all="ignore"):
            finite = array[np.isfinite(array)]
            peak = float(np.abs(finite).max()) if finite.size else 0.0
        if peak > float(np.finfo(expected).max):
            raise UserError(f"{where} holds {peak:.6g}, beyond the largest {expected.name} "
                            f"({float(np.finfo(expected).max):.6g}) that the model's input can hold; scale the data")


def _kind(dtype: np.dtype) -> str:
    # Casting within a kind (float64 -> float32, int32 -> int64) is harmless;
    # across kinds (floats for token ids) it hides a wrong file.
    return "i" if dtype.kind in "iu" else dtype.kind


def format_shape(shape: tuple | None) -> str:
    """Declared dims as `[batch, 3, 224, 224]`, `?` where a dim is unnamed."""
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape or ()) + "]"


def synthetic_calibration(model: onnx.ModelProto, *, seed: int = 0, n_samples: int = 4,
                          dynamic_size: int = 16) -> CalibrationSet:
    """Stand-in inputs for criteria that need no data (`last`, `random`): they
    serve only to bind shapes for FLOPs and to validate the output."""
    rng = np.random.default_rng(seed)
    inputs = {}
    guessed = []
    specs = model_inputs(model)
    fixed = fixed_batch(specs)
    n_samples = fixed * max(1, n_samples // fixed) if fixed else n_samples
    for spec in specs:
        if is_cache_input(spec, specs) or spec.name in POSITION_NAMES or attention_cache_dims(model, spec):
            continue  # implied by the others, below
        dims = spec.shape or (None,)
        shape = [n_samples] + [d if isinstance(d, int) and d > 0 else dynamic_size for d in dims[1:]]
        if any(not (isinstance(d, int) and d > 0) for d in dims[1:]):
            guessed.append(f"{spec.name} {format_shape(tuple(dims))} as {list(shape)}")
        if spec.dtype is object:
            raise unfeedable(spec)
        dtype = np.dtype(spec.dtype)
        if spec.name in MASK_NAMES or dtype == np.bool_:
            inputs[spec.name] = np.ones(shape, dtype=dtype)
        elif dtype.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            inputs[spec.name] = np.zeros(shape, dtype=dtype)
    inputs.update(_implied_inputs(inputs, specs, model))
    return CalibrationSet(inputs=inputs, source="synthetic (no calibration data given)", fixed_batch=fixed,
                          guessed="; ".join(guessed))


def choose_calibration(model_path: Path, model: onnx.ModelProto, calib: str | None, *, needed: bool,
                       max_samples: int | None, seed: int) -> CalibrationSet:
    """The run's calibration set: `calib` (an .npz, or a folder of images or
    a text file made into a set as `sglp-onnx calib` makes one), else the
    sidecar MODEL.calib.npz beside the model, else, when not `needed`,
    synthetic inputs."""
    if calib is not None:
        from ..tools.calib import SOURCE_SUFFIXES, calibration_data

        if Path(calib).is_dir() or (Path(calib).is_file() and Path(calib).suffix.lower() in SOURCE_SUFFIXES):
            made = calibration_data(model_path, [calib], model=model, seed=seed)
            return check_calibration(made.arrays, model, source=f"the calibration set made from {calib}",
                                     max_samples=max_samples)
        return load_calibration(calib, model, max_samples=max_samples)
    sidecar = sidecar_path(model_path)
    if sidecar.is_file():
        return load_calibration(sidecar, model, max_samples=max_samples)
    if needed:
        raise UserError(f"no calibration data: pass --calib CALIB.npz or put {sidecar.name} beside the model")
    return synthetic_calibration(model, seed=seed)
