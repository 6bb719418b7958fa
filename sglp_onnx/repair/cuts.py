"""The cuts of a removal set, and the axis a cut's map mixes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx

from ..graph.index import GraphIndex
from ..graph.ops import CONV_OPS
from ..units.discovery import PrunableUnit

# Ops that carry a feature map's channels on axis 1 (NCHW, NCL).
CHANNEL_FIRST_OPS = CONV_OPS | {"ConvTranspose", "BatchNormalization", "InstanceNormalization",
                                "GroupNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
                                "GlobalMaxPool", "QLinearGlobalAveragePool", "QLinearAveragePool", "LpPool"}
# Ops a tensor passes through on its way to the op that tells its layout.
LAYOUT_PASS_OPS = {"Identity", "Cast", "Relu", "LeakyRelu", "Clip", "DequantizeLinear", "QuantizeLinear",
                   "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Add", "Sub", "Div", "Pad"}


@dataclass(frozen=True)
class Cut:
    """A maximal run of consecutive removed units, first to last."""

    units: tuple[int, ...]
    entry: str  # the first unit's entry: what the pruned model reads at the cut
    exit: str  # the last unit's exit: what the map imitates


def cuts_of(units: Sequence[PrunableUnit], removed) -> list[Cut]:
    """The cuts of `removed` (indices into `units`) in unit order. A removed
    unit continues the cut of the removed unit whose exit is its entry."""
    removed = sorted(set(removed))
    by_exit = {units[k].exit: k for k in removed}
    after: dict[int, int] = {}
    for k in removed:
        before = by_exit.get(units[k].entry)
        if before is not None and before != k:
            after[before] = k
    continued = set(after.values())
    cuts = []
    for head in removed:
        if head in continued:
            continue
        run = [head]
        while run[-1] in after:
            run.append(after[run[-1]])
        cuts.append(Cut(tuple(run), units[head].entry, units[run[-1]].exit))
    return cuts


def channel_axis(index: GraphIndex, entry: str, rank: int) -> int:
    """The axis of `entry` (a tensor of `rank` dims) that holds channels:
    1 when it feeds a convolution, a batch/instance norm or a pool (NCHW),
    through elementwise steps; else the last axis (a transformer's hidden
    state, an NHWC map, a (batch, features) vector)."""
    if rank <= 2:
        return rank - 1
    frontier, seen = [entry], {entry}
    while frontier:
        name = frontier.pop()
        for i in index.consumers.get(name, []):
            node = index.nodes[i]
            if node.op_type in CHANNEL_FIRST_OPS:
                return 1
            if node.op_type in LAYOUT_PASS_OPS:
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return rank - 1


def unit_order(model: onnx.ModelProto, cuts: Sequence[Cut]) -> list[Cut]:
    """`cuts` in the order their entries are computed (front to back)."""
    index = GraphIndex(model)
    return sorted(cuts, key=lambda c: (index.position(c.entry), c.units))
