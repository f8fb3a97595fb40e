"""The one module that owns file layouts, table schemas and atomic writes.

Every other module reads and writes artifacts through these functions, so a
schema change happens in one place and every file on disk can be checked
against the schema it claims.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# ----------------------------------------------------------------------- layout

DATA = Path("data")
INPUTS_DIR = DATA / "00_inputs"  # fingerprints of what stages read from outside the project
MODELS_DIR = DATA / "00_models"
RAW_DIR = DATA / "01_raw"
MANIFEST = DATA / "02_sampled" / "manifest.parquet"
SHARDS_DIR = DATA / "03_shards"
FEATURES_DIR = DATA / "04_features"
HEAD_DIR = DATA / "05_head"
EVAL_DIR = DATA / "06_eval"
EXPORT_DIR = DATA / "07_export"

SPLITS = ("train", "val", "query", "index")
# Class groups, disjoint: training classes (train/val images), validation classes
# (query/index, every choice is made on them) and test classes (query/index, reported).
GROUPS = ("train", "validation", "test")
CATALOG_NAME = "catalog.parquet"
SHARD_INDEX = "index.json"
REJECTS_NAME = "rejects.parquet"
SKIPPED_NAME = "skipped.parquet"    # download: catalogued images that could not be used, with why
FAILURES_NAME = "failures.parquet"  # download (urls): every URL that could not be fetched, with why

# ----------------------------------------------------------------------- tables

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # relative to the source root
        pa.field("label", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # <source>-<hash of path>, no dots
        pa.field("source", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),  # global across sources
        pa.field("path", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),  # one of GROUPS, the same for a whole class
        # Images of the class in its source catalog(s) before sampling capped it:
        # how common the class is, which dynamic ArcFace margins follow.
        pa.field("class_images", pa.int64(), nullable=False),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

FAILURES_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)


# What `python -m flows.embed index` writes: one row per image of a folder.
def index_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("path", pa.string(), nullable=False),
                      pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)])


# Metadata keys every feature file carries, so a reader needs no project code.
FEATURE_METADATA_KEYS = ("model_name", "pretrained", "checkpoint_sha256", "image_size", "dim")


def feature_schema(dim: int, metadata: dict[str, str]) -> pa.Schema:
    """Arrow schema of one feature file: key, class_id, float32 embedding of size `dim`.

    float32, not float16: DuckDB has no half-float type, and the file must
    read in polars, pyarrow and DuckDB with no project code.
    """
    missing = [k for k in FEATURE_METADATA_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"feature metadata lacks {missing}")
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("class_id", pa.int32(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata={k: str(v) for k, v in metadata.items()},
    )


# ---------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it over `target` only on success.

    An interrupted stage therefore never leaves a file that looks complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """Yield a fresh folder `parent/<prefix><random>` to build something in; deleted after.

    A run killed outright (SIGKILL, the OOM killer) runs no cleanup, and its folder may hold a
    155 GiB download. So the folder is held with an advisory lock (flock on the folder itself)
    while in use, which the kernel drops however its process ends, and every `<prefix>*` folder
    that nobody holds is deleted before a new one is made: a killed run's is gone by the next.
    The caller renames the result out of it into place; until then, nothing inside is read as
    finished. Folders of one prefix in use at once (threads, processes) leave each other be.
    """
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(parent, prefix)
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # another cleaner deleted it before we could lock it: make another
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner that saw it first deletes it
        if _same_folder(path, fd):
            break
        os.close(fd)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _same_folder(path: Path, fd: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_stale_scratch(parent: Path, prefix: str) -> list[Path]:
    """Delete the `<prefix>*` folders in `parent` that no live process holds; returns them."""
    removed = []
    for path in sorted(parent.glob(glob.escape(prefix) + "*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # not a folder (or gone): not ours to delete
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except BlockingIOError:
            pass  # in use
        finally:
            os.close(fd)
    return removed


def write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: Path | str, obj: Any) -> None:
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


def write_table(target: Path | str, table: pa.Table, schema: pa.Schema) -> None:
    """Write a Parquet table after casting it to its declared schema."""
    table = table.select(schema.names).cast(schema)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)


def read_table(path: Path | str, schema: pa.Schema) -> pa.Table:
    """Read a Parquet table and check it has the declared schema's columns."""
    table = pq.read_table(path)
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {schema.names}")
    return table.select(schema.names).cast(schema)


# --------------------------------------------------------------------- features


def embedding_array(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) floats as Arrow `fixed_size_list<float32>[D]`, the one embedding column type on disk."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), type=pa.float32()),
                                             embeddings.shape[1])


def write_ipc(target: Path | str, table: pa.Table) -> None:
    """Write a table as an uncompressed (memory-mappable) Arrow IPC file, atomically."""
    with atomic_path(target) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def write_features(
    target: Path | str, keys: list[str], class_ids: np.ndarray, embeddings: np.ndarray, metadata: dict[str, str]
) -> None:
    """Write one shard's embeddings as an uncompressed Arrow IPC file (memory-mappable)."""
    dim = int(metadata["dim"])
    embeddings = np.asarray(embeddings, dtype=np.float32).reshape(-1, dim)
    table = pa.Table.from_arrays(
        [
            pa.array(keys, type=pa.string()),
            pa.array(np.asarray(class_ids, dtype=np.int32), type=pa.int32()),
            embedding_array(embeddings),
        ],
        schema=feature_schema(dim, metadata),
    )
    assert table.num_rows == len(embeddings) == len(keys)
    write_ipc(target, table)


def read_features(path: Path | str) -> tuple[pa.Table, dict[str, str]]:
    """Memory-map one feature file; returns the table and its decoded metadata."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return table, meta


def embeddings_of(table: pa.Table) -> np.ndarray:
    """The embedding column as an (N, D) float32 array."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
