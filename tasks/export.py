"""The product as one file: uint8 images in, L2-normalised 64-d embeddings out.

The exported program (torch.export, `.pt2`) holds each backbone's
preprocessing, each backbone, the per-backbone normalisation, the
concatenation and the head, so anyone can load it with plain torch
(`torch.export.load(path).module()`) and no project code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from tasks.preprocess import Preprocess
from tasks.schemas.io import atomic_path


class Embedder(nn.Module):
    """images uint8 (N, 3, H, W) RGB -> float32 (N, 64), unit length."""

    def __init__(self, towers: list[tuple[Preprocess, nn.Module]], head: nn.Module):
        super().__init__()
        self.preprocess = nn.ModuleList(p for p, _ in towers)
        self.backbones = nn.ModuleList(v for _, v in towers)
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = [F.normalize(visual(pre(images)), dim=-1)
                 for pre, visual in zip(self.preprocess, self.backbones)]
        return self.head(torch.cat(feats, dim=1)).float()


def export_embedder(embedder: Embedder, out: Path, example: torch.Tensor) -> None:
    """torch.export with a dynamic batch size and image size, saved atomically as `.pt2`."""
    embedder.eval()
    shapes = ({0: Dim("batch", min=1, max=4096), 2: Dim("height", min=16, max=8192),
               3: Dim("width", min=16, max=8192)},)
    with torch.no_grad():
        program = torch.export.export(embedder, (example,), dynamic_shapes=shapes)
    with atomic_path(out) as tmp:
        torch.export.save(program, str(tmp))


def load_exported(path: Path | str) -> nn.Module:
    """The exported embedder as a callable module (plain torch, no project code)."""
    return torch.export.load(str(path)).module()


def embed_images(model: nn.Module, images: list[torch.Tensor]) -> np.ndarray:
    """Embed uint8 (3, H, W) images of any sizes: equal sizes are batched together."""
    out = np.zeros((len(images), 0), np.float32)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    results: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for idx in groups.values():
            emb = model(torch.stack([images[i] for i in idx])).numpy()
            results.update(zip(idx, emb))
    return np.stack([results[i] for i in range(len(images))]) if images else out
