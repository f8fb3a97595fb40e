"""Embedding heads and the ArcFace family of losses the top GUIE entries trained them with.

Heads (all end in L2 normalisation, so Euclidean k-NN ranks by cosine):
  dropout_linear  Dropout -> Linear(D, 64)                  (the Dense-64 recipe, default)
  bn_linear       BatchNorm -> Linear(D, 64)                (5th place)
  multi_dropout   K parallel Dropout -> Linear(D, 64), mean (3rd place)

Loss: ArcFace adds an angular margin m to the angle between an embedding
and its own class centre and scales all cosines by s. Variants: k
sub-centres per class (the class cosine is the best of its k centres) and
per-class margins that grow as a class gets rarer (2nd and 6th place).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

HEAD_KINDS = ("dropout_linear", "bn_linear", "multi_dropout")


class EmbeddingHead(nn.Module):
    """Dropout -> Linear -> L2."""

    def __init__(self, in_dim: int, out_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(self.dropout(x)), dim=-1)


class BNLinearHead(nn.Module):
    """BatchNorm -> Linear -> L2: normalises each feature before projecting."""

    def __init__(self, in_dim: int, out_dim: int = 64):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(self.bn(x)), dim=-1)


class MultiDropoutHead(nn.Module):
    """K branches of Dropout -> Linear, averaged, then L2 (one linear map at inference)."""

    def __init__(self, in_dim: int, out_dim: int = 64, dropout: float = 0.2, branches: int = 4):
        super().__init__()
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(branches))
        self.linears = nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in range(branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.stack([lin(drop(x)) for drop, lin in zip(self.dropouts, self.linears)]).mean(0)
        return F.normalize(out, dim=-1)


def build_head(kind: str, in_dim: int, out_dim: int, dropout: float,
               branches: int = 4) -> nn.Module:
    if kind == "dropout_linear":
        return EmbeddingHead(in_dim, out_dim, dropout)
    if kind == "bn_linear":
        return BNLinearHead(in_dim, out_dim)
    if kind == "multi_dropout":
        return MultiDropoutHead(in_dim, out_dim, dropout, branches)
    raise ValueError(f"head kind {kind!r}: allowed are {HEAD_KINDS}")


def dynamic_margins(class_counts: np.ndarray, low: float, high: float) -> torch.Tensor:
    """Per-class margins from `low` (most frequent) to `high` (rarest), linear in count^(-1/4)."""
    inv = np.asarray(class_counts, dtype=np.float64) ** -0.25
    span = inv.max() - inv.min()
    scaled = (inv - inv.min()) / span if span > 0 else np.zeros_like(inv)
    return torch.tensor(low + (high - low) * scaled, dtype=torch.float32)


class ArcFace(nn.Module):
    """Additive angular margin logits: s*cos(theta_y + m_y) for the true class, else s*cos(theta_j).

    `subcenters` > 1 gives each class k centres and scores a class by its
    closest centre; `margins` (one per class) replaces the single margin.

    `sample_classes` > 0 is Partial FC (An et al., 2021): each step's softmax runs
    over that many classes, every class of the batch plus others drawn at random
    (torch's seeded generator). Only the drawn classes' centres get a gradient, and
    it is a sparse one (their rows alone), so an optimizer for sparse gradients
    (`torch.optim.SparseAdam`, as `train` uses) updates those rows and their moments
    and leaves the others as they are (Partial FC's reference code, too, updates only
    the sampled centres and their momentum): a step then costs about the same with
    1,000 classes or 100,000. 0, or as many as there are classes, is the whole
    softmax, with a dense gradient.
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3,
                 subcenters: int = 1, margins: torch.Tensor | None = None,
                 label_smoothing: float = 0.0, sample_classes: int = 0):
        super().__init__()
        self.num_classes, self.subcenters = num_classes, subcenters
        self.sample_classes = sample_classes
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.label_smoothing = scale, label_smoothing
        margins = torch.full((num_classes,), float(margin)) if margins is None else margins.float()
        if margins.shape != (num_classes,):
            raise ValueError(f"margins must have shape ({num_classes},), "
                             f"got {tuple(margins.shape)}")
        self.register_buffer("margins", margins)

    @property
    def samples(self) -> bool:
        """Whether a training step draws classes (Partial FC): the centres' gradient is then
        sparse, for an optimizer that takes one."""
        return 0 < self.sample_classes < self.num_classes

    def cosines(self, emb: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine to each class (its best sub-centre): every class, or `classes` (sorted ids),
        whose centres' rows are gathered with a sparse gradient."""
        weight, n = self.weight, self.num_classes
        if classes is not None:
            k = self.subcenters
            rows = (classes[:, None] * k + torch.arange(k, device=classes.device)).flatten()
            weight = F.embedding(rows, self.weight, sparse=True)
            n = len(classes)
        cos = F.linear(F.normalize(emb, dim=-1), F.normalize(weight, dim=-1))
        if self.subcenters > 1:
            cos = cos.view(-1, n, self.subcenters).max(dim=-1).values
        return cos.clamp(-1 + 1e-7, 1 - 1e-7)

    def draw_classes(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The sorted class ids one step's softmax runs over: the batch's own classes and
        random others up to `sample_classes`; None for the whole softmax."""
        if not self.samples:
            return None
        score = torch.rand(self.num_classes, device=labels.device)
        score[labels] = 2.0  # the batch's classes always make it in
        k = max(self.sample_classes, int(labels.unique().numel()))
        return score.topk(k).indices.sort().values

    def logits(self, emb: torch.Tensor, labels: torch.Tensor,
               classes: torch.Tensor | None = None) -> torch.Tensor:
        """The margin touches one cosine per row, the true class's: it is computed on those
        B values and written back, not on the whole B x classes matrix (with 17,850
        classes that matrix, through acos and cos and their backward, was most of an
        epoch's time; the values are the same). With `classes`, the columns are those
        classes in their order (Partial FC)."""
        return self._margin_logits(self.cosines(emb, classes), labels, classes)

    def _margin_logits(self, cos: torch.Tensor, labels: torch.Tensor,
                       classes: torch.Tensor | None) -> torch.Tensor:
        rows = (labels if classes is None else torch.searchsorted(classes, labels)).unsqueeze(1)
        true = cos.gather(1, rows)
        m = self.margins[labels].unsqueeze(1)
        theta = torch.acos(true)
        target = torch.cos(theta + m)
        # Past pi - m, cos(theta + m) would rise again: use a linear penalty there instead.
        target = torch.where(theta <= math.pi - m, target, true - torch.sin(m) * m)
        return self.scale * cos.scatter(1, rows, target)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor,
                sample: bool = True) -> torch.Tensor:
        """The loss; `sample=False` takes the whole softmax even with Partial FC (a monitor's
        loss, which should neither vary nor draw from torch's generator)."""
        return self.loss_and_predictions(emb, labels, sample)[0]

    def loss_and_predictions(self, emb: torch.Tensor, labels: torch.Tensor,
                             sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss, and each row's nearest class by cosine (no margin) from the same
        cosines: `predict` over every class with the whole softmax; with Partial FC, over
        the step's drawn classes only, so a step's cost stays off the class count."""
        classes = self.draw_classes(labels) if sample else None
        target = labels if classes is None else torch.searchsorted(classes, labels)
        cos = self.cosines(emb, classes)
        loss = F.cross_entropy(self._margin_logits(cos, labels, classes), target,
                               label_smoothing=self.label_smoothing)
        nearest = cos.detach().argmax(dim=-1)
        return loss, nearest if classes is None else classes[nearest]

    @torch.no_grad()
    def predict(self, emb: torch.Tensor) -> torch.Tensor:
        """Nearest class (best sub-centre) by cosine, no margin."""
        return self.cosines(emb).argmax(dim=-1)


HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


def embed_with_head(head: nn.Module, features: np.ndarray) -> np.ndarray:
    head.eval()
    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()


def load_head(out_dir: Path) -> tuple[nn.Module, list[str]]:
    cfg = json.loads((out_dir / HEAD_CONFIG).read_text())
    head = build_head(cfg["kind"], cfg["in_dim"], cfg["out_dim"], cfg["dropout"], cfg["branches"])
    head.load_state_dict(load_file(str(out_dir / HEAD_WEIGHTS)))
    return head.eval(), cfg["variants"]
