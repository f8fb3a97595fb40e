"""Heads, ArcFace variants, schedules and early stopping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import clusters
from tasks.features import GroupData, select
from tasks.heads import ArcFace, build_head, dynamic_margins
from tasks.metrics import mean_precision_at_k
from tasks.params.train import TrainParams
from tasks.train import (make_loss,
                         save_head,
                         train_head,
                         warmup_cosine,
                         warmup_linear_decay,
                         warmup_step)
from tasks.heads import embed_with_head, load_head


def expected_target(cos: float, m: float) -> float:
    theta = math.acos(cos)
    return math.cos(theta + m) if theta <= math.pi - m else cos - math.sin(m) * m


def test_arcface_adds_margin_to_target_angle_only():
    torch.manual_seed(0)
    arc = ArcFace(dim=8, num_classes=5, scale=10.0, margin=0.4)
    emb = F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 3, 1, 4])
    logits = arc.logits(emb, labels).detach()
    cos = (emb @ F.normalize(arc.weight, dim=-1).T).detach()
    for i, y in enumerate(labels.tolist()):
        target = 10.0 * expected_target(float(cos[i, y]), 0.4)
        assert logits[i, y].item() == pytest.approx(target, abs=1e-4)
        others = [j for j in range(5) if j != y]
        assert torch.allclose(logits[i, others], 10.0 * cos[i, others], atol=1e-5)
    # the margin makes it harder
    assert arc(emb, labels).item() > F.cross_entropy(10.0 * cos, labels).item()


def test_arcface_gradients_equal_the_whole_matrix_formula():
    """The margin is applied to the true class's cosines only: loss and gradients must equal
    the textbook form that takes acos/cos of every cosine, both sides of pi - m."""
    torch.manual_seed(1)
    arc = ArcFace(dim=6, num_classes=7, scale=16.0, margin=1.2)
    emb = torch.randn(32, 6, requires_grad=True)
    labels = torch.randint(0, 7, (32,))
    arc(emb, labels).backward()
    ours = emb.grad.clone(), arc.weight.grad.clone()
    emb.grad, arc.weight.grad = None, None
    cos = F.linear(F.normalize(emb, dim=-1), F.normalize(arc.weight, dim=-1)).clamp(-1 + 1e-7,
                                                                                    1 - 1e-7)
    theta = torch.acos(cos)
    target = torch.where(theta <= math.pi - 1.2, torch.cos(theta + 1.2),
                         cos - math.sin(1.2) * 1.2)
    logits = 16.0 * torch.where(F.one_hot(labels, 7).bool(), target, cos)
    assert (theta.gather(1, labels[:, None]) > math.pi - 1.2).any()  # both branches taken
    F.cross_entropy(logits, labels).backward()
    assert torch.allclose(ours[0], emb.grad, atol=1e-6)
    assert torch.allclose(ours[1], arc.weight.grad, atol=1e-6)


def test_subcenter_arcface_max_pools_over_centres():
    torch.manual_seed(1)
    arc = ArcFace(dim=6, num_classes=3, scale=1.0, margin=0.0, subcenters=4)
    assert arc.weight.shape == (12, 6)
    emb = F.normalize(torch.randn(5, 6), dim=-1)
    all_cos = (emb @ F.normalize(arc.weight, dim=-1).T).view(5, 3, 4).detach()
    assert torch.allclose(arc.cosines(emb).detach(), all_cos.max(-1).values, atol=1e-6)
    assert torch.equal(arc.predict(emb), all_cos.max(-1).values.argmax(-1))


def test_dynamic_margins_grow_as_classes_get_rarer_and_apply_per_class():
    m = dynamic_margins(np.array([100, 10, 1, 100]), 0.1, 0.5)
    assert m[2].item() == pytest.approx(0.5) and m[0].item() == pytest.approx(0.1) and m[3] == m[0]
    assert m[0] < m[1] < m[2]
    torch.manual_seed(2)
    arc = ArcFace(dim=4, num_classes=4, scale=1.0, margins=m)
    emb = F.normalize(torch.randn(4, 4), dim=-1)
    labels = torch.tensor([0, 1, 2, 3])
    logits, cos = arc.logits(emb, labels).detach(), arc.cosines(emb).detach()
    for i in range(4):
        target = expected_target(float(cos[i, i]), float(m[i]))
        assert logits[i, i].item() == pytest.approx(target, abs=1e-5)


@pytest.mark.parametrize("kind", ["dropout_linear", "bn_linear", "multi_dropout"])
def test_heads_output_unit_vectors_of_requested_dim(kind):
    head = build_head(kind, 32, 64, dropout=0.5, branches=3).eval()
    out = head(torch.randn(7, 32))
    assert out.shape == (7, 64) and torch.allclose(out.norm(dim=1), torch.ones(7), atol=1e-5)


def test_schedules():
    f = warmup_linear_decay(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0
    c = warmup_cosine(total_steps=110, warmup_steps=10)
    assert c(4) == pytest.approx(0.5) and c(10) == pytest.approx(1.0)
    assert c(60) == pytest.approx(0.5) and c(110) == pytest.approx(0.0, abs=1e-12)
    # 2xCLIP: x0.1 every 100 epochs (here 10 steps an epoch), no warm-up
    s = warmup_step(0, steps_per_epoch=10, step_epochs=100, gamma=0.1)
    assert s(0) == 1.0 and s(999) == 1.0
    assert s(1000) == pytest.approx(0.1) and s(2500) == pytest.approx(0.01)


@pytest.mark.parametrize("head,loss,schedule,optimizer", [
    ("dropout_linear", "arcface", "cosine", "adamw"),
    ("bn_linear", "subcenter_arcface", "step", "adam"),
    ("multi_dropout", "dynamic_arcface", "linear", "adamw")])
def test_training_learns_and_is_deterministic(tmp_path, head, loss, schedule, optimizer):
    p = TrainParams(epochs=8, batch_size=16, lr=0.01, dropout=0.1, embedding_dim=16,
                    arcface_scale=16.0, head=head, loss=loss, schedule=schedule,
                    optimizer=optimizer, step_epochs=4, label_smoothing=0.1)
    train, val = clusters(range(6), 20, 24, 0), clusters(range(6), 5, 24, 1)
    sizes = {c: 10 * (c + 1) for c in range(6)}
    a = train_head(train, val, p, class_images=sizes)
    b = train_head(train, val, p, class_images=sizes)
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert a.metrics["val_acc"] > 0.8 and a.metrics["val_mP@5"] > 0.8
    assert a.history == b.history
    save_head(a.head, tmp_path, ["v"], p)
    loaded, variants = load_head(tmp_path)
    assert variants == ["v"]
    assert np.allclose(embed_with_head(loaded, val.embeddings),
                       embed_with_head(a.head, val.embeddings), atol=1e-6)


def unseen_classes(first: int, count: int, per_class: int, dim: int, seed: int, noise: float,
                   ) -> GroupData:
    """The query and index features of classes first..first+count-1: classes training never
    sees."""
    every = clusters(range(first + count), per_class, dim, seed, noise)
    keep = every.class_ids >= first
    both = select(every, keep)
    half = np.arange(len(both.keys)) % 2 == 0
    query = select(both, half)
    return GroupData(query, select(both, ~half), ["s"] * len(query.keys))


def test_early_stopping_watches_the_validation_classes_and_keeps_the_best_epoch():
    # noisy data and a high learning rate: the validation classes' mP@5 peaks, then stalls
    train = clusters(range(5), 8, 16, 0, noise=3.0)
    val = clusters(range(5), 4, 16, 1, noise=3.0)
    validation = unseen_classes(5, 6, 6, 16, 2, noise=2.0)
    p = TrainParams(epochs=60, batch_size=8, lr=0.05, embedding_dim=8, early_stopping_patience=3,
                    warmup_fraction=0.0)
    result = train_head(train, val, p, validation)
    curve = [h["validation_classes_mP@5"] for h in result.history]
    assert len(curve) < 60, "training never stopped"
    best = max(curve)
    # stopped exactly `patience` epochs after the best
    assert curve.index(best) == len(curve) - 1 - 3
    assert result.metrics["epoch_kept"] == curve.index(best) + 1
    # the best epoch's weights were kept
    assert result.metrics["validation_classes_mP@5"] == pytest.approx(best)


def test_reported_metrics_are_the_kept_epochs():
    """metrics.json describes the head that is kept: when early stopping keeps an earlier
    epoch, its train and val scores are that epoch's, not the last epoch's."""
    train = clusters(range(5), 8, 16, 0, noise=3.0)
    val = clusters(range(5), 4, 16, 1, noise=3.0)
    validation = unseen_classes(5, 6, 6, 16, 2, noise=2.0)
    query, index = validation.query, validation.index
    p = TrainParams(epochs=60, batch_size=8, lr=0.05, embedding_dim=8, early_stopping_patience=3,
                    warmup_fraction=0.0)
    result = train_head(train, val, p, validation)
    m = result.metrics
    assert m["epoch_kept"] < m["epochs_run"] == len(result.history)
    kept = result.history[m["epoch_kept"] - 1]
    assert kept["epoch"] == m["epoch_kept"]
    for name in ("train_loss", "train_acc", "val_acc", "val_loss", "val_mP@5",
                 "validation_classes_mP@5"):
        assert m[name] == kept[name], name
    assert m["train_loss"] != result.history[-1]["train_loss"]
    # the kept head itself scores what is reported (brute-force k-NN, GUIE mP@5)
    expected, _, _ = mean_precision_at_k(
        embed_with_head(result.head, index.embeddings), index.class_ids,
        embed_with_head(result.head, query.embeddings), query.class_ids, k=5)
    assert m["validation_classes_mP@5"] == pytest.approx(expected, abs=1e-6)


def test_dynamic_margins_follow_catalog_counts_not_the_capped_sample():
    """Sampling gives every class the same number of training rows; the margins must still
    follow how common each class is in its source catalog (the manifest's class_images)."""
    train = clusters(range(4), 6, 8, 0)  # 6 rows per class, as after capping
    classes = np.unique(train.class_ids)
    p = TrainParams(epochs=1, loss="dynamic_arcface", margin_min=0.2, margin_max=0.45)
    arc = make_loss(p, classes, {0: 5000, 1: 500, 2: 50, 3: 5000})
    margins = arc.margins.tolist()
    assert margins[0] == pytest.approx(0.2) and margins[3] == pytest.approx(0.2)
    assert margins[2] == pytest.approx(0.45)
    assert 0.2 < margins[1] < 0.45
    with pytest.raises(ValueError, match="catalog image count"):
        make_loss(p, classes, None)


def test_training_gives_the_same_bytes_whatever_the_process_thread_count():
    """The thread count of the process (OMP_NUM_THREADS, a Prefect worker) must not change the
    head: train uses train.threads, so two runs give byte-identical weights and history."""
    # wide enough that a matmul's reduction is split between threads (1024 -> 64; at 512 -> 32
    # the two thread counts happen to agree on this CPU)
    train = clusters(range(8), 40, 1024, 0, noise=1.0)
    val = clusters(range(8), 5, 1024, 1, noise=1.0)
    p = TrainParams(epochs=2, batch_size=64, embedding_dim=64, threads=1)
    before = torch.get_num_threads()
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(train_head(train, val, p))
    torch.set_num_threads(before)
    weights = [b"".join(t.numpy().tobytes() for t in r.head.state_dict().values()) for r in runs]
    assert weights[0] == weights[1]
    assert runs[0].history == runs[1].history


def test_selection_scores_a_fixed_sample_of_the_validation_queries():
    """selection_queries bounds early stopping's per-epoch search: its curve is the one a run
    given only those queries (a seeded sample, every index image kept) computes, and it
    differs from the curve over every query."""
    train = clusters(range(5), 8, 16, 0, noise=3.0)
    val = clusters(range(5), 4, 16, 1, noise=3.0)
    validation = unseen_classes(5, 6, 6, 16, 2, noise=2.0)
    p = TrainParams(epochs=4, batch_size=8, lr=0.05, embedding_dim=8, early_stopping_patience=0,
                    warmup_fraction=0.0, selection_queries=0)
    curve = [h["validation_classes_mP@5"] for h in train_head(train, val, p, validation).history]
    n = len(validation.query.keys)
    sampled = train_head(train, val, p.model_copy(update={"selection_queries": 7}), validation)
    keep = np.isin(np.arange(n), np.random.default_rng(0).choice(n, 7, replace=False))
    alone = GroupData(select(validation.query, keep), validation.index, ["s"] * 7)
    by_hand = train_head(train, val, p, alone)
    assert ([h["validation_classes_mP@5"] for h in sampled.history]
            == [h["validation_classes_mP@5"] for h in by_hand.history])
    assert [h["validation_classes_mP@5"] for h in sampled.history] != curve
