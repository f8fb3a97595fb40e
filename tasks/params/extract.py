"""`extract`: how every backbone embeds the shards."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from tasks.params.base import _Section


class ExtractParams(_Section):
    # Settings that change how fast the stage runs, never a byte it writes (tested: decoding
    # processes, the cache and its flushes, shards embedded at once): not DVC params of the
    # stage, so tuning them for another machine reruns nothing. The runner and the Dask
    # cluster are params: with `device: auto` they choose the hardware (this machine's CPU
    # or a cluster's GPUs), and so the bytes.
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({
        "num_workers", "cache_dir", "flush_every", "threads"})

    batch_size: int = Field(32, ge=1)
    # DataLoader worker processes decoding JPEGs ahead of the model; 0 = a
    # thread pool in-process between batches; auto = 0 on CPU, up to 8 on CUDA.
    num_workers: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = "auto"
    # Where the model runs: "auto" = every visible GPU (one process each), else the CPU;
    # "cpu", "cuda" (the current GPU), "cuda:N"; or several, one process per entry, as a
    # list or "cuda:0,cuda:2" ([cpu, cpu]: two CPU processes of cpu_threads threads each).
    device: Union[str, list[str]] = "auto"
    # Autocast dtype on CUDA; the CPU path always runs fp32.
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    # Per-image embedding cache (image bytes + checkpoint + preprocessing ->
    # embedding), outside DVC's outputs so a rerun stage reuses what it
    # computed and a killed run resumes; "" turns it off.
    cache_dir: str = ".cache/embeddings"
    # Embeddings are added to the cache at least every this many images, so a
    # kill inside a long shard loses at most this much work.
    flush_every: int = Field(2048, ge=1)
    # Prefect task runner mapping shards: "threads" in this process, or "dask"
    # on the existing cluster at `dask_address` (one model load per worker).
    runner: Literal["threads", "dask"] = "threads"
    threads: int = Field(1, ge=1)
    # The model's intra-op threads on the CPU, whatever the process inherited
    # (OMP_NUM_THREADS, a worker thread's count): torch picks convolution kernels
    # by thread count and batch size (batches are padded to batch_size), and each
    # rounds differently; fixed, every machine of one CPU family computes the
    # same bytes. Also the width of the decoding thread pool.
    cpu_threads: int = Field(2, ge=1)
    dask_address: str | None = None
    # Dask resources each shard task asks of a worker; None = {GPU: 1} when device is
    # "cuda" (workers started with `--resources GPU=1`, one per GPU), else none.
    dask_resources: dict[str, float] | None = None

    @field_validator("device", mode="before")
    @classmethod
    def _device_spec(cls, value: object) -> str | list[str]:
        """One device name, or a list of two or more of one kind; "cuda:0,cuda:2" -> a list."""
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if "," in value else value
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{value!r}: a device name or a non-empty list of them")
        for name in names:
            if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
                raise ValueError(f"{name!r} is not a device: use auto, cpu, cuda or cuda:N")
        if len(names) == 1:
            return names[0]
        if "auto" in names:
            raise ValueError("'auto' stands alone: it already means every visible GPU")
        if len({n.split(":")[0] for n in names}) > 1:
            raise ValueError(f"{names}: devices of one kind only (CPU and GPU embeddings differ)")
        if "cuda" in names:
            raise ValueError(f"{names}: name each GPU of a list by index (cuda:0, cuda:1, ...)")
        if names[0] != "cpu" and len(set(names)) < len(names):
            raise ValueError(f"{names}: a GPU listed twice; one process per GPU")
        return names

    @model_validator(mode="after")
    def _dask_needs_address(self) -> "ExtractParams":
        if self.runner == "dask" and not self.dask_address:
            raise ValueError("extract.runner = 'dask' needs extract.dask_address, "
                             "e.g. 'tcp://scheduler:8786'")
        if self.runner == "dask" and isinstance(self.device, list):
            raise ValueError("extract.runner = 'dask' takes one device name: each Dask worker "
                             "is one device (start one worker per GPU; README, extract)")
        return self
