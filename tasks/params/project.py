"""The whole params.yaml, every section and the checks across them.

Used where all of it must be valid: the `inputs` stage (first in every run), presets, and
the pipeline flow. A stage reads only its own sections (tasks/params/base.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from tasks.params.base import PARAMS_FILE, _Section, read_raw, validate
from tasks.params.evaluate import EvaluateParams
from tasks.params.export import ExportParams
from tasks.params.extract import ExtractParams
from tasks.params.models import ModelParams
from tasks.params.sample import SampleParams, check_sources
from tasks.params.shard import ShardParams
from tasks.params.sources import SourceParams
from tasks.params.sweep import SweepParams, check_recipes
from tasks.params.train import TrainParams


class Params(_Section):
    models: dict[str, ModelParams]
    sources: dict[str, SourceParams]
    sample: SampleParams
    shard: ShardParams
    extract: ExtractParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    sweep: SweepParams = Field(default_factory=SweepParams)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        if not self.models:
            raise ValueError("models: needs at least one backbone variant")
        if not self.sources:
            raise ValueError("sources: needs at least one source")
        check_sources(self.sample, list(self.sources))
        check_recipes(self.sweep, self.train)
        for name in list(self.models) + list(self.sources):
            if not name.replace("_", "").isalnum():
                raise ValueError(f"name {name!r}: use letters, digits and '_' only (it becomes a path and a key)")
        return self


def parse_params(raw: dict[str, Any], origin: str = "params.yaml") -> Params:
    """Validate a params mapping, raising ParamsError with one readable line per problem."""
    return validate(Params, raw, origin)


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read params.yaml safely and validate all of it."""
    return parse_params(read_raw(path), origin=str(path))
