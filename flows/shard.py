"""Stage `shard`: manifest + raw files -> WebDataset tars per split, index.json, rejects.parquet."""

from __future__ import annotations

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows._cli import main
from tasks.params.shard import ShardParams
from tasks.schemas.io import read_table, write_json, write_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.paths import MANIFEST, RAW_DIR, REJECTS_NAME, SHARD_INDEX, SHARDS_DIR
from tasks.schemas.shards import REJECTS_SCHEMA
from tasks.shard import plan_shards, shard_processes, write_shards

# One task over a process pool: Prefect's ProcessPoolTaskRunner spawns each worker
# afresh (imports Prefect, and without a server starts its own), see README.
write_all = task(write_shards, name="write-shards", cache_policy=NO_CACHE)


@flow(name="shard")
def shard(params: ShardParams) -> dict:
    """Write every split's shards in worker processes, then the index and the rejects table."""
    log = get_run_logger()
    # Cut the key-sorted manifest into shards (Arrow, not Python dicts)
    plans = plan_shards(read_table(MANIFEST, MANIFEST_SCHEMA), params.max_samples)
    log.info("shard: %d shards in %d processes", len(plans), shard_processes(params))
    # Write the tars; rejects come back sorted by key, the index in split then name order
    index, rejects = write_all(plans, RAW_DIR, SHARDS_DIR, params)
    write_table(SHARDS_DIR / REJECTS_NAME, pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
                REJECTS_SCHEMA)
    write_json(SHARDS_DIR / SHARD_INDEX, index)
    for r in rejects:
        log.warning("rejected %s (%s): %s", r["key"], r["path"], r["reason"])
    entries = index["shardlist"]
    log.info("shard: %d shards, %d images written (%d converted), %d rejected", len(entries),
             sum(e["nsamples"] for e in entries), sum(e["converted"] for e in entries),
             len(rejects))
    return index


if __name__ == "__main__":
    main(lambda p, _key: shard(p.shard), {"shard": ShardParams})
