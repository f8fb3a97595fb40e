"""Stage `evaluate`: mP@5 with intervals on the validation and the test classes, for each
zero-shot baseline and the trained head; P@k / recall@k curves and a retrieval gallery on
the test classes, also published as Prefect artifacts."""

from __future__ import annotations

import base64

import faiss
import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._cli import main
from tasks.evaluate import best_zero_shot, fit_pca, group_summary, score_line
from tasks.features import (load_concat, load_variant_split, read_manifest, split_groups,
                            train_rows_for_fit)
from tasks.gallery import gallery_keys, gallery_rows, pick_queries, render_gallery
from tasks.params.base import NAMES
from tasks.params.variants import VariantsParams, head_backbones
from tasks.params.evaluate import EvaluateParams
from tasks.report import metrics_markdown, metrics_rows, write_curves
from tasks.schemas.io import write_bytes, write_json
from tasks.schemas.paths import EVAL_DIR, HEAD_DIR, SHARDS_DIR
from tasks.schemas.shards import read_split
from tasks.heads import embed_with_head, load_head

GALLERY_QUERIES = 12


@flow(name="evaluate")
def evaluate(variants: list[str], backbones: list[str], params: EvaluateParams) -> dict:
    """Score each variant (PCA-64), the concatenation of the head's backbones (PCA-64) and the
    head, per class group."""
    log = get_run_logger()
    faiss.omp_set_num_threads(params.threads)
    torch.set_num_threads(params.threads)
    meta = read_manifest()
    dim = params.pca_dim
    results: dict[str, dict[str, dict]] = {"validation": {}, "test": {}}

    def score(name, embed, groups) -> None:
        for group, data in groups.items():
            results[group][name] = score_line(embed, data, params)

    def pca(names: list[str]):
        return fit_pca(train_rows_for_fit(names, params.pca_train_max, params.seed), dim)

    for v in variants:
        query, index = (load_variant_split(v, s) for s in ("query", "index"))
        score(f"zero_shot_pca{dim}_{v}", pca([v]), split_groups(query, index, meta))
    query, index = (load_concat(backbones, s) for s in ("query", "index"))
    groups = split_groups(query, index, meta)  # the concatenation's: its line, the head's
    score(f"zero_shot_pca{dim}_concat", pca(backbones), groups)
    head, head_variants = load_head(HEAD_DIR)
    if head_variants != backbones:
        raise ValueError(f"head was trained on {head_variants}, train.backbones are "
                         f"{backbones}; rerun train")
    score("head", lambda x: embed_with_head(head, x), groups)

    reference = best_zero_shot(results["validation"], params.k)
    metrics = {"k": params.k,
               "bootstrap": {"resamples": params.bootstrap_resamples,
                             "confidence": params.confidence,
                             "seed": params.seed, "unit": "query class"},
               **{g: group_summary(groups[g], results[g], reference, params) for g in results}}
    write_json(EVAL_DIR / "metrics.json", metrics)
    write_curves(results["test"], EVAL_DIR)
    table = metrics_markdown(metrics)
    write_bytes(EVAL_DIR / "metrics.md", table.encode("utf-8"))

    # The gallery: the head's top-k on the test classes, for queries from every source.
    test = groups["test"]
    picked = pick_queries(test.sources, GALLERY_QUERIES)
    captions = [f"{source}: {label}" for source, label in
                zip(test.sources, meta.column(test.query.keys, "label").to_list())]
    shown = gallery_keys(picked, results["test"]["head"]["neighbours"], test.query.keys,
                         test.index.keys, params.k)
    # Only the shown images' bytes, read shard by shard: all of them would be the dataset.
    images = {s.key: s.jpeg for split in ("query", "index") for s in read_split(SHARDS_DIR, split)
              if s.key in shown}
    rows = gallery_rows(picked, results["test"]["head"]["neighbours"], test.query.keys,
                        test.query.class_ids, test.index.keys, test.index.class_ids, captions,
                        images, params.k)
    render_gallery(rows, EVAL_DIR / "gallery.png")

    create_table_artifact(metrics_rows(metrics), key="guie-eval-metrics",
                          description="mP@5 with its interval per class group, model line "
                                      "and source")
    png = base64.b64encode((EVAL_DIR / "gallery.png").read_bytes()).decode()
    create_markdown_artifact(table + f"\n![retrieval gallery](data:image/png;base64,{png})\n",
                             key="guie-eval-gallery",
                             description="metrics and the head's top-5 for 12 test queries "
                                         "(green: same object, red: not)")
    log.info("evaluate:\n%s", table)
    return metrics


if __name__ == "__main__":
    main(lambda p, _key: evaluate(list(p.variants), head_backbones(p.variants,
                                                                p.train.get("backbones")),
                                  p.evaluate),
         {"variants": VariantsParams, "train": NAMES, "evaluate": EvaluateParams})
