"""The sweep: recipes trained on training classes, scored and chosen on validation classes only."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tasks.features import SplitFeatures, select
from tasks.metrics import mean_precision_at_k
from tasks.params import EvaluateParams, TrainParams
from tasks.schemas import FEATURES_DIR, MANIFEST, MANIFEST_SCHEMA, write_features, write_table
from tasks.sweep import score_recipe, summarise, sweep_markdown
from tasks.train import TrainingInputs, embed_with_head, load_training_inputs, train_head

EVALUATE = EvaluateParams(pca_dim=8, bootstrap_resamples=300)
META = {"dim": "4", "model_name": "m", "pretrained": "", "checkpoint_sha256": "0",
        "image_size": "8"}


def clusters(classes: range, per_class: int, dim: int, seed: int) -> SplitFeatures:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(100, dim))
    ids = np.repeat(np.array(list(classes)), per_class)
    emb = (centres[ids] + 1.2 * rng.normal(size=(len(ids), dim))).astype(np.float32)
    return SplitFeatures([f"{seed}-{i}" for i in range(len(ids))], ids, emb)


def inputs() -> TrainingInputs:
    held = clusters(range(8, 16), 6, 16, 3)
    every_other = np.arange(len(held.keys)) % 2 == 0
    query, index = select(held, every_other), select(held, ~every_other)
    return TrainingInputs(clusters(range(8), 12, 16, 1), clusters(range(8), 2, 16, 2),
                          (query, index), ["s"] * len(query.keys), {c: 10 for c in range(16)})


def test_recipe_scores_are_the_validation_classes_mp5_of_the_trained_head():
    data, train = inputs(), TrainParams(epochs=4, batch_size=16, embedding_dim=8)
    scored = score_recipe(train, data, EVALUATE)
    # an independent recomputation: train the same recipe, embed, exact k-NN, GUIE mP@5
    head = train_head(data.train, data.val, train, data.validation, data.class_images).head
    query, index = data.validation
    expected, _, _ = mean_precision_at_k(embed_with_head(head, index.embeddings), index.class_ids,
                                         embed_with_head(head, query.embeddings), query.class_ids)
    assert scored["scores"]["all"]["mP@5"] == pytest.approx(expected, abs=1e-4)
    assert scored["scores"]["all"]["low"] <= expected <= scored["scores"]["all"]["high"]


def test_the_choice_is_the_best_validation_score_and_ties_keep_the_baseline():
    data = inputs()
    base = TrainParams(epochs=4, batch_size=16, embedding_dim=8)
    recipes = {"train": base, "one_epoch": base.model_copy(update={"epochs": 1}),
               "same": base.model_copy()}
    scored = {name: score_recipe(p, data, EVALUATE) for name, p in recipes.items()}
    summary = summarise(scored, "train", data, {"one_epoch": {"epochs": 1}, "same": {}}, EVALUATE)
    best = max(s["scores"]["all"]["mP@5"] for s in scored.values())
    assert summary["recipes"][summary["chosen"]]["validation"]["all"]["mP@5"] == best
    assert summary["recipes"]["same"]["minus_baseline"]["difference"] == 0.0
    if scored["train"]["scores"]["all"]["mP@5"] == best:
        assert summary["chosen"] == "train"  # a tie never moves away from the baseline
    table = sweep_markdown(summary)
    assert "(chosen)" in table and "epochs=1" in table


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
    query, index = data.validation
    assert set(query.class_ids) == set(index.class_ids) == {2, 3}
    assert set(data.train.class_ids) == {0, 1}
    assert data.class_images == {c: 100 + c for c in groups}
    assert data.validation_sources == ["s"] * len(query.keys)
