"""Write the manifest as byte-reproducible WebDataset tars, one folder per split.

Reproducible means: samples in key order, a fixed mtime, owner and mode in
every tar header, and JSON with sorted keys, so the same manifest and raw
files give the same sha256 on every machine and `dvc status` stays quiet.
Shards are written by a pool of processes (a shard's Python work holds the GIL);
each shard's bytes depend only on its plan, so any process count writes the
same files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import webdataset as wds

from tasks.images import BadImage, normalize_image
from tasks.names import UnsafeName, check_component, check_relative_path
from tasks.params.shard import ShardParams
from tasks.schemas.io import atomic_path, sha256_file
from tasks.schemas.manifest import SPLITS

INDEX_KIND = "wids-shard-index-v1"  # the wids index shape, plus name/split/sha256 per shard
_MTIME = 0.0


class ShardError(RuntimeError):
    """Writing one shard failed for a reason other than a bad image; the message names it."""


@dataclass(frozen=True)
class ShardPlan:
    split: str
    name: str  # e.g. "train-000000"
    # This shard's manifest rows, key-sorted, as a compact Arrow table: a worker
    # process is sent these rows only (a slice would pickle the whole manifest).
    table: pa.Table

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.name}.tar"

    @property
    def rows(self) -> list[dict]:
        return self.table.to_pylist()


def plan_shards(manifest: pa.Table, max_samples: int) -> list[ShardPlan]:
    """Cut each split's key-sorted rows into shards of at most `max_samples`.

    Sorted and cut in Arrow: a million-row manifest as Python dicts costs
    gigabytes, which every forked worker would share and touch.
    """
    order = pc.sort_indices(manifest, sort_keys=[("key", "ascending")])  # stable
    splits = manifest["split"].take(order)
    plans = []
    for split in SPLITS:
        rows = order.filter(pc.equal(splits, split))
        for i in range(0, len(rows), max_samples):
            name = f"{split}-{i // max_samples:06d}"
            plans.append(ShardPlan(split, name, manifest.take(rows.slice(i, max_samples))))
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


def write_shard(plan: ShardPlan, raw_dir: Path, out_dir: Path,
                params: ShardParams) -> tuple[dict, list[dict]]:
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
                meta = {"label": row["label"], "path": row["path"], "source": row["source"],
                        "split": row["split"]}
                text = json.dumps(meta, sort_keys=True, ensure_ascii=False)
                writer.write({"__key__": row["key"], "jpg": jpeg, "cls": int(row["class_id"]),
                              "json": text.encode("utf-8")})
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




def shard_processes(params: ShardParams) -> int:
    """How many worker processes `shard.processes` means on this machine."""
    if params.processes != "auto":
        return params.processes
    return len(os.sched_getaffinity(0))  # the cores this job may use (containers, Slurm)


def _write_named(plan: ShardPlan, raw_dir: Path, out_dir: Path,
                 params: ShardParams) -> tuple[dict, list[dict]]:
    """write_shard, with any failure re-raised as a ShardError naming the shard.

    A worker's traceback reaches the parent as text only, so the name has to be
    in the message itself.
    """
    try:
        return write_shard(plan, raw_dir, out_dir, params)
    except Exception as exc:
        raise ShardError(f"shard {plan.relpath}: {type(exc).__name__}: {exc}") from exc


def write_shards(plans: list[ShardPlan], raw_dir: Path, out_dir: Path,
                 params: ShardParams) -> tuple[dict, list[dict]]:
    """Write every planned shard; returns (the index.json document, all rejects by key).

    `params.processes` > 1 writes shards in that many forked processes, each
    sent one plan at a time; 1 writes them here, one after the other. Results
    are gathered in plan order and sorted as the index and rejects need, so
    both paths give the same bytes. The first failing shard stops the rest.
    """
    processes = min(shard_processes(params), len(plans))
    if processes <= 1:
        results = [_write_named(plan, raw_dir, out_dir, params) for plan in plans]
    else:
        results = _write_in_pool(plans, raw_dir, out_dir, params, processes)
    rejects = sorted((r for _, rs in results for r in rs), key=lambda r: r["key"])
    return shard_index([entry for entry, _ in results]), rejects


def _write_in_pool(plans: list[ShardPlan], raw_dir: Path, out_dir: Path, params: ShardParams,
                   processes: int) -> list[tuple[dict, list[dict]]]:
    # fork, as tasks/decode.py: workers inherit the loaded modules instead of importing
    # Pillow, pyarrow and webdataset again; they only read files and write tars.
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(processes, mp_context=context)
    try:
        futures: list[Future] = [pool.submit(_write_named, p, raw_dir, out_dir, params)
                                 for p in plans]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [(p, f.exception()) for p, f in zip(plans, futures)
                  if f.done() and not f.cancelled() and f.exception() is not None]
        if failed and isinstance(failed[0][1], BrokenProcessPool):
            # the pool cannot say which shard its dead process held
            raise ShardError(f"a worker process died (killed? out of memory?); {len(failed)} "
                             f"shards not written, from {failed[0][0].relpath}") from failed[0][1]
        if failed:
            raise failed[0][1]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
