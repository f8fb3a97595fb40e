"""`export`: the one-file embedder and how closely it must match the pipeline."""

from __future__ import annotations

from pydantic import Field

from tasks.params.base import _Section


class ExportParams(_Section):
    # Eval images on which the exported embedder must reproduce the pipeline's embeddings.
    verify_images: int = Field(64, ge=1)
    # Largest |exported - pipeline| allowed (float rounding of two resize implementations).
    tolerance: float = Field(1e-3, gt=0.0)
    # CPU threads for the check: its max |difference|, written to embedder.json and
    # tracked in dvc.lock, changes in the last bits with the thread count; fixed, a
    # fresh clone writes the same file whatever OMP_NUM_THREADS says.
    threads: int = Field(2, ge=1)
