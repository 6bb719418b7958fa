"""A small pre-norm Vision Transformer for the 8x8 digits: the encoder example.

Patches of 2x2 pixels (16 tokens) and a class token, DEPTH pre-norm encoder
layers `x = x + Attn(LN(x)); x = x + MLP(LN(x))` with plain LayerNorm and
GELU, a final LayerNorm and a linear head on the class token. Exported by
torch with LayerNormalization nodes and bare Add joins: the shape onnxsim's
`apply_transformer_block_pruning` matches, so the quality benchmark can run
it side by side with sglp-onnx.
"""

from __future__ import annotations

import torch
from torch import nn

DIM, DEPTH, HEADS, MLP, PATCH = 64, 8, 4, 128, 2


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDigits(nn.Module):
    def __init__(self, *, dim: int = DIM, depth: int = DEPTH, heads: int = HEADS, hidden: int = MLP,
                 patch: int = PATCH, image_size: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.layers = nn.ModuleList(Layer(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, (h // p) * (w // p), p * p)
        tokens = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        for layer in self.layers:
            tokens = layer(tokens)
        return self.head(self.norm(tokens)[:, 0])


def vit_digits() -> ViTDigits:
    """The factory `--torch-model models.vit_digits:vit_digits` (weights: models/vit_digits.pt)."""
    return ViTDigits()
