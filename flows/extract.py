"""Stage `extract`: shards -> data/04_features/<variant>/<split>/<shard>.arrow for one backbone."""

from __future__ import annotations

import json
import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from flows._cli import main
from tasks.extract import Embedder, embed_shard, resolve_device
from tasks.models import load_backbone
from tasks.params import ExtractParams
from tasks.schemas import FEATURES_DIR, MODELS_DIR, SHARD_INDEX, SHARDS_DIR

# Inputs include the model itself: never hash them for a cache key (DVC is the cache).
embed_one = task(embed_shard, name="embed-shard", cache_policy=NO_CACHE)


@flow(name="extract")
def extract(variant: str, params: ExtractParams) -> dict:
    """Load the backbone once, then embed shard after shard with a progress bar in images/s."""
    log = get_run_logger()
    index = json.loads((SHARDS_DIR / SHARD_INDEX).read_text())
    device = resolve_device(params.device)
    model, preprocess, info = load_backbone(MODELS_DIR / variant, device="cpu")
    embedder = Embedder(model, device, params.precision)
    metadata = {"variant": variant, "model_name": info["model_name"], "pretrained": info["pretrained"],
                "checkpoint_sha256": info["checkpoint_sha256"], "image_size": str(info["image_size"]), "dim": str(info["dim"])}
    total = sum(s["nsamples"] for s in index["shardlist"])
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc=f"extract[{variant}]", mininterval=2.0) as bar:
        for entry in index["shardlist"]:
            out = FEATURES_DIR / variant / entry["split"] / f"{entry['name']}.arrow"
            embed_one(SHARDS_DIR / entry["url"], out, embedder, preprocess, params, metadata, bar.update)
    seconds = time.perf_counter() - start
    log.info("extract[%s]: %d images from %d shards on %s in %.1f s (%.1f images/s)", variant, total,
             len(index["shardlist"]), device, seconds, total / max(seconds, 1e-9))
    return {"images": total, "seconds": seconds}


if __name__ == "__main__":
    main(lambda p, key: extract(key, p.extract), keys=lambda p: p.models)
