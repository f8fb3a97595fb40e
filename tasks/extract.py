"""Embed WebDataset shards with one backbone into one Arrow file per shard.

Reader -> mapper -> writer, as clip-retrieval splits it: the reader streams
(key, class, JPEG bytes) out of a tar with webdataset; decoding threads or
processes preprocess; only the mapper holds the model; the writer stores
float32 embeddings atomically with the model's identity in the metadata.
Images embedded before (same bytes, checkpoint, preprocessing) come from the
content-addressed cache instead of the model.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from tasks.decode import decode_pool
from tasks.embedding_cache import EmbeddingCache, cache_key, image_digest
from tasks.backbone import load_backbone
from tasks.params.extract import ExtractParams
from tasks.preprocess import Preprocess, decode_rgb
from tasks.schemas.features import write_features
from tasks.schemas.shards import Jpegs, Sample, SampleRef, read_shard


class _Decoded(Dataset):
    """Decode + preprocess by index: the unit of work of the in-process decoding threads."""

    def __init__(self, samples: list[Sample] | list[SampleRef], preprocess: Preprocess):
        self.samples, self.preprocess = samples, preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        with torch.no_grad():
            return self.preprocess(decode_rgb(self.samples[i].jpeg)[None])[0]


def resolve_device(choice: str) -> torch.device:
    """One device name (auto, cpu, cuda, cuda:N) -> the torch device, or a clear error."""
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"extract.device = {choice!r} but no CUDA device is visible; "
                           "use 'auto' or 'cpu'")
    if choice.startswith("cuda:") and int(choice[5:]) >= torch.cuda.device_count():
        raise RuntimeError(f"extract.device = {choice!r} but only {torch.cuda.device_count()} "
                           "CUDA devices are visible (CUDA_VISIBLE_DEVICES renumbers them from 0)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_devices(spec: str | list[str]) -> list[str]:
    """The devices extract.device names, one process each: "auto" = every visible GPU
    (cuda:0 ... cuda:N-1), or the CPU; one GPU stays "cuda", today's single-process path."""
    if spec == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] if count > 1 else ["cuda" if count else "cpu"]
    names = [spec] if isinstance(spec, str) else list(spec)
    for name in names:
        resolve_device(name)  # each one exists
    return names


class Embedder:
    """The mapper: batches of preprocessed images -> float32 embeddings (numpy).

    An image's embedding must not depend on which images share its batch or on
    the caller's thread: torch picks a CPU convolution kernel by batch size and
    intra-op thread count (1x1 convolutions leave oneDNN for another kernel at
    one thread and fewer than 16 images; a batch of one takes another path), and
    each kernel rounds differently in the last bits. So every batch is padded to
    `batch_size`, and on the CPU the model runs on exactly `cpu_threads` threads
    whatever this thread inherited (OMP_NUM_THREADS, or torch's count when a
    thread is started after the decoding threads set theirs to 1). A shard's last
    batch, cache hits or a retry then change no bytes (extract.cpu_threads).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, *,
                 batch_size: int, cpu_threads: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.batch_size, self.cpu_threads = batch_size, cpu_threads
        self.model = model.to(device).eval()
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        self.dtype = dtypes.get(precision) if self.cuda else None

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        n = len(batch)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch of {n} images: the embedder takes 1 to {self.batch_size}")
        batch = batch.to(self.device, non_blocking=True)
        if n < self.batch_size:  # the same shape, and so the same kernels, for every batch
            batch = torch.cat([batch, batch.new_zeros((self.batch_size - n, *batch.shape[1:]))])
        if self.cuda:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with _intra_op_threads(None if self.cuda else self.cpu_threads), \
                torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            feats = self.model.encode_image(batch)
        return feats[:n].float().cpu().numpy()


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """This thread's torch intra-op threads set to `threads` (None: left as they are)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_workers(params: ExtractParams, device: torch.device) -> int:
    """Decoding processes: none on a CPU, where decoding in parallel
    with the model only makes the two fight over the same cores; on CUDA the
    cores are free while the GPU computes, so they decode ahead."""
    if params.num_workers != "auto":
        return params.num_workers
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def batches(samples: list[Sample] | list[SampleRef], preprocess: Preprocess,
            params: ExtractParams, device: torch.device) -> Iterator[torch.Tensor]:
    """Preprocessed batches in order (of SampleRefs: each image read from its shard as its
    batch comes, so a split's bytes are never all in memory).

    With decoding workers, a process pool that outlives the shard decodes
    small chunks ahead of the model (pinned for non-blocking copies on CUDA;
    tasks/decode.py). Without them, each batch is decoded by a thread pool as
    wide as the model's threads (extract.cpu_threads), between model calls: decoding then gets
    every core for a moment instead of preempting the model's OpenMP threads
    all the time (on 2 cores this is measurably faster, see benchmarks/extract.py).
    """
    workers = decode_workers(params, device)
    if workers:
        pool = decode_pool(preprocess, workers)
        yield from pool.batches(Jpegs(samples), params.batch_size,
                                pin=device.type == "cuda")
        return
    data = _Decoded(samples, preprocess)
    # One intra-op thread per decoding thread (OpenMP's setting is per thread): a
    # decoding thread with a team of its own would leave spinning OpenMP workers
    # behind that slow the model's next batch.
    with ThreadPoolExecutor(params.cpu_threads, thread_name_prefix="decode",
                            initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for start in range(0, len(data), params.batch_size):
            stop = min(start + params.batch_size, len(data))
            yield torch.stack(list(pool.map(data.__getitem__, range(start, stop))))


@dataclass
class Worker:
    """What one process needs to embed shards: loaded once, reused for every shard it is given."""

    embedder: Embedder
    preprocess: Preprocess
    metadata: dict[str, str]
    cache: EmbeddingCache | None


_workers: dict[tuple, Worker] = {}
_workers_lock = threading.Lock()


def feature_metadata(variant: str, info: dict) -> dict[str, str]:
    """The model identity every feature file carries (readable without project code)."""
    return {"variant": variant, "model_name": info["model_name"], "pretrained": info["pretrained"],
            "checkpoint_sha256": info["checkpoint_sha256"], "image_size": str(info["image_size"]),
            "dim": str(info["dim"])}


def get_worker(model_dir: str, params: ExtractParams) -> Worker:
    """The process-wide Worker for a model: a Dask worker, a device's process or a thread
    pool loads the model once, not per shard.

    Keyed by the checkpoint's hash too, so a long-lived Dask worker picks up
    a rebuilt model at the same path instead of serving the old one.
    """
    checkpoint = json.loads((Path(model_dir) / "model.json").read_text())["checkpoint_sha256"]
    key = (str(model_dir), checkpoint, params.device, params.precision, params.batch_size,
           params.cpu_threads, params.cache_dir)
    with _workers_lock:
        if key not in _workers:
            for old in [k for k in _workers if k[0] == key[0]]:
                del _workers[old]  # one model per folder in memory
            device = resolve_device(params.device)
            if device.index is not None:  # cuda:N: also for pinned memory and the cache key
                torch.cuda.set_device(device)
            model, preprocess, info = load_backbone(model_dir, device="cpu")
            cache = None
            if params.cache_dir:
                ck = cache_key(model_dir, device.type, params.precision,
                               batch_size=params.batch_size, cpu_threads=params.cpu_threads)
                cache = EmbeddingCache(params.cache_dir, ck, int(info["dim"]))
            embedder = Embedder(model, device, params.precision, batch_size=params.batch_size,
                                cpu_threads=params.cpu_threads)
            _workers[key] = Worker(embedder, preprocess,
                                   feature_metadata(Path(model_dir).name, info), cache)
        return _workers[key]


def embed_shard(url: Path, out: Path, embedder: Embedder, preprocess: Preprocess,
                params: ExtractParams, metadata: dict[str, str],
                progress: Callable[[int], None] | None = None,
                cache: EmbeddingCache | None = None) -> dict:
    """Embed one shard into `out` (Arrow IPC, written atomically); returns counts and timing.

    Images whose bytes the cache already holds are not decoded at all; new
    embeddings go into the cache every `params.flush_every` images, so a
    killed run resumes where it stopped. Identical images in a shard are
    embedded once.
    """
    start = time.perf_counter()
    samples = read_shard(url)
    dim = int(metadata["dim"])
    digests = [image_digest(s.jpeg) for s in samples]
    if cache is not None:
        hit, emb = cache.get(digests)
    else:
        hit, emb = np.zeros(len(samples), bool), np.zeros((len(samples), dim), np.float32)
    if progress and hit.any():
        progress(int(hit.sum()))
    first: dict[bytes, int] = {}
    for i in np.flatnonzero(~hit):
        first.setdefault(digests[i], int(i))
    todo = list(first.values())
    done = flushed = 0
    for batch in batches([samples[i] for i in todo], preprocess, params, embedder.device):
        emb[todo[done:done + len(batch)]] = embedder(batch)
        done += len(batch)
        if cache is not None and (done - flushed >= params.flush_every or done == len(todo)):
            new = todo[flushed:done]
            cache.put([digests[i] for i in new], emb[new])
            flushed = done
        if progress:
            progress(len(batch))
    for i in np.flatnonzero(~hit):  # duplicates within the shard take their first copy's row
        emb[i] = emb[first[digests[i]]]
    write_features(out, [s.key for s in samples],
                   np.array([s.class_id for s in samples], np.int32), emb, metadata)
    return {"shard": Path(url).name, "images": len(samples), "embedded": len(todo),
            "cached": int(hit.sum()), "seconds": time.perf_counter() - start}
