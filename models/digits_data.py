"""The scikit-learn 8x8 digits as (N, 1, 8, 8) float32 images, one fixed split.

The data ships inside scikit-learn, so this works offline. Pixels are scaled to
[0, 1] and then standardised with the training split's mean and std only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.25
# load_digits pixels are integer intensities 0..16.
PIXEL_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """Standardised images (N, 1, 8, 8) float32 and int64 labels for both splits."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    mean: float
    std: float


def load_split() -> DigitsSplit:
    """The fixed stratified 75/25 train/test split (seed 0), standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / PIXEL_MAX).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    # Statistics from the training split only, so the test set stays unseen.
    mean = float(train_x.mean())
    std = float(train_x.std())

    def prepare(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)[:, None, :, :]

    return DigitsSplit(prepare(train_x), train_y, prepare(test_x), test_y, mean, std)


def train_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Training images (N, 1, 8, 8) float32 and labels int64."""
    split = load_split()
    return split.train_x, split.train_y


def test_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Held-out test images (N, 1, 8, 8) float32 and labels int64."""
    split = load_split()
    return split.test_x, split.test_y
