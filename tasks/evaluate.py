"""Score every model line on held-out classes: zero-shot PCA-64 baselines and the trained head.

The baselines follow the 4th-place zero-shot recipe: L2-normalise, PCA to 64
fitted on the train split, L2-normalise again. Each class group (validation
classes, test classes) is scored on its own: its queries against its own
index, so the two groups never see each other. Scores are reported overall
and per source of the query, each with a class-bootstrap interval.

Neighbours come from exact search while a group's index has at most
`evaluate.exact_max_index` images, and from an approximate faiss index beyond it; then
the approximate neighbours' recall@k against exact search, on a seeded sample of
queries, is reported beside the line's mP@k, so a score is never read without knowing
how much of it the search may have cost.
"""

from __future__ import annotations

from typing import Callable

import faiss
import numpy as np

from tasks.features import GroupData, l2_normalize
from tasks.metrics import (approximate_index, bootstrap_interval, knn, neighbour_recall,
                           paired_bootstrap_difference, precision_at_k, precision_recall_curves,
                           search_blocks)
from tasks.params.evaluate import EvaluateParams

Embed = Callable[[np.ndarray], np.ndarray]
CURVE_K = 10  # P@k and recall@k are reported for k = 1..10
ZERO_SHOT = "zero_shot_"  # prefix of the baseline lines' names


def fit_pca(train: np.ndarray, dim: int) -> Embed:
    """PCA to `dim` fitted on `train` (faiss), followed by L2 normalisation."""
    if len(train) < dim:
        raise ValueError(f"PCA to {dim} needs >= {dim} train images, got {len(train)}; "
                         "lower evaluate.pca_dim")
    pca = faiss.PCAMatrix(train.shape[1], dim)
    pca.train(np.ascontiguousarray(l2_normalize(train), dtype=np.float32))
    return lambda x: l2_normalize(pca.apply(np.ascontiguousarray(l2_normalize(x),
                                                                 dtype=np.float32)))


def _interval(per_query: np.ndarray, classes: np.ndarray, params: EvaluateParams) -> dict:
    mean, low, high = bootstrap_interval(per_query, classes, params.bootstrap_resamples,
                                         params.seed, params.confidence)
    return {f"mP@{params.k}": round(mean, 4), "low": round(low, 4), "high": round(high, 4)}


def search_neighbours(index_emb: np.ndarray, query_emb: np.ndarray, depth: int,
                      params: EvaluateParams) -> tuple[np.ndarray, dict]:
    """Neighbour ids [Q, depth] of each query and how they were found: exact search while
    the index has at most `exact_max_index` images; beyond, the approximate index, with
    its recall@k against exact search on `recall_queries` queries drawn with `seed`."""
    if len(index_emb) <= params.exact_max_index:
        return knn(index_emb, query_emb, depth, params.query_block)[1], {"search": "exact"}
    index = approximate_index(index_emb, params.approximate_index, params.approximate_search)
    ids = search_blocks(index, query_emb, min(depth, len(index_emb)), params.query_block)[1]
    short = int((ids < 0).any(axis=1).sum())
    if short:  # faiss pads with -1, which numpy would read as the last index image
        raise ValueError(f"the approximate index found fewer than {ids.shape[1]} neighbours "
                         f"for {short} queries: search wider (evaluate.approximate_search, "
                         "e.g. a larger efSearch or nprobe) or raise evaluate.exact_max_index")
    rng = np.random.default_rng(params.seed)
    sample = np.sort(rng.choice(len(query_emb), min(params.recall_queries, len(query_emb)),
                                replace=False))
    exact = knn(index_emb, query_emb[sample], params.k, params.query_block)[1]
    return ids, {"search": "approximate", "index": params.approximate_index,
                 "setting": params.approximate_search, "recall_queries": len(sample),
                 f"recall@{params.k}": round(neighbour_recall(ids[sample], exact, params.k), 4)}


def score_line(embed: Embed, data: GroupData, params: EvaluateParams) -> dict:
    """mP@k with its interval overall and per query source, the per-query scores,
    the neighbour ids and the P@k / recall@k curves, for one line on one group; beside
    the overall mP@k, how the neighbours were searched (and, if approximately, their
    recall@k against exact search)."""
    q_emb, i_emb = embed(data.query.embeddings), embed(data.index.embeddings)
    if q_emb.shape[1] > 64:
        raise ValueError(f"embedding dim {q_emb.shape[1]} > 64: GUIE caps embeddings at 64")
    ids, search = search_neighbours(i_emb, q_emb, max(params.k, CURVE_K), params)
    per_query = precision_at_k(data.index.class_ids[ids], data.query.class_ids,
                               data.index.class_ids, params.k)
    classes, sources = data.query.class_ids, np.asarray(data.sources)
    scores = {"all": {**_interval(per_query, classes, params), **search}}
    for source in sorted(set(data.sources)):
        mine = sources == source
        if not np.isnan(per_query[mine]).all():  # a source with no scorable query has no score
            scores[source] = _interval(per_query[mine], classes[mine], params)
    precision, recall = precision_recall_curves(ids, data.query.class_ids, data.index.class_ids,
                                                CURVE_K)
    return {"scores": scores, "per_query": per_query, "neighbours": ids,
            "precision": precision, "recall": recall}


def group_summary(data: GroupData, results: dict[str, dict], reference: str,
                  params: EvaluateParams) -> dict:
    """One group's counts, every line's scores and the head's paired gain over `reference`.

    `queries` counts the scored queries only; queries whose class has no
    index image in the group (its index images were rejected at shard time,
    say) are counted apart, per source, and never enter a mean.
    """
    unmatched = np.isnan(results["head"]["per_query"])
    sources = np.asarray(data.sources)
    diff, low, high = paired_bootstrap_difference(
        results["head"]["per_query"], results[reference]["per_query"], data.query.class_ids,
        params.bootstrap_resamples, params.seed, params.confidence)
    return {
        "classes": int(len(np.unique(data.query.class_ids[~unmatched]))),
        "queries": int((~unmatched).sum()),
        "queries_without_match": int(unmatched.sum()),
        "queries_without_match_per_source": {s: int((unmatched & (sources == s)).sum())
                                             for s in sorted(set(data.sources))},
        "index": len(data.index.keys),
        "lines": {name: r["scores"] for name, r in results.items()},
        "head_minus_reference": {"reference": reference, "difference": round(diff, 4),
                                 "low": round(low, 4), "high": round(high, 4),
                                 "significant": bool(low > 0 or high < 0)},
    }


def best_zero_shot(validation: dict[str, dict], k: int) -> str:
    """The zero-shot line with the best mP@k on the validation classes (never on test)."""
    zero = {name: r["scores"]["all"][f"mP@{k}"] for name, r in validation.items()
            if name.startswith(ZERO_SHOT)}
    return max(sorted(zero), key=lambda name: zero[name])
