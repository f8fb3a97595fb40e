"""Load a backbone variant from the folder the `models` stage wrote (open_clip `local-dir:`).

The one loading path of every reader (extract, export, parity), apart from the code that
builds the folder, so a change to how variants are built does not touch their readers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

from tasks.preprocess import Preprocess


CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def load_backbone(model_dir: Path | str, device: str = "cpu") -> tuple[torch.nn.Module, Preprocess, dict[str, Any]]:
    """Load a variant through open_clip; returns (model in eval mode, tensor preprocess, model info).

    The preprocessing follows the config open_clip resolved for the model
    (size, mean, std, interpolation, resize mode), as a module on uint8
    tensors that the exported embedder can hold too.
    """
    model_dir = Path(model_dir)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}", device=device)
    model.eval()
    info = json.loads((model_dir / "model.json").read_text())
    return model, Preprocess.from_cfg(model.visual.preprocess_cfg), info
