"""Stage `shard`: manifest + raw files -> WebDataset tars per split, index.json, rejects.parquet."""

from __future__ import annotations

import pyarrow as pa
from prefect.cache_policies import NO_CACHE
from prefect import flow, get_run_logger, task, unmapped

from flows._cli import main
from tasks.params.shard import ShardParams
from tasks.schemas.io import read_table, write_json, write_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.paths import MANIFEST, RAW_DIR, REJECTS_NAME, SHARD_INDEX, SHARDS_DIR
from tasks.schemas.shards import REJECTS_SCHEMA
from tasks.shard import plan_shards, shard_index, write_shard

write_one = task(write_shard, name="write-shard", cache_policy=NO_CACHE)


@flow(name="shard")
def shard(params: ShardParams) -> dict:
    """Write every split's shards in parallel, then the index and the rejects table."""
    log = get_run_logger()
    plans = plan_shards(read_table(MANIFEST, MANIFEST_SCHEMA), params.max_samples)
    results = [f.result() for f in write_one.map(plans, unmapped(RAW_DIR), unmapped(SHARDS_DIR), unmapped(params))]
    entries = [entry for entry, _ in results]
    rejects = sorted((r for _, rs in results for r in rs), key=lambda r: r["key"])
    write_table(SHARDS_DIR / REJECTS_NAME, pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), REJECTS_SCHEMA)
    index = shard_index(entries)
    write_json(SHARDS_DIR / SHARD_INDEX, index)
    for r in rejects:
        log.warning("rejected %s (%s): %s", r["key"], r["path"], r["reason"])
    written = sum(e["nsamples"] for e in entries)
    log.info("shard: %d shards, %d images written (%d converted), %d rejected", len(entries), written,
             sum(e["converted"] for e in entries), len(rejects))
    return index


if __name__ == "__main__":
    main(lambda p, _key: shard(p.shard), {"shard": ShardParams})
