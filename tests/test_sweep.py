"""The sweep: recipes trained on training classes, scored and chosen on validation classes only."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import clusters
from tasks.features import GroupData, select
from tasks.metrics import bootstrap_interval, mean_precision_at_k
from tasks.params.evaluate import EvaluateParams
from tasks.params.train import TrainParams
from tasks.schemas.features import write_features
from tasks.schemas.io import write_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.paths import FEATURES_DIR, MANIFEST
from tasks.sweep import score_recipe, summarise, sweep_markdown
from tasks.train import TrainingInputs, load_training_inputs, train_head
from tasks.heads import embed_with_head

EVALUATE = EvaluateParams(pca_dim=8, bootstrap_resamples=300)
META = {"dim": "4", "model_name": "m", "pretrained": "", "checkpoint_sha256": "0",
        "image_size": "8"}


def inputs() -> TrainingInputs:
    held = clusters(range(8, 16), 6, 16, 3, noise=1.2)
    every_other = np.arange(len(held.keys)) % 2 == 0
    query, index = select(held, every_other), select(held, ~every_other)
    return TrainingInputs(clusters(range(8), 12, 16, 1, noise=1.2),
                          clusters(range(8), 2, 16, 2, noise=1.2),
                          GroupData(query, index, ["s"] * len(query.keys)),
                          {c: 10 for c in range(16)})


def test_recipe_scores_are_the_validation_classes_mp5_of_the_trained_head():
    data, train = inputs(), TrainParams(epochs=4, batch_size=16, embedding_dim=8)
    scored = score_recipe(train, data, EVALUATE)
    # an independent recomputation: train the same recipe, embed, exact k-NN, GUIE mP@5
    head = train_head(data.train, data.val, train, data.validation, data.class_images).head
    query, index = data.validation.query, data.validation.index
    expected, _, _ = mean_precision_at_k(embed_with_head(head, index.embeddings), index.class_ids,
                                         embed_with_head(head, query.embeddings), query.class_ids)
    assert scored["scores"]["all"]["mP@5"] == pytest.approx(expected, abs=1e-4)
    assert scored["scores"]["all"]["low"] <= expected <= scored["scores"]["all"]["high"]


def scored_line(per_query: np.ndarray, classes: np.ndarray) -> dict:
    mean, low, high = bootstrap_interval(per_query, classes, 300)
    return {"per_query": per_query, "scores": {"all": {"mP@5": mean, "low": low, "high": high}},
            "epochs_run": 1, "epoch_kept": 1}


def test_a_recipe_is_chosen_only_when_its_paired_gain_excludes_zero():
    data = inputs()
    classes = data.validation.query.class_ids
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, size=len(classes))
    class_noise = {c: rng.choice([-0.5, 0.5]) for c in np.unique(classes)}
    scored = {
        "train": scored_line(base, classes),
        "better": scored_line(base + 0.05, classes),  # +0.05 on every query: beyond doubt
        # a higher mean, but half the classes gain 0.56 and half lose 0.44: not beyond doubt
        "noisy": scored_line(base + 0.06 + np.array([class_noise[c] for c in classes]), classes),
        "same": scored_line(base.copy(), classes),
    }
    changes = {"better": {"lr": 0.01}, "noisy": {"dropout": 0.1}, "same": {}}
    summary = summarise(scored, "train", data, changes, EVALUATE)
    noisy, better = summary["recipes"]["noisy"], summary["recipes"]["better"]
    assert noisy["validation"]["all"]["mP@5"] > better["validation"]["all"]["mP@5"]
    assert noisy["minus_baseline"]["low"] < 0 < better["minus_baseline"]["low"]
    assert summary["chosen"] == "better"
    assert summary["recipes"]["same"]["minus_baseline"]["difference"] == 0.0
    del scored["better"]
    assert summarise(scored, "train", data, changes, EVALUATE)["chosen"] == "train"
    table = sweep_markdown(summary)
    assert "better (chosen)" in table and "lr=0.01" in table


def test_recipe_scores_feed_the_summary():
    data = inputs()
    scored = {"train": score_recipe(TrainParams(epochs=1, batch_size=16, embedding_dim=8), data,
                                    EVALUATE)}
    summary = summarise(scored, "train", data, {}, EVALUATE)
    assert summary["chosen"] == "train" and summary["validation_classes"] == 8


def test_training_inputs_never_hold_test_classes(in_tmp):
    """The sweep and train read the manifest's groups: test-class features stay out."""
    groups = {0: "train", 1: "train", 2: "validation", 3: "validation", 4: "test", 5: "test"}
    rows, per_split = [], {"train": [], "val": [], "query": [], "index": []}
    for c, group in groups.items():
        for j in range(4):
            if group == "train":
                split = "train" if j < 3 else "val"
            else:
                split = "query" if j % 2 else "index"
            key = f"k{c}-{j}"
            rows.append({"key": key, "source": "s", "label": str(c), "class_id": c, "path": key,
                         "split": split, "group": group, "class_images": 100 + c})
            per_split[split].append((key, c))
    write_table(MANIFEST, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), MANIFEST_SCHEMA)
    for split, items in per_split.items():
        keys, ids = [k for k, _ in items], np.array([c for _, c in items])
        emb = np.random.default_rng(0).normal(size=(len(keys), 4)).astype(np.float32)
        write_features(FEATURES_DIR / "v" / split / "s-000000.arrow", keys, ids, emb, META)
    data = load_training_inputs(["v"])
    query, index = data.validation.query, data.validation.index
    assert set(query.class_ids) == set(index.class_ids) == {2, 3}
    assert set(data.train.class_ids) == {0, 1}
    assert data.class_images == {c: 100 + c for c in groups}
    assert data.validation.sources == ["s"] * len(query.keys)
