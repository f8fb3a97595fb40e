"""Write the manifest as byte-reproducible WebDataset tars, one folder per split.

Reproducible means: samples in key order, a fixed mtime, owner and mode in
every tar header, and JSON with sorted keys, so the same manifest and raw
files give the same sha256 on every machine and `dvc status` stays quiet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import webdataset as wds

from tasks.images import BadImage, normalize_image
from tasks.names import UnsafeName, check_component, check_relative_path
from tasks.params.shard import ShardParams
from tasks.schemas.io import atomic_path, sha256_file
from tasks.schemas.manifest import SPLITS

INDEX_KIND = "wids-shard-index-v1"  # the wids index shape, plus name/split/sha256 per shard
_MTIME = 0.0


@dataclass(frozen=True)
class ShardPlan:
    split: str
    name: str  # e.g. "train-000000"
    rows: tuple[dict, ...]  # manifest rows, key-sorted

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.name}.tar"


def plan_shards(manifest: pa.Table, max_samples: int) -> list[ShardPlan]:
    """Cut each split's key-sorted rows into shards of at most `max_samples`."""
    rows = sorted(manifest.to_pylist(), key=lambda r: r["key"])
    plans = []
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        for i in range(0, len(split_rows), max_samples):
            plans.append(ShardPlan(split, f"{split}-{i // max_samples:06d}", tuple(split_rows[i:i + max_samples])))
    return plans


# Larger than any photo Pillow's pixel limit lets through (89 Mpx at 16 bits a channel is
# ~540 MB uncompressed); a bigger "image" is an attack on memory, not a photo.
MAX_RAW_BYTES = 1 << 30


def read_raw(raw_dir: Path, row: dict) -> bytes:
    """One raw image's bytes, from a catalog row that may come from a shared DVC remote.

    The row's source and path are checked as every name from outside is
    (no absolute paths, `..`, look-alikes); only a regular file is read, and
    at most MAX_RAW_BYTES of it, so a row naming `/dev/zero` or a 50 GB file
    is a reject, not a read of the machine or its memory.
    """
    source = check_component(row["source"], source="catalog", entry=row["key"])
    rel = check_relative_path(row["path"], source=f"catalog of {source}", entry=row["key"])
    src = raw_dir / source / rel
    if not src.is_file():
        raise FileNotFoundError(src)
    with open(src, "rb") as fh:
        data = fh.read(MAX_RAW_BYTES + 1)
    if len(data) > MAX_RAW_BYTES:
        raise BadImage(f"file over {MAX_RAW_BYTES:,} bytes")
    return data


def write_shard(plan: ShardPlan, raw_dir: Path, out_dir: Path, params: ShardParams) -> tuple[dict, list[dict]]:
    """Write one tar atomically; returns (index entry, reject rows).

    `raw_dir` holds one folder per source, as the download stage wrote it.
    """
    rejects, notes = [], 0
    target = out_dir / plan.relpath
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            writer = wds.TarWriter(fh, mtime=_MTIME, user="guie", group="guie", mode=0o444)
            count = 0
            for row in plan.rows:
                src = raw_dir / row["source"] / row["path"]
                try:
                    jpeg, note = normalize_image(read_raw(raw_dir, row), params.max_side,
                                                 params.jpeg_quality)
                except FileNotFoundError:
                    rejects.append({"key": row["key"], "path": str(src), "reason": "file missing"})
                    continue
                except (BadImage, UnsafeName) as exc:
                    rejects.append({"key": row["key"], "path": str(src), "reason": str(exc)})
                    continue
                notes += note is not None
                meta = {"label": row["label"], "path": row["path"], "source": row["source"], "split": row["split"]}
                writer.write({"__key__": row["key"], "jpg": jpeg, "cls": int(row["class_id"]),
                              "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")})
                count += 1
            writer.close()
    entry = {"url": plan.relpath, "name": plan.name, "split": plan.split, "nsamples": count,
             "sha256": sha256_file(target), "converted": notes}
    return entry, rejects


def shard_index(entries: list[dict]) -> dict:
    """The index.json document: wids layout, shards in split then name order."""
    order = {s: i for i, s in enumerate(SPLITS)}
    shards = sorted(entries, key=lambda e: (order[e["split"]], e["name"]))
    return {"__kind__": INDEX_KIND, "wids_version": 1, "name": "guie-shards", "shardlist": shards}


