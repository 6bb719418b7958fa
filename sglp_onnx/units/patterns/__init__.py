"""Residual patterns: how a graph spells `y = x + f(x)`, one file each.

A pattern answers some of discovery's questions; every module in this
package is imported and its `PATTERN` registered, so a new way of writing a
residual join (a fused op, a quantized add) is one new file here:

- `joins(index)`: the join nodes it recognises, as `Join`s (a node and the
  two computed tensors it sums);
- `skip_step(index, tensor)`: a tensor equal to `tensor` one node back (an
  Identity, a dtype-preserving Cast): skip paths are seen through these;
- `block_end(index, tensor)`: the node that still belongs to the block after
  its join (a ReLU, a post-norm), whose output becomes the block's exit;
- `companions(index, entry, exit)`: tensors that readers of the exit must
  read alongside the entry when the block is bypassed (a quantized tensor's
  scale and zero point), as (exit-side, entry-side) pairs;
- `prepare(model)` / `finish(model)`: a rewrite before discovery that makes
  a fused graph's residual joins visible (a fused Skip-LayerNorm split into
  its Add and its norm), and its inverse on the pruned model.

The bypass itself is the same for every pattern (`surgery.gating`): readers
of a unit's exit read its entry, and each companion pair likewise. A pattern
may declare the opsets it applies to (`opsets`, inclusive bounds of the
default domain's version).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Iterable

import onnx

from ...graph.index import GraphIndex


@dataclass(frozen=True)
class Join:
    """A node that sums two computed tensors; `output` is the sum."""

    node: int
    inputs: tuple[str, str]
    output: str
    pattern: "Pattern"


class Pattern:
    """Base pattern: recognises nothing. Subclasses override what they know."""

    name = ""
    # Lower runs first where patterns compete for the same question.
    order = 100

    def joins(self, index: GraphIndex) -> Iterable[Join]:
        return ()

    def skip_step(self, index: GraphIndex, tensor: str, *, typed: bool = True) -> str | None:
        """With `typed` false, dtype conditions are not checked (the probe asks
        before dtypes are known, to learn them)."""
        return None

    def block_end(self, index: GraphIndex, tensor: str) -> int | None:
        return None

    opsets: tuple[int, int] = (1, 10_000)

    def companions(self, index: GraphIndex, entry: str, exit: str) -> tuple[tuple[str, str], ...]:
        return ()

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto | None:
        """A rewritten copy of `model` whose joins discovery can see, or None: nothing to rewrite."""
        return None

    def finish(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The inverse of `prepare` on a (pruned) model `prepare` made."""
        return model

    def probe_targets(self, index: GraphIndex, join: Join) -> list[str]:
        """Tensors besides the join's inputs and output whose runtime shape discovery needs."""
        return []


PATTERNS: list[Pattern] = []


def register(pattern: Pattern) -> Pattern:
    PATTERNS.append(pattern)
    PATTERNS.sort(key=lambda p: (p.order, p.name))
    return pattern


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def applicable(model: onnx.ModelProto) -> list[Pattern]:
    """The patterns whose opset bounds admit `model`."""
    opset = default_opset(model)
    return [p for p in PATTERNS if p.opsets[0] <= opset <= p.opsets[1]]


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Pattern]]:
    """`model` rewritten by every pattern that has something to rewrite, and those patterns in order."""
    used = []
    for pattern in applicable(model):
        rewritten = pattern.prepare(model)
        if rewritten is not None:
            model = rewritten
            used.append(pattern)
    return model, used


def finish(model: onnx.ModelProto, used: list[Pattern]) -> onnx.ModelProto:
    """Undo `prepare`'s rewrites (latest first) on a model derived from the prepared one."""
    for pattern in reversed(used):
        model = pattern.finish(model)
    return model


for _info in pkgutil.iter_modules(__path__):
    register(importlib.import_module(f"{__name__}.{_info.name}").PATTERN)


__all__ = ["Join", "PATTERNS", "Pattern", "applicable", "finish", "prepare", "register"]
