"""`extract`: how every backbone embeds the shards."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from tasks.params.base import _Section


class ExtractParams(_Section):
    batch_size: int = Field(32, ge=1)
    # DataLoader worker processes decoding JPEGs ahead of the model; 0 = a
    # thread pool in-process between batches; auto = 0 on CPU, up to 8 on CUDA.
    num_workers: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
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

    @model_validator(mode="after")
    def _dask_needs_address(self) -> "ExtractParams":
        if self.runner == "dask" and not self.dask_address:
            raise ValueError("extract.runner = 'dask' needs extract.dask_address, e.g. 'tcp://scheduler:8786'")
        return self
