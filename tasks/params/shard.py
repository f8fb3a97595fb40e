"""`shard`: how the sampled images are packed into WebDataset tars."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field

from tasks.params.base import _Section


class ShardParams(_Section):
    # Settings that change how fast the stage runs, never a byte it writes (each tested):
    # not DVC params of the stage, so tuning them for another machine reruns nothing.
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({"processes"})

    # Samples per tar; ~1000 is the WebDataset sweet spot for real data.
    max_samples: int = Field(1000, ge=1)
    # Longer side after shard-time downscaling; backbones see <= 336 px anyway.
    max_side: int = Field(512, ge=32)
    jpeg_quality: int = Field(92, ge=50, le=100)
    # Worker processes writing shards (a shard's Python work holds the GIL, so threads do
    # not add up); auto = one per core this process may use, 1 = in this process. Every
    # count writes the same bytes.
    processes: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
