"""Stage `extract`: shards -> data/04_features/<variant>/<split>/<shard>.arrow for one backbone.

Shards are mapped as Prefect tasks over the task runner `extract.runner`
picks: a thread pool in this process (default) or an existing Dask cluster
(`extract.dask_address`), where each worker loads the model once and takes
shard after shard. Every task reads and writes absolute paths, so a worker on
another machine needs the project folder (or the same paths) on shared storage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from flows._cli import main
from tasks.extract import embed_shard, get_worker
from tasks.params.base import NAMES
from tasks.params.extract import ExtractParams
from tasks.schemas.paths import FEATURES_DIR, MODELS_DIR, SHARDS_DIR
from tasks.schemas.shards import read_index


# DVC is the result cache of the stage and the embedding cache serves
# images: Prefect's own result caching stays off.
@task(name="embed-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def embed_one(url: str, out: str, model_dir: str, params: ExtractParams) -> dict:
    """Embed one shard with this process's (cached) model; logs new vs cached images."""
    w = get_worker(model_dir, params)
    stats = embed_shard(Path(url), Path(out), w.embedder, w.preprocess, params, w.metadata, cache=w.cache)
    get_run_logger().info("%s: %d images, %d embedded, %d from the cache, %.1f s", stats["shard"],
                          stats["images"], stats["embedded"], stats["cached"], stats["seconds"])
    return stats


def task_runner(params: ExtractParams):
    """The Prefect task runner `extract.runner` names."""
    if params.runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=params.dask_address)
    return ThreadPoolTaskRunner(max_workers=params.threads)


@flow(name="extract")
def extract(variant: str, params: ExtractParams) -> dict:
    """Map shards over the task runner; a progress bar counts images as shards finish."""
    log = get_run_logger()
    index = read_index(SHARDS_DIR)
    if params.cache_dir:  # workers may run elsewhere: hand them absolute paths
        params = params.model_copy(update={"cache_dir": str(Path(params.cache_dir).resolve())})
    entries = index["shardlist"]
    urls = [str((SHARDS_DIR / e["url"]).resolve()) for e in entries]
    outs = [str((FEATURES_DIR / variant / e["split"] / f"{e['name']}.arrow").resolve()) for e in entries]
    total = sum(e["nsamples"] for e in entries)
    start = time.perf_counter()
    futures = embed_one.map(urls, outs, unmapped(str((MODELS_DIR / variant).resolve())), unmapped(params))
    embedded = cached = 0
    with tqdm(total=total, unit="img", desc=f"extract[{variant}]", mininterval=2.0) as bar:
        for fut in as_completed(futures):
            stats = fut.result()
            embedded, cached = embedded + stats["embedded"], cached + stats["cached"]
            bar.update(stats["images"])
    seconds = time.perf_counter() - start
    log.info("extract[%s]: %d images from %d shards in %.1f s (%.1f images/s): %d embedded, %d from the cache",
             variant, total, len(entries), seconds, total / max(seconds, 1e-9), embedded, cached)
    return {"images": total, "embedded": embedded, "cached": cached, "seconds": seconds}


def run(params: Any, variant: str) -> dict:
    return extract.with_options(task_runner=task_runner(params.extract))(variant, params.extract)


if __name__ == "__main__":
    main(run, {"models": NAMES, "extract": ExtractParams}, keys="models")
