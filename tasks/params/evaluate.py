"""`evaluate`: mP@k on the test classes, with bootstrap intervals."""

from __future__ import annotations

from pydantic import Field

from tasks.params.base import _Section


class EvaluateParams(_Section):
    k: int = Field(5, ge=1)
    # PCA output size of the zero-shot baselines; GUIE caps embeddings at 64.
    pca_dim: int = Field(64, ge=2, le=64)
    # Bootstrap intervals over query classes: resamples, level, and the seed that
    # makes them the same on every rerun.
    bootstrap_resamples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0
    # CPU threads for search and PCA: the sums' order, and so the last bits of a
    # distance, depend on it; fixed, reruns give the same bytes.
    threads: int = Field(1, ge=1)
