"""GUIE's mean Precision@5, with exact Euclidean k-NN from faiss, searched in blocks of
queries, and an approximate faiss index with its neighbour recall for indexes too large
for exact search.

For a query q with n_q index images of its class,
    P(q) = 1 / min(n_q, k) * sum_{j <= min(n_q, k)} rel_q(j)
so a query with 2 relevant images is scored on its first 2 results only,
and is not penalised for the 3 it could never fill. mP@k is the mean of P(q).
"""

from __future__ import annotations

import faiss
import numpy as np


QUERY_BLOCK = 16384  # queries searched at once: 16384 x 64-d float32 is 4 MiB


def query_blocks(n_queries: int, dim: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of queries, each searched by one faiss call, chosen so that every
    query goes through the same faiss kernel, on the same tile of queries, as in one call
    over all queries; results, ties included, are then the same bits.

    faiss's flat search computes distances a tile of `distance_compute_blas_query_bs`
    queries at a time (BLAS), or query by query when a call has fewer than
    `distance_compute_blas_threshold / dim` queries. So a block is a multiple of the tile
    and large enough for BLAS, and a last block too small for BLAS joins the one before.
    """
    if block < 1:
        raise ValueError(f"query block must be >= 1, got {block}")
    tile = max(int(faiss.cvar.distance_compute_blas_query_bs), 1)
    blas_min = -(-int(faiss.cvar.distance_compute_blas_threshold) // max(dim, 1))
    block = -(-max(block, blas_min) // tile) * tile
    starts = list(range(0, n_queries, block))
    if len(starts) > 1 and n_queries - starts[-1] < blas_min:
        starts.pop()  # too few for BLAS alone: with the previous block, as one call has them
    return [(a, b) for a, b in zip(starts, starts[1:] + [n_queries])]


def knn(index_emb: np.ndarray, query_emb: np.ndarray, k: int,
        block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest index rows (squared L2 distances, row ids) for each query.

    The queries are searched `block` at a time (rounded as `query_blocks` says), so only
    one block is converted to float32 at a time and faiss's scratch space stays that of
    one block, whatever the number of queries. The index rows are searched where they
    lie (`faiss.knn`, the kernel `IndexFlatL2.search` runs), not copied into an index:
    a float32 index costs no memory beyond itself.
    """
    index_emb = np.ascontiguousarray(index_emb, dtype=np.float32)
    k = min(k, len(index_emb))
    distances = np.empty((len(query_emb), k), dtype=np.float32)
    ids = np.empty((len(query_emb), k), dtype=np.int64)
    for a, b in query_blocks(len(query_emb), index_emb.shape[1], block):
        distances[a:b], ids[a:b] = faiss.knn(
            np.ascontiguousarray(query_emb[a:b], dtype=np.float32), index_emb, k)
    return distances, ids


def search_blocks(index: faiss.Index, query_emb: np.ndarray, k: int,
                  block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` over the queries a block at a time, into one [Q, k] result."""
    distances = np.empty((len(query_emb), k), dtype=np.float32)
    ids = np.empty((len(query_emb), k), dtype=np.int64)
    for a, b in query_blocks(len(query_emb), index.d, block):
        distances[a:b], ids[a:b] = index.search(
            np.ascontiguousarray(query_emb[a:b], dtype=np.float32), k)
    return distances, ids


def approximate_index(index_emb: np.ndarray, factory: str, search_params: str) -> faiss.Index:
    """A faiss index built from a factory string ("HNSW32,Flat", "IVF1024,Flat"), trained
    if it needs it and filled with `index_emb`, searching with `search_params`
    ("efSearch=128", "nprobe=32"). faiss draws k-means samples and HNSW levels from fixed
    seeds: on one thread, reruns give the same index."""
    emb = np.ascontiguousarray(index_emb, dtype=np.float32)
    index = faiss.index_factory(emb.shape[1], factory)
    nlist = getattr(faiss.try_extract_index_ivf(index), "nlist", 0)
    if len(emb) < nlist:
        raise ValueError(f"approximate index {factory!r} has {nlist} lists but the index has "
                         f"{len(emb)} images; use fewer lists or raise evaluate.exact_max_index")
    index.train(emb)
    index.add(emb)
    faiss.ParameterSpace().set_index_parameters(index, search_params)
    return index


def neighbour_recall(approximate_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Recall@k of approximate search: the mean fraction of each query's exact top k
    that the approximate top k also holds."""
    if len(exact_ids) == 0:
        raise ValueError("neighbour recall needs at least one query")
    found = [len(set(a[:k].tolist()) & set(e[:k].tolist())) / min(k, len(e))
             for a, e in zip(approximate_ids, exact_ids)]
    return float(np.mean(found))


def precision_at_k(retrieved_labels: np.ndarray, query_labels: np.ndarray,
                   index_labels: np.ndarray, k: int = 5) -> np.ndarray:
    """Per-query P@k (GUIE definition) from the labels of each query's ranked results.

    `retrieved_labels` is [Q, >=k'] in rank order. Queries whose class has no
    index image are undefined under the metric and get NaN.
    """
    classes, counts = np.unique(index_labels, return_counts=True)
    n_rel = np.zeros(len(query_labels), dtype=np.int64)
    pos = np.searchsorted(classes, query_labels)
    found = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == query_labels)
    n_rel[found] = counts[pos[found]]
    depth = np.minimum(n_rel, k)
    hits = retrieved_labels[:, :k] == query_labels[:, None]
    within = np.arange(hits.shape[1])[None, :] < depth[:, None]
    scores = (hits & within).sum(axis=1) / np.maximum(depth, 1)
    return np.where(depth > 0, scores, np.nan)


def mean_precision_at_k(index_emb: np.ndarray, index_labels: np.ndarray, query_emb: np.ndarray,
                        query_labels: np.ndarray, k: int = 5, depth: int = 0,
                        ) -> tuple[float, np.ndarray, np.ndarray]:
    """(mP@k, per-query P@k, neighbour ids) under exact Euclidean k-NN; ids go
    `max(k, depth)` deep."""
    _, ids = knn(index_emb, query_emb, max(k, depth))
    per_query = precision_at_k(index_labels[ids], query_labels, index_labels, k)
    return float(np.nanmean(per_query)), per_query, ids


def precision_recall_curves(neighbours: np.ndarray, query_labels: np.ndarray,
                            index_labels: np.ndarray, max_k: int = 10,
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Mean P@k and recall@k for k = 1..max_k from ranked neighbour ids.

    P@k here is the plain fraction of relevant results in the top k (the
    curve people read), recall@k the fraction of a query's relevant index
    images found in the top k. Queries with no relevant image are left out.
    """
    classes, counts = np.unique(index_labels, return_counts=True)
    n_rel = dict(zip(classes.tolist(), counts.tolist()))
    rel_counts = np.array([n_rel.get(int(q), 0) for q in query_labels])
    keep = rel_counts > 0
    hits = (index_labels[neighbours[:, :max_k]] == query_labels[:, None])[keep]
    cum = np.cumsum(hits, axis=1)
    ks = np.arange(1, hits.shape[1] + 1)
    return (cum / ks).mean(axis=0), (cum / rel_counts[keep, None]).mean(axis=0)


# ------------------------------------------------------------------ intervals
#
# Queries of one class are not independent (they are views of one object and
# share its index images), so the unit that is resampled is the query class:
# each resample draws as many classes as were scored, with replacement, and
# takes all their queries. The interval is the percentile interval of mP@k.

BOOTSTRAP_CHUNK = 256  # resamples drawn at once: bounds memory to 256 x classes


def _class_bootstrap(values: np.ndarray, query_classes: np.ndarray, resamples: int, seed: int,
                     level: float) -> tuple[float, float, float]:
    """(mean, low, high) of per-query `values`, resampling their classes."""
    _, inverse = np.unique(query_classes, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    sums = np.bincount(inverse, weights=values)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        size = (min(BOOTSTRAP_CHUNK, resamples - start), len(counts))
        draws = rng.integers(0, len(counts), size=size)
        means[start:start + len(draws)] = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(values.mean()), float(low), float(high)


def bootstrap_interval(per_query: np.ndarray, query_classes: np.ndarray, resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean P@k of the scored queries and its class-bootstrap interval.

    Queries whose class has no index image (NaN) are left out; with no scored
    query at all the result is undefined and a ValueError says so.
    """
    scored = ~np.isnan(per_query)
    if not scored.any():
        raise ValueError("no query has a relevant index image: mP@k is undefined")
    classes = np.asarray(query_classes)[scored]
    return _class_bootstrap(per_query[scored], classes, resamples, seed, level)


def paired_bootstrap_difference(a: np.ndarray, b: np.ndarray, query_classes: np.ndarray,
                                resamples: int = 2000, seed: int = 0, level: float = 0.95,
                                ) -> tuple[float, float, float]:
    """(mean(a - b), low, high) over the queries both lines scored, with the same
    resampled classes for both lines, so what the two lines share cancels out."""
    scored = ~(np.isnan(a) | np.isnan(b))
    if not scored.any():
        raise ValueError("no query has a relevant index image: the difference is undefined")
    diff = a[scored] - b[scored]
    return _class_bootstrap(diff, np.asarray(query_classes)[scored], resamples, seed, level)
