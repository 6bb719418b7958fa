"""Fidelity: one label-free number for how close a removal set keeps the model.

The score compares the pruned network's scored output (the first graph
output; the first float distribution when the first output is integer
class ids; or the output `--fidelity-output` names, see `output_kind`) with
the original's on the same inputs, in a way chosen from what that output
is (read from the graph, never from names):

- ``kl``: the output is logits (a head: Gemm/MatMul with constant weights,
  possibly followed by a bias, a scale or reshapes) or probabilities
  (Softmax/LogSoftmax). Score: mean KL(original || pruned) of the output
  distributions over the last axis, in nats, per sample for a (B, C)
  output and per unpadded token for a (B, T, V) sequence output. Top-1
  agreement (argmax equal) is reported beside it.
- ``cosine``: the output is a hidden state or an embedding (it comes out of
  a normalisation, a Tanh pooler or an L2 normalisation). Score: mean
  cosine distance 1 - cos(original row, pruned row), rows as above.
- ``relative``: anything else (regression outputs, detection tensors).
  Score: ||pruned - original|| / ||original|| over the whole output.

Every score is 0 for the original itself and grows with the damage.
Non-finite values in the pruned output count as the largest finite value
of their sign (NaN as 0), so a removal that overflows is scored, not lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.index import GraphIndex, is_weighted_head, walk_back
from ..graph.ops import FEATURE_NORM_OPS, LINEAR_OPS, is_onnx
from .metrics import log_softmax
from .activations import as_samples

DISTRIBUTION_OPS = {"Softmax": "probabilities", "LogSoftmax": "log-probabilities"}
# Ops a head's result may pass through on its way to the graph output.
PASS_THROUGH = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Add", "Mul", "Div", "Sub",
                "DequantizeLinear", "QuantizeLinear"}
KINDS = ("kl", "cosine", "relative")
UNITS = {"kl": "nats", "cosine": "cosine distance", "relative": "relative error"}
# The terminal warns above these scores (or below 90% top-1 agreement).
AGREEMENT_WARNING = 0.90
SCORE_WARNING = {"kl": 0.25, "cosine": 0.10, "relative": 0.30}


@dataclass(frozen=True)
class OutputKind:
    """What the scored output is, and how that was read from the graph."""

    output: str
    kind: str  # one of KINDS
    form: str  # logits | probabilities | log-probabilities | hidden state | tensor
    rule: str


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


def _elem_type(value: onnx.ValueInfoProto) -> int:
    """The element type of a tensor output; UNDEFINED for sequences and maps."""
    return value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else onnx.TensorProto.UNDEFINED


def output_kind(model: onnx.ModelProto, name: str | None = None) -> OutputKind:
    """The scoring rule for the scored output, from its producers.

    The scored output is `name` (`--fidelity-output`) when given; else the
    first graph output, unless that is not a float tensor (ArgMax class ids,
    scikit-learn-to-ONNX's `label` before its probabilities): then the first
    float output that is a distribution or logits, else one that is a hidden
    state, else the first float output. Relative L2 error of class ids
    would measure nothing useful."""
    outputs = list(model.graph.output)
    if name is not None:
        if name not in {o.name for o in outputs}:
            from ..errors import UserError

            raise UserError(f"--fidelity-output {name!r} is not an output of the model; its outputs are "
                            f"{', '.join(repr(o.name) for o in outputs)}")
        return _kind_of(model, name, "chosen with --fidelity-output; ")
    first = outputs[0]
    # Only a declared non-float type moves the score (an untyped output stays first).
    declared = first.type.HasField("tensor_type") and _elem_type(first) != onnx.TensorProto.UNDEFINED \
        or first.type.HasField("sequence_type") or first.type.HasField("map_type")
    floats = [o.name for o in outputs if _elem_type(o) in _FLOAT_TYPES]
    if _elem_type(first) in _FLOAT_TYPES or not declared or not floats:
        return _kind_of(model, first.name, "")
    type_name = onnx.helper.tensor_dtype_to_string(_elem_type(first)).split(".")[-1].lower() \
        if _elem_type(first) else "not a tensor"
    why = f"the first output {first.name!r} is {type_name}, not scored; "
    kinds = [_kind_of(model, o, why) for o in floats]
    for wanted in ("kl", "cosine"):
        for kind in kinds:
            if kind.kind == wanted:
                return kind
    return kinds[0]


def _kind_of(model: onnx.ModelProto, first: str, why: str) -> OutputKind:
    """The scoring rule for the graph output `first`; `why` prefixes the rule
    when it is not simply the first output."""
    found = _read_kind(model, first)
    return OutputKind(found.output, found.kind, found.form, why + found.rule)


def _read_kind(model: onnx.ModelProto, first: str) -> OutputKind:
    index = GraphIndex(model)
    scales = _dynamic_scales(index)

    def visit(node, computed):
        computed = [t for t in computed if t not in scales]
        op = node.op_type
        what = f"{node.name or op} ({op})"
        if op in DISTRIBUTION_OPS:
            return OutputKind(first, "kl", DISTRIBUTION_OPS[op], f"{first!r} comes out of {what}")
        if is_weighted_head(node, computed, LINEAR_OPS):
            return OutputKind(first, "kl", "logits", f"{first!r} comes out of the head {what}")
        if op == "Tanh" and _softcap(index, node):
            return computed
        if op in FEATURE_NORM_OPS:
            return OutputKind(first, "cosine", "hidden state", f"{first!r} comes out of {what}")
        if op in PASS_THROUGH and len(computed) == 1:
            return computed
        if _ends_spelled_norm(index, node):
            return OutputKind(first, "cosine", "hidden state", f"{first!r} comes out of a normalisation spelled "
                                                               f"out in element-wise ops ({what} among them)")
        return []

    found = walk_back(index, first, visit)
    return found or OutputKind(first, "relative", "tensor",
                               f"{first!r}: no head, distribution or normalisation before it")


def _dynamic_scales(index: GraphIndex) -> set[str]:
    """The scales and zero points a dynamically quantized model computes at run
    time (DynamicQuantizeLinear's second and third outputs), and what is
    computed from them and constants alone (the x_scale * w_scale that
    rescales a MatMulInteger): a head reads them beside its one activation."""
    scales: set[str] = set()
    for node in index.nodes:
        if is_onnx(node, "DynamicQuantizeLinear"):
            scales.update(o for o in node.output[1:3] if o)
        elif is_onnx(node, "Mul", "Div", "Cast", "Reshape", "Unsqueeze") and any(i in scales for i in node.input) \
                and all(not i or i in scales or index.is_constant(i) for i in node.input):
            scales.update(o for o in node.output if o)
    return scales


def _ends_spelled_norm(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """True when `node` belongs to a LayerNorm or RMSNorm spelled out in
    element-wise ops (a legacy export's T5 or Llama final norm): some tensor
    read by the element-wise ops before it starts a norm (`spelled_norm`)
    whose nodes include it."""
    from ..units.patterns.decomposed_norm import MAX_NODES, NORM_OPS, spelled_norm

    if not node.output or node.op_type not in NORM_OPS:
        return False
    here = index.producer.get(node.output[0])
    seen: set[str] = set()
    frontier = [t for t in node.input if t and not index.is_constant(t)]
    while frontier and len(seen) <= 2 * MAX_NODES:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        found = spelled_norm(index, t)
        if found is not None and here in found[1]:
            return True
        p = index.producer.get(t)
        if p is not None and is_onnx(index.nodes[p], *NORM_OPS):
            frontier += [i for i in index.nodes[p].input if i and not index.is_constant(i)]
    return False


def _softcap(index: GraphIndex, tanh: onnx.NodeProto) -> bool:
    """A logit soft-cap `c * tanh(x / c)` (Gemma 2's final logits): the Tanh
    reads a Div (or Mul) by a constant and only a Mul by a constant reads it.
    A pooler's Tanh (BERT) is scaled by nothing and stays a feature output."""
    def scaled(node, ops) -> bool:
        return node is not None and node.op_type in ops and len(node.input) == 2 \
            and sum(index.is_constant(t) for t in node.input) == 1
    source = index.producer.get(tanh.input[0])
    readers = index.consumers.get(tanh.output[0], [])
    return scaled(None if source is None else index.nodes[source], ("Div", "Mul")) and len(readers) == 1 \
        and scaled(index.nodes[readers[0]], ("Mul",))


def _finite(x: np.ndarray, keep: type | None = None) -> np.ndarray:
    """`x` in float64 with non-finite values replaced; `keep`: a dtype that a
    finite `x` already in it keeps (no copy)."""
    if keep is not None and x.dtype == keep and np.isfinite(x).all():
        return x
    x = np.asarray(x, dtype=np.float64)
    if np.isfinite(x).all():
        return x
    big = np.finfo(np.float64).max / 4
    return np.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log sum_v exp(x_v) per row, in float64; the exp of values <= 0 is summed
    in x's own precision (float32 logits: half the time of float64)."""
    top = x.max(-1, keepdims=True)
    return top[..., 0].astype(np.float64) + np.log(np.exp(x - top).sum(-1), dtype=np.float64)


def _log_distribution(x: np.ndarray, form: str) -> np.ndarray:
    if form == "probabilities":
        return np.log(np.clip(x, 1e-30, None))
    return log_softmax(x)


# Values a meter converts to float64 at a time: 512 KiB per temporary, below
# the mmap threshold the measuring sessions set (graph.runtime.
# MMAP_THRESHOLD_BYTES), so the temporaries reuse the heap instead of being
# mapped afresh each time (16 MiB blocks made a 32k-vocabulary search ~40% slower).
BLOCK_VALUES = 2**16


class FidelityMeter:
    """Accumulates one removal set's score against the original, batch by batch."""

    def __init__(self, kind: OutputKind, *, token_level: bool) -> None:
        self.kind = kind
        self.token_level = token_level
        self.effective = kind.kind
        self.rows = 0
        self.total = 0.0
        self.agree = 0
        self.err2 = 0.0
        self.ref2 = 0.0

    def _rows(self, value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return as_samples(value, token_level=self.token_level, token_mask=mask)

    def update(self, reference: np.ndarray, pruned: np.ndarray, mask: np.ndarray | None = None,
               prepared: dict | None = None) -> None:
        """Add one batch. Rows go through in blocks of at most BLOCK_VALUES
        values, so the float64 temporaries stay small whatever the batch and
        the vocabulary. `prepared`: a dict the caller keeps per batch and
        passes to every meter scored against the same `reference`: the
        reference's log-distribution is computed once there, not per meter."""
        reference, pruned = np.asarray(reference), np.asarray(pruned)
        if self.effective == "kl" and not (reference.ndim == 2 or (reference.ndim == 3 and self.token_level)) \
                or self.effective == "kl" and reference.shape[-1] < 2:
            self.effective = "relative"  # not one distribution per row: compare as a tensor
        if self.effective == "relative":
            flat_ref, flat_got = reference.reshape(-1), pruned.reshape(-1)
            for a in range(0, flat_ref.size, BLOCK_VALUES):
                ref, got = _finite(flat_ref[a:a + BLOCK_VALUES]), _finite(flat_got[a:a + BLOCK_VALUES])
                self.err2 += float(((got - ref) ** 2).sum())
                self.ref2 += float((ref ** 2).sum())
            self.rows += reference.shape[0] if reference.ndim else 1
            return
        ref_rows, got_rows = self._rows(reference, mask), self._rows(pruned, mask)
        self.rows += len(ref_rows)
        step = max(1, BLOCK_VALUES // max(ref_rows.shape[-1], 1))
        for block, a in enumerate(range(0, len(ref_rows), step)):
            got = got_rows[a:a + step]
            # The reference in float64: for KL only where this batch's block is not prepared yet.
            ready = self.effective == "kl" and prepared is not None and block in prepared
            ref = None if ready else _finite(ref_rows[a:a + step])
            if self.effective == "kl":
                got = _finite(got, keep=np.float32)
                # KL(p || q) = sum p log p - sum p log q per row; the first sum,
                # p and the argmax come from the reference alone (once per batch).
                # For logits x (or log-probabilities) log q = x - logsumexp(x)
                # and the p_v sum to 1: KL = p.x_ref - lse(x_ref) - p.x + lse(x),
                # each term computed alike for both sides (identical outputs
                # give exactly 0).
                form = self.kind.form
                if prepared is None or block not in prepared:
                    logp = _log_distribution(ref, form)
                    probs = np.exp(logp)
                    own = _finite(ref_rows[a:a + step], keep=np.float32)
                    entry = (probs, (probs * logp).sum(-1) if form == "probabilities"
                             else (probs * own).sum(-1) - _logsumexp(own), ref.argmax(-1))
                    if prepared is not None:
                        prepared[block] = entry
                else:
                    entry = prepared[block]
                probs, own_term, ref_top = entry
                if form == "probabilities":
                    got = _finite(got)
                    cross = (probs * np.log(np.clip(got, 1e-30, None))).sum(-1)
                else:
                    cross = (probs * got).sum(-1) - _logsumexp(got)
                self.total += float((own_term - cross).sum())
                self.agree += int((ref_top == got.argmax(-1)).sum())
            else:
                got = _finite(got)
                dot = (ref * got).sum(-1)
                norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1)
                same = np.isclose(norms, 0.0) & np.isclose(np.abs(ref).sum(-1) + np.abs(got).sum(-1), 0.0)
                cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
                self.total += float(np.where(same, 0.0, 1.0 - cos).sum())

    @property
    def score(self) -> float:
        if self.effective == "relative":
            return float(np.sqrt(self.err2 / self.ref2)) if self.ref2 > 0 else float(np.sqrt(self.err2))
        return max(0.0, self.total / self.rows) if self.rows else 0.0

    @property
    def agreement(self) -> float | None:
        return self.agree / self.rows if self.effective == "kl" and self.rows else None

    def record(self) -> dict:
        return {"kind": self.effective, "score": self.score, "unit": UNITS[self.effective],
                "top1_agreement": self.agreement, "rows": self.rows}


def is_poor(record: dict) -> bool:
    """True when a fidelity record should be warned about on the terminal."""
    agreement = record.get("top1_agreement")
    if agreement is not None:
        return agreement < AGREEMENT_WARNING
    return record["score"] > SCORE_WARNING[record["kind"]]


def describe(kind: str, form: str, *, token_level: bool) -> str:
    """The score's definition, for the report and the terminal."""
    row = "unpadded token" if token_level else "sample"
    return {"kl": f"mean KL divergence of the pruned model's {form} from the original's, nats per {row}",
            "cosine": f"mean cosine distance of the pruned model's output to the original's, per {row}",
            "relative": "relative L2 error of the pruned model's output against the original's"}[kind]


def measure_sets(runner, kind: OutputKind, data, removal_sets, *, batch_size: int, references=None) -> list[dict]:
    """Fidelity records of several removal sets on `data`, in one pass: the
    original's output once per batch, then each set through the gated graph.
    `references` (a `run_cache.RunCache` keyed by batch index) keeps the
    original's outputs for later passes, or gives those an earlier pass kept."""
    sets = [frozenset(s) for s in removal_sets]
    meters = {s: FidelityMeter(kind, token_level=data.is_token_data) for s in dict.fromkeys(sets)}
    for b, (feed, _) in enumerate(data.batches(batch_size)):
        def original(feed=feed):
            return runner.run(feed, set())[kind.output]

        reference = references.get(b, original) if references is not None else original()
        mask = data.token_mask(feed)
        prepared: dict = {}
        for s, meter in meters.items():
            value = reference if not s else runner.run(feed, s)[kind.output]
            meter.update(reference, value, mask, prepared)
    return [meters[s].record() for s in sets]


def measure_sets_sequential(model: onnx.ModelProto, units, kind: OutputKind, data, removal_sets, *,
                            batch_size: int, provider: str = "cpu") -> list[dict]:
    """`measure_sets` for `--sequential`: the original and each pruned model
    (as `surgery.remove_units` writes it) run piece by piece, so that ONNX
    Runtime holds one piece's weights at a time; the outputs meet batch by
    batch from the pieces' spill files."""
    from ..surgery.remove import remove_units
    from .sequential import stream_sequential

    sets = [frozenset(s) for s in removal_sets]
    distinct = [s for s in dict.fromkeys(sets) if s]
    meters = {s: FidelityMeter(kind, token_level=data.is_token_data) for s in dict.fromkeys(sets)}
    exits = [u.exit for u in units]

    def outputs(network):
        for batch in stream_sequential(network, data, [], boundaries=exits, batch_size=batch_size,
                                       provider=provider):
            yield batch.outputs[kind.output]

    # Each stream runs its whole pass (and frees its pieces) on its first batch.
    streams = [outputs(remove_units(model, [units[i] for i in sorted(s)])) for s in distinct]
    for (feed, _), reference, *pruned in zip(data.batches(batch_size), outputs(model), *streams):
        mask = data.token_mask(feed)
        for s, value in zip(distinct, pruned):
            meters[s].update(reference, value, mask)
        if frozenset() in meters:
            meters[frozenset()].update(reference, reference, mask)
    return [meters[s].record() for s in sets]


def fidelity_record(record: dict, kind: OutputKind, data, held_out) -> dict:
    """A `measure_sets` record as the report stores it: with its definition,
    the scored output and rule, and which samples it was measured on."""
    samples = (held_out or data).n_samples
    # A sequence model's output with one row per sequence (a classifier's logits) is scored per sample.
    per_token = data.is_token_data and record.get("rows", samples) != samples
    return {
        **record,
        "definition": describe(record["kind"], kind.form, token_level=per_token),
        "output": kind.output,
        "rule": kind.rule,
        "held_out": held_out is not None,
        "samples": samples,
        "poor": is_poor(record),
    }
