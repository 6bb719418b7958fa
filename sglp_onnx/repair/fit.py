"""One map's least-squares fit, from sums streamed batch by batch.

Rows are the samples of a channel vector: every pixel of every image of a
feature map (channels on `axis`), every unpadded token of a sequence. The
sums are float64 and their size depends on the channel count only, so the
calibration set can be as large as the user likes.
"""

from __future__ import annotations

import numpy as np

from ..files.calibration import token_keep

# full: y = x W + b (a C x C matrix and a bias); diagonal: y_c = a_c x_c + b_c.
FORMS = ("full", "diagonal")
# Ridge strength relative to the mean energy of one input channel, plus SCARCITY
# times channels / rows: few rows per parameter pull the map harder towards
# the plain bypass (the identity), never towards zero.
RIDGE = 1e-4
SCARCITY = 0.5
CHUNK_ROWS = 1 << 16


def as_rows(value: np.ndarray, axis: int, mask: np.ndarray | None = None) -> np.ndarray:
    """`value` as (rows, channels), channels from `axis`; for a (B, T, C)
    sequence with a (B, T') token mask, only the unpadded tokens (the mask's
    last T positions, as with a KV cache; a (B*T, C) flattening alike)."""
    moved = np.moveaxis(value, axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    keep = token_keep(mask, moved.shape[:-1]) if moved.ndim in (2, 3) else None
    return rows if keep is None else rows[keep.reshape(-1)]


class LinearFit:
    """Accumulates the normal equations of y ~ map(x) for one cut."""

    def __init__(self, channels: int, form: str = "full", *, rows_per_update: int | None = None,
                 product: type = np.float64) -> None:
        """`rows_per_update` keeps at most that many rows of each update
        (evenly strided: neighbouring pixels say nearly the same) and
        `product` computes each update's products in float32 (the sums stay
        float64): what a search that only ranks candidates can afford."""
        if form not in FORMS:
            raise ValueError(f"unknown repair form {form!r}")
        self.form = form
        self.rows_per_update = rows_per_update
        self.product = product
        self.channels = channels
        self.n = 0
        # A full fit on fewer rows than half its channels keeps its rows
        # (float64) and solves in the rows' dual (`_dual_weight`): a
        # 2896-wide vector read on 103 samples solves a 103 x 103 system
        # instead of a 2896 x 2896 one.
        self.kept: list[tuple[np.ndarray, np.ndarray]] | None = [] if form == "full" else None
        c = channels
        self.sx, self.sy = np.zeros(c), np.zeros(c)
        self.syy = np.zeros(c)
        if form == "full":
            self.xx, self.xy = np.zeros((c, c)), np.zeros((c, c))
        else:
            self.xx, self.xy = np.zeros(c), np.zeros(c)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows x (entry) and y (the original's exit), both (rows, C)."""
        if x.shape != y.shape or x.shape[-1] != self.channels:
            raise ValueError(f"repair fit: entry rows {x.shape} and exit rows {y.shape} differ")
        if self.rows_per_update and len(x) > self.rows_per_update:
            stride = -(-len(x) // self.rows_per_update)
            x, y = x[::stride], y[::stride]
        with np.errstate(all="ignore"):  # overflowing activations give a non-finite fit, refused by the caller
            self._accumulate(x, y)

    def _accumulate(self, x: np.ndarray, y: np.ndarray) -> None:
        for start in range(0, len(x), CHUNK_ROWS):
            xs = _finite(x[start:start + CHUNK_ROWS].astype(self.product))
            ys = _finite(y[start:start + CHUNK_ROWS].astype(self.product))
            self.n += len(xs)
            if self.kept is not None:
                if 2 * self.n <= self.channels:
                    self.kept.append((xs.astype(np.float64), ys.astype(np.float64)))
                else:
                    self.kept = None
            self.sx += xs.sum(0, dtype=np.float64)
            self.sy += ys.sum(0, dtype=np.float64)
            self.syy += (ys * ys).sum(0, dtype=np.float64)
            if self.form == "full":
                self.xx += (xs.T @ xs).astype(np.float64)
                self.xy += (xs.T @ ys).astype(np.float64)
            else:
                self.xx += (xs * xs).sum(0, dtype=np.float64)
                self.xy += (xs * ys).sum(0, dtype=np.float64)

    def solve(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(weight, bias, fit error): y ~ x @ weight + bias for `full`
        (weight C x C), y ~ x * weight + bias for `diagonal` (weight C); the
        fit error is the map's squared residual over the plain bypass's
        (y ~ x) on the fitted rows: 0 is exact, 1 no better than removal."""
        n, c = max(self.n, 1), self.channels
        mean_x, mean_y = self.sx / n, self.sy / n
        if self.form == "full":
            cxx = self.xx - n * np.outer(mean_x, mean_x)
            cxy = self.xy - n * np.outer(mean_x, mean_y)
            ridge = (RIDGE + SCARCITY * c / n) * max(float(np.trace(cxx)) / c, 1e-12)
            # Shrunk towards the identity: argmin ||y - xW||^2 + ridge ||W - I||^2.
            eye = np.eye(c)
            if self.kept:
                weight = self._dual_weight(mean_x, mean_y, ridge)
            else:
                try:
                    weight = np.linalg.solve(cxx + ridge * eye, cxy + ridge * eye)
                except np.linalg.LinAlgError:
                    weight = np.linalg.lstsq(cxx + ridge * eye, cxy + ridge * eye, rcond=None)[0]
            bias = mean_y - mean_x @ weight
            # sum ||y - xW - b||^2 from the sums alone; W solves (cxx + ridge I) W = cxy + ridge I,
            # so cxx W = cxy + ridge (I - W) and W'cxx W needs no second C^3 product.
            cxx_w = cxy + ridge * (eye - weight)
            residual = (self.syy.sum() - n * mean_y @ mean_y) - 2 * np.sum(weight * cxy) \
                + np.sum(weight * cxx_w)
            bypass = self.syy.sum() - 2 * np.trace(self.xy) + np.trace(self.xx)
        else:
            cxx = self.xx - n * mean_x ** 2
            cxy = self.xy - n * mean_x * mean_y
            ridge = (RIDGE + SCARCITY / n) * max(float(cxx.mean()), 1e-12)
            weight = (cxy + ridge) / (cxx + ridge)
            bias = mean_y - weight * mean_x
            residual = np.sum((self.syy - n * mean_y ** 2) - 2 * weight * cxy + weight ** 2 * cxx)
            bypass = np.sum(self.syy - 2 * self.xy + self.xx)
        error = float(max(residual, 0.0) / bypass) if bypass > 0 else 0.0
        return weight, bias, error

    def _dual_weight(self, mean_x: np.ndarray, mean_y: np.ndarray, ridge: float) -> np.ndarray:
        """The full fit's weight from its kept rows: with X, Y the centred rows,
        W = I + D where D = argmin ||(Y - X) - X D||^2 + ridge ||D||^2 =
        X' (X X' + ridge I)^-1 (Y - X), an n x n system for n rows."""
        x = np.concatenate([r[0] for r in self.kept]) - mean_x
        y = np.concatenate([r[1] for r in self.kept]) - mean_y
        gram = x @ x.T + ridge * np.eye(len(x))
        try:
            coef = np.linalg.solve(gram, y - x)
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(gram, y - x, rcond=None)[0]
        weight = x.T @ coef
        weight[np.diag_indices_from(weight)] += 1.0
        return weight


def _finite(values: np.ndarray) -> np.ndarray:
    """`values` (a fresh copy) through `np.nan_to_num`, in place; one check
    where all are finite instead of nan_to_num's four passes."""
    return values if np.isfinite(values).all() else np.nan_to_num(values, copy=False)


def apply_fitted(value: np.ndarray, weight: np.ndarray, bias: np.ndarray, axis: int) -> np.ndarray:
    """A `LinearFit.solve` map applied to `value` along `axis`, in float32,
    returned in `value`'s dtype (weight C x C: full; weight C: diagonal)."""
    moved = np.moveaxis(value.astype(np.float32, copy=False), axis, -1)
    with np.errstate(all="ignore"):  # non-finite activations stay non-finite, unwarned
        if weight.ndim == 2:
            out = moved @ weight.astype(np.float32) + bias.astype(np.float32)
        else:
            out = moved * weight.astype(np.float32) + bias.astype(np.float32)
    return np.moveaxis(out, -1, axis).astype(value.dtype, copy=False)
