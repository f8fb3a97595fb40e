"""`evaluate`: mP@k on the test classes, with bootstrap intervals."""

from __future__ import annotations

from typing import ClassVar

import faiss
from pydantic import Field, field_validator, model_validator

from tasks.params.base import _Section


class EvaluateParams(_Section):
    # Settings that change how fast the stage runs, never a byte it writes (tested: blocks of
    # queries give the bits of one search): not DVC params of the stage.
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({"query_block"})

    k: int = Field(5, ge=1)
    # PCA output size of the zero-shot baselines; GUIE caps embeddings at 64.
    pca_dim: int = Field(64, ge=2, le=64)
    # Train images the PCA is fitted on: all up to this many, else a seeded sample read
    # from the memory-mapped features, so the fit's memory stays bounded (the 2xclip
    # preset's whole train split, ~570,000 x 1,536 floats, would be 3.5 GB a copy).
    pca_train_max: int = Field(100_000, ge=2)
    # Bootstrap intervals over query classes: resamples, level, and the seed that
    # makes them the same on every rerun.
    bootstrap_resamples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0
    # CPU threads for search and PCA: the sums' order, and so the last bits of a
    # distance, depend on it; fixed, reruns give the same bytes.
    threads: int = Field(1, ge=1)
    # Queries searched by one faiss call: bounds the float32 copy of the queries and faiss's
    # scratch space to one block; rounded up to whole faiss query tiles (4096), so results
    # are the same bits as one call over all queries.
    query_block: int = Field(16384, ge=1)
    # Exact (flat) search while a group's index has at most this many images; beyond it an
    # approximate index, whose recall@k against exact search is measured and reported.
    # 10^6 x 64-d is 256 MB and ~1 min of exact search per 10^4 queries on one core.
    exact_max_index: int = Field(1_000_000, ge=1)
    # The approximate index (a faiss factory string) and its search setting (a faiss
    # ParameterSpace string). On clustered 64-d data (benchmarks/search.py, README) HNSW32
    # at efSearch=128 found 95.5% of the exact top 5 at 10^5 images (mP@5 0.61) but only
    # 67.5% at 10^6 (mP@5 0.33), and took 12 min to build there on one core; IVF1024
    # needed a quarter of its lists probed for 96% at 10^5, and was then slower than flat
    # search. Built on one thread (`threads`), the graph is the same every run.
    approximate_index: str = "HNSW32,Flat"
    approximate_search: str = "efSearch=128"
    # Queries (a seeded sample) searched exactly too, to measure the approximate recall@k.
    recall_queries: int = Field(1000, ge=1)

    @field_validator("approximate_index")
    @classmethod
    def _factory(cls, value: str) -> str:
        try:
            faiss.index_factory(64, value)
        except RuntimeError as err:
            raise ValueError(f"not a faiss index factory string: {value!r}") from err
        return value

    @model_validator(mode="after")
    def _search_setting(self) -> "EvaluateParams":
        try:
            faiss.ParameterSpace().set_index_parameters(
                faiss.index_factory(64, self.approximate_index), self.approximate_search)
        except RuntimeError as err:
            raise ValueError(f"approximate_search {self.approximate_search!r} is not a search "
                             f"setting of {self.approximate_index!r}") from err
        return self
