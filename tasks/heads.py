"""The embedding head and the ArcFace loss it is trained with.

Head: Dropout -> Linear(D, 64) -> L2 normalisation (the Dense-64 recipe).
ArcFace adds an angular margin m to the angle between an embedding and its
own class centre, then scales all cosines by s, so classes must be separated
by an angle, not just ranked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(self.dropout(x)), dim=-1)


class ArcFace(nn.Module):
    """Additive angular margin logits: s * cos(theta_y + m) for the true class, s * cos(theta_j) otherwise."""

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb, dim=-1), F.normalize(self.weight, dim=-1)).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(cos)
        target = torch.cos(theta + self.margin)
        # Past pi - m, cos(theta + m) would rise again: fall back to a linear penalty (the usual "easy margin" guard).
        limit = math.pi - self.margin
        target = torch.where(theta <= limit, target, cos - math.sin(self.margin) * self.margin)
        one_hot = F.one_hot(labels, cos.shape[1]).bool()
        return self.scale * torch.where(one_hot, target, cos)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(emb, labels), labels)

    @torch.no_grad()
    def predict(self, emb: torch.Tensor) -> torch.Tensor:
        """Nearest class centre by cosine (no margin)."""
        return F.linear(F.normalize(emb, dim=-1), F.normalize(self.weight, dim=-1)).argmax(dim=-1)
