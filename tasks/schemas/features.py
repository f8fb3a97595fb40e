"""Feature files (`extract`, data/04_features) and embedding indexes: Arrow IPC, float32 rows.

They read in polars, pyarrow and DuckDB with no project code: the model is in the metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.schemas.io import atomic_path


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


def embedding_array(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) floats as Arrow `fixed_size_list<float32>[D]`, the one embedding type on disk."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), type=pa.float32()),
                                             embeddings.shape[1])


def write_ipc(target: Path | str, table: pa.Table) -> None:
    """Write a table as an uncompressed (memory-mappable) Arrow IPC file, atomically."""
    with atomic_path(target) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def write_features(
    target: Path | str, keys: list[str], class_ids: np.ndarray, embeddings: np.ndarray,
    metadata: dict[str, str],
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
