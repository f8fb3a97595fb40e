"""The shards (`shard`, data/03_shards): how they are read, and the images left out, with why.

WebDataset tars per split listed in index.json (wids layout); every reader of the shards
goes through `read_index`, `read_shard` and `read_split`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import webdataset as wds

from tasks.schemas.paths import SHARD_INDEX

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def shards_of_split(index: dict, split: str) -> list[dict]:
    return [e for e in index["shardlist"] if e["split"] == split]


@dataclass(frozen=True)
class Sample:
    key: str
    class_id: int
    jpeg: bytes


def read_shard(url: str | Path) -> list[Sample]:
    """All samples of one tar, in stored order, as raw bytes (decoding happens in workers)."""
    stream = wds.WebDataset(str(url), shardshuffle=False, empty_check=False).to_tuple("__key__", "cls", "jpg")
    return [Sample(key, int(cls.decode() if isinstance(cls, bytes) else cls), jpg) for key, cls, jpg in stream]


def read_index(shards_dir: Path) -> dict:
    """The shard stage's index.json (wids shape: `shardlist` of url, nsamples, name, split, sha256)."""
    return json.loads((shards_dir / SHARD_INDEX).read_text())


def read_split(shards_dir: Path, split: str) -> Iterator[Sample]:
    """Every sample of one split, shard after shard, in the order index.json lists them."""
    for entry in shards_of_split(read_index(shards_dir), split):
        yield from read_shard(shards_dir / entry["url"])
