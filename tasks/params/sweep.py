"""`sweep`: train recipes scored on the validation classes."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from tasks.params.base import _describe, _Section
from tasks.params.train import TrainParams


class SweepParams(_Section):
    """Train recipes that the `sweep` stage scores on the validation classes.

    Each recipe is a set of changes to the `train` section; `train` as it is is
    always scored too, as the baseline. The choice goes into `train` by hand, so
    `train` stays what params.yaml says.
    """
    recipes: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def recipe(self, name: str, base: TrainParams) -> TrainParams:
        """`base` with the recipe's changes, validated like the train section itself."""
        return TrainParams.model_validate({**base.model_dump(), **self.recipes[name]})


def check_recipes(sweep: SweepParams, train: TrainParams) -> None:
    """Each recipe, applied to `train`, is a valid train section."""
    for name in sweep.recipes:
        try:
            sweep.recipe(name, train)
        except ValidationError as exc:
            problems = "; ".join(_describe(e) for e in exc.errors())
            raise ValueError(f"sweep.recipes.{name}: {problems}") from None
