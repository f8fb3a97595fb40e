"""Stage `evaluate`: mP@5 on unseen classes for each zero-shot baseline and the trained head."""

from __future__ import annotations

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows._cli import main
from tasks.evaluate import fit_pca, metrics_markdown, score_line
from tasks.features import load_concat, load_variant_split
from tasks.params import EvaluateParams
from tasks.schemas import EVAL_DIR, HEAD_DIR, MANIFEST, MANIFEST_SCHEMA, read_table, write_bytes, write_json
from tasks.train import embed_with_head, load_head


@flow(name="evaluate")
def evaluate(variants: list[str], params: EvaluateParams) -> dict:
    """Score each backbone (PCA-64), their concatenation (PCA-64) and the head on query vs index."""
    log = get_run_logger()
    manifest = pl.from_arrow(read_table(MANIFEST, MANIFEST_SCHEMA))
    source_of = dict(zip(manifest["key"].to_list(), manifest["source"].to_list()))
    k = params.k
    lines: dict[str, dict] = {}
    for v in variants:
        train, query, index = (load_variant_split(v, s) for s in ("train", "query", "index"))
        sources = [source_of[key] for key in query.keys]
        lines[f"zero_shot_pca{params.pca_dim}_{v}"] = score_line(fit_pca(train.embeddings, params.pca_dim), query, index, sources, k)["scores"]
    train, query, index = (load_concat(variants, s) for s in ("train", "query", "index"))
    sources = [source_of[key] for key in query.keys]
    lines[f"zero_shot_pca{params.pca_dim}_concat"] = score_line(fit_pca(train.embeddings, params.pca_dim), query, index, sources, k)["scores"]
    head, head_variants = load_head(HEAD_DIR)
    if head_variants != variants:
        raise ValueError(f"head was trained on {head_variants}, features are {variants}; rerun train")
    lines["head"] = score_line(lambda x: embed_with_head(head, x), query, index, sources, k)["scores"]
    metrics = {"queries": len(query.keys), "index": len(index.keys), "k": k, "lines": lines,
               "best_zero_shot": max(s[f"mP@{k}"] for n, s in lines.items() if n != "head"),
               "head_minus_best_zero_shot": round(lines["head"][f"mP@{k}"] - max(s[f"mP@{k}"] for n, s in lines.items() if n != "head"), 4)}
    write_json(EVAL_DIR / "metrics.json", metrics)
    table = metrics_markdown(metrics, k)
    write_bytes(EVAL_DIR / "metrics.md", table.encode("utf-8"))
    create_markdown_artifact(table, key="guie-metrics", description="mP@5 on unseen classes per model line")
    log.info("evaluate:\n%s", table)
    return metrics


if __name__ == "__main__":
    main(lambda p, _key: evaluate(list(p.models), p.evaluate))
