"""Tiny models whose right answer is known by construction, for the criterion
and fine-tuning tests: residual MLPs in which one block's branch is zeroed,
so that its exit equals its entry and removing it changes nothing.

Factories are importable as `--torch-model criteria_models:NAME` (pytest puts
this folder on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sglp_onnx.tools.export.torch_export import export_torch

IN_DIM, WIDTH, HIDDEN, CLASSES, DEPTH = 5, 8, 12, 3, 5
ZEROED = 2  # index of the block whose branch is zeroed


class BiasFreeBlock(nn.Module):
    """x + fc2(relu(fc1(x))) without biases, so a zero branch has zero gradients too."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class BlockMLP(nn.Module):
    """Input layer, DEPTH residual blocks `blocks.k`, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_DIM, WIDTH)
        self.blocks = nn.Sequential(*[BiasFreeBlock(WIDTH, HIDDEN) for _ in range(DEPTH)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


def block_mlp(seed: int = 0) -> BlockMLP:
    torch.manual_seed(seed)
    return BlockMLP().eval()


def other_mlp() -> BlockMLP:
    """Same architecture, other weights: not the model the zeroed ones were exported from."""
    return block_mlp(seed=7)


def last_zeroed_mlp() -> BlockMLP:
    """Block ZEROED has its last weights at 0: exit == entry, but fc2 still gets a gradient."""
    model = block_mlp()
    with torch.no_grad():
        model.blocks[ZEROED].fc2.weight.zero_()
    return model


def dead_branch_mlp() -> BlockMLP:
    """Block ZEROED has both weights at 0: exit == entry and every gradient of the block is 0."""
    model = last_zeroed_mlp()
    with torch.no_grad():
        model.blocks[ZEROED].fc1.weight.zero_()
    return model


def data(n: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs with labels from a fixed random teacher (learnable, unlike random labels)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, IN_DIM)).astype(np.float32)
    teacher = np.random.default_rng(123).standard_normal((IN_DIM, CLASSES))
    return {"input": x, "labels": (x @ teacher).argmax(1).astype(np.int64)}


def write_model(factory, folder: Path, name: str, *, calib_samples: int = 64) -> Path:
    """Export `factory()` to folder/name.onnx (legacy exporter: fast) with a calibration sidecar."""
    model = factory()
    path = folder / f"{name}.onnx"
    export_torch(model, (torch.zeros(2, IN_DIM),), path, exporter="legacy")
    np.savez(folder / f"{name}.calib.npz", **data(calib_samples))
    return path
