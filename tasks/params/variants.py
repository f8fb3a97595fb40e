"""`variants`: the backbones the pipeline embeds, each with the stage group that makes it.

A backbone folder comes from one of three stage groups: `models@<name>` builds it from
weights, `finetune@<run>` fine-tunes one on the shards, `soup@<name>` averages fine-tuned
runs. Each writes to its own folder (data/00_models, data/00_finetuned, data/00_soups), so
that a soup can depend on the fine-tuned runs without depending on itself. `extract@<name>`
embeds every variant listed here and `evaluate` scores each one zero-shot; the head
concatenates `train.backbones` of them (all of them when that is null), in order.

```yaml
variants: {lite0: models, lite2: models, lite0_soup: soups}
train: {backbones: [lite0_soup, lite2]}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import StringConstraints

from tasks.params.base import ParamsError
from tasks.schemas.paths import FINETUNED_DIR, MODELS_DIR, SOUPS_DIR

VariantSource = Literal["models", "finetuned", "soups"]
SOURCE_DIRS: dict[str, Path] = {"models": MODELS_DIR, "finetuned": FINETUNED_DIR,
                                "soups": SOUPS_DIR}

# The section: variant name (a folder name and a stage key) -> the stage group making it.
VariantsParams = dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+$")],
                      VariantSource]


def variant_dir(name: str, variants: dict[str, str]) -> Path:
    """The folder variant `name` is read from (the models stage's layout)."""
    if name not in variants:
        raise ParamsError(f"backbone {name!r} is not in variants {sorted(variants)}")
    return SOURCE_DIRS[variants[name]] / name


def head_backbones(variants: dict[str, str], chosen: list[str] | None) -> list[str]:
    """The backbones the head concatenates, in order: `chosen` (`train.backbones`), or every
    variant when it is None."""
    names = list(variants) if chosen is None else list(chosen)
    if not names:
        raise ParamsError("no backbones: params.yaml `variants` (or train.backbones) is empty")
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise ParamsError(f"train.backbones {unknown} are not in variants {sorted(variants)}")
    return names
