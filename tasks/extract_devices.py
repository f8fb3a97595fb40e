"""Embed shards on several devices of one machine at once: one process per device.

clip-retrieval's users hit the wall this removes (its issue #292): every task of a
distributed run went to GPU 0, and an 8-GPU machine ran at 1/8 of its speed. Here each
device gets its own spawned process (CUDA cannot be forked) that pins its device
(torch.cuda.set_device with the explicit `cuda:N`, never the default GPU 0), loads the
model once and embeds shard after shard with the single-device code (tasks/extract.py),
so every feature file is the one a single device writes, atomically as always.

Shards are handed out from a shared counter, not split in advance: device r starts with
shard r, and after that whichever device is free takes the next one, so a slower or busier
device takes fewer. The processes share the embedding cache: each adds its own uniquely
named chunk files, atomically (tasks/embedding_cache.py), and none rewrites another's.
Per-shard statistics come back on a queue, so the flow logs and counts them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from pathlib import Path
from typing import Iterator

import torch

from tasks.extract import embed_shard, get_worker
from tasks.params.extract import ExtractParams

# How often the parent checks that no device process died without a word (a kill, OOM).
_POLL_S = 1.0


def _serve(rank: int, device: str, jobs: list[tuple[str, str]], model_dir: str,
           params: ExtractParams, next_job, results) -> None:
    """One device's process: shard `rank` first, then the next unclaimed one, until none."""
    try:
        torch.set_num_threads(params.cpu_threads)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        params = params.model_copy(update={"device": device})
        w = get_worker(model_dir, params)
        i = rank
        while i < len(jobs):
            url, out = jobs[i]
            stats = embed_shard(Path(url), Path(out), w.embedder, w.preprocess, params,
                                w.metadata, cache=w.cache)
            results.put(("shard", {**stats, "device": device, "pid": os.getpid()}))
            with next_job.get_lock():
                i = next_job.value
                next_job.value += 1
        results.put(("done", rank))
    except BaseException:
        results.put(("error", f"extract on {device} failed:\n{traceback.format_exc()}"))


def _check_alive(procs: list, finished: set[int], results, shards: list[dict]) -> None:
    """Raise for a process that exited before saying it was done (`finished`: ranks). Its
    last words may still be in the queue (an error's traceback is put just before the
    exit): those are read first, so a failure is reported with its traceback, not as a
    bare exit code; shard statistics read on the way go to `shards`. Only the messages
    already queued are read (a dead process sends no more), so the check does not wait
    for the live ones."""
    dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in finished]
    if not dead:
        return
    try:
        queued = results.qsize()
    except NotImplementedError:  # macOS: read what is there without waiting
        queued = None
    try:
        while queued is None or queued > 0:
            kind, payload = (results.get_nowait() if queued is None
                             else results.get(timeout=_POLL_S))
            queued = None if queued is None else queued - 1
            if kind == "error":
                raise RuntimeError(payload)
            if kind == "done":
                finished.add(payload)
            elif kind == "shard":
                shards.append(payload)
    except queue.Empty:
        pass
    dead = [procs[r] for r in dead if r not in finished]
    if dead:
        raise RuntimeError(f"{dead[0].name} died with exit code {dead[0].exitcode} before it "
                           "finished its shards")


def embed_on_devices(jobs: list[tuple[str, str]], model_dir: str, params: ExtractParams,
                     devices: list[str]) -> Iterator[dict]:
    """Embed (shard url, feature file) jobs with one process per device; yields each shard's
    stats (embed_shard's, plus `device` and `pid`) as it finishes.

    A process that fails or dies (a kill, the OOM killer) before it said it was done stops
    the others and raises here, as soon as it is seen, not when the others fall quiet; the
    shards written by then stay, and the cache makes a rerun skip what was embedded. A
    process that said it was done and then exited badly (a driver's teardown) has lost
    nothing, so it fails nothing.
    """
    if not jobs:
        return
    devices = devices[:len(jobs)]  # no process for a device with nothing to do
    ctx = mp.get_context("spawn")
    next_job = ctx.Value("q", len(devices))
    results = ctx.Queue()
    # Not daemonic: a process on a GPU starts decoding processes of its own.
    procs = [ctx.Process(target=_serve, name=f"extract-{device}",
                         args=(rank, device, jobs, model_dir, params, next_job, results))
             for rank, device in enumerate(devices)]
    for p in procs:
        p.start()
    try:
        finished: set[int] = set()  # ranks of the processes that said they were done
        while len(finished) < len(procs):
            try:
                kind, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                kind, payload = None, None
            if kind == "error":
                raise RuntimeError(payload)
            if kind == "done":
                finished.add(payload)
            shards = [payload] if kind == "shard" else []
            _check_alive(procs, finished, results, shards)
            yield from shards
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        results.close()
