"""The activation budget: how many samples a stage may run at once.

Every stage that holds activations (the calibration pass, the measured-damage
search, fidelity, repair fits, GradNorm) runs its batches in slices whose
activations stay within one budget, whatever `--batch-size`, the input
resolution and the number of units: peak memory is then about the weights
ONNX Runtime holds plus the budget. A stage states what it holds per sample,
in tensors of the calibration pass (their bytes per sample are measured once,
on one sample) and multiples of the largest one (ONNX Runtime's own working
buffers), and gets the number of samples per run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from ..errors import UserError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# ONNX Runtime's working buffers beside what a run returns, in largest tensors per sample.
WORKING_TENSORS = 3
# Copies of the scored output a fidelity or damage run holds: the original's,
# the pruned network's and the original's log-probabilities in float64 (the
# meters' other temporaries are bounded blocks, fidelity.BLOCK_VALUES).
METER_COPIES = 4
# A tensor a run returns is held twice while the run ends: ONNX Runtime's
# buffer and the numpy array it is copied into.
RETURNED_COPIES = 2
# A torch forward and backward keeps about this many copies of the unit exits per sample.
BACKWARD_COPIES = 4


def parse_size(text: str | int, flag: str = "--activation-budget") -> int:
    """Bytes of a size written `512M`, `1G`, `1.5GiB`, `65536` (bytes); at least 64 KiB
    (a smaller one is a slip: `1` meant as 1G)."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        size = int(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
        if match is None:
            raise UserError(f"{flag} must be a size such as 512M or 2G, got {text!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 64 * 2**10:
        raise UserError(f"{flag} must be at least 64K, got {text!r}")
    return size


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size / 2**20:.1f}M"


def bytes_per_sample(values: Mapping[str, np.ndarray], rows: int) -> dict[str, int]:
    """Bytes each tensor of one run takes per sample, from a run on `rows` samples
    (a tensor without the batch axis, a shape or a cache, counts whole)."""
    return {name: int(-(-value.nbytes // max(rows, 1))) for name, value in values.items()}


@dataclass(frozen=True)
class ActivationBudget:
    """At most `bytes` of activations held at once; `sizes` is the calibration
    pass's bytes per sample of every tensor it exposed (and the outputs)."""

    bytes: int
    sizes: Mapping[str, int]

    @property
    def largest(self) -> int:
        return max(self.sizes.values(), default=0)

    def held(self, tensors: Iterable[str] = (), *, copies: Mapping[str, float] | None = None,
             working: float = WORKING_TENSORS) -> int:
        """Bytes per sample of `tensors` once each, plus `copies` {tensor: count},
        plus `working` largest tensors (ONNX Runtime's buffers, numpy's temporaries)."""
        total = RETURNED_COPIES * sum(self.sizes.get(t, 0) for t in dict.fromkeys(tensors))
        total += sum(self.sizes.get(t, 0) * n for t, n in (copies or {}).items())
        return int(total + working * self.largest)

    def rows(self, per_sample: int, requested: int, *, share: float = 1.0) -> int:
        """Samples per run: `requested`, or fewer so that `per_sample` bytes
        each stay within `share` of the budget; never fewer than one."""
        return rows_within(int(self.bytes * share), per_sample, requested)


def rows_within(budget: int, per_sample: int, requested: int) -> int:
    if per_sample <= 0:
        return requested
    return max(1, min(requested, budget // per_sample))
