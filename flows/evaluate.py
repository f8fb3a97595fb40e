"""Stage `evaluate`: mP@5 on unseen classes for each zero-shot baseline and the trained head,
P@k / recall@k curves, and a retrieval gallery, also published as Prefect artifacts."""

from __future__ import annotations

import base64

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._cli import main
from tasks.evaluate import fit_pca, metrics_markdown, metrics_rows, score_line, write_curves
from tasks.shard import read_split
from tasks.features import load_concat, load_variant_split
from tasks.gallery import gallery_rows, pick_queries, render_gallery
from tasks.params import EvaluateParams
from tasks.schemas import (EVAL_DIR, HEAD_DIR, MANIFEST, MANIFEST_SCHEMA, SHARDS_DIR, read_table, write_bytes,
                           write_json)
from tasks.train import embed_with_head, load_head

GALLERY_QUERIES = 12


@flow(name="evaluate")
def evaluate(variants: list[str], params: EvaluateParams) -> dict:
    """Score each backbone (PCA-64), their concatenation (PCA-64) and the head on query vs index."""
    log = get_run_logger()
    manifest = pl.from_arrow(read_table(MANIFEST, MANIFEST_SCHEMA))
    meta = {r["key"]: r for r in manifest.iter_rows(named=True)}
    k, dim = params.k, params.pca_dim
    results: dict[str, dict] = {}
    for v in variants:
        train, query, index = (load_variant_split(v, s) for s in ("train", "query", "index"))
        sources = [meta[key]["source"] for key in query.keys]
        results[f"zero_shot_pca{dim}_{v}"] = score_line(fit_pca(train.embeddings, dim), query, index, sources, k)
    train, query, index = (load_concat(variants, s) for s in ("train", "query", "index"))
    sources = [meta[key]["source"] for key in query.keys]
    results[f"zero_shot_pca{dim}_concat"] = score_line(fit_pca(train.embeddings, dim), query, index, sources, k)
    head, head_variants = load_head(HEAD_DIR)
    if head_variants != variants:
        raise ValueError(f"head was trained on {head_variants}, features are {variants}; rerun train")
    results["head"] = score_line(lambda x: embed_with_head(head, x), query, index, sources, k)

    lines = {name: r["scores"] for name, r in results.items()}
    best_zero = max(s[f"mP@{k}"] for n, s in lines.items() if n != "head")
    metrics = {"queries": len(query.keys), "index": len(index.keys), "k": k, "lines": lines,
               "best_zero_shot": best_zero, "head_minus_best_zero_shot": round(lines["head"][f"mP@{k}"] - best_zero, 4)}
    write_json(EVAL_DIR / "metrics.json", metrics)
    write_curves(results, EVAL_DIR)
    table = metrics_markdown(metrics, k)
    write_bytes(EVAL_DIR / "metrics.md", table.encode("utf-8"))

    # The gallery: the head's top-k for queries from every source.
    picked = pick_queries(sources, GALLERY_QUERIES)
    captions = [f"{meta[key]['source']}: {meta[key]['label']}" for key in query.keys]
    rows = gallery_rows(picked, results["head"]["neighbours"], query.keys, query.class_ids, index.keys,
                        index.class_ids, captions, {s.key: s.jpeg for split in ("query", "index") for s in read_split(SHARDS_DIR, split)}, k)
    render_gallery(rows, EVAL_DIR / "gallery.png")

    create_table_artifact(metrics_rows(metrics), key="guie-eval-metrics", description="mP@5 per model line and source")
    png = base64.b64encode((EVAL_DIR / "gallery.png").read_bytes()).decode()
    create_markdown_artifact(table + f"\n![retrieval gallery](data:image/png;base64,{png})\n", key="guie-eval-gallery",
                             description="metrics and the head's top-5 for 12 queries (green: same object, red: not)")
    log.info("evaluate:\n%s", table)
    return metrics


if __name__ == "__main__":
    main(lambda p, _key: evaluate(list(p.models), p.evaluate))
