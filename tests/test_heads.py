"""ArcFace logits, the warm-up/decay schedule, and a training run that learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.features import SplitFeatures
from tasks.heads import ArcFace, EmbeddingHead
from tasks.params import TrainParams
from tasks.train import embed_with_head, load_head, save_head, train_head, warmup_linear_decay


def test_arcface_adds_margin_to_target_angle_only():
    torch.manual_seed(0)
    arc = ArcFace(dim=8, num_classes=5, scale=10.0, margin=0.4)
    emb = F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 3, 1, 4])
    logits = arc.logits(emb, labels)
    cos = (emb @ F.normalize(arc.weight, dim=-1).T).detach()
    for i, y in enumerate(labels.tolist()):
        theta = math.acos(float(cos[i, y]))
        expected = math.cos(theta + 0.4) if theta <= math.pi - 0.4 else float(cos[i, y]) - math.sin(0.4) * 0.4
        assert logits[i, y].item() == pytest.approx(10.0 * expected, abs=1e-4)
        others = [j for j in range(5) if j != y]
        assert torch.allclose(logits[i, others], 10.0 * cos[i, others], atol=1e-5)
    assert arc(emb, labels).item() > F.cross_entropy(10.0 * cos, labels).item()  # margin makes it harder


def test_head_outputs_unit_vectors_of_requested_dim():
    head = EmbeddingHead(32, 64, dropout=0.5).eval()
    out = head(torch.randn(7, 32))
    assert out.shape == (7, 64) and torch.allclose(out.norm(dim=1), torch.ones(7), atol=1e-5)


def test_warmup_then_linear_decay():
    f = warmup_linear_decay(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0


def clusters(n_classes: int, per_class: int, dim: int, seed: int) -> SplitFeatures:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(n_classes, dim))
    ids = np.repeat(np.arange(n_classes), per_class)
    emb = (centres[ids] + 0.8 * rng.normal(size=(len(ids), dim))).astype(np.float32)
    return SplitFeatures([f"k{i}" for i in range(len(ids))], ids, emb)


def test_training_learns_and_is_deterministic(tmp_path):
    p = TrainParams(epochs=8, batch_size=16, lr=0.01, dropout=0.1, embedding_dim=16, arcface_scale=16.0)
    train, val = clusters(6, 20, 24, 0), clusters(6, 5, 24, 1)
    a, b = train_head(train, val, p), train_head(train, val, p)
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert a.metrics["val_acc"] > 0.8
    assert a.history == b.history
    save_head(a.head, tmp_path, ["v"])
    head, variants = load_head(tmp_path)
    assert variants == ["v"]
    assert np.allclose(embed_with_head(head, val.embeddings), embed_with_head(a.head, val.embeddings))
