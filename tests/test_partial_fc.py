"""Partial FC (`train.class_sample`): ArcFace over each step's drawn classes, only the drawn
centres stepped (sparse gradients, SparseAdam), and a head that still learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import clusters
from tasks.features import select
from tasks.heads import ArcFace, build_head, embed_with_head
from tasks.metrics import mean_precision_at_k
from tasks.params.train import TrainParams
from tasks.train import train_head
from test_heads import expected_target


@pytest.mark.parametrize("subcenters", [1, 3])
def test_partial_fc_is_arcface_over_the_drawn_classes(subcenters):
    """Partial FC's loss equals ArcFace written out over the drawn classes only (an independent
    softmax over those columns), the batch's classes are always drawn, and only the drawn
    classes' centres get a gradient."""
    torch.manual_seed(2)
    arc = ArcFace(dim=8, num_classes=50, scale=10.0, margin=0.3, subcenters=subcenters,
                  sample_classes=12)
    emb, labels = torch.randn(16, 8), torch.randint(0, 50, (16,))
    torch.manual_seed(5)
    loss = arc(emb, labels)
    loss.backward()
    torch.manual_seed(5)
    drawn = arc.draw_classes(labels)
    assert len(drawn) == max(12, len(labels.unique())) and set(labels.tolist()) <= set(
        drawn.tolist())
    centres = F.normalize(arc.weight.detach(), dim=-1).view(50, subcenters, 8)
    cos = torch.einsum("bd,ckd->bck", F.normalize(emb, dim=-1), centres).max(-1).values
    cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)[:, drawn]
    expected = 0.0
    for i, y in enumerate(labels.tolist()):
        row = 10.0 * cos[i].clone()
        j = drawn.tolist().index(y)
        row[j] = 10.0 * expected_target(float(cos[i, j]), 0.3)
        expected += -torch.log_softmax(row, 0)[j].item() / len(labels)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert arc.weight.grad.is_sparse  # the drawn rows alone, for SparseAdam
    touched = arc.weight.grad.to_dense().view(50, subcenters, 8).abs().sum((1, 2)) > 0
    assert set(torch.nonzero(touched).flatten().tolist()) <= set(drawn.tolist())
    rows = arc.weight.grad.coalesce().indices()[0].div(subcenters, rounding_mode="floor")
    assert set(rows.tolist()) == set(drawn.tolist())


def whole_and_sampled(classes: int, sample: int, seed: int):
    """Two ArcFace losses with the same centres, one with Partial FC, and a batch for them."""
    torch.manual_seed(seed)
    whole = ArcFace(dim=8, num_classes=classes, scale=10.0, margin=0.3)
    sampled = ArcFace(dim=8, num_classes=classes, scale=10.0, margin=0.3, sample_classes=sample)
    sampled.load_state_dict(whole.state_dict())
    return whole, sampled, torch.randn(16, 8), torch.randint(0, classes, (16,))


def test_partial_fc_with_every_class_is_the_whole_softmax():
    whole, sampled, emb, labels = whole_and_sampled(classes=10, sample=10, seed=3)
    assert torch.equal(whole(emb, labels), sampled(emb, labels))


def test_partial_fc_can_score_with_the_whole_softmax():
    """A monitor's loss takes every class and leaves torch's generator alone."""
    whole, sampled, emb, labels = whole_and_sampled(classes=40, sample=5, seed=4)
    state = torch.get_rng_state()
    assert torch.equal(sampled(emb, labels, sample=False), whole(emb, labels))
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(sampled(emb, labels), whole(emb, labels))


def test_predictions_come_from_the_losses_own_cosines():
    """The per-step accuracy needs no second pass over the classes: with the whole softmax the
    predictions equal `predict`; with Partial FC they are the nearest drawn class, by a
    brute-force argmax over the drawn columns; the loss is `forward`'s either way."""
    whole, sampled, emb, labels = whole_and_sampled(classes=40, sample=6, seed=6)
    loss, nearest = whole.loss_and_predictions(emb, labels)
    assert torch.equal(loss, whole(emb, labels))
    assert torch.equal(nearest, whole.predict(emb))
    torch.manual_seed(9)
    loss, nearest = sampled.loss_and_predictions(emb, labels)
    torch.manual_seed(9)
    assert torch.equal(loss, sampled(emb, labels))
    torch.manual_seed(9)
    drawn = sampled.draw_classes(labels)
    cos = F.normalize(emb, dim=-1) @ F.normalize(sampled.weight.detach(), dim=-1).T
    assert torch.equal(nearest, drawn[cos[:, drawn].argmax(dim=1)])
    assert set(nearest.tolist()) <= set(drawn.tolist())


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_partial_fc_steps_only_the_drawn_centres(optimizer):
    """With Partial FC, a step and the next leave every undrawn class's centre bit-equal
    (a dense Adam would move them all: its moments carry earlier steps), and move the drawn
    ones; with the whole softmax every centre moves. The head's optimizer is unchanged."""
    from tasks.train import make_optimizers

    for sample in (6, 0):
        torch.manual_seed(0)
        params = TrainParams(epochs=1, class_sample=sample, optimizer=optimizer, lr=1e-2,
                             embedding_dim=8)
        head, arc = build_head("dropout_linear", 16, 8, 0.0), ArcFace(8, 40, sample_classes=sample)
        opts = make_optimizers(head, arc, params)
        dense = {"adam": "Adam", "adamw": "AdamW"}[optimizer]
        assert [type(o).__name__ for o in opts] == [dense, "SparseAdam"][:2 if sample else 1]
        for step in range(2):
            before = arc.weight.detach().clone()
            x, labels = torch.randn(8, 16), torch.randint(0, 40, (8,))
            torch.manual_seed(10 + step)
            loss = arc(head(x), labels)
            torch.manual_seed(10 + step)
            drawn = arc.draw_classes(labels)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
            moved = set(torch.nonzero((arc.weight.detach() != before).any(1)).flatten().tolist())
            assert moved == (set(drawn.tolist()) if sample else set(range(40)))


def test_partial_fc_still_learns():
    """On clustered features, a head trained with a 6-of-30-class softmax per step ranks
    the validation classes about as well as one trained with the whole softmax."""
    train = clusters(range(30), 12, dim=32, seed=0)
    val = select(train, np.zeros(len(train.keys), bool))
    query, index = clusters(range(30, 40), 3, 32, 1), clusters(range(30, 40), 5, 32, 2)
    scores = {}
    for sample in (0, 6):
        params = TrainParams(epochs=15, embedding_dim=16, batch_size=32, class_sample=sample,
                             early_stopping_patience=0)
        head = train_head(train, val, params).head
        scores[sample], _, _ = mean_precision_at_k(
            embed_with_head(head, index.embeddings), index.class_ids,
            embed_with_head(head, query.embeddings), query.class_ids, k=5)
    assert scores[6] > 0.5 and scores[6] >= scores[0] - 0.1, scores
