"""Stage `extract`: shards -> data/04_features/<variant>/<split>/<shard>.arrow for one backbone.

Shards are mapped as Prefect tasks over the task runner `extract.runner`
picks: a thread pool in this process (default) or an existing Dask cluster
(`extract.dask_address`), where each worker loads the model once and takes
shard after shard; on a cluster the tasks ask for `extract.dask_resources`
(a GPU each when the device is cuda), so one worker per GPU gets one at a time.
With several devices on this machine (`extract.device: auto` on a multi-GPU
machine, or a list), one process per device takes shards instead
(tasks/extract_devices.py). Every task reads and writes absolute paths, so a
worker on another machine needs the project folder (or the same paths) on
shared storage.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from flows._cli import main
from tasks.extract import embed_shard, get_worker, resolve_devices
from tasks.extract_devices import embed_on_devices
from tasks.params.variants import VariantsParams, variant_dir
from tasks.params.extract import ExtractParams
from tasks.schemas.paths import FEATURES_DIR, SHARDS_DIR
from tasks.schemas.shards import read_index


# DVC is the result cache of the stage and the embedding cache serves
# images: Prefect's own result caching stays off.
@task(name="embed-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def embed_one(url: str, out: str, model_dir: str, params: ExtractParams) -> dict:
    """Embed one shard with this process's (cached) model; logs new vs cached images."""
    w = get_worker(model_dir, params)
    stats = embed_shard(Path(url), Path(out), w.embedder, w.preprocess, params, w.metadata,
                        cache=w.cache)
    get_run_logger().info("%s: %d images, %d embedded, %d from the cache, %.1f s", stats["shard"],
                          stats["images"], stats["embedded"], stats["cached"], stats["seconds"])
    return {**stats, "pid": os.getpid()}


def task_runner(params: ExtractParams):
    """The Prefect task runner `extract.runner` names."""
    if params.runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=params.dask_address)
    return ThreadPoolTaskRunner(max_workers=params.threads)


def dask_resources(params: ExtractParams) -> dict[str, float]:
    """What each shard task asks of a Dask worker: extract.dask_resources, or by default
    a GPU when the device is cuda, so a worker started with `--resources GPU=1` (one per
    GPU) embeds one shard at a time whatever its thread count."""
    if params.dask_resources is not None:
        return dict(params.dask_resources)
    return {"GPU": 1} if str(params.device).startswith("cuda") else {}


def unpinned_gpu_warning(params: ExtractParams) -> str | None:
    """Why a Dask run may stack shards on one GPU: `auto` can't tell what the workers have,
    so its tasks ask for no GPU resource (clip-retrieval's issue #292 is that wall)."""
    if params.runner != "dask" or params.device != "auto" or dask_resources(params):
        return None
    return ("extract: device 'auto' on a Dask cluster: the shard tasks ask for no GPU, so a "
            "worker may run several at once on one GPU (or all on GPU 0); with one worker "
            "per GPU started with --resources GPU=1, set extract.device: cuda (README)")


def shard_stats(urls: list[str], outs: list[str], model_dir: str,
                params: ExtractParams) -> Iterator[dict]:
    """Embed every shard; yields each one's stats (with the embedding process's `pid`)
    as it finishes, in any order."""
    devices = resolve_devices(params.device) if params.runner == "threads" else [params.device]
    if len(devices) > 1:  # one process per device on this machine
        log = get_run_logger()
        log.info("extract: %d shards over %d processes, one per device: %s", len(urls),
                 len(devices), ", ".join(devices))
        for stats in embed_on_devices(list(zip(urls, outs)), model_dir, params, devices):
            log.info("%s on %s: %d images, %d embedded, %d from the cache, %.1f s", stats["shard"],
                     stats["device"], stats["images"], stats["embedded"], stats["cached"],
                     stats["seconds"])
            yield stats
        return
    resources = dask_resources(params) if params.runner == "dask" else {}
    if warning := unpinned_gpu_warning(params):
        get_run_logger().warning(warning)
    annotate = contextlib.nullcontext()
    if resources:
        import dask

        annotate = dask.annotate(resources=resources)
    with annotate:
        futures = embed_one.map(urls, outs, unmapped(model_dir), unmapped(params))
    for fut in as_completed(futures):
        yield fut.result()


@flow(name="extract")
def extract(variant: str, model_dir: Path, params: ExtractParams) -> dict:
    """Embed the shards with the backbone in `model_dir`; a progress bar counts images as
    shards finish."""
    log = get_run_logger()
    index = read_index(SHARDS_DIR)
    if params.cache_dir:  # workers may run elsewhere: hand them absolute paths
        params = params.model_copy(update={"cache_dir": str(Path(params.cache_dir).resolve())})
    entries = index["shardlist"]
    urls = [str((SHARDS_DIR / e["url"]).resolve()) for e in entries]
    outs = [str((FEATURES_DIR / variant / e["split"] / f"{e['name']}.arrow").resolve())
            for e in entries]
    total = sum(e["nsamples"] for e in entries)
    start = time.perf_counter()
    embedded = cached = 0
    per_process: Counter[int] = Counter()  # shards each process embedded, by process id
    with tqdm(total=total, unit="img", desc=f"extract[{variant}]", mininterval=2.0) as bar:
        for stats in shard_stats(urls, outs, str(model_dir.resolve()), params):
            embedded, cached = embedded + stats["embedded"], cached + stats["cached"]
            bar.update(stats["images"])
            per_process[stats["pid"]] += 1
    seconds = time.perf_counter() - start
    log.info("extract[%s]: %d images from %d shards in %.1f s (%.1f images/s): %d embedded, "
             "%d from the cache",
             variant, total, len(entries), seconds, total / max(seconds, 1e-9), embedded, cached)
    return {"images": total, "embedded": embedded, "cached": cached, "seconds": seconds,
            "shards_per_process": dict(per_process)}


def run(params: Any, variant: str) -> dict:
    return extract.with_options(task_runner=task_runner(params.extract))(
        variant, variant_dir(variant, params.variants), params.extract)


if __name__ == "__main__":
    main(run, {"variants": VariantsParams, "extract": ExtractParams}, keys="variants")
