"""Minibatch CKA, HSIC_1 and mean cosine distance against direct formulas and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sglp_onnx.errors import UserError
from sglp_onnx.evidence.similarity import MeanCosineDistance, MinibatchCKA, hsic1, linear_cka

FAST = settings(max_examples=40, deadline=None)


def hsic1_loops(K: np.ndarray, L: np.ndarray) -> float:
    """HSIC_1 written term by term from Song et al. 2012, with explicit loops."""
    n = K.shape[0]
    Kt = [[0.0 if a == b else K[a, b] for b in range(n)] for a in range(n)]
    Lt = [[0.0 if a == b else L[a, b] for b in range(n)] for a in range(n)]
    trace = sum(Kt[a][b] * Lt[b][a] for a in range(n) for b in range(n))
    ones_k = sum(Kt[a][b] for a in range(n) for b in range(n))
    ones_l = sum(Lt[a][b] for a in range(n) for b in range(n))
    ones_kl = sum(Kt[a][c] * Lt[c][b] for a in range(n) for b in range(n) for c in range(n))
    return (trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 * ones_kl / (n - 2)) / (n * (n - 3))


def related_features(rng: np.random.Generator, n: int, widths: list[int]) -> list[np.ndarray]:
    """Representations sharing a latent factor, so CKA values are spread over (0, 1)."""
    latent = rng.normal(size=(n, 4))
    return [
        latent @ rng.normal(size=(4, d)) * rng.uniform(0.2, 3) + rng.normal(size=(n, d)) * rng.uniform(0.1, 2)
        for d in widths
    ]


def cka_of(features: list[np.ndarray], **kwargs) -> np.ndarray:
    acc = MinibatchCKA(len(features), **kwargs)
    acc.update(features)
    return acc.result()


def test_hsic1_matches_loop_formula():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(7, 3)), rng.normal(size=(7, 5))
    K, L = X @ X.T, Y @ Y.T
    assert hsic1(K, L) == pytest.approx(hsic1_loops(K, L), rel=1e-12)
    # Non-symmetric matrices exercise the transpose in tr(K~ L~).
    A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    assert hsic1(A, B) == pytest.approx(hsic1_loops(A, B), rel=1e-12)


def test_hsic1_hand_value():
    # n = 4, K = all ones: K~ has 12 ones off the diagonal, K~1 = 3 * 1.
    # tr = 12, (1'K~1)^2 / (3*2) = 144/6 = 24, 2/2 * 1'K~K~1 = 4 * 9 = 36,
    # HSIC_1 = (12 + 24 - 36) / (4 * 1) = 0: a constant feature has no dependence.
    K = np.ones((4, 4))
    assert hsic1(K, K) == 0.0
    # K = L = I + off-diagonal e_0 e_1 pattern, checked against the loops.
    K = np.eye(4)
    K[0, 1] = K[1, 0] = 2.0
    # tr = 8, 1'K~1 = 4, 1'K~K~1 = |K~1|^2 = 8: (8 + 16/6 - 8) / 4 = 2/3.
    assert hsic1(K, K) == pytest.approx(2.0 / 3.0)


def test_hsic1_is_shift_invariant_for_linear_kernels():
    # Why MinibatchCKA may center each chunk without changing the estimate.
    rng = np.random.default_rng(8)
    X, Y = rng.normal(size=(9, 4)), rng.normal(size=(9, 3))
    Xs, Ys = X + rng.normal(size=4) * 5, Y - 3.0
    assert hsic1(Xs @ Xs.T, Ys @ Ys.T) == pytest.approx(hsic1(X @ X.T, Y @ Y.T), rel=1e-9)


def test_hsic1_rejects_too_few_samples():
    with pytest.raises(ValueError, match="n >= 4"):
        hsic1(np.eye(3), np.eye(3))


def test_single_minibatch_equals_direct_hsic_ratio():
    rng = np.random.default_rng(1)
    features = related_features(rng, 40, [3, 50, 12, 40])
    grams = [x @ x.T for x in features]
    hsic = np.array([[hsic1(a, b) for b in grams] for a in grams])
    acc = MinibatchCKA(4)
    acc.update(features)
    np.testing.assert_allclose(acc.hsic_sums(), hsic, rtol=1e-10, atol=1e-9)
    expected = hsic / np.sqrt(np.outer(np.diag(hsic), np.diag(hsic)))
    np.testing.assert_allclose(acc.result(), np.clip(expected, 0, 1), rtol=1e-10, atol=1e-12)
    assert acc.n_samples == 40 and acc.minibatches == 1 and acc.pairs_seen == 40 * 39 // 2


def test_sum_over_minibatches():
    rng = np.random.default_rng(2)
    first, second = related_features(rng, 30, [5, 8]), related_features(rng, 25, [5, 8])
    acc = MinibatchCKA(2)
    acc.update(first)
    acc.update(second)
    sums = sum(np.array([[hsic1(a @ a.T, b @ b.T) for b in batch] for a in batch]) for batch in (first, second))
    np.testing.assert_allclose(acc.hsic_sums(), sums, rtol=1e-10)
    assert acc.result()[0, 1] == pytest.approx(sums[0, 1] / np.sqrt(sums[0, 0] * sums[1, 1]))


def test_large_batch_approaches_linear_cka():
    rng = np.random.default_rng(3)
    features = related_features(rng, 4000, [6, 20, 9])
    minibatch = cka_of(features, chunk_size=1000)
    full = np.array([[linear_cka(a, b) for b in features] for a in features])
    np.testing.assert_allclose(minibatch, full, atol=0.02)


def test_linear_cka_hand_values():
    x = np.arange(6.0).reshape(-1, 1)
    assert linear_cka(x, 3 * x + 1) == pytest.approx(1.0)
    # Orthogonal centered columns carry unrelated information.
    X = np.array([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    assert linear_cka(X[:, :1], X[:, 1:]) == pytest.approx(0.0)
    assert linear_cka(np.ones((5, 3)), np.random.default_rng(0).normal(size=(5, 2))) == 0.0
    # The Gram path (d > n) and the feature path agree.
    rng = np.random.default_rng(4)
    A, B = rng.normal(size=(6, 30)), rng.normal(size=(6, 40))
    gram = np.sum(((A - A.mean(0)) @ (A - A.mean(0)).T) * ((B - B.mean(0)) @ (B - B.mean(0)).T))
    norms = np.linalg.norm((A - A.mean(0)).T @ (A - A.mean(0))) * np.linalg.norm((B - B.mean(0)).T @ (B - B.mean(0)))
    assert linear_cka(A, B) == pytest.approx(gram / norms)


def test_chunking_splits_a_big_batch_into_near_equal_minibatches():
    rng = np.random.default_rng(5)
    features = related_features(rng, 1001, [7, 3])
    whole = MinibatchCKA(2, chunk_size=400)
    whole.update(features)
    assert whole.minibatches == 3
    by_hand = MinibatchCKA(2, chunk_size=400)
    for start, stop in [(0, 334), (334, 667), (667, 1001)]:
        by_hand.update([x[start:stop] for x in features])
    np.testing.assert_array_equal(whole.hsic_sums(), by_hand.hsic_sums())


def test_small_batches_are_carried_over():
    rng = np.random.default_rng(6)
    features = related_features(rng, 12, [4, 5])
    acc = MinibatchCKA(2)
    acc.update([x[:2] for x in features])
    assert acc.minibatches == 0 and acc.n_samples == 0
    with pytest.raises(UserError, match="at least 4 calibration samples, got 2"):
        acc.result()
    acc.update([x[2:12] for x in features])
    reference = MinibatchCKA(2)
    reference.update(features)
    np.testing.assert_array_equal(acc.hsic_sums(), reference.hsic_sums())
    acc.update([x[:3] for x in features])  # a final carry < 4 is ignored
    np.testing.assert_array_equal(acc.result(), reference.result())


def test_update_rejects_mismatched_inputs():
    acc = MinibatchCKA(2)
    with pytest.raises(ValueError, match="expected 2"):
        acc.update([np.zeros((5, 2))])
    with pytest.raises(ValueError, match="same number of samples"):
        acc.update([np.zeros((5, 2)), np.zeros((6, 2))])
    with pytest.raises(ValueError, match="2-D"):
        acc.update([np.zeros(5), np.zeros((5, 2))])


def test_nonfinite_values_are_zeroed_and_counted():
    rng = np.random.default_rng(7)
    features = related_features(rng, 20, [4, 6])
    dirty = [x.copy() for x in features]
    dirty[0][3, 1] = np.nan
    dirty[1][5, 0] = np.inf
    dirty[1][6, 2] = -np.inf
    clean = [x.copy() for x in features]
    clean[0][3, 1] = clean[1][5, 0] = clean[1][6, 2] = 0.0
    acc = MinibatchCKA(2)
    acc.update(dirty)
    assert acc.nonfinite_values == 3
    np.testing.assert_array_equal(acc.result(), cka_of(clean))


widths = st.lists(st.integers(1, 24), min_size=2, max_size=4)


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(4, 20), dims=widths)
def test_cka_matrix_properties(seed, n, dims):
    rng = np.random.default_rng(seed)
    cka = cka_of(related_features(rng, n, dims), chunk_size=16)
    assert np.isfinite(cka).all()
    np.testing.assert_array_equal(cka, cka.T)
    np.testing.assert_array_equal(np.diag(cka), 1.0)
    assert ((cka >= 0) & (cka <= 1)).all()


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(4, 20), dims=widths)
def test_gram_and_feature_forms_agree(seed, n, dims):
    features = related_features(np.random.default_rng(seed), n, dims)
    results = {}
    for form in ("gram", "features", "auto"):
        acc = MinibatchCKA(len(dims), form=form, chunk_size=16)
        acc.update(features)
        results[form] = acc.hsic_sums()
    scale = np.abs(results["gram"]).max()
    np.testing.assert_allclose(results["features"], results["gram"], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(results["auto"], results["gram"], rtol=0, atol=1e-10 * scale)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(8, 30),
    dims=widths,
    scales=st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4),
)
def test_cka_invariant_to_scaling_rotation_and_translation(seed, n, dims, scales):
    rng = np.random.default_rng(seed)
    features = related_features(rng, n, dims)
    transformed = []
    for x, c in zip(features, scales):
        q, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
        transformed.append(c * x @ q + rng.normal(size=x.shape[1]))
    np.testing.assert_allclose(cka_of(transformed), cka_of(features), atol=1e-7)


@FAST
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(4, 12), min_size=1, max_size=4))
def test_batches_that_match_the_chunks_give_identical_sums(seed, sizes):
    rng = np.random.default_rng(seed)
    features = related_features(rng, sum(sizes), [3, 9])
    whole = MinibatchCKA(2, chunk_size=8)
    stepwise = MinibatchCKA(2, chunk_size=8)
    start = 0
    for size in sizes:
        batch = [x[start:start + size] for x in features]
        whole.update(batch)
        # The same batch fed in the chunks MinibatchCKA would cut it into.
        n_chunks = -(-size // 8)
        edges = np.linspace(0, size, n_chunks + 1).round().astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            stepwise.update([x[a:b] for x in batch])
        start += size
    np.testing.assert_array_equal(whole.hsic_sums(), stepwise.hsic_sums())
    assert whole.n_samples == sum(sizes)


special = st.sampled_from([0.0, 1.0, -1.0, 1e-30, 1e-300, 1e30, np.nan, np.inf, -np.inf])
dirty_arrays = hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=4, max_side=9),
                          elements=st.one_of(special, st.floats(-10, 10)))


@FAST
@given(x=dirty_arrays, seed=st.integers(0, 2**32 - 1), form=st.sampled_from(["gram", "features"]))
def test_no_nan_on_constant_tiny_huge_or_nonfinite_inputs(x, seed, form):
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    features = [x, np.full((n, 3), 0.1), np.zeros((n, 2)), rng.normal(size=(n, 5)) * 1e-30, rng.normal(size=(n, 2)),
                np.zeros((n, 0))]
    cka = cka_of(features, form=form)
    assert np.isfinite(cka).all()
    assert ((cka >= 0) & (cka <= 1)).all()
    np.testing.assert_array_equal(np.diag(cka), 1.0)
    # A constant or all-zero unit carries no information about the others.
    for constant in (1, 2, 5):
        assert (np.delete(cka[constant], constant) == 0).all()


def test_mean_cosine_distance_hand_values():
    acc = MeanCosineDistance(2)
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    same = x.copy()
    # Row distances: orthogonal 1, opposite 2, parallel 0, zero vs non-zero 1.
    other = np.array([[0.0, 5.0], [0.0, -1.0], [6.0, 8.0], [1.0, 1.0]])
    acc.update([x, x], [same, other])
    acc.update([np.zeros((1, 2)), np.ones((1, 2))], [np.zeros((1, 2)), np.ones((1, 2)) * 1e-300])
    np.testing.assert_allclose(acc.result(), [0.0 / 5, 4.0 / 5])
    assert acc.n_samples == 5


@FAST
@given(x=dirty_arrays, seed=st.integers(0, 2**32 - 1))
def test_mean_cosine_distance_is_finite_and_in_range(x, seed):
    y = np.random.default_rng(seed).normal(size=x.shape)
    acc = MeanCosineDistance(2)
    acc.update([x, y], [y, x * 1e200])
    result = acc.result()
    assert np.isfinite(result).all() and ((result >= 0) & (result <= 2)).all()
    assert acc.nonfinite_values == 2 * np.count_nonzero(~np.isfinite(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_mean_cosine_distance_of_narrow_floats_equals_the_scaled_float64_one(dtype):
    # float32/float16 rows are summed in float64 unscaled: the same distances as
    # the scaled float64 path, at the largest and smallest magnitudes the type has.
    rng = np.random.default_rng(3)
    big, small = np.finfo(dtype).max / 4, float(np.finfo(dtype).smallest_subnormal)
    x = rng.normal(size=(6, 40)).astype(dtype)
    y = (x + rng.normal(size=x.shape)).astype(dtype)
    x[1] *= dtype(big / 8)
    y[2] = np.where(rng.random(40) < 0.5, small, 0.0).astype(dtype)
    x[3] = y[3] = 0  # both zero: distance 0
    x[4] = 0  # zero against non-zero: distance 1
    narrow, wide = MeanCosineDistance(1), MeanCosineDistance(1)
    narrow.update([x], [y])
    wide.update([x.astype(np.float64)], [y.astype(np.float64)])
    assert np.isfinite(narrow.result()).all()
    np.testing.assert_allclose(narrow.result(), wide.result(), rtol=1e-12)
    assert narrow.nonfinite_values == 0


def test_mean_cosine_distance_needs_samples():
    with pytest.raises(UserError, match="at least one calibration sample"):
        MeanCosineDistance(1).result()


def test_wide_units_in_column_blocks_float32_and_inputs_untouched(monkeypatch):
    import sglp_onnx.evidence.similarity as similarity

    rng = np.random.default_rng(9)
    features = related_features(rng, 12, [10, 7, 3])
    features[0][2, 4] = np.nan
    originals = [x.copy() for x in features]
    reference = MinibatchCKA(3, form="features")
    reference.update(features)
    monkeypatch.setattr(similarity, "GRAM_COLUMN_BLOCK", 3)
    blocked = MinibatchCKA(3, form="gram")
    blocked.update(features)
    np.testing.assert_allclose(blocked.hsic_sums(), reference.hsic_sums(), rtol=1e-10)
    for x, original in zip(features, originals):
        np.testing.assert_array_equal(x, original)
    single = MinibatchCKA(3)
    single.update([x.astype(np.float32) for x in features])
    assert single.nonfinite_values == 1
    np.testing.assert_allclose(single.result(), reference.result(), atol=1e-5)
