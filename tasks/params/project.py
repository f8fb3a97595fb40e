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
from tasks.params.finetune import FinetuneParams, check_runs
from tasks.params.models import ModelParams
from tasks.params.sample import SampleParams, check_sources
from tasks.params.shard import ShardParams
from tasks.params.soup import SoupParams
from tasks.params.sources import SourceParams
from tasks.params.sweep import SweepParams, check_recipes
from tasks.params.train import TrainParams
from tasks.params.variants import VariantsParams, head_backbones


class Params(_Section):
    models: dict[str, ModelParams]
    variants: VariantsParams
    sources: dict[str, SourceParams]
    sample: SampleParams
    shard: ShardParams
    extract: ExtractParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    sweep: SweepParams = Field(default_factory=SweepParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    soup: SoupParams = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        if not self.models:
            raise ValueError("models: needs at least one backbone variant")
        if not self.sources:
            raise ValueError("sources: needs at least one source")
        check_sources(self.sample, list(self.sources))
        check_recipes(self.sweep, self.train)
        self._check_variants()
        for name in list(self.models) + list(self.sources):
            if not name.replace("_", "").isalnum():
                raise ValueError(f"name {name!r}: use letters, digits and '_' only "
                                 "(it becomes a path and a key)")
        return self

    def _check_variants(self) -> None:
        """Every variant is made by the stage group it names; the head's backbones are
        variants; a soup's runs are fine-tuning runs."""
        if not self.variants:
            raise ValueError("variants: needs at least one backbone to embed")
        check_runs(self.finetune, list(self.models))
        for name, spec in self.soup.items():
            unknown = [run for run in spec.runs if run not in self.finetune.runs]
            if unknown:
                raise ValueError(f"soup.{name}.runs: {unknown} are not finetune.runs "
                                 f"({sorted(self.finetune.runs)})")
        made = {"models": set(self.models), "finetuned": set(self.finetune.runs),
                "soups": set(self.soup)}
        for name, source in self.variants.items():
            if name not in made[source]:
                section = {"models": "models", "finetuned": "finetune.runs",
                           "soups": "soup"}[source]
                raise ValueError(f"variants.{name} = {source}: {section} has no {name!r}; "
                                 f"it has {sorted(made[source])}")
        head_backbones(self.variants, self.train.backbones)
        built = [n for names in made.values() for n in names]
        clash = sorted({n for n in built if built.count(n) > 1})
        if clash:
            raise ValueError(f"names {clash} are used by more than one of models, "
                             "finetune.runs and soup: a variant name must say which")


def parse_params(raw: dict[str, Any], origin: str = "params.yaml") -> Params:
    """Validate a params mapping, raising ParamsError with one readable line per problem."""
    return validate(Params, raw, origin)


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read params.yaml safely and validate all of it."""
    return parse_params(read_raw(path), origin=str(path))
