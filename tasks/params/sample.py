"""`sample`: classes and images per source, their splits and class groups."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, model_validator

from tasks.params.base import _Section


class SampleParams(_Section):
    seed: int = 0
    # Images per class; raising it adds images and keeps the ones already chosen.
    samples: int = Field(ge=1)
    # Classes taken per source ("all" = every class with enough images);
    # every source in `sources` needs an entry.
    num_classes: dict[str, Union[int, Literal["all"]]]
    # Share of each source's chosen classes held out from training (query/index images):
    # the validation classes and the test classes together.
    eval_fraction: float = Field(0.6, gt=0.0, lt=1.0)
    # Share of the held-out classes that are test classes, scored and reported only;
    # the others are validation classes, on which early stopping and every sweep choose.
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    # Share of each training class's images used for validation.
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # Share of each held-out class's images used as queries; the rest is the index.
    query_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    # How each source's classes are chosen: "random" (seeded) or "most_populous"
    # (GLR2021's "top 7k classes"); sources not named here pick at random.
    pick: dict[str, Literal["random", "most_populous"]] = Field(default_factory=dict)
    # Classes with fewer images than this are skipped (and recorded).
    min_images: int = Field(2, ge=2)
    # The same label in two sources is two classes unless mapped to one name
    # here: {"<source>/<label>": "<shared class>"}.
    label_map: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _positive_counts(self) -> "SampleParams":
        for name, n in self.num_classes.items():
            if n != "all" and n < 2:
                raise ValueError(f"num_classes.{name} = {n}: must be an integer >= 2")
        return self


def check_sources(sample: SampleParams, sources: list[str]) -> None:
    """Every source has a class count, and sample names no source that is not there."""
    missing = sorted(set(sources) - set(sample.num_classes))
    extra = sorted((set(sample.num_classes) | set(sample.pick)) - set(sources))
    if missing:
        raise ValueError(f"sample.num_classes lacks sources {missing}: give each source a "
                         "class count")
    if extra:
        raise ValueError(f"sample.num_classes/pick name unknown sources {extra}: allowed are "
                         f"{sorted(sources)}")
    for key in sample.label_map:
        if key.split("/", 1)[0] not in sources or "/" not in key:
            raise ValueError(f"sample.label_map key {key!r}: must be '<source>/<label>' with a "
                             f"source from {sorted(sources)}")
