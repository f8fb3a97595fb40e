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
from safetensors.torch import save_file

from tasks.preprocess import Preprocess
from tasks.schemas.io import atomic_path, sha256_file, write_json


CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def load_backbone(model_dir: Path | str,
                  device: str = "cpu") -> tuple[torch.nn.Module, Preprocess, dict[str, Any]]:
    """Load a variant through open_clip: (model in eval mode, tensor preprocess, model info).

    The preprocessing follows the config open_clip resolved for the model
    (size, mean, std, interpolation, resize mode), as a module on uint8
    tensors that the exported embedder can hold too.
    """
    model_dir = Path(model_dir)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}", device=device)
    model.eval()
    info = json.loads((model_dir / "model.json").read_text())
    return model, Preprocess.from_cfg(model.visual.preprocess_cfg), info


def save_variant(out_dir: Path, config: dict[str, Any], model: torch.nn.Module,
                 source: dict[str, str]) -> dict[str, Any]:
    """Write a variant folder: weights (safetensors), the open_clip config, and model.json
    (`source` plus the weights' sha256, image size and output dim), which readers take as
    the folder's provenance. Used by every stage that makes a backbone."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(out_dir / CONFIG_NAME, config)
    info = {**source, "checkpoint_sha256": sha256_file(out_dir / WEIGHTS_NAME),
            "image_size": _square_side(config["preprocess_cfg"]["size"]),
            "dim": config["model_cfg"]["embed_dim"]}
    write_json(out_dir / "model.json", info)
    return info


def _square_side(size: int | list[int]) -> int:
    """open_clip gives image sizes as an int or an (H, W) pair; every backbone here is square."""
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise ValueError(f"non-square input size {size}: not supported")
    return int(size[0])
