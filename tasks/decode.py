"""Decoding processes that outlive a shard: JPEG bytes in, preprocessed tensors out, in order.

With a GPU the model outruns one CPU core's decoding many times over, so
images are decoded and preprocessed in worker processes. A DataLoader per
shard would start its workers again for every shard and hand each a whole
model batch to decode before the GPU sees any of it; this pool starts its
processes once per process and preprocessing config, decodes small chunks,
keeps a bounded number of them in flight, and returns tensors through shared
memory (torch's multiprocessing reductions).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterator, Sequence

import torch
import torch.multiprocessing

from tasks.preprocess import Preprocess, decode_rgb

_preprocess: Preprocess | None = None  # set in each worker process by _start


def _start(preprocess: Preprocess, parent: int) -> None:
    global _preprocess
    _preprocess = preprocess
    torch.set_num_threads(1)  # one core per process: the processes are the parallelism
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int, every: float = 1.0) -> None:
    """Exit once `parent` is gone. A parent killed by a signal (a device process that
    `extract` terminates, an OOM kill) never shuts its pool down, and its workers would
    wait for work forever; torch's DataLoader workers watch their parent the same way."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def _decode(jpegs: list[bytes]) -> torch.Tensor:
    assert _preprocess is not None
    with torch.no_grad():
        return torch.cat([_preprocess(decode_rgb(data)[None]) for data in jpegs])


class DecodePool:
    """`workers` processes preprocessing JPEGs for one Preprocess; reused for every shard."""

    def __init__(self, preprocess: Preprocess, workers: int):
        # fork, as DataLoader does: children inherit the loaded modules and never touch CUDA
        context = torch.multiprocessing.get_context("fork")
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start, initargs=(preprocess, os.getpid())
        )

    def batches(self, jpegs: Sequence[bytes], batch_size: int, pin: bool) -> Iterator[torch.Tensor]:
        """Batches of `batch_size` preprocessed images (the last one shorter), in input order.

        Chunks of at most 16 images spread a batch over all processes; at most
        four chunks a process are in flight, which bounds the memory ahead of
        the model.
        """
        chunk = max(1, min(16, batch_size // self.workers))
        starts = iter(range(0, len(jpegs), chunk))
        in_flight: deque[Future] = deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                in_flight.append(self._executor.submit(_decode, list(jpegs[start : start + chunk])))

        for _ in range(4 * self.workers):
            submit()
        ready: list[torch.Tensor] = []
        count = 0
        while in_flight:
            part = in_flight.popleft().result()
            submit()
            ready.append(part)
            count += len(part)
            while count >= batch_size or (not in_flight and count):
                joined = torch.cat(ready)
                batch, rest = joined[:batch_size], joined[batch_size:]
                ready, count = ([rest] if len(rest) else []), len(rest)
                yield batch.pin_memory() if pin else batch

    def close(self) -> None:
        self._executor.shutdown(cancel_futures=True)


_pools: dict[tuple, DecodePool] = {}
_pools_lock = threading.Lock()


def _pool_key(preprocess: Preprocess, workers: int) -> tuple:
    return (
        preprocess.size,
        preprocess.interpolation,
        preprocess.resize_mode,
        tuple(preprocess.mean.flatten().tolist()),
        tuple(preprocess.std.flatten().tolist()),
        workers,
    )


def decode_pool(preprocess: Preprocess, workers: int) -> DecodePool:
    """The process-wide pool for this preprocessing and worker count (started on first use)."""
    key = _pool_key(preprocess, workers)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = DecodePool(preprocess, workers)
        return _pools[key]


def release_pool(preprocess: Preprocess, workers: int) -> None:
    """Stop this preprocessing's pool, if one was started: a fine-tuning run that steps up
    its input size leaves the old size's processes with nothing more to decode."""
    with _pools_lock:
        pool = _pools.pop(_pool_key(preprocess, workers), None)
    if pool is not None:
        pool.close()
