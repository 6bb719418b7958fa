"""Text into token sequences for a language model: the tokenizer beside the
model (a `tokenizers` tokenizer.json), the documents packed end to end into
sequences of a fixed length, and the role of each model input read from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ...errors import UserError
from ...files.calibration import InputSpec, format_shape, attention_cache_dims, is_cache_input

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
DEFAULT_SEQ_LEN = 128
# Ops that pass token ids on unchanged on their way to the embedding lookup.
_PASS_THROUGH = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten")
_LOOKUPS = ("Gather", "GatherBlockQuantized")
# Name parts of inputs that index a table but are not the token ids (positions, token types).
_NOT_TOKEN_WORDS = ("pos", "type", "segment")


@dataclass(frozen=True)
class TextRoles:
    """Which model input is what: the token ids, the attention mask, the
    position ids, inputs that are zeros (token type ids), and the inputs left
    to `check_calibration` (an empty KV-cache past)."""

    tokens: InputSpec
    vocab: int | None  # rows of the embedding table the ids index
    mask: InputSpec | None = None
    positions: InputSpec | None = None
    zeros: tuple[InputSpec, ...] = ()


def token_input(model: onnx.ModelProto, specs: list[InputSpec]) -> tuple[InputSpec, int | None] | None:
    """The token-id input (an integer rank-2 input that indexes a lookup
    table: `input_ids` when it does, else the one with the largest table, the
    word embedding) and that table's rows; None when the model takes no token
    ids. Without a lookup in the graph (an embedding behind an op this does
    not follow) `input_ids` is the guess."""
    tables = _lookup_rows(model, specs)
    integer = [s for s in specs if _is_integer_2d(s)]
    # A position or token-type table may outnumber a small vocabulary: their standard names are never the ids.
    ids = {n: rows for n, rows in tables.items() if not any(w in n.lower() for w in _NOT_TOKEN_WORDS)}
    if ids:
        name = "input_ids" if "input_ids" in ids else max(ids, key=ids.get)
        return next(s for s in specs if s.name == name), ids[name]
    guess = next((s for s in integer if s.name == "input_ids"), None)
    return (guess, tables.get("input_ids")) if guess else None


def text_roles(model: onnx.ModelProto, specs: list[InputSpec]) -> TextRoles:
    """The role of every input of a model that reads token ids (see `TextRoles`);
    an input that cannot be built from text is a UserError naming it."""
    found = token_input(model, specs)
    if found is None:
        raise UserError("the model has no token-id input (an integer [batch, sequence] input that feeds an "
                        "embedding lookup); give images for an image model, or write the .npz yourself")
    tokens, vocab = found
    tables = _lookup_rows(model, specs)
    mask = positions = None
    zeros = []
    for spec in specs:
        if spec is tokens or is_cache_input(spec, specs) or attention_cache_dims(model, spec) is not None:
            continue
        name = spec.name.lower()
        if _is_integer_2d(spec) or (spec.shape is not None and len(spec.shape) == 2 and spec.dtype is np.bool_):
            # Standard names first; else a lookup into a table of more than a
            # couple of rows is a position table, a smaller one token types,
            # and an input feeding no lookup is the mask.
            if "pos" in name or (tables.get(spec.name, 0) > 2 and "type" not in name):
                positions = spec
                continue
            if "type" in name or "segment" in name or spec.name in tables:
                zeros.append(spec)
                continue
            if "mask" in name or spec.name not in tables:
                if mask is None:
                    mask = spec
                    continue
        raise UserError(f"cannot build the model input {spec.name!r} ({np.dtype(spec.dtype).name} "
                        f"{format_shape(spec.shape)}) from text: calib fills token ids, an attention mask, "
                        "position ids, token type ids and an empty KV-cache past; write the .npz yourself")
    return TextRoles(tokens=tokens, vocab=vocab, mask=mask, positions=positions, zeros=tuple(zeros))


def find_tokenizer(model_path: Path, given: str | None) -> Path:
    """tokenizer.json: `given` (the file, or a folder holding it), else beside the
    model (an onnxruntime-genai or Hugging Face/optimum folder holds one)."""
    if given is not None:
        path = Path(given)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"tokenizer not found: {path} (give --tokenizer the tokenizer.json file or the "
                            "folder that holds it)")
        return path
    path = model_path.parent / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer not found: no tokenizer.json beside {model_path}; pass --tokenizer "
                        "PATH/tokenizer.json (a Hugging Face folder with only a slow tokenizer writes one with "
                        "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
    return path


def load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("reading text needs the 'tokenizers' package: pip install 'sglp-onnx[calib]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception for bad JSON or an unknown model
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path} is not a readable tokenizer.json ({line[:200]})") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"cannot read {path}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def token_stream(tokenizer, documents: list[Path]) -> np.ndarray:
    """Every document tokenised (with the tokenizer's own special tokens, such
    as a leading BOS) and concatenated, as one int64 stream."""
    ids: list[int] = []
    for path in documents:
        text = read_text(path)
        if text.strip():
            ids.extend(tokenizer.encode(text).ids)
    return np.asarray(ids, dtype=np.int64)


def pack(stream: np.ndarray, seq_len: int, *, samples: int, rng: np.random.Generator,
         source: str) -> np.ndarray:
    """Consecutive non-overlapping windows of `seq_len` tokens (the tail is
    dropped); at most `samples` of them, drawn at random and kept in order."""
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(f"{source} gives {len(stream)} tokens, fewer than one sequence of {seq_len} "
                        "(--seq-len); give more text or a smaller --seq-len")
    windows = stream[: n * seq_len].reshape(n, seq_len)
    if n > samples:
        windows = windows[np.sort(rng.choice(n, samples, replace=False))]
    return windows.copy()


def default_seq_len(tokens: InputSpec, asked: int | None) -> int:
    """--seq-len, or the model's fixed sequence length, or `DEFAULT_SEQ_LEN`."""
    fixed = tokens.shape[1] if tokens.shape and len(tokens.shape) == 2 and isinstance(tokens.shape[1], int) \
        and tokens.shape[1] > 0 else None
    if asked is not None and fixed is not None and asked != fixed:
        raise UserError(f"--seq-len {asked}, but the model's input {tokens.name!r} has a fixed length of {fixed}")
    return asked or fixed or DEFAULT_SEQ_LEN


def text_arrays(roles: TextRoles, windows: np.ndarray) -> dict[str, np.ndarray]:
    """The model inputs for whole sequences `windows` (the past, if any, is left to `check_calibration`)."""
    n, length = windows.shape
    arrays = {roles.tokens.name: windows.astype(roles.tokens.dtype)}
    if roles.mask is not None:
        arrays[roles.mask.name] = np.ones((n, length), dtype=roles.mask.dtype)
    if roles.positions is not None:
        arrays[roles.positions.name] = np.broadcast_to(np.arange(length, dtype=roles.positions.dtype),
                                                       (n, length)).copy()
    for spec in roles.zeros:
        arrays[spec.name] = np.zeros((n, length), dtype=spec.dtype)
    return arrays


def check_vocabulary(windows: np.ndarray, vocab: int | None, tokenizer_path: Path) -> None:
    if vocab is not None and windows.size and int(windows.max()) >= vocab:
        raise UserError(f"the tokenizer {tokenizer_path} gives token id {int(windows.max())}, but the model's "
                        f"embedding has {vocab} rows: it is not this model's tokenizer (pass --tokenizer)")


def _lookup_rows(model: onnx.ModelProto, specs: list[InputSpec]) -> dict[str, int]:
    """For each integer rank-2 input that reaches a lookup's indices (through
    casts and reshapes), the row count of the constant table it indexes."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = list(value.dims)
    rows: dict[str, int] = {}
    for spec in specs:
        if not _is_integer_2d(spec):
            continue
        frontier, seen = [spec.name], set()
        for _ in range(6):
            following = []
            for tensor in frontier:
                for node in consumers.get(tensor, []):
                    if node.op_type in _LOOKUPS and len(node.input) > 1 and node.input[1] == tensor:
                        table = constants.get(node.input[0])
                        if table:
                            rows[spec.name] = max(rows.get(spec.name, 0), int(table[0]))
                    elif node.op_type in _PASS_THROUGH and node.input[0] == tensor:
                        following.extend(o for o in node.output if o not in seen)
            seen.update(following)
            frontier = following
    return rows


def _is_integer_2d(spec: InputSpec) -> bool:
    return spec.shape is not None and len(spec.shape) == 2 and np.dtype(spec.dtype).kind in "iu"

