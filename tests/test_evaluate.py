"""Scoring one class group: every query counted once, intervals, the reference line, no NaN."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from conftest import clusters
from tasks.evaluate import best_zero_shot, group_summary, score_line
from tasks.features import GroupData, ManifestIndex, split_groups
from tasks.gallery import gallery_keys
from tasks.metrics import precision_at_k
from tasks.params.evaluate import EvaluateParams
from tasks.report import metrics_diff_markdown, metrics_markdown, metrics_rows, search_markdown
from tasks.schemas.io import write_json

PARAMS = EvaluateParams(k=5, pca_dim=8, bootstrap_resamples=500)


def group_with_orphans() -> GroupData:
    """Classes 0-5 from source a with index images; class 9 (source b) has queries only:
    its index images were lost (rejected at shard time, say)."""
    query = clusters([*range(6), 9], [3] * 6 + [2], 8, seed=1, noise=0.3)
    index = clusters(range(6), 3, 8, seed=2, noise=0.3)
    return GroupData(query, index, ["a"] * 18 + ["b"] * 2)


def identity(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_queries_without_a_match_are_counted_apart_and_never_become_nan(tmp_path):
    data = group_with_orphans()
    results = {"head": score_line(identity, data, PARAMS),
               "zero_shot_x": score_line(lambda x: identity(x[:, :4]), data, PARAMS)}
    summary = group_summary(data, results, "zero_shot_x", PARAMS)
    assert summary["queries"] == 18 and summary["queries_without_match"] == 2
    assert summary["queries_without_match_per_source"] == {"a": 0, "b": 2}
    assert summary["classes"] == 6
    head = summary["lines"]["head"]
    assert set(head) == {"all", "a"}, "a source with no scorable query gets no score, not NaN"
    per_query = results["head"]["per_query"]
    assert head["all"]["mP@5"] == pytest.approx(np.nanmean(per_query), abs=1e-4)
    write_json(tmp_path / "m.json", summary)  # refuses NaN: this would raise
    assert "NaN" not in (tmp_path / "m.json").read_text()


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"x": float("nan")})


def test_head_gain_is_paired_and_judged_by_its_interval():
    data = group_with_orphans()
    results = {"head": score_line(identity, data, PARAMS),
               "zero_shot_same": score_line(identity, data, PARAMS)}
    gain = group_summary(data, results, "zero_shot_same", PARAMS)["head_minus_reference"]
    assert gain == {"reference": "zero_shot_same", "difference": 0.0, "low": 0.0, "high": 0.0,
                    "significant": False}


def test_reference_line_is_chosen_on_validation_scores():
    validation = {"zero_shot_a": {"scores": {"all": {"mP@5": 0.6}}},
                  "zero_shot_b": {"scores": {"all": {"mP@5": 0.7}}},
                  "head": {"scores": {"all": {"mP@5": 0.9}}}}
    assert best_zero_shot(validation, 5) == "zero_shot_b"


def test_split_groups_follows_the_manifest_and_refuses_an_empty_group():
    query, index = clusters(range(3), 2, 8, seed=0), clusters(range(3), 1, 8, seed=3)
    group = {0: "validation", 1: "test", 2: "test"}
    rows = [{"key": k, "group": group[int(c)], "source": f"s{c}"} for f in (query, index)
            for k, c in zip(f.keys, f.class_ids)]
    groups = split_groups(query, index, ManifestIndex(pl.DataFrame(rows)))
    assert sorted(groups["validation"].query.class_ids.tolist()) == [0, 0]
    assert sorted(groups["test"].index.class_ids.tolist()) == [1, 2]
    expected = [f"s{c}" for c in groups["test"].query.class_ids]  # each query's own source
    assert groups["test"].sources == expected
    only_test = ManifestIndex(pl.DataFrame([{**r, "group": "test"} for r in rows]))
    with pytest.raises(ValueError, match="no validation classes"):
        split_groups(query, index, only_test)
    stale = ManifestIndex(pl.DataFrame(rows[1:]))  # features of a key the manifest lacks
    with pytest.raises(ValueError, match="not in the manifest"):
        split_groups(query, index, stale)


def test_report_shows_intervals_and_the_verdict():
    data = group_with_orphans()
    results = {"head": score_line(identity, data, PARAMS),
               "zero_shot_x": score_line(lambda x: identity(x[:, :4]), data, PARAMS)}
    summary = group_summary(data, results, "zero_shot_x", PARAMS)
    metrics = {"k": 5, "bootstrap": {"resamples": 500, "confidence": 0.95, "seed": 0,
                                     "unit": "query class"},
               "validation": summary, "test": summary}
    text = metrics_markdown(metrics)
    head = summary["lines"]["head"]["all"]
    assert f"| head | {head['mP@5']:.4f} [{head['low']:.3f}, {head['high']:.3f}]" in text
    assert "2 queries had no index image" in text and "Test classes" in text
    assert "significant" in text
    rows = metrics_rows(metrics)
    assert {r["group"] for r in rows} == {"test", "validation"}
    assert {(r["search"], r["recall@5"]) for r in rows} == {("exact", None)}
    assert "Approximate search" not in text
    json.dumps(rows, allow_nan=False)
    assert "+0.0000" in metrics_diff_markdown(metrics, metrics)


def test_exact_search_says_so_and_matches_brute_force():
    data = group_with_orphans()
    line = score_line(identity, data, PARAMS)
    assert line["scores"]["all"]["search"] == "exact"
    q, x = identity(data.query.embeddings), identity(data.index.embeddings)
    brute = np.argsort(((q[:, None] - x[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :10]
    assert np.array_equal(line["neighbours"], brute)
    assert search_markdown({"k": 5, "validation": {"lines": {"head": line["scores"]}},
                            "test": {"lines": {"head": line["scores"]}}}) == ""


@pytest.mark.parametrize("factory, setting", [("IVF64,Flat", "nprobe=2"),
                                              ("HNSW32,Flat", "efSearch=8")])
def test_approximate_search_beyond_the_threshold_reports_its_recall(factory, setting):
    # 300 classes x 12 index images; the threshold (100) forces the approximate index,
    # searched so shallowly that it misses neighbours: recall < 1, and the reported
    # recall@5 must equal a brute-force count on the same seeded sample of queries.
    query = clusters(range(300), 2, 16, seed=1, noise=0.5)
    index = clusters(range(300), 12, 16, seed=2, noise=0.5)
    data = GroupData(query, index, ["a"] * len(query.keys))
    params = PARAMS.model_copy(update={"exact_max_index": 100, "recall_queries": 200,
                                       "approximate_index": factory,
                                       "approximate_search": setting})
    line = score_line(identity, data, params)
    search = line["scores"]["all"]
    assert search["search"] == "approximate" and search["recall_queries"] == 200
    q, x = identity(query.embeddings), identity(index.embeddings)
    sample = np.sort(np.random.default_rng(params.seed).choice(len(q), 200, replace=False))
    exact = np.argsort(((q[sample, None] - x[None]) ** 2).sum(-1), axis=1)[:, :5]
    found = [len(set(a) & set(e)) / 5 for a, e in zip(line["neighbours"][sample, :5].tolist(),
                                                     exact.tolist())]
    assert search["recall@5"] == pytest.approx(np.mean(found), abs=1e-4)
    assert 0.3 < search["recall@5"] < 1.0
    # the mP@5 beside it is that of the approximate neighbours
    per_query = precision_at_k(index.class_ids[line["neighbours"]], query.class_ids,
                               index.class_ids, 5)
    assert search["mP@5"] == pytest.approx(np.nanmean(per_query), abs=1e-4)
    metrics = {"k": 5, "validation": {"lines": {"head": line["scores"]}},
               "test": {"lines": {"head": line["scores"]}}}
    assert f"| test | head | {factory} | {setting} | 200 | {search['recall@5']:.4f}" in \
        search_markdown(metrics)
    # the report and the artifact rows (Prefect's table) carry the recall beside the mP@5
    summary = group_summary(data, {"head": line, "zero_shot_x": line}, "zero_shot_x", params)
    full = {"k": 5, "bootstrap": {"resamples": 500, "confidence": 0.95, "seed": 0},
            "validation": summary, "test": summary}
    assert search_markdown(full) in metrics_markdown(full) and search_markdown(full)
    rows = [r for r in metrics_rows(full) if r["model"] == "head"]
    assert rows and {(r["search"], r["recall@5"]) for r in rows} == {
        ("approximate", search["recall@5"])}
    # bad settings are refused when params are read
    with pytest.raises(ValueError, match="factory"):
        EvaluateParams(approximate_index="IVFx")
    with pytest.raises(ValueError, match="search setting"):
        EvaluateParams(approximate_search="nprobe=16")  # an IVF setting, HNSW index


def test_gallery_reads_only_the_images_it_shows():
    neighbours = np.array([[3, 1, 0], [2, 2, 4], [0, 1, 2]])
    keys = gallery_keys([0, 2], neighbours, ["q0", "q1", "q2"], ["i0", "i1", "i2", "i3", "i4"],
                        k=2)
    assert keys == {"q0", "q2", "i3", "i1", "i0"}


def test_an_approximate_search_short_of_neighbours_is_an_error_not_a_wrong_label():
    """faiss pads a short result list with -1, which numpy indexing would read as the last
    index image: an IVF index probing one of 64 lists of 120 images finds too few."""
    query = clusters(range(10), 2, 16, seed=1)
    index = clusters(range(10), 12, 16, seed=2)
    params = PARAMS.model_copy(update={"exact_max_index": 10, "approximate_index": "IVF64,Flat",
                                       "approximate_search": "nprobe=1"})
    with pytest.raises(ValueError, match="fewer than 10 neighbours"):
        score_line(identity, GroupData(query, index, ["a"] * len(query.keys)), params)
