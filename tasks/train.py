"""Train the 64-d head with ArcFace on precomputed backbone embeddings.

Features are small next to images, so training runs on the CPU in seconds:
the whole train split sits in one tensor and an epoch is a shuffled pass
over it in minibatches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR

from tasks.features import SplitFeatures
from tasks.heads import ArcFace, EmbeddingHead
from tasks.params import TrainParams
from tasks.schemas import atomic_path, write_json


def warmup_linear_decay(total_steps: int, warmup_steps: int):
    """LR multiplier: 0 -> 1 linearly over warm-up, then 1 -> 0 linearly to the last step."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - warmup_steps, 1)
        return max(0.0, 1.0 - (step - warmup_steps) / remaining)
    return factor


@dataclass
class TrainResult:
    head: EmbeddingHead
    history: list[dict[str, float]]
    metrics: dict[str, float]


def _accuracy_and_loss(head: EmbeddingHead, arc: ArcFace, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    if len(x) == 0:
        return float("nan"), float("nan")
    head.eval()
    with torch.no_grad():
        emb = head(x)
        return (arc.predict(emb) == y).float().mean().item(), arc(emb, y).item()


def train_head(train: SplitFeatures, val: SplitFeatures, params: TrainParams) -> TrainResult:
    """Fit head + ArcFace; deterministic for a given seed and input order."""
    if len(train.keys) == 0:
        raise ValueError("train split is empty: nothing to train on")
    torch.manual_seed(params.seed)
    classes = np.unique(train.class_ids)
    remap = {int(c): i for i, c in enumerate(classes)}
    x = torch.from_numpy(train.embeddings)
    y = torch.tensor([remap[int(c)] for c in train.class_ids])
    known = np.isin(val.class_ids, classes)
    xv = torch.from_numpy(val.embeddings[known]) if len(val.keys) else torch.zeros(0, x.shape[1])
    yv = torch.tensor([remap[int(c)] for c in val.class_ids[known]], dtype=torch.long)

    head = EmbeddingHead(x.shape[1], params.embedding_dim, params.dropout)
    arc = ArcFace(params.embedding_dim, len(classes), params.arcface_scale, params.arcface_margin)
    opt = torch.optim.AdamW(list(head.parameters()) + list(arc.parameters()), lr=params.lr,
                            weight_decay=params.weight_decay)
    steps_per_epoch = -(-len(x) // params.batch_size)
    total = steps_per_epoch * params.epochs
    sched = LambdaLR(opt, warmup_linear_decay(total, int(params.warmup_fraction * total)))
    gen = torch.Generator().manual_seed(params.seed)

    history = []
    for epoch in range(1, params.epochs + 1):
        head.train()
        order = torch.randperm(len(x), generator=gen)
        losses = []
        for i in range(0, len(x), params.batch_size):
            idx = order[i:i + params.batch_size]
            loss = arc(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        train_acc, _ = _accuracy_and_loss(head, arc, x, y)
        val_acc, val_loss = _accuracy_and_loss(head, arc, xv, yv)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "train_acc": train_acc,
                        "val_loss": val_loss, "val_acc": val_acc, "lr": sched.get_last_lr()[0]})
    last = history[-1]
    metrics = {"train_loss": last["train_loss"], "train_acc": last["train_acc"], "val_loss": last["val_loss"],
               "val_acc": last["val_acc"], "epochs": params.epochs, "num_classes": len(classes),
               "train_images": len(x), "val_images": len(xv)}
    head.eval()
    return TrainResult(head, history, metrics)


def embed_with_head(head: EmbeddingHead, features: np.ndarray) -> np.ndarray:
    head.eval()
    with torch.no_grad():
        return head(torch.from_numpy(features)).numpy()


HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


def save_head(head: EmbeddingHead, out_dir: Path, variants: list[str]) -> None:
    """Weights as safetensors plus the config needed to rebuild the head (no pickle)."""
    with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
    write_json(out_dir / HEAD_CONFIG, {"in_dim": head.linear.in_features, "out_dim": head.linear.out_features,
                                       "dropout": head.dropout.p, "variants": variants})


def load_head(out_dir: Path) -> tuple[EmbeddingHead, list[str]]:
    cfg = json.loads((out_dir / HEAD_CONFIG).read_text())
    head = EmbeddingHead(cfg["in_dim"], cfg["out_dim"], cfg["dropout"])
    head.load_state_dict(load_file(str(out_dir / HEAD_WEIGHTS)))
    return head.eval(), cfg["variants"]
