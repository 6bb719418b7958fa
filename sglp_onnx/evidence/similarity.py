"""Similarity between unit representations, accumulated batch by batch.

Minibatch linear CKA for every pair of units (SGLP's similarity, stage 3 of
the pipeline) and the mean cosine distance between a unit's input and output
(ShortGPT's block influence). Both stream: memory does not grow with the
number of calibration samples.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from ..errors import UserError

# The unbiased estimator divides by n(n-3) and (n-1)(n-2).
MIN_MINIBATCH = 4

Form = Literal["auto", "gram", "features"]


def hsic1(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC estimator HSIC_1 of two n x n Gram matrices (n >= 4).

    With K~ and L~ equal to K and L with their diagonals set to zero::

        HSIC_1 = 1/(n(n-3)) * [ tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2))
                                - 2/(n-2) * 1'K~L~1 ]

    Song, Smola, Gretton, Bedo, Borgwardt, "Feature selection via dependence
    maximization", JMLR 13 (2012); used for minibatch CKA by
    Nguyen, Raghu, Kornblith, "Do wide and deep networks learn the same
    things?", ICLR 2021. For linear kernels it is unchanged when a
    constant vector is added to every sample.
    """
    K = np.array(K, dtype=np.float64)
    L = np.array(L, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape != L.shape:
        raise ValueError(f"hsic1 needs two square matrices of the same shape, got {K.shape} and {L.shape}")
    n = K.shape[0]
    if n < MIN_MINIBATCH:
        raise ValueError(f"hsic1 needs n >= {MIN_MINIBATCH} samples, got {n}")
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    trace = float(np.sum(K * L.T))
    k_sum = float(K.sum())
    l_sum = float(L.sum())
    cross = float(K.sum(axis=0) @ L.sum(axis=1))
    return (trace + k_sum * l_sum / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Full-batch (biased) linear CKA of two representations of the same n samples.

    With Xc, Yc the column-centered features (n x d_x, n x d_y)::

        CKA = ||Yc' Xc||_F^2 / (||Xc' Xc||_F * ||Yc' Yc||_F)

    Kornblith, Norouzi, Lee, Hinton, "Similarity of neural network
    representations revisited", ICML 2019. Non-finite values are
    replaced by 0 and a zero denominator (constant features) gives 0, so the
    result is never NaN.
    """
    X = _finite_2d(X, "X")
    Y = _finite_2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of samples, got {X.shape[0]} and {Y.shape[0]}")
    X = _centered(X)
    Y = _centered(Y)
    n = X.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        if X.shape[1] * Y.shape[1] <= n * n:
            cross = np.sum((Y.T @ X) ** 2)
            norm_x = np.linalg.norm(X.T @ X)
            norm_y = np.linalg.norm(Y.T @ Y)
        else:
            # Same quantities through the n x n Gram matrices: cheaper when d > n.
            Kx, Ky = X @ X.T, Y @ Y.T
            cross = np.sum(Kx * Ky)
            norm_x = np.linalg.norm(Kx)
            norm_y = np.linalg.norm(Ky)
        denominator = norm_x * norm_y
        if not (np.isfinite(cross) and np.isfinite(denominator)) or denominator <= 0.0:
            return 0.0
        return float(np.clip(cross / denominator, 0.0, 1.0))


def _centered(x: np.ndarray) -> np.ndarray:
    """Columns minus their mean, with constant columns exactly zero.

    Subtracting the mean alone leaves round-off in a constant column, and
    CKA, being scale invariant, would turn that round-off into an arbitrary
    similarity. Subtracting the first sample first zeroes constant columns
    exactly; neither shift changes (centered or unbiased) CKA.
    """
    if x.shape[0] == 0:
        return x
    x = x - x[0]
    return x - x.mean(axis=0)


def _cheapest_gram_units(widths: list[int], n: int) -> list[int]:
    """Units to keep as Gram matrices so that one minibatch costs the fewest multiply-adds.

    A pair of feature-form units costs n d_i d_j (||X_i' X_j||_F^2); a Gram
    unit costs n^2 d once to build and n^2 per pair it is in; a feature unit
    paired with any Gram unit needs its own transient Gram (n^2 d) too. So
    feature form pays off only for narrow units: d_i d_j < n, not merely
    d < n (with d = 256, n = 512 and 24 units the Gram form is about 4 times
    faster). Feature form goes to the k narrowest units, k chosen by this
    model of the cost; both forms give the same result, so this only
    affects time.
    """
    U = len(widths)
    order = sorted(range(U), key=lambda i: (widths[i], i))
    sorted_widths = np.array([widths[i] for i in order], dtype=np.float64)
    best_cost, best_k = np.inf, 0
    for k in range(U + 1):  # the k narrowest units in feature form
        feature_w = sorted_widths[:k]
        g = U - k
        feature_pairs = n * (feature_w.sum() ** 2 + (feature_w**2).sum()) / 2
        if g == 0:
            cost = feature_pairs
        else:
            cost = feature_pairs + n * n * (sorted_widths.sum() + g * (g + 1) / 2 + g * k)
        if cost < best_cost:
            best_cost, best_k = cost, k
    return sorted(order[best_k:])


# Column block for building a Gram matrix: bounds the float64 copy of a
# chunk of wide features to chunk_size x 4096 values.
GRAM_COLUMN_BLOCK = 4096


def _prepared(x: np.ndarray) -> np.ndarray:
    """Features in float64 with non-finite values zeroed and columns centered.

    HSIC_1 with linear kernels is shift invariant, so centering changes no
    estimate; it shrinks the Gram entries (less cancellation) and makes a
    constant unit exactly zero (see `_centered`).
    """
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, 0.0)
    return _centered(x)


def _zero_diagonal_gram(x: np.ndarray, *, out: np.ndarray) -> np.ndarray:
    """K~ = X X' with a zero diagonal, into `out`, X prepared (see `_prepared`) by column blocks."""
    out[...] = 0.0
    for start in range(0, x.shape[1], GRAM_COLUMN_BLOCK):
        block = _prepared(x[:, start:start + GRAM_COLUMN_BLOCK])
        out += block @ block.T
    np.fill_diagonal(out, 0.0)
    return out


def _finite_2d(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples x features), got shape {array.shape}")
    return np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)


class MinibatchCKA:
    """Streaming minibatch linear CKA between all pairs of U representations.

    Every minibatch b contributes HSIC_1(K_i, K_j) (see `hsic1`, with linear
    kernels K_i = X_i X_i') for all unit pairs; the result is::

        CKA_ij = sum_b HSIC_1(K_i, K_j) / sqrt(sum_b HSIC_1(K_i, K_i) * sum_b HSIC_1(K_j, K_j))

    Nguyen, Raghu, Kornblith, "Do wide and deep networks learn the same
    things?", ICLR 2021. Sums are kept in float64.

    A batch larger than `chunk_size` samples is split into the fewest
    near-equal chunks of at most `chunk_size` samples, each one minibatch of
    the estimator, so the working memory is bounded by about
    U * chunk_size^2 floats whatever the batch size. Near-equal chunks keep a
    tiny tail from getting the same weight in the sum as a full chunk. A batch
    (plus any carry) with fewer than 4 samples cannot form a minibatch: it is
    carried over and prepended to the next update, and `result` ignores a
    final carry.

    `form` chooses how a unit enters the estimator: "gram" keeps its n x n
    Gram matrix, "features" keeps its n x d features, and "auto" (default)
    picks, per chunk, the split that needs the fewest multiply-adds (see
    `_cheapest_gram_units`). The choice never changes the result beyond
    round-off.

    Non-finite feature values are replaced by 0 and counted in
    `nonfinite_values` so callers can warn.
    """

    def __init__(self, n_units: int, *, chunk_size: int = 512, form: Form = "auto") -> None:
        if n_units < 1:
            raise ValueError(f"n_units must be >= 1, got {n_units}")
        if chunk_size < 2 * MIN_MINIBATCH:
            # Near-equal chunks of a batch just above chunk_size are at least
            # chunk_size / 2 samples; that must still be a valid minibatch.
            raise ValueError(f"chunk_size must be >= {2 * MIN_MINIBATCH}, got {chunk_size}")
        if form not in ("auto", "gram", "features"):
            raise ValueError(f"form must be 'auto', 'gram' or 'features', got {form!r}")
        self.n_units = n_units
        self.chunk_size = chunk_size
        self.form = form
        self.nonfinite_values = 0
        self._hsic = np.zeros((n_units, n_units), dtype=np.float64)
        self._carry: list[np.ndarray] | None = None
        self._n_samples = 0
        self._minibatches = 0
        self._pairs_seen = 0

    @property
    def n_samples(self) -> int:
        """Samples (inputs or tokens) accumulated so far, not counting a carry."""
        return self._n_samples

    @property
    def minibatches(self) -> int:
        """Minibatches (chunks) accumulated so far."""
        return self._minibatches

    @property
    def pairs_seen(self) -> int:
        """Distinct sample pairs the estimator has compared: sum over minibatches of n(n-1)/2."""
        return self._pairs_seen

    def update(self, features: Sequence[np.ndarray]) -> None:
        """Accumulate one batch: one (n, d_i) array per unit, the same n for all."""
        if len(features) != self.n_units:
            raise ValueError(f"expected {self.n_units} feature arrays, got {len(features)}")
        # Kept in their own dtype: a float64 copy of a whole batch of wide CNN
        # features could be larger than the batch itself. Chunks are converted
        # (and non-finite values zeroed) a column block at a time.
        arrays = [np.asarray(x) for x in features]
        for i, x in enumerate(arrays):
            if x.ndim != 2:
                raise ValueError(f"features of unit {i} must be 2-D (samples x features), got shape {x.shape}")
            if np.issubdtype(x.dtype, np.inexact):
                self.nonfinite_values += x.size - int(np.count_nonzero(np.isfinite(x)))
        n = arrays[0].shape[0]
        if any(x.shape[0] != n for x in arrays):
            raise ValueError(f"all units need the same number of samples, got {[x.shape[0] for x in arrays]}")
        if self._carry is not None:
            arrays = [np.concatenate([c, x]) for c, x in zip(self._carry, arrays)]
            self._carry = None
            n = arrays[0].shape[0]
        if n < MIN_MINIBATCH:
            self._carry = [x.copy() for x in arrays] if n else None
            return
        n_chunks = -(-n // self.chunk_size)
        edges = np.linspace(0, n, n_chunks + 1).round().astype(int)
        for start, stop in zip(edges[:-1], edges[1:]):
            self._accumulate([x[start:stop] for x in arrays])

    def _accumulate(self, chunk: list[np.ndarray]) -> None:
        """Add HSIC_1 of one minibatch for all pairs, vectorised over pairs.

        Per pair the estimator needs tr(K~_i K~_j), the scalars 1'K~_i 1 and
        1'K~_i K~_j 1 = r_i . r_j with r_i = K~_i 1. For a unit kept as
        features X (K = X X', q_a = ||x_a||^2 the diagonal):
        r = X (X'1) - q, and for two such units
        tr(K~_i K~_j) = ||X_i' X_j||_F^2 - q_i . q_j.
        """
        n = chunk[0].shape[0]
        U = self.n_units
        if self.form == "gram":
            gram_units = list(range(U))
        elif self.form == "features":
            gram_units = []
        else:
            gram_units = _cheapest_gram_units([x.shape[1] for x in chunk], n)
        is_gram = np.zeros(U, dtype=bool)
        is_gram[gram_units] = True
        # A unit with no feature columns has K = 0 and contributes nothing.
        feature_units = [i for i in range(U) if not is_gram[i] and chunk[i].shape[1] > 0]
        chunk = [_prepared(chunk[i]) if i in feature_units else chunk[i] for i in range(U)]

        trace = np.zeros((U, U), dtype=np.float64)
        row_sums = np.zeros((U, n), dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            grams = np.empty((len(gram_units), n, n), dtype=np.float64)
            for g, i in enumerate(gram_units):
                _zero_diagonal_gram(chunk[i], out=grams[g])
                row_sums[i] = grams[g].sum(axis=1)
            flat = grams.reshape(len(gram_units), n * n)
            if gram_units:
                trace[np.ix_(gram_units, gram_units)] = flat @ flat.T

            if feature_units:
                widths = np.array([chunk[i].shape[1] for i in feature_units])
                offsets = np.concatenate([[0], np.cumsum(widths)])
                stacked = np.concatenate([chunk[i] for i in feature_units], axis=1)
                sq_norms = np.stack([np.einsum("ad,ad->a", chunk[i], chunk[i]) for i in feature_units])
                for f, i in enumerate(feature_units):
                    row_sums[i] = chunk[i] @ chunk[i].sum(axis=0) - sq_norms[f]
                    # ||X_i' X_j||_F^2 for all j >= i from one product with the
                    # stacked features, summed per unit's block of columns.
                    # (Block sums, not differences of a running sum: units can
                    # differ in scale by many orders of magnitude.)
                    product = chunk[i].T @ stacked[:, offsets[f]:]
                    column_sq = np.einsum("dc,dc->c", product, product)
                    trace[i, feature_units[f:]] = np.add.reduceat(column_sq, offsets[f:-1] - offsets[f])
                upper = np.triu_indices(len(feature_units))
                rows = np.asarray(feature_units)[upper[0]]
                cols = np.asarray(feature_units)[upper[1]]
                trace[rows, cols] -= (sq_norms @ sq_norms.T)[upper]
                trace[cols, rows] = trace[rows, cols]

                if gram_units:
                    # Mixed pairs: a transient Gram of the feature unit costs
                    # n^2 d once, cheaper than tr(X_j' K~_i X_j) per Gram unit.
                    gram_j = np.empty((n, n), dtype=np.float64)
                    for i in feature_units:
                        np.matmul(chunk[i], chunk[i].T, out=gram_j)
                        np.fill_diagonal(gram_j, 0.0)
                        trace[gram_units, i] = flat @ gram_j.reshape(-1)
                        trace[i, gram_units] = trace[gram_units, i]

            totals = row_sums.sum(axis=1)
            hsic = (
                trace
                + np.outer(totals, totals) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (row_sums @ row_sums.T)
            ) / (n * (n - 3))
        self._hsic += hsic
        self._n_samples += n
        self._minibatches += 1
        self._pairs_seen += n * (n - 1) // 2

    def hsic_sums(self) -> np.ndarray:
        """The accumulated sum over minibatches of HSIC_1(K_i, K_j), U x U."""
        return (self._hsic + self._hsic.T) / 2.0

    def result(self) -> np.ndarray:
        """The U x U CKA matrix: symmetric, diagonal exactly 1, entries in [0, 1].

        An off-diagonal entry is 0 when either unit's HSIC_1 sum is zero or
        negative (a constant unit, or estimator noise) or not finite (features
        so large, above about 1e75, that their fourth power overflows float64).
        The true CKA lies in [0, 1] but the unbiased estimator does not: it
        scatters around 0 for unrelated units and can exceed 1 by a hair for
        near-identical ones; such values are clipped into [0, 1], which moves
        nothing that lies inside.
        """
        if self._minibatches == 0:
            raise UserError(
                f"CKA needs at least {MIN_MINIBATCH} calibration samples, got {self.n_samples + self._carried()}; "
                "provide a larger calibration set"
            )
        sums = self.hsic_sums()
        self_hsic = np.diag(sums)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            denominator = np.sqrt(np.outer(np.maximum(self_hsic, 0.0), np.maximum(self_hsic, 0.0)))
            valid = (denominator > 0.0) & np.isfinite(denominator) & np.isfinite(sums)
            cka = np.where(valid, sums / np.where(valid, denominator, 1.0), 0.0)
        cka = np.clip(cka, 0.0, 1.0)
        np.fill_diagonal(cka, 1.0)
        return cka

    def _carried(self) -> int:
        return 0 if self._carry is None else self._carry[0].shape[0]


# Values (rows x features) MeanCosineDistance converts to float64 at a time: 32 MiB.
COSINE_BLOCK_VALUES = 4 * 2**20


class MeanCosineDistance:
    """Mean of 1 - cos(input, output) per unit over all samples (or tokens).

    ShortGPT's Block Influence of a layer,
    BI = 1 - E[x_in . x_out / (||x_in|| ||x_out||)]: Men et al., "ShortGPT:
    Layers in large language models are more redundant than you expect",
    arXiv 2403.03853. Accumulated in float64.

    A zero row has no direction: a pair of zero rows counts as distance 0 (the
    unit changed nothing), a zero row against a non-zero one as distance 1
    (cosine 0). Non-finite values are replaced by 0 and counted in
    `nonfinite_values`.
    """

    def __init__(self, n_units: int) -> None:
        if n_units < 1:
            raise ValueError(f"n_units must be >= 1, got {n_units}")
        self.n_units = n_units
        self.nonfinite_values = 0
        self._sums = np.zeros(n_units, dtype=np.float64)
        self._counts = np.zeros(n_units, dtype=np.int64)

    @property
    def n_samples(self) -> int:
        """Samples accumulated for the first unit (all units see the same batches)."""
        return int(self._counts[0])

    def update(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """Accumulate one batch: per unit an (n, d) input and the (n, d) output."""
        if len(inputs) != self.n_units or len(outputs) != self.n_units:
            raise ValueError(f"expected {self.n_units} inputs and outputs, got {len(inputs)} and {len(outputs)}")
        for i, (x, y) in enumerate(zip(inputs, outputs)):
            x, y = np.asarray(x), np.asarray(y)
            if x.ndim != 2 or x.shape != y.shape:
                raise ValueError(f"unit {i}: input and output must be 2-D of one shape, got {x.shape} and {y.shape}")
            # A few rows at a time: float64 copies of a whole batch of wide
            # CNN features would be several times the batch itself.
            step = max(1, COSINE_BLOCK_VALUES // max(x.shape[1], 1))
            for start in range(0, x.shape[0], step):
                rows = slice(start, start + step)
                self._sums[i] += self._distances(x[rows], y[rows]).sum()
            self._counts[i] += x.shape[0]

    def _distances(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if _narrow_float(x) and _narrow_float(y) and np.isfinite(x).all() and np.isfinite(y).all():
            # float32/float16 values: their squares summed in float64 can neither
            # overflow nor underflow, so no scaling and no float64 copy (4x faster
            # on ResNet-50's 56x56x256 exits).
            xx, yy, xy = (np.einsum("ad,ad->a", a, b, dtype=np.float64) for a, b in ((x, x), (y, y), (x, y)))
            return _cosine_distance(xy, np.sqrt(xx * yy), (xx == 0.0) & (yy == 0.0))
        return self._scaled_distances(x.astype(np.float64), y.astype(np.float64))

    def _scaled_distances(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        bad_x, bad_y = ~np.isfinite(x), ~np.isfinite(y)
        n_bad = int(np.count_nonzero(bad_x) + np.count_nonzero(bad_y))
        if n_bad:
            self.nonfinite_values += n_bad
            x = np.where(bad_x, 0.0, x)
            y = np.where(bad_y, 0.0, y)
        # Cosine ignores each row's scale; dividing by the row's largest
        # magnitude first keeps the squares from overflowing or underflowing.
        x = x / _row_scale(x)
        y = y / _row_scale(y)
        norms = np.sqrt(np.einsum("ad,ad->a", x, x) * np.einsum("ad,ad->a", y, y))
        return _cosine_distance(np.einsum("ad,ad->a", x, y), norms, ~x.any(axis=1) & ~y.any(axis=1))

    def result(self) -> np.ndarray:
        """Mean cosine distance per unit, length U, each in [0, 2]."""
        if not self._counts.all():
            raise UserError("block influence needs at least one calibration sample; provide a calibration set")
        return self._sums / self._counts


def _narrow_float(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.floating) and x.dtype.itemsize <= 4


def _cosine_distance(dots: np.ndarray, norms: np.ndarray, both_zero: np.ndarray) -> np.ndarray:
    """1 - cosine per row; a pair of zero rows is distance 0, a zero row against another 1."""
    cosine = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0.0)
    cosine[both_zero] = 1.0
    return 1.0 - np.clip(cosine, -1.0, 1.0)


def _row_scale(x: np.ndarray) -> np.ndarray:
    scale = np.abs(x).max(axis=1, keepdims=True) if x.shape[1] else np.ones((x.shape[0], 1))
    return np.where(scale > 0.0, scale, 1.0)
