"""mP@5 against an independent brute-force reference, including n_q < 5 and ties."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from tasks.metrics import (approximate_index, bootstrap_interval, knn, mean_precision_at_k,
                           neighbour_recall, paired_bootstrap_difference, precision_at_k,
                           query_blocks)


def brute_force_map(index_emb, index_labels, query_emb, query_labels, k=5):
    """GUIE mP@k written from the definition: sort all index images by distance, one query
    at a time."""
    scores = []
    for q, ql in zip(query_emb, query_labels):
        d = ((index_emb - q) ** 2).sum(axis=1)
        order = sorted(range(len(d)), key=lambda i: (d[i], i))
        n_q = int((index_labels == ql).sum())
        depth = min(n_q, k)
        scores.append(sum(index_labels[i] == ql for i in order[:depth]) / depth)
    return float(np.mean(scores))


def test_matches_brute_force_on_seeded_random_features():
    rng = np.random.default_rng(0)
    for trial in range(5):
        # few images per class so many queries have n_q < 5
        index_labels = rng.integers(0, 12, size=60)
        query_labels = rng.choice(np.unique(index_labels), size=40)
        index_emb = rng.normal(size=(60, 8)).astype(np.float32) + index_labels[:, None] * 0.3
        query_emb = rng.normal(size=(40, 8)).astype(np.float32) + query_labels[:, None] * 0.3
        ours, per_query, _ = mean_precision_at_k(index_emb, index_labels, query_emb,
                                                 query_labels, k=5)
        assert abs(ours - brute_force_map(index_emb, index_labels, query_emb, query_labels)) < 1e-6
        counts = np.array([(index_labels == q).sum() for q in query_labels])
        assert (counts < 5).any(), "the test must cover n_q < 5"


def test_small_class_scored_on_its_first_n_q_results_only():
    # class 7 has 2 index images; both retrieved first -> P = 1, whatever ranks 3..5 hold
    retrieved = np.array([[7, 7, 1, 1, 1], [7, 1, 7, 1, 1]])
    index_labels = np.array([7, 7, 1, 1, 1, 1])
    p = precision_at_k(retrieved, np.array([7, 7]), index_labels, k=5)
    assert p.tolist() == [1.0, 0.5]


def test_ties_with_equal_distances():
    # Four index points at the same place: every ordering of them is a tie.
    index_emb = np.zeros((6, 2), np.float32)
    index_emb[4:] = 10.0
    index_labels = np.array([3, 3, 3, 3, 9, 9])
    query = np.zeros((1, 2), np.float32)
    m, _, ids = mean_precision_at_k(index_emb, index_labels, query, np.array([3]), k=5)
    assert set(ids[0, :4]) == {0, 1, 2, 3} and m == 1.0  # n_q = 4: the 5th rank doesn't count
    assert m == brute_force_map(index_emb, index_labels, query, np.array([3]))
    # a tie that straddles the cut: 2 of 4 tied images are relevant, n_q = 2 -> any order
    # scores 0.5 or 1
    labels2 = np.array([3, 5, 3, 5, 9, 9])
    m2, _, _ = mean_precision_at_k(index_emb, labels2, query, np.array([3]), k=5)
    assert m2 in (0.0, 0.5, 1.0)
    assert m2 == brute_force_map(index_emb, labels2, query, np.array([3]))


def test_knn_is_exact():
    rng = np.random.default_rng(1)
    x, q = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    d, ids = knn(x, q, 5)
    ref = np.argsort(((q[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, :5]
    assert (ids == ref).all()


def test_precision_and_recall_curves_against_brute_force():
    from tasks.metrics import precision_recall_curves

    rng = np.random.default_rng(3)
    index_labels = rng.integers(0, 6, size=40)
    query_labels = rng.choice(np.unique(index_labels), size=15)
    neighbours = np.stack([rng.permutation(40)[:10] for _ in range(15)])
    precision, recall = precision_recall_curves(neighbours, query_labels, index_labels, 10)
    for k in (1, 5, 10):
        p = np.mean([np.mean(index_labels[n[:k]] == q) for n, q in zip(neighbours, query_labels)])
        r = np.mean([np.sum(index_labels[n[:k]] == q) / np.sum(index_labels == q)
                     for n, q in zip(neighbours, query_labels)])
        assert precision[k - 1] == pytest.approx(p) and recall[k - 1] == pytest.approx(r)
    assert np.all(np.diff(recall) >= 0)


# ------------------------------------------------------------------ intervals


def per_class_scores(classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query P@5 values that vary a lot between classes and less within one."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.2, 1.0, size=classes)
    ids = np.repeat(np.arange(classes), per_class)
    values = np.clip(level[ids] + rng.normal(0, 0.1, size=len(ids)), 0, 1)
    return values, ids


def test_bootstrap_interval_matches_scipy_over_classes():
    """scipy's bootstrap, resampling (class sum, class count) pairs with the ratio of sums as
    the statistic, is an independent reference for resampling query classes."""
    from scipy.stats import bootstrap

    values, ids = per_class_scores(40, 7, 0)
    values[ids == 3] = values[ids == 3][:1].repeat(7)  # any shape of class works
    mean, low, high = bootstrap_interval(values, ids, resamples=20000, seed=1)
    sums = np.bincount(ids, weights=values)
    counts = np.bincount(ids).astype(float)
    ref = bootstrap((sums, counts), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True,
                    vectorized=True, n_resamples=20000, method="percentile", random_state=2)
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.004)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.004)


def test_bootstrap_resamples_classes_not_queries():
    """Ten identical queries per class are one class's worth of evidence: the interval must be
    as wide as with one query per class, far wider than if queries were resampled."""
    values, ids = per_class_scores(30, 1, 3)
    _, low1, high1 = bootstrap_interval(values, ids, resamples=4000)
    _, low10, high10 = bootstrap_interval(np.repeat(values, 10), np.repeat(ids, 10), resamples=4000)
    assert high10 - low10 == pytest.approx(high1 - low1, rel=0.1)


def test_bootstrap_leaves_out_unscored_queries_and_refuses_none():
    values, ids = per_class_scores(10, 4, 5)
    with_nan = np.concatenate([values, [np.nan, np.nan]])
    mean, _, _ = bootstrap_interval(with_nan, np.concatenate([ids, [99, 99]]))
    assert mean == pytest.approx(values.mean())
    with pytest.raises(ValueError, match="no query has a relevant index image"):
        bootstrap_interval(np.array([np.nan, np.nan]), np.array([1, 2]))


def test_paired_difference():
    a, ids = per_class_scores(25, 6, 7)
    # the same line against itself: exactly zero, not significant
    assert paired_bootstrap_difference(a, a, ids) == (0.0, 0.0, 0.0)
    # a constant gain shows as that gain with a zero-width interval, however noisy the classes
    diff, low, high = paired_bootstrap_difference(a + 0.05, a, ids)
    assert (diff, low, high) == pytest.approx((0.05, 0.05, 0.05))
    # pairing matters: the unpaired intervals of two lines overlap, the paired one excludes 0
    b = a - 0.03 + np.random.default_rng(8).normal(0, 0.01, size=len(a))
    _, a_low, _ = bootstrap_interval(a, ids)
    _, _, b_high = bootstrap_interval(b, ids)
    _, low, _ = paired_bootstrap_difference(a, b, ids)
    assert a_low < b_high and low > 0


def brute_force_neighbours(index_emb: np.ndarray, query_emb: np.ndarray, k: int) -> np.ndarray:
    """Ids of each query's k nearest index rows by float64 numpy distances, ties to the lower
    id (a stable sort), as faiss's result heaps break them."""
    return np.argsort(squared_distances(index_emb, query_emb), axis=1, kind="stable")[:, :k]


def squared_distances(index_emb: np.ndarray, query_emb: np.ndarray) -> np.ndarray:
    """[Q, N] squared Euclidean distances in float64 (exact for small integer features)."""
    x, q = index_emb.astype(np.float64), query_emb.astype(np.float64)
    return (q ** 2).sum(1)[:, None] + (x ** 2).sum(1)[None, :] - 2 * q @ x.T


def test_blocked_knn_equals_one_call_and_brute_force_ties_included():
    # Integer features: every distance is exact in float32 and many are tied, so blocked,
    # one-call and brute-force search must agree id for id, ties included. 10,292 queries
    # of 64-d: three blocks of 4096 queries (the faiss tile), the last 2,100.
    rng = np.random.default_rng(3)
    index_emb = rng.integers(0, 3, size=(150, 64)).astype(np.float32)
    query_emb = rng.integers(0, 3, size=(4096 * 2 + 2100, 64)).astype(np.float32)
    assert len(query_blocks(len(query_emb), 64, 4096)) == 3
    dist, ids = knn(index_emb, query_emb, 10, block=4096)
    flat = faiss.IndexFlatL2(64)  # one search over all queries, as knn did before blocks
    flat.add(index_emb)
    one_dist, one_ids = flat.search(query_emb, 10)
    assert np.array_equal(ids, one_ids) and np.array_equal(dist, one_dist)
    rng_emb = rng.normal(size=(300, 64)).astype(np.float32)  # no ties: distances to the bit
    rng_query = rng.normal(size=(4096 + 2100, 64))  # float64: converted a block at a time
    flat = faiss.IndexFlatL2(64)
    flat.add(rng_emb)
    one_dist, one_ids = flat.search(rng_query.astype(np.float32), 10)
    rng_dist, rng_ids = knn(rng_emb, rng_query, 10, block=4096)
    assert np.array_equal(rng_ids, one_ids) and np.array_equal(rng_dist, one_dist)
    expected = brute_force_neighbours(index_emb, query_emb, 10)
    assert np.array_equal(ids, expected)
    tied = np.sort(squared_distances(index_emb, query_emb), axis=1)
    assert (tied[:, 9] == tied[:, 10]).mean() > 0.1, "the test must cover ties at the cut"


def test_query_blocks_cover_every_query_in_whole_faiss_tiles():
    tile = faiss.cvar.distance_compute_blas_query_bs
    blas_min = -(-faiss.cvar.distance_compute_blas_threshold // 64)
    for n in (0, 1, 500, tile, tile + 1, 3 * tile + blas_min, 3 * tile + blas_min - 1, 10**5):
        blocks = query_blocks(n, 64, 1)
        assert [a for a, _ in blocks[1:]] == [b for _, b in blocks[:-1]]
        assert (blocks[0][0], blocks[-1][1]) == (0, n) if n else blocks == []
        assert all(a % tile == 0 for a, _ in blocks)
        assert all(b - a >= blas_min for a, b in blocks) or len(blocks) == 1
    with pytest.raises(ValueError, match="query block"):
        query_blocks(10, 64, 0)


def test_approximate_recall_against_brute_force():
    # Clustered data (200 classes x 20 images, 16-d): IVF with some lists not probed misses
    # some true neighbours; the code's recall must equal a brute-force count of them.
    from conftest import clusters
    index, query = clusters(range(200), 20, 16, seed=1), clusters(range(200), 2, 16, seed=2)
    ivf = approximate_index(index.embeddings, "IVF32,Flat", "nprobe=2")
    _, approx = ivf.search(query.embeddings, 5)
    exact = brute_force_neighbours(index.embeddings, query.embeddings, 5)
    expected = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx.tolist(),
                                                                 exact.tolist())])
    recall = neighbour_recall(approx, exact, 5)
    assert recall == pytest.approx(expected) and 0.3 < recall < 1.0
    with pytest.raises(ValueError, match="32 lists"):
        approximate_index(index.embeddings[:20], "IVF32,Flat", "nprobe=2")
