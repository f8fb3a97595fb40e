"""Use the exported embedder: embed a folder into a Parquet index, and search it with an image."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.export import embed_images
from tasks.images import IMAGE_SUFFIXES, BadImage, normalize_image
from tasks.preprocess import decode_rgb
from tasks.schemas.features import embedding_array, embeddings_of, index_schema
from tasks.schemas.io import atomic_path


def load_image(path: Path) -> torch.Tensor:
    """Any image file -> uint8 (3, H, W); raises BadImage with the reason."""
    jpeg, _ = normalize_image(path.read_bytes(), max_side=4096, quality=95)
    return decode_rgb(jpeg)


def embed_folder(model: torch.nn.Module, folder: Path,
                 batch: int = 64) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(relative paths, embeddings, [(path, reason)] of skipped files) of the images in `folder`.

    Every image under `folder`, at any depth, is embedded.
    """
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    paths, chunks, skipped = [], [], []
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            chunks.append(embed_images(model, [t for _, t in pending]))
            paths.extend(p for p, _ in pending)
            pending.clear()

    for f in files:
        try:
            pending.append((f.relative_to(folder).as_posix(), load_image(f)))
        except BadImage as exc:
            skipped.append((f.relative_to(folder).as_posix(), str(exc)))
        if len(pending) >= batch:
            flush()
    flush()
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 64), np.float32)
    return paths, emb, skipped


def write_index(out: Path, paths: list[str], embeddings: np.ndarray) -> None:
    dim = embeddings.shape[1]
    columns = {"path": pa.array(paths, pa.string()), "embedding": embedding_array(embeddings)}
    table = pa.table(columns, schema=index_schema(dim))
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def search(model: torch.nn.Module, index_file: Path, image: Path,
           k: int = 5) -> list[tuple[str, float]]:
    """Top-k (path, Euclidean distance) of the index for one query image."""
    table = pq.read_table(index_file)
    emb = embeddings_of(table)
    index = faiss.IndexFlatL2(emb.shape[1])
    index.add(emb)
    query = embed_images(model, [load_image(image)])
    dist, ids = index.search(query, min(k, len(emb)))
    paths = table.column("path").to_pylist()
    return [(paths[i], float(np.sqrt(max(d, 0.0)))) for d, i in zip(dist[0], ids[0])]
