"""Fitting the repairs of one removal set, and their report records.

Cuts are fitted front to back on the pruned model's own entries: cut i's
map reads what the pruned model, with cuts 0..i-1 already repaired, computes
at the cut's entry, and is fitted to the original network's value at the
cut's exit, so each map also corrects what the earlier cuts left over
(fitting every cut on the original's entries instead, `fit_on="original"`,
is one pass but measured worse at high removal ratios: see docs/criteria.md).
Each cut costs one partial pass over the selection samples (up to its entry);
the original's exits are computed once and kept up to REFERENCE_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.index import GraphIndex
from ..graph.runtime import prefix_session, session_with_outputs
from ..surgery.remove import bypassed_prefix, remove_units
from ..units.discovery import PrunableUnit
from .cuts import Cut, channel_axis, cuts_of, unit_order
from .fit import FORMS, LinearFit, as_rows
from .graph import map_constants, with_repairs

from ..options import DEFAULT_REPAIR, REPAIR_FORMS as REPAIR_CHOICES  # noqa: E402,F401 (re-exported)
FIT_ON = ("pruned", "original")
REFERENCE_BYTES = 256 * 2**20


@dataclass
class Repair:
    """The fitted map of one cut."""

    cut: Cut
    form: str
    axis: int
    rank: int
    elem_type: int  # ONNX element type of the entry (and exit)
    weight: np.ndarray
    bias: np.ndarray
    fit_error: float
    rows: int
    flops: int  # per sample
    # Entry scale, entry zero point, exit scale, exit zero point of quantized activations.
    quant: tuple[str, str, str, str] | None = None

    @property
    def params(self) -> int:
        return int(self.weight.size + self.bias.size)


class Unrepairable(Exception):
    """A cut whose map cannot be built (the reason is the message)."""


def _quantization(index: GraphIndex, units: Sequence[PrunableUnit], cut: Cut) -> tuple[str, str, str, str]:
    """Scale and zero point of a quantized cut's entry and exit, from the
    units' companions (entry side of the first unit, exit side of the last)."""
    def split(pairs, side):
        names = [p[side] for p in pairs]
        scale = next((n for n in names if index.dtypes.get(n) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)),
                     None)
        zero = next((n for n in names if n != scale), None)
        return scale, zero

    entry_scale, entry_zero = split(units[cut.units[0]].companions, 1)
    exit_scale, exit_zero = split(units[cut.units[-1]].companions, 0)
    found = (entry_scale, entry_zero, exit_scale, exit_zero)
    if None in found or not all(index.is_constant(n) for n in found):
        raise Unrepairable("quantized activations whose scale and zero point are not constants of the graph")
    return found


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise Unrepairable(f"{name!r} is not a plain constant")


class OriginalReference:
    """The original network's values at cut entries and exits, batch by
    batch, for one calibration set read in one batch size. The first pass
    computes every name it was made with (all the units' entries and exits,
    where one reference serves several removal sets) and keeps the batches
    while together they fit REFERENCE_BYTES; a later cut or removal set then
    reads them. Too large to keep, each cut recomputes only its own entry and
    exit, running the original no further than that exit."""

    def __init__(self, model, names, provider) -> None:
        self.model, self.names, self.provider = model, list(names), provider
        self.session = None
        self.kept: list[dict] | None = []
        self.bytes = 0
        self.key = None  # (calibration set, batch size) the batches are of

    def start(self, cut: Cut, key) -> None:
        """Before the batches of `cut`'s fit (`key`: the data and batch size read)."""
        if self.key != key:  # another calibration set or batch size: start over
            self.key, self.kept, self.bytes, self.session = key, [], 0, None
            return
        if self.kept is not None:
            # The first pass is over: every batch is kept (the session goes:
            # the cut's own session will hold the weights).
            self.session = None
        elif self.names != [cut.entry, cut.exit]:
            self.names, self.session = [cut.entry, cut.exit], None

    def get(self, b: int, feed: dict) -> dict[str, np.ndarray]:
        if self.kept is not None and b < len(self.kept):
            return self.kept[b]
        if self.session is None:  # the original up to the last exit needed
            self.session = prefix_session(self.model, self.names, self.provider)
        inputs = {i.name for i in self.session.get_inputs()}
        values = dict(zip(self.names, self.session.run(self.names, {k: v for k, v in feed.items() if k in inputs})))
        if self.kept is not None:
            self.bytes += sum(v.nbytes for v in values.values())
            if self.bytes <= REFERENCE_BYTES and b == len(self.kept):
                self.kept.append(values)
            else:
                self.kept, self.bytes = None, 0
        return values

    def close(self) -> None:
        """After a removal set's fits: the session goes (the repaired model's measure runs next)."""
        self.session = None


def fit_repairs(model: onnx.ModelProto, units: Sequence[PrunableUnit], removed, data, *, form: str,
                batch_size: int, provider: str = "cpu", fit_on: str = "pruned",
                progress: Callable[[Iterator, str], Iterator] | None = None,
                reference: OriginalReference | None = None) -> tuple[list[Repair], list[str]]:
    """The repairs of removal set `removed` fitted on `data` (the selection
    samples), and a note per cut that could not be repaired (why).
    `reference`: the original's values shared by several removal sets of
    `model` (`original_reference`); None: this set's own."""
    if form not in FORMS or fit_on not in FIT_ON:
        raise ValueError(f"repair form {form!r} / fit on {fit_on!r}")
    cuts = unit_order(model, cuts_of(units, removed))
    if not cuts:
        return [], []
    index = GraphIndex(model)
    if reference is None:
        reference = OriginalReference(model, dict.fromkeys([c.exit for c in cuts] + [c.entry for c in cuts]),
                                      provider)
    repairs: list[Repair] = []
    skipped: list[str] = []

    def batches(label):  # noqa: E306
        it = data.batches(batch_size)
        return progress(it, label) if progress else it

    for i, cut in enumerate(cuts):
        names = ", ".join(units[k].name for k in cut.units)
        reference.start(cut, (id(data), batch_size))
        try:
            repair = _fit_cut(model, index, units, cut, removed, repairs, reference, batches(f"repair {i + 1}/"
                              f"{len(cuts)}"), form=form, own=fit_on == "pruned" and bool(repairs),
                              token_mask=data.token_mask, provider=provider)
        except Unrepairable as exc:
            skipped.append(f"cut {names}: not repaired ({exc})")
            continue
        repairs.append(repair)
    reference.close()
    return repairs, skipped


def original_reference(model: onnx.ModelProto, units: Sequence[PrunableUnit], provider: str) -> OriginalReference:
    """One `OriginalReference` for every removal set of `model`'s `units`."""
    return OriginalReference(model, dict.fromkeys([n for u in units for n in (u.exit, u.entry)]), provider)


def _fit_cut(model, index, units, cut: Cut, removed, repairs, reference: OriginalReference, batches, *, form: str,
             own: bool, token_mask, provider: str) -> Repair:
    """The map of one cut, fitted batch by batch (see `fit_repairs`); `own`:
    on the pruned model's own entry (the earlier `repairs` applied), else on
    the original's."""
    quant = entry_q = exit_q = session = None
    if own:  # the pruned model with the earlier cuts repaired, up to this cut's entry
        session = _pruned_prefix(model, units, removed, repairs, cut.entry, provider)
        inputs = {x.name for x in session.get_inputs()}
    fit = axis = rank = elem = flops = None
    for b, (feed, _) in enumerate(batches):
        ref = reference.get(b, feed)
        x = session.run([cut.entry], {k: v for k, v in feed.items() if k in inputs})[0] if own else ref[cut.entry]
        y = ref[cut.exit]
        if fit is None:
            if x.shape != y.shape or x.ndim < 2 or x.dtype != y.dtype:
                raise Unrepairable("its entry and exit differ in shape or dtype")
            rank = x.ndim
            axis = channel_axis(index, cut.entry, rank)
            fit = LinearFit(x.shape[axis], form)
            elem = onnx.helper.np_dtype_to_tensor_dtype(x.dtype)
            flops = 2 * int(np.prod(x.shape[1:])) * (x.shape[axis] if form == "full" else 1)
            if np.issubdtype(x.dtype, np.integer):  # quantized activations: map their real values
                quant = _quantization(index, units, cut)
                entry_q = (_constant(model, quant[0]), _constant(model, quant[1]).astype(np.float64))
                exit_q = (_constant(model, quant[2]), _constant(model, quant[3]).astype(np.float64))
            elif not np.issubdtype(x.dtype, np.floating):
                raise Unrepairable(f"its entry is {x.dtype}, neither float nor quantized")
        if quant is not None:
            x = (x.astype(np.float64) - entry_q[1]) * entry_q[0]
            y = (y.astype(np.float64) - exit_q[1]) * exit_q[0]
        mask = token_mask(feed)
        fit.update(as_rows(x, axis, mask), as_rows(y, axis, mask))
    if fit is None:
        raise Unrepairable("no calibration batch")
    with np.errstate(all="ignore"):
        weight, bias, error = fit.solve()
    if not (np.isfinite(weight).all() and np.isfinite(bias).all() and np.isfinite(error)):
        raise Unrepairable("its activations overflow: the fit is not finite")
    return Repair(cut=cut, form=form, axis=axis, rank=rank, elem_type=elem, weight=weight, bias=bias,
                  fit_error=error, rows=fit.n, flops=flops, quant=quant)


def _pruned_prefix(model, units, removed, repairs, entry: str, provider: str):
    """A session computing `entry` in the pruned model with `repairs` applied,
    and nothing after it: the repaired graph's prefix read through the
    removal's bypasses where no removed unit has companions (the quick way),
    else the pruned model itself (`surgery.remove_units`)."""
    repaired, new_units = with_repairs(model, units, repairs)
    gone = [new_units[k] for k in sorted(removed)]
    prefix = bypassed_prefix(repaired, gone, [entry])
    if prefix is not None:
        return session_with_outputs(prefix, [entry], provider)
    return prefix_session(remove_units(repaired, gone), [entry], provider)


def repair_records(repairs: Sequence[Repair], units: Sequence[PrunableUnit]) -> list[dict]:
    """The report's `repair.cuts`: one record per repaired cut."""
    kinds = {"full": "full linear map", "diagonal": "per-channel scale and bias"}
    records = []
    for k, r in enumerate(repairs):
        op = "Mul + Add" if r.form == "diagonal" else ("Conv 1x1" if r.axis == 1 and r.rank >= 3 else "MatMul + Add")
        if r.quant is not None:
            op = f"DequantizeLinear -> {op} -> QuantizeLinear"
        records.append({
            "units": [units[k].name for k in r.cut.units],
            "entry": r.cut.entry, "exit": r.cut.exit,
            "form": r.form, "map": kinds[r.form], "nodes": op, "axis": int(r.axis),
            "initializers": list(map_constants(k, r.form)),
            "channels": int(r.bias.size), "params": r.params, "flops": r.flops,
            "fit_error": round(r.fit_error, 6), "fit_rows": int(r.rows),
        })
    return records
