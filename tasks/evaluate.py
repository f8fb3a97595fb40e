"""Score every model line on the held-out classes: zero-shot PCA-64 baselines and the trained head.

The baselines follow the 4th-place zero-shot recipe: L2-normalise, PCA to 64
fitted on the train split, L2-normalise again. Retrieval runs over the whole
index (all sources), as in GUIE; scores are then reported overall and per
source of the query.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import polars as pl

from tasks.features import SplitFeatures, l2_normalize
from tasks.metrics import mean_precision_at_k, precision_recall_curves
from tasks.schemas import atomic_path

Embed = Callable[[np.ndarray], np.ndarray]
CURVE_K = 10  # P@k and recall@k are reported for k = 1..10


def fit_pca(train: np.ndarray, dim: int) -> Embed:
    """PCA to `dim` fitted on `train` (faiss), followed by L2 normalisation."""
    if len(train) < dim:
        raise ValueError(f"PCA to {dim} needs >= {dim} train images, got {len(train)}; lower evaluate.pca_dim")
    pca = faiss.PCAMatrix(train.shape[1], dim)
    pca.train(np.ascontiguousarray(l2_normalize(train), dtype=np.float32))
    return lambda x: l2_normalize(pca.apply(np.ascontiguousarray(l2_normalize(x), dtype=np.float32)))


def score_line(embed: Embed, query: SplitFeatures, index: SplitFeatures, query_sources: list[str], k: int) -> dict:
    """mP@k overall and per query source, plus the per-query scores and neighbour ids."""
    q_emb, i_emb = embed(query.embeddings), embed(index.embeddings)
    if q_emb.shape[1] > 64:
        raise ValueError(f"embedding dim {q_emb.shape[1]} > 64: GUIE caps embeddings at 64")
    overall, per_query, ids = mean_precision_at_k(i_emb, index.class_ids, q_emb, query.class_ids, k, depth=CURVE_K)
    sources = np.asarray(query_sources)
    result = {f"mP@{k}": round(overall, 4)}
    for source in sorted(set(query_sources)):
        result[source] = round(float(np.nanmean(per_query[sources == source])), 4)
    precision, recall = precision_recall_curves(ids, query.class_ids, index.class_ids, CURVE_K)
    return {"scores": result, "per_query": per_query, "neighbours": ids, "precision": precision, "recall": recall}


def write_curves(results: dict[str, dict], out_dir: Path) -> None:
    """P@k and recall@k for `dvc plots`, in long format: `precision_at_k.csv` has columns
    `model,k,precision` and `recall_at_k.csv` `model,k,recall`, one row per model line and k.

    One column per line would name the columns after the variants, so dvc.yaml's
    plot definitions would break with every preset; in long format they name only
    `k` and the metric, and the template `.dvc/plots/lines_by_model.json` draws one
    line per value of `model`.
    """
    depth = min(len(r["precision"]) for r in results.values())  # < CURVE_K only for a tiny index
    for name in ("precision", "recall"):
        frame = pl.DataFrame({"model": [line for line in results for _ in range(depth)],
                              "k": [k for _ in results for k in range(1, depth + 1)],
                              name: [round(float(v), 4) for r in results.values() for v in r[name][:depth]]})
        with atomic_path(Path(out_dir) / f"{name}_at_k.csv") as tmp:
            frame.write_csv(tmp)


def metrics_markdown(metrics: dict, k: int) -> str:
    """The metrics as a Markdown table: one row per model line, one column per source."""
    lines = metrics["lines"]
    first = next(iter(lines.values()))
    cols = [f"mP@{k}"] + sorted(c for c in first if c != f"mP@{k}")
    out = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, scores in sorted(lines.items(), key=lambda item: (item[0] == "head", item[0])):
        out.append(f"| {name} | " + " | ".join(f"{scores[c]:.4f}" for c in cols) + " |")
    return "\n".join(out) + f"\n\n{metrics['queries']} queries against {metrics['index']} index images (k={k}).\n"


def metrics_rows(metrics: dict) -> list[dict]:
    """One row per model line, for a table artifact."""
    return [{"model": name, **scores} for name, scores in metrics["lines"].items()]


def metrics_diff_markdown(before: dict | None, after: dict) -> str:
    """Markdown of how each line's mP@k moved since `before` (None: the first run)."""
    k = after["k"]
    if before is None:
        return "First run: no previous metrics to compare with.\n"
    out = [f"| model | previous mP@{k} | mP@{k} | change |", "|---|---|---|---|"]
    for name, scores in after["lines"].items():
        old = before.get("lines", {}).get(name, {}).get(f"mP@{k}")
        new = scores[f"mP@{k}"]
        change = "new" if old is None else f"{new - old:+.4f}"
        out.append(f"| {name} | {'-' if old is None else f'{old:.4f}'} | {new:.4f} | {change} |")
    return "\n".join(out) + "\n"
