"""`soup`: model soups of fine-tuned runs of one backbone, one `soup@<name>` each."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from tasks.params.base import _Section


class SoupSpec(_Section):
    """One soup: how it is made and of which runs.

    `runs` are names of fine-tuning runs (`finetune.runs`), read from their folders in
    data/00_finetuned/: the folder dvc.yaml's soup@<name> depends on.
    """

    # uniform: the mean of every run. greedy (Wortsman et al.): runs ranked by their own
    # validation classes' mP@5, each added only if the soup's strictly rises.
    kind: Literal["uniform", "greedy"]
    runs: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+$")]] = Field(
        min_length=1)
    # greedy only: train images the zero-shot PCA of the score is fitted on, a seeded sample
    # (evaluate.seed); null = as the evaluate stage fits it (at most evaluate.pca_train_max).
    # Every try embeds them anew (read from the shards a batch at a time): cap it lower on a
    # large train split to score faster.
    pca_fit_images: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _runs(self) -> "SoupSpec":
        if len(set(self.runs)) < len(self.runs):
            raise ValueError(f"runs {self.runs}: a run listed twice would count twice")
        if self.kind == "uniform" and len(self.runs) < 2:
            raise ValueError("a uniform soup needs at least two runs")
        if self.kind == "uniform" and self.pca_fit_images is not None:
            raise ValueError("pca_fit_images is for greedy soups (a uniform soup is not scored)")
        return self


# The section: soup name (a folder name and a stage key) -> its spec.
SoupParams = dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+$")], SoupSpec]
