"""Embed WebDataset shards with one backbone into one Arrow file per shard.

Reader -> mapper -> writer, as clip-retrieval splits it: the reader streams
(key, class, JPEG bytes) out of a tar with webdataset; DataLoader workers
decode and preprocess; only the mapper holds the model; the writer stores
float16 embeddings atomically with the model's identity in the metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from tasks.params import ExtractParams
from tasks.preprocess import Preprocess, decode_rgb
from tasks.schemas import SHARD_INDEX, write_features
from tasks.shard import shards_of_split


@dataclass(frozen=True)
class Sample:
    key: str
    class_id: int
    jpeg: bytes


def read_shard(url: str | Path) -> list[Sample]:
    """All samples of one tar, in stored order, as raw bytes (decoding happens in workers)."""
    stream = wds.WebDataset(str(url), shardshuffle=False, empty_check=False).to_tuple("__key__", "cls", "jpg")
    return [Sample(key, int(cls.decode() if isinstance(cls, bytes) else cls), jpg) for key, cls, jpg in stream]


def read_split(shards_dir: Path, split: str) -> Iterator[Sample]:
    """Every sample of one split, shard after shard, in the order index.json lists them."""
    index = json.loads((shards_dir / SHARD_INDEX).read_text())
    for entry in shards_of_split(index, split):
        yield from read_shard(shards_dir / entry["url"])


class _Decoded(Dataset):
    """Decode + preprocess by index, so DataLoader workers share the work of one shard."""

    def __init__(self, samples: list[Sample], preprocess: Preprocess):
        self.samples, self.preprocess = samples, preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        with torch.no_grad():
            return self.preprocess(decode_rgb(self.samples[i].jpeg)[None])[0]


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("extract.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


class Embedder:
    """The mapper: batches of preprocessed images -> float32 embeddings (numpy)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str):
        self.device = device
        self.cuda = device.type == "cuda"
        self.model = model.to(device).eval()
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if self.cuda else None

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device, non_blocking=True)
        if self.cuda:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            feats = self.model.encode_image(batch)
        return feats.float().cpu().numpy()


def batches(samples: list[Sample], preprocess: Preprocess, params: ExtractParams, pin: bool) -> Iterator[torch.Tensor]:
    loader = DataLoader(_Decoded(samples, preprocess), batch_size=params.batch_size, shuffle=False,
                        num_workers=params.num_workers, pin_memory=pin,
                        persistent_workers=False, prefetch_factor=4 if params.num_workers else None)
    yield from loader


def embed_shard(url: Path, out: Path, embedder: Embedder, preprocess: Preprocess, params: ExtractParams,
                metadata: dict[str, str], progress: Callable[[int], None] | None = None) -> dict:
    """Embed one shard into `out` (Arrow IPC); returns counts and timing."""
    start = time.perf_counter()
    samples = read_shard(url)
    chunks = []
    for batch in batches(samples, preprocess, params, pin=embedder.cuda):
        chunks.append(embedder(batch))
        if progress:
            progress(len(batch))
    dim = int(metadata["dim"])
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    write_features(out, [s.key for s in samples], np.array([s.class_id for s in samples], np.int32), emb, metadata)
    return {"shard": url.name, "images": len(samples), "seconds": time.perf_counter() - start}
